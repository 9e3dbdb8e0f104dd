"""The errors and warnings of detector bundles (:mod:`swsa_engine.run.bundle`), in their own module so
that every bundle module can raise them without importing another."""

from __future__ import annotations

__all__ = ["BundleError", "BundleWarning"]


class BundleError(ValueError):
    """A detector bundle that cannot be used: missing or tampered files, another schema version,
    a detector this swsa rebuilds differently."""


class BundleWarning(UserWarning):
    """A bundle that loads but may not reproduce its exported scores exactly (e.g. PyOD refitted
    under another PyOD or scikit-learn version)."""
