"""What every ``swsa`` command group shares: option parsing helpers and the one-line summary."""

from __future__ import annotations

import argparse

__all__ = [
    "split_list", "ray_kwargs", "add_ray_options", "print_summary", "add_command", "add_store_option",
    "add_device_option", "add_loader_options", "add_weights_options",
]


def split_list(value) -> list[str]:
    """A comma-separated option (or a list of them) as a list of non-empty, stripped items; [] for None."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        value = ",".join(value)
    return [v.strip() for v in str(value).split(",") if v.strip()]


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


def add_command(sub: argparse._SubParsersAction, name: str, func, help_text: str) -> argparse.ArgumentParser:
    """A subcommand running ``func(args)``, with the --quiet every command takes."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(func=func)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


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
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")


def add_weights_options(p: argparse.ArgumentParser, weights_help: str, weights_dir_help: str) -> None:
    """Where a model's weights come from (embed, embed-text)."""
    p.add_argument("--weights", default=None, help=weights_help)
    p.add_argument("--weights-dir", default=None, help=weights_dir_help)
    p.add_argument("--allow-download", action="store_true", help="allow downloading weights (offline by default)")
