"""Tests of vqkit's suite module: ``vqkit eval`` with every figure (SSIM, MS-SSIM, LPIPS,
bits per pixel, rFID and FD/KID in vqkit's feature space) runs with sockets refused, and
labels each figure with what produced it."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from torch import nn

from vqkit.cli import main
from vqkit.data import load_dataset
from vqkit.evaluation.reconstruction import evaluate
from vqkit.evaluation.suite import QualitySuite
from vqkit.models import VQVAE, export_safetensors

from .test_features import random_inception_file
from .test_perceptual import random_vgg_file


def _refuse(*args, **kwargs):
    raise OSError("network access refused by the test")


def test_whole_evaluation_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    torch.manual_seed(0)
    model = VQVAE(
        in_channels=1, image_size=28, hidden=16, res_hidden=8, res_layers=1, num_embeddings=16
    )
    ckpt = tmp_path / "model.safetensors"
    export_safetensors(model, ckpt)
    feats = tmp_path / "feats"
    assert main(["features", "--data", "builtin", "--out", str(feats), "--steps", "3",
                 "--width", "4", "--batch-size", "16"]) == 0  # fmt: skip
    vgg = tmp_path / "vgg16.pth"
    random_vgg_file(vgg)
    args = ["eval", str(ckpt), "--data", "builtin", "--limit", "2", "--out", str(tmp_path / "ev")]
    args += ["--features", str(feats), "--lpips-weights", str(vgg), "--kid-subset-size", "2"]
    random_inception_file(tmp_path / "inception.pth")
    args += ["--inception-weights", str(tmp_path / "inception.pth")]
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    want = {"psnr", "ssim", "ms_ssim", "lpips", "bits_per_pixel", "codes_used"}
    want |= {"fd_vqkit_features", "fd_vqkit_features_kid", "fd_vqkit_features_kid_std"}
    want |= {"rfid", "rfid_kid"}
    assert want <= set(ev), want - set(ev)
    labels = ev["labels"]
    not_figures = {
        "labels",
        "data",
        "fd_vqkit_features_kid_std",
        "rfid_kid_std",
    }  # data: what was measured
    unlabelled = set(ev) - set(labels) - not_figures
    assert not unlabelled
    assert ev["bits_per_pixel"] == pytest.approx(7 * 7 * 4 / 784)  # 7x7 codes, K=16
    fd = labels["fd_vqkit_features"]
    assert fd["figure"] == "FD (vqkit-features feats)" and not fd["comparable_with_papers"]
    assert "not comparable with papers' rFID" in fd["note"] and len(fd["sha256"]) == 64
    assert "2 scales (the standard 5 need > 160 px" in labels["ms_ssim"]  # 28 px: 2 scales
    # SSIM on both conventions, each labelled with whose it is (the papers': skimage's)
    assert "not the tokenizer papers' convention" in labels["ssim"]
    assert "7x7 uniform window, sample covariance" in labels["ssim_skimage"]
    assert "data_range 1: the convention of Open-MAGVIT2" in labels["ssim_skimage"]
    assert "data_range 2: the convention of LlamaGen" in labels["ssim_skimage_range2"]
    assert ev["ssim_skimage"] != ev["ssim"] and ev["ssim_skimage_range2"] > ev["ssim_skimage"]
    assert "gray replicated to RGB" in labels["lpips"]
    # 2 images: papers' feature space, but not rFID as papers report it (labelled so)
    rfid = labels["rfid"]
    assert rfid["figure"] == "FD (InceptionV3-FID (pool3, 2048-d)) on 2 images"
    assert rfid["images"] == 2 and not rfid["comparable_with_papers"]
    assert rfid["feature_space_comparable_with_papers"] and not rfid["full_rank_covariance"]
    assert "rank at most 1 < 2048" in rfid["caveat"] and "papers use 10,000" in rfid["caveat"]
    # KID of 2 images with --kid-subset-size 2: one draw, no spread (not "100 subsets")
    assert ev["rfid_kid_std"] is None and "one draw of all 2 images" in labels["rfid_kid"]
    assert "100 subsets" not in labels["rfid_kid"]
    assert rfid["feature_space"] == "InceptionV3-FID (pool3, 2048-d)"
    assert rfid["weights"] == "inception.pth" and "vqkit FD / KID" in rfid["computed_by"]
    for key in ("ssim", "ms_ssim", "ssim_skimage", "ssim_skimage_range2"):
        assert 0 < ev[key] <= 1


class _PaperSpace(nn.Module):
    """Stands in for a feature space papers use: 4 pixel values of a 2 x 2 image."""

    name = "paper space"
    comparable_with_papers = True

    def forward(self, x):
        return x.reshape(x.shape[0], -1).float()

    def describe(self):
        return {"feature_space": self.name, "comparable_with_papers": True}


@pytest.mark.parametrize("images", [9_999, 10_000])
def test_rfid_is_comparable_with_papers_from_10000_images(images):
    torch.manual_seed(0)
    x = torch.rand(images, 1, 2, 2) - 0.5
    suite = QualitySuite(image_metrics=False, extractors={"rfid": _PaperSpace()})
    suite.update(x, x + 0.01 * torch.randn_like(x))
    figures, labels = suite.compute()
    label = labels["rfid"]
    assert label["images"] == images and label["full_rank_covariance"]
    assert label["comparable_with_papers"] == (images >= 10_000)
    assert label["figure"] == (
        "rFID" if images >= 10_000 else f"FD (paper space) on {images} images"
    )
    assert figures["rfid_kid_std"] > 0 and "100 subsets of 1000" in labels["rfid_kid"]


def test_absent_figures_stay_absent():
    torch.manual_seed(0)
    model = VQVAE(in_channels=1, image_size=28, hidden=16, res_hidden=8, res_layers=1)
    data = load_dataset("builtin", "test")
    plain = evaluate(model, data, data_variance=0.1, limit=8)
    assert "ssim" not in plain and "labels" not in plain and "bits_per_pixel" in plain
    out = evaluate(model, data, data_variance=0.1, limit=8, suite=QualitySuite())
    assert {"ssim", "ssim_skimage", "ssim_skimage_range2", "ms_ssim"} <= set(out)
    assert "lpips" not in out and "rfid" not in out
    assert "lpips" not in out["labels"]


def test_eval_flag_errors_are_one_line(tmp_path, capsys):
    model = VQVAE(in_channels=1, image_size=28, hidden=16, res_hidden=8, res_layers=1)
    ckpt = tmp_path / "m.safetensors"
    export_safetensors(model, ckpt)
    base = ["eval", str(ckpt), "--data", "builtin", "--out", str(tmp_path / "e")]
    assert main(base + ["--lpips-weights", str(tmp_path / "none.pth")]) == 2
    err = capsys.readouterr().err
    assert "vgg16-397923af.pth" in err and err.count("\n") == 1
    assert main(base + ["--features", str(tmp_path / "none")]) == 2
    assert "make one with vqkit features" in capsys.readouterr().err
    assert main(base + ["--limit", "1"]) == 2
    assert "--limit must be >= 2" in capsys.readouterr().err


def test_missing_ssim_packages_are_one_line(monkeypatch, tmp_path, capsys):
    import vqkit.evaluation.suite as suite_module

    real = suite_module.find_spec
    monkeypatch.setattr(
        suite_module, "find_spec", lambda name: None if name == "skimage" else real(name)
    )
    with pytest.raises(ValueError, match=r"need scikit-image: pip install 'vqkit\[eval\]'"):
        QualitySuite()
    args = ["train", "--out", str(tmp_path / "r"), "--steps", "1", "--no-progress"]
    assert main(args) == 2  # at start, not at the first evaluation
    err = capsys.readouterr().err
    assert "--no-eval-ssim" in err and err.count("\n") == 1
    QualitySuite(image_metrics=False)  # not asked for: not needed


def test_a_non_finite_distance_is_refused_not_written_as_null():
    class Overflow(_PaperSpace):
        def forward(self, x):
            return super().forward(x) * 1e300  # squares overflow to inf

    suite = QualitySuite(image_metrics=False, extractors={"rfid": Overflow()})
    x = torch.rand(8, 1, 2, 2) - 0.5
    suite.update(x, x.flip(0))
    with pytest.raises(ValueError, match="rfid: FD.* not finite: the features of paper space"):
        suite.compute()
