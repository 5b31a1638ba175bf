"""``vqkit train`` (vqkit.training.cli): image or audio by --modality, the files, or a
resumed run's checkpoint; what does not fit is refused in one line."""

from __future__ import annotations

import json

import pytest

from tests.test_audio_trainer import write_folder
from vqkit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "--sample-rate", "2000", "--seanet-channels", "4", "--strides", "2,4",
    "--embedding-dim", "8", "--num-quantizers", "2", "--num-embeddings", "16",
    "--segment-seconds", "0.2", "--batch-size", "4", "--stft-resolutions", "64:16:64",
    "--mel-scales", "128:32:20", "--no-progress", "--log-every", "2", "--eval-every", "2",
    "--eval-clips", "2", "--sample-clips", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("wavs"))


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def test_wav_folder_trains_the_codec_and_resumes(tmp_path, wavs, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--data", str(wavs), "--out", out, "--steps", "2", *TINY]) == 0
    printed = capsys.readouterr().out
    assert '"stages"' in printed and "codec/model.safetensors" in printed
    # the resumed run is the codec's by its checkpoint: no --data, no --modality needed
    assert main(["train", "--resume", "--out", out, "--steps", "4", "--no-progress"]) == 0
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["step"] == 4 and [r["num_stages"] for r in ev["stages"]] == [1, 2]


def test_modality_image_on_a_wav_folder_is_one_line(tmp_path, wavs, capsys):
    assert main(["train", "--data", str(wavs), "--modality", "image", "--out", str(tmp_path)]) == 2
    assert "--modality image, but" in _error(capsys)


def test_images_and_wavs_together_are_one_line(tmp_path, wavs, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.wav").write_bytes((wavs / "train" / "c0.wav").read_bytes())
    from PIL import Image

    Image.new("RGB", (8, 8)).save(mixed / "b.png")
    assert main(["train", "--data", str(mixed), "--out", str(tmp_path / "o")]) == 2
    assert "holds both images" in _error(capsys)


def test_a_flag_of_the_other_job_is_one_line(tmp_path, wavs, capsys):
    out = str(tmp_path / "o")
    assert main(["train", "--data", str(wavs), "--image-size", "16", "--out", out]) == 2
    assert "--image-size applies to image data" in _error(capsys)
    assert main(["train", "--segment-seconds", "1", "--out", out]) == 2
    assert "--segment-seconds applies to audio data" in _error(capsys)
    assert main(["train", "--modality", "audio", "--out", out]) == 2
    assert "needs --data" in _error(capsys)
    assert main(["train", "--data", str(wavs), "--disc-weight", "1", "--out", out]) == 2
    assert "--disc-weight applies to image data" in _error(capsys)
    assert main(["train", "--audio-disc", "mpd", "--out", out]) == 2
    assert "--audio-disc applies to audio data" in _error(capsys)
    bad = ["train", "--data", str(wavs), "--audio-disc-channels", "0", "--out", out]
    assert main(bad) == 2
    assert "audio_disc_channels must be a positive int; got 0" in _error(capsys)


def test_the_codec_trains_with_a_discriminator_from_disc_start(tmp_path, wavs, capsys):
    """The discriminator's flags: the codec's own (--audio-disc, ...) and the ones both
    jobs share (--disc-start, --disc-lr)."""
    out = tmp_path / "gan"
    args = ["train", "--data", str(wavs), "--out", str(out), "--steps", "2", *TINY]
    args += ["--audio-disc", "stft", "--audio-disc-channels", "2", "--disc-start", "1"]
    assert main([*args, "--disc-lr", "1e-3", "--audio-disc-loss", "least_squares"]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (train,) = [r for r in records if r["kind"] == "train"]
    assert train["disc_steps"] == 1 and {"g_adv", "feat_match", "d_loss"} <= set(train)
    stored = json.loads((out / "config.json").read_text())["train"]
    assert (stored["audio_disc"], stored["disc_start"], stored["disc_lr"]) == ("stft", 1, 1e-3)


def _as_config(flags: list[str]) -> dict:
    """``--name value`` flags (and ``--no-x`` switches) as a ``--config`` file's object."""
    out, i = {}, 0
    while i < len(flags):
        name = flags[i][2:].replace("-", "_")
        if name.startswith("no_"):
            out[name[3:]], i = False, i + 1
        else:
            value = flags[i + 1]
            out[name] = json.loads(value) if value.replace(".", "", 1).isdigit() else value
            i += 2
    return out


def test_a_config_file_of_codec_options_trains_the_codec(tmp_path, wavs, capsys):
    # the file's data and modality choose the job, its keys are the codec's options
    cfg = {"data": str(wavs), "steps": 2, "out_dir": str(tmp_path / "run"), **_as_config(TINY)}
    cfg["num_embeddings"] = 8
    path = tmp_path / "codec.json"
    path.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(path)]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["num_embeddings"] == 8 and saved["train"]["strides"] == "2,4"
    capsys.readouterr()
    # a key of neither job is refused in one line, naming it
    path.write_text(json.dumps({**cfg, "out_dir": str(tmp_path / "b"), "bogus": 1}))
    assert main(["train", "--config", str(path)]) == 2
    assert "unknown keys ['bogus']" in _error(capsys)
