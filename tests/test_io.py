"""Tests of vqkit.models.io: every quantizer kind's model survives a safetensors export
(extra state such as FSQ's levels included) and refuses a mismatched one."""

from __future__ import annotations

import json

import pytest
import torch

from vqkit.models import VQVAE, VQVAEConfig, export_safetensors, load_model
from vqkit.quantizers.registry import quantizer_kinds
from vqkit.storage.checkpoint import CheckpointError

OPTIONS = {
    "fsq": {"levels": "8,5,5,5"},
    "lfq": {"num_bits": 6},
    "bsq": {"num_bits": 6},
    "gvq": {"num_embeddings": 16, "groups": 2},
    "rvq": {"num_embeddings": 16, "num_quantizers": 2},
    "multiscale": {"num_embeddings": 16, "scales": "1,2"},  # the tiny model's 2 x 2 grid
}


def tiny(kind: str) -> VQVAE:
    torch.manual_seed(0)
    opts = OPTIONS.get(kind, {"num_embeddings": 16})
    cfg = VQVAEConfig(
        in_channels=1,
        image_size=8,
        hidden=8,
        res_hidden=4,
        res_layers=1,
        embedding_dim=8,
        quantizer=kind,
        **opts,
    )
    return VQVAE(cfg).eval()


@pytest.mark.parametrize("kind", quantizer_kinds())
def test_export_and_load_round_trip_for_every_quantizer(kind, tmp_path):
    model = tiny(kind)
    path = tmp_path / "model.safetensors"
    export_safetensors(model, path)
    loaded = load_model(path).eval()
    x = torch.rand(2, 1, 8, 8) - 0.5
    assert torch.equal(loaded.encode(x), model.encode(x))
    torch.testing.assert_close(loaded(x).recon, model(x).recon, rtol=0, atol=0)


def test_fsq_levels_travel_in_the_metadata_and_a_mismatch_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "fsq.safetensors"
    export_safetensors(tiny("fsq"), path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(meta["extra_state"]) == {"quantizer._extra_state": {"levels": [8, 5, 5, 5]}}
    meta["extra_state"] = json.dumps({"quantizer._extra_state": {"levels": [5, 8, 5, 5]}})
    save_file(state, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="levels"):
        load_model(path)


def test_load_any_reads_a_codec_or_a_tokenizer_from_every_file(tmp_path):
    """A codec from a .pt checkpoint, a safetensors file and a pretrained directory; a
    tokenizer's pretrained directory too; load_model refuses a codec in one line."""
    from vqkit.models import AudioCodec
    from vqkit.models.io import load_any
    from vqkit.storage.checkpoint import save_checkpoint

    torch.manual_seed(0)
    codec = AudioCodec(sample_rate=2000, seanet_channels=4, strides="2,4", embedding_dim=8,
                       num_quantizers=2, num_embeddings=16).eval()  # fmt: skip
    codec.pretrained_info = {"data": "wavs/"}
    codec.save_pretrained(tmp_path / "codec")
    save_checkpoint(tmp_path / "c.pt", {"model_config": codec.config.to_dict(),
                                        "model": codec.state_dict()})  # fmt: skip
    x = torch.randn(1, 1, 100) * 0.1
    for path in (tmp_path / "c.pt", tmp_path / "codec" / "model.safetensors", tmp_path / "codec"):
        loaded = load_any(path)
        assert isinstance(loaded, AudioCodec) and torch.equal(loaded.encode(x), codec.encode(x))
    assert load_any(tmp_path / "codec").pretrained_info == {"data": "wavs/"}
    tiny("vq").save_pretrained(tmp_path / "tok")
    assert isinstance(load_any(tmp_path / "tok"), VQVAE)
    for path in (tmp_path / "c.pt", tmp_path / "codec" / "model.safetensors"):
        with pytest.raises(CheckpointError, match="holds an audio codec, not an image tokenizer"):
            load_model(path)
    with pytest.raises(CheckpointError, match="holds no config.json"):
        load_any(tmp_path)
