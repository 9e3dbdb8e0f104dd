"""Synthetic anomaly generators: the extension point behind ``swsa synth``.

SWSA (Fung et al.) turns a task's *seed* images into labelled synthetic anomalies with a
training-free generator (CutPaste, DiffStyle, ...). Every generator is registered in
:data:`GENERATORS` and follows one contract (:class:`AnomalyGenerator`)::

    gen = create_generator("cutpaste", variant="normal")
    rng = generator_rng(base_seed=0, task_id=17, generator_name="cutpaste")
    out = gen.generate(seed_images, seed_ids, count=100, rng=rng)   # list[SyntheticImage]

Determinism: a generator draws every random number from the ``rng`` it is given (never
from numpy's, torch's or Python's global state), and :func:`generator_rng` derives that
``rng`` from (base seed, task id, generator name) only, so the same config and seed give
the same synthetic images on every machine and in every process.

Honesty: an output that does not visibly differ from its parent (:func:`unchanged_reason`) is
redrawn, and after :data:`MAX_ATTEMPTS` unchanged attempts returned as a skip (``image=None``,
``skip_reason``), which ``synthesize`` catalogues as skipped, never as an anomaly.
"""

from __future__ import annotations

from swsa_store.synth import cutpaste, diffstyle, perlin
from swsa_store.synth.base import (
    CHANGE_LEVEL, GENERATORS, MAX_ATTEMPTS, MIN_CHANGED_PIXELS, MIN_CHANGED_SHARE, MIN_IMAGE_SIDE, AnomalyGenerator,
    SingleParentGenerator, SyntheticImage, changed_pixels, check_edit_args, check_generate_args, create_generator,
    generator_rng, list_generators, min_changed_pixels, register_generator, unchanged_reason,
)

__all__ = [
    "CHANGE_LEVEL",
    "GENERATORS",
    "MAX_ATTEMPTS",
    "MIN_CHANGED_PIXELS",
    "MIN_CHANGED_SHARE",
    "MIN_IMAGE_SIDE",
    "AnomalyGenerator",
    "SingleParentGenerator",
    "SyntheticImage",
    "changed_pixels",
    "check_edit_args",
    "check_generate_args",
    "create_generator",
    "cutpaste",
    "diffstyle",
    "generator_rng",
    "list_generators",
    "min_changed_pixels",
    "perlin",
    "register_generator",
    "unchanged_reason",
]
