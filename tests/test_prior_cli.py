"""``vqkit prior`` and ``vqkit sample`` end to end on the built-in data: a 3-step
tokenizer, a few prior steps, resume, sampling (files, seeds, ``vqkit decode``), residual
codes, bad input (one-line errors, exit code 2), and a 2-process torchrun run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vqkit.prior.cli import main
from vqkit.storage.checkpoint import load_checkpoint, save_checkpoint

from .test_prior_codes import make_tokenizer

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.usefixtures("one_thread"),
]  # tests that need longer say so

PRIOR_FLAGS = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--batch-size", "16",
    "--eval-every", "3", "--log-every", "3", "--eval-sequences", "32", "--num-samples", "4",
    "--warmup", "2", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread_module):
    """A tokenizer run and a 6-step prior on it (shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("prior_cli")
    tok = make_tokenizer(root / "tok")
    prior = root / "prior"
    assert main(["prior", "--tokenizer", str(tok), "--out", str(prior), "--steps", "6",
                 *PRIOR_FLAGS]) == 0  # fmt: skip
    yield tok, prior


def _sample(prior: Path, out: Path, *flags: str) -> int:
    return main(["sample", str(prior), "--out", str(out), *flags])


@pytest.mark.timeout(120)
def test_prior_run_directory_and_resume(runs, capsys):
    tok, prior = runs
    for name in (
        "config.json",
        "metrics.jsonl",
        "eval.json",
        "curves.png",
        "samples.png",
        "samples/step_0000003.png",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (prior / name).is_file(), name  # fmt: skip
    cfg = json.loads((prior / "config.json").read_text())
    assert cfg["prior"]["vocab_size"] == 32 and cfg["prior"]["code_shape"] == [7, 7]
    assert cfg["prior"]["num_classes"] == 10 and cfg["train"]["steps"] == 6
    ckpt = load_checkpoint(prior / "checkpoints" / "last.pt")
    assert ckpt["tokenizer"]["sha256"] == cfg["tokenizer"]["sha256"]
    assert ckpt["tokenizer"]["checkpoint"] == "checkpoints/best.pt"
    records = [json.loads(line) for line in (prior / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 3), ("eval", 3), ("train", 6), ("eval", 6)
    ]  # fmt: skip
    assert all(0 < r["test_bits"] < 8 for r in records if r["kind"] == "eval")
    # resume: the stored tokenizer and options; the codes come from the cache
    capsys.readouterr()
    assert main(["prior", "--out", str(prior), "--resume", "--steps", "9", "--no-progress"]) == 0
    assert "codes cached" in capsys.readouterr().out
    ckpt = load_checkpoint(prior / "checkpoints" / "last.pt")
    assert ckpt["step"] == 9 and ckpt["train_config"]["steps"] == 9
    assert ckpt["train_config"]["batch_size"] == 16  # the stored option, not the default
    assert main(["prior", "--tokenizer", str(tok), "--out", str(prior), *PRIOR_FLAGS]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_sample_writes_images_and_index_maps(runs, tmp_path):
    tok, prior = runs
    flags = [
        "--num",
        "5",
        "--seed",
        "3",
        "--class",
        "2",
        "--temperature",
        "0.9",
        "--top-k",
        "20",
        "--top-p",
        "0.95",
        "--cfg-scale",
        "1.5",
        "--batch-size",
        "2",
    ]
    assert _sample(prior, tmp_path / "a", *flags) == 0  # fmt: skip
    a = tmp_path / "a"
    for name in ("grid.png", "samples.json", "sample_0000.png", "sample_0004.npy"):
        assert (a / name).is_file(), name
    meta = json.loads((a / "samples.json").read_text())
    assert meta["labels"] == [2] * 5 and meta["options"]["top_k"] == 20
    # an autoregressive prior: its sampling options, nothing of the masked kind's
    assert meta["options"] == {"temperature": 0.9, "top_k": 20, "top_p": 0.95, "cfg_scale": 1.5}
    assert meta["kind"] == "autoregressive" and "masked_options" not in meta
    assert meta["seed"] == 3 and meta["batch_size"] == 2 and meta["device"]
    idx = np.load(a / "sample_0000.npy")
    assert idx.shape == (7, 7) and idx.dtype == np.int64 and 0 <= idx.min() <= idx.max() < 32
    # the same seed gives the same samples; another seed others
    assert _sample(prior, tmp_path / "b", *flags) == 0
    assert _sample(prior, tmp_path / "c", *flags[:-2], "--seed", "4") == 0
    maps = {d: np.stack([np.load(tmp_path / d / f"sample_{i:04d}.npy") for i in range(5)])
            for d in "abc"}  # fmt: skip
    assert np.array_equal(maps["a"], maps["b"]) and not np.array_equal(maps["a"], maps["c"])
    assert (a / "grid.png").read_bytes() == (tmp_path / "b" / "grid.png").read_bytes()
    # vqkit decode reads the index maps and gives the same picture (up to rounding)
    from PIL import Image

    from vqkit.cli import main as vqkit_main

    best = tok / "checkpoints" / "best.pt"
    assert vqkit_main(["decode", str(best), str(a / "sample_0000.npy"), "--out",
                       str(tmp_path / "d")]) == 0  # fmt: skip
    with (
        Image.open(tmp_path / "d" / "sample_0000.png") as im1,
        Image.open(a / "sample_0000.png") as im2,
    ):
        diff = np.abs(np.asarray(im1, dtype=int) - np.asarray(im2, dtype=int))
    assert diff.max() <= 1
    # a class by name, the null class, and the default (classes in turn)
    classes = load_checkpoint(prior / "checkpoints" / "best.pt")["classes"]
    assert _sample(prior, tmp_path / "e", "--num", "2", "--class", classes[3]) == 0
    assert json.loads((tmp_path / "e" / "samples.json").read_text())["labels"] == [3, 3]
    assert _sample(prior, tmp_path / "f", "--num", "12", "--class", "null") == 0
    assert _sample(prior, tmp_path / "g", "--num", "12", "--checkpoint", "last") == 0
    assert json.loads((tmp_path / "g" / "samples.json").read_text())["labels"][9:] == [9, 0, 1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "flags,msg",
    [
        (["--temperature", "0"], "temperature must be > 0"),
        (["--temperature", "-0.5"], "temperature must be > 0"),
        (["--top-p", "0"], r"top_p must be in (0, 1]"),
        (["--top-p", "1.5"], r"top_p must be in (0, 1]"),
        (["--top-k", "0"], "top_k must be a positive int"),
        (["--class", "10"], "class id 10 out of range: this prior has classes 0..9"),
        (["--class", "-1"], "class id -1 out of range"),
        (["--class", "pullover-ish"], "unknown class 'pullover-ish'"),
        (["--class", "null", "--cfg-scale", "2"], "needs a class"),
        (["--num", "0"], "--num must be >= 1"),
    ],
)
def test_sample_bad_input_is_a_one_line_error(runs, tmp_path, capsys, flags, msg):
    _, prior = runs
    assert _sample(prior, tmp_path / "x", *flags) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()  # checked before anything is written


@pytest.mark.timeout(120)
def test_bad_tokenizer_runs(runs, tmp_path, capsys):
    tok, prior = runs
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["prior", "--tokenizer", str(empty), "--out", str(tmp_path / "p")]) == 2
    assert "holds no tokenizer checkpoint" in capsys.readouterr().err
    assert main(["prior", "--tokenizer", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    # the tokenizer run trained on (a new best.pt): the prior samples from its pinned copy
    moved = tmp_path / "tok2"
    shutil.copytree(tok, moved)
    ckpt = load_checkpoint(moved / "checkpoints" / "best.pt")
    save_checkpoint(moved / "checkpoints" / "best.pt", {**ckpt, "step": 1234})
    assert _sample(prior, tmp_path / "s0", "--num", "1", "--tokenizer", str(moved)) == 0
    # a prior without its pinned copy (older priors): the recorded hash no longer matches
    # the file, and the one-line error says how to recover
    unpinned = tmp_path / "unpinned"
    shutil.copytree(prior, unpinned)
    shutil.rmtree(unpinned / "tokenizer")
    assert _sample(unpinned, tmp_path / "s", "--num", "1", "--tokenizer", str(moved)) == 2
    err = capsys.readouterr().err
    assert "tokenizer mismatch" in err and err.count("\n") == 1
    assert "Restore that file" in err and "pinned copy" in err
    assert main(["prior", "--tokenizer", str(moved), "--out", str(unpinned), "--resume"]) == 2
    assert "tokenizer mismatch" in capsys.readouterr().err
    assert _sample(tmp_path / "empty", tmp_path / "s", "--num", "1") == 2
    assert "holds no prior checkpoint" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_residual_codes_end_to_end(tmp_path):
    """rvq: codes (h, w, Q) flattened per position in stage order; the samples' index
    maps are (h, w, Q) and decode."""
    tok = make_tokenizer(tmp_path / "rvq", "--quantizer", "rvq", "--num-quantizers", "2",
                         "--num-embeddings", "16")  # fmt: skip
    prior = tmp_path / "prior"
    flags = list(PRIOR_FLAGS)
    flags[flags.index("--eval-every") + 1] = "2"
    with torch.no_grad():  # vqkit.cli.main runs its commands under no_grad
        assert main(["prior", "--tokenizer", str(tok), "--out", str(prior), "--steps", "2",
                     "--pos", "rope", "--no-class-cond", *flags]) == 0  # fmt: skip
    cfg = json.loads((prior / "config.json").read_text())["prior"]
    assert cfg["code_shape"] == [7, 7, 2] and cfg["vocab_size"] == 16 and cfg["num_classes"] == 0
    assert _sample(prior, tmp_path / "s", "--num", "3") == 0
    idx = np.load(tmp_path / "s" / "sample_0002.npy")
    assert idx.shape == (7, 7, 2) and idx.max() < 16
    from vqkit.cli import main as vqkit_main

    ckpt = str(tok / "checkpoints" / "best.pt")
    out = str(tmp_path / "d")
    assert vqkit_main(["decode", ckpt, str(tmp_path / "s" / "sample_0002.npy"), "--out", out]) == 0
    assert _sample(prior, tmp_path / "t", "--num", "1", "--class", "0") == 2  # unconditional


def test_multiscale_codes_end_to_end_next_scale(tmp_path, capsys):
    """multiscale: the scales reach the prior's config from the tokenizer's quantizer; a
    next-scale prior trains, evaluates in bits per code and samples (L,) maps that
    decode; a single-grid tokenizer is refused in one line."""
    tok = make_tokenizer(tmp_path / "ms", "--quantizer", "multiscale", "--scales", "1,2,4,7",
                         "--num-embeddings", "16")  # fmt: skip
    prior = tmp_path / "prior"
    flags = list(PRIOR_FLAGS)
    flags[flags.index("--eval-every") + 1] = "2"
    with torch.no_grad():  # vqkit.cli.main runs its commands under no_grad
        assert main(["prior", "--tokenizer", str(tok), "--out", str(prior), "--steps", "2",
                     "--kind", "next-scale", *flags]) == 0  # fmt: skip
    cfg = json.loads((prior / "config.json").read_text())["prior"]
    assert cfg["code_shape"] == [70] and cfg["scales"] == [1, 2, 4, 7]
    assert "test_bits" in json.loads((prior / "eval.json").read_text())
    assert _sample(prior, tmp_path / "s", "--num", "3", "--class", "1", "--cfg-scale", "2") == 0
    idx = np.load(tmp_path / "s" / "sample_0002.npy")
    assert idx.shape == (70,) and idx.max() < 16
    assert _sample(prior, tmp_path / "t", "--num", "1", "--decode-steps", "2") == 2
    assert "this prior is next-scale" in capsys.readouterr().err
    single = make_tokenizer(tmp_path / "vq")
    with torch.no_grad():
        assert main(["prior", "--tokenizer", str(single), "--out", str(tmp_path / "p2"),
                     "--kind", "next-scale", *flags]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert "needs a multi-scale tokenizer" in err[-1]


@pytest.mark.timeout(180)
def test_torchrun_two_processes_then_resume_in_one(runs, tmp_path):
    """2-process DDP (gloo) from a fresh tokenizer copy: rank 0 encodes while rank 1 waits,
    one set of records; the checkpoint then resumes in one process."""
    tok, _ = runs
    fresh = tmp_path / "tok"
    shutil.copytree(tok, fresh, ignore=shutil.ignore_patterns("codes"))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "vqkit.prior.cli", "prior", "--tokenizer", str(fresh), "--out", str(out),
           "--steps", "4", "--seed", "2", *PRIOR_FLAGS]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=70)
        log = proc.stdout + proc.stderr
        # --standalone picks a free port that another job can take before it binds it:
        # that race, and only that, gets a second try
        if proc.returncode == 0 or "address already in use" not in log.lower():
            break
        cmd[cmd.index("--out") + 1] = str(tmp_path / "ddp_retry")
        out = tmp_path / "ddp_retry"
    assert proc.returncode == 0, log[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["global_batch_size"] == 32
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 3), ("eval", 3), ("train", 4), ("eval", 4)
    ]  # fmt: skip
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["loader"]["position"] == 4 * 16
    assert main(["prior", "--out", str(out), "--resume", "--steps", "5", "--batch-size", "32",
                 "--no-progress"]) == 0  # fmt: skip
    after = load_checkpoint(out / "checkpoints" / "last.pt")
    assert after["step"] == 5 and after["loader"]["position"] == 4 * 32 + 32


# -- issue 21 -------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_prior_pins_its_tokenizer_and_warns_on_a_run_in_use(runs, tmp_path, capsys):
    """A prior keeps the exact weights it was trained on (a hard link or copy in
    PRIOR_DIR/tokenizer/); a tokenizer run still locked by its trainer gets a warning."""
    from vqkit.prior.codes import file_sha256
    from vqkit.storage.rundir import RunDir

    tok, prior = runs
    stored = load_checkpoint(prior / "checkpoints" / "last.pt")["tokenizer"]
    pinned = prior / stored["pinned"]
    assert pinned.parent.name == "tokenizer" and file_sha256(pinned) == stored["sha256"]
    capsys.readouterr()
    with RunDir(tok):  # a trainer holds the tokenizer run
        assert main(["prior", "--tokenizer", str(tok), "--out", str(tmp_path / "p"),
                     "--steps", "1", *PRIOR_FLAGS]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert f"tokenizer run {tok} is in use by pid {os.getpid()}" in err
    assert "keeps a copy of its current best.pt" in err


@pytest.mark.timeout(120)
def test_prior_resume_reports_changes_and_refuses_what_it_cannot_do(runs, tmp_path, capsys):
    tok, prior = runs
    mine = tmp_path / "prior"
    shutil.copytree(prior, mine)
    step = load_checkpoint(mine / "checkpoints" / "last.pt")["step"]
    capsys.readouterr()
    for flags, want in (
        (["--steps", str(step - 1)], f"--steps {step - 1} is below the step {step} of"),
        (["--seed", "7"], "cannot change seed (0 -> 7)"),
    ):
        assert main(["prior", "--out", str(mine), "--resume", *flags]) == 2
        err = capsys.readouterr().err
        assert want in err and err.count("\n") == 1, err
    assert main(["prior", "--out", str(mine), "--resume", "--steps", str(step + 1),
                 "--lr", "0.002", "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "resume: lr 0.0006 -> 0.002 (applied)" in out
    assert f"resume: steps {step} -> {step + 1} (applied)" in out


@pytest.mark.timeout(120)
def test_sample_refuses_a_used_folder_and_overwrite_leaves_no_mix(runs, tmp_path, capsys):
    _, prior = runs
    out = tmp_path / "s"
    assert _sample(prior, out, "--num", "5", "--batch-size", "2") == 0
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert _sample(prior, out, "--num", "2", "--seed", "9") == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err and err.count("\n") == 1
    assert _sample(prior, out, "--num", "2", "--seed", "9", "--overwrite") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "grid.png", "notes.txt", "sample_0000.npy", "sample_0000.npy.json", "sample_0000.png",
        "sample_0001.npy", "sample_0001.npy.json", "sample_0001.png", "samples.json",
    ]  # fmt: skip
    meta = json.loads((out / "samples.json").read_text())
    assert meta["seed"] == 9 and meta["num"] == meta["written"] == 2 and meta["complete"]
    (tmp_path / "afile").write_text("x")
    assert _sample(prior, tmp_path / "afile", "--num", "1") == 2
    assert "is a file, not a folder" in capsys.readouterr().err


_ENDLESS_SAMPLE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
import torch
torch.set_num_threads(1)
from vqkit.prior.cli import main
sys.exit(main(["sample", sys.argv[1], "--out", sys.argv[2], "--num", "1000000000",
               "--batch-size", "3", "--device", "cpu"]))
"""


@pytest.mark.timeout(180)
def test_a_billion_samples_stream_to_disk_and_a_kill_leaves_usable_files(runs, tmp_path):
    """--num 1000000000 under a 4 GiB address space: samples appear batch by batch
    (nothing K- or num-sized is built first); killed, the folder holds usable samples
    that samples.json counts."""
    import signal
    import time

    from vqkit.cli import main as vqkit_main

    tok, prior = runs
    out = tmp_path / "s"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _ENDLESS_SAMPLE, str(prior), str(out)],
                            env=env, stderr=subprocess.PIPE)  # fmt: skip
    deadline, meta = time.monotonic() + 150, {}
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                meta = json.loads((out / "samples.json").read_text())
            except (OSError, ValueError):
                meta = {}
            if meta.get("written", 0) >= 6:
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert meta.get("written", 0) >= 6, err.decode()[-2000:]
    meta = json.loads((out / "samples.json").read_text())
    assert meta["num"] == 10**9 and not meta["complete"] and "labels" not in meta
    n = meta["written"]
    assert (out / "grid.png").is_file() and (out / f"sample_{n - 1:09d}.png").is_file()
    best = str(tok / "checkpoints" / "best.pt")
    last = str(out / f"sample_{n - 1:09d}.npy")
    assert vqkit_main(["decode", best, last, "--out", str(tmp_path / "d")]) == 0
