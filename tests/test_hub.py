"""vqkit.models.hub: save_pretrained / from_pretrained round trips for every quantizer
kind and the prior (bit-identical decodes, every buffer, the same log-probabilities),
strict loading (a missing buffer, an extra key, another architecture are refused), and a
local directory that loads without huggingface_hub; all with the network refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqkit.models import VQVAE
from vqkit.models.hub import HUB_AVAILABLE
from vqkit.prior import Prior, PriorConfig
from vqkit.quantizers.registry import quantizer_kinds
from vqkit.storage.checkpoint import CheckpointError

from .test_io import tiny

SRC = str(Path(__file__).resolve().parents[1] / "src")
NO_NETWORK = "network refused in the tests"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(NO_NETWORK)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def trained(kind: str) -> VQVAE:
    """A tiny model whose buffers (EMA statistics, usage) moved away from their init."""
    model = tiny(kind).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(4, 1, 8, 8, generator=g) - 0.5)
    return model.eval()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == sb[k].dtype and torch.equal(v, sb[k]), k
        else:
            assert v == sb[k], k


@pytest.mark.parametrize("kind", quantizer_kinds())
def test_tokenizer_round_trip_for_every_quantizer(kind, tmp_path):
    model = trained(kind)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "model.safetensors"]
    loaded = VQVAE.from_pretrained(tmp_path)
    assert not loaded.training
    assert_same_state(model, loaded)  # every buffer, extra state (FSQ levels) included
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)) - 0.5
    idx = model.encode(x)
    assert torch.equal(loaded.encode(x), idx)
    assert torch.equal(loaded.decode(idx), model.decode(idx))  # bit-identical images


def test_vqgan_network_round_trip(tmp_path):
    torch.manual_seed(0)
    model = VQVAE(image_size=16, arch="vqgan", hidden=32, res_layers=1, num_embeddings=16,
                  embedding_dim=8).eval()  # fmt: skip
    model.save_pretrained(tmp_path)
    loaded = VQVAE.from_pretrained(tmp_path)
    assert_same_state(model, loaded)
    idx = model.encode(torch.rand(2, 3, 16, 16) - 0.5)
    assert torch.equal(loaded.decode(idx), model.decode(idx))
    assert "network: `vqgan` encoder/decoder" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_prior_round_trip_gives_the_same_log_probs(pos, tmp_path):
    torch.manual_seed(0)
    cfg = PriorConfig(n_layer=1, n_head=2, n_embd=16, pos=pos, vocab_size=12,
                      code_shape=[2, 3], num_classes=3)  # fmt: skip
    prior = Prior(cfg).eval()
    prior.pretrained_info = {"classes": ["a", "b", "c"]}
    prior.save_pretrained(tmp_path)
    loaded = Prior.from_pretrained(tmp_path)
    assert loaded.config.to_dict() == cfg.to_dict()
    assert loaded.pretrained_info == {"classes": ["a", "b", "c"]}
    assert loaded.head.weight is loaded.tok_emb.weight  # still tied
    assert_same_state(prior, loaded)
    codes = torch.randint(0, 12, (4, 2, 3), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 3])
    assert torch.equal(loaded.log_prob(codes, labels), prior.log_prob(codes, labels))


def _rewrite(path: Path, edit) -> None:
    """Rewrite a safetensors file with ``edit(state, meta)`` applied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    edit(state, meta)
    save_file(state, str(path), metadata=meta)


