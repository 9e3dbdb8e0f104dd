"""Dataset extension point: every dataset is first a *samples table*.

Following anomalib's "samples table first" design, a dataset does not hand out tensors; it
describes every one of its image files as one row of a :class:`pandas.DataFrame`. Everything
downstream (the catalog that assigns image ids, task construction, ingest) reads that table.

Extension point (see :mod:`swsa_store.registry`)::

    DATASETS = Registry("dataset")     # swsa_store.datasets.registry
    @register_dataset("name")          # decorator on a class or factory function
    create_dataset(name, **kwargs)     # -> a dataset object
    list_datasets()                    # -> sorted registered names

A dataset object has ``name: str`` and ``samples() -> pd.DataFrame`` (see :class:`Dataset`).

Samples table columns (:data:`SAMPLE_COLUMNS`, in this order)
--------------------------------------------------------------
``path``          str   absolute path of the image file (symlinks are *not* resolved).
``rel_path``      str   path relative to the dataset root, "/"-separated (stable across
                        machines; two renders into different folders differ only in ``path``).
``class_name``    str   the class; for these generic datasets every class is just a class
                        (which class is "normal" is decided later, per task).
``split``         str   "train" or "test".
``dataset``       str   the dataset's ``name``.
``source_index``  int   index of the sample in the original dataset (digits: the index into
                        ``load_digits()``), otherwise a running number in table order.
``status``        str   "ok" or "skipped". Rows are never silently dropped: an image that
                        cannot be decoded, or a symlink escaping the root, is kept as a row
                        with status "skipped".
``skip_reason``   str   why a row was skipped ("" when ok), e.g.
                        "cannot decode image: UnidentifiedImageError: cannot identify image file".
``sha256``        str   hex SHA-256 of the file bytes; "" when the file could not be read.
``width``         int   decoded width in pixels; 0 when skipped.
``height``        int   decoded height in pixels; 0 when skipped.

Rows are sorted by ``(class_name, split, rel_path)`` (plain code-point order) and the index
is ``0..n-1``, so image ids assigned in table order are stable across runs and machines.

Datasets (one module each; each registers itself when this package is imported)
--------------------------------------------------------------------------------
``digits``        :class:`~.digits.DigitsDataset` — scikit-learn's bundled handwritten digits, rendered to PNG.
``folder``        :class:`~.folder.ImageFolderDataset` — any ``root/<class>/<files>`` or
                  ``root/{train,test}/<class>/<files>`` folder.
``cub``           :mod:`.cub` — CUB-200-2011 from its official index files.
``flowers``       :mod:`.flowers` — Oxford Flowers-102.
``mvtec``         :mod:`.mvtec` — MVTec-AD (protocol ``defect``).
``visa``          :mod:`.visa` — VisA (protocol ``defect``).
``tinyimagenet``  :mod:`.tiny_imagenet` — Tiny-ImageNet-200 (the auxiliary-outlier source).
``elpv``          :mod:`.elpv` — the ELPV solar cells (protocol ``defect``).

The index-file loaders (all but ``digits`` and ``folder``) share :class:`~.base.PaperDataset`
(:mod:`swsa_store.datasets.base`: their extra ``defect`` column, attributes and rules). Adding a
dataset = one new module in this package that subclasses it (or follows :class:`Dataset`),
decorated with ``@register_dataset("name")``: importing this package imports every module in it,
so the new dataset registers itself.

:func:`read_image` is the one place that turns a file into an RGB :class:`PIL.Image.Image`;
it raises :class:`ImageReadError` (a ``ValueError``) with a one-line message;
:func:`inspect_image_file` reads a file into a row's status, reason, hash and size. Both, and
:data:`SAMPLE_COLUMNS`, live in :mod:`swsa_store.samples` (re-exported here). A class every one
of whose images is skipped is an error naming the reasons
(:func:`~swsa_store.samples.require_usable_classes`).
"""

from __future__ import annotations

import importlib
import pkgutil

from swsa_store.datasets.base import NORMAL_DEFECT, PAPER_SAMPLE_COLUMNS, PaperDataset
from swsa_store.datasets.cub import CUBDataset
from swsa_store.datasets.digits import DigitsDataset
from swsa_store.datasets.elpv import ElpvDataset
from swsa_store.datasets.flowers import FlowersDataset
from swsa_store.datasets.folder import ImageFolderDataset
from swsa_store.datasets.mvtec import MVTecDataset
from swsa_store.datasets.registry import (
    DATASETS, DEFAULT_EXTENSIONS, SPLITS, Dataset, create_dataset, list_datasets, register_dataset,
)
from swsa_store.datasets.tiny_imagenet import TinyImageNetDataset
from swsa_store.datasets.visa import VisADataset
from swsa_store.samples import SAMPLE_COLUMNS, ImageReadError, inspect_image_file, read_image

__all__ = [
    "DATASETS",
    "DEFAULT_EXTENSIONS",
    "NORMAL_DEFECT",
    "PAPER_DATASETS",
    "PAPER_SAMPLE_COLUMNS",
    "SAMPLE_COLUMNS",
    "SPLITS",
    "CUBDataset",
    "Dataset",
    "DigitsDataset",
    "ElpvDataset",
    "FlowersDataset",
    "ImageFolderDataset",
    "ImageReadError",
    "MVTecDataset",
    "PaperDataset",
    "TinyImageNetDataset",
    "VisADataset",
    "create_dataset",
    "inspect_image_file",
    "list_datasets",
    "read_image",
    "register_dataset",
]

#: The four datasets of the paper's benchmark (Tiny-ImageNet is its auxiliary-outlier source).
PAPER_DATASETS = ("cub", "flowers", "mvtec", "visa")

# one module per dataset: import each so that it registers itself (a new module needs no edit here)
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
