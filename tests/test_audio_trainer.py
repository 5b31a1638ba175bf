"""The speech codec job (vqkit.training.audio_trainer): a tiny codec trains on a synthetic
WAV folder (and on FSDD when the shared archive is there), its loss goes down on a fixed
batch, eval.json holds finite figures per stage count, a stopped and resumed run equals
the uninterrupted one (with and without discriminators), the discriminators switch on
at disc_start and not before, and the options are checked before any data is read."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_distributed import run_ranks
from tests.test_job import _same_tensors
from vqkit.data import write_wav
from vqkit.errors import UserError
from vqkit.models import AudioCodec
from vqkit.storage.checkpoint import load_checkpoint
from vqkit.training.audio_trainer import AudioTrainConfig, AudioTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

# hop 8 at 2 kHz (250 frames/s), 3 stages of 16 codes; 0.2 s crops; loss windows <= 128
TINY = dict(
    sample_rate=2000, seanet_channels=4, strides="2,4", embedding_dim=8, num_quantizers=3,
    num_embeddings=16, segment_seconds=0.2, batch_size=4, stft_resolutions="64:16:64,128:32:128",
    mel_scales="128:32:20", progress=False, eval_clips=3, log_every=3, eval_every=4, seed=1,
)  # fmt: skip


def write_folder(root: Path, rate: int = 2000) -> Path:
    """train/ (8 clips) and test/ (3 clips) of sines with a little noise, 0.6 s each."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("test", 3)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            t = torch.arange(int(0.6 * rate)) / rate
            x = 0.5 * torch.sin(2 * math.pi * (90 + 37 * i) * t)
            x = x + 0.05 * torch.randn(t.shape, generator=g)
            write_wav(root / split / f"c{i}.wav", x, rate)
    return root


@pytest.fixture(scope="module")
def wavs(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("wavs"))


def _records(out: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the throughput (wall time, not state)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k != "audio_seconds_per_s"} for line in lines
    ]


def _same_run(a: Path, b: Path) -> None:
    assert _records(a) == _records(b)
    ca = load_checkpoint(a / "checkpoints" / "last.pt")
    cb = load_checkpoint(b / "checkpoints" / "last.pt")
    ca.pop("train_config"), cb.pop("train_config")  # their out_dir differs
    _same_tensors(ca, cb)


# both discriminators at width 2, on from step 3 (0-based)
DISC = dict(audio_disc="mpd+stft", audio_disc_channels=2, disc_start=3, disc_lr=1e-3)


def _trainer(out: Path, data: Path, resume: bool = False, **kw: Any) -> AudioTrainer:
    cfg = AudioTrainConfig(data=str(data), out_dir=str(out), **{"steps": 10, **TINY, **kw})
    return AudioTrainer(cfg, resume=resume)


