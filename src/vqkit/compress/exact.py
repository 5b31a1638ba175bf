"""The prior's exact twin: the coding probabilities in integer arithmetic, the same bits
on every CPU, kernel set, thread count, torch version and device.

:class:`ExactPrior` is built once from a trained autoregressive
:class:`vqkit.prior.Prior` (:meth:`ExactPrior.from_prior`) and computes what the float
prior computes, in fixed point with power-of-two scales (:mod:`.intmath`), in the manner
of integer networks for entropy models (Ballé, Johnston and Minnen, 2019) and
integer-only transformer inference (I-BERT, Kim et al. 2021):

* **Weights** are quantized once: each matrix to 16-bit integers with one power-of-two
  scale (``round(w * 2**f)``, f from the matrix's largest magnitude: exact operations
  on the float weights, so every machine derives the same integers); biases, norm
  gains and embeddings likewise at the scale of the sum they join.
* **Activations** are int64. The residual stream has RESIDUAL_BITS fractional bits;
  every matrix-product operand is clamped to ACT_BITS (QK_BITS for queries and keys)
  bits, at a scale chosen from a bound that is proved from the integer weights, so a
  clamp never binds on a well-formed input and the GEMM's float64 sums stay exact
  (:func:`.intmath.matmul`).
* **LayerNorm**: the row clamped to LN_BITS bits, integer mean and variance, the
  correctly rounded square root of the (exactly representable) float64 variance,
  truncated, and a floor division.
* **Attention**: the query weights carry ``log2(e) / sqrt(head_dim)``, so integer
  scores come out in log2 units; the softmax as :func:`.intmath.softmax_weights` (a
  table of ``2**-u``), probabilities with 15 fractional bits, their product with the
  values exact.
* **GELU**: :func:`.intmath.gelu` (a table of the normal CDF).
* **Output**: logits in log2 units with EXP_BITS fractional bits, turned into the range
  coder's integer frequencies by :func:`.intmath.frequencies`.

Every operation acts on one position (a row) at a time, and the sums inside a matrix
product are exact: a position's output does not depend on which other positions or maps
share its batch, or on whether the prefix came from a KV cache or a full pass. The
encoder may therefore run one teacher-forced pass where the decoder runs one position at
a time, and both get the same integers.

The twin is a deterministic function of the float prior's weights and of
:data:`ARITHMETIC` (this module's version): :meth:`ExactPrior.digest` hashes its integer
tensors, and a ``.vqz`` file names it (:mod:`.format`).
"""

from __future__ import annotations

import decimal
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from ..prior import KVCache
from . import intmath as im

__all__ = ["ARITHMETIC", "ExactPrior"]

ARITHMETIC = 1
"""Version of the arithmetic defined here; files record it (format ``model`` byte)."""
RESIDUAL_BITS = 16  # fractional bits of the residual stream
WEIGHT_BITS = 15  # |w| < 2**15
ACT_BITS = 22  # |operand| < 2**22 for products with weights (22 + 15 + log2(inner) <= 53)
QK_BITS = 20  # queries and keys: 20 + 20 + log2(head_dim) <= 53
PROB_BITS = 15  # attention probabilities sum to at most 2**15
LN_FRAC = 16  # fractional bits of the normalised value in LayerNorm
GEMM_LIMIT = 53


ROPE_BITS = 14  # fractional bits of the rotary tables


def _q(t: torch.Tensor, f: int, scale: float = 1.0) -> torch.Tensor:
    """``round(t * scale * 2**f)`` as int64. The float32 weights widen exactly, the one
    product by ``scale`` (a float64 made from decimal digits) is IEEE-754 correctly
    rounded, the power of two and the rounding are exact: every machine gets the same
    integers."""
    w = t.detach().double().cpu()
    if scale != 1.0:
        w = w * scale
    return torch.round(w * math.ldexp(1.0, f)).long()


