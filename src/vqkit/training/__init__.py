"""The tokenizer's training job (:mod:`.tokenizer`), its options (:mod:`.config`), step
(:mod:`.step`), data (:mod:`.data`), codebook-health policy (:mod:`.health`), weight
average (:mod:`.optim`) and adversarial step (:mod:`.adversarial_step`). The runtime
every job runs on lives in :mod:`vqkit.runtime`.

Nothing is imported here: ``import vqkit.training.config`` does not load the trainer."""