def test_a_missing_buffer_an_extra_key_or_another_architecture_is_refused(tmp_path):
    model = trained("ema")
    buffer = sorted(n for n, _ in model.named_buffers() if n.startswith("quantizer."))[0]
    cases = {
        "missing": (lambda s, m: s.pop(buffer), f"missing {buffer}"),
        "extra": (lambda s, m: s.update(stray=torch.zeros(1)), "unexpected stray"),
    }
    for name, (edit, message) in cases.items():
        model.save_pretrained(tmp_path / name)
        _rewrite(tmp_path / name / "model.safetensors", edit)
        with pytest.raises(CheckpointError, match=message):
            VQVAE.from_pretrained(tmp_path / name)
    # weights of another architecture under this config.json
    model.save_pretrained(tmp_path / "arch")
    other = VQVAE(model.config, hidden=16)
    other.save_pretrained(tmp_path / "other")
    os.replace(tmp_path / "other" / "model.safetensors", tmp_path / "arch" / "model.safetensors")
    with pytest.raises(CheckpointError, match="another architecture.*hidden"):
        VQVAE.from_pretrained(tmp_path / "arch")
    # ... even when its metadata is made to agree: the shapes differ
    _rewrite(tmp_path / "arch" / "model.safetensors",
             lambda s, m: m.update(model_config=json.dumps(model.config.to_dict())))  # fmt: skip
    with pytest.raises(CheckpointError, match="other shapes: encoder"):
        VQVAE.from_pretrained(tmp_path / "arch")
    # FSQ's levels are extra state: without them the file is incomplete
    fsq = trained("fsq")
    fsq.save_pretrained(tmp_path / "fsq")
    _rewrite(tmp_path / "fsq" / "model.safetensors", lambda s, m: m.pop("extra_state"))
    with pytest.raises(CheckpointError, match="missing quantizer._extra_state"):
        VQVAE.from_pretrained(tmp_path / "fsq")
    # a prior's directory is not a tokenizer, and no lenient loading
    with pytest.raises(CheckpointError, match="not a vqkit prior"):
        Prior.from_pretrained(tmp_path / "fsq")
    with pytest.raises(ValueError, match="strictly"):
        VQVAE.from_pretrained(tmp_path / "extra", strict=False)
    with pytest.raises(CheckpointError, match="not found"):
        VQVAE.from_pretrained(tmp_path / "absent")


def test_model_card_states_quantizer_codes_grid_data_and_figures(tmp_path):
    model = trained("rvq")
    figures = {"split": "test", "step": 40, "nmse": 0.0561, "psnr": 21.6, "codes_used": 16}
    model.save_pretrained(tmp_path, model_card_kwargs={"evaluation": figures, "data": "mnist"})
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: vqkit\n")
    for text in ("`rvq`", "K = 16 per stage", "2 x 2 x 2 stages", "data: mnist",
                 "| nmse | 0.0561 |", "| step | 40 |", "| codes_used | 16 |"):  # fmt: skip
        assert text in card, text
    model.save_pretrained(tmp_path)  # saved again: the card is rewritten, not kept stale
    assert "Not measured" in (tmp_path / "README.md").read_text()


@pytest.mark.skipif(not HUB_AVAILABLE, reason="the hub extra is not installed")
def test_a_hub_repo_id_offline_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot fetch nobody/nothing from the Hugging"):
        VQVAE.from_pretrained("nobody/nothing", cache_dir=tmp_path, local_files_only=True)


WITHOUT_HUB = """
import socket, sys
sys.modules["huggingface_hub"] = None  # the extra is not installed: its import fails
def refuse(*a, **k):
    raise OSError("network refused")
socket.socket.connect = refuse
import torch
from vqkit.models import VQVAE
from vqkit.models.hub import HUB_AVAILABLE
from vqkit.storage.checkpoint import CheckpointError
assert not HUB_AVAILABLE
d = sys.argv[1]
idx, images = torch.load(d + "/expected.pt")
model = VQVAE.from_pretrained(d + "/saved")
assert torch.equal(model.decode(idx), images)
model.save_pretrained(d + "/again")  # the same layout, card included
assert torch.equal(VQVAE.from_pretrained(d + "/again").decode(idx), images)
try:
    VQVAE.from_pretrained("someone/a-model")
except CheckpointError as e:
    assert "vqkit[hub]" in str(e), e
else:
    raise AssertionError("a repo id loaded without huggingface_hub")
print("OK", open(d + "/again/README.md").read().count("| nmse |"))
"""


