"""The command line that bench/'s markdown tables over run folders share: the folders as positional arguments,
--samples for the bootstrap where a table has one, --out for the table and --json for the data behind it, and a
one-line error (exit 2) instead of a traceback when a folder is not what the table reads."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple


def table_main(argv, *, prog: str, description: str, folders: Sequence[Tuple[str, str]],
               make: Callable[[argparse.Namespace], Tuple[str, Optional[dict]]], samples: bool = False,
               with_json: bool = True, flags: Sequence[Tuple[str, str]] = ()) -> int:
    """Parse argv, call make(args) -> (markdown, its data), print the markdown and write --out / --json.
    `flags`: the table's own on/off options, (name, help)."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    for name, text in folders:
        ap.add_argument(name, help=text)
    ap.add_argument("--out", help="also write the table to this file")
    if with_json:
        ap.add_argument("--json", help="also write the data behind the table to this file as JSON")
    for name, text in flags:
        ap.add_argument(name, action="store_true", help=text)
    if samples:
        ap.add_argument("--samples", type=int, default=10000, help="bootstrap resamples (default 10000)")
    args = ap.parse_args(argv)
    try:
        text, data = make(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    if with_json and args.json:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0
