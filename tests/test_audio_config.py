"""Tests of vqkit's audio_config module: the speech codec job's options are checked
before any data is read, and its codebook-health options, ``disc_start`` and the
discriminator's optimizer options are the image job's declarations."""

from __future__ import annotations

import pytest

from tests.test_audio_trainer import TINY
from vqkit.errors import UserError
from vqkit.losses.adversarial import DiscStartOptions
from vqkit.options import option_fields
from vqkit.training.adversarial_step import DiscriminatorOptimOptions
from vqkit.training.audio_config import AudioTrainConfig
from vqkit.training.config import TrainConfig
from vqkit.training.health import HealthOptions


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"segment_seconds": 0.03}, "60 samples at 2000 Hz; the loss windows need at least 65"),
        ({"modality": "image"}, "modality 'image'"),
        ({"strides": "2,x"}, "strides"),
        ({"quantizer": "fsq", "num_quantizers": 3}, "num_quantizers"),
        ({"eval_stages": "0"}, "eval_stages"),
        ({"audio_disc": "hifigan"}, "audio_disc must be one of .*'mpd\\+stft'"),
        ({"audio_disc_loss": "non_saturating"}, "audio_disc_loss must be one of"),
        ({"feat_match_weight": -1.0}, "feat_match_weight must be >= 0"),
        ({"disc_lr": 0.0}, "disc_lr must be > 0"),
        ({"disc_start": -1}, "disc_start must be an int >= 0"),
    ],
)
def test_bad_options_one_line(kw, match):
    with pytest.raises(UserError, match=match):
        AudioTrainConfig(**{**TINY, **kw})


@pytest.mark.parametrize("group", [HealthOptions, DiscStartOptions, DiscriminatorOptimOptions])
def test_shared_options_are_the_one_declaration(group):
    """Both jobs' flat configs hold the very fields declared by the codebook health's,
    ``disc_start``'s and the discriminator optimizer's groups (one home per option),
    with their defaults."""
    declared = {f.name: f for f in option_fields(group)}
    for config in (AudioTrainConfig, TrainConfig):
        fields = {f.name: f for f in option_fields(config)}
        for name, f in declared.items():
            assert dict(fields[name].metadata) == dict(f.metadata)
            assert fields[name].default == f.default
    assert AudioTrainConfig(**TINY).init == "auto"
