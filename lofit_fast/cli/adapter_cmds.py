"""The adapter commands: `eval` (base or adapter on a task), `merge`, `export` (HF checkpoint, GGUF, llama.cpp
control vector) and `import` (the authors' checkpoints)."""
from __future__ import annotations

import os

import torch

from ..adapter import export, import_official, load_adapter, load_adapters, merge, save_adapter
from ..adapter.gguf_export import (
    export_control_vector_gguf,
    export_gguf,
    model_type_and_layers,
    read_vectors_file,
)
from ..experiments import evaluate_adapters, evaluate_arm, splits, write_json
from ..models import resolve_model_path
from ..patch import patched_modules
from .common import (
    UserError,
    adapter_spec,
    add_data_arguments,
    add_model_arguments,
    load_items,
    load_model_from_args,
    named_adapters,
    nonnegative_float,
    table,
)


def cmd_eval(args) -> int:
    adapters = named_adapters(args.adapter) if args.adapter else {}
    items = load_items(args, "eval")
    model, tokenizer = load_model_from_args(args)
    if len(adapters) > 1:  # one batched pass: every item once per adapter and once for the base model
        load_adapters(model, adapters, backend=args.backend)
        rows = evaluate_adapters(args.task, model, tokenizer, items, ["__base__", *adapters],
                                 batch_size=args.eval_batch_size, progress=not args.quiet)
        record = {"adapter": adapters}
    elif adapters:
        (name, path), = adapters.items()
        load_adapter(model, path, backend=args.backend)
        rows = {name: evaluate_arm(args, model, tokenizer, items, "the adapter")}
        record = {"adapter": path}
    else:
        rows = {"base": evaluate_arm(args, model, tokenizer, items, "the base model")}
        record = {"adapter": None}
    print(table(rows))
    if args.out:
        path = write_json(os.path.join(args.out, "eval.json"), {
            "task": args.task, "model": args.model, **record, "split": splits(args.task)[1], "examples": len(items),
            **rows,
        })
        print(f"wrote {path}")
    return 0


def _probe_logits(model, tokenizer):
    enc = tokenizer(["Q: What is the capital of France? A:", "The quick brown fox"], return_tensors="pt",
                    padding=True)
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(**{k: v.to(device) for k, v in enc.items()}).logits.float()


def cmd_merge(args) -> int:
    model, tokenizer = load_model_from_args(args)
    load_adapter(model, args.adapter, backend=args.backend)
    before = _probe_logits(model, tokenizer)
    merge(model)
    after = _probe_logits(model, tokenizer)
    diff = (before - after).abs().max().item()
    print(f"merged the adapter into o_proj; max |logit difference| on a probe: {diff:.3g}")
    if args.out:
        export(model, args.out, tokenizer=tokenizer)
        print(f"wrote the merged model to {args.out}")
    return 0


def cmd_export(args) -> int:
    fmt = getattr(args, "format", "hf")
    if fmt == "control-vector":
        return _export_control_vector(args)
    if not args.adapter:
        raise UserError(f"--format {fmt} needs --adapter (the adapter folder to merge)")
    if fmt == "gguf":
        return _export_gguf(args)
    model, tokenizer = load_model_from_args(args)
    load_adapter(model, args.adapter, backend=args.backend)
    export(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"wrote a plain Hugging Face checkpoint (loads with AutoModelForCausalLM) to {args.out}")
    return 0


def _gguf_out(out: str, default_name: str) -> str:
    return out if out.endswith(".gguf") else os.path.join(out, default_name)


def _export_gguf(args) -> int:
    directory, gguf_file = resolve_model_path(args.model)
    if gguf_file is None:
        raise UserError(f"--format gguf starts from the model's GGUF file; --model {args.model} is not a GGUF")
    model, _ = load_model_from_args(args)
    load_adapter(model, args.adapter, backend=args.backend)
    out = _gguf_out(args.out, os.path.splitext(gguf_file)[0] + "-lofit.gguf")
    info = export_gguf(model, out, source_gguf=os.path.join(directory, gguf_file), requantize=args.requantize)
    print(f"wrote {out}: {len(info['added'])} tensors added, {len(info['rewritten'])} rewritten "
          f"({', '.join(sorted(set(info['weight_types'].values()))) or 'none'}), {info['copied']} copied as they were")
    return 0


