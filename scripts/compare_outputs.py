"""Compare two output trees of swsa (reports, benches, stores): every file equal except timings.

Usage: python scripts/compare_outputs.py BEFORE_DIR AFTER_DIR

Used to check that a refactor changed no output: run the same commands (demo, bench) into two
folders, before and after, then compare. Fields whose name says they are a timing (seconds,
gflops, speedup, peak memory, ...) and lines of stage times are ignored; absolute paths that
contain the output folder are compared relative to it. Exit status 1 when anything differs.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

TIMING = re.compile(r"(second|_s$|time|gflops|speedup|_ms$|ms_per|per_s|throughput|peak_rss)", re.I)
SKIPPED_SUFFIXES = {".png", ".jpg", ".lock"}  # images: the stores' image paths and ids are compared instead


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not TIMING.search(k)}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def same_h5(before: Path, after: Path, roots: tuple[str, str]) -> list[str]:
    differences = []
    with h5py.File(before) as x, h5py.File(after) as y:
        names = []
        x.visit(names.append)
        for name in names:
            if not isinstance(x[name], h5py.Dataset):
                continue
            if name not in y:
                differences.append(f"{name} missing")
                continue
            u, v = x[name][...], y[name][...]
            if u.dtype.kind in "OS":
                u = np.array([str(s.decode() if isinstance(s, bytes) else s).replace(roots[0], "") for s in u.ravel()])
                v = np.array([str(s.decode() if isinstance(s, bytes) else s).replace(roots[1], "") for s in v.ravel()])
            if u.shape != v.shape or not np.array_equal(u, v, equal_nan=u.dtype.kind == "f"):
                differences.append(name)
    return differences


def same_text(before: Path, after: Path, roots: tuple[str, str]) -> bool:
    if before.suffix == ".json":
        return without_timings(json.loads(before.read_text())) == without_timings(json.loads(after.read_text()))
    if before.suffix == ".csv":
        x, y = pd.read_csv(before), pd.read_csv(after)
        keep = [c for c in x.columns if not TIMING.search(c)]
        return list(x.columns) == list(y.columns) and x[keep].equals(y[keep])
    lines_x = [line.replace(roots[0], "") for line in before.read_text(errors="replace").splitlines() if "Stage times" not in line]
    lines_y = [line.replace(roots[1], "") for line in after.read_text(errors="replace").splitlines() if "Stage times" not in line]
    return lines_x == lines_y


def main(before_dir: str, after_dir: str) -> int:
    before, after = Path(before_dir), Path(after_dir)
    roots = (str(before), str(after))
    same, different = 0, 0
    for path in sorted(p for p in before.rglob("*") if p.is_file() and p.suffix not in SKIPPED_SUFFIXES):
        other = after / path.relative_to(before)
        if not other.exists():
            print(f"missing after: {path.relative_to(before)}")
            different += 1
            continue
        if path.read_bytes() == other.read_bytes():
            same += 1
            continue
        problems = same_h5(path, other, roots) if path.suffix == ".h5" else ([] if same_text(path, other, roots) else ["content"])
        if problems:
            print(f"differs: {path.relative_to(before)} {problems[:5]}")
            different += 1
        else:
            same += 1
    print(f"{same} files the same (timings aside), {different} different")
    return int(different > 0)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
