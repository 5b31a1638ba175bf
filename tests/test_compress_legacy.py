"""vqkit.compress.legacy: version-1 files (float probabilities) written here by a test-side
version-1 encoder decode to their codes on the machine that wrote them; a version-1 file
whose payload decodes to other codes is refused naming its version; a version-1 stream
of more maps than MAX_V1_MAPS is refused before anything is sized by it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("constriction")

from vqkit.compress import format as fmt  # noqa: E402
from vqkit.compress import legacy  # noqa: E402
from vqkit.compress.codec import (  # noqa: E402
    Codec,
    DecodeError,
    decode_many,
    decode_maps,
    encode_maps,
    prior_hash,
)
from vqkit.compress.coder import RangeEncoder  # noqa: E402
from vqkit.errors import UserError  # noqa: E402
from vqkit.prior import Prior, flatten_codes  # noqa: E402

from .test_compress_exact import small_prior  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

TOKENIZER_HASH = "ab" * 32
CLASSES = 4


@pytest.fixture(scope="module")
def codec(one_thread_module):
    """A codec for code maps (no tokenizer) of a small class-conditional prior whose
    maps are (3, 4, 2): residual stages, read in the prior's flattening order."""
    prior = small_prior(classes=CLASSES, shape=(3, 4, 2), attn=2.0, seed=5)
    names = tuple(f"c{i}" for i in range(CLASSES))
    return Codec(prior, None, TOKENIZER_HASH, prior_hash(prior, prior.config.to_dict()), names)


def _maps(codec: Codec, n: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return codec.prior.sample(n, generator=g).numpy()


@torch.no_grad()
def encode_v1(prior: Prior, maps: np.ndarray, labels: torch.Tensor) -> bytes:
    """The payload of vqkit 0.1.0's version-1 loop, written out: the float prior on one
    thread with its KV cache, all N maps at once, t outer and the maps inner, each code
    under ``softmax(float64(logits))`` quantized by the range coder."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq = flatten_codes(torch.from_numpy(maps), prior.code_shape)
        n, t_len = seq.shape
        enc = RangeEncoder()
        cache = prior.new_cache(n)
        logits = prior.extend(seq[:, :0], cache, labels)[:, -1]
        for t in range(t_len):
            probs = torch.softmax(logits.double(), dim=-1).numpy()
            enc.encode(seq[:, t].numpy(), probs)
            if t + 1 < t_len:
                logits = prior.extend(seq[:, t : t + 1], cache)[:, -1]
        return enc.finish()
    finally:
        torch.set_num_threads(before)


def v1_file(codec: Codec, maps: np.ndarray, labels: list[int], payload: bytes) -> bytes:
    """A version-1 file: no model byte, the float prior's hash."""
    seq = flatten_codes(torch.from_numpy(maps), codec.code_shape).numpy()
    header = fmt.Header(
        TOKENIZER_HASH[:16],
        codec.prior_hash[:16],
        codec.code_shape,
        codec.num_symbols,
        tuple(labels),
        fmt.code_checksum(seq),
        version=1,
        model=fmt.MODEL_FLOAT,
    )
    return fmt.pack(header, payload)


def test_a_version_1_file_decodes_to_its_codes(codec):
    maps = _maps(codec, 5, seed=1)
    labels = [0, 3, CLASSES, 1, 1]
    data = v1_file(codec, maps, labels, encode_v1(codec.prior, maps, torch.tensor(labels)))
    header, _ = fmt.unpack(data)
    assert header.version == 1 and header.model == fmt.MODEL_FLOAT
    out, got = decode_maps(codec, data)
    assert out.shape == maps.shape
    np.testing.assert_array_equal(out, maps)
    assert got.labels == tuple(labels)
    # the float loop restored the prior's mode and the thread count
    assert not codec.prior.training and torch.get_num_threads() == 1
    # next to a version-2 file of other maps, in one call
    other = _maps(codec, 3, seed=2)
    v2 = encode_maps(codec, other, 2)
    (a, ha), (b, hb) = decode_many(codec, [v2, data], ["new.vqz", "old.vqz"])
    assert (ha.version, hb.version) == (2, 1)
    np.testing.assert_array_equal(a, other)
    np.testing.assert_array_equal(b, maps)


def test_a_version_1_file_the_float_prior_does_not_reproduce_is_refused(codec):
    """What another machine's kernels amount to: the writer's probabilities were not
    this prior's (here: a perturbed copy wrote them). One line that names version 1."""
    maps = _maps(codec, 4, seed=3)
    labels = [1, 2, 3, CLASSES]
    other = Prior(codec.prior.config).eval()
    other.load_state_dict(codec.prior.state_dict())
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    payload = encode_v1(other, maps, torch.tensor(labels))
    assert payload != encode_v1(codec.prior, maps, torch.tensor(labels))
    with pytest.raises(
        DecodeError, match="^old.vqz cannot be decoded here: it is a version-1"
    ) as e:
        decode_maps(codec, v1_file(codec, maps, labels, payload), "old.vqz")
    assert "\n" not in str(e.value)


def test_a_version_1_file_names_the_float_prior(codec):
    """Version 1 names the float prior's hash, version 2 the twin's digest: a version-1
    header with the twin's digest is another prior's file."""
    maps = _maps(codec, 1, seed=4)
    payload = encode_v1(codec.prior, maps, torch.tensor([0]))
    header, _ = fmt.unpack(v1_file(codec, maps, [0], payload))
    forged = fmt.pack(replace(header, prior_hash=codec.exact_hash[:16]), payload)
    assert codec.exact_hash[:16] != codec.prior_hash[:16]
    with pytest.raises(DecodeError, match=f"compressed with prior {codec.exact_hash[:16]}"):
        decode_maps(codec, forged)


def test_more_maps_than_max_v1_maps_are_refused(codec, monkeypatch):
    maps = _maps(codec, 5, seed=6)
    labels = [0] * 5
    data = v1_file(codec, maps, labels, encode_v1(codec.prior, maps, torch.tensor(labels)))
    monkeypatch.setattr(legacy, "MAX_V1_MAPS", 4)
    with pytest.raises(UserError, match="a version-1 stream of 5 maps: .* at most 4 maps") as e:
        decode_maps(codec, data)
    assert "\n" not in str(e.value)
    # and refused before the cache is sized: no extend runs
    calls = []
    monkeypatch.setattr(codec.prior, "new_cache", lambda n: calls.append(n))
    with pytest.raises(UserError):
        legacy.decode_float(codec.prior, b"\x00" * 8, torch.zeros(1_000_000, dtype=torch.long))
    assert calls == []
    monkeypatch.undo()  # the real bound: the same file decodes
    np.testing.assert_array_equal(decode_maps(codec, data)[0], maps)
