"""Reading a checkpoint file and loading it into a timm model, whatever its key names.

Files: ``.safetensors`` (``safetensors.torch.load_file``) or ``.pth`` / ``.pt`` / ``.bin`` (``torch.load``
with ``weights_only=True``: tensors and plain containers, never arbitrary pickles). Wrappers are
unwrapped: ``{"state_dict": ...}``, ``{"model": ...}`` (nested up to three deep), and the key prefixes
``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``).

Key mapping (:func:`load_checkpoint`, ``key_mapping``):

``name``
    The file's keys are the model's (after timm's ``checkpoint_filter_fn`` for the architecture, which
    e.g. resamples a ViT's position embeddings to the model's image size): every tensor of the model
    must be in the file with its shape, and nothing else may be.
``order``
    The file's tensors are taken in the file's order and given the model's key names in the model's
    ``state_dict()`` order. Checked, tensor by tensor: the same count, the same tensor kind (the last
    key component: ``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``, ...)
    and the same shape. For checkpoints of the same network written by another implementation, e.g.
    lukemelas-style EfficientNet keys (``_conv_stem.weight``, ``_bn0.*``, ``_blocks.0._depthwise_conv.weight``,
    ..., ``_fc.*``) for timm's (``conv_stem.weight``, ``bn1.*``, ``blocks.0.0.conv_dw.weight``, ...,
    ``classifier.*``). Only torch files (``.pth``, ``.pt``, ``.bin``) keep the order they were saved in;
    a ``.safetensors`` file is stored sorted by dtype and name, so it is refused here with a message
    saying so. A file without ``num_batches_tracked`` buffers is compared without the model's
    (they do not change an evaluation). Otherwise :class:`WeightsLoadError`, with a table of the first
    mismatches (index, file key and shape, model key and shape).
``auto`` (default)
    ``name`` when any key of the model's feature extractor is in the file, else ``order``. A file that
    shares names with the model but does not fit by name is refused (its message says when the file
    would fit by order, and how to ask for that).

Either way a checkpoint without the classifier (e.g. the ``state_dict`` of a feature extractor) is
accepted: the classifier is dropped (``reset_classifier(0)``), as every backbone drops it anyway.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

__all__ = [
    "KEY_MAPPINGS",
    "OrderMismatch",
    "WeightsLoadError",
    "classifier_prefixes",
    "load_checkpoint",
    "map_by_order",
    "order_mismatches",
    "read_state_dict",
    "tensor_kind",
]

KeyMapping = Literal["auto", "name", "order"]
#: The accepted values of ``key_mapping``.
KEY_MAPPINGS = ("auto", "name", "order")
#: Rows of the mismatch table in an error message.
MISMATCH_ROWS = 4


class WeightsLoadError(RuntimeError):
    """A weights file was found but could not be read or does not fit the architecture."""


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The state dict in a safetensors or torch file, unwrapped (see the module docstring).

    ``what`` names the model in messages (e.g. ``"backbone 'resnet18'"``).
    """
    checkpoint = _read_file(Path(path), what)
    for _ in range(3):  # {"state_dict": ...}, {"model": ...}, possibly nested
        if isinstance(checkpoint, Mapping):
            inner = next((checkpoint[k] for k in ("state_dict", "model")
                          if isinstance(checkpoint.get(k), Mapping)), None)
            if inner is not None:
                checkpoint = inner
                continue
        break
    if not isinstance(checkpoint, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()
    ):
        held = (f"a dict with keys {', '.join(map(str, list(checkpoint)[:6]))}"
                if isinstance(checkpoint, Mapping) else type(checkpoint).__name__)
        raise WeightsLoadError(f"weights file {path} for {what} is not a state dict of tensors (it holds {held})")
    cleaned = {}
    for key, value in checkpoint.items():
        while key.startswith(("module.", "_orig_mod.")):  # DDP / torch.compile wrappers
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned


