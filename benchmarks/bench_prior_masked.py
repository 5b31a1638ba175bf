"""Wall time per sample: the autoregressive prior (KV cache) against the masked prior
(MaskGIT) at 8 and 12 passes and, with ``--ns-prior``, the next-scale prior (one pass
per scale, KV cache), at batch 1 and batch 64; and an editing grid.

Both priors have the same architecture (``vqkit prior``'s defaults unless flags say
otherwise: 4 blocks, 4 heads, width 256), so the same parameter count up to the masked
kind's mask embedding and one more position (the table gives both counts). The code
map, vocabulary and classes come from ``--tokenizer RUN`` when given, else from
``--data``: ``builtin`` (the default ``vqkit train`` on the built-in Fashion-MNIST
subset: 7 x 7 codes of 512, 10 classes) or ``cifar10`` (8 x 8 codes of 512, 10
classes; with ``--tokenizer /work/runs/c10-ema-10k`` the real run). Speed does not
depend on the weights, so the priors are fresh initialisations unless ``--ar-prior`` /
``--masked-prior`` name trained runs. Each round times every method once, interleaved
(load drifts hit all alike); the median over rounds is reported, per sample =
time / batch. Sampling: classes in turn, temperature 1, no top-k/p, guidance scale
``--cfg-scale`` (1: none; guidance doubles the rows of both kinds).

    OMP_NUM_THREADS=1 python -m benchmarks.bench_prior_masked --data builtin
    python -m benchmarks.bench_prior_masked --rounds 0 --edit-prior PRIOR_RUN  # the grid
    python -m benchmarks.bench_prior_masked --data cifar10 --tokenizer /work/runs/c10-ema-10k

Writes benchmarks/results/prior_masked_<data>/speed_<device>.{md,json} and, with
``--edit-prior RUN``, editing_grid.png and editing.{md,json}: test images of RUN's
tokenizer as it reconstructs them, the box greyed out, then the box regenerated under
two class labels (``--rounds 0``: the grid only).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks import common
from vqkit.prior import Prior, PriorConfig

MODULE = "benchmarks.bench_prior_masked"
SHAPES = {"builtin": ([7, 7], 512, 10), "cifar10": ([8, 8], 512, 10)}


def shape_of(args: argparse.Namespace) -> tuple[list[int], int, int, str]:
    """(code_shape, vocab, classes, where from)."""
    if args.tokenizer:
        from vqkit.prior.codes import load_codes, load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        train, _, _ = load_codes(tok)
        return list(train.code_shape), tok.num_codes, len(train.classes), str(tok.checkpoint)
    code_shape, vocab, classes = SHAPES[args.data]
    return code_shape, vocab, classes, f"{args.data} shapes (fresh priors)"


def build(kind: str, args: argparse.Namespace, shape: tuple[list[int], int, int]) -> Prior:
    """A prior of ``kind``: trained (``--ar-prior`` / ``--masked-prior``) or fresh."""
    trained = {"autoregressive": args.ar_prior, "masked": args.masked_prior}.get(kind)
    trained = args.ns_prior if kind == "next-scale" else trained
    if trained:
        from vqkit.prior.loading import load_prior

        return load_prior(trained)[0]
    torch.manual_seed(0)
    code_shape, vocab, classes = shape
    cfg = PriorConfig(
        kind=kind,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        vocab_size=vocab,
        code_shape=code_shape,
        num_classes=classes,
    )
    return Prior(cfg).eval()


def time_one(prior: Prior, batch: int, steps: int | None, cfg_scale: float) -> tuple[float, float]:
    """(wall, CPU) seconds to draw ``batch`` index maps (CUDA: synchronised before and
    after). The process's CPU time is what one thread costs on a shared machine whose
    other jobs stretch the wall time; on a quiet machine the two agree."""
    dev = prior.tok_emb.weight.device
    labels = torch.arange(batch, device=dev) % max(prior.config.num_classes, 1)
    labels = labels if prior.config.num_classes else None
    g = torch.Generator(dev).manual_seed(0)
    kw = {"decode_steps": steps} if steps and prior.config.masked else {}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    prior.sample(batch, labels=labels, generator=g, cfg_scale=cfg_scale, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0, time.process_time() - c0


def edit_grid(args: argparse.Namespace, out: Path) -> dict:
    """Test images of the masked prior's tokenizer with one box regenerated under two
    class labels; rows: images; columns: original, reconstruction, box greyed, class
    A, class B."""
    from vqkit.prior.codes import load_codes, load_tokenizer
    from vqkit.prior.editing import region_mask
    from vqkit.prior.loading import load_prior
    from vqkit.prior.report import save_grid

    prior, ckpt = load_prior(args.edit_prior)
    if not prior.config.masked:
        raise SystemExit(f"--edit-prior {args.edit_prior}: an autoregressive prior cannot edit")
    stored = ckpt["tokenizer"]
    tok = load_tokenizer(stored["run_dir"], checkpoint=stored["checkpoint"],
                         expect_sha256=stored["sha256"])  # fmt: skip
    _, test, _ = load_codes(tok)
    size = tok.model.config.image_size
    box = [int(v) for v in args.edit_box.split(",")]
    hidden = region_mask([tuple(box)], (size, size), prior.code_shape)
    n = args.edit_images
    pick = torch.linspace(0, len(test) - 1, n).round().long()
    codes = test.codes[pick]
    classes = [int(c) for c in args.edit_classes.split(",")]
    columns = []
    with torch.no_grad():
        recon = tok.model.decode(codes)
        pos = hidden if hidden.dim() == 2 else hidden[..., 0]
        f = size // pos.shape[0]
        pixels = pos.repeat_interleave(f, 0).repeat_interleave(f, 1)
        columns += [recon, torch.where(pixels, torch.zeros_like(recon), recon)]
        for c in classes:
            g = torch.Generator().manual_seed(0)
            edited = prior.sample(n, labels=c, generator=g, codes=codes,
                                  hidden=hidden.expand(n, *hidden.shape),
                                  decode_steps=args.edit_steps,
                                  cfg_scale=args.edit_cfg_scale)  # fmt: skip
            columns.append(tok.model.decode(edited))
    # one row per image: reconstruction (the tokenizer's view of the test image), box,
    # then the edits (the images themselves are the codes' decodings: the prior edits codes)
    rows = torch.stack(columns, dim=1).reshape(-1, *columns[0].shape[1:])
    save_grid(rows, out / "editing_grid.png", per_row=len(columns), scale=3)
    names = list(ckpt.get("classes", []))
    return {
        "masked_prior": str(Path(args.edit_prior).resolve()),
        "box": box,
        "codes_regenerated": int(hidden.sum()),
        "test_images": pick.tolist(),
        "classes": [names[c] if c < len(names) else c for c in classes],
        "steps": args.edit_steps,
        "cfg_scale": args.edit_cfg_scale,
        "columns": ["reconstruction", "box greyed", *[f"class {c}" for c in classes]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", choices=tuple(SHAPES), default="builtin")
    ap.add_argument("--tokenizer", help="a vqkit train run: its code map, codes and classes")
    ap.add_argument("--ar-prior", help="a trained autoregressive prior run (default: fresh)")
    ap.add_argument("--masked-prior", help="a trained masked prior run (default: fresh)")
    ap.add_argument("--ns-prior", help="a trained next-scale prior run (timed when given)")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--masked-steps", type=int, nargs="+", default=[8, 12])
    ap.add_argument("--cfg-scale", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3, help="0: no timing (the edit grid only)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ... (the timed sampling)")
    ap.add_argument("--edit-prior", dest="edit_prior", help="masked prior run for the edit grid")
    ap.add_argument("--edit-box", default="0,0,14,14", help="x0,y0,x1,y1 pixels")
    ap.add_argument("--edit-classes", default="1,8", help="two class ids")
    ap.add_argument("--edit-images", type=int, default=8)
    ap.add_argument("--edit-steps", type=int, default=8)
    ap.add_argument("--edit-cfg-scale", type=float, default=2.0)
    ap.add_argument("--out", default=None, help="default benchmarks/results/prior_masked_<data>")
    ap.add_argument("--note", help="free text stored in the results (e.g. machine load)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else common.out_dir(f"prior_masked_{args.data}")
    meta = common.run_meta(MODULE, args.note)
    code_shape, vocab, classes, source = shape_of(args)
    shape = (code_shape, vocab, classes)
    device = torch.device(args.device)
    kinds = ("autoregressive", "masked", "next-scale")[: 3 if args.ns_prior else 2]
    priors = {k: build(k, args, shape).to(device) for k in kinds}
    params = {k: p.num_params() for k, p in priors.items()}
    seq = priors["autoregressive"].seq_len
    methods = [("autoregressive (KV cache)", "autoregressive", None)]
    methods += [(f"masked, {s} passes", "masked", s) for s in args.masked_steps]
    if args.ns_prior:
        methods += [
            ("next-scale (KV cache)", "next-scale", len(priors["next-scale"].config.scales))
        ]
    for _, kind, steps in methods if args.rounds else ():  # warm-up: first calls
        time_one(priors[kind], 2, steps, args.cfg_scale)
    rows = []
    for batch in args.batch_sizes if args.rounds else ():
        times: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in methods}
        for _ in range(args.rounds):
            for name, kind, steps in methods:
                times[name].append(time_one(priors[kind], batch, steps, args.cfg_scale))
        first = times[methods[0][0]]
        ar = [statistics.median(t[i] for t in first) for i in (0, 1)]
        for name, kind, steps in methods:
            med = [statistics.median(t[i] for t in times[name]) for i in (0, 1)]
            rows.append({
                "batch": batch, "method": name, "kind": kind, "passes": steps or seq,
                "median_s": med[0], "per_sample_ms": 1e3 * med[0] / batch,
                "speedup_vs_ar": ar[0] / med[0], "times_s": [t[0] for t in times[name]],
                "cpu_median_s": med[1], "cpu_per_sample_ms": 1e3 * med[1] / batch,
                "cpu_speedup_vs_ar": ar[1] / med[1], "cpu_times_s": [t[1] for t in times[name]],
            })  # fmt: skip
            print(f"batch {batch:3d} {name:26s} wall {1e3 * med[0] / batch:9.2f} ms/sample "
                  f"(x{ar[0] / med[0]:.2f} vs AR), CPU {1e3 * med[1] / batch:9.2f} ms/sample "
                  f"(x{ar[1] / med[1]:.2f})", flush=True)  # fmt: skip
    edit = edit_grid(args, out) if args.edit_prior else None
    common.finish_meta(meta)
    settings = {
        "code_shape": code_shape, "vocab": vocab, "classes": classes, "source": source,
        "n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
        "params": params, "cfg_scale": args.cfg_scale, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "device": args.device,
        "trained": {"ar": args.ar_prior, "masked": args.masked_prior, "ns": args.ns_prior},
    }  # fmt: skip
    md = [
        f"# Sampling time: {', '.join(priors)} priors, "
        f"{'codes of ' + source if args.tokenizer else args.data}",
        "",
        *common.meta_lines(meta),
        f"- code map {code_shape} ({seq} codes) of {vocab}, {classes} classes ({source}); "
        f"{args.n_layer} blocks, {args.n_head} heads, width {args.n_embd}; parameters: "
        f"autoregressive {params['autoregressive']:,}, masked {params['masked']:,}; "
        f"{torch.get_num_threads()} torch thread(s), device {args.device}; guidance scale "
        f"{args.cfg_scale}; "
        f"median of {args.rounds} interleaved rounds; wall time and this process's CPU "
        "time (what one thread costs when other jobs stretch the wall time)",
        "",
        *common.md_table(
            [
                "batch",
                "method",
                "passes",
                "wall ms / sample",
                "vs AR (wall)",
                "CPU ms / sample",
                "vs AR (CPU)",
            ],
            [
                (
                    r["batch"],
                    r["method"],
                    r["passes"],
                    f"{r['per_sample_ms']:.2f}",
                    f"{r['speedup_vs_ar']:.2f}x",
                    f"{r['cpu_per_sample_ms']:.2f}",
                    f"{r['cpu_speedup_vs_ar']:.2f}x",
                )
                for r in rows
            ],
            align="rlrrrrr",
        ),
    ]
    if rows:
        data = {"meta": meta, "settings": settings, "rows": rows}
        print(common.write_results(out, f"speed_{device.type}", data, md))
    if edit:
        lines = [
            "# Editing grid (`editing_grid.png`)",
            "",
            *common.meta_lines(meta),
            "",
            *(f"- {k}: {v}" for k, v in edit.items()),
        ]
        print(common.write_results(out, "editing", {"meta": meta, "edit": edit}, lines))


if __name__ == "__main__":
    main()
