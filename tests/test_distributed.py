"""torch.distributed (gloo, CPU, 2 processes): EMA sync, empty local batches, k-means
init and dead-code revival identical across ranks, and a 2-process ``vqkit train``
checkpoint resumed in one process.

Every multi-process job runs under a hard deadline: a hang fails the test (the
processes are killed) instead of blocking CI. The scenarios share one 2-rank job
(one process-group start-up) whose per-rank results the tests compare.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqkit import VectorQuantizer, VectorQuantizerEMA
from vqkit.codebook import kmeans
from vqkit.data import BatchLoader
from vqkit.metrics import codebook_health

WORLD = 2
DEADLINE_S = 120.0
K, D = 16, 4
STEPS = 5
SIZES = [(3, 2), (1, 5)]  # (rank-0 images, rank-1 images) alternating per step; 9 vectors each


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, *args, world: int = WORLD, deadline: float = DEADLINE_S) -> None:
    """Start ``fn(rank, world, port, *args)`` in ``world`` spawned processes; fail (after
    killing them) if any is still running after ``deadline`` seconds or exits non-zero."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=fn, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert not hung, f"ranks {hung} still running after {deadline:.0f} s (a collective hung?)"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"rank exit codes {codes}"


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )


# -- the shared data of the scenarios (the same on every rank and in the parent) ----------


def global_batches(seed: int = 1):
    """Per step: the global batch split into the two ranks' (uneven) shards."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(STEPS):
        n0, n1 = SIZES[s % 2]
        x = torch.randn(n0 + n1, D, 3, 3, generator=g) * 2.0
        out.append((x[:n0], x[n0:]))
    return out


def fresh_ema(decay: float = 0.9) -> VectorQuantizerEMA:
    torch.manual_seed(0)
    return VectorQuantizerEMA(K, D, decay=decay)


def fresh_vq() -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(K, D, usage_decay=0.9)


def clusters(n_per: int, seed: int, k: int = 8, d: int = D):
    """``k`` well-separated Gaussian clusters in ``d`` dims: (centres (k, d), points)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g)
    centres = 6.0 * centres / centres.norm(dim=1, keepdim=True) + torch.arange(k)[:, None]
    pts = centres.repeat_interleave(n_per, 0) + 0.1 * torch.randn(k * n_per, d, generator=g)
    return centres, pts[torch.randperm(k * n_per, generator=g)]


def ema_state(q: VectorQuantizerEMA) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in q.state_dict().items()}


def _scenarios(rank: int, world: int, port: int, out_dir: str) -> None:
    _init(rank, world, port)
    res: dict[str, object] = {}
    batches = global_batches()

    # 1. EMA sync on uneven shards
    q = fresh_ema().train()
    res["sync_counts"] = [q(shards[rank]).counts.clone() for shards in batches]
    res["sync"] = ema_state(q)

    # 2. rank 1 has an empty batch at every other step
    q = fresh_ema().train()
    for s, shards in enumerate(batches):
        x = shards[rank] if rank == 0 or s % 2 == 0 else shards[1][:0]
        q(x)
    res["empty"] = ema_state(q)

    # 3. k-means init on separable clusters, each rank holding different points
    _, pts = clusters(40, seed=5)
    q = VectorQuantizerEMA(8, D)
    q.init_codebook_kmeans(pts[rank::world] if rank == 0 else pts[rank::world][:50], iters=10)
    res["kmeans"] = ema_state(q)

    # 4. revival from a collapsed codebook (every code at the same point)
    _, pts = clusters(64, seed=7)
    q = fresh_ema(decay=0.8).train()
    with torch.no_grad():
        q.codebook.zero_()
    q.reset_statistics()
    shard = pts[rank::world]
    for _ in range(3):
        q(shard)
    res["dead_mask"] = q.dead_codes(1.0)
    res["dead_before"] = int(res["dead_mask"].sum())
    res["revived_n"] = int(q.revive_dead_codes(shard, threshold=1.0).sum())
    res["revived_state"] = ema_state(q)
    res["after_one_step"] = q(shard).counts.clone()
    res["after_one_step_codebook"] = q.codebook.clone()
    for _ in range(4):
        counts = q(shard).counts
    res["after_counts"] = counts.clone()
    res["dead_after"] = int(q.dead_codes(1.0).sum())
    res["revival"] = ema_state(q)

    # 5. the gradient-trained codebook: usage statistics on uneven shards (one empty at
    # every other step), then revival of a collapsed codebook
    q = fresh_vq().train()
    for s, shards in enumerate(batches):
        x = shards[rank] if rank == 0 or s % 2 == 0 else shards[1][:0]
        res.setdefault("vq_counts", []).append(q(x).counts.clone())
    res["vq_usage"] = ema_state(q)
    _, pts = clusters(64, seed=7)
    q = fresh_vq().train()
    with torch.no_grad():
        q.codebook.zero_()
    for _ in range(3):
        q(pts[rank::world])
    res["vq_revived"] = q.revive_dead_codes(pts[rank::world], threshold=1.0)
    res["vq_revived_state"] = ema_state(q)

    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run_ranks(_scenarios, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_close_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)


