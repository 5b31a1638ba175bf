"""Tests of vqkit's features module: the FID InceptionV3 from the user's file gives
torch-fidelity's features for the same weights, and bad weights files are one-line errors
naming the file. (The network's resize: tests/test_inception.py.)"""

from __future__ import annotations

import pytest
import torch

from vqkit.errors import UserError
from vqkit.evaluation.features import INCEPTION_FILE, InceptionFeatures
from vqkit.evaluation.inception import FIDInceptionV3

from . import fid_reference


@pytest.fixture(scope="module")
def fidelity_file(tmp_path_factory):
    """An FID weights file in torch-fidelity's state-dict layout (names and shapes, as
    stored by ``tests/fid_reference.py``) with the reference's weights; and the stored
    reference tensors."""
    tensors, layout = fid_reference.load()
    state = {name: fid_reference.fill(name, tuple(shape)) for name, shape in layout.items()}
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(state, path)
    return path, tensors


def test_features_equal_torch_fidelity_for_the_same_weights(fidelity_file, tmp_path):
    """torch-fidelity 0.4.0's features for the same weights and images (stored by
    tests/fid_reference.py): the file in its layout loads strictly and gives them."""
    path, ref = fidelity_file
    state = torch.load(path, weights_only=True)
    assert any(k.endswith("num_batches_tracked") for k in state)  # torch's BatchNorm saved it
    ext = InceptionFeatures(path)
    assert set(ext.net.state_dict()) | {k for k in state if "num_batches" in k} == set(state)
    inputs = fid_reference.feature_inputs()
    for i, x in enumerate(inputs[:3]):  # upsampled, downsampled, at size
        want = ref[f"features_{i}"]
        got = ext(x)
        assert got.shape == (x.shape[0], 2048) and got.dtype == torch.float32
        assert float(want.std()) > 1e-2  # features that say something
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # the converted file has no num_batches_tracked: loads the same
    bare = tmp_path / "converted.pth"
    torch.save({k: v for k, v in state.items() if "num_batches" not in k}, bare)
    gray = inputs[3]
    torch.testing.assert_close(InceptionFeatures(bare)(gray), ext(gray))
    want = ref["features_3"]  # gray: replicated to RGB
    torch.testing.assert_close(ext(gray), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    info = ext.describe()
    assert info["comparable_with_papers"] and len(info["weights_sha256"]) == 64
    assert info["weights"] == INCEPTION_FILE
    with pytest.raises(UserError, match="expected uint8 images"):
        ext(gray.float())


def random_inception_file(path) -> dict[str, torch.Tensor]:
    """vqkit's FID InceptionV3, randomly initialised, saved as its weights file would be
    (float16 to halve the file; loading casts to the network's float32)."""
    layout = FIDInceptionV3().state_dict()
    state = {k: fid_reference.fill(k, tuple(v.shape)).half() for k, v in layout.items()}
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
