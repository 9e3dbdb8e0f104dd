"""The generator contract, registry and seeding behind ``swsa synth`` (re-exported by
:mod:`swsa_store.synth`, which also imports the built-in generators so they register).

A generator module imports this module (never the package), subclasses :class:`AnomalyGenerator`
(or :class:`SingleParentGenerator`) and registers with ``@register_generator("name")``.

Determinism: a generator draws every random number from the ``rng`` it is given (never
from numpy's, torch's or Python's global state), and :func:`generator_rng` derives that
``rng`` from (base seed, task id, generator name) only, so the same config and seed give
the same synthetic images on every machine and in every process.

Honesty: an output that does not visibly differ from its parent is not an anomaly.
:class:`SingleParentGenerator` checks every output with :func:`unchanged_reason` and redraws it
(the next draws of the same ``rng``, same parent) up to :data:`MAX_ATTEMPTS` times; if every
attempt is unchanged the output is a *skip* (a :class:`SyntheticImage` with ``image=None`` and a
``skip_reason``), which :mod:`swsa_store.synthesize` catalogues as ``status="skipped"`` — never
as an anomaly. The number of redraws is recorded in the image's ``params["redraws"]``.
"""

from __future__ import annotations

import abc
import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
from PIL import Image

from swsa_store.registry import Registry

__all__ = [
    "GENERATORS",
    "CHANGE_LEVEL",
    "MAX_ATTEMPTS",
    "MIN_CHANGED_PIXELS",
    "MIN_CHANGED_SHARE",
    "MIN_IMAGE_SIDE",
    "AnomalyGenerator",
    "SingleParentGenerator",
    "SyntheticImage",
    "check_edit_args",
    "changed_pixels",
    "check_generate_args",
    "create_generator",
    "generator_rng",
    "list_generators",
    "min_changed_pixels",
    "register_generator",
    "unchanged_reason",
]

#: Registry of anomaly generators (name -> class or factory returning an AnomalyGenerator).
GENERATORS: Registry["AnomalyGenerator"] = Registry("anomaly generator")

#: Smallest image side (pixels) a generator accepts.
MIN_IMAGE_SIDE = 8

# The "unchanged output" tolerance (see :func:`unchanged_reason`). An output is an anomaly when at
# least ``max(MIN_CHANGED_PIXELS, ceil(MIN_CHANGED_SHARE * W * H))`` of its pixels differ from the
# parent by more than ``CHANGE_LEVEL`` grey levels in some channel. Why these numbers:
#
# * CHANGE_LEVEL = 2 (of 255, under 1 %): the colour jitter of a patch pasted back on a dark or
#   flat region moves values by 0-2 levels (a 10 % brightness factor on a value of 20 is 2
#   levels), the hue round trip of a grey patch by 1; a step of 1-2 levels is at or below the
#   visible contrast threshold of 8-bit images and within JPEG noise of the seeds themselves.
# * MIN_CHANGED_SHARE = 1e-4: a third of the smallest default scar at the paper's 256 px
#   (2 x 10 px = 3.05e-4 of the image), so a genuine scar whose pixels partly fall on similar
#   texture still counts, at every size from 256 px up (1024 px: 105 of a smallest 8 x 40 scar).
# * MIN_CHANGED_PIXELS = 4: below 256 px the share is under 7 px; 4 px (a 2 x 2 block, under
#   half of the smallest 2 x 5 px scar that :mod:`.cutpaste` draws at small sizes) is the floor.
#
# Measured (500 scars from 100 seeds, first draws): the paper's scar sizes at 64 px left 69/500
# ELPV cells (bilinear from 300 px; 0 pixel-identical) and 148/500 sklearn digits
# (nearest-upsampled; 79 pixel-identical) under this tolerance; with the scar sizes of
# :mod:`.cutpaste` 2/500 and 83/500, and with redraws none, and no skip.
# CutPaste (normal) and Perlin: 0-3/500 (tests/test_generators_honest.py).

