"""Models built around the quantizers, and their I/O."""

from .io import export_safetensors, load_model
from .vqvae import (
    VQVAE,
    Decoder,
    Encoder,
    ModelOptions,
    ResidualStack,
    ShapeOptions,
    VQVAEConfig,
    VQVAEOutput,
)

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