def _export_control_vector(args) -> int:
    if not args.vectors:
        raise UserError("--format control-vector needs --vectors (a safetensors file from `lofit-fast steer`)")
    vectors, saved_coeff = read_vectors_file(args.vectors)
    coeff = args.coeff if args.coeff is not None else (saved_coeff if saved_coeff is not None else 1.0)
    model_type, layers = model_type_and_layers(args.model)
    out = _gguf_out(args.out, "control_vector.gguf")
    export_control_vector_gguf(vectors, out, model_hint=model_type, coeff=coeff, num_layers=layers)
    print(f"wrote {out}: llama.cpp control vector for layers {sorted(vectors)} at coeff {coeff:g} "
          f"(use with --control-vector {out})")
    return 0


def cmd_import(args) -> int:
    model, _ = load_model_from_args(args)
    import_official(args.checkpoint, model, backend=args.backend, atol=args.atol)
    heads = {layer: m.head_list for layer, m in patched_modules(model).items()}
    save_adapter(model, args.out, method="lofit",
                 hyperparameters={"imported_from": "fc2869/lo-fit", "checkpoint": os.path.abspath(args.checkpoint)})
    print(f"imported {sum(map(len, heads.values()))} heads from {args.checkpoint} into the adapter {args.out}: {heads}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate the base model, or the model with an adapter")
    add_model_arguments(p)
    add_data_arguments(p)
    p.add_argument("--adapter", type=adapter_spec, action="append", default=None, metavar="[NAME=]PATH",
                   help="adapter folder (from tune or run); omit for the base model. Repeat as NAME=PATH to score "
                        "several adapters and the base model in one batched pass (one row each in eval.json)")
    p.add_argument("--out", help="folder for eval.json")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="fold an adapter into the weights, check the logits, optionally save")
    add_model_arguments(p)
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", help="write the merged model here as a plain HF checkpoint")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write base model + adapter as a plain Hugging Face checkpoint (or GGUF)")
    add_model_arguments(p)
    p.add_argument("--adapter", help="adapter folder (hf and gguf formats)")
    p.add_argument("--out", required=True, help="checkpoint folder to write (gguf: a .gguf file or a folder)")
    p.add_argument("--format", choices=("hf", "gguf", "control-vector"), default="hf",
                   help="hf (default): HF checkpoint; gguf: the model's GGUF with the adapter merged (offsets as "
                        "blk.N.attn_output.bias); control-vector: --vectors as a llama.cpp control-vector GGUF")
    p.add_argument("--overwrite", action="store_true", help="hf: replace a non-empty --out folder")
    p.add_argument("--requantize", action="store_true",
                   help="gguf: re-quantize scaled attn_output weights to the source type (default: float32, exact)")
    p.add_argument("--vectors", help="control-vector: steering vectors (safetensors, keys layers.N)")
    p.add_argument("--coeff", type=float, default=None,
                   help="control-vector: strength folded into the vectors (default: the file's, else 1)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="convert another tool's checkpoint into a lofit_fast adapter")
    add_model_arguments(p)
    p.add_argument("--from", dest="source_format", choices=("lofit",), required=True,
                   help="lofit: a state dict of the authors' code (fc2869/lo-fit: attn_A / attn_v per head), safetensors")
    p.add_argument("--checkpoint", required=True,
                   help="safetensors file, or a folder with model.safetensors / model.safetensors.index.json")
    p.add_argument("--atol", type=nonnegative_float, default=0.0,
                   help="heads whose A and v are all within ±atol of zero are not selected (default 0)")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.set_defaults(func=cmd_import)
