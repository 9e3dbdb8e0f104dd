"""What every ``swsa`` command group shares: option parsing helpers and the one-line summary."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import re

import numpy as np

from swsa_engine.core.selection import DEFAULT_LABELS, STRATEGIES
from swsa_store.locks import store_lock

__all__ = [
    "split_list", "ray_kwargs", "add_ray_options", "print_summary", "add_command", "add_store_option",
    "add_device_option", "add_loader_options", "add_weights_options", "task_id_list", "add_custom_strategy",
    "attach_wait_values",
]

#: ``module:function`` of a custom selection strategy (``--strategy``).
STRATEGY_SPEC = re.compile(r"([A-Za-z_][\w.]*):([A-Za-z_]\w*)")


def split_list(value) -> list[str]:
    """A comma-separated option (or a list of them) as a list of non-empty, stripped items; [] for None."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        value = ",".join(value)
    return [v.strip() for v in str(value).split(",") if v.strip()]


def task_id_list(value) -> list[int] | None:
    """A ``--tasks`` value ("0,3") as a list of task ids; None when not given; a one-line
    :class:`ValueError` naming an item that is not a whole number."""
    items = split_list(value)
    if value is None or not items:
        return None
    ids = []
    for item in items:
        if not re.fullmatch(r"\d+", item):
            raise ValueError(f"--tasks: {item!r} is not a task id (comma-separated whole numbers, e.g. 0,3)")
        ids.append(int(item))
    return sorted(set(ids))


def add_custom_strategy(spec: str) -> str:
    """Import ``module:function`` and register the function as a selection strategy shown in
    Table 1 and the strategies comparison; returns its row label ("<function> (custom)").

    The function takes a :class:`~swsa_engine.core.selection.SelectionContext` and returns, per
    task, the picked candidate's index ``(T,)`` or weights ``(T, C)``. It never sees real labels:
    its context's ``real`` AUROCs are NaN. A bad spec, a module that fails to import or a missing
    or non-callable function is a one-line :class:`ValueError`.
    """
    match = STRATEGY_SPEC.fullmatch(spec.strip())
    if not match:
        raise ValueError(f"--strategy {spec!r}: expected module:function, e.g. my_strategies:median_synthetic")
    module_name, function_name = match.groups()
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or the module's own error while importing
        raise ValueError(f"--strategy {spec}: cannot import module {module_name!r}: {type(error).__name__}: {error}") from error
    function = vars(module).get(function_name)
    if not callable(function):
        raise ValueError(f"--strategy {spec}: module {module_name!r} has no function {function_name!r}")
    label = f"{function_name} (custom)"

    def without_labels(ctx):
        return function(dataclasses.replace(ctx, real=np.full_like(ctx.real, np.nan)))

    def factory(**_):
        return without_labels

    factory.uses_labels = False
    name = f"custom:{spec.strip()}"
    STRATEGIES.add(name, factory, overwrite=True)  # a second --strategy of the same spec replaces it
    DEFAULT_LABELS[name] = label
    return label


def ray_kwargs(args: argparse.Namespace) -> dict:
    """The scale-out options of `embed`/`synth` as keyword arguments of swsa_store.distributed."""
    return {"address": None if args.ray == "local" else args.ray, "actors_per_gpu": args.actors_per_gpu,
            "num_actors": args.actors, "read_on": args.read_on, "cpu_threads": args.cpu_threads}


def add_ray_options(p: argparse.ArgumentParser) -> None:
    """The scale-out options (--ray, --actors-per-gpu, --actors, --read-on, --cpu-threads) of embed, synth and bench."""
    g = p.add_argument_group("scale-out on Ray (pip install 'swsa[distributed]'; the driver stays the store's only writer)")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: 'auto' (the cluster this machine belongs to), a cluster address (host:port or "
                        "ray://host:10001), or nothing for a local Ray instance")
    g.add_argument("--actors-per-gpu", dest="actors_per_gpu", type=int, default=1,
                   help="model actors per GPU (each reserves 1/N of a GPU; default 1)")
    g.add_argument("--actors", type=int, default=None,
                   help="number of model actors (default: GPUs x actors per GPU; without GPUs half the cluster's CPUs)")
    g.add_argument("--read-on", dest="read_on", choices=("driver", "any"), default="driver",
                   help="where images are read: on the driver's node (default; no shared file system needed) or on "
                        "any node (every node sees the catalog's paths)")
    g.add_argument("--cpu-threads", dest="cpu_threads", type=int, default=None,
                   help="threads of CPU actors (default: Ray's, 1 per actor); the local path's thread count gives its bytes")


