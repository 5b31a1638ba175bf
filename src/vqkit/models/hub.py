"""``save_pretrained(dir)`` / ``from_pretrained(dir_or_repo_id)`` for vqkit models, the
Hugging Face way, through ``huggingface_hub``'s ``PyTorchModelHubMixin`` when the
optional extra is installed (``pip install vqkit[hub]``: also ``push_to_hub`` and
Hub repo ids).

A pretrained directory holds three files:

* ``config.json``: ``{"vqkit": KIND, "format": ..., "config": the model's options,
  "info": what else the model needs (a prior: its tokenizer's hash and location, its
  classes)}``;
* ``model.safetensors``: every weight and buffer (EMA statistics, usage, FSQ's levels
  as extra state), written and read by :mod:`vqkit.storage.weights`;
* ``README.md``: a model card (:meth:`PretrainedMixin.generate_model_card`).

Loading is strict. The mixin's own ``from_pretrained`` builds the model and loads with
``strict=False``, which would keep freshly initialised buffers for missing keys; here
``from_pretrained`` is vqkit's: a missing or unexpected key, a tensor of another shape,
or a weights file whose stored config differs from ``config.json`` is a one-line
:class:`~vqkit.storage.checkpoint.CheckpointError` naming it. Without the extra, a
local directory in the same layout loads (and ``save_pretrained`` writes one).

A model class opts in by subclassing :class:`PretrainedMixin` and naming its
``config_class`` (an :class:`~vqkit.options.Options` dataclass the model is built from,
``Model(config)``) and ``pretrained_kind``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import UserError
from ..storage.checkpoint import FORMAT, CheckpointError
from ..storage.fileio import atomic_write, json_object, loads_json, write_json
from ..storage.weights import export_safetensors, load_state_strict, read_safetensors

try:
    from huggingface_hub import PyTorchModelHubMixin as _HubBase

    HUB_AVAILABLE = True
    _HUB_OPTIONS: dict[str, Any] = {
        "library_name": "vqkit",
        "tags": ["vqkit", "vector-quantization"],
    }
except ImportError:  # the optional extra is missing: local directories only
    _HubBase = object  # type: ignore[assignment, misc]
    HUB_AVAILABLE = False
    _HUB_OPTIONS = {}

__all__ = [
    "CONFIG_NAME",
    "HUB_AVAILABLE",
    "WEIGHTS_NAME",
    "ModelCardText",
    "PretrainedMixin",
    "measured_section",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
HUB_HINT = "pip install 'vqkit[hub]'"


class ModelCardText:
    """A model card's Markdown (with its YAML header); ``save(path)`` writes it atomically.
    What :meth:`PretrainedMixin.generate_model_card` returns, with or without the extra
    (the Hub's ``ModelCard`` is not needed to write a file)."""

    def __init__(self, content: str) -> None:
        self.content = content

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write(path, lambda tmp: Path(tmp).write_text(self.content, encoding="utf-8"))

    def __str__(self) -> str:
        return self.content


def _resolve(name_or_path: str | os.PathLike[str], hub_args: dict[str, Any]) -> Path:
    """The local directory of ``name_or_path``: itself, or the Hub snapshot of a repo id
    (config and weights only, downloaded through huggingface_hub's cache)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    text = str(name_or_path)
    looks_local = path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1
    if looks_local:
        raise CheckpointError(f"pretrained directory not found: {text}")
    if not HUB_AVAILABLE:
        raise CheckpointError(
            f"{text} is not a directory, and loading from the Hugging Face Hub needs the "
            f"huggingface_hub package ({HUB_HINT})"
        )
    from huggingface_hub import hf_hub_download

    try:
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            local = hf_hub_download(repo_id=text, filename=name, **hub_args)
    except Exception as e:  # offline, no such repo, no such file: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot fetch {text} from the Hugging Face Hub: {first}") from e
    return Path(local).parent


class PretrainedMixin(_HubBase, **_HUB_OPTIONS):  # type: ignore[misc, valid-type]
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (see the module
    docstring). Subclasses set ``config_class`` and ``pretrained_kind``; ``pretrained_info``
    (JSON) travels in ``config.json`` beside the config."""

    config_class: ClassVar[type]
    pretrained_kind: ClassVar[str]
    config: Any
    pretrained_info: dict[str, Any]

    def _save_pretrained(self, save_directory: Path) -> None:
        """``config.json`` and ``model.safetensors`` (the mixin's hook; atomic writes)."""
        info = dict(getattr(self, "pretrained_info", {}) or {})
        # the weights carry the info too: a model file alone still knows its data
        export_safetensors(self, save_directory / WEIGHTS_NAME, info=info)  # type: ignore[arg-type]
        write_json(
            save_directory / CONFIG_NAME,
            {
                "vqkit": self.pretrained_kind,
                "format": FORMAT,
                "config": self.config.to_dict(),
                "info": info,
            },
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        *,
        model_card_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> str | None:
        """Write ``config.json``, ``model.safetensors`` and ``README.md`` into
        ``save_directory`` (created). ``model_card_kwargs`` go to
        :meth:`generate_model_card` (e.g. ``evaluation``: measured figures, ``data``);
        with the extra, the other keyword arguments are the mixin's (``push_to_hub``,
        ``repo_id``, ...). Returns the Hub commit URL when pushing, else None."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CARD_NAME).unlink(missing_ok=True)  # the mixin never overwrites one
        if HUB_AVAILABLE:
            return super().save_pretrained(  # type: ignore[misc]
                directory, model_card_kwargs=model_card_kwargs, **kwargs
            )
        if kwargs.get("push_to_hub"):
            raise CheckpointError(f"push_to_hub needs the huggingface_hub package ({HUB_HINT})")
        self._save_pretrained(directory)
        self.generate_model_card(**(model_card_kwargs or {})).save(directory / CARD_NAME)
        return None

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> Any:
        """The model saved in a directory (or a Hub repo id, with the extra), in eval
        mode on ``map_location``. Strict only: ``strict=False`` is refused."""
        if not strict:
            raise UserError(
                "vqkit loads pretrained models strictly: a missing weight would leave a "
                "freshly initialised buffer in the model"
            )
        hub_args = {
            "revision": revision,
            "cache_dir": cache_dir,
            "force_download": force_download,
            "token": token,
            "local_files_only": local_files_only,
        }
        directory = _resolve(pretrained_model_name_or_path, hub_args)
        cfg_path = directory / CONFIG_NAME
        try:
            stored = loads_json(cfg_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{directory} holds no {CONFIG_NAME}") from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{cfg_path}: unreadable ({e})") from e
        kind = stored.get("vqkit") if isinstance(stored, dict) else None
        if kind != cls.pretrained_kind:
            hint = (
                "a run directory? write its pretrained directory with vqkit export RUN --out DIR"
                if kind is None
                else "load it with the class that saved it"
            )
            raise CheckpointError(
                f"{cfg_path} is not a vqkit {cls.pretrained_kind} (it says {kind!r}): {hint}"
            )
        json_object(stored.get("config"), "config", cfg_path, CheckpointError)
        info = json_object(stored.get("info") or {}, "info", cfg_path, CheckpointError)
        try:
            config = cls.config_class.from_dict(stored["config"], where=str(cfg_path))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{cfg_path}: invalid config: {e}") from e
        weights = directory / WEIGHTS_NAME
        file_config, state = read_safetensors(weights, map_location)
        try:
            same = cls.config_class.from_dict(file_config).to_dict() == config.to_dict()
        except (TypeError, ValueError):
            same = False
        if not same:
            diff = sorted(k for k, v in config.to_dict().items() if file_config.get(k) != v)
            raise CheckpointError(
                f"{weights} was saved from another architecture than {cfg_path} describes "
                f"(options {', '.join(diff) or 'differ'})"
            )
        model = cls(config)  # type: ignore[call-arg]
        load_state_strict(model, state, weights)  # type: ignore[arg-type]
        model.pretrained_info = dict(info)
        return model.to(map_location).eval()  # type: ignore[attr-defined]

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCardText:
        """The model card (README.md): YAML header, then :meth:`model_card_body`."""
        header = "\n".join(
            ["---", "library_name: vqkit", "tags:"]
            + [f"- {t}" for t in ["vqkit", "vector-quantization", *self.card_tags()]]
            + ["---", ""]
        )
        return ModelCardText(header + self.model_card_body(**kwargs))

    def card_tags(self) -> list[str]:
        """Extra Hub tags of this kind of model."""
        return []

    def model_card_body(self, **kwargs: Any) -> str:
        """Markdown of the card; subclasses say what the model is and how it measured."""
        return f"# vqkit {self.pretrained_kind}\n"


def measured_section(
    source: str | None, evaluation: dict[str, Any] | None, keys: tuple[str, ...]
) -> list[str]:
    """The card's lines from "exported from" to the table of the run's measured figures
    ``keys`` of ``evaluation`` (its eval.json), or a "not measured" line."""
    lines = [f"- exported from: `{source}`"] if source else []
    lines += ["", "## Measured", ""]
    if not evaluation:
        return [*lines, "Not measured for these weights (no eval.json of the run)."]
    lines += ["| figure | value |", "|---|---:|"]
    for key in keys:
        v = evaluation.get(key)
        if v is not None:
            lines.append(f"| {key} | {v:.4g} |" if isinstance(v, float) else f"| {key} | {v} |")
    return lines
