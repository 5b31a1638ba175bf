"""vqkit.prior.config: the code shapes a prior takes, and one clear line for the rest."""

from __future__ import annotations

import pytest

from vqkit.prior import PriorConfig


@pytest.mark.parametrize("shape", [[8, 8], [7, 7, 4]])
def test_grid_maps_are_taken(shape):
    cfg = PriorConfig(vocab_size=16, code_shape=shape)
    assert cfg.code_shape == shape


def test_multiscale_sequences_are_refused_in_one_line_that_says_why():
    with pytest.raises(ValueError) as e:
        PriorConfig(vocab_size=16, code_shape=[70])
    msg = str(e.value)
    assert "multi-scale" in msg and "70" in msg and "\n" not in msg


@pytest.mark.parametrize("shape", [[2, 2, 2, 2], [0, 4]])
def test_other_shapes_are_refused(shape):
    with pytest.raises(ValueError, match=r"code_shape must be \(h, w\) or \(h, w, Q\)"):
        PriorConfig(vocab_size=16, code_shape=shape)
