"""Datasets for VQ-VAE training, without torchvision.

Formats:

* CIFAR-10 python (``cifar-10-python.tar.gz`` or ``cifar-10-batches-py/``): :func:`load_cifar10`
* image folders (PNG/JPEG tree, optionally class and split subfolders, or a tar of one):
  :func:`load_image_folder`
* idx (MNIST / Fashion-MNIST, raw or .gz): :func:`load_idx`, :func:`read_idx`
* audio (WAV folders, tars of them, the Free Spoken Digit Dataset): :func:`load_audio`
  gives an :class:`AudioData` of mono float32 clips (random crops, whole clips);
  :func:`resample` changes their rate; :class:`CropLoader` gives resumable batches of
  random crops; :func:`write_wav` writes 16-bit PCM
* the built-in set shipped in ``vqkit/assets`` (a Fashion-MNIST subset): :func:`load_builtin`
* WebDataset-layout tar shards (a brace pattern or a directory of ``{split}-NNNNNN.tar``,
  written by :func:`vqkit.data.pack.pack`): :func:`open_shards`, streamed by
  :class:`ShardLoader`; ``load_dataset`` decodes a shard split into memory

:func:`load_dataset` picks the format from the source. Every loader returns an
:class:`ImageData` (uint8 (N, C, H, W) images + int64 labels), which :class:`BatchLoader`
turns into endless, resumable, shardable float batches in [-0.5, 0.5].
"""

from __future__ import annotations

from ._cache import CACHE_ENV, default_cache_dir
from ._core import ImageData, data_variance, denormalize, normalize
from .audio import AudioData, CropLoader, decode_wav, write_wav
from .audiofolder import audio_splits, detect_modality, load_audio
from .cifar import (
    CIFAR10_MD5,
    CIFAR10_URL,
    DatasetDownloadError,
    download_cifar10,
    load_cifar10,
    verify_cifar10_archive,
)
from .decode import read_image
from .idx import load_idx, read_idx
from .imagefolder import load_image_folder
from .loader import BatchLoader, epoch_permutation, iterate_batches
from .resample import resample
from .shards import ShardLoader, ShardSet, is_shard_source, open_shards
from .sources import (
    BUILTIN_DIR,
    FASHION_MNIST_DIR,
    DatasetFormat,
    available_splits,
    detect_format,
    load_builtin,
    load_dataset,
)

__all__ = [
    "BUILTIN_DIR",
    "CACHE_ENV",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "FASHION_MNIST_DIR",
    "AudioData",
    "CropLoader",
    "BatchLoader",
    "DatasetDownloadError",
    "DatasetFormat",
    "ImageData",
    "ShardLoader",
    "ShardSet",
    "audio_splits",
    "available_splits",
    "data_variance",
    "decode_wav",
    "default_cache_dir",
    "denormalize",
    "detect_format",
    "detect_modality",
    "download_cifar10",
    "epoch_permutation",
    "is_shard_source",
    "iterate_batches",
    "load_audio",
    "load_builtin",
    "load_cifar10",
    "load_dataset",
    "load_idx",
    "load_image_folder",
    "normalize",
    "open_shards",
    "read_idx",
    "read_image",
    "resample",
    "verify_cifar10_archive",
    "write_wav",
]
