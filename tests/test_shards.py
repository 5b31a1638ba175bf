"""Streaming shards: sources, rank/worker split, seeded order, exact resume, errors."""

from __future__ import annotations

import dataclasses
import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("webdataset")
Image = pytest.importorskip("PIL.Image")

from vqkit.data import (  # noqa: E402
    BatchLoader,
    ImageData,
    ShardLoader,
    _stream,
    data_variance,
    detect_format,
    is_shard_source,
    load_dataset,
    open_shards,
)
from vqkit.data._core import resize_center_crop  # noqa: E402
from vqkit.data.pack import pack  # noqa: E402
from vqkit.data.shards import assign_shards  # noqa: E402


def _data(n: int, hw=(8, 8), channels=3, seed=0) -> ImageData:
    """Random images whose label is their index, so batches tell which samples they hold."""
    g = np.random.default_rng(seed)
    images = g.integers(0, 256, size=(n, channels, *hw), dtype=np.uint8)
    return ImageData(torch.from_numpy(images), torch.arange(n), source="synthetic")


def _shards(tmp: Path, n: int = 100, shard_size: int = 12, **kw) -> Path:
    out = tmp / "shards"
    pack(_data(n, **kw), out, shard_size, shuffle=False)
    return out


def _run(loader: ShardLoader, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(steps)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True)
    )


# ------------------------------------------------------------------------ shard split