def test_a_local_directory_loads_without_huggingface_hub(tmp_path):
    model = trained("fsq")
    model.save_pretrained(tmp_path / "saved")
    idx = model.encode(torch.rand(2, 1, 8, 8) - 0.5)
    torch.save((idx, model.decode(idx)), tmp_path / "expected.pt")
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", WITHOUT_HUB, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["OK", "0"]


def _edit_config(path: Path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


CONFIG_DAMAGES = {  # config.json fields of the wrong JSON type, and what the error names
    "config_an_int": (lambda c: c.update(config=3), "config"),
    "config_a_list": (lambda c: c.update(config=[1, 2]), "config"),
    "info_an_int": (lambda c: c.update(info=3), "info"),
    "info_pairs": (lambda c: c.update(info=[["a", 1]]), "info"),  # dict() took it silently
    "top_level_list": (lambda c: c.clear() or c.update(x=1), "not a vqkit"),
}
META_DAMAGES = {  # the weights file's metadata fields (JSON strings) of the wrong type
    "model_config_an_int": (lambda s, m: m.update(model_config="3"), "model_config"),
    "model_config_a_list": (lambda s, m: m.update(model_config="[1]"), "model_config"),
    "extra_state_a_list": (lambda s, m: m.update(extra_state="[1]"), "extra_state"),
    "aliases_a_list": (lambda s, m: m.update(aliases="[1]"), "aliases"),
    "aliases_to_an_int": (lambda s, m: m.update(aliases='{"a": 3}'), "aliases"),
}


@pytest.mark.parametrize("damage", sorted(CONFIG_DAMAGES) + sorted(META_DAMAGES))
def test_non_dict_fields_are_one_line_naming_file_and_field(tmp_path, damage):
    """A field of config.json or of the weights' metadata that is not the JSON type it
    must be: one UserError line naming the file and the field (before: AttributeError /
    TypeError tracebacks, or a list of pairs taken as a dict)."""
    from vqkit.errors import UserError

    model = trained("vq")
    model.save_pretrained(tmp_path)
    if damage in CONFIG_DAMAGES:
        edit, field = CONFIG_DAMAGES[damage]
        _edit_config(tmp_path, edit)
        named = tmp_path / "config.json"
    else:
        edit, field = META_DAMAGES[damage]
        _rewrite(tmp_path / "model.safetensors", edit)
        named = tmp_path / "model.safetensors"
    with pytest.raises(UserError) as e:
        VQVAE.from_pretrained(tmp_path)
    msg = str(e.value)
    assert str(named) in msg and field in msg and "\n" not in msg, msg


@pytest.mark.parametrize(
    "info",
    [{"tokenizer": 3}, {"tokenizer": {"identity": 5}}, {"tokenizer": {"location": 7}}, []],
)
def test_prior_tokenizer_fields_of_the_wrong_type_are_one_line(tmp_path, info):
    """A prior's info.tokenizer (or its identity / location) of the wrong JSON type:
    one line naming config.json (before: AttributeError / TypeError tracebacks)."""
    from vqkit.errors import UserError
    from vqkit.prior.pretrained import load_prior_tokenizer

    cfg = PriorConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=16, code_shape=[2, 2])
    prior = Prior(cfg).eval()
    prior.save_pretrained(tmp_path / "prior")
    trained("vq").save_pretrained(tmp_path / "tok")
    _edit_config(tmp_path / "prior", lambda c: c.update(info=info))
    with pytest.raises(UserError) as e:
        Prior.from_pretrained(tmp_path / "prior", tokenizer=tmp_path / "tok")
    assert str(tmp_path / "prior") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError) as e:
        load_prior_tokenizer(tmp_path / "prior")
    assert str(tmp_path / "prior") in str(e.value) and "\n" not in str(e.value)
