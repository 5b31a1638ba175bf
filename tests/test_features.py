"""Tests of vqkit's features module: the FID InceptionV3 loading path (torch-fidelity's
network) with a randomly initialised network of the same architecture saved to a file."""

from __future__ import annotations

import importlib.util
import io

import pytest
import torch

if importlib.util.find_spec("torch_fidelity") is None:  # CI installs it (--no-deps)
    pytest.skip("torch-fidelity not installed", allow_module_level=True)

from vqkit.evaluation.features import (  # noqa: E402
    INCEPTION_FILE,
    InceptionFeatures,
    _inception_class,
)


def random_inception_file(path):
    """torch-fidelity's InceptionV3, randomly initialised, saved as the FID weights file
    would be (float16 to halve the file; loading casts to the network's float32)."""
    cls = _inception_class()

    class Unloaded(cls):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random init

    buf = io.BytesIO()
    torch.save({}, buf)
    buf.seek(0)
    torch.manual_seed(0)
    net = Unloaded("random", ["2048"], feature_extractor_weights_path=buf)
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    return path, random_inception_file(path)


def test_loads_the_file_and_extracts_2048_features(inception_file):
    path, state = inception_file
    ext = InceptionFeatures(path)
    got = ext.net.state_dict()
    assert set(got) == set(state)
    torch.testing.assert_close(got["fc.weight"], state["fc.weight"].float())
    x = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    f = ext(x)  # gray replicated to RGB
    assert f.shape == (2, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
    torch.testing.assert_close(f[1:], ext(x[1:].expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)
    info = ext.describe()
    assert info["comparable_with_papers"] and len(info["weights_sha256"]) == 64
    with pytest.raises(ValueError, match="expected uint8 images"):
        ext(x.float())


def test_wrong_or_truncated_files_are_one_line_errors(inception_file, tmp_path):
    path, state = inception_file
    with pytest.raises(FileNotFoundError, match=f"not found: download .*{INCEPTION_FILE}"):
        InceptionFeatures(tmp_path / "nope.pth")
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(path.read_bytes()[: 1 << 20])
    with pytest.raises(ValueError, match="cannot read InceptionV3 weights file") as e:
        InceptionFeatures(trunc)
    assert "\n" not in str(e.value)
    wrong = tmp_path / "wrong.pth"
    torch.save({**state, "fc.weight": torch.zeros(1000, 2048)}, wrong)  # torchvision's head
    with pytest.raises(ValueError, match=r"not the FID InceptionV3: 1 tensors of the wrong shape"):
        InceptionFeatures(wrong)
    other = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, other)
    with pytest.raises(ValueError, match="missing tensors") as e:
        InceptionFeatures(other)
    assert "\n" not in str(e.value)
