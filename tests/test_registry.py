"""Tests of vqkit's registry module."""

import pytest

from vqkit import FSQ, ResidualVQ, VectorQuantizer


def test_build_quantizer_and_cli_options():
    from vqkit.cli import build_parser
    from vqkit.quantizers import build_quantizer

    assert isinstance(build_quantizer("fsq", 4, levels="8,5,5,5"), FSQ)
    rvq = build_quantizer("rvq", 6, num_embeddings=16, num_quantizers=3, rvq_stage="ema")
    assert isinstance(rvq, ResidualVQ) and rvq.num_quantizers == 3
    assert isinstance(build_quantizer("vq", 6, num_embeddings=8, use_cosine=True), VectorQuantizer)
    with pytest.raises(ValueError, match="quantizer must be one of"):
        build_quantizer("pq", 4)
    with pytest.raises(ValueError, match="unknown options"):
        build_quantizer("fsq", 4, num_embeddings=8)
    args = build_parser().parse_args(
        [
            "train",
            "--quantizer",
            "rvq",
            "--num-quantizers",
            "6",
            "--rvq-stage",
            "vq",
            "--quantizer-dropout",
            "0.5",
            "--levels",
            "8,8,8",
        ]
    )
    assert (args.quantizer, args.num_quantizers, args.rvq_stage) == ("rvq", 6, "vq")
    assert args.quantizer_dropout == 0.5 and args.levels == "8,8,8"
