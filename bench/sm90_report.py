"""What the Triton kernels become on Hopper, read without a GPU: every variant that `auto` can launch on the
GPU hot path is compiled for sm_90 (`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`), its
PTX assembled by the ptxas that ships with Triton (`-arch=sm_90a -v`), and the TTGIR read for the pipeline.

Per variant: wgmma used (warp_group_dot in TTGIR), ptxas's serialized-wgmma warning (C7515), spill bytes,
registers, shared memory, the number of shared-memory buffers of each GEMM operand (x or dy, and W) that the
software pipeliner allocated, and scalar 16-bit global loads in the PTX (a W or x tile that is not
vectorized, hence not pipelined). Then, where nvcc is installed, the CUDA kernels of csrc/cuda (registers, spills
and shared memory from nvcc -Xptxas -v, by bench/sm90_cuda.py; --no-cuda skips them).

    python bench/sm90_report.py            # the table
    python bench/sm90_report.py --json     # one JSON record per variant
    python bench/sm90_report.py --check    # exit 1 if a hot-path variant misses a requirement

Shapes are Llama-2-7B's o_proj (C = D_out = 4096, d = 128, K = 4 heads for the thin loops) in bfloat16 and
float16, specialized the way Triton specializes a launch on contiguous tensors (strides of 1 become
constants, sizes and pointers divisible by 16 say so).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

os.environ.pop("TRITON_INTERPRET", None)  # compile the real kernels, whatever the caller's environment says
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

C = D_OUT = 4096
HEAD_DIM = 128
K_THIN = 4
REQUIREMENTS = ("wgmma", "no C7515", "no spills", "no scalar 16-bit global loads", ">= 2 buffers of each operand")


@dataclass
class Variant:
    kernel: str
    variant: str
    config: Dict
    hot: bool = True  # a GEMM on the hot path: the requirements apply
    fn: object = None
    args: Dict = field(default_factory=dict)      # name -> type string, or ("const", value)
    a_tile: Tuple[int, int] = (0, 0)                # the left operand's tile (x or dy; W in the decode kernel)
    b_tile: Tuple[int, int] = (0, 0)
    a_name: str = "x"
    b_name: str = "w"


@dataclass
class Record:
    kernel: str
    variant: str
    config: Dict
    hot: bool
    wgmma: bool = False
    serialized_wgmma_warning: bool = False
    spill_bytes: int = 0
    registers: int = 0
    shared_bytes: int = 0
    x_buffers: int = 0
    w_buffers: int = 0
    scalar_global_loads: int = 0
    error: str = ""
    failures: List[str] = field(default_factory=list)


def _kernels():
    from lofit_fast.ops.triton_backend import import_kernels

    k = import_kernels()
    if k.INTERPRETED:
        raise SystemExit("the Triton kernels were defined under TRITON_INTERPRET=1: run this in a fresh process")
    return k


def _dtype_str(dtype: str) -> str:
    return {"bf16": "*bf16", "fp16": "*fp16"}[dtype]


def variants(dtypes=("bf16", "fp16")) -> List[Variant]:
    """Every launch `auto` makes on the GPU hot path at these shapes, with each regime's candidate configs."""
    k = _kernels()
    from lofit_fast.kernels import _common as common
    from lofit_fast.kernels import backward as bwd
    from lofit_fast.kernels import forward as fwd
    from lofit_fast.kernels import rows as rws

    out: List[Variant] = []
    for dt in dtypes:
        p = _dtype_str(dt)
        for kind, kernel, rows in (("fwd", fwd._fwd_kernel, {"mid": 200, "large": 4096}),
                                   ("decode", fwd._decode_kernel, {"16": 8, "32": 24})):
            for regime, cands in common.GPU_CONFIGS[kind].items():
                for ci, cfg in enumerate(cands):
                    for label, has_bias, thin in (("plain", False, False), ("v folded", True, False),
                                                  ("A thin + v folded", True, True), ("A thin", False, True)):
                        n = rows[regime]
                        args = {
                            "x_ptr": p, "w_ptr": p, "b_ptr": "*fp32", "y_ptr": p, "heads_ptr": "*i64",
                            "wa_ptr": p, "N": "i32" if n % 16 else "i32:16", "C": "i32:16",
                            "D_OUT": "i32:16", "KD": "i32:16", "stride_xm": "i32:16", "stride_xk": ("const", 1),
                            "stride_wn": "i32:16", "stride_wk": ("const", 1), "stride_ym": "i32:16",
                            "HEAD_DIM": ("const", HEAD_DIM), "HAS_BIAS": ("const", has_bias),
                            "THIN": ("const", thin), "THIN_BK": ("const", fwd.thin_block(HEAD_DIM, cfg["BLOCK_K"])),
                            "EVEN_K": ("const", C % cfg["BLOCK_K"] == 0), "DOT_FP32": ("const", False),
                            "IEEE": ("const", False),
                        }
                        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
                        if kind == "fwd":
                            a_tile, b_tile, a_name, b_name = (bm, bk), (bk, bn), "x", "w"
                        else:
                            a_tile, b_tile, a_name, b_name = (bn, bk), (bk, bm), "w", "x"
                        out.append(Variant(kernel.__name__ if hasattr(kernel, "__name__") else kind,
                                           f"{dt} {kind}/{regime}#{ci} {label}", cfg, True, kernel, args,
                                           a_tile, b_tile, a_name, b_name))
        # Many adapters in one batch (kernels/rows.py): the same tiles, each row's slot read from the row-id table.
        for kind, kernel, rows in (("fwd", rws._rows_fwd_kernel, {"mid": 200, "large": 4096}),
                                   ("decode", rws._rows_decode_kernel, {"16": 8, "32": 24})):
            for regime, cands in rws.ROWS_GPU_CONFIGS[kind].items():
                for ci, cfg in enumerate(cands):
                    for label, has_a, has_off in (("rows: A + offset", True, True), ("rows: offset", False, True),
                                                  ("rows: A", True, False)):
                        n = rows[regime]
                        args = {
                            "x_ptr": p, "w_ptr": p, "b_ptr": p, "y_ptr": p, "heads_ptr": "*i64", "t_ptr": p,
                            "off_ptr": "*fp32", "rid_ptr": "*i64", "N": "i32" if n % 16 else "i32:16",
                            "C": "i32:16", "D_OUT": "i32:16", "KD": "i32:16", "stride_xm": "i32:16",
                            "stride_xk": ("const", 1), "stride_wn": "i32:16", "stride_wk": ("const", 1),
                            "stride_ym": "i32:16", "HEAD_DIM": ("const", HEAD_DIM), "HAS_BIAS": ("const", False),
                            "HAS_A": ("const", has_a), "HAS_OFF": ("const", has_off),
                            "THIN_BK": ("const", fwd.thin_block(HEAD_DIM, cfg["BLOCK_K"])),
                            "EVEN_K": ("const", C % cfg["BLOCK_K"] == 0), "DOT_FP32": ("const", False),
                            "IEEE": ("const", False),
                        }
                        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
                        if kind == "fwd":
                            a_tile, b_tile, a_name, b_name = (bm, bk), (bk, bn), "x", "w"
                        else:
                            a_tile, b_tile, a_name, b_name = (bn, bk), (bk, bm), "w", "x"
                        out.append(Variant(kernel.__name__ if hasattr(kernel, "__name__") else kind,
                                           f"{dt} {kind}/{regime}#{ci} {label}", cfg, True, kernel, args,
                                           a_tile, b_tile, a_name, b_name))
        for regime, cands in common.GPU_CONFIGS["bwd"].items():
            n = 200 if regime == "mid" else 4096
            for ci, cfg in enumerate(cands):
                for label, thin, scale, need_da, need_dv in (
                        ("dx + dv (step 2)", False, False, False, True),
                        ("dx scaled + dA (step 1)", False, True, True, False),
                        ("dx scaled + dA + dv", False, True, True, True),
                        ("thin dA + dv", True, False, True, True),
                        ("thin dv", True, False, False, True)):
                    args = {
                        "dy_ptr": p, "w_ptr": p, "dx_ptr": p, "heads_ptr": "*i64", "slot_ptr": "*i32",
                        "a_ptr": "*fp32", "xs_ptr": p, "part_ptr": "*fp32", "N": "i32" if n % 16 else "i32:16",
                        "D_OUT": "i32:16", "NCOLS": "i32:16", "KD": "i32:16", "stride_part": "i32:16",
                        "offset_da": "i32:16", "stride_dym": "i32:16", "stride_dyk": ("const", 1),
                        "stride_wn": "i32:16", "stride_wk": ("const", 1), "stride_dxm": "i32:16",
                        "stride_xsm": "i32:16", "stride_xsk": ("const", 1),
                        "HEAD_DIM": ("const", HEAD_DIM), "THIN": ("const", thin), "HAS_SCALE": ("const", scale),
                        "NEED_DA": ("const", need_da), "NEED_DV": ("const", need_dv),
                        "EVEN_K": ("const", D_OUT % cfg["BLOCK_K"] == 0), "DOT_FP32": ("const", False),
                        "IEEE": ("const", False),
                    }
                    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
                    out.append(Variant("_head_affine_bwd_kernel", f"{dt} bwd/{regime}#{ci} {label}", cfg, True,
                                       bwd._head_affine_bwd_kernel, args, (bm, bk), (bk, bn), "dy", "w"))
        # Not GEMMs: memory-bound passes over W's selected columns (run once per parameter version).
        out.append(Variant("_offset_bias_kernel", f"{dt} fold v into the bias", {"num_warps": 4, "num_stages": 1},
                           False, fwd._offset_bias_kernel, {
                               "w_ptr": p, "b_ptr": p, "heads_ptr": "*i64", "v_ptr": "*fp32", "out_ptr": "*fp32",
                               "D_OUT": "i32:16", "KD": "i32:16", "stride_wn": "i32:16", "stride_wk": ("const", 1),
                               "HEAD_DIM": ("const", HEAD_DIM), "HAS_BIAS": ("const", False),
                               "BLOCK_O": ("const", 32), "BLOCK_J": ("const", 128)}))
        out.append(Variant("_scaled_columns_kernel", f"{dt} W_S·diag(A)", {"num_warps": 4, "num_stages": 1},
                           False, fwd._scaled_columns_kernel, {
                               "w_ptr": p, "out_ptr": p, "heads_ptr": "*i64", "a_ptr": "*fp32", "D_OUT": "i32:16",
                               "KD": "i32:16", "stride_wn": "i32:16", "stride_wk": ("const", 1),
                               "HEAD_DIM": ("const", HEAD_DIM), "BLOCK_O": ("const", 32), "BLOCK_J": ("const", 128)}))
        out.append(Variant("_scaled_weight_kernel", f"{dt} W·diag(1 + A)", {"num_warps": 4, "num_stages": 1},
                           False, fwd._scaled_weight_kernel, {
                               "w_ptr": p, "out_ptr": p, "slot_ptr": "*i32", "a_ptr": "*fp32", "D_OUT": "i32:16",
                               "C": "i32:16", "stride_wn": "i32:16", "stride_wk": ("const", 1),
                               "HEAD_DIM": ("const", HEAD_DIM), "BLOCK_O": ("const", 32), "BLOCK_C": ("const", 128)}))
        out.append(Variant("_offset_rows_kernel", f"{dt} offset rows v W_S^T per adapter",
                           {"num_warps": 4, "num_stages": 1}, False, rws._offset_rows_kernel, {
                               "w_ptr": p, "heads_ptr": "*i64", "v_ptr": "*fp32", "out_ptr": "*fp32",
                               "D_OUT": "i32:16", "KD": "i32:16", "stride_wn": "i32:16", "stride_wk": ("const", 1),
                               "HEAD_DIM": ("const", HEAD_DIM), "BLOCK_O": ("const", 32), "BLOCK_J": ("const", 128)}))
        out.append(Variant("_rows_scale_kernel", f"{dt} per-row x_S * A[rid]", {"num_warps": 4, "num_stages": 1},
                           False, rws._rows_scale_kernel, {
                               "x_ptr": p, "heads_ptr": "*i64", "a_ptr": "*fp32", "rid_ptr": "*i64", "t_ptr": p,
                               "N": "i32", "KD": "i32:16", "stride_xm": "i32:16", "stride_xk": ("const", 1),
                               "HEAD_DIM": ("const", HEAD_DIM), "BLOCK_R": ("const", 16), "BLOCK_J": ("const", 128)}))
        out.append(Variant("_rows_grad_kernel", f"{dt} per-row dx scale, g_S and g_S*x_S",
                           {"num_warps": 4, "num_stages": 1}, False, rws._rows_grad_kernel, {
                               "g_ptr": p, "xs_ptr": p, "a_ptr": "*fp32", "rid_ptr": "*i64", "heads_ptr": "*i64",
                               "gs_ptr": "*fp32", "gx_ptr": "*fp32", "N": "i32", "KD": "i32:16",
                               "stride_gm": "i32:16", "stride_xm": "i32:16", "HEAD_DIM": ("const", HEAD_DIM),
                               "SCALE": ("const", True), "WANT_GS": ("const", True), "WANT_GX": ("const", True),
                               "BLOCK_R": ("const", 16), "BLOCK_J": ("const", 64)}))
    del k
    return out


