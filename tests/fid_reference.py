"""torch-fidelity's FID InceptionV3 as a stored reference for vqkit's own
(:mod:`vqkit.evaluation.inception`), so the tests need neither torch-fidelity nor the
torchvision it imports (there is no CPU torchvision to install here).

``tests/data/fid_inception_reference.safetensors`` holds, for weights drawn by
:func:`fill` (a rule of each tensor's name and shape alone, so any network with the same
state-dict layout gets the same weights):

* ``features_*``: torch-fidelity 0.4.0's ``FeatureExtractorInceptionV3`` 2048-d features
  of the uint8 images of :func:`feature_inputs`;
* ``resize_*``: its ``interpolate_bilinear_2d_like_tensorflow1x`` to 299 x 299 of the
  images of :func:`resize_inputs`, at 4,096 positions drawn by :func:`resize_positions`;
* metadata ``layout``: its state dict's names and shapes (JSON), the layout of the
  ``pt_inception-2015-12-05`` weights file users bring; ``made_with``: the versions.

Made by ``python -m tests.fid_reference`` where torch-fidelity imports (with torchvision);
the tests only read the file (``tests/test_features.py``, ``tests/test_inception.py``).
"""

from __future__ import annotations

import io
import json
import zlib
from importlib.metadata import version
from pathlib import Path

import torch

REFERENCE = Path(__file__).parent / "data" / "fid_inception_reference.safetensors"
FEATURE_SHAPES = ((2, 3, 32, 32), (1, 3, 320, 301), (1, 3, 299, 299), (1, 1, 28, 28))
RESIZE_SIZES = ((32, 32), (28, 40), (512, 300), (299, 299))


def fill(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The weight ``name`` of ``shape``: random from a seed of the name alone, of a scale
    that keeps activations of order 1 through the 94 convolutions (the default init
    would shrink them towards 0), BatchNorm statistics away from 0 / 1;
    ``num_batches_tracked`` 0."""
    if name.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.long)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if name.endswith("conv.weight"):
        fan_in = int(torch.Size(shape)[1:].numel())
        return torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    if name.endswith(("bn.weight", "bn.running_var")):
        return 0.5 + torch.rand(shape, generator=g)
    return 0.1 * torch.randn(shape, generator=g)  # bn.bias, bn.running_mean, fc


def feature_inputs() -> list[torch.Tensor]:
    """uint8 images upsampled, downsampled, at size, and gray (replicated to RGB)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, s, dtype=torch.uint8, generator=g) for s in FEATURE_SHAPES]


def resize_inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 256, (2, 3, h, w), generator=g).float() for h, w in RESIZE_SIZES]


def resize_positions() -> torch.Tensor:
    """4,096 of the (2, 3, 299, 299) output's flat positions."""
    return torch.randperm(2 * 3 * 299 * 299, generator=torch.Generator().manual_seed(3))[:4096]


def load() -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """(the stored tensors, torch-fidelity's state-dict layout)."""
    from safetensors import safe_open

    with safe_open(str(REFERENCE), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        layout = json.loads(f.metadata()["layout"])
    return tensors, layout


def main() -> None:  # pragma: no cover - run where torch-fidelity imports
    from safetensors.torch import save_file
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x as tf1_resize,
    )

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # the weights are fill()'s, set below

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    net = Unloaded("random", ["2048"], feature_extractor_weights_path=empty).eval()
    with torch.no_grad():
        for name, t in net.state_dict().items():
            t.copy_(fill(name, tuple(t.shape)))
        out: dict[str, torch.Tensor] = {}
        for i, x in enumerate(feature_inputs()):
            out[f"features_{i}"] = net(x.expand(-1, 3, -1, -1))[0].contiguous()
        where = resize_positions()
        for i, x in enumerate(resize_inputs()):
            y = tf1_resize(x, size=(299, 299), align_corners=False)
            out[f"resize_{i}"] = y.reshape(-1)[where].contiguous()
    layout = {k: list(v.shape) for k, v in net.state_dict().items()}
    made = {"torch_fidelity": version("torch-fidelity"), "torch": torch.__version__}
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(REFERENCE), {"layout": json.dumps(layout), "made_with": json.dumps(made)})
    print(f"wrote {REFERENCE}: {len(out)} tensors, {len(layout)} weights in the layout")


if __name__ == "__main__":
    main()
