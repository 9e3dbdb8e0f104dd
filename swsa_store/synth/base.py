"""The generator contract, registry and seeding behind ``swsa synth`` (re-exported by
:mod:`swsa_store.synth`, which also imports the built-in generators so they register).

A generator module imports this module (never the package), subclasses :class:`AnomalyGenerator`
(or :class:`SingleParentGenerator`) and registers with ``@register_generator("name")``.

Determinism: a generator draws every random number from the ``rng`` it is given (never
from numpy's, torch's or Python's global state), and :func:`generator_rng` derives that
``rng`` from (base seed, task id, generator name) only, so the same config and seed give
the same synthetic images on every machine and in every process.
"""

from __future__ import annotations

import abc
import json
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
from PIL import Image

from swsa_store.registry import Registry

__all__ = [
    "GENERATORS",
    "MIN_IMAGE_SIDE",
    "AnomalyGenerator",
    "SingleParentGenerator",
    "SyntheticImage",
    "check_edit_args",
    "check_generate_args",
    "create_generator",
    "generator_rng",
    "list_generators",
    "register_generator",
]

#: Registry of anomaly generators (name -> class or factory returning an AnomalyGenerator).
GENERATORS: Registry["AnomalyGenerator"] = Registry("anomaly generator")

#: Smallest image side (pixels) a generator accepts.
MIN_IMAGE_SIDE = 8


def register_generator(name: str | None = None, *, overwrite: bool = False) -> Callable:
    """Decorator registering an :class:`AnomalyGenerator` class or factory under ``name``."""
    return GENERATORS.register(name, overwrite=overwrite)


def create_generator(name: str, /, **kwargs: Any) -> "AnomalyGenerator":
    """Build the generator registered as ``name`` (unknown names list the valid ones)."""
    return GENERATORS.create(name, **kwargs)


def list_generators() -> list[str]:
    """Sorted names of the registered generators."""
    return GENERATORS.names()


def _name_key(name: str) -> int:
    """A stable 32-bit key for a generator name (crc32 of UTF-8; never Python's ``hash``)."""
    return zlib.crc32(name.encode("utf-8")) & 0xFFFFFFFF


def generator_rng(base_seed: int, task_id: int, generator_name: str) -> np.random.Generator:
    """The random stream for one (base seed, task, generator).

    Built as ``np.random.default_rng(SeedSequence(entropy=base_seed,
    spawn_key=(task_id, crc32(generator_name))))``: streams for different tasks or
    generators are statistically independent, and the result depends on nothing but the
    three arguments (not on ``PYTHONHASHSEED``, process, or call order).
    """
    for label, value in (("base_seed", base_seed), ("task_id", task_id)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(
                f"expected {label} to be a non-negative integer, got {value!r}; "
                f"fix the {label} in your config"
            )
    if not isinstance(generator_name, str) or not generator_name:
        raise ValueError(
            f"expected generator_name to be a non-empty string, got {generator_name!r}; "
            "pass a registered name (see list_generators())"
        )
    seq = np.random.SeedSequence(
        entropy=int(base_seed), spawn_key=(int(task_id), _name_key(generator_name))
    )
    return np.random.default_rng(seq)


@dataclass(frozen=True)
class SyntheticImage:
    """One synthetic anomaly: the image, the ids of the seed images it was made from, and
    the generator's parameters for it (a JSON-serialisable dict, stored as provenance)."""

    image: Image.Image
    parent_ids: tuple[int, ...]
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(self.image).__name__}")
        object.__setattr__(self, "parent_ids", tuple(int(i) for i in self.parent_ids))
        try:
            json.dumps(self.params, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"expected JSON-serialisable params, got {self.params!r} ({exc}); "
                "fix the generator to record plain ints/floats/strings/lists/dicts"
            ) from None


class AnomalyGenerator(abc.ABC):
    """Base class of synthetic anomaly generators.

    Subclasses set the class attribute ``name`` (the registry name) and implement
    :meth:`generate`, drawing all randomness from ``rng``.
    """

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def generate(
        self,
        seed_images: Sequence[Image.Image],
        seed_ids: Sequence[int],
        count: int,
        rng: np.random.Generator,
    ) -> list[SyntheticImage]:
        """Make ``count`` synthetic anomalies from ``seed_images`` (whose ids are ``seed_ids``)."""

    def describe(self) -> dict:
        """JSON-serialisable description (name and settings) for provenance records."""
        return {"name": self.name}


class SingleParentGenerator(AnomalyGenerator):
    """A generator that edits one seed image at a time: each of the ``count`` anomalies draws
    its parent uniformly from the seeds with ``rng``, then :meth:`make` edits it."""

    @abc.abstractmethod
    def make(self, image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
        """One anomaly from ``image`` and its parameters, all randomness from ``rng``."""

    def generate(
        self,
        seed_images: Sequence[Image.Image],
        seed_ids: Sequence[int],
        count: int,
        rng: np.random.Generator,
    ) -> list[SyntheticImage]:
        check_generate_args(seed_images, seed_ids, count, rng)
        out: list[SyntheticImage] = []
        for _ in range(int(count)):
            k = int(rng.integers(len(seed_images)))
            image, params = self.make(seed_images[k], rng)
            out.append(SyntheticImage(image=image, parent_ids=(int(seed_ids[k]),), params=params))
        return out


def check_edit_args(image, rng) -> tuple[int, int]:
    """Validate one image edit's inputs (a PIL image at least :data:`MIN_IMAGE_SIDE` px, a numpy
    Generator); returns the image's (width, height)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"expected rng to be a numpy.random.Generator, got {type(rng).__name__}; "
            "build one with swsa_store.synth.generator_rng(base_seed, task_id, name)"
        )
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}; load it with PIL.Image.open(...)")
    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"expected an image at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} px, got "
            f"{width}x{height}; fix the dataset or drop that image"
        )
    return width, height


def check_generate_args(
    seed_images: Sequence[Image.Image],
    seed_ids: Sequence[int],
    count: int,
    rng: np.random.Generator,
    *,
    min_side: int = MIN_IMAGE_SIDE,
) -> None:
    """Validate :meth:`AnomalyGenerator.generate` arguments; raise ValueError/TypeError clearly."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(
            f"expected count to be a non-negative integer, got {count!r}; "
            "fix the number of synthetic anomalies per task in your config"
        )
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"expected rng to be a numpy.random.Generator, got {type(rng).__name__}; "
            "build one with swsa_store.synth.generator_rng(base_seed, task_id, name)"
        )
    if len(seed_images) == 0:
        raise ValueError(
            "expected at least one seed image, got 0; "
            "fix the task's seed split (it needs a non-empty seed set)"
        )
    if len(seed_ids) != len(seed_images):
        raise ValueError(
            f"expected one seed id per seed image, got {len(seed_ids)} ids for "
            f"{len(seed_images)} images; fix the seed_ids argument"
        )
    for image_id, image in zip(seed_ids, seed_images):
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"expected PIL images as seeds, got {type(image).__name__} for image id "
                f"{image_id}; load images with PIL.Image.open(...)"
            )
        width, height = image.size
        if min(width, height) < min_side:
            raise ValueError(
                f"expected seed images at least {min_side}x{min_side} px, got "
                f"{width}x{height} for image id {image_id}; fix the dataset or drop that image"
            )