def _maxabs(t: torch.Tensor, scale: float = 1.0) -> float:
    w = t.detach().double().cpu()
    return float((w * scale if scale != 1.0 else w).abs().max()) if t.numel() else 0.0


def _imax(t: torch.Tensor) -> int:
    return int(t.abs().max()) if t.numel() else 0


@dataclass
class Linear:
    """``y = x @ w.T + b`` on int64 operands: ``wt`` = ``w.T`` (in, out) float64 holding
    16-bit integers, ``b`` float64 holding the bias at the product's scale plus the
    rounding half of the output shift; the exact product (the bias added inside the
    GEMM: every partial sum an integer below 2**53) shifted right by ``shift`` (an int,
    or an int64 (out,) per column) and clamped to ``limit`` (None: no clamp)."""

    wt: torch.Tensor
    b: torch.Tensor
    shift: int | torch.Tensor
    limit: torch.Tensor | int | None

    @staticmethod
    def build(
        parts: list[tuple[torch.Tensor, torch.Tensor | None, float, int | None]],
        f_in: int,
        in_bound: int,
        f_out: int | None = None,
    ) -> tuple[Linear, list[tuple[int, int]]]:
        """A layer from row blocks ``(weight (o_i, in), bias (o_i,) or None, scale,
        out_bits)``: block i is ``scale * (x @ w_i.T + b_i)`` fitted into ``out_bits``
        bits (or, when ``f_out`` is given, brought to ``f_out`` fractional bits
        unclamped). ``in_bound``: |x| at ``f_in``. Returns the layer and each block's
        (fractional bits, |y| bound)."""
        width = parts[0][0].shape[1]
        if in_bound.bit_length() + WEIGHT_BITS + (width - 1).bit_length() > GEMM_LIMIT:
            raise UserError(f"a {width}-wide layer is too wide for the exact coding model")
        ws, bs, shifts, limits, formats = [], [], [], [], []
        for w, b, scale, out_bits in parts:
            f_w = im.frac_bits(_maxabs(w, scale), WEIGHT_BITS)
            wq = _q(w, f_w, scale)
            acc = f_in + f_w
            bq = _q(b, acc, scale) if b is not None else torch.zeros(w.shape[0], dtype=torch.long)
            acc_bound = int((wq.abs().sum(1) * in_bound + bq.abs()).max())
            if acc_bound.bit_length() >= GEMM_LIMIT - 1:  # the bias and rounding half too
                raise UserError(f"a {width}-wide layer is too wide for the exact coding model")
            if f_out is None:
                sh = max(0, im.bit_length(acc_bound) - out_bits)
                limits.append(torch.full((w.shape[0],), (1 << out_bits) - 1))
            else:
                sh = acc - f_out
                if sh < 0:
                    raise UserError("the exact coding model cannot represent this layer's output")
            ws.append(wq)
            bs.append(bq + ((1 << sh) >> 1))
            shifts.append(torch.full((w.shape[0],), sh))
            formats.append((acc - sh, (acc_bound >> sh) + 1))
        shift_t = torch.cat(shifts)
        same = bool((shift_t == shift_t[0]).all())
        shift: int | torch.Tensor = int(shift_t[0]) if same else shift_t
        limit = torch.cat(limits) if limits else None
        if limit is not None and bool((limit == limit[0]).all()):
            limit = int(limit[0])
        layer = Linear(torch.cat(ws).double().T.contiguous(), torch.cat(bs).double(), shift, limit)
        return layer, formats

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.addmm(self.b, x.reshape(-1, x.shape[-1]).double(), self.wt).long() >> self.shift
        y = y.view(*x.shape[:-1], -1)
        if isinstance(self.limit, int):
            return y.clamp_(-self.limit, self.limit)
        return y if self.limit is None else torch.maximum(torch.minimum(y, self.limit), -self.limit)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w": self.wt.T.long(), "b": self.b.long()}

    def to(self, device: torch.device) -> Linear:
        move = lambda t: t.to(device) if torch.is_tensor(t) else t  # noqa: E731
        return Linear(move(self.wt), move(self.b), move(self.shift), move(self.limit))


