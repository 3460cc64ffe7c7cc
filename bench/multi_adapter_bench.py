"""Many adapters in one batch: decode tokens/s of a batch of B rows whose rows use n distinct LoFiT adapters,
against the same batch with one adapter, measured in one run, round-robin over the providers.

Adapters: n seeded random LoFiT adapters (A and v on K random heads each, a different set per adapter, values
N(0, 0.05)), saved with lofit_fast.save_adapter and loaded by each provider through the public API. Row i of
the batch uses adapter i mod n.

Providers (the `provider` column):
  one_adapter  lofit_fast.load_adapter of adapter 0: every row with the same adapter (the reference of the ratios)
  fused        lofit_fast.load_adapters of the n adapters, model.generate(..., adapter_names=[...]): the per-row
               tables in the fused o_proj op (backend "auto")
  hook         a dense per-row forward pre-hook on every o_proj, the way users write it: dense tables
               A, v [n, H, d] (zero on heads an adapter does not touch) and x' = x ⊙ (1 + A[ids]) + v[ids]
  loop         one model.generate per adapter on its sub-batch (lofit_fast.set_adapter on the fused model)
  merge        per adapter: lofit_fast.merge that adapter into the o_proj weights, generate its sub-batch, then
               put the base o_proj back (the merge time is counted)

Workloads: decode = model.generate with a KV cache, --new-tokens new tokens (min_new_tokens = max_new_tokens,
greedy), prompt prefill included; prefill = one no-grad forward over the prompt; train = one training step
(forward, cross-entropy on the logits, backward, AdamW on the adapters' tables) with the n adapters in the batch.
Reported: median, p20, p80 of --reps timed repetitions after --warmup; tokens/s from the median.

    python bench/multi_adapter_bench.py --workloads decode   # CPU: SmolLM2-135M, B = 16, n in {1, 4, 16}
    python bench/multi_adapter_bench.py --workloads prefill,train --ns 1,16 --reps 2 --providers \
        one_adapter,fused,hook,loop --tag cpu_prefill_train  # prefill and a training step
    python bench/multi_adapter_bench.py --preset gpu         # GPU: Llama-2-7B shapes (random weights), B = 256,
                                                             # n in {1, 16, 256} (needs a CUDA GPU)
    python bench/multi_adapter_bench.py --preset tiny --reps 1 --warmup 0 --results /tmp/ma   # a smoke run
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lofit_fast  # noqa: E402
from lofit_fast.patch import find_attention_sites  # noqa: E402

PRESETS = {
    "cpu": dict(model="smollm2", device="cpu", dtype="float32", batch=16, ns=[1, 4, 16], prompt=16, new_tokens=16,
                heads=8, reps=4, warmup=1, train_seq=16),
    "gpu": dict(model="llama2-7b-shapes", device="cuda", dtype="bfloat16", batch=256, ns=[1, 16, 256], prompt=64,
                new_tokens=32, heads=16, reps=5, warmup=2, train_seq=128),
    "tiny": dict(model="tiny", device="cpu", dtype="float32", batch=4, ns=[1, 2, 4], prompt=6, new_tokens=3,
                 heads=2, reps=1, warmup=0, train_seq=8),
}


def build_model(name: str, device: str, dtype: torch.dtype):
    if name == "smollm2":
        model, _ = lofit_fast.load_model("smollm2", dtype=dtype, device=device, progress=False)
        return model
    import transformers as tf

    torch.manual_seed(0)
    if name == "tiny":
        cfg = tf.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    elif name == "llama2-7b-shapes":  # Llama-2-7B's shapes with random weights (no download)
        cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    else:
        raise ValueError(f"unknown model {name!r}")
    with torch.device(device):
        model = tf.LlamaForCausalLM(cfg).to(dtype)
    model.config.pad_token_id = 0
    return model.eval()


def make_adapters(model: nn.Module, n: int, heads_per: int, root: Path) -> Dict[str, Path]:
    """n saved LoFiT adapters: A and v on `heads_per` random heads each (seeded per adapter)."""
    sites = find_attention_sites(model)
    all_heads = [(s.layer, h) for s in sites for h in range(s.num_heads)]
    paths = {}
    for i in range(n):
        g = torch.Generator().manual_seed(1000 + i)
        pick = sorted(all_heads[j] for j in torch.randperm(len(all_heads), generator=g)[:heads_per].tolist())
        lofit_fast.patch(model, pick)
        with torch.no_grad():
            for p in lofit_fast.trainable_parameters(model):
                p.copy_(0.05 * torch.randn(p.shape, generator=g).to(p.device))
        paths[f"a{i}"] = lofit_fast.save_adapter(model, root / f"a{i}")
        lofit_fast.unpatch(model)
    return paths


class DenseRowHook:
    """The per-row intervention as users write it: a forward pre-hook on each o_proj with dense tables."""

    def __init__(self, model: nn.Module, paths: Dict[str, Path]):
        self.ids = None
        self.handles = []
        sites = find_attention_sites(model)
        tables = {}
        names = list(paths)
        for i, name in enumerate(names):  # each adapter's values, read through the public loader
            lofit_fast.load_adapter(model, paths[name])
            for layer, mod in lofit_fast.patched_modules(model).items():
                s = sites[layer]
                if layer not in tables:
                    shape = (len(names), s.num_heads, s.head_dim)
                    tables[layer] = (torch.zeros(shape, device=mod.weight.device),
                                     torch.zeros(shape, device=mod.weight.device))
                A, v = tables[layer]
                with torch.no_grad():
                    if mod.A is not None:
                        A[i, mod.heads] = mod.A.float()
                    if mod.v is not None:
                        v[i, mod.heads] = mod.v.float()
            lofit_fast.unpatch(model)
        self.tables = {layer: (nn.Parameter(A), nn.Parameter(v)) for layer, (A, v) in tables.items()}
        for layer, (A, v) in self.tables.items():
            s = sites[layer]
            self.handles.append(s.attn.o_proj.register_forward_pre_hook(self._hook(A, v, s.num_heads, s.head_dim)))

    def _hook(self, A, v, H, d):
        def hook(module, args):
            (x,) = args
            ids = self.ids
            B = x.shape[0]
            if ids.shape[0] != B:
                ids = ids.repeat_interleave(B // ids.shape[0])
            xs = x.view(*x.shape[:-1], H, d)
            scale = (1.0 + A[ids]).to(x.dtype).view(B, *([1] * (x.dim() - 2)), H, d)
            shift = v[ids].to(x.dtype).view(B, *([1] * (x.dim() - 2)), H, d)
            return ((xs * scale + shift).reshape(x.shape),)
        return hook

    def parameters(self):
        return [p for pair in self.tables.values() for p in pair]

    def remove(self):
        for h in self.handles:
            h.remove()


def _timed(fn: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(args, on_round: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    preset = dict(PRESETS[args.preset])
    for key in ("batch", "reps", "warmup", "new_tokens", "prompt"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.ns:
        preset["ns"] = [int(x) for x in args.ns.split(",")]
    device, dtype = preset["device"], getattr(torch, preset["dtype"])
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("the gpu preset needs a CUDA GPU (none is visible here)")
    B, ns, T_new = preset["batch"], preset["ns"], preset["new_tokens"]
    model = build_model(preset["model"], device, dtype)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (B, preset["prompt"]), generator=g).to(device)
    mask = torch.ones_like(prompt)
    train_ids = torch.randint(3, vocab, (B, preset["train_seq"]), generator=g).to(device)
    tmp = Path(tempfile.mkdtemp(prefix="multi_adapter_"))
    paths = make_adapters(model, max(ns), preset["heads"], tmp)
    names_all = list(paths)
    gen_kw = dict(max_new_tokens=T_new, min_new_tokens=T_new, do_sample=False, pad_token_id=0)

    def rows_of(n):
        return [names_all[i % n] for i in range(B)]

    # Provider setups: each returns (setup, teardown, decode, prefill, train) closures for a given n.
    def one_adapter(n):
        def setup():
            lofit_fast.load_adapter(model, paths[names_all[0]])
        def decode():
            model.generate(input_ids=prompt, attention_mask=mask, **gen_kw)
        def prefill():
            model(input_ids=prompt, attention_mask=mask, use_cache=False)
        def train():
            lofit_fast.freeze_base(model)
            opt = torch.optim.AdamW(lofit_fast.trainable_parameters(model), lr=1e-3)
            loss = nn.functional.cross_entropy(model(input_ids=train_ids).logits.float().flatten(0, 1),
                                               train_ids.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return setup, lambda: lofit_fast.unpatch(model), decode, prefill, train

    def fused(n):
        sub = {k: paths[k] for k in names_all[:n]}
        rows = rows_of(n)
        def setup():
            lofit_fast.load_adapters(model, sub)
        def decode():
            model.generate(input_ids=prompt, attention_mask=mask, adapter_names=rows, **gen_kw)
        def prefill():
            model(input_ids=prompt, attention_mask=mask, adapter_names=rows, use_cache=False)
        def train():
            lofit_fast.freeze_base(model)
            opt = torch.optim.AdamW(lofit_fast.trainable_parameters(model), lr=1e-3)
            loss = nn.functional.cross_entropy(
                model(input_ids=train_ids, adapter_names=rows).logits.float().flatten(0, 1), train_ids.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return setup, lambda: lofit_fast.unpatch(model), decode, prefill, train

    hook_state = {}

    def hook(n):
        sub = {k: paths[k] for k in names_all[:n]}
        ids = torch.tensor([i % n for i in range(B)], device=device)
        def setup():
            hook_state["h"] = DenseRowHook(model, sub)
            hook_state["h"].ids = ids
        def teardown():
            hook_state.pop("h").remove()
        def decode():
            model.generate(input_ids=prompt, attention_mask=mask, **gen_kw)
        def prefill():
            model(input_ids=prompt, attention_mask=mask, use_cache=False)
        def train():
            for p in model.parameters():
                p.requires_grad_(False)
            params = hook_state["h"].parameters()
            opt = torch.optim.AdamW(params, lr=1e-3)
            loss = nn.functional.cross_entropy(model(input_ids=train_ids).logits.float().flatten(0, 1),
                                               train_ids.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return setup, teardown, decode, prefill, train

    def loop(n):
        sub = {k: paths[k] for k in names_all[:n]}
        groups = [[r for r in range(B) if r % n == a] for a in range(n)]
        def setup():
            lofit_fast.load_adapters(model, sub)
        def decode():
            for a, rows in enumerate(groups):
                lofit_fast.set_adapter(model, a)
                model.generate(input_ids=prompt[rows], attention_mask=mask[rows], **gen_kw)
        def prefill():
            for a, rows in enumerate(groups):
                lofit_fast.set_adapter(model, a)
                model(input_ids=prompt[rows], attention_mask=mask[rows], use_cache=False)
        def train():
            lofit_fast.freeze_base(model)
            opt = torch.optim.AdamW(lofit_fast.trainable_parameters(model), lr=1e-3)
            for a, rows in enumerate(groups):
                lofit_fast.set_adapter(model, a)
                logits = model(input_ids=train_ids[rows]).logits.float()
                loss = nn.functional.cross_entropy(logits.flatten(0, 1), train_ids[rows].flatten(), reduction="sum")
                (loss / train_ids.numel()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return setup, lambda: lofit_fast.unpatch(model), decode, prefill, train

    sites = find_attention_sites(model)
    base_oproj = [s.attn.o_proj for s in sites]

    def merge(n):
        groups = [[r for r in range(B) if r % n == a] for a in range(n)]
        def each(fn):
            for a, rows in enumerate(groups):
                lofit_fast.load_adapter(model, paths[names_all[a]])
                lofit_fast.merge(model)
                fn(rows)
                for s, lin in zip(sites, base_oproj):
                    s.attn.o_proj = lin
        def decode():
            each(lambda rows: model.generate(input_ids=prompt[rows], attention_mask=mask[rows], **gen_kw))
        def prefill():
            each(lambda rows: model(input_ids=prompt[rows], attention_mask=mask[rows], use_cache=False))
        return (lambda: None), (lambda: None), decode, prefill, None

    providers = {"one_adapter": one_adapter, "fused": fused, "hook": hook, "loop": loop, "merge": merge}
    chosen = [p for p in (args.providers.split(",") if args.providers else providers)]
    workloads = args.workloads.split(",")
    times: Dict[tuple, List[float]] = {}
    torch.set_grad_enabled(True)
    order = [(p, n) for n in ns for p in chosen if not (p == "one_adapter" and n != ns[0])]
    total_rounds = preset["warmup"] + preset["reps"]
    for rnd in range(total_rounds):
        shift = rnd % len(order)
        for p, n in order[shift:] + order[:shift]:  # round-robin, each round starting one provider later
            setup, teardown, decode, prefill, train = providers[p](n)
            setup()
            try:
                for w in workloads:
                    fn = {"decode": decode, "prefill": prefill, "train": train}[w]
                    if fn is None:
                        continue
                    if w == "train":
                        dt = _timed(fn, device)
                    else:
                        with torch.no_grad():
                            dt = _timed(fn, device)
                    if rnd >= preset["warmup"]:
                        times.setdefault((p, n, w), []).append(dt)
                    if args.verbose:
                        print(f"  {p} n={n} {w}: {dt * 1000:.0f} ms", flush=True)
            finally:
                teardown()
        print(f"round {rnd + 1}/{total_rounds} done", flush=True)
        if times and on_round is not None:  # a run stopped early still leaves the rounds it finished
            on_round(summarize(times, preset, args.preset, device, B, T_new))
    return summarize(times, preset, args.preset, device, B, T_new)


def summarize(times: Dict[tuple, List[float]], preset: Dict, preset_name: str, device: str, B: int,
              T_new: int) -> List[Dict]:
    rows = []
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    for (p, n, w), ts in sorted(times.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        ts_sorted = sorted(ts)
        med = statistics.median(ts)
        q = lambda f: ts_sorted[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
        tokens = B * (T_new if w == "decode" else (preset["train_seq"] if w == "train" else preset["prompt"]))
        rows.append({"preset": preset_name, "model": preset["model"], "device": device_name, "dtype": preset["dtype"],
                     "workload": w, "provider": p, "n_adapters": n if p != "one_adapter" else 1, "batch": B,
                     "ms_p50": round(1000 * med, 3), "ms_p20": round(1000 * q(0.2), 3),
                     "ms_p80": round(1000 * q(0.8), 3), "tokens_per_s": round(tokens / med, 2),
                     "reps": len(ts), "threads": torch.get_num_threads()})
    return rows


def write_results(rows: List[Dict], out: Path, tag: str, ns: List[int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"multi_adapter_{tag}.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ref = {r["workload"]: r["tokens_per_s"] for r in rows if r["provider"] == "one_adapter"}
    lines = [f"# Many adapters in one batch ({rows[0]['model']}, {rows[0]['device']}, {rows[0]['dtype']}, "
             f"B = {rows[0]['batch']})", "",
             "tokens/s (median) and the ratio to the one-adapter batch of the same run (`one_adapter`).", ""]
    for wl in ("decode", "prefill", "train"):
        sel = [r for r in rows if r["workload"] == wl]
        if not sel:
            continue
        provs = [p for p in ("fused", "hook", "loop", "merge") if any(r["provider"] == p for r in sel)]
        lines += [f"## {wl}" + (f" (one adapter: {ref[wl]:.1f} tokens/s)" if wl in ref else ""), "",
                  "| n adapters | " + " | ".join(provs) + " |", "|---|" + "---|" * len(provs)]
        for n in ns:
            cells = []
            for p in provs:
                r = next((r for r in sel if r["provider"] == p and r["n_adapters"] == n), None)
                if r is None:
                    cells.append("–")
                else:
                    ratio = f" ({r['tokens_per_s'] / ref[wl]:.2f}×)" if wl in ref else ""
                    cells.append(f"{r['tokens_per_s']:.1f}{ratio}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    (out / f"multi_adapter_{tag}.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    dec = [r for r in rows if r["workload"] == "decode"]
    for p in ("fused", "hook", "loop", "merge"):
        pts = sorted((r["n_adapters"], r["tokens_per_s"]) for r in dec if r["provider"] == p)
        if pts:
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=p)
    if "decode" in ref:
        ax.axhline(ref["decode"], color="gray", ls="--", label="one adapter")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct adapters in the batch (n)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{rows[0]['model']} {rows[0]['device']}, B = {rows[0]['batch']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"multi_adapter_{tag}.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu")
    ap.add_argument("--providers", default=None, help="comma-separated subset of one_adapter,fused,hook,loop,merge")
    ap.add_argument("--workloads", default="decode,prefill,train")
    ap.add_argument("--ns", default=None, help="comma-separated adapter counts (default: the preset's)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--new-tokens", dest="new_tokens", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=None)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--verbose", action="store_true", help="print every timed call")
    ap.add_argument("--tag", default=None, help="file name suffix: multi_adapter_<tag>.csv/.md/.png (default: the preset)")
    args = ap.parse_args(argv)
    ns = [int(x) for x in args.ns.split(",")] if args.ns else PRESETS[args.preset]["ns"]
    tag = args.tag or args.preset
    rows = run(args, on_round=lambda rows: write_results(rows, Path(args.results), tag, ns))
    write_results(rows, Path(args.results), tag, ns)
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
