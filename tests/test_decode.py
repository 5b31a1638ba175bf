"""Tests of vqkit's data/decode module: the one decode_image every data path uses."""

import io

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from vqkit.data import _stream, decode, imagefolder, pack, transforms  # noqa: E402


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _images():
    g = np.random.default_rng(0)
    rgb = Image.fromarray(g.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    gray = rgb.convert("L")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.info["transparency"] = 0  # palette + transparency: decoded through RGBA
    return {"rgb": rgb, "gray": gray, "palette": pal}


def test_every_data_path_decodes_with_the_one_function():
    assert _stream.decode_image is decode.decode_image
    assert pack.decode_image is decode.decode_image
    assert imagefolder.decode_pixels is decode.decode_pixels
    assert not hasattr(transforms, "decode_image")


@pytest.mark.parametrize("name", ["rgb", "gray", "palette"])
@pytest.mark.parametrize("mode", [None, "L", "RGB"])
def test_decode_image_matches_pillow(tmp_path, name, mode):
    src = _images()[name]
    data = _png(src)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    with Image.open(io.BytesIO(data)) as im:  # the reference: Pillow's own conversion
        im.load()
        ref = im.convert("RGBA") if im.mode == "P" else im
        want_mode = mode or ("L" if im.mode == "L" else "RGB")
        want = np.asarray(ref.convert(want_mode))
    for item in (data, path, str(path)):
        img, gray = decode.decode_image(item, mode)
        assert img.mode == want_mode and gray == (name == "gray")
        np.testing.assert_array_equal(np.asarray(img), want)
    pixels, h, w, c, _ = decode.decode_pixels(data, mode, None)
    assert (h, w, c) == (5, 7, 1 if want_mode == "L" else 3)
    np.testing.assert_array_equal(np.frombuffer(pixels, np.uint8).reshape(want.shape), want)
    channels = None if mode is None else (1 if mode == "L" else 3)
    got = decode.read_image(path, channels)
    assert torch.equal(got, torch.from_numpy(want.reshape(h, w, c).transpose(2, 0, 1).copy()))