def test_ema_codebooks_identical_across_ranks_and_equal_to_one_process(ranks):
    assert_identical(ranks[0]["sync"], ranks[1]["sync"])
    ref = fresh_ema().train()
    ref_counts = [ref(torch.cat(shards)).counts for shards in global_batches()]
    assert_close_state(ranks[0]["sync"], ema_state(ref))
    assert int(ranks[0]["sync"]["num_updates"]) == STEPS
    # the counts (hence perplexity / usage) a rank reports are those of the global batch
    for a, b, r in zip(ranks[0]["sync_counts"], ranks[1]["sync_counts"], ref_counts, strict=True):
        assert torch.equal(a, b) and torch.equal(a, r)


def test_plain_vq_usage_and_revival_synced_across_ranks(ranks):
    r0, r1 = ranks
    assert_identical(r0["vq_usage"], r1["vq_usage"])
    # the usage EMA equals one process fed the global batches (empty ones skipped)
    ref = fresh_vq().train()
    ref_counts = []
    for s, shards in enumerate(global_batches()):
        ref_counts.append(ref(torch.cat(shards) if s % 2 == 0 else shards[0]).counts)
    torch.testing.assert_close(r0["vq_usage"]["usage_ema"], ref.usage_ema)
    assert torch.equal(r0["vq_usage"]["usage_updates"], ref.usage_updates)
    for a, b, r in zip(r0["vq_counts"], r1["vq_counts"], ref_counts, strict=True):
        assert torch.equal(a, b) and torch.equal(a, r)
    # revival: the same codes and vectors on both ranks
    assert torch.equal(r0["vq_revived"], r1["vq_revived"])
    assert int(r0["vq_revived"].sum()) >= K - 2
    assert_identical(r0["vq_revived_state"], r1["vq_revived_state"])


def test_empty_local_batch_does_not_hang(ranks):
    assert_identical(ranks[0]["empty"], ranks[1]["empty"])
    ref = fresh_ema().train()
    for s, shards in enumerate(global_batches()):
        ref(torch.cat(shards) if s % 2 == 0 else shards[0])
    assert_close_state(ranks[0]["empty"], ema_state(ref))


def test_kmeans_init_identical_across_ranks_and_finds_every_cluster(ranks):
    assert_identical(ranks[0]["kmeans"], ranks[1]["kmeans"])
    centres, _ = clusters(40, seed=5)
    codebook = ranks[0]["kmeans"]["codebook"]
    # every cluster has a code at its mean (noise 0.1, so within 0.1)
    dist_to_code = torch.cdist(centres, codebook).min(dim=1).values
    assert (dist_to_code < 0.1).all(), dist_to_code
    # statistics restarted from the new codebook
    assert torch.equal(ranks[0]["kmeans"]["embed_sum"], codebook)
    assert int(ranks[0]["kmeans"]["num_updates"]) == 0


