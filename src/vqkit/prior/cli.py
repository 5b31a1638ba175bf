"""``vqkit prior`` and ``vqkit sample``: the argument declarations and the handlers.

    vqkit prior --tokenizer RUN_DIR --out PRIOR_DIR [--steps N] [--n-layer L] ...
                [--audio-window W] [--audio-stages N]  (a speech codec's run)
    vqkit sample PRIOR_DIR --num N --out DIR [--class C] [--temperature T] [--top-k K]
                 [--top-p P] [--cfg-scale S] [--seed S] [--batch-size B]
                 [--decode-steps S --schedule cosine --choice-temperature T]  (masked prior)
                 [--edit IMAGE --region x0,y0,x1,y1 [--region ...] [--outside]]  (masked)
                 [--edit IMAGE --keep-scales N]  (next-scale prior)

The integrator adds them to ``vqkit.cli`` as subcommands::

    p = sub.add_parser("prior", help=...); add_prior_arguments(p)     # -> run_prior(args)
    p = sub.add_parser("sample", help=...); add_sample_arguments(p)   # -> run_sample(args)

Bad input raises :class:`vqkit.errors.UserError` (CheckpointError for unreadable
files) with a one-line message; ``vqkit.cli.main`` turns it into exit code 2, and any
other exception into a traceback and a "this is a bug" line
(:func:`vqkit.errors.report_error`). :func:`main` here does the same
(``python -m vqkit.prior.cli``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError, report_error
from ..options import add_arguments, option_fields
from .config import PriorConfig, PriorTrainConfig
from .loading import load_prior, load_sample_tokenizer
from .sampling import SampleOptions

__all__ = ["add_prior_arguments", "add_sample_arguments", "main", "run_prior", "run_sample"]


def _given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` named on the command line (flags default to None)."""
    return {
        f.name: getattr(args, f.name)
        for f in option_fields(cls)
        if getattr(args, f.name, None) is not None
    }


