"""The architecture figures of a checkout: cycles, in-function imports, private imports, sizes, probes.

Usage: python scripts/architecture_stats.py [ROOT]   (ROOT: a checkout, default this one)

Uses the rules of tests/test_architecture.py, so the numbers are what that test checks; run it on an
older checkout (e.g. a `git worktree`) to compare before and after a change.
"""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_architecture as rules  # noqa: E402  (the rules live with their test)


def function_lengths(modules, limit: int = 60) -> list[tuple[int, str]]:
    """(lines, "path:line name") of every function longer than ``limit`` lines, longest first."""
    long = [(node.end_lineno - node.lineno + 1, f"{m.rel}:{node.lineno} {node.name}")
            for m in modules.values() for node in ast.walk(m.tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit]
    return sorted(long, reverse=True)


def main(root: Path) -> None:
    modules = rules.load_modules(root)
    imports = [(m, i) for m in modules.values() for i in rules.imports_of(m, modules) if rules.within(i.module, rules.PACKAGES)]
    late = sum(not i.at_top for _, i in imports)
    print(f"modules {len(modules)}; internal imports {len(imports)}, inside functions {late} "
          f"({100 * late / max(len(imports), 1):.0f} %)")
    every = collections.defaultdict(set)
    for m, i in imports:
        if i.module in modules and i.module != m.name:
            every[m.name].add(i.module)
    print(f"import cycles: {len(rules.cycles(rules.import_graph(modules)))} at module level, "
          f"{len(rules.cycles({n: every.get(n, set()) for n in modules}))} counting in-function imports")
    print(f"private cross-module imports: {len(list(rules.rule_no_private_imports(modules)))}")
    big = sorted(((m.lines, m.rel) for m in modules.values() if m.lines > rules.MAX_MODULE_LINES), reverse=True)
    print(f"modules over {rules.MAX_MODULE_LINES} lines: {len(big)} {big[:5]}; largest "
          f"{max((m.lines, m.rel) for m in modules.values())}")
    print(f"silent broad excepts: {len(list(rules.rule_no_silent_broad_except(modules)))}")
    print(f"detector capability probes: {len(list(rules.rule_no_detector_probing(modules)))}")
    long = function_lengths(modules)
    print(f"functions over 60 lines: {len(long)} {long[:3]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
