"""The registry of the report's PNG figures (see :mod:`swsa_engine.report.figures`).

A figure is a function ``draw(cube, path, **options) -> Path`` that draws from an
:class:`~swsa_engine.core.cube.AurocCube` (and, for figures of embeddings, the store at
``store_path``, read through :mod:`swsa_engine.run.report_inputs`) and writes one PNG to ``path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from swsa_store.registry import Registry

__all__ = ["FIGURES", "register_figure", "create_figure", "list_figures"]

#: every registered figure, by name ("figure3", "figure4", ...)
FIGURES: Registry[Path] = Registry("figure")


def register_figure(name: str | None = None, *, overwrite: bool = False) -> Callable:
    """Decorator: register a figure function under ``name`` (default: its ``__name__``)."""
    return FIGURES.register(name, overwrite=overwrite)


def create_figure(name: str, /, **kwargs) -> Path:
    """Draw the figure registered as ``name`` with ``kwargs`` (``cube``, ``path``, its options);
    returns the PNG's path. An unknown name raises an error listing the registered ones."""
    return FIGURES.create(name, **kwargs)


def list_figures() -> list[str]:
    """The registered figures' names, sorted."""
    return FIGURES.names()
