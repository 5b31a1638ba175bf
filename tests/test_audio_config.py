"""Tests of vqkit's audio_config module: the speech codec job's options are checked
before any data is read, and its codebook-health options are the image job's
declarations."""

from __future__ import annotations

import pytest

from tests.test_audio_trainer import TINY
from vqkit.errors import UserError
from vqkit.options import option_fields
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
    ],
)
def test_bad_options_one_line(kw, match):
    with pytest.raises(UserError, match=match):
        AudioTrainConfig(**{**TINY, **kw})


def test_health_options_are_the_one_declaration():
    """Both jobs' flat configs hold the very fields declared by HealthOptions (one home
    per option), with its defaults."""
    declared = {f.name: f for f in option_fields(HealthOptions)}
    for config in (AudioTrainConfig, TrainConfig):
        fields = {f.name: f for f in option_fields(config)}
        for name, f in declared.items():
            assert dict(fields[name].metadata) == dict(f.metadata)
            assert fields[name].default == f.default
    assert AudioTrainConfig(**TINY).init == "auto"
