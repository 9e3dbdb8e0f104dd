"""The layer rules of docs/ARCHITECTURE.md, checked by reading the source with ``ast``.

Each rule returns ``Violation`` rows (file, line, rule, detail); a failing test prints them all,
one per line, so the message names the file, the line and the rule. The rules are also run on
small hand-written packages (``test_rules_catch_*``) to show that each one can fail.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from swsa_engine.report.figures import FIGURES
from swsa_store.datasets import DATASETS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("swsa_store", "swsa_engine")
MAX_MODULE_LINES = 500

# Optional or heavy third-party packages that may be imported inside a function (so that a
# missing extra or a slow import costs only the commands that need it). Everything else is
# imported at the top of its module.
OPTIONAL_HEAVY_IMPORTS = (
    "ray", "diffusers", "open_clip", "playwright", "faiss", "guided_diffusion", "huggingface_hub",
    "safetensors", "transformers", "elpv_dataset", "pyod", "timm",
)
# What ``swsa_engine.core`` may not import: it works on arrays only.
IO_MODULES = ("h5py", "PIL", "swsa_store.store", "swsa_store.catalog", "swsa_store.ingest", "swsa_store.ingest_pipeline",
              "pathlib", "shutil", "tempfile", "glob")
# The store modules that are pure too (no I/O), so ``core`` may use them.
PURE_STORE_MODULES = ("swsa_store.registry", "swsa_store.hashing")
# Engine modules outside ``run`` never touch a store's file directly.
STORE_FILE_MODULES = ("h5py", "swsa_store.store")
STORE_OPENERS = ("open_store", "edit_store", "create_store")
# The ``run`` modules that ``report`` may read from: cube I/O and read-only views, never a scoring pass.
REPORT_READS_FROM_RUN = ("swsa_engine.run.cube_io", "swsa_engine.run.report_inputs")
BROAD_EXCEPTIONS = ("Exception", "BaseException")


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.detail}"


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    lines: int
    is_package: bool
    rel: str             # the path relative to the project root, as messages show it


@dataclass(frozen=True)
class Import:
    module: str          # the imported module (resolved, absolute)
    names: tuple         # names taken from it (empty for ``import x``)
    line: int
    at_top: bool


def load_modules(root: Path, packages=PACKAGES) -> dict[str, Module]:
    """Every module of ``packages`` under ``root``, keyed by dotted name."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            source = path.read_text()
            modules[name] = Module(name, path, ast.parse(source, str(path)), len(source.splitlines()), is_package,
                                   path.relative_to(root).as_posix())
    return modules


def top_level_nodes(tree: ast.Module):
    """Statements at module level, looking inside module-level ``if`` / ``try`` blocks."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If):
            stack.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])


def imports_of(module: Module, modules: dict[str, Module]) -> list[Import]:
    """The imports of ``module``; ``from pkg import sub`` counts as an import of ``pkg.sub``."""
    top = {id(node) for node in top_level_nodes(module.tree)}
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    found = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(alias.name, (), node.lineno, id(node) in top))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            plain = tuple(a.name for a in node.names if f"{base}.{a.name}" not in modules)
            found.append(Import(base, plain, node.lineno, id(node) in top))
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    found.append(Import(f"{base}.{alias.name}", (), node.lineno, id(node) in top))
    return found


def within(name: str, prefixes) -> bool:
    """True if module ``name`` is one of ``prefixes`` or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer_of(name: str) -> str:
    """``store``, ``core``, ``run``, ``report``, ``app`` or ``engine`` (the package root)."""
    if within(name, ("swsa_store",)):
        return "store"
    for layer in ("core", "run", "report", "app"):
        if within(name, (f"swsa_engine.{layer}",)):
            return layer
    return "engine"


# --------------------------------------------------------------------------- the rules


def rule_store_never_imports_engine(modules):
    for module in modules.values():
        if layer_of(module.name) != "store":
            continue
        for imp in imports_of(module, modules):
            if within(imp.module, ("swsa_engine",)):
                yield Violation(module.rel, imp.line, "store-imports-engine",
                                f"{module.name} imports {imp.module}; swsa_store must never import swsa_engine")


