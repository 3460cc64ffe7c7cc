"""End-to-end benchmark: fused LoFiT against hook-based LoFiT, LoRA and the bare frozen model, with memory.

Workloads (rows in bench/results/e2e.csv, one per provider and shape):
  step1    one LoFiT head-selection step: A on every head, loss = completion CE + λ·Σ|A|
  step2    one LoFiT bias-tuning step: v on K ≈ 3 % of the heads (seeded random heads), loss = completion CE
  decode   model.generate with a KV cache, a fixed number of new tokens, greedy (prompt prefill included)
  prefill  one no-grad forward over the prompt that fills the KV cache (logits of the last position only)

A training step is: forward, completion-only cross-entropy on the logits (lofit_fast.losses, the loss of the
LoFiT training loop, on the last --completion-frac of every row), backward, AdamW step on the trainable
parameters (gradients set to None before each step).

Providers:
  floor       the frozen model doing the same forward and backward with one trainable scalar added to the o_proj
              input of the lowest patched layer, so autograd backpropagates exactly as deep as LoFiT and nothing
              more is saved (the reference of the training ratios)
  fused       lofit_fast.patch, backend "auto";  torch: lofit_fast.patch, backend "torch"
  fused-<b>   lofit_fast.patch with the backend forced to <b> (fused-cuda, fused-triton, fused-cpp, fused-torch);
              only when asked for by name in --providers (bench/gpu_check.sh times fused-cuda and fused-triton)
  hooks       lofit_fast.hooks.patch (a dense pre-hook);  hooks_loop: hooks.patch_loop (the official loop)
  lora        peft LoRA r=8 on q_proj, v_proj (lofit_fast.methods.comparators.lora)
  base        the unmodified model (the reference of the decode and prefill ratios)
  merged      lofit_fast.adapter.merge of the step-2 patch: plain nn.Linear modules
For decode and prefill, fused, hooks and merged carry the step-2 intervention (v on the same K heads).

Every provider is built once on one copy of the model and swapped in and out (module swaps and hook
registration: the tree a provider runs is exactly what its public API produced). Timed repetitions go
round-robin over the providers, starting each round at the next provider, so drift in the machine's load
hits all of them alike; warm-up rounds are not counted. Reported: median, p20 and p80 of --steps timed
repetitions; tokens/s from the median. Every ratio compares rows of one run.

peak_mb: what the provider alone needs at its peak = the model's weights and buffers + the provider's own
persistent tensors (trainable parameters, optimizer state, extra weights such as a merged o_proj's new bias)
+ the peak of the memory allocated during one step above what was allocated before it. The transient part is
torch.cuda.max_memory_allocated on a GPU, and on the CPU the running sum of the allocations and frees that
torch.profiler(profile_memory=True) reports for one step (torch's CPU allocator, not the process RSS). It is
taken in a separate untimed pass after the timed ones.

    python bench/e2e_bench.py --device cpu --model smollm2                       # the CPU measurement
    python bench/e2e_bench.py --device cuda --model llama2-7b,llama3-8b,gemma-7b  # see bench/gpu_check.sh
    python bench/e2e_bench.py --model tiny --steps 2 --warmup 1 --results /tmp/e2e  # a smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (str(ROOT), str(BENCH)):  # lofit_fast from this checkout; plot_e2e next to this file
    if _path not in sys.path:
        sys.path.insert(0, _path)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports the triton backend

import lofit_fast  # noqa: E402
from lofit_fast import hooks as lofit_hooks  # noqa: E402
from lofit_fast.losses import completion_loss  # noqa: E402
from lofit_fast.patch import find_attention_sites  # noqa: E402

HEADER = ["model", "provider", "workload", "batch", "seq", "dtype", "tokens_per_s", "ms_p50", "ms_p20", "ms_p80",
          "peak_mb", "device", "torch", "commit"]
WORKLOADS = ("step1", "step2", "decode", "prefill")
TRAIN_PROVIDERS = ("floor", "fused", "torch", "hooks", "hooks_loop", "lora")
INFER_PROVIDERS = ("base", "fused", "hooks", "merged")
REFERENCE = {"step1": "floor", "step2": "floor", "decode": "base", "prefill": "base"}
FORCED = "fused-"  # fused-<backend>: lofit_fast.patch with that backend instead of "auto" (training and inference)
FORCED_BACKENDS = ("torch", "cpp", "triton", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OOM = "oom"

# LoFiT hyper-parameters (official 7B values, lofit_fast.methods.lofit): they do not change the cost of a step.
L1 = 5e-4
LR_STEP1, LR_STEP2 = 5e-3, 1e-2
INIT_STD = 1e-3
INFER_V_STD = 1.0  # the step-2 offsets the decode / prefill providers carry (any values; large ones make
#                   the check that fused, hooks and merged agree meaningful in 16-bit dtypes)

# Random-weight shapes from the models' published configs. RoPE settings do not change the cost and keep their
# defaults; everything that sets a tensor's shape is here.
MODEL_CONFIGS: Dict[str, Tuple[str, Dict]] = {
    "llama2-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                rms_norm_eps=1e-5)),
    "llama3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                rms_norm_eps=1e-5)),
    "gemma-7b": ("gemma", dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                               num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                               max_position_embeddings=8192)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                   max_position_embeddings=8192, tie_word_embeddings=True)),
    "gemma3-270m": ("gemma3", dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                                   max_position_embeddings=32768, query_pre_attn_scalar=256)),
    "tiny": ("llama", dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)),
}
REAL_MODELS = {"smollm2": "the real SmolLM2-135M-Instruct (lofit_fast.models.load_model)"}


# ------------------------------------------------------------------------------------------------- models
def build_model(name: str, device: torch.device, dtype: torch.dtype, **overrides) -> nn.Module:
    """A model in eval mode with every parameter frozen: a real one by short name, or random weights (whose
    config entries `overrides` may change, e.g. num_hidden_layers=4 for a shallow copy of a shape)."""
    if name in REAL_MODELS:
        if overrides:
            raise ValueError(f"{name} is a real model: its config cannot be overridden ({sorted(overrides)})")
        from lofit_fast.models import load_model

        model, _ = load_model(name, dtype=dtype, device=device)
    elif name in MODEL_CONFIGS:
        import transformers as tf

        family, shape = MODEL_CONFIGS[name]
        config_class = {"llama": tf.LlamaConfig, "gemma": tf.GemmaConfig, "gemma3": tf.Gemma3TextConfig}[family]
        config = config_class(**{**shape, **overrides})
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(device):  # random init on the device itself: seconds for 7B shapes on a GPU
            model_class = tf.Gemma3ForCausalLM if family == "gemma3" else tf.AutoModelForCausalLM
            model = model_class.from_config(config, dtype=dtype) if family != "gemma3" else model_class(config)
        model.to(device=device, dtype=dtype)
    else:
        known = sorted([*REAL_MODELS, *MODEL_CONFIGS])
        raise ValueError(f"unknown model {name!r}: choose one of {known}")
    model.eval()
    model.requires_grad_(False)
    return model


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(model: nn.Module) -> int:
    return tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())


def total_heads(model: nn.Module) -> int:
    return sum(site.num_heads for site in find_attention_sites(model))


def step2_heads(model: nn.Module, seed: int = 0) -> List[Tuple[int, int]]:
    """K ≈ 3 % of the heads (lofit_fast.methods.lofit.default_k), drawn with a fixed seed."""
    from lofit_fast.methods.lofit import default_k, random_heads

    return random_heads(model, default_k(model), seed=seed)


# ---------------------------------------------------------------------------------------------- providers
@dataclass
class Provider:
    """One way of running the model: module swaps and forward pre-hooks applied by attach(), undone by
    detach(), plus the trainable parameters and their optimizer (None for inference providers)."""

    name: str
    swaps: List[Tuple[nn.Module, str, nn.Module]] = field(default_factory=list)  # (parent, attribute, module)
    pre_hooks: List[Tuple[nn.Module, Callable]] = field(default_factory=list)
    params: List[nn.Parameter] = field(default_factory=list)
    optimizer: Optional[torch.optim.Optimizer] = None
    l1_params: List[nn.Parameter] = field(default_factory=list)
    extra_bytes: int = 0  # persistent bytes besides params and optimizer state (e.g. a merged layer's new bias)
    _saved: List[Tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    _handles: list = field(default_factory=list)

    def attach(self) -> None:
        if self._saved or self._handles:
            raise RuntimeError(f"provider {self.name!r} is already attached")
        for parent, attr, module in self.swaps:
            self._saved.append((parent, attr, getattr(parent, attr)))
            setattr(parent, attr, module)
        for module, fn in self.pre_hooks:
            self._handles.append(module.register_forward_pre_hook(fn))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for parent, attr, module in reversed(self._saved):
            setattr(parent, attr, module)
        self._saved, self._handles = [], []

    @contextlib.contextmanager
    def attached(self):
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def persistent_bytes(self) -> int:
        state = []
        if self.optimizer is not None:
            for s in self.optimizer.state.values():
                state.extend(t for t in s.values() if isinstance(t, torch.Tensor))
        return tensor_bytes(self.params) + tensor_bytes(state) + self.extra_bytes


def _o_proj_swaps(model: nn.Module) -> List[Tuple[nn.Module, str, nn.Module]]:
    """(attention module, "o_proj", current o_proj) for every layer whose o_proj is not the plain Linear."""
    return [(s.attn, "o_proj", s.attn.o_proj) for s in find_attention_sites(model)
            if type(s.attn.o_proj) is not nn.Linear]


def _adamw(params: List[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


class ScalarShift(nn.Module):
    """The floor's single trainable scalar, added to the input of one o_proj (starts at 0). Its gradient is the
    sum of the gradient reaching that input, so autograd must backpropagate down to that layer; an addition
    saves no tensor for the backward (a multiplication would keep the layer's input alive)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros((), device=device, dtype=torch.float32))

    def pre_hook(self, module, args):
        x, *rest = args
        return (x + self.shift.to(x.dtype), *rest)


def make_floor(model: nn.Module, layer: int, lr: float) -> Provider:
    site = find_attention_sites(model)[layer]
    gate = ScalarShift(site.attn.o_proj.weight.device)
    params = [gate.shift]
    return Provider("floor", pre_hooks=[(site.attn.o_proj, gate.pre_hook)], params=params, optimizer=_adamw(params, lr))


def _trainable(params: List[nn.Parameter], lr: Optional[float], l1: bool) -> Dict:
    """Provider keywords for parameters that train (lr given) or are fixed intervention values (lr None)."""
    if lr is None:
        return dict(extra_bytes=tensor_bytes(params))
    return dict(params=params, optimizer=_adamw(params, lr), l1_params=params if l1 else [])


def make_lofit(model: nn.Module, name: str, heads, *, scale: bool, offset: bool, backend: str, lr: Optional[float],
               init_std: float = 0.0, l1: bool = False, v: Optional[Dict[int, torch.Tensor]] = None) -> Provider:
    """lofit_fast.patch's HeadInterventionLinear modules, taken out of the model again after patching."""
    lofit_fast.patch(model, heads, scale=scale, offset=offset, init_std=init_std, backend=backend, v=v)
    try:
        swaps = _o_proj_swaps(model)
        params = lofit_fast.trainable_parameters(model)
    finally:
        lofit_fast.unpatch(model)
    return Provider(name, swaps=swaps, **_trainable(params, lr, l1))


def make_hooks(model: nn.Module, name: str, heads, *, scale: bool, offset: bool, loop: bool, lr: Optional[float],
               init_std: float = 0.0, l1: bool = False, v: Optional[Dict[int, torch.Tensor]] = None) -> Provider:
    """lofit_fast.hooks' pre-hooks (dense, or the official per-head loop), removed again after patching; the
    HookIntervention modules (A, v, heads) live on in the bound pre_hook methods that attach() registers."""
    attach = lofit_hooks.patch_loop if loop else lofit_hooks.patch
    attach(model, heads, scale=scale, offset=offset, init_std=init_std, v=v)
    try:
        sites = find_attention_sites(model)
        pre_hooks = [(sites[layer].attn.o_proj, m.pre_hook) for layer, m in lofit_hooks.hooked_modules(model).items()]
        params = lofit_hooks.trainable_parameters(model)
    finally:
        lofit_hooks.unpatch(model)
    return Provider(name, pre_hooks=pre_hooks, **_trainable(params, lr, l1))


def make_lora(model: nn.Module, lr: float) -> Provider:
    """peft LoRA r=8 on q_proj and v_proj (lofit_fast.methods.comparators.lora); attach() swaps the LoRA-wrapped
    modules in, and the model is run directly (the PeftModel wrapper only forwards to it)."""
    from lofit_fast.methods.comparators import lora, lora_parameters

    targets = [(s.attn, name) for s in find_attention_sites(model) for name in ("q_proj", "v_proj")]
    originals = [getattr(attn, name) for attn, name in targets]
    had_config = hasattr(model, "peft_config")
    peft_model = lora(model, r=8)
    params = lora_parameters(peft_model)
    swaps = [(attn, name, getattr(attn, name)) for attn, name in targets]
    for (attn, name), original in zip(targets, originals):
        setattr(attn, name, original)
    model.requires_grad_(False)
    if not had_config and "peft_config" in model.__dict__:  # peft's note on the model; the next lora() would warn
        del model.__dict__["peft_config"]
    leftover = [n for n, _ in model.named_modules() if "lora_" in n]
    if leftover or not params:
        raise RuntimeError(f"taking the LoRA modules out of the model failed (left: {leftover[:3]}, "
                           f"params: {len(params)})")
    return Provider("lora", swaps=swaps, params=params, optimizer=_adamw(params, lr))


def make_merged(model: nn.Module, heads, v: Dict[int, torch.Tensor]) -> Provider:
    """lofit_fast.adapter.merge of the step-2 patch: new plain nn.Linear o_proj modules (with a bias)."""
    from lofit_fast.adapter import merge

    sites = find_attention_sites(model)
    originals = [s.attn.o_proj for s in sites]
    lofit_fast.patch(model, heads, scale=False, offset=True, v=v)
    merge(model)
    swaps, extra = [], 0
    for site, old in zip(sites, originals):
        new = site.attn.o_proj
        if new is not old:
            swaps.append((site.attn, "o_proj", new))
            extra += tensor_bytes(new.parameters()) - tensor_bytes(old.parameters())  # the weight replaces the old one
            site.attn.o_proj = old
    return Provider("merged", swaps=swaps, extra_bytes=extra)


def step2_values(model: nn.Module, heads, seed: int = 0) -> Dict[int, torch.Tensor]:
    """Fixed non-zero offsets v {layer: [K_l, head_dim]} for the decode / prefill providers."""
    sites = find_attention_sites(model)
    g = torch.Generator().manual_seed(seed)
    counts: Dict[int, int] = {}
    for layer, _ in heads:
        counts[layer] = counts.get(layer, 0) + 1
    device = sites[0].attn.o_proj.weight.device
    return {layer: (INFER_V_STD * torch.randn(k, sites[layer].head_dim, generator=g)).to(device)
            for layer, k in sorted(counts.items())}


def training_providers(model: nn.Module, workload: str, names: Sequence[str]) -> Dict[str, Provider]:
    if workload == "step1":  # A on every head, L1 on A
        heads, scale, offset, lr, l1, lowest = "all", True, False, LR_STEP1, True, 0
    else:  # v on K heads
        heads, scale, offset, lr, l1 = step2_heads(model), False, True, LR_STEP2, False
        lowest = min(layer for layer, _ in heads)
    out: Dict[str, Provider] = {}
    for name in names:
        if name == "floor":
            out[name] = make_floor(model, lowest, lr)
        elif name in ("fused", "torch") or name.startswith(FORCED):
            backend = {"fused": "auto", "torch": "torch"}.get(name, name[len(FORCED):])
            out[name] = make_lofit(model, name, heads, scale=scale, offset=offset, lr=lr, init_std=INIT_STD, l1=l1,
                                   backend=backend)
        elif name in ("hooks", "hooks_loop"):
            out[name] = make_hooks(model, name, heads, scale=scale, offset=offset, loop=name == "hooks_loop", lr=lr,
                                   init_std=INIT_STD, l1=l1)
        elif name == "lora":
            out[name] = make_lora(model, lr)
        else:
            raise ValueError(f"provider {name!r} does not train; the training providers are {TRAIN_PROVIDERS}")
    return out


def inference_providers(model: nn.Module, names: Sequence[str]) -> Dict[str, Provider]:
    heads = step2_heads(model)
    v = step2_values(model, heads)
    out: Dict[str, Provider] = {}
    for name in names:
        if name == "base":
            out[name] = Provider("base")
        elif name == "fused" or name.startswith(FORCED):
            backend = "auto" if name == "fused" else name[len(FORCED):]
            out[name] = make_lofit(model, name, heads, scale=False, offset=True, backend=backend, lr=None, v=v)
        elif name == "hooks":
            out[name] = make_hooks(model, name, heads, scale=False, offset=True, loop=False, lr=None, v=v)
        elif name == "merged":
            out[name] = make_merged(model, heads, v)
        else:
            raise ValueError(f"provider {name!r} does not run inference; the inference providers are {INFER_PROVIDERS}")
    return out


# ------------------------------------------------------------------------------------------------ workloads
def training_batch(vocab: int, batch: int, seq: int, completion_frac: float, device: torch.device,
                   seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random token ids; labels (the completion) on the last `completion_frac` of each row, -100 before."""
    completion = max(1, round(completion_frac * seq))
    if completion >= seq:
        raise ValueError(f"seq {seq} leaves no prompt before a completion of {completion} tokens")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq - completion] = -100
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def training_step(model: nn.Module, batch: Dict[str, torch.Tensor], provider: Provider) -> Callable[[], None]:
    def step():
        provider.optimizer.zero_grad(set_to_none=True)
        loss = completion_loss(model, batch)
        if provider.l1_params:
            loss = loss + L1 * sum(p.abs().sum() for p in provider.l1_params)
        loss.backward()
        provider.optimizer.step()
    return step


def prompt_ids(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g).to(device)


def decode_call(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    mask = torch.ones_like(ids)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    @torch.no_grad()
    def run():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad)
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens instead of {new_tokens}")
    return run


def prefill_call(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    mask = torch.ones_like(ids)

    @torch.no_grad()
    def run():
        model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    return run


# -------------------------------------------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def _free(device: torch.device) -> None:
    """Give cached GPU memory back between workloads and after an out-of-memory error (nothing to do on the CPU)."""
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def _reset_grads(provider: Provider) -> None:
    if provider.optimizer is not None:
        provider.optimizer.zero_grad(set_to_none=True)


def round_robin(calls: Dict[str, Callable[[], None]], providers: Dict[str, Provider], steps: int, warmup: int,
                device: torch.device) -> Tuple[Dict[str, List[float]], Dict[str, str]]:
    """Seconds of each of `steps` timed calls per provider (after `warmup` uncounted rounds), in rounds that visit
    every provider once, each round starting at the next provider. Returns (times, failures: name -> reason)."""
    names = list(calls)
    times: Dict[str, List[float]] = {n: [] for n in names}
    failed: Dict[str, str] = {}
    for r in range(warmup + steps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if name in failed:
                continue
            with providers[name].attached():
                try:
                    seconds = timed(calls[name], device)
                except torch.OutOfMemoryError:
                    failed[name] = OOM
                    _reset_grads(providers[name])
                    _free(device)
                    continue
            if r >= warmup:
                times[name].append(seconds)
    return times, failed


def transient_peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak of the memory allocated while fn runs, above what was allocated before it (see the module doc)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Context:
    model_name: str
    dtype: str
    device: torch.device
    device_name: str
    torch_version: str
    commit: str
    model_bytes: int


def make_row(ctx: Context, provider: str, workload: str, batch: int, seq: int, tokens: int,
             seconds: Sequence[float], peak_bytes: Optional[int]) -> Dict[str, str]:
    row = dict(model=ctx.model_name, provider=provider, workload=workload, batch=str(batch), seq=str(seq),
               dtype=ctx.dtype, device=ctx.device_name, torch=ctx.torch_version, commit=ctx.commit)
    if not seconds:
        row.update(tokens_per_s="", ms_p50="", ms_p20="", ms_p80="", peak_mb=OOM)
        return {k: row[k] for k in HEADER}
    p50 = percentile(seconds, 50)
    row.update(tokens_per_s=f"{tokens / p50:.1f}", ms_p50=f"{1e3 * p50:.3f}",
               ms_p20=f"{1e3 * percentile(seconds, 20):.3f}", ms_p80=f"{1e3 * percentile(seconds, 80):.3f}",
               peak_mb="" if peak_bytes is None else f"{peak_bytes / 2**20:.1f}")
    return {k: row[k] for k in HEADER}


def measure(ctx: Context, workload: str, batch: int, seq: int, tokens: int, providers: Dict[str, Provider],
            calls: Dict[str, Callable[[], None]], steps: int, warmup: int, memory: bool = True,
            log=print) -> List[Dict[str, str]]:
    """Timed round-robin, then (untimed) one call per provider for its peak memory; one row per provider."""
    times, failed = round_robin(calls, providers, steps, warmup, ctx.device)
    rows = []
    for name, provider in providers.items():
        peak = None
        if name not in failed and memory:
            with provider.attached():
                try:
                    transient = transient_peak_bytes(calls[name], ctx.device)
                    peak = ctx.model_bytes + provider.persistent_bytes() + transient
                except torch.OutOfMemoryError:
                    failed[name] = OOM
                    _reset_grads(provider)
                    _free(ctx.device)
        row = make_row(ctx, name, workload, batch, seq, tokens, [] if name in failed else times[name], peak)
        rows.append(row)
        log(f"  {ctx.model_name:13s} {workload:8s} b={batch:<3d} s={seq:<5d} {name:11s} "
            + (f"{row['ms_p50']:>10s} ms  [{row['ms_p20']}, {row['ms_p80']}]  {row['tokens_per_s']:>10s} tok/s  "
               f"peak {row['peak_mb']} MB" if name not in failed else "OUT OF MEMORY"))
    return rows


def check_gradients(providers: Dict[str, Provider], workload: str) -> None:
    """After a step every trainable parameter must have a finite gradient (the step really trained)."""
    for name, provider in providers.items():
        missing = [i for i, p in enumerate(provider.params) if p.grad is None or not torch.isfinite(p.grad).all()]
        if missing:
            raise RuntimeError(f"{workload}/{name}: {len(missing)} of {len(provider.params)} trainable parameters got "
                               f"no finite gradient")


@torch.no_grad()
def check_inference(model: nn.Module, providers: Dict[str, Provider], vocab: int, device: torch.device) -> None:
    """fused, hooks and merged carry the same intervention: their logits must agree with each other (to 1e-4 in
    float32; in 16-bit dtypes at least 2x closer to each other than to the base model's) and differ from base."""
    ids = prompt_ids(vocab, 1, 16, device, seed=7)
    logits = {}
    for name, provider in providers.items():
        with provider.attached():
            logits[name] = model(input_ids=ids).logits.float()
    patched = [n for n in logits if n != "base"]
    if not patched:
        return
    first = logits[patched[0]]

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    shift = rel(logits["base"], first) if "base" in logits else None
    if shift == 0.0:
        raise RuntimeError(f"{patched[0]} gives the base model's logits: the intervention is not active")
    fp32 = next(model.parameters()).dtype == torch.float32
    for name in patched[1:]:
        err = rel(logits[name], first)
        bound = 1e-4 if fp32 else (0.5 * shift if shift is not None else 5e-2)
        if not err <= bound:
            raise RuntimeError(f"inference providers disagree: {name} vs {patched[0]} relative error {err:.2e} "
                               f"(bound {bound:.2e}; the intervention moves the logits by {shift})")


def bench_training(model, ctx: Context, workload: str, names: Sequence[str], args, log=print) -> List[Dict[str, str]]:
    providers = training_providers(model, workload, names)
    batch = training_batch(model.config.vocab_size, args.batch, args.seq, args.completion_frac, ctx.device)
    calls = {n: training_step(model, batch, p) for n, p in providers.items()}
    model.train()
    try:
        rows = measure(ctx, workload, args.batch, args.seq, args.batch * args.seq, providers, calls, args.steps,
                       args.warmup, log=log)
        check_gradients({r["provider"]: providers[r["provider"]] for r in rows if r["ms_p50"]}, workload)
        if args.profile:
            profile_training(ctx, workload, providers, calls, Path(args.profile), log=log)
    finally:
        model.eval()
        for p in providers.values():
            _reset_grads(p)
    return rows


def bench_decode(model, ctx: Context, names: Sequence[str], args, log=print) -> List[Dict[str, str]]:
    providers = inference_providers(model, names)
    check_inference(model, providers, model.config.vocab_size, ctx.device)
    rows = []
    for b in args.decode_batch:
        ids = prompt_ids(model.config.vocab_size, b, args.decode_prompt, ctx.device)
        calls = {n: decode_call(model, ids, args.decode_new) for n in providers}
        rows += measure(ctx, "decode", b, args.decode_new, b * args.decode_new, providers, calls, args.infer_steps,
                        args.warmup, log=log)
    return rows


def bench_prefill(model, ctx: Context, names: Sequence[str], args, log=print) -> List[Dict[str, str]]:
    providers = inference_providers(model, names)
    check_inference(model, providers, model.config.vocab_size, ctx.device)
    rows = []
    for s in args.prefill_seq:
        ids = prompt_ids(model.config.vocab_size, 1, s, ctx.device)
        calls = {n: prefill_call(model, ids) for n in providers}
        rows += measure(ctx, "prefill", 1, s, s, providers, calls, args.infer_steps, args.warmup, log=log)
    return rows


PROFILE_CATEGORIES = (  # (category, substrings of op names), first match wins; self times, so nothing counts twice
    ("lofit_fast op", ("lofit_fast", "head_affine", "headaffine")),
    ("GEMM", ("aten::mm", "aten::addmm", "aten::bmm", "aten::_addmm", "gemm")),
    ("attention", ("scaled_dot_product", "flash", "efficient_attention", "fmha")),
    ("optimizer", ("_foreach", "adam")),
)


def profile_categories(events, device_type: str) -> Dict[str, float]:
    """Self time in ms per category (PROFILE_CATEGORIES, then "other") of a profiler's key_averages()."""
    attr = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    out = {name: 0.0 for name, _ in PROFILE_CATEGORIES}
    out["other"] = 0.0
    for e in events:
        us = float(getattr(e, attr, 0.0) or 0.0)
        key = e.key.lower()
        category = next((name for name, parts in PROFILE_CATEGORIES if any(p in key for p in parts)), "other")
        out[category] += us / 1e3
    return out


def profile_training(ctx: Context, workload: str, providers: Dict[str, Provider], calls: Dict[str, Callable[[], None]],
                     out_dir: Path, steps: int = 1, log=print) -> None:
    """torch.profiler of `steps` steps per provider: the top ops by self time (<model>_<workload>_<provider>.txt)
    and the self time per category for every provider (<model>_<workload>_summary.md), in out_dir."""
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    sort_by = "self_device_time_total" if ctx.device.type == "cuda" else "self_cpu_time_total"
    summary = {}
    for name, provider in providers.items():
        with provider.attached():
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    calls[name]()
                synchronize(ctx.device)
        averages = prof.key_averages()
        path = out_dir / f"{ctx.model_name}_{workload}_{name}.txt"
        path.write_text(averages.table(sort_by=sort_by, row_limit=30) + "\n")
        summary[name] = profile_categories(averages, ctx.device.type)
        log(f"  profile of {name} -> {path}")
    categories = list(next(iter(summary.values())))
    clock = "GPU" if ctx.device.type == "cuda" else "CPU"
    lines = [f"Self {clock} time of {steps} {workload} step(s) of {ctx.model_name} per category, ms (and % of the "
             f"provider's total). `other` holds elementwise ops, norms, the loss and the hooks' own ops.", "",
             "| provider | total | " + " | ".join(categories) + " |", "|---|---:|" + "---:|" * len(categories)]
    for name, cats in summary.items():
        total = sum(cats.values())
        cells = [f"{cats[c]:.1f} ({100 * cats[c] / total:.1f} %)" if total else "0" for c in categories]
        lines.append(f"| {name} | {total:.1f} | " + " | ".join(cells) + " |")
    path = out_dir / f"{ctx.model_name}_{workload}_summary.md"
    path.write_text("\n".join(lines) + "\n")
    log(f"  profile summary -> {path}")


# ------------------------------------------------------------------------------------------------------ output
def git_commit() -> str:
    if os.environ.get("COMMIT"):  # a copy of the tree without .git (the device machine) passes it
        return os.environ["COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def append_rows(path: Path, rows: List[Dict[str, str]]) -> None:
    """Append to a CSV with HEADER (written when the file is new; an existing file must have the same header)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != HEADER:
            raise ValueError(f"{path} has the header {header}, expected {HEADER}: write to another file with --results")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HEADER)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def auto_backend(model: nn.Module, tokens: int) -> str:
    """The backend `auto` picks for this model's o_proj at `tokens` rows (step-2 K)."""
    from lofit_fast.ops import get_backend

    site = find_attention_sites(model)[0]
    w = site.attn.o_proj.weight
    x = torch.zeros(tokens, w.shape[1], dtype=w.dtype, device=w.device)
    try:
        return get_backend("auto", x, w, max(1, len(step2_heads(model)) // len(find_attention_sites(model)))).name
    except Exception as exc:  # reported, not fatal: the fused rows would show the failure anyway
        return f"none ({exc})"


def parse_list(text: str, cast=str) -> List:
    return [cast(t) for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    first, _, rest = __doc__.partition("\n")
    p = argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help=f"comma list of {sorted([*REAL_MODELS, *MODEL_CONFIGS])} "
                   "(default: smollm2 on the CPU, llama2-7b on a GPU)")
    p.add_argument("--providers", default=",".join(dict.fromkeys([*TRAIN_PROVIDERS, *INFER_PROVIDERS])),
                   help="comma list; each workload runs those that apply, plus its reference (floor or base)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of " + ", ".join(WORKLOADS))
    p.add_argument("--steps", type=int, default=10, help="timed repetitions per provider")
    p.add_argument("--infer-steps", type=int, default=None, help="timed repetitions for decode and prefill "
                   "(default: --steps)")
    p.add_argument("--warmup", type=int, default=2, help="uncounted rounds before timing")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 4 on the CPU, 8 on a GPU)")
    p.add_argument("--seq", type=int, default=None, help="training tokens per row (default 128 CPU, 512 GPU)")
    p.add_argument("--completion-frac", type=float, default=0.25, help="share of each row under the loss")
    p.add_argument("--decode-batch", default=None, help="comma list (default 1,8 on the CPU, 1,8,64 on a GPU)")
    p.add_argument("--decode-prompt", type=int, default=32, help="prompt tokens before decoding")
    p.add_argument("--decode-new", type=int, default=32, help="new tokens generated per call")
    p.add_argument("--prefill-seq", default=None, help="comma list (default 512 on the CPU, 512,4096 on a GPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp32 on the CPU, bf16 on a GPU")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"),
                   help="folder of e2e.csv (appended), e2e_runs.jsonl, and the regenerated e2e_<device>.md and plots")
    p.add_argument("--no-report", action="store_true", help="only append rows; do not redraw the markdown and plots")
    p.add_argument("--profile", default=None, help="also write torch.profiler tables of the training steps here")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    args.model = parse_list(args.model or ("llama2-7b" if gpu else "smollm2"))
    args.batch = args.batch or (8 if gpu else 4)
    args.seq = args.seq or (512 if gpu else 128)
    args.decode_batch = parse_list(args.decode_batch or ("1,8,64" if gpu else "1,8"), int)
    args.prefill_seq = parse_list(args.prefill_seq or ("512,4096" if gpu else "512"), int)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.workloads = parse_list(args.workloads)
    args.providers = parse_list(args.providers)
    for w in args.workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}: choose from {WORKLOADS}")
    for name in args.providers:
        if name not in TRAIN_PROVIDERS + INFER_PROVIDERS and name not in [FORCED + b for b in FORCED_BACKENDS]:
            raise SystemExit(f"unknown provider {name!r}: choose from {sorted(set(TRAIN_PROVIDERS + INFER_PROVIDERS))} "
                             f"or {FORCED}<backend> with a backend of {FORCED_BACKENDS}")
    for m in args.model:
        if m not in REAL_MODELS and m not in MODEL_CONFIGS:
            raise SystemExit(f"unknown model {m!r}: choose from {sorted([*REAL_MODELS, *MODEL_CONFIGS])}")
    args.infer_steps = args.infer_steps or args.steps
    if args.steps < 1 or args.infer_steps < 1 or args.warmup < 0:
        raise SystemExit("--steps and --infer-steps must be >= 1, --warmup >= 0")
    return args


def providers_for(workload: str, wanted: Sequence[str]) -> List[str]:
    """The wanted providers that apply to the workload, reference first (always included)."""
    pool = TRAIN_PROVIDERS if workload in ("step1", "step2") else INFER_PROVIDERS
    ref = REFERENCE[workload]
    return [ref] + [n for n in pool if n in wanted and n != ref] + [n for n in wanted if n.startswith(FORCED)]


def run(args: argparse.Namespace, log=print) -> List[Dict[str, str]]:
    """Every (model, workload) of the resolved arguments; returns the rows (also appended to the CSV)."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    dtype = DTYPES[args.dtype]
    results = Path(args.results)
    meta = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), command=getattr(args, "command", "e2e_bench.run"),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, commit=git_commit(), threads=torch.get_num_threads(),
                loadavg_before=loadavg(), models=args.model, workloads=args.workloads, auto_backend={})
    all_rows: List[Dict[str, str]] = []
    try:
        for model_name in args.model:
            log(f"[{model_name}] building ({args.dtype} on {device})")
            model = build_model(model_name, device, dtype)
            ctx = Context(model_name, args.dtype, device, meta["device"], meta["torch"], meta["commit"],
                          model_bytes(model))
            meta["auto_backend"][model_name] = {f"N={n}": auto_backend(model, n)
                                                for n in sorted({args.batch * args.seq, 1, *args.decode_batch})}
            log(f"[{model_name}] {total_heads(model)} heads, {ctx.model_bytes / 2**20:.0f} MB; auto backend: "
                f"{meta['auto_backend'][model_name]}")
            for workload in args.workloads:
                names = providers_for(workload, args.providers)
                if workload in ("step1", "step2"):
                    rows = bench_training(model, ctx, workload, names, args, log=log)
                elif workload == "decode":
                    rows = bench_decode(model, ctx, names, args, log=log)
                else:
                    rows = bench_prefill(model, ctx, names, args, log=log)
                append_rows(results / "e2e.csv", rows)  # per workload: a run cut short keeps what it finished
                all_rows += rows
                _free(device)
            del model
            _free(device)
    except BaseException as exc:
        meta["interrupted"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        meta["loadavg_after"] = loadavg()
        meta["rows"] = len(all_rows)
        results.mkdir(parents=True, exist_ok=True)
        with open(results / "e2e_runs.jsonl", "a") as f:
            f.write(json.dumps(meta) + "\n")
    if not args.no_report:
        from plot_e2e import report  # bench/plot_e2e.py

        for path in report(results, device_kind=args.device):
            log(f"wrote {path}")
    return all_rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve_args(build_parser().parse_args(argv))
    args.command = " ".join(["python bench/e2e_bench.py", *argv])
    rows = run(args)
    from plot_e2e import summary_table

    print(summary_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