def print_summary(stage: str, summary: dict) -> None:
    """One line ``stage: key=value, ...``."""
    parts = ", ".join(f"{k}={v}" for k, v in summary.items())
    print(f"{stage}: {parts}")


#: Commands that write a store: they take its writer lock before any work and take ``--wait``.
WRITER_COMMANDS = ("catalog", "synth", "embed", "embed-text", "score", "import-scores", "split-refs", "relocate")


def add_command(sub: argparse._SubParsersAction, name: str, func, help_text: str) -> argparse.ArgumentParser:
    """A subcommand running ``func(args)``, with the --quiet every command takes; a command of
    :data:`WRITER_COMMANDS` runs holding the store's writer lock and takes ``--wait [SECONDS]``."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(func=_holding_lock(func, name) if name in WRITER_COMMANDS else func)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if name in WRITER_COMMANDS:
        p.add_argument("--wait", nargs="?", type=_seconds, const=math.inf, default=0.0, metavar="SECONDS",
                       help="when another process is writing the store, wait for it (for SECONDS; no number: "
                            "as long as it takes) instead of stopping at once. Only a number after --wait is its "
                            "value: `--wait folder` waits without limit and keeps `folder` as the next argument")
    return p


def attach_wait_values(argv: list[str]) -> list[str]:
    """``argv`` with every ``--wait`` (before a ``--``) made unambiguous for argparse, which would
    otherwise take whatever follows ``--wait`` as its value, a positional argument included:
    ``--wait 30`` → ``--wait=30``; ``--wait`` followed by anything that is not a number (another
    option, a positional, nothing) → ``--wait=inf`` (wait without limit), the next word left alone."""
    out = list(argv)
    end = out.index("--") if "--" in out else len(out)
    for i in range(end - 1, -1, -1):
        if out[i] != "--wait":
            continue
        following = out[i + 1] if i + 1 < end else None
        if following is not None and _is_number(following):
            out[i:i + 2] = [f"--wait={following}"]
        else:
            out[i] = "--wait=inf"
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _seconds(text: str) -> float:
    """``--wait``'s value: a number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--wait takes a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"--wait takes a number of seconds >= 0, got {text!r}")
    return value


def _holding_lock(func, name: str):
    """``func`` run under the writer lock of ``args.store`` (taken before any work, see swsa_store.locks)."""
    def run(args: argparse.Namespace) -> int:
        with store_lock(args.store, wait=args.wait, command=f"swsa {name}"):
            return func(args)
    return run


def add_store_option(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """The required --store option."""
    p.add_argument("--store", required=True, help=help)


def add_device_option(p: argparse.ArgumentParser | argparse._ArgumentGroup, default: str | None = "cpu",
                      help: str | None = None) -> None:
    """The --device option (default cpu)."""
    p.add_argument("--device", default=default, help=help)


def add_loader_options(p: argparse.ArgumentParser) -> None:
    """--batch-size and --workers of the local embedding DataLoader (demo, embed)."""
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader worker processes that read the images (default 0: threads of this process)")


def add_weights_options(p: argparse.ArgumentParser, weights_help: str, weights_dir_help: str) -> None:
    """Where a model's weights come from (embed, embed-text)."""
    p.add_argument("--weights", default=None, help=weights_help)
    p.add_argument("--weights-dir", default=None, help=weights_dir_help)
    p.add_argument("--allow-download", action="store_true", help="allow downloading weights (offline by default)")
