"""``swsa verify`` (is a store intact: schema, embedding checksums, image files and hashes,
orphaned temporary files) and ``swsa relocate`` (re-point one dataset's image root)."""

from __future__ import annotations

import argparse

from swsa_engine.app.cli.common import add_command, add_store_option
from swsa_store.verify import relocate_dataset, verify_store

__all__ = ["cmd_verify", "cmd_relocate", "add_verify_command", "add_relocate_command"]


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify_store(args.store, repair=args.repair, images=not args.no_images)
    for line in report.notes:
        print(f"note: {line}")
    for path in report.repaired:
        print(f"removed: {path}")
    checked = ", ".join(f"{k}={v}" for k, v in report.checked.items())
    if report.ok:
        print(f"verify: store {args.store} is intact ({checked})")
        return 0
    print(f"verify: store {args.store}: {len(report.problems)} problem(s) ({checked})")
    for line in report.problems:
        print(f"  {line}")
    return 1


def cmd_relocate(args: argparse.Namespace) -> int:
    summary = relocate_dataset(args.store, args.dataset, args.root, check=not args.no_check)
    print(f"relocate: dataset {summary['dataset']}: {summary['images']} images now under {summary['new_root']} "
          f"(was {summary['old_root']})")
    return 0


def add_verify_command(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "verify", cmd_verify,
                    "check a store: schema, every embedding row against its checksum, every image file and its "
                    "sha256, orphaned temporary files; exits 1 with a list of problems")
    add_store_option(p)
    p.add_argument("--repair", action="store_true", help="remove orphaned temporary files of killed writers")
    p.add_argument("--no-images", dest="no_images", action="store_true", help="do not hash the image files")


def add_relocate_command(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "relocate", cmd_relocate,
                    "record a new root folder for one dataset's images (after moving them); paths stay relative to it")
    add_store_option(p)
    p.add_argument("--dataset", required=True, help="the dataset's name in the store")
    p.add_argument("--root", required=True, help="the folder that now holds the dataset's images")
    p.add_argument("--no-check", dest="no_check", action="store_true",
                   help="do not require every image to exist under the new root")