def add_prior_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``vqkit prior``: the tokenizer run, the output directory, resume and
    overwrite, then one flag per option of :class:`PriorConfig` and
    :class:`PriorTrainConfig`."""
    parser.add_argument(
        "--tokenizer",
        metavar="RUN_DIR",
        help="vqkit train run directory, of an image tokenizer or a speech codec (WAV data), "
        "or its export directory (default with --resume: the stored one)",
    )
    parser.add_argument(
        "--tokenizer-checkpoint",
        metavar="NAME",
        default=None,
        help="weights file inside RUN_DIR, or best / last for checkpoints/{best,last}.pt "
        "(default: checkpoints/best.pt, else checkpoints/last.pt, else model.safetensors; "
        "an adversarial run's best.pt is its lowest NMSE from disc_start on)",
    )
    parser.add_argument(
        "--out",
        "--out-dir",
        dest="out",
        required=True,
        metavar="PRIOR_DIR",
        help="prior run directory",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (stored options; flags override them)",
    )
    parser.add_argument("--overwrite", action="store_true", help="start again in an existing --out")
    parser.add_argument(
        "--data", default=None, help="dataset to encode instead of the tokenizer's (not cached)"
    )
    add_arguments(parser.add_argument_group("architecture"), PriorConfig)
    add_arguments(
        parser.add_argument_group("training"),
        PriorTrainConfig,
        aliases={new: [f"--{old}"] for old, new in PriorTrainConfig.renamed.items()},
    )


def run_prior(args: argparse.Namespace) -> int:
    """Train a prior on a tokenizer's codes (see :mod:`vqkit.prior.trainer`); 0 on
    success, 130 when interrupted (the run is saved for ``--resume``)."""
    from .. import distributed
    from ..runtime.options import check_resume_steps, resume_changes
    from ..storage.checkpoint import load_checkpoint
    from .audio_codes import load_audio_codes
    from .codes import PIN_DIR, load_codes, load_tokenizer, tokenizer_in_use
    from .trainer import PriorTrainer

    out = Path(args.out)
    model_base: dict[str, Any] = {}
    train_base: dict[str, Any] = {}
    stored_tok: dict[str, Any] | None = None
    if args.resume:  # the stored options, flags on top
        ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
        model_base = ckpt["model_config"]
        train_base = PriorTrainConfig.from_dict(ckpt["train_config"]).to_dict()
        stored_tok = ckpt.get("tokenizer")
    config = PriorConfig.from_dict({**model_base, **_given(args, PriorConfig)})
    train_config = PriorTrainConfig.from_dict({**train_base, **_given(args, PriorTrainConfig)})
    if args.resume:  # refused before anything is loaded (the runtime reports the changes)
        check_resume_steps(train_config.steps, int(ckpt.get("step", 0)))
        resume_changes(
            train_config,
            train_base,
            stored_world=int(ckpt.get("world_size", 1)),
            world=distributed.env_world_size(),
        )
    tok_dir = args.tokenizer or (stored_tok or {}).get("run_dir")
    if tok_dir is None:
        raise UserError("--tokenizer RUN_DIR is required (the vqkit train run to model)")
    tok_ckpt = args.tokenizer_checkpoint or (
        stored_tok["checkpoint"] if stored_tok and not args.tokenizer else None
    )
    pinned = (stored_tok or {}).get("pinned")

    def load(job: PriorTrainer) -> tuple[Any, Any, Any]:
        """The tokenizer and its codes, once the runtime holds the process group."""
        busy = None if pinned else tokenizer_in_use(tok_dir)
        tok = load_tokenizer(
            tok_dir,
            checkpoint=tok_ckpt,
            device=job.device,
            expect_sha256=stored_tok["sha256"] if stored_tok else None,
            pin=out / PIN_DIR,  # the prior keeps the exact weights it is trained on
            pinned=out / pinned if pinned else None,
        )
        if busy and job.is_main:
            print(
                f"warning: tokenizer run {tok_dir} is in use by {busy} (still training); "
                f"this prior keeps a copy of its current {tok.checkpoint.name} "
                f"(sha256 {tok.sha256[:16]}...) in {out / PIN_DIR}, which later "
                "checkpoints of that run do not change",
                file=sys.stderr,
            )
        progress = train_config.progress and job.is_main
        with job.rank0_first():  # rank 0 encodes and fills the cache first
            if tok.is_audio:  # clips cut into windows of frames (vqkit.prior.audio_codes)
                train, test, cached = load_audio_codes(
                    tok,
                    window=train_config.audio_window,
                    stages=train_config.audio_stages,
                    data=args.data,
                    progress=progress,
                )
            else:
                _refuse_audio_options(train_config)
                train, test, cached = load_codes(tok, data=args.data, progress=progress)
        if job.is_main:
            how = "cached" if cached else "encoded"
            what = "windows (frames, stages)" if tok.is_audio else "index maps"
            print(
                f"codes {how}: {len(train)} train / {len(test)} test {what} "
                f"{tuple(train.code_shape)} of {tok.num_codes} codes ({tok.checkpoint})"
            )
        return train, test, tok

    trainer = PriorTrainer(
        config, train_config, out, load=load, resume=args.resume, overwrite=args.overwrite
    )
    try:
        with torch.enable_grad():  # also when the caller runs commands under no_grad
            result = trainer.fit()
    except KeyboardInterrupt:
        return 130
    if trainer.is_main:
        print(json.dumps(result, indent=2))
        samples = "samples/*.wav" if trainer.audio else "samples.png"
        print(f"prior written to {out}: checkpoints/ metrics.jsonl curves.png {samples} eval.json")
    return 0


def _refuse_audio_options(train_config: PriorTrainConfig) -> None:
    """An image tokenizer's prior: the speech codec's options must keep their defaults."""
    defaults = PriorTrainConfig()
    for name in ("audio_window", "audio_stages"):
        if getattr(train_config, name) != getattr(defaults, name):
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"{flag} applies to a speech codec's codes; this tokenizer is an image one"
            )


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``vqkit sample``: the prior run, how many, where, the class, the seed, the
    batch size, and the options of :class:`SampleOptions`."""
    parser.add_argument("prior", metavar="PRIOR_DIR", help="vqkit prior run directory")
    parser.add_argument("--num", type=int, default=16, help="samples to draw (default: 16)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--class",
        dest="class_id",
        default=None,
        metavar="C",
        help="class id or name for every sample; 'null' for the unconditional "
        "class (default: the classes in turn; an unconditional prior: null)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="samples decoded together (default: 64)"
    )
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default=None,
        help="prior weights (default: best when present, else last)",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="RUN_DIR",
        default=None,
        help="the tokenizer run, if it moved (its weights must be the same file)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the samples in a non-empty --out (only the files sample writes)",
    )
    add_arguments(parser.add_argument_group("sampling"), SampleOptions)
    from .editing import add_masked_sample_arguments
    from .scale_editing import add_scale_edit_arguments

    add_masked_sample_arguments(parser)  # --decode-steps --schedule ... --edit --region ...
    add_scale_edit_arguments(parser)  # --keep-scales (with --edit, a next-scale prior)


