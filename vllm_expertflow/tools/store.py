"""`vllm-expertflow store list|gc`: the disk stores in a store_dir, and removing unused ones.

`list` shows each store's checkpoint, size, age and state; `gc` removes the ones `why_unused`
names (incomplete, of an older format, stale, or whose checkpoint is gone), never one a process
has open, after asking (or with `--yes`).
"""

from __future__ import annotations

import argparse
import sys

from vllm_expertflow.core.config import ExpertFlowConfig
from vllm_expertflow.core.store_catalog import StoreInfo, list_stores, remove_store, why_unused


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "gc"])
    parser.add_argument(
        "--store-dir",
        default=ExpertFlowConfig().resolved_store_dir,
        help="the store_dir option's folder (default: %(default)s)",
    )
    parser.add_argument("--yes", action="store_true", help="gc: remove without asking")


def describe(store: StoreInfo) -> str:
    if store.in_use:
        state = "in use"
    elif store.complete:
        state = "complete"
    elif store.format is not None and store.fingerprint is None:
        state = f"format {store.format}"
    else:
        state = "incomplete"
    return (
        f"{store.path}  {store.size_bytes / 2**30:.2f} GiB  {store.age_seconds / 86400:.1f} days"
        f"  {state}  model {store.model}"
    )


def run(args: argparse.Namespace) -> int:
    stores = list_stores(args.store_dir)
    if args.action == "list":
        if not stores:
            print(f"no stores in {args.store_dir}")
        for store in stores:
            print(describe(store))
        return 0
    unused = [(store, reason) for store in stores if (reason := why_unused(store)) is not None]
    if not unused:
        print(f"nothing to remove in {args.store_dir} ({len(stores)} stores in use or current)")
        return 0
    for store, reason in unused:
        print(f"{describe(store)}\n    unused: {reason}")
    total = sum(store.size_bytes for store, _ in unused) / 2**30
    if not args.yes:
        answer = input(f"remove these {len(unused)} stores ({total:.2f} GiB)? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 1
    for store, _ in unused:
        remove_store(store)
    print(f"removed {len(unused)} stores ({total:.2f} GiB)", file=sys.stderr)
    return 0