#: A pixel counts as changed when some channel moved by more than this many levels (0-255).
CHANGE_LEVEL = 2
#: An anomaly changes at least this share of the image's pixels ...
MIN_CHANGED_SHARE = 1e-4
#: ... and at least this many pixels.
MIN_CHANGED_PIXELS = 4
#: Attempts per output (the first draw and up to MAX_ATTEMPTS - 1 redraws) before it is a skip:
#: an output unchanged with probability p (0.23 for scar on 64 px digits) is a skip with p**10
#: (4e-7); a parent that no edit can change (a flat image) costs 10 cheap edits.
MAX_ATTEMPTS = 10


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
    the generator's parameters for it (a JSON-serialisable dict, stored as provenance).

    A *skip* (no anomaly could be made, e.g. every attempt left the parent unchanged) has
    ``image=None`` and a one-line ``skip_reason``; it is catalogued as skipped, never as an
    anomaly."""

    image: Image.Image | None
    parent_ids: tuple[int, ...]
    params: dict = field(default_factory=dict)
    skip_reason: str = ""

    def __post_init__(self) -> None:
        if self.image is None:
            if not isinstance(self.skip_reason, str) or not self.skip_reason.strip():
                raise ValueError("a SyntheticImage without an image needs a skip_reason saying why it was skipped")
        elif not isinstance(self.image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(self.image).__name__}")
        elif self.skip_reason:
            raise ValueError(f"a SyntheticImage with an image cannot be a skip (skip_reason={self.skip_reason!r})")
        object.__setattr__(self, "parent_ids", tuple(int(i) for i in self.parent_ids))
        try:
            json.dumps(self.params, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"expected JSON-serialisable params, got {self.params!r} ({exc}); "
                "fix the generator to record plain ints/floats/strings/lists/dicts"
            ) from None

    @property
    def skipped(self) -> bool:
        """True for a skip (no image)."""
        return self.image is None


def min_changed_pixels(width: int, height: int) -> int:
    """Pixels an anomaly of a ``width`` x ``height`` image must change (see :data:`MIN_CHANGED_SHARE`)."""
    return max(MIN_CHANGED_PIXELS, math.ceil(MIN_CHANGED_SHARE * int(width) * int(height)))


def changed_pixels(output: Image.Image, parent: Image.Image) -> int:
    """How many pixels of ``output`` differ from ``parent`` (both as RGB) by more than
    :data:`CHANGE_LEVEL` levels in some channel; every pixel when the sizes differ."""
    if output.size != parent.size:
        return int(output.width * output.height)
    a = np.asarray(output.convert("RGB"), dtype=np.int16)
    b = np.asarray(parent.convert("RGB"), dtype=np.int16)
    return int((np.abs(a - b) > CHANGE_LEVEL).any(axis=-1).sum())


def unchanged_reason(output: Image.Image, parent: Image.Image, parent_id: int, *, what: str = "output",
                     changed: int | None = None) -> str:
    """``""`` when ``output`` is an anomaly of ``parent``, else why not (one line): fewer than
    :func:`min_changed_pixels` pixels differ by more than :data:`CHANGE_LEVEL` levels.
    ``changed``: :func:`changed_pixels` of the two when already known."""
    n = changed_pixels(output, parent) if changed is None else int(changed)
    need = min_changed_pixels(*output.size)
    if n >= need:
        return ""
    if n == 0 and np.array_equal(np.asarray(output.convert("RGB")), np.asarray(parent.convert("RGB"))):
        return f"{what} is pixel-identical to its parent image {int(parent_id)}"
    return (f"{what} differs from its parent image {int(parent_id)} in only {n} pixels by more than "
            f"{CHANGE_LEVEL} levels (an anomaly needs {need})")


class AnomalyGenerator(abc.ABC):
    """Base class of synthetic anomaly generators.

    Subclasses set the class attribute ``name`` (the registry name) and implement
    :meth:`generate`, drawing all randomness from ``rng``.
    """

    name: ClassVar[str] = ""
    #: Commit the catalogue after this many finished images (None: by time only, every
    #: ``commit_every_s`` seconds). Slow generators set it so that a kill loses one batch at most.
    commit_every: int | None = None

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
    its parent uniformly from the seeds with ``rng``, then :meth:`make` edits it.

    Every output is checked with :func:`unchanged_reason`; an unchanged one is redrawn from
    the same parent with the next draws of ``rng`` (deterministic for a seed), at most
    ``max_attempts`` attempts in all, and recorded as a skip if all of them are unchanged (the
    parent stays the one drawn, so a flat seed shows up as skips instead of biasing the parent
    distribution). ``params["redraws"]`` is the number of redraws (0: the first draw was an
    anomaly) and ``params["changed_pixels"]`` the pixels it changed."""

    #: Attempts per output before it is a skip.
    max_attempts: ClassVar[int] = MAX_ATTEMPTS

    @abc.abstractmethod
    def make(self, image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
        """One anomaly from ``image`` and its parameters, all randomness from ``rng``."""

    def make_anomaly(self, image: Image.Image, image_id: int, rng: np.random.Generator) -> SyntheticImage:
        """One checked anomaly of ``image`` (id ``image_id``): :meth:`make`, redrawn while its
        output is unchanged, or a skip after ``max_attempts`` unchanged attempts."""
        attempts = int(self.max_attempts)
        for attempt in range(attempts):
            out, params = self.make(image, rng)
            n = changed_pixels(out, image)
            reason = unchanged_reason(out, image, image_id, what=f"{self.name or type(self).__name__} output",
                                      changed=n)
            params = {**params, "redraws": attempt, "changed_pixels": n}
            if not reason:
                return SyntheticImage(image=out, parent_ids=(int(image_id),), params=params)
        return SyntheticImage(image=None, parent_ids=(int(image_id),), params=params,
                              skip_reason=f"{reason} after {attempts} attempts (a flat or uniform image?)")

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
            out.append(self.make_anomaly(seed_images[k], int(seed_ids[k]), rng))
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