@pytest.mark.parametrize("num_shards", [1, 7, 8, 12])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("streams", [1, 2, 3])
def test_assign_shards_covers_every_shard_once_per_slot(num_shards, world, streams):
    for epoch in range(3):
        slots = [
            i
            for r in range(world)
            for s in assign_shards(num_shards, 5, epoch, rank=r, world_size=world, streams=streams)
            for i in s
        ]
        per_rank = -(-num_shards // world)
        assert len(slots) == per_rank * world  # padded as DistributedSampler pads
        assert set(slots) == set(range(num_shards))
        # only the padding repeats shards
        assert len(slots) - len(set(slots)) == per_rank * world - num_shards


def test_two_ranks_two_workers_split_without_overlap(tmp_path):
    src = _shards(tmp_path, n=96, shard_size=12)  # 8 equal shards
    for epoch in range(2):
        ids = []
        for rank in range(2):
            loader = ShardLoader(
                src, 8, rank=rank, world_size=2, num_workers=2, shuffle_buffer=20, chunk_size=4
            )
            loader.set_epoch(epoch)
            assert loader.batches_per_epoch == 6
            batches = _run(loader, 6)
            assert loader.epoch == epoch + 1 and loader.position == 0
            ids += [int(v) for _, y in batches for v in y]
        assert sorted(ids) == list(range(96))  # all of them, none twice


def test_epoch_length_is_the_same_on_every_rank(tmp_path):
    src = _shards(tmp_path, n=100, shard_size=12)  # 9 shards, the last holds 4
    lengths = {
        ShardLoader(src, 5, rank=r, world_size=3, num_workers=0, streams=2).epoch_samples
        for r in range(3)
    }
    assert len(lengths) == 1


# ------------------------------------------------------------------------------ order


def test_seeded_shuffle_is_reproducible_and_differs_by_seed_and_epoch(tmp_path):
    src = _shards(tmp_path)
    kw = dict(num_workers=0, streams=2, shuffle_buffer=10, chunk_size=4)
    a = _run(ShardLoader(src, 8, seed=1, **kw), 14)
    b = _run(ShardLoader(src, 8, seed=1, **kw), 14)
    c = _run(ShardLoader(src, 8, seed=2, **kw), 14)
    assert _same(a, b) and not _same(a, c)
    first = torch.cat([y for _, y in a[:12]])
    second = torch.cat([y for _, y in a[12:14]])
    assert sorted(first.tolist()) != first.tolist()  # shuffled
    assert not torch.equal(first[:16], second)  # epoch 1 has its own order
    plain = _run(ShardLoader(src, 4, shuffle=False, num_workers=0, streams=1), 3)
    assert torch.cat([y for _, y in plain]).tolist() == list(range(12))


def test_worker_processes_give_the_in_process_order(tmp_path):
    # uneven shards and streams: streams run out at different times
    src = _shards(tmp_path, n=100, shard_size=12)
    kw = dict(shuffle_buffer=7, chunk_size=5, seed=3)
    workers = _run(ShardLoader(src, 7, num_workers=2, **kw), 30)
    inproc = _run(ShardLoader(src, 7, num_workers=0, streams=2, **kw), 30)
    assert _same(workers, inproc)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("world", [1, 2])
def test_resume_reproduces_the_uninterrupted_batches(tmp_path, world):
    src = _shards(tmp_path, n=100, shard_size=12)
    kw = dict(world_size=world, num_workers=0, streams=2, shuffle_buffer=10, chunk_size=5)
    ref = ShardLoader(src, 7, rank=world - 1, **kw)
    per_epoch = ref.batches_per_epoch
    states, batches = [ref.state_dict()], []
    for _ in range(2 * per_epoch + 3):
        batches.append(ref.next_batch())
        states.append(ref.state_dict())
    assert states[per_epoch]["epoch"] == 1 and states[per_epoch]["position"] == 0
    for cut in sorted({0, 1, 2, 3, per_epoch - 1, per_epoch, per_epoch + 2, len(batches) - 2}):
        loader = ShardLoader(src, 7, rank=world - 1, **kw)
        # the trainer saves rank 0's state; it must serve every rank
        loader.load_state_dict({**states[cut], "rank": 0})
        assert _same(_run(loader, 2), batches[cut : cut + 2]), cut


def test_resume_with_worker_processes(tmp_path):
    src = _shards(tmp_path, n=100, shard_size=12)
    kw = dict(num_workers=2, shuffle_buffer=10, chunk_size=5, seed=4)
    ref = ShardLoader(src, 6, **kw)
    head = _run(ref, 6)  # 36 samples: inside the 8th chunk, from the second stream
    state = ref.state_dict()
    tail = _run(ref, 4)
    again = ShardLoader(src, 6, **kw)
    again.load_state_dict(state)
    assert _same(_run(again, 4), tail)
    assert head  # (the first batches were drawn before the state)


def test_resume_rereads_only_the_buffered_shards(tmp_path, monkeypatch):
    src = _shards(tmp_path, n=240, shard_size=10)  # 24 shards
    kw = dict(num_workers=0, streams=1, shuffle_buffer=8, chunk_size=4)
    ref = ShardLoader(src, 4, **kw)
    _run(ref, 50)  # 200 of the epoch's 240 samples
    state = ref.state_dict()
    opened: list[str] = []
    real = _stream.iter_shard

    def counting(path):
        opened.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(_stream, "iter_shard", counting)
    loader = ShardLoader(src, 4, **kw)
    loader.load_state_dict(state)
    loader.next_batch()
    # not a replay of the 20 shards already consumed: the current one and the
    # few that still have samples in the 8-sample buffer
    assert 1 <= len(set(opened)) <= 4, opened


def test_resume_under_another_layout_warns_and_continues(tmp_path):
    src = _shards(tmp_path)
    ref = ShardLoader(src, 4, num_workers=0, streams=2, shuffle_buffer=10)
    _run(ref, 5)
    loader = ShardLoader(src, 4, num_workers=0, streams=3, shuffle_buffer=10)
    with pytest.warns(UserWarning, match="different streams"):
        loader.load_state_dict(ref.state_dict())
    assert loader.epoch == 0 and loader.position == 20
    assert loader.next_batch()[0].shape == (4, 3, 8, 8)


def test_state_of_other_data_is_an_error(tmp_path):
    src = _shards(tmp_path)
    loader = ShardLoader(src, 4, num_workers=0)
    with pytest.raises(ValueError, match="not a ShardLoader state"):
        loader.load_state_dict(BatchLoader(_data(10), 2).state_dict())
    with pytest.raises(ValueError, match="num_samples"):
        loader.load_state_dict({**loader.state_dict(), "num_samples": 3})


# ------------------------------------------------------------------------------ errors


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_shard_names_the_shard(tmp_path, num_workers):
    src = _shards(tmp_path, n=48, shard_size=12)
    _truncate(src / "train-000002.tar", 0.5)
    loader = ShardLoader(src, 8, num_workers=num_workers, streams=2, shuffle=False)
    with pytest.raises(ValueError, match="train-000002.tar: corrupt or truncated"):
        _run(loader, loader.batches_per_epoch)


def test_shard_cut_at_a_member_boundary_is_caught(tmp_path):
    src = _shards(tmp_path, n=24, shard_size=12)
    path = src / "train-000001.tar"
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()[:10]]
    with open(path, "wb") as f:  # 5 whole samples, and no end-of-archive blocks
        for m, data in members:
            f.write(m.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512))
    loader = ShardLoader(src, 4, num_workers=0, shuffle=False)
    with pytest.raises(ValueError, match=r"train-000001.tar: corrupt or truncated.*5 samples"):
        _run(loader, 6)
    (src / "manifest.json").unlink()  # counts now come from a header scan
    with pytest.raises(ValueError, match="train-000001.tar: corrupt or truncated"):
        open_shards(src)


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_corrupt_image_names_shard_and_key(tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    ok = _png(np.zeros((4, 4, 3), np.uint8))
    _write_tar(src / "train-000000.tar", [("a.png", ok), ("b.png", b"not a png")])
    loader = ShardLoader(src, 2, num_workers=0)
    with pytest.raises(ValueError, match=r"train-000000.tar: cannot decode b.png"):
        loader.next_batch()


def test_image_of_another_size_names_shard_and_key(tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    small, big = _png(np.zeros((4, 4, 3), np.uint8)), _png(np.zeros((6, 6, 3), np.uint8))
    _write_tar(src / "train-000000.tar", [("a.png", small), ("a.cls", b"1"), ("b.png", big)])
    loader = ShardLoader(src, 2, num_workers=0)
    with pytest.raises(ValueError, match=r"train-000000.tar: b.png is 6x6, not 4x4.*image_size"):
        loader.next_batch()
    x, y = ShardLoader(src, 2, num_workers=0, image_size=4, shuffle=False).next_batch()
    assert x.shape == (2, 3, 4, 4) and y.tolist() == [1, 0]


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- sources


def test_sources_patterns_directories_and_splits(tmp_path):
    out = tmp_path / "shards"
    pack(_data(30), out, 10, split="train", shuffle=False)
    pack(_data(8, seed=1), out, 5, split="test", shuffle=False)
    assert is_shard_source(out) and detect_format(out) == "shards"
    assert open_shards(out, "test").counts == (5, 3)
    pattern = str(out / "train-{000000..000002}.tar")
    assert is_shard_source(pattern) and detect_format(pattern) == "shards"
    s = open_shards(pattern)
    assert s.counts == (10, 10, 10) and s.channels == 3 and s.size == (8, 8)
    with pytest.raises(ValueError, match="names the 'train' shards, not 'test'"):
        load_dataset(pattern, "test")
    with pytest.raises(FileNotFoundError, match="not found"):
        open_shards(str(out / "train-{000000..000005}.tar"))
    with pytest.raises(ValueError, match="no 'val' shards.*splits found: test, train"):
        open_shards(out, "val")
    # a directory of unprefixed shards without a manifest: one train split, scanned
    bare = tmp_path / "bare"
    bare.mkdir()
    for i, p in enumerate(sorted(out.glob("train-*.tar"))):
        (bare / f"part-{i}.tar").write_bytes(p.read_bytes())
    s = open_shards(bare)
    assert s.counts == (10, 10, 10) and s.size == (8, 8) and s.channels == 3
    assert torch.equal(load_dataset(bare).images, _data(30).images)
    (out / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="missing: train-000001.tar"):
        open_shards(out)


def test_image_size_and_crops_in_the_workers(tmp_path):
    data = _data(12, hw=(12, 10))
    src = tmp_path / "s"
    pack(data, src, 4, shuffle=False)
    with pytest.raises(ValueError, match="images differ in size; pass image_size"):
        ShardLoader(dataclasses.replace(open_shards(src), size=None), 2, num_workers=0)
    center = ShardLoader(src, 12, shuffle=False, num_workers=0, image_size=6)
    x, y = center.next_batch()
    img = Image.fromarray(data.images[0].permute(1, 2, 0).numpy())
    want = torch.from_numpy(np.array(resize_center_crop(img, 6))).permute(2, 0, 1)
    assert torch.equal(((x[0] + 0.5) * 255).round().to(torch.uint8), want)
    kw = dict(shuffle=False, num_workers=0, image_size=6, crop="random", crop_scale=0.5)
    a = ShardLoader(src, 12, **kw)
    b = ShardLoader(src, 12, **kw)
    ea, eb = a.next_batch()[0], b.next_batch()[0]
    assert torch.equal(ea, eb)  # seeded per sample
    assert not torch.equal(ea, a.next_batch()[0])  # another epoch, other crops
    assert not torch.equal(ea, x)
    gray = ShardLoader(src, 4, num_workers=0, channels=1, image_size=6)
    assert gray.next_batch()[0].shape == (4, 1, 6, 6)


def test_estimate_variance_and_describe(tmp_path):
    data = _data(60)
    src = tmp_path / "s"
    pack(data, src, 7)
    loader = ShardLoader(src, 4, num_workers=0, streams=2)
    exact = data_variance(data)
    assert loader.estimate_variance(1000) == pytest.approx(exact, abs=1e-12)
    rough = loader.estimate_variance(20)
    assert rough == pytest.approx(exact, rel=0.1)
    workers = ShardLoader(src, 4, num_workers=2)
    assert workers.estimate_variance(20) == rough  # independent of the worker count
    d = loader.describe()
    assert d["num_images"] == 60 and d["num_shards"] == 9 and d["shape"] == [3, 8, 8]
    assert d["format"] == "shards" and d["epoch_images_per_rank"] == 60
    assert loader.image_size == 8 and loader.channels == 3 and len(loader) == 15


def test_load_dataset_reads_a_split_into_memory(tmp_path):
    data = _data(25)
    src = tmp_path / "s"
    pack(data, src, 10)  # shuffled order
    got = load_dataset(src)
    assert sorted(got.labels.tolist()) == list(range(25))
    assert torch.equal(got.images, data.images[got.labels])
    back = open_shards(src).load(sort_keys=True)
    assert torch.equal(back.images, data.images) and torch.equal(back.labels, data.labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_dataset(src, image_size=4).images.shape == (25, 3, 4, 4)


@pytest.mark.parametrize("label", [b"cat", b"-3", b"\xff\xfe"])
def test_non_integer_label_names_shard_and_member(tmp_path, label):
    src = tmp_path / "s"
    src.mkdir()
    ok = _png(np.zeros((4, 4, 3), np.uint8))
    _write_tar(src / "train-000000.tar", [("a.png", ok), ("a.cls", b"1"),
                                          ("b.png", ok), ("b.cls", label)])  # fmt: skip
    loader = ShardLoader(src, 2, num_workers=0)
    with pytest.raises(ValueError, match=r"train-000000.tar: b.cls is not a class label") as e:
        loader.next_batch()
    assert "\n" not in str(e.value)
