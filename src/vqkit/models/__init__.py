"""Models built around the quantizers, and their I/O."""

from .audio_codec import AudioCodec, AudioCodecConfig, AudioModelOptions
from .convnets import Decoder, Encoder, ResidualStack
from .io import export_safetensors, load_any, load_model
from .seanet import SEANetDecoder, SEANetEncoder, Snake1d
from .vqvae import VQVAE, ModelOptions, ShapeOptions, VQVAEConfig, VQVAEOutput

__all__ = [
    "AudioCodec",
    "AudioCodecConfig",
    "AudioModelOptions",
    "SEANetDecoder",
    "SEANetEncoder",
    "Snake1d",
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
    "load_any",
]
