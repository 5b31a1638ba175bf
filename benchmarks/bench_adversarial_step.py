"""CPU time of one ``vqkit train`` step with and without the discriminator, in one process:
the classic step (MSE objective, no adversarial machinery), the adversarial objective
before ``--disc-start`` (the discriminator still off) and after it (the generator's
adaptive weight and adversarial term, then the discriminator's own step).

    python -m benchmarks.bench_adversarial_step            # CIFAR-sized: batch 32, 32 px
    python -m benchmarks.bench_adversarial_step --quick    # a few steps, small batch

The three settings run in interleaved rounds and are timed by the process's CPU time
(``time.process_time``, one thread), which a loaded, shared machine disturbs far less than
wall time; the table reports the median ms per step and the ratio to the classic step.
Writes ``benchmarks/results/adversarial_step/adversarial_step.{md,json}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks import common

MODULE = "benchmarks.bench_adversarial_step"
SETTINGS = ("classic", "objective, discriminator off", "discriminator on")


def build(setting: str, batch: int, layers: int, channels: int):
    from vqkit.models import VQVAE
    from vqkit.training.adversarial_step import AdversarialStep
    from vqkit.training.step import StepRunner
    from vqkit.training.tokenizer import TrainConfig

    torch.manual_seed(0)
    disc = {}
    if setting != "classic":
        disc = dict(disc_weight=0.8, disc_layers=layers, disc_channels=channels)
        disc["disc_start"] = 0 if setting == "discriminator on" else 10**9
    cfg = TrainConfig(quantizer="ema", num_embeddings=512, batch_size=batch, **disc)
    model = VQVAE(cfg.model_config(3, 32))
    cpu = torch.device("cpu")
    adv = AdversarialStep.build(cfg, model, 3, cpu)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    objective = None if adv is None else adv.objective
    runner = StepRunner(model, model, opt, cfg.step_options, cpu, objective)

    def step(x: torch.Tensor, i: int) -> None:
        if adv is None:
            runner(x, 0.06)
        else:
            adv.update(runner, x, 0.06, i)

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per setting and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--disc-layers", type=int, default=2)
    ap.add_argument("--disc-channels", type=int, default=64)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.rounds = 8, 2, 1
    torch.set_num_threads(1)
    meta = common.run_meta(MODULE, argv=argv)
    steps = {s: build(s, args.batch, args.disc_layers, args.disc_channels) for s in SETTINGS}
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32, generator=g) - 0.5
    times: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for s in SETTINGS:  # warm-up (first-call allocations)
        steps[s](x, 0)
    for _ in range(args.rounds):
        for s in SETTINGS:
            for i in range(args.steps):
                t0 = time.process_time()
                steps[s](x, i + 1)
                times[s].append(1000 * (time.process_time() - t0))
    common.finish_meta(meta)
    base = statistics.median(times["classic"])
    rows = []
    for s in SETTINGS:
        med = statistics.median(times[s])
        rows.append({"setting": s, "ms_per_step": med, "ratio": med / base, "n": len(times[s])})
    lines = [
        *common.meta_lines(meta),
        f"- batch {args.batch} x 3 x 32 x 32, classic VQ-VAE (EMA, K = 512); PatchGAN "
        f"{args.disc_layers} layers, {args.disc_channels} channels; CPU time per step "
        "(process_time, 1 thread), median over interleaved rounds",
        "",
        *common.md_table(
            ["setting", "CPU ms / step", "x classic", "steps timed"],
            [(r["setting"], f"{r['ms_per_step']:.0f}", f"{r['ratio']:.2f}", r["n"]) for r in rows],
        ),
    ]
    out = common.RESULTS_DIR / ("adversarial_step_quick" if args.quick else "adversarial_step")
    common.write_results(out, out.name, {**meta, "args": vars(args), "rows": rows}, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