def _class_labels(
    spec: str | None, classes: list[str], start: int, count: int, null: int
) -> torch.Tensor:
    """Labels (count,) of samples start..start+count-1 from ``--class``: an id, a class
    name, 'null', or None (the classes in turn: sample i gets class i mod C)."""
    if spec is None:
        if not classes:
            return torch.full((count,), null)
        return torch.arange(start, start + count) % len(classes)
    if spec.lower() in ("null", "none"):
        return torch.full((count,), null)
    if spec in classes:
        return torch.full((count,), classes.index(spec))
    try:
        cid = int(spec)
    except ValueError:
        raise UserError(f"unknown class {spec!r}; the prior's classes: {classes}") from None
    if not classes:
        raise UserError("--class: this prior is unconditional (trained without classes)")
    if not 0 <= cid < len(classes):
        raise UserError(
            f"class id {cid} out of range: this prior has classes 0..{len(classes) - 1}"
        )
    return torch.full((count,), cid)


def run_sample(args: argparse.Namespace) -> int:
    """Draw samples from a prior batch by batch, decode each batch with its tokenizer and
    write its PNGs and index maps at once (:class:`~vqkit.prior.sample_writer.SampleWriter`:
    memory holds one batch; a killed run leaves the samples written so far)."""
    from ..distributed import resolve_device
    from ..models.codes_io import model_identity
    from .editing import masked_sample_options, run_edit
    from .sample_writer import SampleWriter
    from .scale_editing import check_scale_edit, run_scale_edit

    opts = SampleOptions.from_dict(_given(args, SampleOptions), where="sample options")
    if args.num < 1:
        raise UserError(f"--num must be >= 1; got {args.num}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1; got {args.batch_size}")
    device = resolve_device(args.device)
    model, ckpt = load_prior(args.prior, args.checkpoint, device)
    check_scale_edit(args, model)
    masked = masked_sample_options(args, model)  # the kind is the prior run's
    tok = load_sample_tokenizer(args.prior, ckpt, args.tokenizer, device)
    if tok.is_audio:
        raise UserError(
            f"{args.prior} is a speech codec's prior: vqkit sample draws images; its run "
            "writes WAV samples (samples/step_N_i.wav) at each evaluation"
        )
    classes = list(ckpt.get("classes", []))
    null = model.null_class
    # an edit steers with the null class unless --class names one
    class_id = "null" if args.edit is not None and args.class_id is None else args.class_id
    first = _class_labels(class_id, classes, 0, 1, null)  # checks --class up front
    guided_null = model.config.num_classes and bool((first == null).any())
    if guided_null and opts.cfg_scale != 1.0:
        raise UserError("--cfg-scale needs a class to guide towards (not 'null')")
    g = torch.Generator(device).manual_seed(args.seed)
    if args.edit is not None:

        def edit_labels(start: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            labels = _class_labels(class_id, classes, start, n, null)  # one batch's
            return labels, labels if model.config.num_classes and not guided_null else None

        if model.config.kind == "next-scale":
            return run_scale_edit(args, model, tok, opts, edit_labels, g)
        return run_edit(args, model, tok, opts, masked, edit_labels, g)
    writer = SampleWriter(
        args.out,
        args.num,
        {
            "prior": str(Path(args.prior).resolve()),
            "checkpoint": args.checkpoint,
            "step": ckpt.get("step"),
            "kind": model.config.kind,
            "seed": args.seed,
            "device": str(device),
            # the batches share one generator: another batch size draws other samples
            "batch_size": args.batch_size,
            "options": opts.to_dict(),
            # a masked prior's decoding, its passes made explicit (MaskedSampleOptions)
            **({"masked_options": masked["masked"].to_dict()} if masked else {}),
            "class": args.class_id,
            "classes": classes,
            "tokenizer_sha256": tok.sha256,
        },
        model_identity(tok.model),
        overwrite=args.overwrite,
    )
    shape: tuple[int, ...] = ()
    for start in range(0, args.num, args.batch_size):
        n = min(args.batch_size, args.num - start)
        labels = _class_labels(class_id, classes, start, n, null)
        cond = labels if model.config.num_classes and not guided_null else None
        # one batch at a time from the same generator: the same draws as one call
        codes = model.sample(n, opts, labels=cond, generator=g, batch_size=n, **masked)
        writer.add(tok.model.decode(codes), codes, labels)
        shape = tuple(codes.shape[1:])
    writer.close()
    out = Path(args.out)
    print(f"{args.num} samples -> {out}/grid.png, sample_*.png, sample_*.npy {shape}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m vqkit.prior.cli {prior,sample} ...``; errors -> exit code 2."""
    parser = argparse.ArgumentParser(
        prog="vqkit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    kinds = "autoregressive, masked or next-scale"
    add_prior_arguments(sub.add_parser("prior", help=f"train a prior ({kinds})"))
    add_sample_arguments(sub.add_parser("sample", help="draw images from a prior"))
    args = parser.parse_args(argv)
    try:
        if args.command == "prior":
            return run_prior(args)
        with torch.no_grad():
            return run_sample(args)
    except Exception as e:  # one line for bad input; a traceback for a bug (vqkit.errors)
        return report_error(args.command, e)


if __name__ == "__main__":
    sys.exit(main())
