"""Tables and plots of bench/results/e2e.csv (written by bench/e2e_bench.py, which calls `report` after a run).

    python bench/plot_e2e.py                       # redraw bench/results/e2e_cpu.md and e2e_cpu_<model>.png
    python bench/plot_e2e.py --device cuda         # the GPU rows: e2e_cuda.md and e2e_cuda_<model>.png
    python bench/plot_e2e.py --results /tmp/e2e    # another results folder

Which rows: the CSV only grows. For each group (device, model, dtype, workload, batch, seq) the rows of the
latest run are kept: e2e_bench writes all rows of a group at once, so a run is the last contiguous block of that
group's rows (a block ends where a provider repeats). Every ratio compares rows of one block, i.e. one run:
"× ref" is the provider's median time over the reference's (floor for training steps, base for decode and
prefill; lower is better), "× hooks" the same against the hooks provider, "mem × ref" the peak memory ratio.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REFERENCE = {"step1": "floor", "step2": "floor", "decode": "base", "prefill": "base"}
WORKLOAD_ORDER = ["step1", "step2", "decode", "prefill"]
PROVIDER_ORDER = ["floor", "base", "fused", "torch", "merged", "hooks", "hooks_loop", "lora"]
COLORS = {"fused": "#1f77b4", "torch": "#9467bd", "merged": "#2ca02c", "hooks": "#ff7f0e", "hooks_loop": "#d62728",
          "lora": "#8c564b", "floor": "#7f7f7f", "base": "#7f7f7f"}
GROUP_KEY = ("device", "model", "dtype", "workload", "batch", "seq")
WORKLOAD_TITLE = {"step1": "step 1 (A on all heads + L1)", "step2": "step 2 (v on K heads)",
                  "decode": "decode (generate)", "prefill": "prefill (no grad)"}


def read_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def latest_runs(rows: Sequence[Dict[str, str]]) -> List[Dict[str, str]]:
    """The rows of the latest run of every group (see the module doc), in file order."""
    blocks: Dict[Tuple, List[int]] = {}
    last_group: Optional[Tuple] = None
    for i, row in enumerate(rows):
        key = tuple(row[k] for k in GROUP_KEY)
        block = blocks.get(key)
        starts = block is None or key != last_group or any(rows[j]["provider"] == row["provider"] for j in block)
        if starts:
            blocks[key] = [i]
        else:
            block.append(i)
        last_group = key
    keep = sorted(i for block in blocks.values() for i in block)
    return [rows[i] for i in keep]


def _num(text: str) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def groups(rows: Sequence[Dict[str, str]]) -> Dict[Tuple, List[Dict[str, str]]]:
    out: Dict[Tuple, List[Dict[str, str]]] = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in GROUP_KEY), []).append(row)
    return out


def ratios(group: Sequence[Dict[str, str]], against: str, column: str) -> Dict[str, Optional[float]]:
    """{provider: row[column] / against's row[column]} within one group (None where either is missing)."""
    ref = next((_num(r[column]) for r in group if r["provider"] == against), None)
    return {r["provider"]: (None if ref in (None, 0) or _num(r[column]) is None else _num(r[column]) / ref)
            for r in group}


def _sort_key(row: Dict[str, str]):
    w = row["workload"]
    p = row["provider"]
    return (row["device"], row["model"], WORKLOAD_ORDER.index(w) if w in WORKLOAD_ORDER else 99, int(row["batch"]),
            int(row["seq"]), PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else 99)


def _fmt(x: Optional[float], spec: str = ".2f", suffix: str = "×") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def markdown_tables(rows: Sequence[Dict[str, str]]) -> str:
    """One markdown table per (device, model, dtype), rows grouped by workload and shape."""
    rows = sorted(rows, key=_sort_key)
    out: List[str] = []
    by_group = groups(rows)
    current = None
    for row in rows:
        section = (row["device"], row["model"], row["dtype"])
        if section != current:
            current = section
            out += ["", f"#### {row['model']} ({row['dtype']}) on {row['device']} "
                        f"(torch {row['torch']}, commit {row['commit']})", "",
                    "| workload | batch × seq | provider | tokens/s | ms p50 [p20, p80] | × ref | × hooks | peak MB "
                    "| mem × ref |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        group = by_group[tuple(row[k] for k in GROUP_KEY)]
        ref = REFERENCE.get(row["workload"], "")
        t_ref = ratios(group, ref, "ms_p50")[row["provider"]]
        t_hooks = ratios(group, "hooks", "ms_p50")[row["provider"]] if row["provider"] != "hooks" else None
        m_ref = ratios(group, ref, "peak_mb")[row["provider"]]
        if row["ms_p50"]:
            timing = f"{float(row['ms_p50']):.2f} [{float(row['ms_p20']):.2f}, {float(row['ms_p80']):.2f}]"
            tps = f"{float(row['tokens_per_s']):.0f}"
        else:
            timing, tps = "out of memory", "–"
        name = f"{row['provider']} (ref)" if row["provider"] == ref else row["provider"]
        peak = row["peak_mb"] if row["peak_mb"] not in ("", None) else "–"
        out.append(f"| {row['workload']} | {row['batch']} × {row['seq']} | {name} | {tps} | {timing} | "
                   f"{_fmt(t_ref)} | {_fmt(t_hooks)} | {peak} | {_fmt(m_ref, '.3f')} |")
    return "\n".join(out).strip() + "\n"


summary_table = markdown_tables


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def plot_model(rows: Sequence[Dict[str, str]], path: Path, title: str) -> Path:
    """Bars of time and peak memory relative to the reference (a line at 1) per workload and shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w in WORKLOAD_ORDER if any(r["workload"] == w for r in rows)]
    fig, axes = plt.subplots(2, len(workloads), figsize=(4.2 * len(workloads), 6.4), squeeze=False)
    by_group = groups(rows)
    for col, workload in enumerate(workloads):
        ref = REFERENCE[workload]
        keys = sorted({k for k in by_group if k[3] == workload}, key=lambda k: (int(k[4]), int(k[5])))
        present = {r["provider"] for k in keys for r in by_group[k]}
        providers = [p for p in PROVIDER_ORDER if p != ref and p in present]
        width = 0.8 / max(1, len(providers))
        for row_idx, (column, label) in enumerate((("ms_p50", "time × " + ref), ("peak_mb", "peak memory × " + ref))):
            ax = axes[row_idx][col]
            for j, provider in enumerate(providers):
                xs, ys = [], []
                for i, key in enumerate(keys):
                    value = ratios(by_group[key], ref, column).get(provider)
                    if value is not None:
                        xs.append(i - 0.4 + width * (j + 0.5))
                        ys.append(value)
                bars = ax.bar(xs, ys, width, label=provider, color=COLORS.get(provider))
                for bar, y in zip(bars, ys):
                    ax.annotate(f"{y:.2f}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                                fontsize=6, rotation=90, xytext=(0, 2), textcoords="offset points")
            ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label=f"{ref} = 1")
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels([f"{k[4]}×{k[5]}" for k in keys], fontsize=8)
            ax.set_ylabel(label, fontsize=8)
            ax.set_ylim(0, max([1.2] + [b.get_height() * 1.25 for b in ax.patches]))
            if row_idx == 0:
                ax.set_title(WORKLOAD_TITLE.get(workload, workload), fontsize=9)
            else:
                ax.set_xlabel("batch × seq" if workload != "decode" else "batch × new tokens", fontsize=8)
    legend: Dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    order = sorted(legend, key=lambda label: PROVIDER_ORDER.index(label) if label in PROVIDER_ORDER else -1)
    fig.legend([legend[k] for k in order], order, loc="lower center", ncol=len(order), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _runs(results: Path, device_kind: str, last: int = 5) -> List[Dict]:
    path = results / "e2e_runs.jsonl"
    if not path.exists():
        return []
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in runs if (r.get("device") == "cpu") == (device_kind == "cpu")][-last:]


def report(results: Path, device_kind: str = "cpu") -> List[Path]:
    """Write e2e_<device_kind>.md and e2e_<device_kind>_<model>.png from the latest runs in results/e2e.csv."""
    results = Path(results)
    rows = [r for r in latest_runs(read_rows(results / "e2e.csv")) if (r["device"] == "cpu") == (device_kind == "cpu")]
    if not rows:
        return []
    written = []
    for (device, model, dtype) in sorted({(r["device"], r["model"], r["dtype"]) for r in rows}):
        part = [r for r in rows if (r["device"], r["model"], r["dtype"]) == (device, model, dtype)]
        name = f"e2e_{device_kind}_{model}.png" if device == "cpu" else f"e2e_{device_kind}_{slug(device)}_{model}.png"
        written.append(plot_model(part, results / name, f"{model} ({dtype}) on {device}: time and peak memory "
                                                          f"relative to the reference (lower is better)"))
    lines = [f"### End-to-end benchmark, {'CPU' if device_kind == 'cpu' else 'GPU'}", "",
             "Generated by `bench/plot_e2e.py` from `bench/results/e2e.csv` (latest run of each group). "
             "`× ref`: median time over the reference's (floor for training steps, base for decode/prefill), lower "
             "is better; `× hooks`: the same against the dense-hook baseline; `mem × ref`: peak memory ratio.", ""]
    runs = _runs(results, device_kind)
    if runs:
        lines += ["Runs (latest last):", ""]
        for r in runs:
            lines.append(f"- {r.get('time')}: `{r.get('command')}` on {r.get('device')} ({r.get('threads')} threads), "
                         f"commit {r.get('commit')}, load average before {r.get('loadavg_before')} / after "
                         f"{r.get('loadavg_after')}, auto backend {r.get('auto_backend')}")
        lines.append("")
    lines.append(markdown_tables(rows))
    lines += [f"![{p.stem}]({p.name})" for p in written] + [""]
    md = results / f"e2e_{device_kind}.md"
    md.write_text("\n".join(lines))
    return [md, *written]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="which rows: the CPU's or the GPUs'")
    args = p.parse_args(argv)
    written = report(Path(args.results), args.device)
    if not written:
        print(f"no {args.device} rows in {Path(args.results) / 'e2e.csv'}")
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
