"""Tests for vqkit.data: every format on tiny files written here, plus the loader."""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from vqkit import data as vd
from vqkit.data import (
    BatchLoader,
    DatasetDownloadError,
    ImageData,
    data_variance,
    denormalize,
    download_cifar10,
    load_dataset,
    load_idx,
    load_image_folder,
    normalize,
    read_idx,
)

Image = pytest.importorskip("PIL.Image")

ROOT = Path(__file__).resolve().parent.parent
SHARED_ENV = "VQKIT_SHARED_DATA"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch ~/.cache/vqkit from tests."""
    monkeypatch.setenv("VQKIT_CACHE", str(tmp_path / "default-cache"))


# ---------------------------------------------------------------------------- fixtures


def _rand_images(n: int, seed: int, shape=(3, 32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _write_cifar_folder(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Official layout and pickle format; returns the expected (images, labels) per split."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    expected: dict[str, list] = {"train": [[], []], "test": [[], []]}
    files = [(f"data_batch_{i}", "train", 3) for i in range(1, 6)] + [("test_batch", "test", 4)]
    for k, (name, split, n) in enumerate(files):
        imgs = _rand_images(n, seed=k)
        labels = [(k + j) % 10 for j in range(n)]
        batch = {
            b"batch_label": f"batch {k}".encode(),
            b"labels": labels,
            b"data": imgs.reshape(n, 3072),  # R plane, G plane, B plane per row
            b"filenames": [f"img_{k}_{j}.png".encode() for j in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        expected[split][0].append(imgs)
        expected[split][1].append(np.asarray(labels))
    meta = {b"label_names": [c.encode() for c in vd.cifar.CIFAR10_CLASSES], b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return {s: (np.concatenate(v[0]), np.concatenate(v[1])) for s, v in expected.items()}


@pytest.fixture
def cifar(tmp_path):
    expected = _write_cifar_folder(tmp_path / "src")
    archive = tmp_path / "cifar-mini.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return tmp_path / "src", archive, expected


def _save(img: np.ndarray, path: Path) -> None:
    """Save HWC/HW uint8 as PNG or JPEG by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"quality": 95} if path.suffix == ".jpg" else {}
    Image.fromarray(img).save(path, **kwargs)


@pytest.fixture
def image_tree(tmp_path):
    """root/{train,test}/{cat,dog}/ with PNGs (lossless) and one JPEG per class in train."""
    root = tmp_path / "tree"
    rng = np.random.default_rng(0)
    pngs: dict[str, np.ndarray] = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("dog", "cat"):  # written out of order: classes must come out sorted
            for j in range(n):
                img = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                rel = f"{split}/{cls}/{j:02d}.png"
                _save(img, root / rel)
                pngs[rel] = img
            if split == "train":
                smooth = np.full((8, 8, 3), 100 if cls == "cat" else 200, dtype=np.uint8)
                _save(smooth, root / f"{split}/{cls}/99.jpg")
    return root, pngs


def _make_tar(src: Path, out: Path, arcname: str, mode: str = "w:gz") -> Path:
    with tarfile.open(out, mode) as tf:
        tf.add(src, arcname=arcname)
    return out


