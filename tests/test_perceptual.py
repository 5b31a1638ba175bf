"""Tests of vqkit's perceptual module: LPIPS-VGG from vqkit's shipped heads and a backbone
file, against a float64 computation written here, the heads against torchmetrics' copy,
and its loading errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from vqkit.errors import UserError
from vqkit.losses.perceptual import LPIPS, LPIPS_HEADS, VGG16_FILE, vgg16_features


def _torchmetrics_heads_file() -> Path | None:
    """The heads inside the installed torchmetrics wheel, found without importing it (the
    test's own reference; the library never reads it)."""
    spec = importlib.util.find_spec("torchmetrics")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root, "functional", "image", "lpips_models", "vgg.pth")
        if path.is_file():
            return path
    return None


def test_shipped_heads_equal_torchmetrics_heads():
    from safetensors.torch import load_file

    ours = load_file(str(LPIPS_HEADS))
    assert sorted(ours) == [f"lin{i}.model.1.weight" for i in range(5)]
    assert [tuple(v.shape) for v in ours.values()] == [
        (1, c, 1, 1) for c in (64, 128, 256, 512, 512)
    ]
    assert all(float(v.min()) >= 0 for v in ours.values())  # LPIPS' heads are non-negative
    assert (LPIPS_HEADS.parent / "LICENSE-LPIPS").is_file()
    ref_file = _torchmetrics_heads_file()
    if ref_file is None:
        pytest.skip("torchmetrics not installed: no reference copy of the heads")
    ref = torch.load(ref_file, map_location="cpu", weights_only=True)
    assert set(ref) == set(ours)
    for k, v in ref.items():
        assert torch.equal(ours[k], v), k
    net = LPIPS()
    for i, head in enumerate(net.heads):
        assert torch.equal(head.weight, ref[f"lin{i}.model.1.weight"])


def random_vgg_file(path):
    """A randomly initialised VGG16 in torchvision's layout (features + a classifier)."""
    torch.manual_seed(0)
    feats = vgg16_features()
    state = {f"features.{k}": v for k, v in feats.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)  # ignored, as in the real file
    torch.save(state, path)
    return feats


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / VGG16_FILE
    return path, random_vgg_file(path)


def test_lpips_matches_a_float64_reference(vgg_file):
    path, feats = vgg_file
    net = LPIPS(path)
    from safetensors.torch import load_file

    heads = load_file(str(LPIPS_HEADS))
    torch.testing.assert_close(net.heads[2].weight, heads["lin2.model.1.weight"])
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 20, 20, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 20, 20, generator=g)).clamp(-1, 1)
    got = net(x, y)
    # reference: the same weights in float64, the LPIPS formula written out
    f64 = feats.double()
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    hx, hy = (x.double() - shift) / scale, (y.double() - shift) / scale
    ref = torch.zeros(2, dtype=torch.float64)
    start = 0
    for i, tap in enumerate((3, 8, 15, 22, 29)):
        for layer in f64[start : tap + 1]:
            hx, hy = layer(hx), layer(hy)
        start = tap + 1
        nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = heads[f"lin{i}.model.1.weight"].double().view(1, -1, 1, 1)
        ref += ((nx - ny).pow(2) * w).sum(1).mean(dim=(1, 2))
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
    assert float(got.min()) > 0
    torch.testing.assert_close(net(x, x), torch.zeros(2))
    # gradients reach the images, never the network
    xr = x.clone().requires_grad_(True)
    net(xr, y).sum().backward()
    assert xr.grad is not None and float(xr.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training


def test_loading_errors_are_one_line(vgg_file, tmp_path):
    path, _ = vgg_file
    with pytest.raises(UserError, match=f"not found: download .*{VGG16_FILE}"):
        LPIPS(tmp_path / "missing.pth")
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cannot read torchvision's VGG16 weights file") as e:
        LPIPS(trunc)
    assert "\n" not in str(e.value)
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, other)
    with pytest.raises(
        UserError,
        match=r"weights do not match torchvision's VGG16: missing features.0.bias, .* and 21 more",
    ) as e:
        LPIPS(other)
    assert "\n" not in str(e.value) and str(other) in str(e.value)
    wrong = tmp_path / "wrong.pth"
    state = torch.load(path, weights_only=True)
    state["features.0.weight"] = torch.zeros(64, 1, 3, 3)  # a one-channel VGG
    torch.save(state, wrong)
    with pytest.raises(UserError, match=r"other shapes: features.0.weight \(64, 1, 3, 3\)"):
        LPIPS(wrong)
    state["features.0.weight"] = torch.full((64, 3, 3, 3), float("nan"))
    torch.save(state, wrong)
    with pytest.raises(
        UserError, match=r"wrong.pth: non-finite values \(NaN or Inf\) in features.0"
    ):
        LPIPS(wrong)
    with pytest.raises(ValueError, match="RGB images"):
        LPIPS()(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16))


def _bad_vgg_files(vgg_file, tmp_path):
    """A VGG16 file with one NaN, and one whose finite weights overflow (x 1e30 per layer:
    the features reach inf, LPIPS NaN)."""
    path, _ = vgg_file
    state = torch.load(path, weights_only=True)
    nan = dict(state, **{"features.28.bias": state["features.28.bias"].clone()})
    nan["features.28.bias"][3] = float("nan")
    torch.save(nan, tmp_path / "nan.pth")
    big = {k: v * 1e30 if k.endswith("weight") else v for k, v in state.items()}
    torch.save(big, tmp_path / "overflow.pth")
    return tmp_path / "nan.pth", tmp_path / "overflow.pth"


def test_a_vgg16_file_that_gives_no_finite_lpips_is_refused_at_load(vgg_file, tmp_path):
    nan, big = _bad_vgg_files(vgg_file, tmp_path)
    with pytest.raises(UserError, match=r"nan.pth: non-finite values \(NaN or Inf\) in features"):
        LPIPS(nan)
    with pytest.raises(UserError, match=r"overflow.pth: LPIPS with these VGG16 weights is not fin"):
        LPIPS(big)


@pytest.mark.parametrize("which", ["nan", "overflow"])
def test_eval_and_train_refuse_a_bad_vgg16_file_naming_it(vgg_file, tmp_path, capsys, which):
    """Both commands stop with exit 2 and one line naming the file: never ``lpips: null``
    with exit 0, never "lower the learning rate"."""
    from vqkit.cli import main
    from vqkit.models import VQVAE, export_safetensors

    bad = dict(zip(("nan", "overflow"), _bad_vgg_files(vgg_file, tmp_path), strict=True))[which]
    model = VQVAE(in_channels=3, image_size=28, hidden=16, res_hidden=8, res_layers=1)
    export_safetensors(model, tmp_path / "m.safetensors")
    ev = tmp_path / "ev"
    args = ["eval", str(tmp_path / "m.safetensors"), "--data", "builtin", "--limit", "4"]
    capsys.readouterr()
    assert main([*args, "--out", str(ev), "--lpips-weights", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and err.count("\n") == 1 and not (ev / "eval.json").exists()
    run = tmp_path / "run"
    train = ["train", "--out", str(run), "--steps", "2", "--channels", "3", "--no-progress"]
    train += ["--hidden", "16", "--res-hidden", "8", "--res-layers", "1", "--batch-size", "4"]
    assert main([*train, "--perceptual-weight", "1", "--perceptual-weights", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and err.count("\n") == 1 and "learning rate" not in err
    assert not (run / "checkpoints").exists()