def rule_core_is_pure(modules):
    for module in modules.values():
        if layer_of(module.name) != "core":
            continue
        for imp in imports_of(module, modules):
            if within(imp.module, IO_MODULES) or (imp.module == "swsa_store" and set(imp.names) & {"Store", *STORE_OPENERS}):
                yield Violation(module.rel, imp.line, "core-does-io", f"{module.name} imports {imp.module}; core works on arrays only")
            elif within(imp.module, ("swsa_engine.run", "swsa_engine.report", "swsa_engine.app")):
                yield Violation(module.rel, imp.line, "core-imports-upper-layer",
                                f"{module.name} imports {imp.module}; core may import only core (and the pure store modules)")
            elif within(imp.module, ("swsa_store",)) and imp.module not in PURE_STORE_MODULES:
                yield Violation(module.rel, imp.line, "core-imports-store", f"{module.name} imports {imp.module}; core works on arrays only")
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
                yield Violation(module.rel, node.lineno, "core-does-io", f"{module.name} calls open(); core works on arrays only")


def rule_only_run_touches_store(modules):
    for module in modules.values():
        layer = layer_of(module.name)
        if layer in ("store", "run"):
            continue
        for imp in imports_of(module, modules):
            opens = imp.module == "swsa_store" and set(imp.names) & set(STORE_OPENERS)
            if within(imp.module, ("h5py",)) or (layer != "app" and (within(imp.module, STORE_FILE_MODULES) or opens)):
                yield Violation(module.rel, imp.line, "store-outside-run",
                                f"{module.name} ({layer}) imports {imp.module} {list(imp.names)}; in the engine only "
                                f"swsa_engine.run opens a store (app may call store functions, never h5py)")


def rule_report_never_scores(modules):
    for module in modules.values():
        if layer_of(module.name) != "report":
            continue
        for imp in imports_of(module, modules):
            if within(imp.module, ("swsa_engine.run",)) and imp.module not in ("swsa_engine.run", *REPORT_READS_FROM_RUN):
                yield Violation(module.rel, imp.line, "report-runs-a-pass",
                                f"{module.name} imports {imp.module}; report reads cubes (allowed from run: "
                                f"{', '.join(REPORT_READS_FROM_RUN)})")
            elif within(imp.module, ("swsa_engine.app",)):
                yield Violation(module.rel, imp.line, "report-imports-app", f"{module.name} imports {imp.module}")


def rule_no_private_imports(modules):
    for module in modules.values():
        for imp in imports_of(module, modules):
            if not within(imp.module, PACKAGES):
                continue
            for name in imp.names:
                if name.startswith("_") and not name.startswith("__"):
                    yield Violation(module.rel, imp.line, "private-import",
                                    f"{module.name} imports the private name {name} from {imp.module}; make it public or move it")


def rule_imports_at_top(modules):
    for module in modules.values():
        for imp in imports_of(module, modules):
            if not imp.at_top and not within(imp.module, OPTIONAL_HEAVY_IMPORTS):
                yield Violation(module.rel, imp.line, "import-not-at-top",
                                f"{module.name} imports {imp.module} inside a function; only optional heavy "
                                f"dependencies ({', '.join(OPTIONAL_HEAVY_IMPORTS)}) may be imported late")


def rule_module_size(modules):
    for module in modules.values():
        if module.lines > MAX_MODULE_LINES:
            yield Violation(module.rel, 1, "module-too-long",
                            f"{module.name} has {module.lines} lines (at most {MAX_MODULE_LINES}); split it")