def test_revival_same_on_every_rank_and_revived_codes_get_used(ranks):
    r0, r1 = ranks
    for key in ("revived_state", "revival"):
        assert_identical(r0[key], r1[key])
    assert torch.equal(r0["after_counts"], r1["after_counts"])
    assert torch.equal(r0["dead_mask"], r1["dead_mask"])
    assert r0["dead_before"] >= K - 2  # collapsed: one or two codes ever chosen
    assert r0["revived_n"] == r0["dead_before"]
    assert r0["dead_after"] < r0["dead_before"]
    assert int((r0["after_counts"] > 0).sum()) >= 8  # the 8 clusters are all covered
    # the revived codes got assignments and the EMA step did not snap them back to 0
    revived = r0["dead_mask"]
    assert (r0["revived_state"]["cluster_size"][revived] == 1.0).all()
    assert (r0["after_one_step"][revived] > 0).sum() >= 6
    assert (r0["after_one_step_codebook"][revived].norm(dim=1) > 1.0).all()
    # revived codes are rows of the data
    _, pts = clusters(64, seed=7)
    new = r0["revived_state"]["codebook"][revived]
    assert (new[:, None] == pts[None]).all(-1).any(1).all()


# -- single-process checks of the same functions (no process group) --------------------


def test_kmeans_single_process_and_fewer_points_than_codes():
    centres, pts = clusters(30, seed=11)
    cb = kmeans(pts, 8, iters=10, generator=torch.Generator().manual_seed(0))
    assert (torch.cdist(centres, cb).min(dim=1).values < 0.1).all()
    few = kmeans(pts[:3], 8, iters=2)  # duplicates, no error
    assert few.shape == (8, D) and torch.isfinite(few).all()
    q = VectorQuantizerEMA(8, D)
    with pytest.raises(ValueError, match="empty"):
        q.init_codebook_kmeans(pts[:0])


def test_revive_single_process_and_health():
    _, pts = clusters(64, seed=7)
    q = fresh_ema(decay=0.8).train()
    with torch.no_grad():
        q.codebook.zero_()
    q.reset_statistics()
    window = torch.zeros(K, dtype=torch.int64)
    for _ in range(3):
        window += q(pts).counts
    h = codebook_health(window, ema_counts=q.cluster_size, threshold=1.0)
    assert h["dead"] >= K - 2 and h["codes_used"] <= 2 and h["perplexity"] < 2.0
    assert int(q.revive_dead_codes(pts, threshold=1.0).sum()) == h["dead"]
    window.zero_()
    for _ in range(3):
        window += q(pts).counts
    h = codebook_health(window, ema_counts=q.cluster_size, threshold=1.0)
    assert h["dead"] < K - 2 and h["perplexity"] > 6.0
    with pytest.raises(ValueError, match="threshold"):
        q.revive_dead_codes(pts, threshold=0.0)


def _ids(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1)


