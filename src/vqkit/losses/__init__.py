"""The tokenizer's loss terms beyond MSE: LPIPS (:mod:`.perceptual`), the patch
discriminator and GAN losses (:mod:`.adversarial_step`), and their combination with its
options (:mod:`.objective`)."""

from .adversarial import LeCAM, PatchDiscriminator, adaptive_weight
from .objective import LossOptions, VQGANLoss, disc_start_warning
from .perceptual import LPIPS

__all__ = [
    "LPIPS",
    "LeCAM",
    "LossOptions",
    "PatchDiscriminator",
    "VQGANLoss",
    "adaptive_weight",
    "disc_start_warning",
]