def _source(v: Variant):
    from triton.compiler import ASTSource

    names = [p.name for p in v.fn.params]
    meta = {k: v.config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M") if k in v.config}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        spec = ("const", meta[name]) if name in meta else v.args[name]
        if isinstance(spec, tuple):
            signature[name] = "constexpr"
            constexprs[(i,)] = spec[1]
        else:
            ty, _, div = spec.partition(":")
            signature[name] = ty
            if ty.startswith("*") or div:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=v.fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _ptxas_candidates() -> List[str]:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    found = [str(p) for p in (bin_dir / "ptxas", bin_dir / "ptxas-blackwell") if p.exists()]
    system = shutil.which("ptxas")
    return found + ([system] if system else [])


def run_ptxas(ptx: str) -> str:
    """ptxas -arch=sm_90a -v output, from the first ptxas that accepts this PTX's version."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        errors = []
        for exe in _ptxas_candidates():
            r = subprocess.run([exe, "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                               capture_output=True, text=True, timeout=300)
            if r.returncode == 0:
                return r.stdout + r.stderr
            errors.append(f"{exe}: {(r.stdout + r.stderr).strip().splitlines()[-1:]}")
        raise RuntimeError("no ptxas assembled the PTX: " + "; ".join(errors))


_ALLOC = re.compile(r"ttg\.local_alloc[^:\n]*:\s*\([^)]*\)\s*->\s*!ttg\.memdesc<([0-9x]+)x(?:bf16|f16|f32|i32|i64)")
_ALLOC_FROM = re.compile(r"ttg\.local_alloc\s+%[\w.#]+[^:\n]*:\s*\([^)]*\)\s*->\s*!ttg\.memdesc<([0-9x]+)x(?:bf16|f16)")
_SCALAR16 = re.compile(r"^\s*(?:@%p\d+\s+)?ld\.global(?:\.[\w:]+)*?\.(?:b16|u16|s16|f16)\s", re.M)


def operand_buffers(ttgir: str, tile: Tuple[int, int]) -> int:
    """Buffers of the shared-memory allocations holding a tile of this shape (either orientation): the
    multi-buffered ones have the buffer count as a leading dimension. The smallest count if there are several
    (two loops); 0 when no allocation has that shape (the operand never goes through shared memory)."""
    counts = []
    for m in list(_ALLOC.finditer(ttgir)) + list(_ALLOC_FROM.finditer(ttgir)):
        dims = [int(d) for d in m.group(1).split("x")]
        shape, bufs = (tuple(dims[1:]), dims[0]) if len(dims) == 3 else (tuple(dims), 1)
        if shape in (tile, tile[::-1]):
            counts.append(bufs)
    return min(counts) if counts else 0


def analyse(v: Variant) -> Record:
    import triton
    from triton.backends.compiler import GPUTarget

    rec = Record(v.kernel, v.variant, v.config, v.hot)
    try:
        compiled = triton.compile(_source(v), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": v.config["num_warps"], "num_stages": v.config["num_stages"]})
        ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
        log = run_ptxas(ptx)
    except Exception as exc:  # a variant that does not compile is a failure to report, not a crash
        rec.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        rec.failures.append("compiles")
        return rec
    rec.wgmma = "ttng.warp_group_dot" in ttgir or "wgmma.mma_async" in ptx
    rec.serialized_wgmma_warning = "C7515" in log
    rec.spill_bytes = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    regs = re.findall(r"Used (\d+) registers", log)
    rec.registers = int(regs[-1]) if regs else 0
    rec.shared_bytes = int(compiled.metadata.shared)
    rec.scalar_global_loads = len(_SCALAR16.findall(ptx))
    if v.hot:
        a = operand_buffers(ttgir, v.a_tile)
        b = operand_buffers(ttgir, v.b_tile)
        rec.x_buffers, rec.w_buffers = (b, a) if v.a_name == "w" else (a, b)
        if not rec.wgmma:
            rec.failures.append("wgmma")
        if rec.serialized_wgmma_warning:
            rec.failures.append("C7515")
        if rec.scalar_global_loads:
            rec.failures.append("scalar 16-bit loads")
        if rec.x_buffers < 2 or rec.w_buffers < 2:
            rec.failures.append("buffers")
    if rec.spill_bytes:
        rec.failures.append("spills")
    return rec


def _analyse_index(args) -> dict:
    dtypes, i = args
    return asdict(analyse(variants(dtypes)[i]))


def report(dtypes=("bf16", "fp16"), with_cuda: bool = False, jobs: int = 1) -> List[dict]:
    n = len(variants(dtypes))
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as pool:
            records = list(pool.map(_analyse_index, [(dtypes, i) for i in range(n)]))
    else:
        records = [asdict(analyse(v)) for v in variants(dtypes)]
    for r in records:
        r["kind"] = "triton"
    if with_cuda:
        from sm90_cuda import cuda_kernel_report  # noqa: E402  (beside this file)

        for r in cuda_kernel_report():
            r.setdefault("kind", "cuda")
            records.append(r)
    return records


def table(records: List[dict]) -> str:
    head = (f"{'kernel':<24} {'variant':<34} {'tiles':<18} {'wgmma':>5} {'C7515':>5} {'spill':>5} {'regs':>4} "
            f"{'smem':>7} {'x buf':>5} {'w buf':>5} {'ld16':>4}  result")
    lines = [head, "-" * len(head)]
    for r in records:
        cfg = r.get("config") or {}
        tiles = (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}/{cfg['num_warps']}w/{cfg['num_stages']}s"
                 if "BLOCK_M" in cfg else "")
        result = "ERROR " + r["error"] if r.get("error") else (
            ("FAIL: " + ", ".join(r["failures"])) if r.get("failures") else ("ok" if r.get("hot", True) else "ok (aux)"))
        lines.append(f"{r['kernel'][:24]:<24} {r['variant'][:34]:<34} {tiles:<18} {str(r.get('wgmma', '')):>5} "
                     f"{str(r.get('serialized_wgmma_warning', '')):>5} {r.get('spill_bytes', 0):>5} "
                     f"{r.get('registers', 0):>4} {r.get('shared_bytes', 0):>7} {r.get('x_buffers', ''):>5} "
                     f"{r.get('w_buffers', ''):>5} {r.get('scalar_global_loads', ''):>4}  {result}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON record per variant on stdout")
    ap.add_argument("--check", action="store_true", help="exit 1 unless every hot-path variant meets: "
                    + "; ".join(REQUIREMENTS))
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--no-cuda", dest="cuda", action="store_false",
                    help="skip the CUDA kernels of csrc/cuda (compiled with nvcc -Xptxas -v when nvcc is found)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="variants compiled in parallel")
    args = ap.parse_args(argv)
    records = report(tuple(args.dtypes.split(",")), with_cuda=args.cuda and shutil.which("nvcc") is not None,
                     jobs=args.jobs)
    if args.json:
        for r in records:
            print(json.dumps(r))
    else:
        print(table(records))
    bad = [r for r in records if r.get("failures") or r.get("error")]
    if not args.json:
        print(f"\n{len(records) - len(bad)} of {len(records)} variants meet the requirements")
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
