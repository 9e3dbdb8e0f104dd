"""Reports written whole or not at all: every file goes to a staging folder beside the target
first and is renamed into place only once all are written (``report.md`` last), so a report
killed mid-write leaves the previous report's files (or none), never a half-written one.

A staging folder is ``.<target name>.report-tmp.<pid>`` next to the target; those of writers
that died are removed when the next report into the same target starts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["staging_dir", "publish", "LAST_FILE"]

#: The file renamed into place last: when it is new, every other file is too.
LAST_FILE = "report.md"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def staging_dir(final: str | os.PathLike) -> Path:
    """A fresh, empty staging folder for the report folder ``final`` (orphans of dead writers removed)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.report-tmp."
    for old in final.parent.glob(prefix + "*"):
        pid = old.name[len(prefix):]
        if old.is_dir() and (not pid.isdigit() or not _alive(int(pid)) or int(pid) == os.getpid()):
            shutil.rmtree(old, ignore_errors=True)
    staging = final.parent / f"{prefix}{os.getpid()}"
    staging.mkdir()
    return staging


def publish(staging: Path, final: str | os.PathLike, paths: dict[str, Path]) -> dict[str, Path]:
    """Rename every file of ``staging`` into ``final`` (same relative paths, ``report.md`` last),
    remove ``staging`` and return ``paths`` pointing into ``final``."""
    final = Path(final)
    files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.name == LAST_FILE, str(p)))
    for source in files:
        target = final / source.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    shutil.rmtree(staging, ignore_errors=True)
    return {key: final / Path(path).relative_to(staging) if Path(path).is_relative_to(staging) else Path(path)
            for key, path in paths.items()}