@dataclass
class LayerNorm:
    """Integer LayerNorm of int64 rows at RESIDUAL_BITS: out ``x̂ * gamma + beta`` fitted
    into ACT_BITS bits at ``f_out`` fractional bits.

    The input is clamped to ``ln_bits`` bits (a residual stream of magnitude up to
    ``2**(ln_bits - RESIDUAL_BITS)``: 512 at widths up to 1024; beyond it the clamp binds,
    the same way everywhere), so that the variance ``sum (x - mean)**2 // c`` stays
    below 2**52: its float64 conversion is exact and its square root, correctly rounded
    by IEEE-754, gives the same integer on every machine."""

    gamma: torch.Tensor  # int64, f_g fractional bits
    beta: torch.Tensor  # int64 at LN_FRAC + f_g, plus the output shift's rounding half
    eps: int  # eps * 2**(2 * RESIDUAL_BITS), rounded
    width: int
    ln_bits: int
    shift: int
    f_out: int
    bound: int

    @classmethod
    def build(cls, ln: torch.nn.LayerNorm) -> LayerNorm:
        c = ln.normalized_shape[-1]
        f_g = im.frac_bits(_maxabs(ln.weight), WEIGHT_BITS)
        gamma, beta = _q(ln.weight, f_g), _q(ln.bias, LN_FRAC + f_g)
        # |x̂| <= sqrt(c) + 1 with the floors (a true LayerNorm: sqrt(c - 1))
        xhat = (math.isqrt(c) + 2) << LN_FRAC
        acc_bound = xhat * _imax(gamma) + _imax(beta)
        s = max(0, im.bit_length(acc_bound) - ACT_BITS)
        eps = im.round_decimal(decimal.Decimal(ln.eps) * (1 << (2 * RESIDUAL_BITS)))
        # |d| < 2**(ln_bits + 1): the variance (a mean of d**2) < 2**52, the sum of
        # d**2 < 2**(52 + log2 c) < 2**63
        ln_bits = min(25, (60 - (c - 1).bit_length()) // 2)
        beta = beta + ((1 << s) >> 1)
        return cls(gamma, beta, eps, c, ln_bits, s, LN_FRAC + f_g - s, (acc_bound >> s) + 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        top = (1 << self.ln_bits) - 1
        x = x.clamp(-top, top)
        d = x - torch.div(x.sum(dim=-1, keepdim=True), self.width, rounding_mode="floor")
        var = torch.div((d * d).sum(dim=-1, keepdim=True), self.width, rounding_mode="floor")
        std = torch.sqrt((var + self.eps).double()).long().clamp_(min=1)
        xhat = torch.div(d << LN_FRAC, std, rounding_mode="floor")
        limit = (1 << ACT_BITS) - 1
        return (torch.addcmul(self.beta, xhat, self.gamma) >> self.shift).clamp_(-limit, limit)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"gamma": self.gamma, "beta": self.beta}

    def to(self, device: torch.device) -> LayerNorm:
        return LayerNorm(
            self.gamma.to(device),
            self.beta.to(device),
            self.eps,
            self.width,
            self.ln_bits,
            self.shift,
            self.f_out,
            self.bound,
        )


class Block:
    """One pre-norm block in integer arithmetic (see the module docstring)."""

    def __init__(self, block: Any, n_head: int, rope: tuple[torch.Tensor, ...] | None) -> None:
        c = block.ln1.normalized_shape[-1]
        self.n_head, self.head_dim = n_head, c // n_head
        self.ln1 = LayerNorm.build(block.ln1)
        w, b = block.attn.qkv.weight, block.attn.qkv.bias
        # queries carry the softmax's log2(e) / sqrt(head_dim): scores come out in log2
        # units. Queries and keys are one bit narrower when rotated (a rotated pair is at
        # most the sum of the pair's magnitudes).
        qk_bits = QK_BITS - (1 if rope is not None else 0)
        self.qkv, fmts = Linear.build(
            [
                (w[:c], b[:c], _score_scale(self.head_dim), qk_bits),
                (w[c : 2 * c], b[c : 2 * c], 1.0, qk_bits),
                (w[2 * c :], b[2 * c :], 1.0, ACT_BITS),
            ],
            self.ln1.f_out,
            self.ln1.bound,
        )
        (f_q, _), (f_k, _), (f_v, _) = fmts
        self.rope = rope
        self.score_shift = f_q + f_k - im.EXP_BITS
        if self.score_shift < 0:
            raise UserError("the exact coding model cannot resolve this prior's attention scores")
        self.proj, _ = Linear.build(
            [(block.attn.proj.weight, block.attn.proj.bias, 1.0, None)],
            f_v,
            (1 << ACT_BITS) - 1,
            f_out=RESIDUAL_BITS,
        )
        self.ln2 = LayerNorm.build(block.ln2)
        self.fc1, ((self.f_h, _),) = Linear.build(
            [(block.mlp[0].weight, block.mlp[0].bias, 1.0, ACT_BITS)],
            self.ln2.f_out,
            self.ln2.bound,
        )
        self.fc2, _ = Linear.build(
            [(block.mlp[2].weight, block.mlp[2].bias, 1.0, None)],
            self.f_h,
            (1 << ACT_BITS) - 1,
            f_out=RESIDUAL_BITS,
        )

    def _rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        assert self.rope is not None
        cos, sin = (t[start : start + x.shape[2]] for t in self.rope)
        x1, x2 = x.chunk(2, dim=-1)
        r = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return im.shift(r, ROPE_BITS)

    def _gelu(self, h: torch.Tensor) -> torch.Tensor:
        f = self.f_h
        if f >= im.PHI_BITS:
            return im.gelu(h, f)
        return im.shift(im.gelu(h << (im.PHI_BITS - f), im.PHI_BITS), im.PHI_BITS - f)

    def __call__(
        self, x: torch.Tensor, layer: int, cache: KVCache, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` (B, n, C) of positions ``[start, start + n)``, the cache holding
        ``[0, start)``. ``valid`` bool (n, start + n): the keys each new position sees
        (None: causal, keys ``<= start + i``)."""
        b, n, c = x.shape
        start, end = cache.length, cache.length + n
        qkv = self.qkv(self.ln1(x)).view(b, n, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, n, hd) each
        if self.rope is not None:
            q, k = self._rotate(q, start), self._rotate(k, start)
        keys, values = cache.update(layer, k, v)  # float64 holding integers
        scores = im.matmul(q, keys.transpose(-1, -2))
        y = im.shift(scores, self.score_shift)
        if valid is None and n > 1:  # position start + i sees keys 0 .. start + i
            valid = torch.arange(end, device=x.device) <= (
                start + torch.arange(n, device=x.device)[:, None]
            )
        e = im.softmax_weights(y, valid)
        p = torch.div(e << PROB_BITS, e.sum(dim=-1, keepdim=True), rounding_mode="floor")
        o = im.shift(im.matmul(p, values), PROB_BITS)
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(self._gelu(self.fc1(self.ln2(x))))

    def parts(self) -> dict[str, Any]:
        return {
            "ln1": self.ln1,
            "qkv": self.qkv,
            "proj": self.proj,
            "ln2": self.ln2,
            "fc1": self.fc1,
            "fc2": self.fc2,
        }


def _log2e() -> decimal.Decimal:
    ctx = im.decimal_context()
    return ctx.divide(1, ctx.ln(decimal.Decimal(2)))


def _score_scale(head_dim: int) -> float:
    """log2(e) / sqrt(head_dim) as the float64 nearest its decimal value."""
    ctx = im.decimal_context()
    return float(ctx.divide(_log2e(), ctx.sqrt(decimal.Decimal(head_dim))))


_LOG2E = float(_log2e())


class ExactPrior:
    """The integer twin of an autoregressive :class:`vqkit.prior.Prior` (module
    docstring). :meth:`extend` mirrors :meth:`Prior.extend` and returns logits in log2
    units (int64, EXP_BITS fractional bits); :meth:`frequencies` the coder's integer
    distributions. CPU by default; :meth:`to` moves it (the results do not change)."""

    KIND = "autoregressive"
    """The kind of prior this twin mirrors (:mod:`.exact_nextscale`: next-scale)."""
    MODEL = 1
    """The format's model byte of the files it codes (docs/format.md, "Model 1")."""

    def __init__(self, prior: Any) -> None:
        c = prior.config
        if c.kind != self.KIND:
            raise UserError(
                f"the exact coding model {self.MODEL} takes {self.KIND} priors; this prior "
                f"is {c.kind}"
            )
        self.config = c.to_dict()
        self.seq_len = int(prior.seq_len)
        self.vocab_size = int(c.vocab_size)
        self.null_class = int(prior.null_class)
        self.n_layer, self.n_head = int(c.n_layer), int(c.n_head)
        self.head_dim = int(c.n_embd) // self.n_head
        if self.vocab_size < 2 or self.vocab_size > (1 << 24) - 2:
            raise UserError(
                f"the coder takes 2 to 2**24 - 2 symbols; this prior has {self.vocab_size}"
            )
        with torch.no_grad():
            self.tok = _q(prior.tok_emb.weight, RESIDUAL_BITS)
            self.cls = _q(prior.cls_emb.weight, RESIDUAL_BITS)
            pos = prior.pos_emb
            self.pos = _q(pos.weight, RESIDUAL_BITS) if pos is not None else None
            rope = None
            if self.pos is None:
                rope = im.rope_tables(int(prior.n_pos), self.head_dim, bits=ROPE_BITS)
            self.blocks = [Block(b, self.n_head, rope) for b in prior.blocks]
            self.ln_f = LayerNorm.build(prior.ln_f)
            # the head carries log2(e): logits come out in log2 units, EXP_BITS bits
            self.head, _ = Linear.build(
                [(prior.head.weight, None, _LOG2E, None)],
                self.ln_f.f_out,
                self.ln_f.bound,
                f_out=im.EXP_BITS,
            )
        self.device = torch.device("cpu")

    @classmethod
    def from_prior(cls, prior: Any) -> ExactPrior:
        return cls(prior)

    def to(self, device: torch.device | str) -> ExactPrior:
        """Move the tensors (tables included, on first use) to ``device``."""
        device = torch.device(device)
        self.tok, self.cls = self.tok.to(device), self.cls.to(device)
        self.pos = self.pos.to(device) if self.pos is not None else None
        for b in self.blocks:
            for name, part in b.parts().items():
                setattr(b, name, part.to(device))
            if b.rope is not None:
                b.rope = tuple(t.to(device) for t in b.rope)
        self.ln_f, self.head = self.ln_f.to(device), self.head.to(device)
        self.device = device
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every integer tensor of the twin, by name (what :meth:`digest` hashes)."""
        out = {"tok": self.tok, "cls": self.cls}
        if self.pos is not None:
            out["pos"] = self.pos
        for i, b in enumerate(self.blocks):
            for name, part in b.parts().items():
                out.update({f"blocks.{i}.{name}.{k}": t for k, t in part.tensors().items()})
        out.update({f"ln_f.{k}": t for k, t in self.ln_f.tensors().items()})
        out.update({f"head.{k}": t for k, t in self.head.tensors().items()})
        return out

    def digest(self) -> str:
        """Hex SHA-256 of the arithmetic version, the config, every integer tensor and
        every scale: two twins with the same digest compute the same integers."""
        head: dict[str, Any] = {"arithmetic": ARITHMETIC, "config": self.config}
        if self.MODEL != 1:  # model 1's digest as it always was
            head["model"] = self.MODEL
        h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
        for name, t in sorted(self.tensors().items()):
            t = t.detach().cpu().contiguous().long()
            h.update(f"{name}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().astype("<i8").tobytes())
        scales = [_scales(b.parts()) + [b.score_shift, b.f_h] for b in self.blocks]
        h.update(json.dumps([scales, _scales({"ln_f": self.ln_f, "head": self.head})]).encode())
        return h.hexdigest()

    def new_cache(self, batch: int) -> KVCache:
        """The prior's :class:`~vqkit.prior.KVCache` in float64 (integers below 2**53:
        the attention products' operands as they are)."""
        n, h = self.n_layer, self.n_head
        return KVCache(n, batch, h, self.seq_len, self.head_dim, device=self.device,
                       dtype=torch.float64)  # fmt: skip

    @torch.inference_mode()
    def extend(
        self, codes: torch.Tensor, cache: KVCache, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """As :meth:`vqkit.prior.Prior.extend` with a cache: an empty cache takes ``[y,
        codes]`` and gives the log2-unit logits (B, L + 1, V) of ``c_0 .. c_L``; a cache
        holding m positions takes ``c_m .. c_{m+L-1}`` and gives (B, L, V)."""
        b, n = codes.shape
        start = cache.length
        x = self.tok[codes.to(self.device)]
        if start == 0:
            if labels is None:
                raise ValueError("the first extend needs the labels")
            x = torch.cat((self.cls[labels.to(self.device)][:, None], x), dim=1)
        end = start + x.shape[1]
        if end > self.seq_len:
            raise ValueError(f"{end} positions exceed the prior's sequence length {self.seq_len}")
        if self.pos is not None:
            x = x + self.pos[start:end]
        for i, block in enumerate(self.blocks):
            x = block(x, i, cache)
        cache.advance(end - start)
        return self.head(self.ln_f(x))

    @property
    def boundaries(self) -> list[int]:
        """Where the coding loops may cut the sequence: the decoder computes positions
        ``[b_i, b_{i+1})`` in one pass once the codes before ``b_i`` are known (here
        every position, one at a time: ``0 .. T``)."""
        return list(range(self.seq_len + 1))

    def logits_range(
        self, codes: torch.Tensor, cache: KVCache, labels: torch.Tensor, lo: int, hi: int
    ) -> torch.Tensor:
        """The log2-unit logits (B, hi - lo, V) of positions ``[lo, hi)`` of ``codes`` (B,
        T) (only ``c_<hi-1`` are read), the cache holding the first ``lo`` positions
        and advanced to ``hi``: :meth:`extend` of ``[y, c_0 .. c_{hi-2}]`` or of
        ``c_{lo-1} .. c_{hi-2}``."""
        if cache.length != lo or not lo < hi <= self.seq_len:
            raise ValueError(f"positions [{lo}, {hi}) after a cache of {cache.length}")
        if lo == 0:
            return self.extend(codes[:, : hi - 1], cache, labels)
        return self.extend(codes[:, lo - 1 : hi - 1], cache)

    @staticmethod
    def frequencies(logits: torch.Tensor) -> torch.Tensor:
        """The coder's integer weights (..., V) of log2-unit logits (see
        :func:`.intmath.frequencies`): symbol k gets ``w_k + 1`` of ``2**24``."""
        return im.frequencies(logits)


def _scales(parts: dict[str, Any]) -> list[Any]:
    """The shifts and limits of some parts, as JSON-able lists (hashed by the digest)."""
    out: list[Any] = []
    for p in parts.values():
        for v in (p.shift, getattr(p, "limit", None)):
            out.append(v.tolist() if torch.is_tensor(v) else v)
    return out
