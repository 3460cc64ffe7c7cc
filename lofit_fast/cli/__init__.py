"""`lofit-fast`: LoFiT from the command line (select heads, tune, evaluate, merge, export, run, demo, and the
relatives: iti, steer, rep-tune). Thin commands over `lofit_fast.experiments` and the library.

    lofit-fast run --task truthfulqa --data DATA_DIR --out runs/tqa     # select + tune + eval, + random heads
    lofit-fast demo                                                    # a short run on built-in examples
    python -m lofit_fast.cli ...                                       # the same (what `torchrun -m` needs)

Errors a user can fix (a missing file, an unknown model, a bad option) print one line and exit with 1.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

import torch

from . import adapter_cmds, generate_cmds, lofit_cmds, method_cmds
from .common import UserError, check_args, fill_task_defaults

__all__ = ["main", "build_parser", "UserError"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lofit-fast",
        description="LoFiT (localized fine-tuning of attention heads) on Llama / Gemma models, fast.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    lofit_cmds.register(sub)
    adapter_cmds.register(sub)
    generate_cmds.register(sub)
    method_cmds.register(sub)
    return parser


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_foreign_start_up_noise(cuda: bool) -> None:
    """torchao (installed for --quantize) warns on every start that a CPU-only torch cannot load its CUDA kernel
    libraries, and torch warns about torchao's deprecated pytree registrations. Neither concerns the user's run,
    so those two messages are dropped (torchao's only where there is no CUDA); every other message stays."""
    wanted = [("torch.utils._pytree", "register_constant() on Enum subclasses")]
    if not cuda:
        wanted.append(("torchao", "Failed to load"))
    for name, fragment in wanted:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.fragments == (fragment,) for f in logger.filters):
            logger.addFilter(_DropMessages(fragment))  # once, however many times main() runs in a process


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_foreign_start_up_noise(torch.cuda.is_available())
    fill_task_defaults(args)
    try:
        check_args(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("lofit-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        if getattr(args, "debug", False) or os.environ.get("LOFIT_FAST_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "" if isinstance(exc, (UserError, FileNotFoundError, ValueError)) else f"{type(exc).__name__}: "
        print(f"lofit-fast {args.command}: error: {kind}{message}", file=sys.stderr)
        return 1
