"""Evidence for a trained prior: likelihood against no-context baselines, sample grids,
and a measured fidelity number from a small classifier (no Inception weights needed).

    python -m benchmarks.prior_fidelity evaluate --prior runs/c10-prior \\
        --out benchmarks/results/prior_cifar10 --classifier runs/c10-classifier.pt
    python -m benchmarks.prior_fidelity classifier --data PATH --out runs/c10-classifier.pt
    python -m benchmarks.prior_fidelity stack DIR0 DIR1 ... --out grid.png --labels a b ...

``evaluate`` reads a ``vqkit prior`` run (its tokenizer and the tokenizer's cached index
maps come from the checkpoint) and writes ``prior_fidelity.{md,json}`` and PNG grids:

1. **Likelihood**: the prior's NLL in bits per code on the whole test split (true
   labels, and the null class for a class-conditional prior), next to baselines that
   use no context: log2 K (uniform), the entropy of the training codes' unigram, the
   cross-entropy of the test codes under it (add-one smoothing), and the same with one
   unigram per class and one per position (raster index).
2. **Sample grids**: one row per class, ``--grid-cols`` samples each, for every sampling
   setting (temperature, top-k, guidance scale), class names on the left.
3. **Classifier accuracy**: a small CNN is trained on the real training split
   (``--clf-epochs`` epochs, random flips; or loaded from ``--classifier`` when the file
   exists, written there otherwise) and scores (c) real test images, (b) their
   reconstructions through the tokenizer (the ceiling a perfect prior could reach) and
   (a) ``--per-class`` class-conditional samples per class for each setting: accuracy =
   how often the classifier names the class the sample was drawn for. Also the
   classifier score exp(E_x KL(p(y|x) || p(y))) (Inception-score form, this classifier:
   at most the number of classes). All images are rounded to 8 bits first, as a saved
   PNG would be.

``classifier`` trains and saves the classifier alone (it needs no prior: ``evaluate
--classifier`` then loads it). ``stack`` tiles the ``grid.png`` of several ``vqkit
sample`` output directories (one row each, e.g. one per ``--class``) into one picture
with a label per row.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import finish_meta, md_table, meta_lines, run_meta, write_results

LN2 = math.log(2.0)
MODULE = "benchmarks.prior_fidelity"


# --------------------------------------------------------------------------- likelihood


def unigram_bits(train: torch.Tensor, test: torch.Tensor, vocab: int) -> dict[str, float]:
    """No-context baselines in bits per code from index maps (N, *code_shape):
    the entropy of the train and test unigrams, and the cross-entropy of the test codes
    under the train unigram with add-one smoothing."""
    ctr = torch.bincount(train.reshape(-1), minlength=vocab).double()
    cte = torch.bincount(test.reshape(-1), minlength=vocab).double()

    def entropy(c: torch.Tensor) -> float:
        p = c[c > 0] / c.sum()
        return float(-(p * p.log2()).sum())

    q = (ctr + 1) / (ctr.sum() + vocab)
    return {
        "uniform_bits": math.log2(vocab),
        "train_unigram_entropy_bits": entropy(ctr),
        "test_unigram_entropy_bits": entropy(cte),
        "test_xent_train_unigram_bits": float(-(cte * q.log2()).sum() / cte.sum()),
        "codes_used_train": int((ctr > 0).sum()),
        "codes_used_test": int((cte > 0).sum()),
    }


def grouped_unigram_xent(
    train: torch.Tensor,
    train_groups: torch.Tensor,
    test: torch.Tensor,
    test_groups: torch.Tensor,
    vocab: int,
) -> float:
    """Cross-entropy (bits per code) of test codes (n,) under one add-one-smoothed
    unigram per group, counted on the train codes (m,) and their groups."""
    g = int(max(train_groups.max(), test_groups.max())) + 1
    counts = torch.zeros(g, vocab, dtype=torch.float64)
    counts.index_put_(
        (train_groups, train), torch.ones(len(train), dtype=torch.float64), accumulate=True
    )
    logq = ((counts + 1) / (counts.sum(1, keepdim=True) + vocab)).log2()
    return float(-logq[test_groups, test].mean())


@torch.no_grad()
def prior_bits(
    model: Any, codes: torch.Tensor, labels: torch.Tensor | None, batch_size: int = 250
) -> float:
    """Mean -log2 p(c_t | c_<t, y) over all codes (eval mode); labels None: null class."""
    total = 0.0
    n = codes.shape[0]
    for i in range(0, n, batch_size):
        y = None if labels is None else labels[i : i + batch_size]
        total += float(-model.log_prob(codes[i : i + batch_size], y).double().sum())
    return total / (n * model.seq_len) / LN2


# --------------------------------------------------------------------------- classifier


class SmallCNN(nn.Module):
    """Three conv blocks (32, 64, 128 channels; BatchNorm, ReLU, 2x2 max-pool), global
    average pooling and a linear layer: about 0.1 M parameters."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for w in (32, 64, 128):
            layers += [
                nn.Conv2d(c, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def train_classifier(
    images: Any, epochs: int, batch_size: int, lr: float, seed: int, log: Any = print
) -> tuple[SmallCNN, dict[str, Any]]:
    """Train :class:`SmallCNN` on an ImageData split: AdamW, one-cycle schedule, random
    horizontal flips. Returns the model (eval mode) and a record of the run."""
    from vqkit.data import normalize

    torch.manual_seed(seed)
    model = SmallCNN(images.channels, images.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    n = len(images)
    steps_per_epoch = n // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    losses = []
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        correct = seen = 0
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            x, y = normalize(images.images[idx]), images.labels[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
            losses.append(float(loss.detach()))
        log(
            f"classifier epoch {epoch + 1}/{epochs}: loss {np.mean(losses[-steps_per_epoch:]):.3f}"
            f" train acc {correct / seen:.3f} ({time.perf_counter() - t0:.0f} s)"
        )
    model.eval()
    rec = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_images": n,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": time.perf_counter() - t0,
        "final_epoch_loss": float(np.mean(losses[-steps_per_epoch:])),
        "final_epoch_train_acc": correct / seen,
    }
    return model, rec


def save_classifier(path: Path, model: SmallCNN, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "record": json.dumps(record)}, path)


def load_classifier(path: Path, channels: int, num_classes: int) -> tuple[SmallCNN, dict[str, Any]]:
    """A classifier written by :func:`save_classifier` (eval mode) and its record."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = SmallCNN(channels, num_classes)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), {**json.loads(saved["record"]), "loaded_from": str(path)}


@torch.no_grad()
def classify(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Class probabilities (N, classes) of images (N, C, H, W) in [-0.5, 0.5]."""
    return torch.cat(
        [torch.softmax(model(x[i : i + batch_size]), 1) for i in range(0, len(x), batch_size)]
    )


def scores(probs: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Accuracy, per-class accuracy, classifier score exp(E KL(p(y|x) || p(y))) and the
    entropy of the predicted-class histogram (bits; log2 C when balanced)."""
    pred = probs.argmax(1)
    hit = (pred == target).double()
    per_class = [
        float(hit[target == c].mean()) if bool((target == c).any()) else None
        for c in range(num_classes)
    ]
    p = probs.double().clamp_min(1e-12)
    marg = p.mean(0)
    kl = (p * (p.log() - marg.log())).sum(1).mean()
    hist = torch.bincount(pred, minlength=num_classes).double()
    hist = hist[hist > 0] / hist.sum()
    return {
        "n": len(target),
        "accuracy": float(hit.mean()),
        "per_class_accuracy": per_class,
        "classifier_score": float(kl.exp()),
        "predicted_class_entropy_bits": max(0.0, float(-(hist * hist.log2()).sum())),
    }


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """[-0.5, 0.5] floats rounded to the 256 levels a PNG stores (clamped)."""
    return ((x.float() + 0.5).clamp(0, 1) * 255).round() / 255 - 0.5


# --------------------------------------------------------------------------- pictures


def labelled_grid(
    panels: list[tuple[str, torch.Tensor]], labels: list[str], cols: int, path: Path, scale: int = 2
) -> None:
    """One PNG: panels side by side, each a title over a grid of ``len(labels)`` rows of
    ``cols`` images (the panel's images (rows * cols, C, H, W), row-major), the row
    labels on the left."""
    from PIL import Image, ImageDraw

    from vqkit.evaluation.plots import image_grid

    font_h = 11
    pics = []
    for _, imgs in panels:
        rows = [imgs[r * cols : (r + 1) * cols] for r in range(len(labels))]
        g = image_grid(rows)
        im = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g).convert("RGB")
        pics.append(im.resize((im.width * scale, im.height * scale), Image.NEAREST))
    draw0 = ImageDraw.Draw(pics[0])
    label_w = max(int(draw0.textlength(s)) for s in labels) + 8
    title_h = font_h + 8
    gap = 12
    width = label_w + sum(p.width for p in pics) + gap * (len(pics) - 1)
    height = title_h + max(p.height for p in pics)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    row_h = pics[0].height / len(labels)
    for r, s in enumerate(labels):
        draw.text((4, title_h + int((r + 0.5) * row_h) - font_h // 2), s, fill="black")
    x = label_w
    for (title, _), pic in zip(panels, pics, strict=True):
        canvas.paste(pic, (x, title_h))
        draw.text((x + 2, 3), title, fill="black")
        x += pic.width + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


# --------------------------------------------------------------------------- evaluate


def parse_setting(spec: str) -> dict[str, Any]:
    """``T:S`` or ``T:S:K`` -> temperature T, guidance scale S, top-k K (optional)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"setting {spec!r}: expected T:S or T:S:K")
    out = {"temperature": float(parts[0]), "cfg_scale": float(parts[1]), "top_k": None}
    if len(parts) == 3:
        out["top_k"] = int(parts[2])
    return out


def setting_name(s: dict[str, Any]) -> str:
    name = f"t{s['temperature']:g}_cfg{s['cfg_scale']:g}"
    return name + (f"_k{s['top_k']}" if s["top_k"] else "")


def setting_title(s: dict[str, Any]) -> str:
    t = f"T={s['temperature']:g}, cfg={s['cfg_scale']:g}"
    return t + (f", top-k={s['top_k']}" if s["top_k"] else "")


@torch.no_grad()
def decode(tok: Any, codes: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    return torch.cat(
        [tok.model.decode(codes[i : i + batch_size]) for i in range(0, len(codes), batch_size)]
    )


@torch.no_grad()
def reconstruct(tok: Any, x: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Images (N, C, H, W) in [-0.5, 0.5] through the tokenizer (encode, decode), 8-bit."""
    return torch.cat(
        [
            to_8bit(tok.model.decode(tok.model.encode(x[i : i + batch_size])))
            for i in range(0, len(x), batch_size)
        ]
    )


def evaluate(args: argparse.Namespace) -> int:
    from vqkit.data import load_dataset, normalize
    from vqkit.prior.codes import load_codes, load_tokenizer
    from vqkit.prior.loading import load_prior

    if args.threads:
        torch.set_num_threads(args.threads)
    meta = run_meta(MODULE, args.note)
    meta["threads"] = torch.get_num_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    model, ckpt = load_prior(args.prior, args.checkpoint)
    stored = ckpt["tokenizer"]
    tok = load_tokenizer(
        stored["run_dir"], checkpoint=stored["checkpoint"], expect_sha256=stored["sha256"]
    )
    train_codes, test_codes, cached = load_codes(tok)
    classes = list(ckpt.get("classes", []))
    cfg = model.config
    vocab = cfg.vocab_size
    log(
        f"prior step {ckpt['step']} ({model.num_params() / 1e6:.2f} M params), codes "
        f"{tuple(train_codes.code_shape)} K={vocab}, {len(train_codes)} train / "
        f"{len(test_codes)} test ({'cached' if cached else 'encoded'})"
    )

    # 1. likelihood
    t = time.perf_counter()
    lik: dict[str, Any] = unigram_bits(train_codes.codes, test_codes.codes, vocab)
    tr_seq, te_seq = train_codes.sequences(), test_codes.sequences()
    t_len = tr_seq.shape[1]
    pos_tr = torch.arange(t_len).repeat(len(tr_seq))
    pos_te = torch.arange(t_len).repeat(len(te_seq))
    lik["test_xent_position_unigram_bits"] = grouped_unigram_xent(
        tr_seq.reshape(-1), pos_tr, te_seq.reshape(-1), pos_te, vocab
    )
    if classes:
        lik["test_xent_class_unigram_bits"] = grouped_unigram_xent(
            tr_seq.reshape(-1),
            train_codes.labels.repeat_interleave(t_len),
            te_seq.reshape(-1),
            test_codes.labels.repeat_interleave(t_len),
            vocab,
        )
    cond = cfg.num_classes > 0
    te_y = test_codes.labels if cond else None
    lik["prior_test_bits"] = prior_bits(model, te_seq, te_y)
    n_tr = min(len(tr_seq), args.train_nll_sequences or len(tr_seq))
    # evenly strided: image-folder splits are sorted by class
    sub = torch.linspace(0, len(tr_seq) - 1, n_tr).round().long()
    lik["prior_train_bits"] = prior_bits(
        model, tr_seq[sub], train_codes.labels[sub] if cond else None
    )
    lik["prior_train_sequences"] = n_tr
    if cond and cfg.class_dropout > 0:
        lik["prior_test_bits_null_class"] = prior_bits(model, te_seq, None)
    lik["codes_per_image"] = t_len
    timing["likelihood_s"] = time.perf_counter() - t
    log("likelihood: " + ", ".join(f"{k} {v:.4f}" for k, v in lik.items() if isinstance(v, float)))

    # 2. samples, per class, for every setting
    settings = args.settings
    per_class = max(args.per_class, args.grid_cols) if classes else 0
    samples: dict[str, torch.Tensor] = {}
    sample_codes: dict[str, torch.Tensor] = {}
    t = time.perf_counter()
    if classes:
        labels = torch.arange(len(classes)).repeat_interleave(per_class)
        for s in settings:
            g = torch.Generator().manual_seed(args.seed)
            ts = time.perf_counter()
            codes = model.sample(
                len(labels),
                labels=labels,
                generator=g,
                batch_size=args.sample_batch,
                temperature=s["temperature"],
                cfg_scale=s["cfg_scale"],
                top_k=s["top_k"],
            )
            sample_codes[setting_name(s)] = codes
            samples[setting_name(s)] = to_8bit(decode(tok, codes))
            log(f"sampled {len(labels)} ({setting_title(s)}) in {time.perf_counter() - ts:.0f} s")
    timing["sampling_s"] = time.perf_counter() - t

    # grids: the first grid_cols samples of each class
    grid_files = []
    if classes:
        cols = args.grid_cols
        first = torch.cat(
            [torch.arange(c * per_class, c * per_class + cols) for c in range(len(classes))]
        )
        for s in settings:
            name = setting_name(s)
            path = out / f"samples_{name}.png"
            labelled_grid([(setting_title(s), samples[name][first])], classes, cols, path)
            grid_files.append(path.name)
        panels = [
            (setting_title(s), samples[setting_name(s)][first])
            for s in settings[: args.figure_panels]
        ]
        if args.figure:
            fig = Path(args.figure)
            labelled_grid(panels, classes, cols, fig)
            shutil.copyfile(fig, out / fig.name)
            grid_files.append(fig.name)
        # the sample codes' own unigram entropy: a collapse check
        for name, codes in sample_codes.items():
            cnt = torch.bincount(codes.reshape(-1), minlength=vocab).double()
            p = cnt[cnt > 0] / cnt.sum()
            lik.setdefault("sample_unigram_entropy_bits", {})[name] = float(-(p * p.log2()).sum())

    # 3. classifiers
    fid: dict[str, Any] = {}
    if classes and not args.no_classifier:
        data = args.data or tok.run_config.get("train", {}).get("data")
        opts = {"image_size": tok.model.config.image_size, "channels": tok.model.config.in_channels}
        train_img = load_dataset(data, "train", **opts)
        test_img = load_dataset(data, "test", **opts)
        log(f"data {data or 'builtin'}: {len(train_img)} train / {len(test_img)} test images")
        fid["data"] = str(data or "builtin")
        fid["classifiers"] = []
        real = normalize(test_img.images)
        y = test_img.labels
        t = time.perf_counter()
        recon = reconstruct(tok, real)
        timing["reconstruct_s"] = time.perf_counter() - t
        nc = len(classes)
        for spec in args.classifier or [None]:
            clf_path = Path(spec) if spec else None
            if clf_path and clf_path.is_file():
                clf, clf_rec = load_classifier(clf_path, train_img.channels, nc)
                log(f"classifier loaded from {clf_path}")
            else:
                clf, clf_rec = train_classifier(
                    train_img, args.clf_epochs, args.clf_batch, args.clf_lr, args.seed, log
                )
                clf_rec["data"] = str(data or "builtin")
                if clf_path:
                    save_classifier(clf_path, clf, clf_rec)
            rows = {
                "real test images": scores(classify(clf, real), y, nc),
                "tokenizer reconstructions of them": scores(classify(clf, recon), y, nc),
            }
            for st in settings:
                name = setting_name(st)
                rows[f"samples, {setting_title(st)}"] = {
                    **scores(classify(clf, samples[name]), labels, nc),
                    "setting": st,
                }
            fid["classifiers"].append({"classifier": clf_rec, "rows": rows})
            log("accuracy: " + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in rows.items()))
        timing["classifier_s"] = time.perf_counter() - t - timing["reconstruct_s"]

    finish_meta(meta)
    timing["total_s"] = time.perf_counter() - t0
    record = {
        "meta": meta,
        "prior_dir": str(Path(args.prior).resolve()),
        "prior_step": ckpt["step"],
        "prior_config": cfg.to_dict(),
        "prior_train_config": ckpt["train_config"],
        "prior_params": model.num_params(),
        "tokenizer": {k: v for k, v in stored.items() if k != "model_config"},
        "classes": classes,
        "likelihood": lik,
        "settings": settings,
        "per_class": per_class,
        "seed": args.seed,
        "grids": grid_files,
        "fidelity": fid,
        "timing_s": timing,
    }
    md = report_lines(record, args.title)
    path = write_results(out, "prior_fidelity", record, md)
    print("\n".join(md))
    print(f"written: {path} and {path.with_suffix('.json')}")
    return 0


def report_lines(rec: dict[str, Any], title: str) -> list[str]:
    """The Markdown of an ``evaluate`` record."""
    meta, lik, cfg = rec["meta"], rec["likelihood"], rec["prior_config"]
    tcfg = rec["prior_train_config"]
    k = cfg["vocab_size"]
    shape = " x ".join(map(str, cfg["code_shape"]))
    lines = [
        f"# {title}",
        "",
        *meta_lines(meta),
        f"- torch threads: {meta['threads']}",
        f"- prior: `{rec['prior_dir']}` at step {rec['prior_step']}: {cfg['n_layer']} "
        f"layers, width {cfg['n_embd']}, {cfg['n_head']} heads, {cfg['pos']} positions, "
        f"{rec['prior_params'] / 1e6:.2f} M parameters, class dropout "
        f"{cfg['class_dropout']}; trained {tcfg['steps']} steps of batch "
        f"{tcfg['batch_size']}, lr {tcfg['lr']}",
        f"- tokenizer: `{rec['tokenizer']['run_dir']}` ({rec['tokenizer']['checkpoint']}, "
        f"sha256 {rec['tokenizer']['sha256'][:12]}...), {shape} codes of K = {k}",
        "",
        "## Likelihood (bits per code, whole test split)",
        "",
    ]
    rows = [
        ["uniform over K (log2 K)", f"{lik['uniform_bits']:.3f}"],
        ["train unigram entropy (no context)", f"{lik['train_unigram_entropy_bits']:.3f}"],
        ["test unigram entropy", f"{lik['test_unigram_entropy_bits']:.3f}"],
        [
            "test cross-entropy under the train unigram",
            f"{lik['test_xent_train_unigram_bits']:.3f}",
        ],
        ["... one unigram per position", f"{lik['test_xent_position_unigram_bits']:.3f}"],
    ]
    if "test_xent_class_unigram_bits" in lik:
        rows.append(["... one unigram per class", f"{lik['test_xent_class_unigram_bits']:.3f}"])
    if "prior_test_bits_null_class" in lik:
        rows.append(
            ["prior, null class (unconditional)", f"{lik['prior_test_bits_null_class']:.3f}"]
        )
    rows.append(
        [
            "**prior, true class**" if rec["classes"] else "**prior**",
            f"**{lik['prior_test_bits']:.3f}**",
        ]
    )
    rows.append(
        [
            f"prior on {lik['prior_train_sequences']} train sequences (evenly strided)",
            f"{lik['prior_train_bits']:.3f}",
        ]
    )
    t = lik["codes_per_image"]
    lines += md_table(["model", "bits per code"], rows)
    lines += [
        "",
        f"Bits per image = bits per code x {t}: the prior needs "
        f"{lik['prior_test_bits'] * t:.0f} bits for a test image's codes, against "
        f"{lik['test_xent_train_unigram_bits'] * t:.0f} under the unigram and "
        f"{lik['uniform_bits'] * t:.0f} stored raw. Codes used: "
        f"{lik['codes_used_train']} of {k} (train), {lik['codes_used_test']} (test).",
    ]
    if lik.get("sample_unigram_entropy_bits"):
        ent = ", ".join(f"{n} {v:.3f}" for n, v in lik["sample_unigram_entropy_bits"].items())
        lines += [f"Unigram entropy of the sampled codes (bits): {ent}."]
    fid = rec["fidelity"]
    for block in fid.get("classifiers", []):
        lines += classifier_lines(rec, block)
    if rec["grids"]:
        lines += [
            "",
            "Sample grids (one row per class, in label order): "
            + ", ".join(f"`{g}`" for g in rec["grids"]),
        ]
    tm = rec["timing_s"]
    lines += ["", "Wall time (s): " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in tm.items())]
    return lines


def classifier_lines(rec: dict[str, Any], block: dict[str, Any]) -> list[str]:
    """The Markdown of one classifier's accuracy tables."""
    c, res = block["classifier"], block["rows"]
    on_recon = c.get("trained_on") == "reconstructions"
    what = "the tokenizer's reconstructions of the" if on_recon else "the"
    how = f"loaded from `{c['loaded_from']}`" if "loaded_from" in c else "trained now"
    lines = [
        "",
        "## Classifier accuracy, classifier trained on "
        + ("tokenizer reconstructions" if on_recon else "real images"),
        "",
        f"A small CNN ({c['params'] / 1e3:.0f} k parameters, 3 conv blocks) trained "
        f"{c['epochs']} epochs on {what} {c['train_images']} real training images "
        f"(batch {c['batch_size']}, AdamW one-cycle lr {c['lr']}, random flips; "
        f"{c['train_seconds']:.0f} s, {how}). Samples: {rec['per_class']} per class "
        f"(seed {rec['seed']}); accuracy = the classifier names the class the sample "
        f"was drawn for. Classifier score = exp(E KL(p(y|x) \\|\\| p(y))) with this "
        f"classifier (Inception-score form; at most {len(rec['classes'])}).",
    ]
    if "command" in c:
        lines += [
            "",
            f"Classifier trained by `{c['command']}` (commit {c['git_commit']}, {c['date_utc']}).",
        ]
    rows = [
        [
            name,
            r["n"],
            f"{100 * r['accuracy']:.1f}%",
            f"{r['classifier_score']:.2f}",
            f"{r['predicted_class_entropy_bits']:.2f}",
        ]
        for name, r in res.items()
    ]
    lines += [
        "",
        *md_table(
            ["images", "n", "accuracy", "classifier score", "predicted-class entropy (bits)"], rows
        ),
    ]
    names = list(res)
    short = ["real", "recon"] + [n.replace("samples, ", "") for n in names[2:]]
    per = [
        [cls] + [f"{100 * res[n]['per_class_accuracy'][i]:.0f}" for n in names]
        for i, cls in enumerate(rec["classes"])
    ]
    return lines + ["", "Accuracy by class (%):", "", *md_table(["class", *short], per)]


# --------------------------------------------------------------------------- classifier command


def classifier(args: argparse.Namespace) -> int:
    """Train the classifier alone (it needs no prior) and save it for ``evaluate``."""
    from vqkit.data import load_dataset, normalize

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    meta = run_meta(MODULE)
    opts = {"image_size": args.image_size, "channels": args.channels}
    train_img = load_dataset(args.data, "train", **opts)
    test_img = load_dataset(args.data, "test", **opts)
    log(f"data {args.data or 'builtin'}: {len(train_img)} train / {len(test_img)} test images")
    real_test = normalize(test_img.images)
    extra: dict[str, Any] = {"trained_on": "real images"}
    if args.on_recon:
        from dataclasses import replace

        from vqkit.data import denormalize
        from vqkit.prior.codes import load_tokenizer

        tok = load_tokenizer(args.on_recon)
        recon = reconstruct(tok, normalize(train_img.images))
        train_img = replace(train_img, images=denormalize(recon))
        recon_test = reconstruct(tok, real_test)
        extra = {
            "trained_on": "reconstructions",
            "tokenizer": str(tok.checkpoint),
            "tokenizer_sha256": tok.sha256,
        }
        log(f"reconstructed the splits through {tok.checkpoint}")
    clf, rec = train_classifier(
        train_img, args.clf_epochs, args.clf_batch, args.clf_lr, args.seed, log
    )
    nc = test_img.num_classes
    rec["test_accuracy"] = scores(classify(clf, real_test), test_img.labels, nc)["accuracy"]
    if args.on_recon:
        rec["test_recon_accuracy"] = scores(classify(clf, recon_test), test_img.labels, nc)[
            "accuracy"
        ]
    finish_meta(meta)
    rec.update(
        extra,
        data=str(args.data or "builtin"),
        command=meta["command"],
        git_commit=meta["git_commit"],
        date_utc=meta["date_utc"],
        threads=torch.get_num_threads(),
    )
    save_classifier(Path(args.out), clf, rec)
    log(
        f"test accuracy {rec['test_accuracy']:.4f} (real), "
        f"{rec.get('test_recon_accuracy', float('nan')):.4f} (reconstructions); "
        f"written {args.out}"
    )
    return 0


def report(args: argparse.Namespace) -> int:
    """Rewrite ``prior_fidelity.md`` from its ``.json`` (after a change of the layout)."""
    path = Path(args.json)
    rec = json.loads(path.read_text())
    title = args.title or path.with_suffix(".md").read_text().splitlines()[0].lstrip("# ")
    path.with_suffix(".md").write_text("\n".join(report_lines(rec, title)) + "\n")
    print(f"written {path.with_suffix('.md')}")
    return 0


# --------------------------------------------------------------------------- stack


def stack(args: argparse.Namespace) -> int:
    """Tile the ``grid.png`` of ``vqkit sample`` output directories, one row each."""
    from PIL import Image, ImageDraw

    pics = [Image.open(Path(d) / "grid.png").convert("RGB") for d in args.dirs]
    labels = args.labels or [Path(d).name for d in args.dirs]
    if len(labels) != len(pics):
        raise SystemExit(f"{len(labels)} labels for {len(pics)} directories")
    draw0 = ImageDraw.Draw(pics[0])
    label_w = max(int(draw0.textlength(s)) for s in labels) + 8
    width = label_w + max(p.width for p in pics)
    canvas = Image.new("RGB", (width, sum(p.height for p in pics)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for s, p in zip(labels, pics, strict=True):
        canvas.paste(p, (label_w, y))
        draw.text((4, y + p.height // 2 - 5), s, fill="black")
        y += p.height
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"{len(pics)} rows -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("evaluate", help="likelihood, sample grids, classifier accuracy")
    e.add_argument("--prior", required=True, help="vqkit prior run directory")
    e.add_argument("--checkpoint", choices=("best", "last"), default=None)
    e.add_argument("--out", required=True, help="results directory")
    e.add_argument("--title", default="Prior: likelihood and fidelity")
    e.add_argument(
        "--settings",
        type=parse_setting,
        nargs="+",
        default=[parse_setting(s) for s in ("1:1", "0.8:1", "1:3")],
        help="sampling settings T:S[:K] (temperature, guidance scale, top-k)",
    )
    e.add_argument("--per-class", type=int, default=100, help="samples per class and setting")
    e.add_argument("--grid-cols", type=int, default=10, help="samples per row of the grids")
    e.add_argument(
        "--figure",
        default=None,
        help="also write the first --figure-panels grids side by side here",
    )
    e.add_argument("--figure-panels", type=int, default=2)
    e.add_argument("--sample-batch", type=int, default=250)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument(
        "--train-nll-sequences",
        type=int,
        default=10000,
        help="train sequences for the train NLL, evenly strided (0: all)",
    )
    e.add_argument("--data", default=None, help="classifier data (default: the tokenizer's)")
    e.add_argument(
        "--classifier",
        nargs="+",
        default=None,
        help="classifier weights: loaded when the file exists, else trained on "
        "the real images and written; several: one table each",
    )
    e.add_argument("--no-classifier", action="store_true")
    e.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    e.add_argument("--note", default=None)
    c = sub.add_parser("classifier", help="train the classifier alone, for evaluate")
    c.add_argument("--data", default=None, help="dataset (default: the built-in one)")
    c.add_argument("--out", required=True, help="weights file to write")
    c.add_argument("--image-size", type=int, default=None)
    c.add_argument("--channels", type=int, default=None)
    c.add_argument(
        "--on-recon",
        metavar="RUN_DIR",
        default=None,
        help="train on the reconstructions of this tokenizer run instead",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    for p in (e, c):
        p.add_argument("--clf-epochs", type=int, default=3)
        p.add_argument("--clf-batch", type=int, default=128)
        p.add_argument("--clf-lr", type=float, default=3e-3)
    r = sub.add_parser("report", help="rewrite prior_fidelity.md from its .json")
    r.add_argument("json")
    r.add_argument("--title", default=None, help="default: the .md's current title")
    s = sub.add_parser("stack", help="tile vqkit sample grids, one row per directory")
    s.add_argument("dirs", nargs="+")
    s.add_argument("--out", required=True)
    s.add_argument("--labels", nargs="+", default=None)
    args = ap.parse_args(argv)
    commands = {"evaluate": evaluate, "classifier": classifier, "report": report, "stack": stack}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