def rule_no_silent_broad_except(modules):
    for module in modules.values():
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.ExceptHandler):
                continue
            caught = node.type
            names = [caught] if not isinstance(caught, ast.Tuple) else list(caught.elts) if caught else []
            broad = caught is None or any(isinstance(n, ast.Name) and n.id in BROAD_EXCEPTIONS for n in names)
            if not broad:
                continue
            body = ast.Module(body=node.body, type_ignores=[])
            raises = any(isinstance(n, ast.Raise) for n in ast.walk(body))
            uses_error = node.name is not None and any(
                isinstance(n, ast.Name) and n.id == node.name for n in ast.walk(body))
            if not (raises or uses_error):
                yield Violation(module.rel, node.lineno, "silent-broad-except",
                                f"{module.name} catches {'everything' if caught is None else ast.unparse(caught)} and "
                                f"goes on without re-raising or recording the error; narrow it or record why")


def rule_no_detector_probing(modules):
    for module in modules.values():
        for node in ast.walk(module.tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                    and node.args and "detector" in ast.unparse(node.args[0]).lower()):
                yield Violation(module.rel, node.lineno, "detector-probing",
                                f"{module.name} probes a detector with {ast.unparse(node)}; declare the capability "
                                f"on the Detector protocol and read it directly")


def import_graph(modules) -> dict[str, set[str]]:
    """Module → the swsa modules it imports at module level (a package import includes its __init__)."""
    graph = {}
    for module in modules.values():
        targets = set()
        for imp in imports_of(module, modules):
            if imp.at_top and imp.module in modules and imp.module != module.name:
                targets.add(imp.module)
        graph[module.name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]; counter[0] += 1
        stack.append(start); on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]; counter[0] += 1
                    stack.append(nxt); on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop(); on_stack.discard(member); component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def rule_no_cycles(modules):
    graph = import_graph(modules)
    for component in cycles(graph):
        first = modules[component[0]]
        line = next((imp.line for imp in imports_of(first, modules) if imp.module in component and imp.at_top), 1)
        yield Violation(first.rel, line, "import-cycle", "modules import each other: " + " ↔ ".join(component))


RULES = {
    "store-imports-engine": rule_store_never_imports_engine,
    "core-is-pure": rule_core_is_pure,
    "only-run-touches-store": rule_only_run_touches_store,
    "report-never-scores": rule_report_never_scores,
    "no-private-imports": rule_no_private_imports,
    "imports-at-top": rule_imports_at_top,
    "module-size": rule_module_size,
    "no-silent-broad-except": rule_no_silent_broad_except,
    "no-detector-probing": rule_no_detector_probing,
    "no-cycles": rule_no_cycles,
}


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def project_modules():
    return load_modules(ROOT)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_project_follows_rule(project_modules, rule):
    violations = sorted(RULES[rule](project_modules), key=lambda v: (v.path, v.line))
    assert not violations, f"{len(violations)} violation(s) of {rule}:\n" + "\n".join(map(str, violations))


def write_package(root: Path, files: dict[str, str]) -> dict[str, Module]:
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return load_modules(root)