def _read_file(path: Path, what: str) -> Any:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        # weights only (no arbitrary pickles); timm training checkpoints carry an argparse.Namespace
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsLoadError(
            f"could not read weights file {path} for {what}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


# --------------------------------------------------------------------------------------------
# Mapping by order
# --------------------------------------------------------------------------------------------


def tensor_kind(key: str) -> str:
    """The kind of a state-dict entry: its last key component (``weight``, ``bias``, ``running_mean``...)."""
    return key.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class OrderMismatch:
    """Position ``index`` where the file's tensor and the model's differ in kind or shape (or one
    side has no tensor: its key is ``"-"``)."""

    index: int
    file_key: str
    file_shape: tuple[int, ...] | None
    model_key: str
    model_shape: tuple[int, ...] | None

    def __str__(self) -> str:
        def shape(s):
            return "-" if s is None else "(" + ",".join(map(str, s)) + ")"

        return f"#{self.index} {self.file_key} {shape(self.file_shape)} ~ {self.model_key} {shape(self.model_shape)}"


def order_mismatches(file_sd: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor]) -> list[OrderMismatch]:
    """Every position where the file's and the model's tensors, in order, differ in kind or shape."""
    file_items, model_items = list(file_sd.items()), list(model_sd.items())
    rows = []
    for i in range(max(len(file_items), len(model_items))):
        fk, fv = file_items[i] if i < len(file_items) else ("-", None)
        mk, mv = model_items[i] if i < len(model_items) else ("-", None)
        fshape = None if fv is None else tuple(fv.shape)
        mshape = None if mv is None else tuple(mv.shape)
        if fv is None or mv is None or tensor_kind(fk) != tensor_kind(mk) or fshape != mshape:
            rows.append(OrderMismatch(i, fk, fshape, mk, mshape))
    return rows


def map_by_order(file_sd: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor], *,
                 path: Path, what: str) -> dict[str, torch.Tensor]:
    """The file's tensors under the model's key names, matched by position (see the module docstring).

    Raises :class:`WeightsLoadError` with the first mismatches when count, kinds or shapes differ.
    """
    if not any(tensor_kind(k) == "num_batches_tracked" for k in file_sd):
        model_sd = {k: v for k, v in model_sd.items() if tensor_kind(k) != "num_batches_tracked"}
    rows = order_mismatches(file_sd, model_sd)
    if rows:
        table = " | ".join(str(r) for r in rows[:MISMATCH_ROWS])
        more = f" | ... ({len(rows)} in all)" if len(rows) > MISMATCH_ROWS else ""
        raise WeightsLoadError(
            f"weights file {path} does not fit {what} by order: the file has {len(file_sd)} tensors, the model "
            f"{len(model_sd)}; first mismatches (#index file key (shape) ~ model key (shape)): {table}{more}. "
            f"Is it the checkpoint of this architecture?"
        )
    return {mk: fv for mk, fv in zip(model_sd, file_sd.values())}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """``"<classifier>."`` of each of the timm model's classifier modules (its ``pretrained_cfg``)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{n}." for n in names)


def load_checkpoint(model: torch.nn.Module, path: Path, *, what: str, key_mapping: str = "auto",
                    checkpoint_filter: Callable | None = None) -> str:
    """Load the weights file ``path`` into the timm ``model``; returns the mapping used, ``"name"`` or ``"order"``.

    ``what`` names the model in messages; ``checkpoint_filter`` is timm's ``checkpoint_filter_fn`` of the
    architecture (applied to files matched by name). Raises :class:`WeightsLoadError` when the file
    cannot be read or does not fit (see the module docstring).
    """
    if key_mapping not in KEY_MAPPINGS:
        raise ValueError(f"key_mapping must be one of {', '.join(KEY_MAPPINGS)}, got {key_mapping!r}")
    file_sd = read_state_dict(path, what)
    if key_mapping == "auto":
        heads = classifier_prefixes(model)
        shared = any(k in file_sd for k in model.state_dict() if not k.startswith(heads))
        key_mapping = "name" if shared else "order"
    if key_mapping == "order":
        if Path(path).suffix.lower() == ".safetensors":
            raise WeightsLoadError(
                f"weights file {path} does not fit {what} by name, and a .safetensors file keeps no tensor order "
                f"(it is stored sorted by dtype and name) to map its keys by; save the state dict with torch.save "
                f"(.pth) in the model's order, or with the model's key names"
            )
        _load_by_order(model, file_sd, path=path, what=what)
    else:
        _load_by_name(model, file_sd, path=path, what=what, checkpoint_filter=checkpoint_filter)
    return key_mapping


def _headless_fits(model: torch.nn.Module, n_file: int, with_batches_tracked: bool) -> bool:
    """Whether a file of ``n_file`` tensors is the model's feature extractor alone (no classifier)."""
    heads = classifier_prefixes(model)
    keys = [k for k in model.state_dict() if with_batches_tracked or tensor_kind(k) != "num_batches_tracked"]
    return bool(heads) and len(keys) != n_file and len([k for k in keys if not k.startswith(heads)]) == n_file


