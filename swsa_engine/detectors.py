"""The detector extension point: a candidate of the AUROC cube is (feature source, detector, settings).

A detector turns a task's support features (its bank) into anomaly scores of query features.
Register one with ``@register_detector("name")``; ``create_detector("name", **settings)``
builds it and ``parse_detector("knn(k=5,metric=cosine)")`` builds it from its readable label.
The sweep names a candidate ``<feature source>`` for the paper's default detector
(:data:`DEFAULT_DETECTOR`, kNN with k = 3 on squared L2) and ``<feature source>/<label>`` for
every other detector, e.g. ``vit_b_16/knn(k=5,cosine)``.

Detectors shipped:

* ``knn`` (Bergman et al.'s DN2): the sum of squared L2 distances to the ``k`` nearest bank rows;
  ``metric="cosine"`` L2-normalises every feature first, so the score is ``2 Σ (1 − cos)``.
  Held-out normals, which are in the bank, are scored leave-one-out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from swsa_store.registry import Registry

DETECTORS: Registry = Registry("detector")


def register_detector(name: str):
    """Decorator registering a detector factory ``factory(**settings) -> detector``."""
    return DETECTORS.register(name)


def create_detector(name: str, /, **settings):
    """Build the registered detector ``name`` with ``settings``."""
    return DETECTORS.create(name, **settings)


def list_detectors() -> list[str]:
    return DETECTORS.names()


@dataclass(frozen=True)
class KnnDetector:
    """kNN anomaly score. ``k`` neighbours; ``metric`` "l2" (squared L2) or "cosine"."""

    k: int = 3
    metric: str = "l2"

    def __post_init__(self):
        if not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"knn needs an integer k >= 1, got {self.k!r}")
        if self.metric not in ("l2", "cosine"):
            raise ValueError(f"knn metric must be 'l2' or 'cosine', got {self.metric!r}")

    @property
    def label(self) -> str:
        return f"knn(k={self.k},{self.metric})"

    @property
    def family(self) -> str:
        return "knn"

    def prepare(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features as the detector compares them (L2-normalised rows for cosine)."""
        if self.metric == "l2":
            return features
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        return features / np.where(norms > 0, norms, 1.0)


@register_detector("knn")
def knn(k: int = 3, metric: str = "l2") -> KnnDetector:
    return KnnDetector(int(k), metric)


DEFAULT_DETECTOR = KnnDetector(3, "l2")

_LABEL = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\((.*)\))?\s*$")


def parse_detector(text: str):
    """A detector from its label: ``knn``, ``knn(k=5)``, ``knn(k=5,metric=cosine)`` or ``knn(k=5,cosine)``."""
    match = _LABEL.match(text)
    if not match:
        raise ValueError(f"cannot read detector {text!r}; write it as name(setting=value, ...), e.g. knn(k=5,metric=cosine)")
    name, body = match.group(1), match.group(2) or ""
    settings: dict = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        if "=" in part:
            key, value = (s.strip() for s in part.split("=", 1))
        elif name == "knn":  # the label form knn(k=5,cosine)
            key, value = "metric", part
        else:
            raise ValueError(f"cannot read setting {part!r} of detector {text!r}; write setting=value")
        settings[key] = int(value) if re.fullmatch(r"-?\d+", value) else value
    try:
        return create_detector(name, **settings)
    except TypeError as error:
        raise ValueError(f"detector {name!r} does not take these settings {sorted(settings)}: {error}") from None


def candidate_name(feature_source: str, detector) -> str:
    """The cube's name of a (feature source, detector) candidate."""
    return feature_source if detector == DEFAULT_DETECTOR else f"{feature_source}/{detector.label}"
