"""vqkit.prior.config: the code shapes a prior takes, and one clear line for the rest."""

from __future__ import annotations

import pytest

from vqkit.prior import PriorConfig


@pytest.mark.parametrize("shape", [[8, 8], [7, 7, 4]])
def test_grid_maps_are_taken(shape):
    cfg = PriorConfig(vocab_size=16, code_shape=shape)
    assert cfg.code_shape == shape


@pytest.mark.parametrize("kind", ["autoregressive", "masked"])
def test_multiscale_sequences_are_taken_by_every_kind(kind):
    cfg = PriorConfig(kind=kind, vocab_size=16, code_shape=[30], scales=[1, 2, 5])
    assert cfg.code_shape == [30] and cfg.seq_len == 30 and cfg.scales == [1, 2, 5]


def test_next_scale_on_one_group_is_refused_in_one_line_that_says_why():
    for shape, scales in (([7, 7], []), ([49], [7])):
        with pytest.raises(ValueError) as e:
            PriorConfig(kind="next-scale", vocab_size=16, code_shape=shape, scales=scales)
        msg = str(e.value)
        assert "multi-scale" in msg and "coarser" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(code_shape=[31], scales=[1, 2, 5]), "make sequences of 30 codes"),
        (dict(code_shape=[30], scales=[2, 1, 5]), "strictly increasing"),
        (dict(code_shape=[30], scales=[1, 2, 5], kind="next-scale", pos="rope"), "learned"),
    ],
)
def test_scales_are_checked(fields, match):
    with pytest.raises(ValueError, match=match):
        PriorConfig(vocab_size=16, **fields)


def test_scales_round_trip():
    cfg = PriorConfig(kind="next-scale", vocab_size=16, code_shape=[30], scales=[1, 2, 5])
    back = PriorConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.scales == [1, 2, 5] and back.next_scale


@pytest.mark.parametrize("shape", [[2, 2, 2, 2], [0, 4]])
def test_other_shapes_are_refused(shape):
    with pytest.raises(ValueError, match=r"code_shape must be \(h, w\), \(h, w, Q\) or \(L,\)"):
        PriorConfig(vocab_size=16, code_shape=shape)
