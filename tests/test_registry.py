"""Tests of vqkit's registry module."""

import pytest

from vqkit import FSQ, ResidualVQ, VectorQuantizer


def test_build_quantizer_and_cli_options():
    from vqkit.cli import build_parser
    from vqkit.quantizers import build_quantizer

    assert isinstance(build_quantizer("fsq", 4, levels="8,5,5,5"), FSQ)
    rvq = build_quantizer("rvq", 6, num_embeddings=16, num_quantizers=3, stage="ema")
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
            "--stage",
            "vq",
            "--quantizer-dropout",
            "0.5",
            "--levels",
            "8,8,8",
        ]
    )
    assert (args.quantizer, args.num_quantizers, args.stage) == ("rvq", 6, "vq")
    assert args.quantizer_dropout == 0.5 and args.levels == "8,8,8"


# run-time arguments of the constructors, set by the trainer or the caller, not options
RUNTIME = {
    "self", "embedding_dim", "dim", "channels_last", "check_finite", "max_scratch_bytes",
    "search_backend", "usage_decay", "process_group", "sync_stats", "generator",
    "l2_normalize", "eps", "max_bincount",
}  # fmt: skip


def _constructor_args(cls) -> set[str]:
    """The keyword names a constructor takes, following ``**options`` to the bases."""
    import inspect

    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass.__module__.startswith("torch"):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def test_every_constructor_argument_is_an_option_of_the_same_name():
    """The one-name rule: each kind's constructor arguments (but the run-time ones) are
    its options, by the same name; rvq and gvq pass their layers' options on."""
    from vqkit.quantizers import build_quantizer, get_kind, quantizer_kinds
    from vqkit.quantizers.ema import VectorQuantizerEMA

    for kind in quantizer_kinds():
        cls = type(build_quantizer(kind, 8))
        args = _constructor_args(cls)
        if kind in ("rvq", "gvq"):  # **options reach the vq / ema layers
            args |= _constructor_args(VectorQuantizer) | _constructor_args(VectorQuantizerEMA)
        missing = args - RUNTIME - get_kind(kind).option_names()
        assert not missing, f"{kind}: constructor arguments without an option: {missing}"


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("ibq", {"entropy_weight": 0.1, "codebook_weight": 0.25, "diversity_gamma": 0.5}),
        ("ibq", {"entropy_temperature": 0.1, "double_quant_weight": 0.5}),
        ("lfq", {"num_bits": 4, "entropy_weight": 0.2, "temperature": 0.5}),
        ("bsq", {"num_bits": 4, "entropy_weight": 0.0, "entropy_group_size": 2}),
        ("vq", {"num_embeddings": 8, "codebook_weight": 2.0, "affine_codebook": True}),
        ("simvq", {"num_embeddings": 8, "codebook_weight": 0.5}),
        ("ema", {"num_embeddings": 8, "decay": 0.9, "epsilon": 1e-4}),
        ("rvq", {"num_quantizers": 2, "stage": "vq", "shared_codebook": True}),
        ("gvq", {"groups": 2, "group_kind": "ema", "shared_groups": True}),
        ("fsq", {"levels": "5,5"}),
    ],
)
def test_build_quantizer_takes_the_constructors_names(kind, kwargs):
    from vqkit.quantizers import build_quantizer

    q = build_quantizer(kind, 8, **kwargs)
    for name, value in kwargs.items():
        if name == "stage":
            assert q.stage_kind == value
        elif name == "group_kind":
            assert q.kind == value
        elif name == "shared_groups":
            assert q.shared is value
        elif name == "levels":
            assert q.num_codes == 25
        else:
            assert getattr(q, name) == value, name


def test_the_kinds_own_defaults_reach_their_constructors():
    """entropy_weight is one declaration (default None: the kind's own); each kind
    gets its constructor's default, and the help names them."""
    import inspect

    from vqkit import IBQ
    from vqkit.cli import build_parser
    from vqkit.quantizers import build_quantizer
    from vqkit.quantizers.lfq import BinaryQuantizer as LFQ  # lfq's and bsq's constructor

    own = {
        c: inspect.signature(c.__init__).parameters["entropy_weight"].default for c in (IBQ, LFQ)
    }
    assert own == {IBQ: 0.05, LFQ: 0.1}
    assert build_quantizer("ibq", 8).entropy_weight == own[IBQ]
    assert build_quantizer("lfq", 8, num_bits=4).entropy_weight == own[LFQ]
    assert build_quantizer("bsq", 8, num_bits=4).entropy_weight == own[LFQ]
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    text = train.format_help().replace("\n", " ")
    text = " ".join(text.split())
    assert "lfq and bsq 0.1, ibq 0.05" in text
    assert "--entropy-weight" in text and "--codebook-weight" in text


def test_old_flags_and_old_keys_of_renamed_options_still_work(tmp_path):
    import json

    from vqkit.cli import build_parser
    from vqkit.models.vqvae import VQVAEConfig
    from vqkit.training.config import TrainConfig

    args = build_parser().parse_args(["train", "--quantizer", "ibq", "--ibq-entropy-weight", "0.2"])
    assert args.entropy_weight == 0.2
    args = build_parser().parse_args(["train", "--quantizer", "rvq", "--rvq-stage", "vq"])
    assert args.stage == "vq"
    # a model config as an older vqkit stored it: every kind's options, flat
    old = {**VQVAEConfig().to_dict(), "entropy_weight": 0.1, "ibq_entropy_weight": 0.2}
    old.pop("stage")
    old["rvq_stage"] = "ema"
    for kind, want in (("ibq", 0.2), ("lfq", 0.1), ("vq", None)):
        # older configs held every kind's options: the defaults of the kinds not chosen
        old["ibq_entropy_weight"] = 0.2 if kind == "ibq" else 0.05
        cfg = VQVAEConfig.from_dict({**old, "quantizer": kind})
        assert cfg.entropy_weight == want, kind
        train = {k: v for k, v in old.items() if k not in ("in_channels", "image_size")}
        assert TrainConfig.for_resume({**train, "quantizer": kind}, {}).entropy_weight == want
        path = tmp_path / f"{kind}.json"
        path.write_text(json.dumps({**train, "quantizer": kind}))
        assert TrainConfig.from_file(path).entropy_weight == want
    cfg = VQVAEConfig.from_dict({**old, "quantizer": "rvq", "rvq_stage": "vq"})
    assert cfg.stage == "vq"
    # a changed value of another kind in a config file is still an error, old names too
    path = tmp_path / "stray-old.json"
    path.write_text(json.dumps({"quantizer": "lfq", "ibq_entropy_weight": 0.3}))
    with pytest.raises(ValueError, match="ibq_entropy_weight does not apply to quantizer 'lfq'"):
        TrainConfig.from_file(path)
    path = tmp_path / "stray.json"
    path.write_text(json.dumps({"quantizer": "vq", "entropy_weight": 0.3}))
    with pytest.raises(ValueError, match="entropy_weight does not apply to quantizer 'vq'"):
        TrainConfig.from_file(path)