def _write_idx(path: Path, arr: np.ndarray, code: int = 0x08, compress: bool = False) -> None:
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.fixture
def idx_dir(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    tr, te = _rand_images(7, 1, (1, 5, 6))[:, 0], _rand_images(3, 2, (1, 5, 6))[:, 0]
    trl, tel = np.arange(7, dtype=np.uint8) % 4, np.array([3, 0, 1], dtype=np.uint8)
    _write_idx(d / "train-images-idx3-ubyte.gz", tr, compress=True)
    _write_idx(d / "train-labels-idx1-ubyte.gz", trl, compress=True)
    _write_idx(d / "t10k-images-idx3-ubyte", te)  # raw, uncompressed
    _write_idx(d / "t10k-labels-idx1-ubyte", tel)
    return d, (tr, trl), (te, tel)


# ---------------------------------------------------------------------------- CIFAR-10


def test_cifar_folder_exact_pixels_and_labels(cifar):
    src, _, expected = cifar
    for source in (src, src / "cifar-10-batches-py"):  # parent or the folder itself
        for split in ("train", "test"):
            d = load_dataset(source, split)
            imgs, labels = expected[split]
            assert d.images.shape == (len(imgs), 3, 32, 32) and d.images.dtype == torch.uint8
            assert np.array_equal(d.images.numpy(), imgs)
            assert np.array_equal(d.labels.numpy(), labels)
            assert d.classes[0] == "airplane" and len(d.classes) == 10
    # R,G,B planes: channel 0 of image 0 is the first 1024 bytes of row 0.
    d = load_dataset(src, "test")
    assert np.array_equal(d.images[0, 0].numpy().ravel(), expected["test"][0][0, 0].ravel())


def test_cifar_archive_matches_folder_and_is_cached(cifar, tmp_path, monkeypatch):
    src, archive, expected = cifar
    cache = tmp_path / "cache"
    d = load_dataset(archive, "train", cache_dir=cache)
    assert np.array_equal(d.images.numpy(), expected["train"][0])
    assert np.array_equal(d.labels.numpy(), expected["train"][1])
    assert len(list(cache.glob("cifar10-*.npz"))) == 1

    def boom(*a, **k):
        raise AssertionError("archive read again despite the cache")

    monkeypatch.setattr(vd.cifar, "_read_from_archive", boom)
    d2 = load_dataset(archive, "train", cache_dir=cache)
    assert torch.equal(d.images, d2.images) and torch.equal(d.labels, d2.labels)


def test_cifar_checksum_mismatch_is_a_clear_error(cifar, tmp_path):
    _, archive, expected = cifar
    official = tmp_path / "dl" / "cifar-10-python.tar.gz"
    official.parent.mkdir()
    official.write_bytes(archive.read_bytes())
    with pytest.raises(ValueError, match="checksum mismatch") as e:
        load_dataset(official, "test")
    assert str(official) in str(e.value) and vd.CIFAR10_MD5 in str(e.value)
    with pytest.raises(ValueError, match="checksum mismatch"):
        vd.load_cifar10(archive, "test", verify=True)  # asked for explicitly
    d = vd.load_cifar10(official, "test", verify=False)
    assert np.array_equal(d.images.numpy(), expected["test"][0])


def test_cifar_channels_and_resize(cifar):
    src, _, expected = cifar
    d = load_dataset(src, "test", channels=1)
    assert d.images.shape == (4, 1, 32, 32)
    ref = np.asarray(Image.fromarray(expected["test"][0][1].transpose(1, 2, 0)).convert("L"))
    assert np.array_equal(d.images[1, 0].numpy(), ref)
    d = load_dataset(src, "test", image_size=16)
    assert d.images.shape == (4, 3, 16, 16) and d.image_size == 16


def test_cifar_refuses_code_in_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(ValueError, match="refusing to load"):
        load_dataset(tmp_path, "test")


def test_download_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(vd.cifar.urllib.request, "urlopen", offline)
    with pytest.raises(DatasetDownloadError) as e:
        download_cifar10(tmp_path / "c", timeout=0.1)
    msg = str(e.value)
    assert str(tmp_path / "c" / "cifar-10-python.tar.gz") in msg and vd.CIFAR10_URL in msg
    assert not list((tmp_path / "c").iterdir())  # no partial file left behind
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", cache_dir=tmp_path / "c", download=False)


# ---------------------------------------------------------------------------- image folders


def test_image_folder_classes_labels_and_exact_png(image_tree, tmp_path):
    root, pngs = image_tree
    d = load_image_folder(root, "train", cache_dir=tmp_path / "c")
    assert d.classes == ("cat", "dog")
    assert d.images.shape == (8, 3, 8, 8)
    # sorted by path: cat/00, 01, 02, 99.jpg, dog/00, 01, 02, 99.jpg
    assert d.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert np.array_equal(d.images[1].numpy(), pngs["train/cat/01.png"].transpose(2, 0, 1))
    assert np.array_equal(d.images[6].numpy(), pngs["train/dog/02.png"].transpose(2, 0, 1))
    jpeg = d.images[7].numpy().astype(int)  # lossy, but a flat 200 stays close
    assert np.abs(jpeg - 200).max() <= 3
    t = load_dataset(root, "test", cache_dir=tmp_path / "c")
    assert len(t) == 4 and t.classes == ("cat", "dog") and t.labels.tolist() == [0, 0, 1, 1]


def test_image_folder_tar_matches_directory(image_tree, tmp_path):
    root, _ = image_tree
    # The split sits under one top-level folder, like the shared cifar10/{train,test}/ archive.
    archive = _make_tar(root, tmp_path / "imgs.tgz", arcname="mydata")
    for split in ("train", "test"):
        a = load_dataset(archive, split, cache_dir=tmp_path / "c")
        b = load_dataset(root, split, cache_dir=tmp_path / "c")
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert a.classes == b.classes == ("cat", "dog")
    plain = _make_tar(root, tmp_path / "imgs.tar", arcname="mydata", mode="w")
    assert torch.equal(load_dataset(plain, "test", cache_dir=None).images, b.images)


def test_image_folder_without_splits_or_classes(tmp_path):
    flat = tmp_path / "flat"
    imgs = _rand_images(3, 5, (6, 6, 3))
    for i, im in enumerate(imgs):
        _save(im, flat / f"{i}.png")
    d = load_dataset(flat, cache_dir=tmp_path / "c")
    assert d.classes == () and d.labels.tolist() == [0, 0, 0] and d.num_classes == 1
    assert np.array_equal(d.images.numpy(), imgs.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="no split folders"):
        load_dataset(flat, "test", cache_dir=tmp_path / "c")


def test_image_folder_missing_split_names_found_ones(image_tree, tmp_path):
    root, _ = image_tree
    with pytest.raises(ValueError, match="'val'.*found: test, train"):
        load_dataset(root, "val", cache_dir=tmp_path / "c")


def test_resize_shorter_side_then_centre_crop(tmp_path):
    img = np.random.default_rng(3).integers(0, 256, size=(20, 40, 3), dtype=np.uint8)  # H=20
    _save(img, tmp_path / "wide" / "a.png")
    d = load_dataset(tmp_path / "wide", image_size=10, cache_dir=tmp_path / "c")
    assert d.images.shape == (1, 3, 10, 10)
    ref = Image.fromarray(img).resize((20, 10), Image.Resampling.BICUBIC).crop((5, 0, 15, 10))
    assert np.array_equal(d.images[0].numpy().transpose(1, 2, 0), np.asarray(ref))
    # Crop only (shorter side already right): exact pixels.
    d = load_dataset(tmp_path / "wide", image_size=20, cache_dir=tmp_path / "c")
    assert np.array_equal(d.images[0].numpy().transpose(1, 2, 0), img[:, 10:30])


def test_channels_conversion_and_grayscale_detection(tmp_path):
    gray = np.random.default_rng(4).integers(0, 256, size=(2, 5, 5), dtype=np.uint8)
    for i, g in enumerate(gray):
        _save(g, tmp_path / "g" / f"{i}.png")
    d = load_dataset(tmp_path / "g", cache_dir=tmp_path / "c")
    assert d.channels == 1 and np.array_equal(d.images[:, 0].numpy(), gray)
    d3 = load_dataset(tmp_path / "g", channels=3, cache_dir=tmp_path / "c")
    assert d3.channels == 3 and all(torch.equal(d3.images[:, c], d.images[:, 0]) for c in range(3))


def test_image_sizes_must_agree_without_image_size(tmp_path):
    _save(np.zeros((4, 4, 3), np.uint8), tmp_path / "m" / "a.png")
    _save(np.zeros((5, 4, 3), np.uint8), tmp_path / "m" / "b.png")
    with pytest.raises(ValueError, match="pass image_size"):
        load_dataset(tmp_path / "m", cache_dir=tmp_path / "c")
    assert load_dataset(tmp_path / "m", image_size=4, cache_dir=tmp_path / "c").hw == (4, 4)


def test_cache_is_reused_and_keyed_on_options_and_source(image_tree, tmp_path, monkeypatch):
    root, _ = image_tree
    archive = _make_tar(root, tmp_path / "imgs.tar.gz", arcname="x")
    cache = tmp_path / "c"
    first = load_dataset(archive, "train", cache_dir=cache)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns

    calls = []
    real = vd.imagefolder._decode_all
    monkeypatch.setattr(
        vd.imagefolder, "_decode_all", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    again = load_dataset(archive, "train", cache_dir=cache)
    assert calls == [] and files[0].stat().st_mtime_ns == mtime
    assert torch.equal(first.images, again.images) and again.classes == ("cat", "dog")

    load_dataset(archive, "train", image_size=4, cache_dir=cache)  # other options
    assert len(calls) == 1 and len(list(cache.glob("*.npz"))) == 2
    os.utime(archive, ns=(mtime + 10**9, mtime + 10**9))  # source changed
    load_dataset(archive, "train", cache_dir=cache)
    assert len(calls) == 2
    assert not list(cache.glob("*.tmp"))  # atomic writes leave no temp files


def test_cache_dir_from_environment(image_tree, tmp_path, monkeypatch):
    root, _ = image_tree
    monkeypatch.setenv("VQKIT_CACHE", str(tmp_path / "envcache"))
    assert vd.default_cache_dir() == tmp_path / "envcache"
    load_dataset(root, "test")
    assert len(list((tmp_path / "envcache").glob("imagefolder-*.npz"))) == 1


def test_corrupt_image_reported_by_path_and_skipped_with_count(image_tree, tmp_path):
    root, pngs = image_tree
    bad = root / "train" / "cat" / "01.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    (root / "train" / "dog" / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match=r"skipped 2 of 9 images") as rec:
        d = load_dataset(root, "train", cache_dir=tmp_path / "c")
    assert str(bad) in str(rec[0].message) and "junk.jpg" in str(rec[0].message)
    assert len(d) == 7 and str(bad) in d.skipped
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert np.array_equal(d.images[1].numpy(), pngs["train/cat/02.png"].transpose(2, 0, 1))
    with pytest.warns(UserWarning, match="skipped 2 of 9"):  # still visible from the cache
        load_dataset(root, "train", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="01.png"):
        load_image_folder(root, "train", on_error="raise", cache=False)


def test_truncated_archives_fail_naming_the_path(image_tree, tmp_path):
    root, _ = image_tree
    archive = _make_tar(root, tmp_path / "imgs.tar.gz", arcname="x")
    data = archive.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated archive") as e:
        load_dataset(cut, "train", cache_dir=tmp_path / "c")
    assert str(cut) in str(e.value)
    # An uncompressed tar cut exactly at a member boundary must not pass silently either.
    plain = _make_tar(root, tmp_path / "imgs.tar", arcname="x", mode="w")
    with tarfile.open(plain) as tf:
        members = tf.getmembers()
    boundary = members[len(members) // 2].offset
    cut_plain = tmp_path / "cut.tar"
    cut_plain.write_bytes(plain.read_bytes()[:boundary])
    with pytest.raises(ValueError, match="truncated") as e:
        load_dataset(cut_plain, "train", cache_dir=tmp_path / "c")
    assert str(cut_plain) in str(e.value)


def test_pool_decode_matches_in_process(image_tree, tmp_path):
    root, _ = image_tree
    a = load_image_folder(root, "train", cache=False, num_workers=0)
    b = load_image_folder(root, "train", cache=False, num_workers=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


# ---------------------------------------------------------------------------- idx


def test_idx_gz_and_raw_roundtrip(idx_dir):
    d, (tr, trl), (te, tel) = idx_dir
    assert np.array_equal(read_idx(d / "train-images-idx3-ubyte.gz"), tr)
    train = load_dataset(d, "train")
    assert train.images.shape == (7, 1, 5, 6)
    assert np.array_equal(train.images[:, 0].numpy(), tr) and train.labels.tolist() == trl.tolist()
    test = load_idx(d, "test")
    assert np.array_equal(test.images[:, 0].numpy(), te) and test.labels.tolist() == tel.tolist()
    rgb = load_dataset(d, "test", channels=3, format="idx")
    assert rgb.images.shape == (3, 3, 5, 6) and torch.equal(rgb.images[:, 2], test.images[:, 0])
    wide = np.arange(6, dtype=np.int32).reshape(2, 3) - 3  # non-uint8 dtype, big-endian
    _write_idx(d / "ints.idx", wide, code=0x0C)
    assert np.array_equal(read_idx(d / "ints.idx"), wide)


def test_idx_bad_magic_truncation_and_trailing_data(idx_dir, tmp_path):
    d, (tr, _), _ = idx_dir
    raw = (d / "t10k-images-idx3-ubyte").read_bytes()
    bad = tmp_path / "bad-magic"
    bad.write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(ValueError, match="bad idx magic") as e:
        read_idx(bad)
    assert str(bad) in str(e.value)
    short = tmp_path / "short"
    short.write_bytes(raw[:-5])
    with pytest.raises(ValueError, match="truncated idx data"):
        read_idx(short)
    long = tmp_path / "long"
    long.write_bytes(raw + b"xx")
    with pytest.raises(ValueError, match="trailing"):
        read_idx(long)
    badgz = tmp_path / "cut.gz"
    badgz.write_bytes((d / "train-images-idx3-ubyte.gz").read_bytes()[:30])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(badgz)


# ---------------------------------------------------------------------------- entry point


def test_missing_and_unknown_sources_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="expected one of") as e:
        load_dataset(missing)
    assert str(missing) in str(e.value)
    odd = tmp_path / "notes.txt"
    odd.write_text("hello")
    with pytest.raises(ValueError, match="unrecognised dataset file") as e:
        load_dataset(odd)
    assert str(odd) in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images found"):
        load_dataset(empty)
    with pytest.raises(ValueError, match="unknown format"):
        load_dataset(empty, format="hdf5")  # type: ignore[arg-type]


def test_detect_format(cifar, image_tree, idx_dir):
    src, archive, _ = cifar
    assert vd.detect_format(src) == vd.detect_format(archive) == "cifar10"
    assert vd.detect_format(image_tree[0]) == "imagefolder"
    assert vd.detect_format(idx_dir[0]) == "idx"


def test_builtin_dataset_loads():
    for source in (None, "builtin"):
        d = load_dataset(source)
        assert d.images.shape == (5000, 1, 28, 28) and d.images.dtype == torch.uint8
        assert len(d.classes) == 10 and set(d.labels.unique().tolist()) == set(range(10))
    t = vd.load_builtin("test", image_size=32, channels=3)
    assert t.images.shape == (1000, 3, 32, 32)
    size = sum(p.stat().st_size for p in vd.BUILTIN_DIR.iterdir())
    assert size < 3_000_000
    assert (vd.BUILTIN_DIR / "LICENSE").is_file() and (vd.BUILTIN_DIR / "README.md").is_file()


def _shared_archive() -> Path:
    base = os.environ.get(SHARED_ENV)
    folder = Path(base) if base else ROOT.parent / "shared" / "data"
    return folder / "cifar10-jpeg.tar.gz"


def test_shared_cifar10_jpeg_archive(tmp_path):
    archive = _shared_archive()
    if not archive.is_file():
        pytest.skip(f"shared data not found at {archive} (set {SHARED_ENV} to its folder)")
    d = load_dataset(archive, "test", cache_dir=tmp_path / "c")
    assert d.images.shape == (10000, 3, 32, 32)
    assert len(d.classes) == 10 and d.classes[0] == "airplane" and d.classes[-1] == "truck"
    assert np.bincount(d.labels.numpy()).tolist() == [1000] * 10
    assert 0.4 < d.images.float().mean().item() / 255 < 0.55


# ---------------------------------------------------------------------------- ImageData


def test_normalisation_and_data_variance_against_numpy():
    imgs = torch.from_numpy(_rand_images(10, 9, (3, 4, 4)))
    d = ImageData(imgs, torch.zeros(10, dtype=torch.int64))
    x = d.normalized()
    assert x.dtype == torch.float32 and x.min() >= -0.5 and x.max() <= 0.5
    ref = imgs.numpy().astype(np.float64) / 255.0 - 0.5
    assert np.allclose(x.numpy(), ref, atol=1e-7)
    assert data_variance(d) == pytest.approx(ref.var(), rel=1e-12, abs=1e-15)
    assert data_variance(imgs.numpy()) == pytest.approx(ref.var(), rel=1e-12)
    assert torch.equal(denormalize(x), imgs)
    with pytest.raises(TypeError):
        normalize(imgs.float())
    with pytest.raises(ValueError):
        ImageData(imgs.float(), torch.zeros(10, dtype=torch.int64))  # type: ignore[arg-type]
    sub = d.subset(slice(2, 5))
    assert len(sub) == 3 and torch.equal(sub.images, imgs[2:5])


# ---------------------------------------------------------------------------- BatchLoader


def _ids(n: int) -> ImageData:
    """Image i is filled with the value i, so a batch reveals which samples it holds."""
    imgs = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageData(imgs, torch.arange(n, dtype=torch.int64))


def _take(loader: BatchLoader, k: int) -> list[list[int]]:
    return [loader.next_batch()[1].tolist() for _ in range(k)]


def test_loader_batches_are_normalised_and_match_labels():
    x, y = BatchLoader(_ids(10), 4, seed=1).next_batch()
    assert x.shape == (4, 1, 2, 2) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0, 0, 0], y.float() / 255 - 0.5)


def test_loader_determinism_and_epochs():
    data = _ids(20)
    a, b = BatchLoader(data, 5, seed=7), BatchLoader(data, 5, seed=7)
    ea, eb = _take(a, 8), _take(b, 8)
    assert ea == eb
    epoch0, epoch1 = sum(ea[:4], []), sum(ea[4:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(20))  # each epoch is a permutation
    assert epoch0 != epoch1  # reshuffled per epoch
    assert _take(BatchLoader(data, 5, seed=8), 4) != ea[:4]
    assert _take(BatchLoader(data, 5, shuffle=False), 1) == [[0, 1, 2, 3, 4]]


def test_loader_epoch_position_and_drop_last():
    data = _ids(10)
    keep = BatchLoader(data, 4, seed=0, drop_last=False)
    assert len(keep) == 3
    sizes = [len(b) for b in _take(keep, 3)]
    assert sizes == [4, 4, 2] and keep.epoch == 1 and keep.position == 0
    drop = BatchLoader(data, 4, seed=0)
    assert len(drop) == 2
    _take(drop, 1)
    assert (drop.epoch, drop.position) == (0, 4)
    _take(drop, 1)
    assert (drop.epoch, drop.position) == (1, 0)
    assert [len(b) for b in _take(drop, 4)] == [4, 4, 4, 4]


@pytest.mark.parametrize("k", [0, 1, 3, 4, 6])
def test_loader_exact_resume(k):
    data = _ids(13)
    full = BatchLoader(data, 3, seed=11, drop_last=False)  # 5 batches per epoch
    reference = _take(full, k + 7)
    first = BatchLoader(data, 3, seed=11, drop_last=False)
    _take(first, k)
    state = first.state_dict()
    assert {"epoch", "position", "seed"} <= set(state)
    resumed = BatchLoader(data, 3, seed=999, drop_last=False)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert _take(resumed, 7) == reference[k:]
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(data, 4).load_state_dict(state)


@pytest.mark.parametrize("n", [20, 21])
def test_loader_sharding(n):
    data = _ids(n)
    ranks = [BatchLoader(data, 2, seed=3, rank=r, world_size=2, drop_last=False) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    for epoch in range(2):
        shards = [sum(_take(r, len(r)), []) for r in ranks]
        assert len(shards[0]) == len(shards[1]) == -(-n // 2)
        assert set(shards[0]) | set(shards[1]) == set(range(n))  # the union covers the epoch
        overlap = set(shards[0]) & set(shards[1])
        assert len(overlap) == (0 if n % 2 == 0 else 1)  # pad repeats at most world_size - 1
        if epoch == 0:
            first = shards
    assert first != shards  # the shards change with the epoch
    drop = [BatchLoader(data, 2, seed=3, rank=r, world_size=2, shard_tail="drop") for r in (0, 1)]
    a, b = (sum(_take(r, len(r)), []) for r in drop)
    assert not set(a) & set(b) and len(a) == len(b) == n // 2


def test_loader_device_and_eval_iteration():
    data = _ids(7)
    x, y = BatchLoader(data, 3, device="cpu").next_batch()
    assert x.device.type == "cpu" and y.device.type == "cpu"
    batches = list(vd.iterate_batches(data, 3))
    assert [b[1].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_random_bytes_archive_is_one_line(tmp_path, suffix):
    """tarfile's own message lists each method it tried, one per line: one line here."""
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(ValueError, match="corrupt or truncated archive") as e:
        vd.load_dataset(path, "train", cache_dir=tmp_path / "c")
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_index_only_loader_visits_the_image_loaders_order():
    """BatchLoader(N) (the audio crops' clip order) draws the indices the image loader
    over N images would, across epochs and shards, and resumes the same way."""
    images = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1)
    for rank in (0, 1):
        by_images = BatchLoader(images, 3, seed=4, rank=rank, world_size=2)
        by_count = BatchLoader(10, 3, seed=4, rank=rank, world_size=2)
        for _ in range(5):
            x, _ = by_images.next_batch()
            idx = by_count.next_indices()
            assert torch.equal(((x[:, 0, 0, 0] + 0.5) * 255).round().long(), idx)
        assert by_count.state_dict() == by_images.state_dict()
