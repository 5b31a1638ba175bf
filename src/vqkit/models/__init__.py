"""Models built around the quantizers."""

from .vqvae import VQVAE, Decoder, Encoder, ResidualStack, VQVAEConfig, VQVAEOutput

__all__ = ["VQVAE", "VQVAEConfig", "VQVAEOutput", "Encoder", "Decoder", "ResidualStack"]
