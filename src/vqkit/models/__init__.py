"""Models built around the quantizers, and their I/O."""

from .convnets import Decoder, Encoder, ResidualStack
from .io import export_safetensors, load_model
from .vqvae import VQVAE, ModelOptions, ShapeOptions, VQVAEConfig, VQVAEOutput

__all__ = [
    "VQVAE",
    "VQVAEConfig",
    "VQVAEOutput",
    "ModelOptions",
    "ShapeOptions",
    "Encoder",
    "Decoder",
    "ResidualStack",
    "export_safetensors",
    "load_model",
]
