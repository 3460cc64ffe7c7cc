"""Registers, spills and shared memory of every CUDA kernel in csrc/cuda, compiled for Hopper on this machine.

    python bench/sm90_cuda.py            # a table
    python bench/sm90_cuda.py --json     # one JSON record per kernel variant

`cuda_kernel_report()` compiles each csrc/cuda source that defines a `__global__` kernel with nvcc
(`-Xptxas -v`, the include flags of tests/test_cuda.py's compile check: torch's headers, no GPU needed) for
one architecture and parses ptxas's report. Each record:

    kernel        the kernel's name (e.g. "decode_gemv_kernel")
    variant       its template arguments (e.g. "__nv_bfloat16, 8, 4, 4"), "" for a non-template kernel
    registers     registers per thread
    spill_bytes   spill stores + spill loads, bytes (0 is the goal)
    shared_bytes  static shared memory, bytes (dynamic shared memory, like the decode GEMV's x' stage, is set
                  at launch and not included)
    warnings      ptxas warnings about this kernel (list of str)

plus "stack_bytes", "barriers", "arch", "source" and "mangled". bench/sm90_report.py imports this.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")
# "ptxas warning : ..." and "ptxas /tmp/x.ptx, line 12; warning : ..."
_WARN = re.compile(r"ptxas\b.*?\bwarning\s*:\s*(.*)", re.IGNORECASE)


def find_nvcc() -> Optional[str]:
    candidates = [os.environ.get("CUDA_HOME") and os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"),
                  shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def nvcc_command(nvcc: str, source: Path, out: Path, arch: str = "sm_90a") -> List[str]:
    """The compile command of tests/test_cuda.py (torch's headers and nvcc flags), for one architecture."""
    import torch
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    inc = Path(torch.__file__).resolve().parent / "include"
    num = arch.split("_", 1)[1]
    cmd = [nvcc, "-c", str(source), "-o", str(out), "-std=c++17", "-O3", "--use_fast_math", "-DLOFIT_WITH_CUDA",
           "-I", str(inc), "-I", str(inc / "torch" / "csrc" / "api" / "include"),
           "-I", sysconfig.get_paths()["include"], "-Xcompiler", "-fPIC",
           f"-gencode=arch=compute_{num},code={arch}", "-Xptxas", "-v", *COMMON_NVCC_FLAGS]
    if not (inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # a CPU-only torch lacks this generated header
    return cmd


def demangle(names: Sequence[str]) -> Dict[str, str]:
    tool = shutil.which("c++filt") or shutil.which("llvm-cxxfilt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    return {n: (lines[i] if i < len(lines) else n) for i, n in enumerate(names)}


def split_name(demangled: str) -> tuple:
    """('decode_gemv_kernel', '__nv_bfloat16, 1, 4, 4') from 'void ns::decode_gemv_kernel<...>(args)'."""
    s = demangled
    if s.startswith("void "):
        s = s[5:]
    depth, cut = 0, len(s)  # drop the argument list: the last top-level '(...)'
    for i in range(len(s) - 1, -1, -1):
        if s[i] == ")":
            depth += 1
        elif s[i] == "(":
            depth -= 1
            if depth == 0:
                cut = i
                break
    s = s[:cut]
    variant = ""
    if s.endswith(">"):
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            if s[i] == ">":
                depth += 1
            elif s[i] == "<":
                depth -= 1
                if depth == 0:
                    variant, s = s[i + 1:-1], s[:i]
                    break
    return s.rsplit("::", 1)[-1], variant


def parse_ptxas(text: str, arch: str = "", source: str = "") -> List[dict]:
    """Records from the `-Xptxas -v` output of one compile (one architecture)."""
    records: Dict[str, dict] = {}
    order: List[str] = []
    current: Optional[str] = None
    pending_warnings: List[str] = []
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            if current not in records:
                records[current] = {"mangled": current, "arch": m.group(2), "registers": 0, "spill_bytes": 0,
                                    "stack_bytes": 0, "shared_bytes": 0, "barriers": 0, "warnings": []}
                order.append(current)
            records[current]["warnings"] += pending_warnings
            pending_warnings = []
            continue
        m = _PROPS.search(line)
        if m:
            current = m.group(1) if m.group(1) in records else current
            continue
        m = _WARN.search(line)
        if m:
            # ptxas prints a kernel's warnings just before its "Compiling entry" line, or after it
            # naming the function; attribute by name when the message names one.
            msg = m.group(1).strip()
            named = next((k for k in records if k in msg), None)
            if named:
                records[named]["warnings"].append(msg)
            else:
                pending_warnings.append(msg)
            continue
        if current is None:
            continue
        rec = records[current]
        m = _FRAME.search(line)
        if m:
            rec["stack_bytes"] = int(m.group(1))
            rec["spill_bytes"] = int(m.group(2)) + int(m.group(3))
            continue
        m = _USED.search(line)
        if m:
            rec["registers"] = int(m.group(1))
            rec["barriers"] = int(m.group(2) or 0)
            rec["shared_bytes"] = int(m.group(3) or 0)
    if pending_warnings and order:  # warnings after the last kernel: keep them somewhere visible
        records[order[-1]]["warnings"] += pending_warnings
    names = demangle(order)
    out = []
    for mangled in order:
        rec = records[mangled]
        kernel, variant = split_name(names[mangled])
        out.append({"kernel": kernel, "variant": variant, "registers": rec["registers"],
                    "spill_bytes": rec["spill_bytes"], "shared_bytes": rec["shared_bytes"],
                    "warnings": rec["warnings"], "stack_bytes": rec["stack_bytes"], "barriers": rec["barriers"],
                    "arch": rec["arch"] or arch, "source": source, "mangled": mangled})
    return out


def kernel_sources(cuda_dir: Path = CUDA_DIR) -> List[Path]:
    """The .cu files that define kernels (head_affine_cuda.cu is host code only)."""
    return [p for p in sorted(Path(cuda_dir).glob("*.cu")) if "__global__" in p.read_text()]


def cuda_kernel_report(arch: str = "sm_90a", sources: Optional[Sequence[Path]] = None,
                       nvcc: Optional[str] = None, timeout: float = 900.0) -> List[dict]:
    """One record per kernel variant of csrc/cuda compiled for `arch` (see the module docstring).

    Raises RuntimeError when nvcc is missing or a source does not compile."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (CUDA_HOME/bin, PATH, /usr/local/cuda/bin)")
    srcs = [Path(s) for s in (sources if sources is not None else kernel_sources())]
    with tempfile.TemporaryDirectory() as tmp:
        def compile_one(src: Path):
            cmd = nvcc_command(nvcc, src, Path(tmp) / (src.stem + ".o"), arch)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src} (exit {proc.returncode}):\n"
                                   f"{(proc.stdout + proc.stderr)[-4000:]}")
            return parse_ptxas(proc.stdout + "\n" + proc.stderr, arch, src.name)

        with ThreadPoolExecutor(max_workers=max(1, min(len(srcs), os.cpu_count() or 1))) as pool:
            results = list(pool.map(compile_one, srcs))
    return [rec for recs in results for rec in recs]


def format_table(records: Sequence[dict]) -> str:
    rows = [("kernel", "variant", "regs", "spill B", "smem B", "warnings")]
    for r in sorted(records, key=lambda r: (r["kernel"], r["variant"])):
        rows.append((r["kernel"], r["variant"], str(r["registers"]), str(r["spill_bytes"]), str(r["shared_bytes"]),
                     "; ".join(r["warnings"]) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_90a", help="ptxas target, e.g. sm_90a, sm_90, sm_80 (default sm_90a)")
    ap.add_argument("--json", action="store_true", help="print one JSON record per line")
    ap.add_argument("sources", nargs="*", type=Path, help="the .cu files (default: csrc/cuda's kernel sources)")
    args = ap.parse_args(argv)
    records = cuda_kernel_report(args.arch, args.sources or None)
    if args.json:
        for r in records:
            print(json.dumps(r))
    else:
        print(format_table(records))
        spills = [r for r in records if r["spill_bytes"]]
        print(f"\n{len(records)} kernels for {args.arch}; {len(spills)} spill")
    return 1 if any(r["spill_bytes"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
