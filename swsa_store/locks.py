"""The store's writer lock, its progress file and its orphaned temporary files.

One protocol for every writer (catalog, synth, embed, embed-text, score, import-scores,
split-refs): :func:`store_lock` is taken *before* the work starts and held until it ends. It is an
exclusive ``flock`` on ``<store>.lock``, whose content names the holder (PID, command, start
time), so that a second writer fails at once with::

    store S is being written by PID 1234 (swsa synth) since 2025-01-01T10:00:00+00:00; wait or pass --wait

or, given ``wait`` seconds (``None``: no limit), waits for the lock. The lock is re-entrant within
a process: a command that holds it may call library functions that take it again (``edit_store``,
``add_images``, ...). ``flock`` is released by the kernel when its holder dies, so a SIGKILL-ed
writer never leaves a stale lock.

When a process takes the lock (its outermost acquisition), every temporary file left by an
earlier writer of the store is an orphan — no other writer can be running — and is removed
(:func:`remove_orphans`): copies made by ``edit_store`` (``.S.edit.<pid>``, ``…compact``),
stores being created, results being saved, progress files being replaced. So they never pile up.

The library functions that write a store and are called from Python as well as from the CLI
(``run_sweep``, ``import_scores``, ``split_references``, ...) are decorated with
:func:`writes_store`: the lock is taken at their public boundary, before any read or work, for
their whole run — so a Python caller is refused (or waits) exactly like ``swsa score``; under the
CLI, which already holds the lock, the decorator re-enters it.

Writers report how far they are in ``<store>.progress`` (JSON, replaced atomically:
:func:`write_progress` / :func:`read_progress`), readable from outside while they run.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from swsa_store.schema import StoreError, utc_now

__all__ = ["store_lock", "writes_store", "lock_holder", "held_by_me", "remove_orphans", "orphan_files", "write_progress",
           "read_progress", "progress_path", "lock_path"]

#: Seconds between two tries while waiting for the lock.
POLL_S = 0.1


@dataclass
class _Held:
    handle: object
    depth: int
    pid: int


_HELD: dict[str, _Held] = {}


def lock_path(store_path: str | os.PathLike) -> Path:
    """``<store>.lock``."""
    return Path(str(store_path) + ".lock")


def progress_path(store_path: str | os.PathLike) -> Path:
    """``<store>.progress``: the running writer's progress (JSON)."""
    return Path(str(store_path) + ".progress")


def _key(store_path) -> str:
    return os.path.realpath(lock_path(store_path))


def held_by_me(store_path: str | os.PathLike) -> bool:
    """Whether this process holds the writer lock of ``store_path``."""
    held = _HELD.get(_key(store_path))
    return held is not None and held.pid == os.getpid()


