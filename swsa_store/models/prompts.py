"""CLIP prompt sets (SWSA paper, Appendix A), the per-task prompt table and the BLISS dictionary
(Goodge et al.): the strings that :mod:`swsa_store.models.clip` embeds.

A prompt set holds ``(normal, anomaly)`` template pairs per dataset (``{}`` stands for the task's


class label; the first pair is the default prompt). :func:`paper_prompt_set` is the paper's;
:func:`load_prompt_file` reads a user's from TOML or JSON.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "BLISS_TEMPLATE", "GENERIC_TEMPLATES", "PAPER_TEMPLATES", "PromptSet", "bliss_dictionary", "fill_template",
    "load_prompt_file", "paper_prompt_set", "task_label", "task_prompt_table", "templates_used",
]

#: BLISS's prompt for class labels and dictionary entries (Section 5).
BLISS_TEMPLATE = "This is a photo of a {}"

_PHRASES = [("a photo of a {}", "a photo of {}"), ("a cropped photo of a {}", "a cropped photo of {}"),
            ("a dark photo of a {}", "a dark photo of {}"), ("a photo of a {} for inspection", "a photo of {} for inspection"),
            ("a photo of a {} for viewing", "a photo of {} for viewing"), ("a bright photo of a {}", "a bright photo of {}"),
            ("a close-up photo of a {}", "a close-up photo of {}"), ("a blurry photo of a {}", "a blurry photo of {}"),
            ("a photo of a small {}", "a photo of a small {}"), ("a photo of a large {}", "a photo of a large {}")]


def _natural(noun: str) -> list[tuple[str, str]]:
    pairs = []
    for normal, anomaly in _PHRASES:
        pairs.append((normal.replace("{}", "{} " + noun), anomaly.replace("{}", "some " + noun)))
    return pairs


#: Appendix A, verbatim (including its "a photo of a small some bird" and
#: "a blurry photo of {} with defect" wordings).
PAPER_TEMPLATES: dict[str, list[tuple[str, str]]] = {
    "flowers": _natural("flower"),
    "cub": _natural("bird"),
    "industrial": [
        ("a photo of a {}", "a photo of a {} with defect"),
        ("a cropped photo of a {}", "a cropped photo of a {} with defect"),
        ("a dark photo of a {}", "a dark photo of a {} with defect"),
        ("a photo of a {} for inspection", "a photo of a {} with defect for inspection"),
        ("a photo of a {} for viewing", "a photo of a {} with defect for viewing"),
        ("a bright photo of a {}", "a bright photo of a {} with defect"),
        ("a close-up photo of a {}", "a close-up photo of a {} with defect"),
        ("a blurry photo of a {}", "a blurry photo of {} with defect"),
        ("a photo of a small {}", "a photo of a small {} with defect"),
        ("a photo of a large {}", "a photo of a large {} with defect"),
    ],
}
#: Not from the paper: the same ten phrasings for other multi-class datasets, anomaly = "some object".
GENERIC_TEMPLATES: list[tuple[str, str]] = [(n, a.replace("{}", "some object")) for n, a in _PHRASES]
# which family a dataset uses; defect-protocol datasets default to "industrial"
_DATASET_FAMILY = {"flowers": "flowers", "oxford_flowers": "flowers", "cub": "cub", "cub200": "cub",
                   "mvtec": "industrial", "mvtec_ad": "industrial", "visa": "industrial"}


@dataclass
class PromptSet:
    """Template pairs per dataset: ``templates[key]`` is a list of ``(normal, anomaly)`` strings
    with ``{}`` standing for the task's class label; the first pair is the default prompt.

    ``key`` is a dataset name, a protocol (``"defect"``, ``"multiclass"``) or ``"*"`` (any).
    All lists of one set have the same length (the prompts are candidates ``prompt01``...).
    """

    name: str
    templates: dict[str, list[tuple[str, str]]]
    description: str = ""

    def __post_init__(self):
        lengths = {k: len(v) for k, v in self.templates.items()}
        if not lengths or min(lengths.values()) == 0:
            raise ValueError(f"prompt set {self.name!r} has no templates")
        if len(set(lengths.values())) > 1:
            raise ValueError(f"prompt set {self.name!r}: every template list must have the same length, got {lengths}")
        for key, pairs in self.templates.items():
            for pair in pairs:
                if len(pair) != 2 or not all(isinstance(p, str) and p.strip() for p in pair):
                    raise ValueError(f"prompt set {self.name!r}, {key!r}: each template is a [normal, anomaly] pair "
                                     f"of non-empty strings, got {pair!r}")
        self.templates = {k: [tuple(p) for p in v] for k, v in self.templates.items()}

    @property
    def n_templates(self) -> int:
        return len(next(iter(self.templates.values())))

    def templates_for(self, dataset: str, protocol: str = "multiclass") -> list[tuple[str, str]]:
        for key in (dataset, _DATASET_FAMILY.get(dataset.lower()), protocol,
                    "industrial" if protocol == "defect" else None, "*"):
            if key is not None and key in self.templates:
                return self.templates[key]
        raise ValueError(f"prompt set {self.name!r} has no templates for dataset {dataset!r} "
                         f"(keys: {', '.join(self.templates)}); add a '*' entry")


def paper_prompt_set() -> PromptSet:
    """Appendix A's three families (+ a generic one for other datasets), named ``paper``."""
    return PromptSet("paper", {**{k: list(v) for k, v in PAPER_TEMPLATES.items()}, "*": list(GENERIC_TEMPLATES)},
                     "SWSA paper Appendix A (flowers, cub, industrial = MVTec-AD / VisA); '*' other datasets")


