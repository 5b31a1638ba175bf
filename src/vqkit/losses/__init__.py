"""The tokenizer's loss terms beyond MSE: LPIPS (:mod:`.perceptual`), the patch
discriminator and GAN losses (:mod:`.adversarial_step`), and their combination with its
options (:mod:`.objective`); the speech codec's waveform, multi-resolution STFT and mel
losses (:mod:`.spectral`)."""

from .adversarial import LeCAM, PatchDiscriminator, adaptive_weight, disc_start_warning
from .objective import LossOptions, VQGANLoss
from .perceptual import LPIPS
from .spectral import (
    AudioLossOptions,
    AudioReconstructionLoss,
    MelL1Loss,
    MultiResolutionSTFTLoss,
    waveform_l1,
)

__all__ = [
    "AudioLossOptions",
    "AudioReconstructionLoss",
    "LPIPS",
    "LeCAM",
    "LossOptions",
    "MelL1Loss",
    "MultiResolutionSTFTLoss",
    "PatchDiscriminator",
    "VQGANLoss",
    "adaptive_weight",
    "disc_start_warning",
    "waveform_l1",
]
