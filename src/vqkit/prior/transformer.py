"""An autoregressive prior over a tokenizer's codes: a decoder-only transformer.

An image's index map (h, w), or (h, w, Q) for residual codes, is read in raster order
(row by row, and the Q stages of a position one after the other) as a sequence
``c_0 .. c_{T-1}``, T = h * w (* Q), of tokens in ``{0 .. V-1}``. The prior factorises

    p(c | y) = prod_t p(c_t | c_<t, y)

where ``y`` is a class label or the learned *null* class (unconditional). The input
sequence is ``[y, c_0, .., c_{T-2}]``: the class token takes position 0, so the output
at position t is the distribution of ``c_t``; an unconditional prior (no classes) has
only the null class, which then plays the part of a start token.

Blocks are pre-norm (GPT-2): ``x += attn(ln(x)); x += mlp(ln(x))``, with causal
self-attention through :func:`torch.nn.functional.scaled_dot_product_attention`.
Positions: learned embeddings added to the input, or rotary embeddings (RoPE) applied
to queries and keys. The output head shares its weight with the token embedding
(``tie_weights``). Training with ``class_dropout = p`` replaces each label by the null
class with probability p, so that one model gives both terms of classifier-free
guidance (:func:`vqkit.prior.sampling.guide`).

Decoding keeps every layer's keys and values in a :class:`KVCache`, so each new code
costs one position's work instead of a pass over the whole prefix.

The masked kind (``config.kind == "masked"``, MaskGIT, Chang et al. 2022) is the same
module with the other attention pattern: every position sees every other
(bidirectional), the input is ``[y, x_0 .. x_{T-1}]`` where ``x_t`` is the embedding of
``c_t``, or the learned mask embedding where ``c_t`` is hidden, and the output at
position ``t + 1`` is the distribution of ``c_t`` given the visible codes and ``y``
(:meth:`Prior.fill`). It has T + 1 positions (one more position embedding) and one more
parameter vector (the mask embedding) than the autoregressive kind of the same size;
training, the schedules and iterative decoding are in :mod:`vqkit.prior.masked`.

The next-scale kind (``config.kind == "next-scale"``, VAR, Tian et al. 2024) is the same
module over a multi-scale tokenizer's ``(L,)`` codes with block-causal attention (a
scale sees itself and the coarser ones), inputs made of the coarser scales' codes and one
more embedding table (the scale embedding); its inputs, mask and S-pass sampling are in
:mod:`vqkit.prior.nextscale`, which :meth:`Prior.forward` (so also :meth:`Prior.loss`
and :meth:`Prior.log_prob`) and :meth:`Prior.sample` hand it to.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import nextscale
from .config import PriorConfig
from .masked import decode
from .pretrained import PretrainedPrior
from .sampling import PAD, SampleOptions, flatten_codes, sample

__all__ = ["KVCache", "Prior"]


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32 for the softmax; float32/64 as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated.

    ``k``, ``v``: (n_layer, B, n_head, max_len, head_dim); positions ``[0, length)`` are
    filled. Each layer writes the new positions with :meth:`update`; the model then
    moves ``length`` on with :meth:`advance`.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, n_head, L, head_dim) keys/values at ``[length, length + L)`` and
        return all of this layer's keys/values so far, (B, n_head, length + L, head_dim)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, ...]:
    """cos, sin (seq_len, head_dim / 2) of the angles ``pos * base^(-2i / head_dim)``."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs ``(x_i, x_{i + d/2})`` of (B, H, L, d) by their position's angles
    (cos, sin: (L, d/2)). A query at position m and a key at n then score by a function
    of ``m - n`` only."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class SelfAttention(nn.Module):
    """Multi-head attention: position t sees positions <= t (causal, the autoregressive
    kind) or every position (bidirectional, the masked kind); the only difference
    between the two kinds' blocks."""

    def __init__(self, c: PriorConfig, layer: int) -> None:
        super().__init__()
        self.causal = c.kind == "autoregressive"
        self.layer = layer
        self.n_head = c.n_head
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.proj = nn.Linear(c.n_embd, c.n_embd)
        self.dropout = c.dropout
        self.resid_drop = nn.Dropout(c.dropout)

    def forward(
        self,
        x: torch.Tensor,
        start: int,
        cache: KVCache | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``mask``: bool (n, start + n), True where a new position attends to a key (the
        next-scale kind's block-causal rows); None: the kind's own pattern."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (B, L, C) -> (B, H, L, C/H)
        q, k, v = (t.view(b, n, self.n_head, c // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            cos, sin = rope[0][start : start + n], rope[1][start : start + n]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        s = k.shape[2]  # positions attended to: start + n
        p = self.dropout if self.training else 0.0
        if mask is not None:  # the rows of an explicit pattern (next-scale: block-causal)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        elif not self.causal:  # bidirectional: every position sees every position
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        elif s == n:  # no past: the plain causal mask
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        elif n == 1:  # one new position sees the whole past and itself
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:  # a chunk after a past: is_causal would align the mask top-left, so spell it
            mask = torch.arange(s, device=x.device)[None, :] <= (
                start + torch.arange(n, device=x.device)[:, None]
            )
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(b, n, c)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, c: PriorConfig, layer: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(c.n_embd)
        self.attn = SelfAttention(c, layer)
        self.ln2 = nn.LayerNorm(c.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(c.n_embd, 4 * c.n_embd),
            nn.GELU(),
            nn.Linear(4 * c.n_embd, c.n_embd),
            nn.Dropout(c.dropout),
        )

    def forward(self, x: torch.Tensor, *where: Any) -> torch.Tensor:
        """``x`` (B, n, C); ``where``: (start, cache, rope[, mask]), for :class:`SelfAttention`."""
        x = x + self.attn(self.ln1(x), *where)
        return x + self.mlp(self.ln2(x))


class Prior(nn.Module, PretrainedPrior):
    """Transformer over raster-ordered codes (see the module docstring): decoder-only
    (autoregressive) or bidirectional with a mask token (masked), by ``config.kind``.

    ``config.vocab_size`` (V), ``config.code_shape`` and ``config.num_classes`` (C; 0 for
    an unconditional prior) must be set. Class ids are ``0 .. C-1``; :attr:`null_class`
    (= C) is the unconditional label. ``save_pretrained`` / ``from_pretrained``: see
    :mod:`vqkit.prior.pretrained`.
    """

    config_class = PriorConfig

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        c = config
        if c.vocab_size < 1 or c.seq_len < 1:
            raise ValueError(
                f"PriorConfig needs vocab_size and code_shape from the tokenizer; got "
                f"vocab_size={c.vocab_size}, code_shape={c.code_shape}"
            )
        self.config = c
        self.seq_len = c.seq_len
        # positions: [y, c_0 .. c_{T-2}] (autoregressive), [y, c_0 .. c_{T-1}] (masked),
        # or the L codes' positions, each fed by its coarser scales (next-scale)
        self.n_pos = self.seq_len + 1 if c.masked else self.seq_len
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.cls_emb = nn.Embedding(c.num_classes + 1, c.n_embd)  # last row: null class
        self.pos_emb = nn.Embedding(self.n_pos, c.n_embd) if c.pos == "learned" else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.pos == "rope":
            cos, sin = rope_tables(self.n_pos, c.n_embd // c.n_head)
            # not in the state dict: a function of the config
            self.register_buffer("rope_cos", cos.float(), persistent=False)
            self.register_buffer("rope_sin", sin.float(), persistent=False)
        self.apply(self._init_weights)
        for block in self.blocks:  # GPT-2: residual outputs scaled by 1/sqrt(2 n_layer)
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * c.n_layer))
        if c.tie_weights:
            self.head.weight = self.tok_emb.weight
        self.mask_emb: nn.Parameter | None = None
        if c.masked:  # made last: the autoregressive kind's initial draws stay as they were
            self.mask_emb = nn.Parameter(torch.randn(c.n_embd) * 0.02)
        self.lvl_emb: nn.Embedding | None = None
        if c.next_scale:  # the scale embedding, its mask and ancestor gathers (nextscale.py)
            self.lvl_emb = nn.Embedding(len(c.scales), c.n_embd)
            nn.init.normal_(self.lvl_emb.weight, std=0.02)
            level, mask, ancestors = nextscale.layout(c.scales)
            # not in the state dict: functions of the config
            self.register_buffer("scale_level", level, persistent=False)
            self.register_buffer("scale_mask", mask, persistent=False)
            self.register_buffer("scale_ancestors", ancestors, persistent=False)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def code_shape(self) -> tuple[int, ...]:
        return tuple(self.config.code_shape)

    def num_params(self) -> int:
        """Trainable parameters (a tied weight counted once)."""
        return sum(p.numel() for p in self.parameters())

    def _autoregressive(self, what: str) -> None:
        if self.config.masked:
            raise ValueError(
                f"{what} is the autoregressive prior's; this prior is masked (use fill, "
                "vqkit.prior.masked.masked_bits and vqkit.prior.masked.decode)"
            )

    def _one_code_at_a_time(self, what: str) -> None:
        self._autoregressive(what)
        if self.config.next_scale:
            raise ValueError(
                f"{what} is the autoregressive prior's; this prior is next-scale (use "
                "forward, log_prob and vqkit.prior.nextscale.sample)"
            )

    def new_cache(self, batch: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences on the model's device/dtype."""
        self._autoregressive("the KV cache")  # next-scale: one scale per extension
        c = self.config
        w = self.tok_emb.weight
        return KVCache(
            c.n_layer,
            batch,
            c.n_head,
            self.seq_len,
            c.n_embd // c.n_head,
            device=w.device,
            dtype=w.dtype,
        )

    def _labels(
        self, labels: torch.Tensor | None, batch: int, device: torch.device
    ) -> torch.Tensor:
        """Class ids (B,) as given, the null class where None; class dropout in training."""
        if labels is None:
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        labels = labels.to(device=device, dtype=torch.long).reshape(-1)
        if labels.shape[0] != batch:
            raise ValueError(f"expected {batch} labels; got {labels.shape[0]}")
        if bool(((labels < 0) | (labels > self.null_class)).any()):
            raise ValueError(
                f"class ids must be in [0, {self.null_class}] ({self.null_class}: null); "
                f"got {labels.min().item()}..{labels.max().item()}"
            )
        p = self.config.class_dropout
        if self.training and p > 0 and self.config.num_classes > 0:
            drop = torch.rand(batch, device=device) < p
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return labels

    def extend(
        self,
        codes: torch.Tensor,
        cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feed the next inputs; return the logits (B, L', V) of the codes after them.

        With no cache, or an empty one, the inputs are ``[y, codes]`` (codes (B, L),
        L <= T - 1, possibly 0): the logits are those of ``c_0 .. c_L``, L' = L + 1. A
        non-empty cache holds ``[y, c_0 .. c_{m-1}]``: ``codes`` are ``c_m ..
        c_{m+L-1}`` and the logits those of ``c_{m+1} .. c_{m+L}`` (L' = L). The cache
        is advanced past the new inputs.
        """
        self._one_code_at_a_time("extend")
        b, n = codes.shape
        start = cache.length if cache is not None else 0
        x = self.tok_emb(codes)
        if start == 0:
            y = self._labels(labels, b, codes.device)
            x = torch.cat((self.cls_emb(y)[:, None], x), dim=1)
        total = start + x.shape[1]
        if total > self.seq_len:
            raise ValueError(f"{total} positions exceed the prior's sequence length {self.seq_len}")
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[start:total]
        rope = (self.rope_cos, self.rope_sin) if self.pos_emb is None else None
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, start, cache, rope)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.head(self.ln_f(x))

    def fill(
        self, codes: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The masked kind's logits (B, T, V) of every code given the visible ones.

        ``codes`` (B, T) (or index maps (B, *code_shape)); ``mask`` bool, same shape,
        **True where a code is hidden** (its value is never read: the mask embedding
        takes its place, so hidden values cannot leak). ``logits[:, t]`` scores ``c_t``
        given the codes where ``mask`` is False and the label (class dropout in training).
        """
        if not self.config.masked:
            raise ValueError("fill is the masked prior's; this prior is " + self.config.kind)
        if codes.dim() != 2:
            codes = flatten_codes(codes, self.code_shape)
            mask = mask.reshape(codes.shape)
        b, n = codes.shape
        if n != self.seq_len or tuple(mask.shape) != (b, n):
            raise ValueError(
                f"expected codes and mask (B, {self.seq_len}); got {tuple(codes.shape)} and "
                f"{tuple(mask.shape)}"
            )
        mask = mask.to(torch.bool)
        x = self.tok_emb(codes.masked_fill(mask, 0))
        x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)
        y = self._labels(labels, b, codes.device)
        x = torch.cat((self.cls_emb(y)[:, None], x), dim=1)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight
        rope = (self.rope_cos, self.rope_sin) if self.pos_emb is None else None
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, 0, None, rope)
        return self.head(self.ln_f(x[:, 1:]))

    def forward(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Autoregressive kind: teacher-forced logits (B, T', V) of codes (B, T') (T' <= T,
        or index maps (B, *code_shape)): ``logits[:, t]`` scores ``c_t`` given ``c_<t``
        and the label. Masked kind: :meth:`fill` (``mask`` required). Next-scale kind:
        the logits (B, L, V) of every code given the coarser scales' codes and the label
        (:func:`vqkit.prior.nextscale.logits`)."""
        if self.config.next_scale:
            return nextscale.logits(self, codes, labels)
        if self.config.masked:
            if mask is None:
                raise ValueError("a masked prior needs the mask of hidden codes")
            return self.fill(codes, mask, labels)
        if codes.dim() != 2:
            codes = flatten_codes(codes, self.code_shape)
        return self.extend(codes[:, :-1], None, labels)

    def loss(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean negative log-likelihood per code, in nats: ``-mean_t log p(c_t | c_<t, y)``
        (next-scale: ``-mean_t log p(c_t | coarser scales, y)``). Codes :data:`PAD`
        (a padded suffix) are left out of the mean."""
        self._autoregressive("loss (the NLL)")
        seq = flatten_codes(codes, self.code_shape)
        logits = self(seq.clamp_min(0), labels)
        return F.cross_entropy(
            _wide(logits).reshape(-1, logits.shape[-1]), seq.reshape(-1), ignore_index=PAD
        )

    def log_prob(self, indices: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(c | y)`` in nats, (B,): the sum over the T codes of index maps
        (B, *code_shape) or sequences (B, T), codes :data:`PAD` (a padded suffix) left
        out. Runs in the model's current mode."""
        return self.log_probs(indices, labels).sum(-1)

    def log_probs(self, indices: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Each code's ``log p(c_t | c_<t, y)`` in nats, (B, T); 0 at :data:`PAD`."""
        self._autoregressive("log_prob")
        seq = flatten_codes(indices, self.code_shape)
        if seq.shape[1] != self.seq_len:
            raise ValueError(f"expected {self.seq_len} codes per sequence; got {seq.shape[1]}")
        real = seq.clamp_min(0)
        logp = torch.log_softmax(_wide(self(real, labels)), dim=-1)
        return logp.gather(-1, real[..., None]).squeeze(-1).masked_fill(seq == PAD, 0.0)

    @torch.no_grad()
    def sample(self, num: int, options: SampleOptions | None = None, **kwargs: Any) -> torch.Tensor:
        """``num`` index maps (num, *code_shape); see :func:`vqkit.prior.sampling.sample`
        (autoregressive), :func:`vqkit.prior.masked.decode` (masked) and
        :func:`vqkit.prior.nextscale.sample` (next-scale)."""
        if self.config.next_scale:
            return nextscale.sample(self, num, options, **kwargs)
        if self.config.masked:
            return decode(self, num, options, **kwargs)
        return sample(self, num, options, **kwargs)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on matrices (linear weights, embeddings), none on
        biases and norm gains."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        rest = [p for p in self.parameters() if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ]