@pytest.mark.parametrize("rule, files, expected", [
    ("store-imports-engine", {"swsa_store/__init__.py": "", "swsa_store/a.py": "import swsa_engine.core.x\n"},
     "swsa_store/a.py:1: [store-imports-engine]"),
    ("core-is-pure", {"swsa_engine/__init__.py": "", "swsa_engine/core/__init__.py": "",
                      "swsa_engine/core/a.py": "import numpy\nimport h5py\n"}, "swsa_engine/core/a.py:2: [core-does-io]"),
    ("core-is-pure", {"swsa_engine/__init__.py": "", "swsa_engine/core/__init__.py": "",
                      "swsa_engine/core/a.py": "def f(p):\n    return open(p).read()\n"}, "swsa_engine/core/a.py:2: [core-does-io]"),
    ("only-run-touches-store", {"swsa_engine/__init__.py": "", "swsa_engine/report/__init__.py": "",
                                "swsa_engine/report/a.py": "from swsa_store import open_store\n"},
     "swsa_engine/report/a.py:1: [store-outside-run]"),
    ("only-run-touches-store", {"swsa_engine/__init__.py": "", "swsa_engine/app/__init__.py": "",
                                "swsa_engine/app/a.py": "import h5py\n"}, "swsa_engine/app/a.py:1: [store-outside-run]"),
    ("report-never-scores", {"swsa_engine/__init__.py": "", "swsa_engine/run/__init__.py": "", "swsa_engine/run/sweep.py": "",
                             "swsa_engine/report/__init__.py": "", "swsa_engine/report/a.py": "\nfrom swsa_engine.run.sweep import f\n"},
     "swsa_engine/report/a.py:2: [report-runs-a-pass]"),
    ("no-private-imports", {"swsa_store/__init__.py": "", "swsa_store/b.py": "def _g():\n    pass\n",
                            "swsa_store/a.py": "from swsa_store.b import _g\n"}, "swsa_store/a.py:1: [private-import]"),
    ("imports-at-top", {"swsa_store/__init__.py": "", "swsa_store/a.py": "def f():\n    import json\n    import ray\n"},
     "swsa_store/a.py:2: [import-not-at-top]"),
    ("module-size", {"swsa_store/__init__.py": "", "swsa_store/a.py": "x = 1\n" * (MAX_MODULE_LINES + 1)},
     "swsa_store/a.py:1: [module-too-long]"),
    ("no-silent-broad-except", {"swsa_store/__init__.py": "",
                                "swsa_store/a.py": "try:\n    x = 1\nexcept Exception:\n    pass\n"},
     "swsa_store/a.py:3: [silent-broad-except]"),
    ("no-detector-probing", {"swsa_store/__init__.py": "",
                             "swsa_store/a.py": "def f(detector):\n    return getattr(detector, 'needs_abnormal', False)\n"},
     "swsa_store/a.py:2: [detector-probing]"),
    ("no-cycles", {"swsa_store/__init__.py": "", "swsa_store/a.py": "import swsa_store.b\n",
                   "swsa_store/b.py": "from swsa_store import a\n"}, "swsa_store/a.py:1: [import-cycle]"),
])
def test_rules_catch_violations(tmp_path, rule, files, expected):
    modules = write_package(tmp_path, files)
    found = [str(v) for v in RULES[rule](modules)]
    assert any(v.startswith(expected) for v in found), found


def test_rules_accept_the_allowed_forms(tmp_path):
    modules = write_package(tmp_path, {
        "swsa_store/__init__.py": "from swsa_store.store import open_store\n",
        "swsa_store/store.py": "import h5py\ndef open_store(p):\n    return h5py.File(p)\n",
        "swsa_engine/__init__.py": "", "swsa_engine/core/__init__.py": "",
        "swsa_engine/core/a.py": "import numpy as np\nfrom swsa_store.registry import Registry\n",
        "swsa_engine/run/__init__.py": "", "swsa_engine/run/cube_io.py": "from swsa_store import open_store\n",
        "swsa_engine/report/__init__.py": "",
        "swsa_engine/report/a.py": "from swsa_engine.run.cube_io import open_store\n"
                                   "def f():\n    import playwright\n    try:\n        g()\n    except Exception as err:\n"
                                   "        skips.append(str(err))\n",
    })
    found = [str(v) for rule in RULES.values() for v in rule(modules)]
    assert found == [], found


def test_a_dataset_or_figure_is_one_module(project_modules):
    """Every module of ``swsa_store/datasets`` and ``report/figures`` that registers something is
    registered after a plain package import: adding one needs no edit elsewhere."""
    for package, registry in (("swsa_store.datasets", DATASETS), ("swsa_engine.report.figures", FIGURES)):
        registering = {name for name, module in project_modules.items() if name.startswith(package + ".")
                       and any(isinstance(node, ast.Call) and ast.unparse(node.func).startswith("register_")
                               for node in ast.walk(module.tree))} - {f"{package}.registry"}
        registered_from = {getattr(registry.get(name), "__module__", "") for name in registry.names()}
        assert registering <= registered_from, f"{sorted(registering - registered_from)} register nothing on import"
