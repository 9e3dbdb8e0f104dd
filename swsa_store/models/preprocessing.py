"""How an image becomes a model's input: :class:`PreprocessCfg` and its per-backbone overrides.

A backbone's test-time preprocessing is resolved in layers, each overriding the one before:

1. timm's data config of the architecture (``timm.data.resolve_model_data_config``) at the model's
   input size;
2. the defaults of the weights, for weights shipped by an installed package
   (:mod:`swsa_store.models.packaged_weights`: e.g. TensorFlow's mean 127/255 and std 128/255 for the
   EfficientNet-Lites);
3. the user's overrides (``preprocess=`` of :func:`~swsa_store.models.backbones.load_backbone`,
   :func:`~swsa_store.ingest.embed_store`; ``swsa embed --preprocess``), with these keys:

   ``size`` (int, the square input size; the same as ``image_size``), ``crop_pct`` (0 < x <= 1),
   ``crop_mode`` (center, squash, border), ``interpolation`` (nearest, bilinear, bicubic, box,
   hamming, lanczos), ``mean`` and ``std`` (1 or 3 numbers; one is used for every channel; std > 0).

The resolved values are stored with the embeddings (attribute ``preprocess``); a store holding an
embedding made with other preprocessing is not resumed with it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from swsa_store.models.weights import attr_value

__all__ = [
    "CROP_MODES",
    "INTERPOLATIONS",
    "PREPROCESS_KEYS",
    "PreprocessCfg",
    "parse_preprocess",
    "preprocess_overrides",
]

#: The keys of a preprocessing override.
PREPROCESS_KEYS = ("size", "crop_pct", "crop_mode", "interpolation", "mean", "std")
#: timm's eval crop modes.
CROP_MODES = ("center", "squash", "border")
#: timm's interpolation names (``timm.data.str_to_interp_mode``).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


@dataclass(frozen=True)
class PreprocessCfg:
    """How an image becomes the model's input (timm's resolved data config, at test time)."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    crop_mode: str

    @classmethod
    def from_data_config(cls, data_config: Mapping[str, Any]) -> "PreprocessCfg":
        """From ``timm.data.resolve_data_config`` / ``resolve_model_data_config`` output."""
        return cls(
            input_size=tuple(int(v) for v in data_config["input_size"]),
            mean=tuple(float(v) for v in data_config["mean"]),
            std=tuple(float(v) for v in data_config["std"]),
            interpolation=str(data_config.get("interpolation", "bilinear")),
            crop_pct=float(data_config.get("crop_pct") or 1.0),
            crop_mode=str(data_config.get("crop_mode") or "center"),
        )

    def data_config(self) -> dict[str, Any]:
        """The keyword arguments of ``timm.data.create_transform``."""
        return {
            "input_size": self.input_size,
            "mean": self.mean,
            "std": self.std,
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "PreprocessCfg":
        """This config with the (validated, see :func:`preprocess_overrides`) ``overrides`` applied."""
        values = preprocess_overrides(overrides)
        changes: dict[str, Any] = {k: v for k, v in values.items() if k != "size"}
        if "size" in values:
            changes["input_size"] = (self.input_size[0], values["size"], values["size"])
        return dataclasses.replace(self, **changes)

    def overrides(self) -> dict[str, Any]:
        """This config as an override dict (``size`` needs a square input)."""
        _, height, width = self.input_size
        if height != width:
            raise ValueError(f"preprocess size overrides are square; this config's input size is {self.input_size}")
        return {"size": int(height), "crop_pct": self.crop_pct, "crop_mode": self.crop_mode,
                "interpolation": self.interpolation, "mean": self.mean, "std": self.std}

    def to_attrs(self) -> dict[str, Any]:
        return {k: attr_value(v) for k, v in dataclasses.asdict(self).items()}


def parse_preprocess(text: str) -> dict[str, Any]:
    """``"mean=0.5,0.5,0.5;std=0.5,0.5,0.5;crop_pct=1.0"`` → a validated override dict.

    ``;``-separated ``key=value`` pairs; ``mean`` and ``std`` take ``,``-separated numbers.
    """
    pairs: dict[str, str] = {}
    for item in (part.strip() for part in str(text).split(";")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"preprocess override {item!r} is not key=value; write e.g. "
                             f"'mean=0.5,0.5,0.5;std=0.5,0.5,0.5;crop_pct=1.0' (keys: {', '.join(PREPROCESS_KEYS)})")
        pairs[key.strip()] = value.strip()
    return preprocess_overrides(pairs)


def preprocess_overrides(value: Mapping[str, Any] | PreprocessCfg | str | None) -> dict[str, Any]:
    """Validate preprocessing overrides: a dict, a :class:`PreprocessCfg`, a ``key=value;...`` string or
    ``None`` (none). Returns a dict with typed values: ``size`` int, ``crop_pct`` float, ``crop_mode``
    and ``interpolation`` str, ``mean`` and ``std`` 3-tuples of floats."""
    if value is None:
        return {}
    if isinstance(value, PreprocessCfg):
        return preprocess_overrides(value.overrides())
    if isinstance(value, str):
        return parse_preprocess(value)
    if not isinstance(value, Mapping):
        raise TypeError(f"preprocess overrides must be a dict, a PreprocessCfg or a 'key=value;...' string, "
                        f"got {type(value).__name__}")
    unknown = [k for k in value if k not in PREPROCESS_KEYS]
    if unknown:
        raise ValueError(f"unknown preprocess key {unknown[0]!r}; valid keys: {', '.join(PREPROCESS_KEYS)}")
    checks = {"size": _size, "crop_pct": _crop_pct, "crop_mode": _crop_mode, "interpolation": _interpolation,
              "mean": _mean, "std": _std}
    return {key: checks[key](raw) for key, raw in value.items()}


def _number(key: str, raw: Any) -> float:
    try:
        number = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"preprocess {key} must be a number, got {raw!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"preprocess {key} must be a finite number, got {raw!r}")
    return number


def _size(raw: Any) -> int:
    if isinstance(raw, bool) or not str(raw).strip().isdigit() or int(str(raw).strip()) < 1:
        raise ValueError(f"preprocess size must be a positive integer (the square input size), got {raw!r}")
    return int(str(raw).strip())


def _crop_pct(raw: Any) -> float:
    value = _number("crop_pct", raw)
    if not 0 < value <= 1:
        raise ValueError(f"preprocess crop_pct must be in (0, 1] (1.0: no crop), got {raw!r}")
    return value


def _choice(key: str, raw: Any, choices: tuple[str, ...]) -> str:
    value = str(raw).strip().lower()
    if value not in choices:
        raise ValueError(f"preprocess {key} must be one of {', '.join(choices)}, got {raw!r}")
    return value


def _crop_mode(raw: Any) -> str:
    return _choice("crop_mode", raw, CROP_MODES)


def _interpolation(raw: Any) -> str:
    return _choice("interpolation", raw, INTERPOLATIONS)


def _channels(key: str, raw: Any) -> tuple[float, float, float]:
    items = [p for p in raw.split(",")] if isinstance(raw, str) else (
        list(raw) if isinstance(raw, (list, tuple)) else [raw])
    if len(items) not in (1, 3):
        raise ValueError(f"preprocess {key} must be 1 or 3 numbers (one per RGB channel), got {raw!r}")
    values = [_number(key, item) for item in items]
    return (values[0],) * 3 if len(values) == 1 else (values[0], values[1], values[2])


def _mean(raw: Any) -> tuple[float, float, float]:
    return _channels("mean", raw)


def _std(raw: Any) -> tuple[float, float, float]:
    values = _channels("std", raw)
    if min(values) <= 0:
        raise ValueError(f"preprocess std must be positive, got {raw!r}")
    return values
