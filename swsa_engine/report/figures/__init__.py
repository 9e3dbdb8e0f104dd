"""The report's PNG figures: one module per figure, each registering itself.

Adding a figure = one new module in this package that defines ``draw(cube, path, **options)
-> Path`` decorated with ``@register_figure("name")``; importing this package imports every
module in it, so the figure is then listed by :func:`list_figures` and drawn by
``create_figure("name", cube=..., path=..., ...)``. The figures today:

* ``figure3`` (:mod:`.figure3`): real vs synthetic AUROC per candidate (the paper's Figure 3);
* ``figure4`` (:mod:`.figure4`): t-SNE of one task per dataset (the paper's Figure 4).
"""

from __future__ import annotations

import importlib
import pkgutil

from swsa_engine.report.figures.registry import FIGURES, create_figure, list_figures, register_figure

__all__ = ["FIGURES", "register_figure", "create_figure", "list_figures"]

# one module per figure: import each so that it registers itself (the registry module excepted)
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")
