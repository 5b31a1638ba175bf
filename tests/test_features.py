"""Tests of vqkit's features module: the FID InceptionV3 from the user's file gives
torch-fidelity's features for the same weights, and bad weights files are one-line errors
naming the file. (The network's resize: tests/test_inception.py.)"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from vqkit.errors import UserError
from vqkit.evaluation.features import INCEPTION_FILE, InceptionFeatures
from vqkit.evaluation.inception import FIDInceptionV3


def _randomise(net: nn.Module, seed: int) -> None:
    """Random weights that keep activations of order 1 through the 94 convolutions (the
    default init would shrink them towards 0), and BatchNorm statistics away from 0 / 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("conv.weight"):
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif name.endswith(("bn.weight", "bn.running_var")):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            else:  # bn.bias, bn.running_mean, fc
                t.copy_(0.1 * torch.randn(t.shape, generator=g))


@pytest.fixture(scope="module")
def fidelity_file(fidelity, tmp_path_factory):
    """torch-fidelity's network, randomly initialised, its state dict saved as the FID
    weights file would be; the network itself for the reference features."""
    module = fidelity[0]

    class Unloaded(module.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random init: there are no real weights here

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    net = Unloaded("random", ["2048"], feature_extractor_weights_path=empty)
    _randomise(net, 0)
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path, net


def test_features_equal_torch_fidelity_for_the_same_weights(fidelity_file, tmp_path):
    path, ref_net = fidelity_file
    state = torch.load(path, weights_only=True)
    assert any(k.endswith("num_batches_tracked") for k in state)  # torch's BatchNorm saved it
    ext = InceptionFeatures(path)
    assert set(ext.net.state_dict()) | {k for k in state if "num_batches" in k} == set(state)
    g = torch.Generator().manual_seed(1)
    for shape in ((2, 3, 32, 32), (1, 3, 320, 301), (1, 3, 299, 299)):  # up, down, same
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        want = ref_net(x)[0]
        got = ext(x)
        assert got.shape == (shape[0], 2048) and got.dtype == torch.float32
        assert float(want.std()) > 1e-2  # features that say something
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # the converted file has no num_batches_tracked: loads the same
    bare = tmp_path / "converted.pth"
    torch.save({k: v for k, v in state.items() if "num_batches" not in k}, bare)
    x = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8, generator=g)
    torch.testing.assert_close(InceptionFeatures(bare)(x), ext(x))  # gray: replicated
    torch.testing.assert_close(ext(x), ref_net(x.expand(-1, 3, -1, -1))[0], rtol=1e-4, atol=1e-4)
    info = ext.describe()
    assert info["comparable_with_papers"] and len(info["weights_sha256"]) == 64
    assert info["weights"] == INCEPTION_FILE
    with pytest.raises(UserError, match="expected uint8 images"):
        ext(x.float())


def random_inception_file(path) -> dict[str, torch.Tensor]:
    """vqkit's FID InceptionV3, randomly initialised, saved as its weights file would be
    (float16 to halve the file; loading casts to the network's float32)."""
    net = FIDInceptionV3()
    _randomise(net, 3)
    state = {k: v.half() for k, v in net.state_dict().items()}
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def own_state(tmp_path_factory):
    return random_inception_file(tmp_path_factory.mktemp("own") / INCEPTION_FILE)


def test_bad_weights_files_are_one_line_errors_naming_the_file(own_state, tmp_path):
    good = tmp_path / INCEPTION_FILE
    torch.save(own_state, good)
    InceptionFeatures(good)  # float16 tensors load (cast to the network's float32)
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match=f"not found: download .*{INCEPTION_FILE}") as e:
        InceptionFeatures(missing)
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(good.read_bytes()[: 1 << 20])
    wrong = tmp_path / "torchvision_head.pth"
    torch.save({**own_state, "fc.weight": torch.zeros(1000, 2048)}, wrong)  # torchvision's head
    other = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, other)
    extra = tmp_path / "aux.pth"
    torch.save({**own_state, "AuxLogits.fc.weight": torch.zeros(1000, 768)}, extra)
    nan = tmp_path / "nan.pth"
    bad = own_state["Mixed_6b.branch1x1.conv.weight"].clone()
    bad[0, 0] = float("inf")
    torch.save({**own_state, "Mixed_6b.branch1x1.conv.weight": bad}, nan)
    for path, message in (
        (missing, "not found"),
        (trunc, "cannot read the FID InceptionV3 weights file"),
        (wrong, r"do not match the FID InceptionV3: other shapes: fc.weight \(1000, 2048\)"),
        (other, "do not match the FID InceptionV3: missing Conv2d_1a_3x3"),
        (extra, "do not match the FID InceptionV3: unexpected AuxLogits.fc.weight"),
        (nan, r"non-finite values \(NaN or Inf\) in Mixed_6b.branch1x1.conv.weight"),
    ):
        with pytest.raises(UserError, match=message) as e:
            InceptionFeatures(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