def load_prompt_file(path: str | os.PathLike) -> PromptSet:
    """A user prompt set from TOML or JSON::

        name = "mine"                       # prompt set name (default: the file's stem)
        [templates]
        "*" = [["a photo of a {}", "a photo of a damaged {}"],   # first = default prompt
               ["a close-up photo of a {}", "a close-up photo of a broken {}"]]
        my_dataset = [[...], [...]]         # optional per-dataset (or "defect"/"multiclass") lists
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        data = tomllib.loads(text)
    else:
        data = json.loads(text)
    templates = data.get("templates")
    if isinstance(templates, list):
        templates = {"*": templates}
    if not isinstance(templates, dict):
        raise ValueError(f"prompt file {path} needs a 'templates' table: {{dataset or '*': [[normal, anomaly], ...]}}")
    return PromptSet(str(data.get("name") or path.stem), templates, str(data.get("description", f"from {path}")))


def fill_template(template: str, label: str) -> str:
    """``template`` with every ``{}`` replaced by ``label`` (a class label or a dictionary entry)."""
    return template.replace("{}", label)


def task_label(task) -> str:
    """The cleaned class name of a task row (``class_label``, else ``normal_class``)."""
    label = getattr(task, "class_label", None)
    if label is None or (isinstance(label, float) and np.isnan(label)) or not str(label).strip():
        label = task.normal_class
    return str(label)


def task_prompt_table(tasks: pd.DataFrame, prompt_set: PromptSet) -> pd.DataFrame:
    """Rows ``(task_id, template, side, text)`` for every task of ``tasks``; side 0 = normal, 1 = anomaly."""
    rows = []
    for task in tasks.itertuples(index=False):
        protocol = str(getattr(task, "protocol", "") or "multiclass")
        label = task_label(task)
        for j, (normal, anomaly) in enumerate(prompt_set.templates_for(str(task.dataset), protocol)):
            rows.append((int(task.task_id), j, 0, fill_template(normal, label)))
            rows.append((int(task.task_id), j, 1, fill_template(anomaly, label)))
    return pd.DataFrame(rows, columns=["task_id", "template", "side", "text"]).astype(
        {"task_id": np.int64, "template": np.int64, "side": np.int8})


def templates_used(templates: dict, tasks: pd.DataFrame) -> list[list[tuple[str, str]]]:
    """Per template position ``j``, the distinct ``(normal, anomaly)`` pairs the ``tasks`` were
    prompted with (first seen first): :meth:`PromptSet.templates_for` of each task's dataset and
    protocol, as :func:`task_prompt_table` embedded them. ``templates``: a prompt set's stored
    ``{key: [[normal, anomaly], ...]}``. One pair per position when every task used one family."""
    prompt_set = PromptSet("stored", {k: [tuple(p) for p in v] for k, v in templates.items()})
    used: list[list[tuple[str, str]]] = [[] for _ in range(prompt_set.n_templates)]
    for task in tasks.itertuples(index=False):
        protocol = str(getattr(task, "protocol", "") or "multiclass")
        for j, pair in enumerate(prompt_set.templates_for(str(task.dataset), protocol)):
            if tuple(pair) not in used[j]:
                used[j].append(tuple(pair))
    return used


def bliss_dictionary(unique: bool = True, template: str | None = BLISS_TEMPLATE) -> list[str]:
    """BLISS's dictionary: the ImageNet-1k class names (timm's lemma list), split at commas into
    separate entries ("goldfish, Carassius auratus" → "goldfish", "Carassius auratus"), 1,860
    entries; ``unique=True`` (default) drops repeated names (e.g. two "crane"s) keeping the first:
    1,842. Each entry is put in ``template`` (``None``: the bare entries)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    entries = []
    for i in range(info.num_classes()):
        entries += [part.strip() for part in info.index_to_description(i).split(",") if part.strip()]
    if unique:
        entries = list(dict.fromkeys(entries))
    return [fill_template(template, e) for e in entries] if template else entries