def _load_by_order(model: torch.nn.Module, file_sd: dict[str, torch.Tensor], *, path: Path, what: str) -> None:
    has_tracked = any(tensor_kind(k) == "num_batches_tracked" for k in file_sd)
    if _headless_fits(model, len(file_sd), has_tracked):
        model.reset_classifier(0)
    model_sd = model.state_dict()
    mapped = map_by_order(file_sd, model_sd, path=path, what=what)
    for key, value in model_sd.items():  # the model's own num_batches_tracked when the file has none
        mapped.setdefault(key, value)
    model.load_state_dict(mapped, strict=True)


def _key_report(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> tuple[list, list, list]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, mismatched


def _load_by_name(model: torch.nn.Module, file_sd: dict[str, torch.Tensor], *, path: Path, what: str,
                  checkpoint_filter: Callable | None) -> None:
    state_dict = file_sd
    if checkpoint_filter is not None:
        try:
            state_dict = checkpoint_filter(state_dict, model)
        except Exception as e:
            raise WeightsLoadError(f"weights file {path} does not fit {what}: {type(e).__name__}: {e}") from None
    missing, unexpected, mismatched = _key_report(model, state_dict)
    heads = classifier_prefixes(model)
    if missing and not unexpected and not mismatched and heads and all(k.startswith(heads) for k in missing):
        # a checkpoint of the feature extractor alone: its classifier is dropped anyway
        model.reset_classifier(0)
        missing, unexpected, mismatched = _key_report(model, state_dict)
    detail = ""
    if not (missing or unexpected or mismatched):
        try:
            model.load_state_dict(state_dict, strict=True)
            return
        except RuntimeError as e:
            detail = str(e).splitlines()[0]
    report = (missing, unexpected, mismatched)
    raise WeightsLoadError(_name_mismatch_message(model, file_sd, path, what, report, detail))


def _name_mismatch_message(model: torch.nn.Module, file_sd: Mapping[str, torch.Tensor], path: Path, what: str,
                           report: tuple[list, list, list], detail: str) -> str:
    def some(items: list[str]) -> str:
        shown = ", ".join(items[:4])
        return shown + (f", ... ({len(items)} in all)" if len(items) > 4 else "")

    missing, unexpected, mismatched = report
    parts = [f"{len(items)} {label} ({some(items)})" for items, label in
             ((missing, "missing keys"), (unexpected, "unexpected keys"), (mismatched, "shape mismatches")) if items]
    if detail:
        parts.append(detail)
    model_sd = model.state_dict()
    if not any(tensor_kind(k) == "num_batches_tracked" for k in file_sd):
        model_sd = {k: v for k, v in model_sd.items() if tensor_kind(k) != "num_batches_tracked"}
    hint = (" Its tensors do fit the model by order (same count, kinds and shapes): if it is this architecture "
            "under other key names, load it with key_mapping='order'." if not order_mismatches(file_sd, model_sd)
            else " Is it the checkpoint of this architecture?")
    return f"weights file {path} does not fit {what}: " + "; ".join(parts) + "." + hint
