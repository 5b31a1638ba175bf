"""Training jobs and what they share: the tokenizer trainer (:mod:`.tokenizer`), its
options (:mod:`.config`), step (:mod:`.step`), data (:mod:`.data`, :mod:`.prefetch`),
codebook-health policy (:mod:`.health`), optimisation helpers (:mod:`.optim`) and the
deferred Ctrl-C (:mod:`.interrupt`)."""

from .config import PRESETS, TrainConfig, TrainOptions
from .tokenizer import Trainer, train

__all__ = ["PRESETS", "TrainConfig", "TrainOptions", "Trainer", "train"]