def _labels(loader: BatchLoader, n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        x, _ = loader.next_batch()
        out += [round((v + 0.5) * 255) for v in x.reshape(-1).tolist()]
    return out


@pytest.mark.parametrize("n", [40, 41])
def test_loader_state_converts_between_world_sizes(n):
    data = _ids(n)
    order = _labels(BatchLoader(data, 1, seed=4, drop_last=False), 2 * n)  # the global order
    # 2 ranks x 3 batches of 4 = the first 24 of the epoch; 1 rank continues at 24
    two = [BatchLoader(data, 4, seed=4, rank=r, world_size=2) for r in (0, 1)]
    for loader in two:
        _labels(loader, 3)
    one = BatchLoader(data, 4, seed=4)
    one.load_state_dict(two[1].state_dict())
    assert (one.epoch, one.position) == (0, 24)
    assert _labels(one, 2) == order[24:32]
    # 1 rank at 28 -> 2 ranks at 14 each: the next global batch is order[28:36]
    one = BatchLoader(data, 4, seed=4)
    _labels(one, 7)
    two = [BatchLoader(data, 4, seed=4, rank=r, world_size=2) for r in (0, 1)]
    for loader in two:
        loader.load_state_dict(one.state_dict())
    got = [_labels(loader, 1) for loader in two]
    assert sorted(got[0] + got[1]) == sorted(order[28:36])
    # 1 rank at 30 (not divisible by 2 x batch) -> 2 ranks re-read at most one sample
    one = BatchLoader(data, 2, seed=4)
    _labels(one, 15)
    two = [BatchLoader(data, 2, seed=4, rank=r, world_size=2) for r in (0, 1)]
    for loader in two:
        loader.load_state_dict(one.state_dict())
        assert loader.position == 15
    # an old run's state at the end of its padded epoch rolls over to the next epoch
    three = BatchLoader(data, 1, seed=4, rank=0, world_size=3, drop_last=False)
    state = {**three.state_dict(), "position": three.shard_size, "epoch": 0}
    one = BatchLoader(data, 1, seed=4, drop_last=False)
    one.load_state_dict(state)
    assert _labels(one, 1) == order[n : n + 1]


TINY = ["--hidden", "32", "--res-hidden", "8", "--res-layers", "1"]
TINY += ["--num-embeddings", "32", "--embedding-dim", "8", "--no-progress", "--seed", "3"]


def run_torchrun(cmd: list[str]) -> None:
    """Run a torchrun command line under the deadline (its process group killed on a hang);
    fails the test on a hang or a non-zero exit, with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail(f"torchrun still running after {DEADLINE_S:.0f} s")
    assert proc.returncode == 0, log.decode()[-3000:]


def test_torchrun_train_matches_one_process_and_resumes_in_one_process(tmp_path):
    """2-process ``vqkit train`` (DDP, gloo) = 1 process on the global batch; its
    checkpoint resumes in 1 process at the same global data position."""
    from vqkit.cli import main
    from vqkit.storage.checkpoint import load_checkpoint
    from vqkit.training.tokenizer import TrainConfig, Trainer

    run = tmp_path / "ddp"
    # the quantizer's own init: k-means sees the rows of 2 ranks in another order than
    # those of 1 process (see test_kmeans_init_identical_across_ranks_and_finds_every_cluster)
    common = ["--steps", "4", "--log-every", "2", "--eval-every", "4", "--eval-images", "16"]
    common += ["--init", "random"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "vqkit", "train", "--out", str(run), "--batch-size", "8", *common, *TINY]
    run_torchrun(cmd)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["global_batch_size"] == 16
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]  # written once (rank 0 only)
    assert all("dead" in r and "codes_used" in r for r in train)
    ddp = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ddp["loader"]["world_size"] == 2 and ddp["loader"]["position"] == 4 * 8

    # one process on the same global batches (interleaved shards = consecutive 16)
    one = tmp_path / "one"
    assert main(["train", "--out", str(one), "--batch-size", "16", *common, *TINY]) == 0
    single = load_checkpoint(one / "checkpoints" / "last.pt")
    # Equal up to rounding, except that Adam's update ~ lr * sign(g) can flip for the odd
    # gradient component that is ~0 (reduction order differs between 1 and 2 processes):
    # nearly every element matches tightly, and no element is off by more than the
    # steps' bounded Adam updates (lr 3e-4 each).
    for k, v in single["model"].items():
        if not v.is_floating_point():
            assert torch.equal(ddp["model"][k], v), k
            continue
        a, b = ddp["model"][k].double(), v.double()
        tight = torch.isclose(a, b, rtol=1e-4, atol=1e-5)
        assert tight.double().mean() >= 0.995, (k, tight.double().mean().item())
        assert (a - b).abs().max() <= 2 * 3e-4 * 4 + 1e-5, k
    r1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()][0]
    assert abs(r1["loss"] - train[0]["loss"]) < 1e-4 and r1["codes_used"] == train[0]["codes_used"]

    # resume the 2-process checkpoint in 1 process (batch 16 = the old global batch)
    kw = dict(hidden=32, res_hidden=8, res_layers=1, num_embeddings=32, embedding_dim=8)
    resumed = Trainer(
        TrainConfig(
            out_dir=str(run), steps=6, batch_size=16, log_every=2, eval_every=6,
            eval_images=16, progress=False, seed=3, revive_every=1, **kw,
        ),
        resume=True,
    )  # fmt: skip
    assert resumed.step == 4 and resumed.loader.position == 4 * 16
    resumed.fit()
    after = load_checkpoint(run / "checkpoints" / "last.pt")
    assert after["step"] == 6 and after["loader"]["world_size"] == 1
    assert after["loader"]["position"] == 6 * 16


def test_plain_quantizer_kmeans_init():
    from vqkit import VectorQuantizer

    centres, pts = clusters(30, seed=13)
    q = VectorQuantizer(8, D)
    q.init_codebook_kmeans(pts, iters=10, generator=torch.Generator().manual_seed(0))
    assert (torch.cdist(centres, q.codebook.detach()).min(dim=1).values < 0.1).all()
    assert q(pts).perplexity > 7.5  # every code used about equally


def test_torchrun_plain_vq_with_init_and_revival(tmp_path):
    """2-process ``vqkit train --preset vq-healthy``: k-means init, usage sync and revival
    of the gradient codebook (with its Adam rows) run under DDP without hanging; the
    logged figures are those of the global batch."""
    from vqkit.storage.checkpoint import load_checkpoint

    run = tmp_path / "vq"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "vqkit", "train", "--out", str(run), "--batch-size", "8", "--steps", "6"]
    # threshold 30 > the mean usage per code (2 x 8 x 49 / 32 = 24.5), so at least one
    # code is below it at every revival, whatever the init drew
    cmd += ["--preset", "vq-healthy", "--revive-every", "2", "--dead-threshold", "30"]
    cmd += ["--log-every", "3", "--eval-every", "6", "--eval-images", "16", *TINY]
    run_torchrun(cmd)
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert [r["step"] for r in train] == [3, 6]
    assert sum(r["revived"] for r in train) > 0
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    # 6 training steps, each folding the GLOBAL batch (2 x 8 images of 7 x 7 latents)
    assert int(ckpt["model"]["quantizer.usage_updates"]) == 6
    # (revival only lifts revived codes to the threshold, 30, from below)
    usage = float((ckpt["model"]["quantizer.usage_ema"] / (1 - 0.99**6)).sum())
    assert 2 * 8 * 49 - 1.0 < usage < 2 * 8 * 49 + 32 * 30 + 1.0


def _threads() -> int:
    """This process's threads of the process group (gloo's loop and workers, the TCP
    store's), by their OS names: OpenMP's unnamed workers come and go with the thread
    settings and are not the group's."""
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended while we listed
            pass
    return sum(n.startswith(("gloo", "pt_gloo", "pt_tcpstore")) for n in names)


def _job_rank(rank: int, world: int, port: int, out: str) -> None:
    from vqkit.training.tokenizer import TrainConfig, Trainer

    torch.set_num_threads(1)
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1")
    before = _threads()
    cfg = TrainConfig(
        out_dir=out, steps=4, batch_size=8, log_every=2, eval_every=4, eval_images=16,
        progress=False, seed=3, preset="vq-healthy", revive_every=2, dead_threshold=30.0,
        dist_timeout=60.0, hidden=32, res_hidden=8, res_layers=1, num_embeddings=32,
        embedding_dim=8,
    )  # fmt: skip
    trainer = Trainer(cfg)
    during = _threads()
    trainer.fit()
    after = _threads()
    with open(os.path.join(out, f"threads{rank}.json"), "w") as f:
        json.dump({"before": before, "during": during, "after": after}, f)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_a_finished_job_leaves_no_gloo_thread_behind(tmp_path):
    """The process group a job created is gone, its worker threads joined, when the job
    returns, while the interpreter still runs. A gloo worker thread left alive destroys
    its last collective's work (tensors whose Python objects need the GIL) whenever the
    scheduler lets it; once the interpreter is finalising, taking the GIL ends the thread
    inside C++ and the rank aborts ("terminate called without an active exception",
    SIGABRT, after the run's output was written)."""
    run = tmp_path / "run"
    run.mkdir()
    run_ranks(_job_rank, str(run))
    for r in range(WORLD):
        n = json.loads((run / f"threads{r}.json").read_text())
        assert n["during"] > n["before"], n  # the group's threads (the count is sound)
        assert n["after"] == n["before"], (r, n)