def test_trains_and_writes_the_run(tmp_path, wavs):
    result = _trainer(tmp_path / "run", wavs, steps=6, sample_clips=2).fit()
    run = tmp_path / "run"
    ev = json.loads((run / "eval.json").read_text())
    assert ev == json.loads(json.dumps(result))  # what fit returns is what is written
    assert ev["clips"] == 3 and ev["num_codes"] == 16 and len(ev["codes_used"]) == 3
    assert [r["num_stages"] for r in ev["stages"]] == [1, 2, 3]
    # bitrate = frames/s * n * log2 K: 250 * n * 4 bits
    assert [r["kbps"] for r in ev["stages"]] == [1.0, 2.0, 3.0]
    for row in ev["stages"]:
        assert math.isfinite(row["si_sdr"]) and math.isfinite(row["mel_distance"])
        assert 0 < row["mel_distance"]
        if "stoi" in row:  # the audio-eval extra; 2 kHz: no PESQ (8 or 16 kHz only)
            assert math.isfinite(row["stoi"]) and "pesq_nb" not in row
    assert all(1 <= u <= 16 for u in ev["codes_used"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 6]
    assert {"si_sdr_q1", "mel_distance_q3", "si_sdr", "mel_distance"} <= set(evals[0])
    train = [r for r in records if r["kind"] == "train"]
    assert {"loss", "wave_l1", "stft", "mel", "vq_loss", "perplexity"} <= set(train[0])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["rates"]["hop"] == 8 and cfg["data"]["train"]["clips"] == 8
    assert (run / "checkpoints" / "best.pt").is_file()
    assert (run / "spectrograms.png").stat().st_size > 0
    wav = sorted(p.name for p in (run / "samples").iterdir())
    assert wav == [f"clip{i}_{k}.wav" for i in (0, 2) for k in ("original", "q1", "q3")]
    # the pretrained directory loads strictly and decodes as the trained codec does
    codec = AudioCodec.from_pretrained(run / "codec")
    assert codec.config.num_quantizers == 3 and codec.bitrate(1) == 1000.0


def test_loss_goes_down_on_a_fixed_batch(tmp_path, wavs):
    """30 updates on one batch of crops (quantizer dropout on): the loss falls."""
    trainer = _trainer(tmp_path / "fixed", wavs, lr=3e-3)
    try:
        batch = trainer.next_batch()
        losses = []
        for step in range(30):
            for opt in trainer.optimizers():
                opt.set_lr(step)
            losses.append(trainer.update(batch, None).values["loss"])  # type: ignore[arg-type]
    finally:
        trainer.close()
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("disc", [{}, {**DISC, "audio_disc": "stft"}], ids=["plain", "disc"])
def test_resume_equals_the_uninterrupted_run(tmp_path, wavs, disc):
    """Stopped at step 5, inside a log window (records at 3, 6, 9) and after an eval;
    with a discriminator on from step 3, so it has trained before and after the stop
    (its weights and Adam state are in the compared checkpoints; the STFT one alone, as
    the multi-period one adds nothing to resume but time)."""
    _trainer(tmp_path / "full", wavs, sample_clips=0, **disc).fit()
    part = _trainer(tmp_path / "part", wavs, sample_clips=0, **disc)
    assert part.fit(until=5) == {"step": 5}
    _trainer(tmp_path / "part", wavs, resume=True, sample_clips=0, **disc).fit()
    _same_run(tmp_path / "full", tmp_path / "part")
    full = json.loads((tmp_path / "full" / "eval.json").read_text())
    again = json.loads((tmp_path / "part" / "eval.json").read_text())
    assert full["stages"] == again["stages"]
    ckpt = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    if disc:  # steps 3..9: 7 discriminator updates; records at 3 (none), 6 (3), 9 (3)
        steps = {int(s["step"]) for s in ckpt["adversarial"]["optimizer"]["state"].values()}
        assert steps == {7}
        train = _train_records(tmp_path / "part")
        assert [r["disc_steps"] for r in train] == [0, 3, 3, 1]
        assert all({"g_adv", "feat_match", "d_loss"} <= set(r) for r in train[1:])
        assert not {"g_adv", "feat_match", "d_loss"} & set(train[0])
    else:
        assert "adversarial" not in ckpt
        assert "disc_steps" not in _train_records(tmp_path / "part")[0]


def _disc_params(trainer: AudioTrainer) -> dict[str, torch.Tensor]:
    net = trainer.adv.loss.discriminator
    return {k: p.detach().clone() for k, p in net.named_parameters()}


def test_discriminators_switch_on_at_disc_start(tmp_path, wavs):
    """Steps 0..2: the codec's step only (no adversarial figures, the discriminators'
    weights untouched, the loss the reconstruction-only one); from step 3: finite
    g_adv, feat_match and d_loss, the adversarial terms in the codec's loss, and the
    discriminators' weights move (their own Adam; all but the output biases, whose hinge
    gradient mean(1) - mean(1) is exactly 0 while every logit is inside the margins)."""
    trainer = _trainer(tmp_path / "d", wavs, init="random", **DISC)
    rng = torch.get_rng_state()
    plain = _trainer(tmp_path / "p", wavs, init="random")
    # the discriminators' init draws from a stream of its own, not the codec's
    assert torch.equal(torch.get_rng_state(), rng)
    try:
        assert len(trainer.optimizers()) == 2 and trainer.best_from == 3
        before = _disc_params(trainer)
        for step in range(5):
            batch = trainer.next_batch()
            for t in (trainer, plain):
                t.step = step
                for opt in t.optimizers():
                    opt.set_lr(step)
            rng = torch.get_rng_state()  # quantizer dropout: the same draws for both
            values = trainer.update(batch, None).values  # type: ignore[arg-type]
            after = _disc_params(trainer)
            moved = [not torch.equal(before[k], after[k]) for k in after if "post.bias" not in k]
            if step < 3:  # the same step as without discriminators
                assert not any(moved) and not {"g_adv", "feat_match", "d_loss"} & set(values)
                torch.set_rng_state(rng)
                assert values == plain.update(batch, None).values  # type: ignore[arg-type]
            else:
                assert all(moved), step
                for k in ("g_adv", "feat_match", "d_loss", "loss"):
                    assert math.isfinite(values[k]), (k, values)
                extra = values["g_adv"] + values["feat_match"]  # weights 1, the defaults
                want = values["recon"] + values["vq_loss"] + extra
                assert values["loss"] == pytest.approx(want, rel=1e-5)
            before = after
    finally:
        trainer.close()
        plain.close()


def test_discriminators_on_resume_start_fresh_or_refuse(tmp_path, wavs):
    """Switched on at resume: a fresh discriminator (noted); another kind than the
    checkpoint's: one line naming the flags; switched off: dropped (noted)."""
    _trainer(tmp_path / "r", wavs, steps=2, sample_clips=0).fit(until=1)
    on = _trainer(tmp_path / "r", wavs, resume=True, steps=3, **DISC)
    assert on.adv.load_state_dict(None) == ["the discriminator starts fresh"]
    on.fit(until=2)
    with pytest.raises(UserError, match="does not fit these options .*--audio-disc/"):
        _trainer(tmp_path / "r", wavs, resume=True, steps=3, **{**DISC, "audio_disc": "stft"})
    off = _trainer(tmp_path / "r", wavs, resume=True, steps=3)
    assert off.adv is None
    off.close()
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert off.load_state_dict(ckpt) == [
        "the checkpoint's discriminator is dropped (--audio-disc none)"
    ]


def test_resume_refuses_a_changed_codec(tmp_path, wavs):
    _trainer(tmp_path / "r", wavs, steps=2).fit(until=1)
    with pytest.raises(UserError, match="num_embeddings"):
        _trainer(tmp_path / "r", wavs, resume=True, num_embeddings=32)
    # a changed learning rate is applied and reported
    t = _trainer(tmp_path / "r", wavs, resume=True, lr=1e-4, steps=2)
    assert t.resume_changes == {"lr": (3e-4, 1e-4)}
    t.close()


def test_eval_stages_beyond_the_codec_refused(tmp_path, wavs):
    with pytest.raises(UserError, match="stage counts in 1..3"):
        _trainer(tmp_path / "s", wavs, eval_stages="1,4")


def test_trains_on_fsdd(tmp_path, fsdd_archive):
    """FSDD at 8 kHz (skipped without the shared archive): its official split, speakers
    joined for PESQ / STOI."""
    cfg = AudioTrainConfig(
        data=str(fsdd_archive), out_dir=str(tmp_path / "f"), steps=2, batch_size=2,
        seanet_channels=4, num_quantizers=2, num_embeddings=16, embedding_dim=8,
        segment_seconds=0.25, progress=False, eval_clips=2, eval_limit=12, sample_clips=1,
    )  # fmt: skip
    trainer = AudioTrainer(cfg)
    assert (len(trainer.train_data), len(trainer.test_data)) == (2700, 300)
    ev = trainer.fit()
    assert ev["clips"] == 12 and [r["kbps"] for r in ev["stages"]] == [0.1, 0.2]
    for row in ev["stages"]:
        assert math.isfinite(row["si_sdr"]) and math.isfinite(row["mel_distance"])


def test_holdout_speaker_trains_on_the_others(tmp_path):
    """--holdout-speaker: the other speakers' train clips train, the held-out speaker's
    test clips evaluate (an FSDD-named folder: 2 digits x 3 speakers x 6 takes, 0-4 the
    test takes); eval.json names the speaker; an unknown one is refused in one line."""
    rec = tmp_path / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for d in range(2):
        for who in ("ann", "bob", "cy"):
            for i in range(6):
                write_wav(rec / f"{d}_{who}_{i}.wav", 0.3 * torch.randn(700, generator=g), 2000)
    trainer = _trainer(tmp_path / "h", tmp_path / "fsdd", steps=1, holdout_speaker="bob")
    train, test = trainer.train_data, trainer.test_data
    assert [train.speaker_names[s] for s in train.speakers] == ["ann", "cy"] * 2
    assert [test.speaker_names[s] for s in test.speakers] == ["bob"] * 10
    assert all("_5.wav" in n for n in train.names) and not any("_5" in n for n in test.names)
    assert trainer.fit()["holdout_speaker"] == "bob"
    described = json.loads((tmp_path / "h" / "config.json").read_text())["data"]
    assert (described["train"]["speakers"], described["test"]["speakers"]) == (2, 1)
    with pytest.raises(UserError, match="no speaker 'dan' .speakers: ann, bob, cy"):
        _trainer(tmp_path / "u", tmp_path / "fsdd", holdout_speaker="dan")


def _train_records(out: Path) -> list[dict[str, Any]]:
    return [r for r in _records(out) if r["kind"] == "train"]


def test_codebook_health_keeps_the_stages_alive(tmp_path, wavs):
    """k-means init and revival (the defaults, the image job's declarations) against the
    quantizer's own init without revival, 40 steps: every stage uses >= 4x the codes at
    the end (measured: 12, 15, 16 of 16 codes against 1, 1, 1; mel 0.92 against 2.7).
    The records carry the health figures and the resolved options are stored."""
    common = dict(steps=40, log_every=10, eval_every=40, sample_clips=0)
    healthy = _trainer(tmp_path / "h", wavs, **common)
    assert (healthy.config.init, healthy.config.revive_every) == ("kmeans", 20)
    # 1/16 of a uniform code's share: 4 crops x 50 frames / 16 codes
    assert healthy.config.dead_threshold == pytest.approx(4 * 50 / 16 / 16)
    on = healthy.fit()
    off = _trainer(tmp_path / "o", wavs, init="random", revive_every=0, **common).fit()
    for a, b in zip(on["codes_used"], off["codes_used"], strict=True):
        assert a >= 4 * b, (on["codes_used"], off["codes_used"])
    assert on["stages"][-1]["mel_distance"] < off["stages"][-1]["mel_distance"]
    train = _train_records(tmp_path / "h")
    assert all({"dead", "codes_used", "window_perplexity", "revived"} <= set(r) for r in train)
    stored = json.loads((tmp_path / "h" / "config.json").read_text())["train"]
    assert (stored["init"], stored["revive_every"]) == ("kmeans", 20)


def test_revival_revives_and_resume_stays_exact(tmp_path, wavs):
    """Revival every 3 steps below 2 assignments per batch: codes are revived before and
    after the stop at step 5, and the resumed run equals the uninterrupted one (records,
    weights, codebooks, optimizer, loader). The resumed config leaves the health
    defaults open: it takes the run's resolved values."""
    kw = dict(sample_clips=0, revive_every=3, dead_threshold=2.0)
    _trainer(tmp_path / "full", wavs, **kw).fit()
    revived = [r["revived"] for r in _train_records(tmp_path / "full")]
    assert revived[0] > 0 and sum(revived[1:]) > 0, revived  # records at 3 | 6, 9
    _trainer(tmp_path / "part", wavs, **kw).fit(until=5)
    again = _trainer(tmp_path / "part", wavs, resume=True, **kw)
    assert again.config.init == "kmeans" and again.resume_changes == {}
    again.fit()
    _same_run(tmp_path / "full", tmp_path / "part")


def test_health_options_refused_by_a_quantizer_without_them(tmp_path, wavs):
    """FSQ has no codebook: ``init="auto"`` resolves to its own, kmeans is one line."""
    d = AudioTrainConfig.defaults()
    fsq = dict(quantizer="fsq", **{k: d[k] for k in ("num_quantizers", "num_embeddings")})
    t = _trainer(tmp_path / "a", wavs, **fsq)
    assert (t.config.init, t.config.revive_every) == ("random", 0)
    t.close()
    with pytest.raises(UserError, match="init='kmeans' is not supported"):
        _trainer(tmp_path / "f", wavs, init="kmeans", **fsq)


def test_codebook_health_on_fsdd(tmp_path, fsdd_archive):
    """The issue's collapse on FSDD (skipped without the shared archive): 40 steps of a
    tiny codec, 4 stages of 64 codes; the quantizer's own init without revival leaves
    one code per stage (measured 1, 1, 1, 1 on 40 test clips); k-means init and revival
    every 10 steps below one assignment per batch use 23, 9, 9, 4."""
    common = dict(
        data=str(fsdd_archive), steps=40, batch_size=4, seanet_channels=4, num_quantizers=4,
        num_embeddings=64, embedding_dim=16, segment_seconds=0.5, progress=False,
        eval_clips=2, eval_every=1000, eval_limit=40, sample_clips=0, log_every=10, seed=0,
    )  # fmt: skip
    on = AudioTrainer(
        AudioTrainConfig(out_dir=str(tmp_path / "h"), revive_every=10, dead_threshold=1.0, **common)
    ).fit()
    off = AudioTrainer(
        AudioTrainConfig(out_dir=str(tmp_path / "o"), init="random", revive_every=0, **common)
    ).fit()
    assert on["codes_used"][0] >= 4 * off["codes_used"][0], (on["codes_used"], off["codes_used"])
    assert sum(on["codes_used"]) >= 2 * sum(off["codes_used"])


def _ddp_rank(rank: int, world: int, port: int, data: str, out: str) -> None:
    torch.set_num_threads(1)
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1")
    kw = {**TINY, **DISC, "disc_start": 1, "eval_every": 100, "init": "random"}
    cfg = AudioTrainConfig(data=data, out_dir=out, steps=3, dist_timeout=60.0, **kw)
    AudioTrainer.finish = lambda self: {"step": self.step}  # this process only: no exports
    trainer = AudioTrainer(cfg)
    assert type(trainer.adv.net).__name__ == "DistributedDataParallel"
    trainer.fit()
    state = {k: v.clone() for k, v in trainer.adv.loss.discriminator.state_dict().items()}
    torch.save(state, os.path.join(out, f"disc{rank}.pt"))


@pytest.mark.timeout(180)
def test_two_processes_keep_one_discriminator(tmp_path, wavs):
    """2-process training with both discriminators (gloo, DDP): the ranks see different
    crops, yet their discriminators stay identical (gradients averaged), and rank 0's is
    the one saved."""
    run = tmp_path / "ddp"
    run.mkdir()
    run_ranks(_ddp_rank, str(wavs), str(run), deadline=150.0)
    d0, d1 = (torch.load(run / f"disc{r}.pt") for r in range(2))
    for k in d0:
        assert torch.equal(d0[k], d1[k]), k
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    start = _disc_params_of(ckpt)
    assert set(start) == set(d0) and all(torch.equal(start[k], d0[k]) for k in d0)
    train = _train_records(run)
    assert train[-1]["disc_steps"] == 2 and math.isfinite(train[-1]["d_loss"])


def _disc_params_of(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    return ckpt["adversarial"]["loss"]["discriminator"]