def lock_holder(store_path: str | os.PathLike) -> dict:
    """What ``<store>.lock`` says about its (last) holder: ``pid``, ``command``, ``since``; {} if unreadable."""
    try:
        info = json.loads(lock_path(store_path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _busy_message(store_path, waited: float | None) -> str:
    info = lock_holder(store_path)
    who = f"PID {info['pid']}" if "pid" in info else "another process"
    if info.get("command"):
        who += f" ({info['command']})"
    since = f" since {info['since']}" if info.get("since") else ""
    tail = "wait or pass --wait" if not waited else f"gave up after waiting {waited:g} s; wait longer (--wait)"
    return f"store {store_path} is being written by {who}{since}; {tail}"


def _command_line() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if not name or name.startswith("-"):
        return "python"
    args = [a for a in sys.argv[1:] if not a.startswith("-")][:1]
    return " ".join(["swsa" if name in ("swsa", "__main__.py") else name, *args])


def _acquire(store_path, wait: float | None):
    path = lock_path(store_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")
    deadline = None if wait is None else time.monotonic() + max(0.0, float(wait))
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                handle.close()
                raise StoreError(_busy_message(store_path, wait)) from None
            time.sleep(POLL_S)


@contextlib.contextmanager
def store_lock(store_path: str | os.PathLike, *, wait: float | None = 0.0, command: str | None = None,
               clean: bool = True) -> Iterator[list[Path]]:
    """Hold the exclusive writer lock of ``store_path`` (re-entrant within this process).

    ``wait``: seconds to wait for another writer (0: fail at once, ``None`` or ``inf``: no limit).
    ``command`` is recorded for the error another writer sees (default: this process's command).
    On the outermost acquisition (and with ``clean``) orphaned temporary files of the store are
    removed; yields their paths (empty when re-entered).
    """
    if wait is not None and math.isinf(float(wait)):
        wait = None
    key = _key(store_path)
    held = _HELD.get(key)
    if held is not None and held.pid == os.getpid():
        held.depth += 1
        try:
            yield []
        finally:
            held.depth -= 1
        return
    handle = _acquire(store_path, wait)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "command": command or _command_line(), "since": utc_now()}))
        handle.flush()
        _HELD[key] = _Held(handle, 1, os.getpid())
        removed = remove_orphans(store_path) if clean else []
        yield removed
    finally:
        _HELD.pop(key, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(progress_path(store_path))
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def writes_store(command: str, *, when: str | None = None):
    """Decorator of a public function that writes a store, ``f(store_path, ..., wait=0.0, ...)``:
    each call holds the writer lock of its first argument (:func:`store_lock`) for its whole run,
    taken before the function does anything, recorded as ``command`` (e.g. "swsa score").

    The function declares a keyword ``wait`` (seconds to wait for another writer; 0 fails at once,
    None waits without limit) and documents it; the decorator reads it. ``when`` names a boolean
    parameter of the function (e.g. ``"save"``): a call where it is false writes nothing and runs
    without the lock. Re-entrant: under a caller that holds the lock (the CLI) nothing is waited for.
    """
    def decorate(function):
        signature = inspect.signature(function)
        needed = {"wait"} | ({when} if when else set())
        if not needed <= set(signature.parameters):
            raise TypeError(f"writes_store: {function.__qualname__} must declare the parameter(s) "
                            f"{sorted(needed - set(signature.parameters))}")

        @functools.wraps(function)
        def locked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            if when is not None and not bound.arguments[when]:
                return function(*args, **kwargs)
            store_path = next(iter(bound.arguments.values()))
            with store_lock(store_path, wait=bound.arguments["wait"], command=command):
                return function(*args, **kwargs)

        return locked

    return decorate


# --------------------------------------------------------------------------- orphaned temporary files


def orphan_files(store_path: str | os.PathLike, *, deep: bool = False) -> list[Path]:
    """Temporary files left by writers of ``store_path`` that died (or ran out of disk).

    Only meaningful while no writer runs (under :func:`store_lock`, or when ``swsa verify``
    finds the lock free). ``deep`` also walks the store's files folder (atomic image writes of
    ``synth``: ``.<name>.<pid>.tmp``) — that can take long for a large store.
    """
    store_path = Path(store_path)
    name = store_path.name
    folder = store_path.parent if str(store_path.parent) else Path(".")
    found: list[Path] = []
    patterns = (f".{name}.edit.*", f".{name}.creating.*", f".{name}.progress.*.tmp")
    for pattern in patterns:
        found += [p for p in folder.glob(pattern) if p.is_file()]
    results = store_path.with_name(name + ".results")
    if results.is_dir():
        found += [p for p in results.glob(".*.tmp") if p.is_file()]
    files_dir = store_path.with_name(name + ".files")
    if deep and files_dir.is_dir():
        for dirpath, _, filenames in os.walk(files_dir):
            found += [Path(dirpath) / f for f in filenames if f.startswith(".") and f.endswith(".tmp")]
    return sorted(set(found))


def remove_orphans(store_path: str | os.PathLike, *, deep: bool = False, under: Path | None = None) -> list[Path]:
    """Delete :func:`orphan_files` (and with ``under``, temporary files below that folder); returns them."""
    found = orphan_files(store_path, deep=deep)
    if under is not None and Path(under).is_dir():
        for dirpath, _, filenames in os.walk(under):
            found += [Path(dirpath) / f for f in filenames if f.startswith(".") and f.endswith(".tmp")]
    removed = []
    for path in sorted(set(found)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


# --------------------------------------------------------------------------- progress


def write_progress(store_path: str | os.PathLike, **fields) -> None:
    """Replace ``<store>.progress`` with ``fields`` (+ pid, time) — atomically, not fsync-ed (a hint)."""
    final = progress_path(store_path)
    tmp = final.with_name(f".{Path(store_path).name}.progress.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "updated": time.time(), **fields}), encoding="utf-8")
    os.replace(tmp, final)


def read_progress(store_path: str | os.PathLike) -> dict:
    """The running writer's last :func:`write_progress` fields; {} when there are none."""
    try:
        return json.loads(progress_path(store_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
