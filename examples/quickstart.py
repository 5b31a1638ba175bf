"""The README usage example (tests check that the two stay identical)."""

import torch
from vqkit import VectorQuantizer, VectorQuantizerEMA

vq = VectorQuantizer(num_embeddings=512, embedding_dim=64, commitment_cost=0.25)
z_e = torch.randn(8, 64, 16, 16, requires_grad=True)   # encoder output (B, C, H, W)
out = vq(z_e)                                         # no N x K tensor is allocated
print(out.loss, out.perplexity, out.indices.shape)    # indices: (8, 16, 16)
loss, quantized, perplexity, encodings = vq(z_e)      # the classic 4-tuple still works
assert torch.equal(vq.decode(out.indices), out.quantized)  # indices -> (B, C, H, W)
ema = VectorQuantizerEMA(512, 64, commitment_cost=0.25, decay=0.99)
out = ema(z_e)                      # in train mode, updates the codebook after quantizing
