"""The ``swsa`` command line: demo, catalog, synth, embed, embed-text, score, report, info, bench,
import-scores, export-validation, split-refs,
export-detector, predict, verify, relocate.

Every subcommand has ``--help``. Errors print one line (``swsa: error: ...``) and exit with a
non-zero status; ``--debug`` shows the full traceback instead.

One module per command group: :mod:`.data` (catalog, synth, embed, embed-text, import-scores,
split-refs, export-validation), :mod:`.scoring` (score), :mod:`.report` (report, info),
:mod:`.bench` (bench), :mod:`.demo` (demo), :mod:`.predict` (export-detector, predict),
:mod:`.store_admin` (verify, relocate); :mod:`.common` holds the shared option helpers.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys

from swsa_engine.app.cli.bench import add_bench_command
from swsa_engine.app.cli.common import attach_wait_values, ray_kwargs
from swsa_engine.app.cli.data import (add_catalog_command, add_embed_command, add_embed_text_command,
                                      add_export_validation_command, add_import_scores_command, add_split_refs_command,
                                      add_synth_command)
from swsa_engine.app.cli.demo import add_demo_command
from swsa_engine.app.cli.predict import add_export_detector_command, add_predict_command
from swsa_engine.app.cli.report import add_info_command, add_report_command
from swsa_engine.app.cli.scoring import add_score_command
from swsa_engine.app.cli.store_admin import add_relocate_command, add_verify_command
from swsa_engine.run.report_inputs import grouped_skip_reasons

__all__ = ["main", "build_parser", "grouped_skip_reasons", "ray_kwargs", "swsa_version"]

log = logging.getLogger("swsa")


def build_parser() -> argparse.ArgumentParser:
    """The ``swsa`` argument parser with every command."""
    parser = argparse.ArgumentParser(
        prog="swsa",
        description="Selection With Synthetic Anomalies: choose anomaly detectors without labelled validation data.",
    )
    parser.add_argument("--version", action="version", version=f"swsa {swsa_version()}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # in the order `swsa --help` lists them
    for add in (add_demo_command, add_catalog_command, add_synth_command, add_embed_command,
                add_score_command, add_embed_text_command, add_report_command, add_import_scores_command,
                add_bench_command, add_split_refs_command, add_info_command, add_export_validation_command,
                add_export_detector_command, add_predict_command, add_verify_command, add_relocate_command):
        add(sub)
    return parser


def swsa_version() -> str:
    """The installed distribution's version (``pyproject.toml``), or a note when swsa is not installed."""
    try:
        return importlib.metadata.version("swsa")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown: not installed; pip install -e .)"


def _quiet_after_broken_pipe() -> int:
    """The reader of stdout went away (``swsa ... | head``): point stdout at devnull so the
    interpreter's final flush cannot fail again, and end quietly (as the Python docs advise)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured): nothing to redirect
        pass
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run ``swsa`` with ``argv`` (default: the process's arguments); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(attach_wait_values(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return status
    except BrokenPipeError:
        return _quiet_after_broken_pipe()
    except KeyboardInterrupt:
        print("swsa: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user; --debug for the traceback
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"swsa: error: {message}", file=sys.stderr)
        return 1
