"""`lofit-fast generate`: greedy generations for a file of prompts, each line with its own adapter (or none),
every adapter's rows batched together through the fused op."""
from __future__ import annotations

import json
import os
from typing import Dict, List

from .._files import atomic_write
from ..adapter import load_adapters
from ..eval import generate_greedy
from ..patch.multi import BASE_NAME
from .common import (
    UserError,
    adapter_spec,
    add_model_arguments,
    load_model_from_args,
    named_adapters,
    positive_int,
)


def read_prompts(path: str, adapters: Dict[str, str]) -> List[dict]:
    """The JSON lines of `path`, each {"prompt": str, "adapter": NAME | null (optional), ...}; every line is
    checked (and a bad one named) before anything loads."""
    if not os.path.isfile(path):
        raise UserError(f"--prompts {path}: file not found")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as exc:
        raise UserError(f"--prompts {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"--prompts {path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise UserError(f"--prompts {path}:{n}: expected an object with a non-empty \"prompt\" string")
        name = row.get("adapter")
        if name is not None and name != BASE_NAME and name not in adapters:
            known = ", ".join(adapters) or "none loaded"
            raise UserError(f"--prompts {path}:{n}: unknown adapter {name!r} (--adapter names: {known}; null or "
                            f"{BASE_NAME!r} for the base model)")
        rows.append(row)
    if not rows:
        raise UserError(f"--prompts {path}: no prompts")
    return rows


def cmd_generate(args) -> int:
    adapters = named_adapters(args.adapter) if args.adapter else {}
    rows = read_prompts(args.prompts, adapters)
    model, tokenizer = load_model_from_args(args)
    if adapters:
        load_adapters(model, adapters, backend=args.backend, default=BASE_NAME)
    names = [row.get("adapter") or BASE_NAME for row in rows]
    texts = generate_greedy(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, progress=not args.quiet, desc="generating",
                            adapter_names=names if adapters else None)
    out_lines = [json.dumps({**row, "adapter": row.get("adapter"), "generated": text}, ensure_ascii=False) + "\n"
                 for row, text in zip(rows, texts)]
    atomic_write(args.out, "".join(out_lines))
    counts = {name: names.count(name) for name in dict.fromkeys(names)}
    print(f"wrote {len(rows)} generations to {args.out} ("
          + ", ".join(f"{n}: {c}" for n, c in counts.items()) + ")")
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="greedy generations for a JSONL file of prompts, an adapter per line")
    add_model_arguments(p)
    p.add_argument("--adapter", type=adapter_spec, action="append", default=None, metavar="NAME=PATH",
                   help="an adapter the prompt lines may name (repeatable; a single bare PATH is named 'lofit')")
    p.add_argument("--prompts", required=True,
                   help='JSONL: {"prompt": "...", "adapter": NAME or null (base model)} per line; other fields are '
                        "copied to the output")
    p.add_argument("--out", required=True, help="output JSONL, in the input order, each line with \"generated\"")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per batch (default 16)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate (default 32)")
    p.set_defaults(func=cmd_generate)
