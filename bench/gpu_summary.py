"""summary.md of a bench/gpu_check.sh run: every performance goal of issue #11 (section 3), met or not, with its
figure, computed from the run's CSVs; plus the stages' outcome and the ratio tables behind the goals.

    python bench/gpu_summary.py --dir out/gpu_check                  # op.csv, decode.csv, e2e.csv, env.json ...
    python bench/gpu_summary.py --op op.csv --e2e e2e.csv --decode decode.csv --out summary.md

Goals (ratios of medians from one run; bf16; the Llama-2-7B o_proj C = D_out = 4096, d = 128 and the random-weight
Llama-2-7B end to end, unless --shape / --model say otherwise, as in a dry run):
  op fwd+bwd, v on K = 4 heads          <= 1.03x F.linear    (each N; the faster of cuda and triton = what `auto`
  op fwd+bwd, A on all heads            <= 1.10x F.linear     picks with the dispatch table of the same run)
  decode GEMV, N = 1                    <= 1.05x plain GEMV (F.linear), and >= 80 % of copy bandwidth
  e2e step 2 / step 1                   <= 1.02x / <= 1.08x the floor (the faster of fused-cuda, fused-triton)
  e2e step 1, official per-head loop    >= 2x slower than fused
  e2e peak memory (step 1 and step 2)   <= 1.01x the floor
  merged decode                         equal to base within noise: the p20-p80 intervals overlap, or within 1 %
A goal is "met", "NOT met" or "not measured" (its rows are missing: the stage failed, was skipped or timed out).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

MET, NOT_MET, UNMEASURED = "met", "NOT met", "not measured"
GPU_BACKENDS = ("cuda", "triton")
LLAMA2_7B_OPROJ = (4096, 4096, 128)  # C, D_out, head_dim


@dataclass
class Goal:
    name: str
    target: str
    status: str = UNMEASURED
    figure: str = ""
    details: List[str] = field(default_factory=list)


def read_csv(path: Optional[Path]) -> List[Dict[str, str]]:
    if path is None or not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _f(text) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def combine(statuses: Iterable[str]) -> str:
    """All measured parts met -> met; any measured part not met -> NOT met; nothing measured -> not measured."""
    measured = [s for s in statuses if s != UNMEASURED]
    if not measured:
        return UNMEASURED
    return MET if all(s == MET for s in measured) else NOT_MET


# ------------------------------------------------------------------------------------------------ operator
def op_case(provider: str, K: int, H: int) -> Tuple[str, str]:
    """op_bench's provider column -> (provider, parameters): LoFiT's default is A on all heads, v on K < H."""
    name, _, params = provider.partition(":")
    if not params or params == "lofit":
        params = "scale" if K == H else "offset"
    return name, params


def op_ratios(rows: Sequence[Dict[str, str]], shape: Tuple[int, int, int], mode: str, K: int,
              params: str) -> Dict[int, Dict[str, float]]:
    """{N: {provider: p50 / linear p50}} for one (mode, K, parameters) case at `shape`, plus "linear_ms"."""
    C, D_out, d = shape
    H = C // d
    sel = [r for r in rows if (int(r["d_in"]), int(r["d_out"]), int(r["head_dim"])) == shape and r["mode"] == mode
           and int(r["heads_selected"]) == K and _f(r.get("ms_p50")) is not None]
    linear = {int(r["n_tokens"]): _f(r["ms_p50"]) for r in sel if r["provider"] == "linear"}
    out: Dict[int, Dict[str, float]] = {}
    for r in sel:
        name, p = op_case(r["provider"], K, H)
        N = int(r["n_tokens"])
        if name == "linear" or p != params or not linear.get(N):
            continue
        out.setdefault(N, {"linear_ms": linear[N]})[name] = _f(r["ms_p50"]) / linear[N]
    return out


def ratio_goal(name: str, target: str, limit: float, ratios: Dict[int, Dict[str, float]],
               candidates: Sequence[str] = GPU_BACKENDS) -> Goal:
    goal = Goal(name, target)
    parts = []
    statuses = []
    for N in sorted(ratios):
        got = {b: ratios[N][b] for b in candidates if b in ratios[N]}
        if not got:
            continue
        best = min(got, key=got.get)
        status = MET if got[best] <= limit else NOT_MET
        statuses.append(status)
        each = ", ".join(f"{b} {v:.3f}" for b, v in got.items())
        parts.append(f"N={N}: {got[best]:.3f}× ({each})" + ("" if status == MET else " ✗"))
    goal.status = combine(statuses)
    goal.figure = "; ".join(parts) if parts else "no rows"
    return goal


def op_goals(rows, shape) -> List[Goal]:
    C, _, d = shape
    H = C // d
    return [
        ratio_goal("op fwd+bwd, v on K = 4", "≤ 1.03× F.linear", 1.03, op_ratios(rows, shape, "full", 4, "offset")),
        ratio_goal(f"op fwd+bwd, A on all {H} heads", "≤ 1.10× F.linear", 1.10,
                   op_ratios(rows, shape, "full", H, "scale")),
    ]


def op_table(rows, shape) -> List[str]:
    C, D_out, d = shape
    H = C // d
    cases = [("fwd", 4, "offset"), ("full", 4, "offset"), ("fwd", 4, "both"), ("full", 4, "both"),
             ("fwd", H, "scale"), ("full", H, "scale")]
    providers = [p for p in dict.fromkeys(op_case(r["provider"], 1, 2)[0] for r in rows) if p != "linear"]
    lines = ["| mode | case | N | F.linear ms | " + " | ".join(providers) + " |",
             "|---|---|---:|---:|" + "---:|" * len(providers)]
    names = {"offset": "v", "both": "A and v", "scale": "A"}
    for mode, K, params in cases:
        ratios = op_ratios(rows, shape, mode, K, params)
        for N in sorted(ratios):
            cells = [f"{ratios[N][p]:.3f}×" if p in ratios[N] else "–" for p in providers]
            lines.append(f"| {'fwd+bwd' if mode == 'full' else mode} | {names[params]}, K = {K} | {N} | "
                         f"{ratios[N]['linear_ms']:.4f} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else ["no operator rows at this shape"]


# -------------------------------------------------------------------------------------------------- decode
def decode_goals(rows, shape) -> List[Goal]:
    C, D_out, d = shape
    sel = [r for r in rows if r["provider"] in GPU_BACKENDS and int(r["N"]) == 1
           and (int(r["C"]), int(r["D_out"]), int(r["head_dim"])) == shape]
    gemv = Goal("decode N = 1 vs a plain GEMV", "≤ 1.05× F.linear")
    band = Goal("decode N = 1 bandwidth", "≥ 80 % of copy bandwidth")
    vs = {r["provider"]: _f(r["vs_linear"]) for r in sel if _f(r["vs_linear"]) is not None}
    pct = {r["provider"]: _f(r["pct_of_copy"]) for r in sel if _f(r["pct_of_copy"]) is not None}
    if vs:
        best = min(vs, key=vs.get)
        gemv.status = MET if vs[best] <= 1.05 else NOT_MET
        gemv.figure = f"{vs[best]:.3f}× ({', '.join(f'{b} {v:.3f}' for b, v in vs.items())})"
    else:
        gemv.figure = "no rows"
    if pct:
        best = max(pct, key=pct.get)
        band.status = MET if pct[best] >= 80.0 else NOT_MET
        band.figure = f"{pct[best]:.1f} % ({', '.join(f'{b} {v:.1f} %' for b, v in pct.items())})"
    else:
        band.figure = "no rows"
    return [gemv, band]


def decode_table(rows) -> List[str]:
    if not rows:
        return ["no decode rows"]
    lines = ["| N | provider | µs per call | GB/s | % of copy | vs F.linear |", "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["provider"] == "copy":  # the reference: a device-to-device copy of a large buffer
            lines.append(f"| – | copy (reference) | – | {r['GB_per_s']} | 100 | – |")
            continue
        lines.append(f"| {r['N']} | {r['provider']} | {r['us_per_call'] or '–'} | {r['GB_per_s']} | {r['pct_of_copy']} | "
                     f"{r['vs_linear'] or '–'} |")
    return lines


# ---------------------------------------------------------------------------------------------- end to end
def _e2e_groups(rows, model) -> Dict[Tuple[str, str, str], Dict[str, Dict[str, str]]]:
    """{(workload, batch, seq): {provider: row}}, the last row of a provider winning (the latest run)."""
    out: Dict[Tuple[str, str, str], Dict[str, Dict[str, str]]] = {}
    for r in rows:
        if r["model"] == model:
            out.setdefault((r["workload"], r["batch"], r["seq"]), {})[r["provider"]] = r
    return out


def _fused(group: Dict[str, Dict[str, str]], column: str) -> Dict[str, float]:
    return {p: _f(r[column]) for p, r in group.items() if p.startswith("fused") and _f(r[column]) is not None}


def _fused_against(goal: Goal, groups, workloads, ref: str, column: str, value, best, ok, digits: int,
                   with_workload: bool = False) -> Goal:
    """goal's status and figure from every fused provider's `value(fused, reference)` on the rows of
    `workloads`; the status uses the `best` (min or max) of them, as `auto` would pick that backend."""
    statuses, parts = [], []
    for (w, b, s), group in sorted(groups.items()):
        reference = _f(group.get(ref, {}).get(column))
        fused = _fused(group, column)
        if w not in workloads or not reference or not fused:
            continue
        values = {p: value(v, reference) for p, v in fused.items()}
        top = best(values, key=values.get)
        statuses.append(MET if ok(values[top]) else NOT_MET)
        label = f"{w} {b}×{s}" if with_workload else f"{b}×{s}"
        parts.append(f"{label}: {values[top]:.{digits}f}× ({', '.join(f'{p} {v:.{digits}f}' for p, v in values.items())})")
    goal.status, goal.figure = combine(statuses), "; ".join(parts) or "no rows"
    return goal


def e2e_goals(rows, model) -> List[Goal]:
    groups = _e2e_groups(rows, model)
    goals = []
    for workload, limit in (("step2", 1.02), ("step1", 1.08)):
        goals.append(_fused_against(
            Goal(f"e2e {workload.replace('step', 'step ')} time", f"≤ {limit:.2f}× floor"), groups, (workload,),
            "floor", "ms_p50", lambda v, ref: v / ref, min, lambda r, limit=limit: r <= limit, 3))
    goals.append(_fused_against(
        Goal("e2e step 1, official per-head loop vs fused", "hooks_loop ≥ 2× the time of fused"), groups,
        ("step1",), "hooks_loop", "ms_p50", lambda v, ref: ref / v, max, lambda r: r >= 2.0, 2))
    goals.append(_fused_against(
        Goal("e2e peak memory, step 1 and step 2", "≤ 1.01× floor"), groups, ("step1", "step2"), "floor",
        "peak_mb", lambda v, ref: v / ref, min, lambda r: r <= 1.01, 4, with_workload=True))

    g = Goal("merged decode vs base", "equal within noise (p20–p80 overlap, or within 1 %)")
    statuses, parts = [], []
    for (w, b, s), group in sorted(groups.items()):
        base, merged = group.get("base", {}), group.get("merged", {})
        bp, mp = _f(base.get("ms_p50")), _f(merged.get("ms_p50"))
        if w != "decode" or not bp or not mp:
            continue
        overlap = _f(merged["ms_p20"]) <= _f(base["ms_p80"]) and _f(base["ms_p20"]) <= _f(merged["ms_p80"])
        ok = overlap or abs(mp / bp - 1) <= 0.01
        statuses.append(MET if ok else NOT_MET)
        parts.append(f"batch {b}: {mp / bp:.3f}× (merged [{merged['ms_p20']}, {merged['ms_p80']}] ms, base "
                     f"[{base['ms_p20']}, {base['ms_p80']}] ms)")
    g.status, g.figure = combine(statuses), "; ".join(parts) or "no rows"
    goals.append(g)
    return goals


def e2e_table(rows, model) -> List[str]:
    groups = _e2e_groups(rows, model)
    if not groups:
        return [f"no end-to-end rows for {model}"]
    lines = ["| workload | batch × seq | provider | ms p50 [p20, p80] | time vs ref | peak MB | memory vs ref |",
             "|---|---|---|---:|---:|---:|---:|"]
    for (w, b, s), group in sorted(groups.items()):
        ref = group.get("floor" if w.startswith("step") else "base", {})
        ref_ms, ref_mb = _f(ref.get("ms_p50")), _f(ref.get("peak_mb"))
        for p, r in group.items():
            ms, mb = _f(r["ms_p50"]), _f(r["peak_mb"])
            if ms is None:
                lines.append(f"| {w} | {b} × {s} | {p} | {r['peak_mb'] or 'failed'} | – | – | – |")
                continue
            t = f"{ms / ref_ms:.3f}×" if ref_ms else "–"
            m = f"{mb / ref_mb:.4f}×" if ref_mb and mb else "–"
            lines.append(f"| {w} | {b} × {s} | {p} | {ms:.2f} [{r['ms_p20']}, {r['ms_p80']}] | {t} | "
                         f"{r['peak_mb'] or '–'} | {m} |")
    return lines


# ------------------------------------------------------------------------------------------------- summary
def evaluate(op_rows, decode_rows, e2e_rows, shape=LLAMA2_7B_OPROJ, model="llama2-7b") -> List[Goal]:
    return op_goals(op_rows, shape) + decode_goals(decode_rows, shape) + e2e_goals(e2e_rows, model)


def read_stages(path: Optional[Path]) -> List[List[str]]:
    if path is None or not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            parts = line.split("\t")
            out.append((parts + ["", "", "", ""])[:4])
    return out


def render(goals: List[Goal], *, env: Dict, stages: List[List[str]], op_rows, decode_rows, e2e_rows, shape, model,
           dispatch: Optional[Dict], dry: bool, command: str, elapsed: Optional[float]) -> str:
    C, D_out, d = shape
    lines = ["# GPU check summary", ""]
    if dry:
        lines += ["**DRY RUN on the CPU** (tiny shapes, Triton under the interpreter): this checks that every stage "
                  "and this summary work. The figures below are not GPU measurements and say nothing about the "
                  "goals.", ""]
    gpu = env.get("gpu") or ("CPU, no CUDA (dry run)" if dry else "no GPU recorded (env.json missing or the probe failed)")
    lines += [f"- device: {gpu}",
              f"- torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda') or 'none'}), Triton "
              f"{env.get('triton', '?')}, transformers {env.get('transformers', '?')}, Python {env.get('python', '?')}",
              f"- commit: {env.get('commit', '?')}",
              f"- command: `{command}`" + (f" ({elapsed:.0f} s wall time up to this summary)" if elapsed else ""),
              f"- shapes: o_proj C = {C}, D_out = {D_out}, head_dim = {d} ({C // d} heads); end to end: {model}", ""]
    lines += ["## Goals", "", "| goal | target | status | figure |", "|---|---|---|---|"]
    for g in goals:
        status = f"**{g.status}**" if g.status == NOT_MET else g.status
        lines.append(f"| {g.name} | {g.target} | {status} | {g.figure} |")
    lines += ["", "Ratios are medians of one run. Where two GPU backends (or fused-cuda / fused-triton) were timed, the "
              "status uses the faster one, which is what `auto` runs with this run's dispatch table; every backend's "
              "figure is in parentheses. ✗ marks the parts that miss the target.", ""]
    if stages:
        lines += ["## Stages", "", "| stage | status | seconds | note |", "|---|---|---:|---|"]
        for name, status, seconds, note in stages:
            lines.append(f"| {name} | {status} | {seconds} | {note.replace('|', '/')} |")
        lines.append("")
    lines += ["## Operator (ratio of p50 to F.linear, same run)", ""] + op_table(op_rows, shape) + [""]
    lines += ["## Decode GEMV bandwidth", ""] + decode_table(decode_rows) + [""]
    lines += ["## End to end", ""] + e2e_table(e2e_rows, model) + [""]
    if dispatch is not None:
        rows = dispatch.get("rows", [])
        lines += ["## Dispatch table (`auto`" + (", dry run: no GPU" if dry else " on this GPU") + ")", ""]
        if rows:
            lines += ["| mode | N | C | D_out | K | cuda ms | triton ms | pick |", "|---|---:|---:|---:|---:|---:|---:|---|"]
            for r in rows:
                ms = r["ms"]
                pick = min((b for b in GPU_BACKENDS if b in ms), key=lambda b: ms[b])
                lines.append(f"| {r['mode']} | {r['N']} | {r['C']} | {r['D_out']} | {r['K']} | {ms.get('cuda', '–')} | "
                             f"{ms.get('triton', '–')} | {pick} |")
        else:
            lines.append(dispatch.get("note", "no rows"))
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.partition("\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="a gpu_check.sh output folder (defaults for every file below)")
    p.add_argument("--op", default=None, help="op_bench.py CSV (default DIR/op.csv)")
    p.add_argument("--decode", default=None, help="decode_bandwidth.py CSV (default DIR/decode.csv)")
    p.add_argument("--e2e", default=None, help="e2e_bench.py CSV (default DIR/e2e.csv)")
    p.add_argument("--env", default=None, help="env.json (default DIR/env.json)")
    p.add_argument("--stages", default=None, help="gpu_check.sh's stage log, TSV (default DIR/stages.tsv)")
    p.add_argument("--dispatch", default=None, help="dispatch.json (default DIR/dispatch.json)")
    p.add_argument("--shape", default=",".join(map(str, LLAMA2_7B_OPROJ)), help="C,D_out,head_dim of the goals")
    p.add_argument("--model", default="llama2-7b", help="e2e_bench model of the goals")
    p.add_argument("--dry", action="store_true", help="mark the summary as a CPU dry run")
    p.add_argument("--command", default="bash bench/gpu_check.sh")
    p.add_argument("--elapsed", type=float, default=None, help="seconds the run took so far")
    p.add_argument("--out", default=None, help="summary.md (default DIR/summary.md, else stdout)")
    args = p.parse_args(argv)
    base = Path(args.dir) if args.dir else None

    def path(value, name):
        return Path(value) if value else (base / name if base else None)

    shape = tuple(int(t) for t in args.shape.split(","))
    if len(shape) != 3 or shape[0] % shape[2]:
        raise SystemExit(f"--shape {args.shape}: C,D_out,head_dim with C a multiple of head_dim")
    op_rows, decode_rows, e2e_rows = (read_csv(path(args.op, "op.csv")), read_csv(path(args.decode, "decode.csv")),
                                      read_csv(path(args.e2e, "e2e.csv")))
    env_path, dispatch_path = path(args.env, "env.json"), path(args.dispatch, "dispatch.json")
    env = json.loads(env_path.read_text()) if env_path and env_path.is_file() else {}
    dispatch = json.loads(dispatch_path.read_text()) if dispatch_path and dispatch_path.is_file() else None
    goals = evaluate(op_rows, decode_rows, e2e_rows, shape, args.model)
    text = render(goals, env=env, stages=read_stages(path(args.stages, "stages.tsv")), op_rows=op_rows,
                  decode_rows=decode_rows, e2e_rows=e2e_rows, shape=shape, model=args.model, dispatch=dispatch,
                  dry=args.dry, command=args.command, elapsed=args.elapsed)
    out = path(args.out, "summary.md")
    if out:
        out.write_text(text + "\n")
        print(f"wrote {out}")
    else:
        print(text)
    for g in goals:
        print(f"  {g.status:>12}  {g.name}: {g.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
