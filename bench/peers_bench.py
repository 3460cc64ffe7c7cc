"""Peers benchmark: lofit_fast against the field's own tools, on the same work, in the same run.

  pyvene   LoFiT as pyvene interventions (component "head_attention_value_output" = the o_proj input split
           into heads, unit "h": the selected heads at every position; a trainable intervention computing
           (1 + A) ⊙ x_h + v per selected head), the way honest_llama / pyreft build on pyvene
  repeng   ControlVector.train on the same contrastive pairs and layers as lofit_fast.repe.control_vector, and
           ControlModel steering (the residual-stream addition lofit_fast.steer does)

Workloads (rows of results/peers_cpu.csv, the columns of bench/e2e_bench.py, one row per provider):
  step1         LoFiT step 1: A on every head, completion CE + λ·Σ|A|, backward, AdamW      providers: floor, fused, pyvene
  step2         LoFiT step 2: v on K ≈ 3 % of the heads (8 of 270 on SmolLM2)               providers: floor, fused, pyvene
  decode        generate with the step-2 offsets, batch 1 and 8                             providers: base, fused, merged, pyvene
  steer_forward one no-grad forward of steered prompts (batch 8)                            providers: base, steer, steer_merged, repeng
  steer_decode  generate with the steering on, batch 1 and 8                                providers: base, steer, steer_merged, repeng
floor / base are the references measured in the same run (see e2e_bench.py: floor = the frozen model with one
trainable scalar on the lowest patched o_proj input, so autograd runs as deep as LoFiT). fused =
lofit_fast.patch (backend auto), merged = lofit_fast.merge, steer = lofit_fast.steer (a forward hook),
steer_merged = lofit_fast.merge_steering (down_proj biases). Every provider uses the same values (A / v copied
into pyvene's interventions; the repeng rows steer with lofit_fast's vectors), and before anything is timed the
script checks: pyvene's logits and A / v gradients equal fused's (relative error ≤ 1e-4 in float32), pyvene's
generated tokens and per-step scores equal fused's, and repeng's steered logits equal lofit_fast.steer's and the
merged steering's. The vectors themselves are compared separately: per-layer cosine of the two trainings, and
whether each steers the same way (the shift of the last-token logits on held-out prompts, cosine between the
two methods' shifts). Timing, memory and round-robin order are e2e_bench.py's (bench/README.md).

The peers are not pinned by the project (they are not needed by its tests). If they do not import, the script
makes its own virtual environment (--venv; `python -m venv --system-site-packages`, so torch, transformers and
lofit_fast come from the project's install), installs pyvene==0.1.8 and repeng==0.4.0 there with --no-deps
(their declared dependencies would replace the pinned torch / numpy: repeng asks for numpy<2, pyvene for
datasets, plotnine, ipywidgets ...), plus scikit-learn (repeng imports sklearn's PCA), and re-runs itself there.
repeng 0.4.0 annotates with `np.float_`, removed in NumPy 2.0, at import time; the script defines
`np.float_ = np.float64` before importing it (nothing in site-packages is edited).

    python bench/peers_bench.py --threads 1            # the committed CPU run (SmolLM2-135M, float32)
    python bench/peers_bench.py --model tiny --steps 2 --warmup 1 --results /tmp/peers   # a smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (str(ROOT), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

PEERS = {"pyvene": "pyvene==0.1.8", "repeng": "repeng==0.4.0"}
PEER_DEPS = ["scikit-learn"]  # repeng: from sklearn.decomposition import PCA
VENV_FLAG = "LOFIT_PEERS_VENV"
DEFAULT_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lofit_fast" / "peers-venv"


# ------------------------------------------------------------------------------------------ peer environment
def _numpy_shim() -> None:
    import numpy as np

    if not hasattr(np, "float_"):  # repeng 0.4.0 annotates with np.float_ (NumPy < 2) at import time
        np.float_ = np.float64


def import_errors() -> Dict[str, str]:
    """{peer: why it does not import} (empty when both do)."""
    errors = {}
    for name in PEERS:
        code = ("import numpy as np\nif not hasattr(np, 'float_'): np.float_ = np.float64\n"
                f"import {name}")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if r.returncode != 0:
            errors[name] = (r.stderr.strip().splitlines() or ["?"])[-1]
    return errors


def ensure_peers(venv: Path) -> None:
    """Re-run this script in a venv with the peers when they do not import here (see the module doc)."""
    errors = import_errors()
    if not errors:
        return
    if os.environ.get(VENV_FLAG):
        raise SystemExit(f"the peers do not import even in {venv}: {errors}")
    print(f"peers not importable here ({errors}); using the venv {venv}", flush=True)
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run(pip + ["--no-deps", *PEERS.values()], check=True)
    subprocess.run(pip + PEER_DEPS, check=True)
    env = dict(os.environ, **{VENV_FLAG: str(venv)})
    os.execve(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]], env)


# -------------------------------------------------------------------------------------------------- helpers
def _late_imports():
    global torch, nn, lofit_fast, e2e
    import torch
    import torch.nn as nn

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import lofit_fast
    import e2e_bench as e2e


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def heads_by_layer(heads) -> Dict[int, List[int]]:
    if heads == "all":
        return {s.layer: list(range(s.num_heads)) for s in lofit_fast.find_attention_sites(MODEL)}
    out: Dict[int, List[int]] = {}
    for layer, h in heads:
        out.setdefault(int(layer), []).append(int(h))
    return {layer: sorted(hs) for layer, hs in sorted(out.items())}


MODEL = None  # the benchmarked model (set in run)


# ---------------------------------------------------------------------------------------------------- pyvene
def pyvene_lofit(model, heads: Dict[int, List[int]], *, A: Optional[Dict] = None, v: Optional[Dict] = None):
    """An IntervenableModel with one LoFiT intervention per layer on `heads` ({layer: [heads]}); A / v: initial
    values {layer: [K, d]} (None: no scale / no offset). Returns (IntervenableModel, [interventions])."""
    import pyvene as pv

    class LoFiTIntervention(pv.SourcelessIntervention, pv.TrainableIntervention):
        """(1 + A) ⊙ x + v on the gathered heads: base is [batch, K, seq, head_dim] (unit "h")."""

        def __init__(self, A0=None, v0=None, **kwargs):
            super().__init__(**kwargs, keep_last_dim=True)
            self.A = nn.Parameter(A0.detach().clone().float()) if A0 is not None else None
            self.v = nn.Parameter(v0.detach().clone().float()) if v0 is not None else None

        def forward(self, base, source=None, subspaces=None):
            out = base
            if self.A is not None:
                out = out * (1 + self.A[None, :, None, :]).to(base.dtype)
            if self.v is not None:
                out = out + self.v[None, :, None, :].to(base.dtype)
            return out

    reps = []
    for layer in heads:
        iv = LoFiTIntervention(A0=None if A is None else A[layer], v0=None if v is None else v[layer])
        reps.append({"layer": layer, "component": "head_attention_value_output", "unit": "h", "intervention": iv})
    pvm = pv.IntervenableModel(pv.IntervenableConfig(representations=reps), model)
    model.requires_grad_(False)
    return pvm, list(pvm.interventions.values())


class PyveneLM:
    """A callable with the model interface lofit_fast.losses uses, running the model through pyvene."""

    def __init__(self, pvm, heads: Dict[int, List[int]], model):
        self.pvm, self.heads, self.model = pvm, list(heads.values()), model

    def parameters(self):
        return self.model.parameters()

    def locations(self, batch: int):
        return {"base": [[hs] * batch for hs in self.heads]}

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, use_cache=None):
        base = {"input_ids": input_ids, "attention_mask": attention_mask}
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            base["logits_to_keep"] = logits_to_keep
        if use_cache is not None:
            base["use_cache"] = use_cache
        _, out = self.pvm(base, unit_locations=self.locations(input_ids.shape[0]))
        return out

    __call__ = forward

    def generate(self, ids, mask, new_tokens, pad, **kw):
        _, out = self.pvm.generate({"input_ids": ids, "attention_mask": mask}, unit_locations=self.locations(ids.shape[0]),
                                   intervene_on_prompt=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=pad, **kw)
        return out


def _fused_params(provider, name: str) -> Dict[int, "torch.Tensor"]:
    """{layer: A or v} of a make_lofit provider (its HeadInterventionLinear swaps)."""
    sites = {id(s.attn): s.layer for s in lofit_fast.find_attention_sites(MODEL)}
    return {sites[id(parent)]: getattr(mod, name) for parent, _, mod in provider.swaps}


def check_training(model, batch, fused, pyv, pylm, name: str, scale: bool) -> Dict[str, float]:
    """pyvene's loss, logits and A / v gradients against fused's on one step's batch (before any update)."""
    from lofit_fast.losses import completion_loss

    pname = "A" if scale else "v"
    out = {}
    results = {}
    for label, provider, lm in (("fused", fused, model), ("pyvene", pyv, pylm)):
        provider.optimizer.zero_grad(set_to_none=True)
        with provider.attached():
            logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
            loss = completion_loss(lm, batch)
            if provider.l1_params:
                loss = loss + e2e.L1 * sum(p.abs().sum() for p in provider.l1_params)
            loss.backward()
        results[label] = (loss.detach(), logits)
    f_params = _fused_params(fused, pname)
    grads_f = torch.cat([f_params[l].grad.reshape(-1) for l in sorted(f_params)])
    grads_p = torch.cat([getattr(iv, pname).grad.reshape(-1) for iv in pyv.interventions])
    out["logits_rel_err"] = rel(results["pyvene"][1], results["fused"][1])
    out["loss_abs_err"] = abs(float(results["pyvene"][0] - results["fused"][0]))
    out[f"d{pname}_rel_err"] = rel(grads_p, grads_f)
    for provider in (fused, pyv):
        provider.optimizer.zero_grad(set_to_none=True)
    bad = {k: x for k, x in out.items() if k != "loss_abs_err" and not x <= 1e-4}
    if bad or not out["loss_abs_err"] <= 1e-4:
        raise RuntimeError(f"{name}: pyvene and lofit_fast disagree before timing: {out}")
    return out


COPY_ATTN = "sdpa_copy"


def _register_copy_attention() -> None:
    """SDPA whose output is a copy (transformers' attention interface; registered once).

    pyvene writes the intervened heads back into the o_proj input in place (scatter_neurons). With SDPA that
    input is a view of the attention output, which SDPA saves for its backward, so the backward fails ("one of
    the variables needed for gradient computation has been modified by an inplace operation"). A pre-hook that
    copies the input cannot help: pyvene removes every forward hook of the whole model before each call
    (IntervenableModel._cleanup_states -> remove_forward_hooks). So the training rows run pyvene with this
    attention function: one extra [batch, seq, H·d] copy per layer per forward, the least that makes it train.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def sdpa_copy(module, *args, **kwargs):
        out, weights = sdpa_attention_forward(module, *args, **kwargs)
        return out.clone(), weights

    AttentionInterface.register(COPY_ATTN, sdpa_copy)
    AttentionMaskInterface.register(COPY_ATTN, sdpa_mask)


def copy_attention_provider(name: str, model, **kwargs):
    """An e2e_bench Provider that also switches `model` from SDPA to COPY_ATTN while attached."""
    _register_copy_attention()

    class CopyAttentionProvider(e2e.Provider):
        def attach(self):
            super().attach()
            self.saved_attn = model.config._attn_implementation
            if self.saved_attn == "sdpa":
                model.config._attn_implementation = COPY_ATTN

        def detach(self):
            if getattr(self, "saved_attn", None) is not None:
                model.config._attn_implementation = self.saved_attn
                self.saved_attn = None
            super().detach()

    return CopyAttentionProvider(name, **kwargs)


def make_pyvene_provider(model, heads, *, scale: bool, offset: bool, A=None, v=None, lr: Optional[float], l1: bool):
    pvm, ivs = pyvene_lofit(model, heads, A=A if scale else None, v=v if offset else None)
    params = [p for iv in ivs for p in (iv.A, iv.v) if p is not None]
    if lr is None:
        for p in params:
            p.requires_grad_(False)
        prov = e2e.Provider("pyvene", extra_bytes=e2e.tensor_bytes(params))
    else:
        prov = copy_attention_provider("pyvene", model, params=params, optimizer=e2e._adamw(params, lr),
                                       l1_params=params if l1 else [])
    prov.interventions = ivs
    return prov, PyveneLM(pvm, heads, model)


def bench_training(model, ctx, workload: str, args, log) -> Tuple[List[Dict[str, str]], Dict]:
    providers = e2e.training_providers(model, workload, ["floor", "fused"])
    fused = providers["fused"]
    scale = workload == "step1"
    heads = heads_by_layer("all" if scale else e2e.step2_heads(model))
    init = {l: t.detach() for l, t in _fused_params(fused, "A" if scale else "v").items()}
    pyv, pylm = make_pyvene_provider(model, heads, scale=scale, offset=not scale, A=init, v=init,
                                     lr=e2e.LR_STEP1 if scale else e2e.LR_STEP2, l1=scale)
    providers["pyvene"] = pyv
    batch = e2e.training_batch(model.config.vocab_size, args.batch, args.seq, args.completion_frac, ctx.device)
    model.train()
    try:
        check = check_training(model, batch, fused, pyv, pylm, workload, scale)
        log(f"  {workload}: pyvene == fused before timing: {check}")
        calls = {"floor": e2e.training_step(model, batch, providers["floor"]),
                 "fused": e2e.training_step(model, batch, fused),
                 "pyvene": e2e.training_step(pylm, batch, pyv)}
        rows = e2e.measure(ctx, workload, args.batch, args.seq, args.batch * args.seq, providers, calls, args.steps,
                           args.warmup, log=log)
        e2e.check_gradients({r["provider"]: providers[r["provider"]] for r in rows if r["ms_p50"]}, workload)
    finally:
        model.eval()
        for p in providers.values():
            e2e._reset_grads(p)
    return rows, check


def batch_positions(batch: int, start: int, length: int):
    """position_ids [batch, length] from `start` (no padding). repeng's ControlModule reshapes position_ids to
    [batch, seq, 1], but transformers 5 hands the decoder layers [1, seq] position ids, so any batch > 1 fails
    inside repeng ("shape '[2, 16, 1]' is invalid for input of size 16") unless the caller passes position_ids of
    shape [batch, seq]; the steering rows do that for every provider alike."""
    import torch as _t

    return (start + _t.arange(length)).unsqueeze(0).expand(batch, length)


def greedy_decode(forward, ids, mask, new_tokens: int, with_positions: bool = False):
    """Greedy decoding with a KV cache, one forward per token: (tokens [B, new], logits [B, new, V]).

    `forward(input_ids, attention_mask, past_key_values)` returns the model output. Every decode provider runs
    this same loop: pyvene's own generate() intervenes either on the prompt only (intervene_on_prompt=True) or on
    the generated tokens only (False), never on both, while LoFiT acts at every position; so pyvene is driven
    through its forward, one call per token, and the other providers through the same loop for a fair ratio.
    """
    import torch as _t
    from transformers import DynamicCache

    cache = DynamicCache()
    tokens, logits = [], []
    inp = ids
    with _t.no_grad():
        for _ in range(new_tokens):
            out = forward(inp, mask, cache) if not with_positions else forward(
                inp, mask, cache, batch_positions(inp.shape[0], mask.shape[1] - inp.shape[1], inp.shape[1]))
            last = out.logits[:, -1].float()
            nxt = last.argmax(-1, keepdim=True)
            tokens.append(nxt)
            logits.append(last)
            inp = nxt
            mask = _t.cat([mask, _t.ones_like(nxt)], dim=1)
    return _t.cat(tokens, 1), _t.stack(logits, 1)


def bench_decode(model, ctx, args, log) -> Tuple[List[Dict[str, str]], Dict]:
    providers = e2e.inference_providers(model, ["base", "fused", "merged"])
    e2e.check_inference(model, providers, model.config.vocab_size, ctx.device)
    heads_list = e2e.step2_heads(model)
    heads = heads_by_layer(heads_list)
    v = e2e.step2_values(model, heads_list)
    pyv, pylm = make_pyvene_provider(model, heads, scale=False, offset=True, v=v, lr=None, l1=False)
    providers["pyvene"] = pyv

    def hf_forward(inp, mask, cache):
        return model(input_ids=inp, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)

    def pv_forward(inp, mask, cache):
        _, out = pylm.pvm({"input_ids": inp, "attention_mask": mask, "past_key_values": cache, "use_cache": True,
                           "logits_to_keep": 1}, unit_locations=pylm.locations(inp.shape[0]))
        return out

    forwards = {"base": hf_forward, "fused": hf_forward, "merged": hf_forward, "pyvene": pv_forward}
    # same tokens and per-step logits as fused (and not as the base model) before timing
    import torch as _t

    ids = e2e.prompt_ids(model.config.vocab_size, 2, args.decode_prompt, ctx.device, seed=11)
    mask = _t.ones_like(ids)
    outs = {}
    for name in ("base", "fused", "pyvene"):
        with providers[name].attached():
            outs[name] = greedy_decode(forwards[name], ids, mask, args.decode_new)
    check = {"tokens_equal_fused": bool(_t.equal(outs["pyvene"][0], outs["fused"][0])),
             "logits_rel_err": rel(outs["pyvene"][1], outs["fused"][1]),
             "base_logits_rel_diff": rel(outs["base"][1], outs["fused"][1])}
    if not (check["tokens_equal_fused"] and check["logits_rel_err"] <= 1e-4 and check["base_logits_rel_diff"] > 1e-3):
        raise RuntimeError(f"decode: pyvene and lofit_fast disagree before timing: {check}")
    log(f"  decode: pyvene == fused before timing: {check}")
    rows = []
    for b in args.decode_batch:
        ids = e2e.prompt_ids(model.config.vocab_size, b, args.decode_prompt, ctx.device)
        mask = _t.ones_like(ids)
        calls = {n: (lambda f=f, ids=ids, mask=mask: greedy_decode(f, ids, mask, args.decode_new))
                 for n, f in forwards.items()}
        rows += e2e.measure(ctx, "decode", b, args.decode_new, b * args.decode_new, providers, calls, args.infer_steps,
                            args.warmup, log=log)
    return rows, check


# ---------------------------------------------------------------------------------------------------- repeng
def steering_providers(model, vectors: Dict[int, "torch.Tensor"], coeff: float):
    """base, steer (lofit_fast.steer), steer_merged (lofit_fast.merge_steering), repeng (ControlModel), all with
    the same vectors and coeff."""
    import numpy as np
    import repeng

    from lofit_fast.steer import decoder_layers

    layers = decoder_layers(model)

    class Steer(e2e.Provider):
        def attach(self):
            super().attach()
            lofit_fast.steer(model, vectors, coeff)

        def detach(self):
            lofit_fast.unsteer(model)
            super().detach()

    # merged: lofit_fast.merge_steering on fresh down_proj modules that share the weights
    originals = {l: layers[l].mlp.down_proj for l in vectors}
    for l, old in originals.items():
        new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        new.weight = old.weight
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
        layers[l].mlp.down_proj = new
    lofit_fast.steer(model, vectors, coeff)
    lofit_fast.merge_steering(model)
    merged_swaps = [(layers[l].mlp, "down_proj", layers[l].mlp.down_proj) for l in vectors]
    for l, old in originals.items():
        layers[l].mlp.down_proj = old
    merged = e2e.Provider("steer_merged", swaps=merged_swaps,
                          extra_bytes=sum(m.bias.numel() * m.bias.element_size() for _, _, m in merged_swaps))

    # repeng: ControlModel wraps the decoder layers in ControlModules; keep those, then unwrap
    cm = repeng.ControlModel(model, list(vectors))
    cv = repeng.ControlVector(model_type=model.config.model_type,
                              directions={l: vec.float().cpu().numpy().astype(np.float32) for l, vec in vectors.items()})
    cm.set_control(cv, coeff)
    holder = model.model.layers
    wrapped = [(holder, str(l), holder[l]) for l in vectors]
    cm.unwrap()
    if any(isinstance(m, repeng.control.ControlModule) for m in model.model.layers):
        raise RuntimeError("repeng's ControlModel did not unwrap")
    rep = e2e.Provider("repeng", swaps=wrapped, extra_bytes=sum(v.numel() * 4 for v in vectors.values()))
    return {"base": e2e.Provider("base"), "steer": Steer("steer", extra_bytes=sum(v.numel() * 4 for v in vectors.values())),
            "steer_merged": merged, "repeng": rep}


def train_vectors(model, tok, args, log) -> Tuple[Dict, Dict, Dict]:
    """lofit_fast.repe.control_vector and repeng's ControlVector.train on the same pairs and layers; per-layer
    cosine, and whether they steer the same way on held-out pairs."""
    import repeng
    import torch as _t

    from lofit_fast.methods import repe

    if args.model == "tiny":
        statements = [f"The number {i} is {'even' if i % 2 == 0 else 'odd'} and comes after {i - 1}." for i in range(40)]
    else:
        rows = repe.read_statements(Path(args.honesty_data) / "facts_true_false.csv")
        statements = [s for s, label in rows if label == 1][: args.statements]
    pos, neg = repe.honesty_pairs(tok, statements, max_pairs=args.pairs + args.held_out, seed=0)
    train_pos, train_neg = pos[: args.pairs], neg[: args.pairs]
    test_pos, test_neg = pos[args.pairs:], neg[args.pairs:]
    layers = repe.middle_layers(model)
    t0 = time.perf_counter()
    ours = repe.control_vector(model, tok, train_pos, train_neg, layers=layers, method="pca", batch_size=8)
    t_ours = time.perf_counter() - t0
    dataset = [repeng.DatasetEntry(positive=p, negative=n) for p, n in zip(train_pos, train_neg)]
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # tqdm bars
        cv = repeng.ControlVector.train(model, tok, dataset, hidden_layers=layers, method="pca_diff", batch_size=8)
    t_repeng = time.perf_counter() - t0
    theirs = {l: _t.from_numpy(cv.directions[l]).float() for l in layers}

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    cosine = {l: cos(ours[l], theirs[l]) for l in layers}
    # lofit_fast with repeng's recipe (method="pca_center"): the same vectors, if both read the same states
    ours_repeng = repe.control_vector(model, tok, train_pos, train_neg, layers=layers, method="pca_center",
                                      batch_size=8)
    cosine_recipe = {l: cos(ours_repeng[l], theirs[l]) for l in layers}
    # where the difference comes from: repeng's recipe (centered PCA, majority-vote sign) recomputed from the same
    # activations lofit_fast uses; its cosine with repeng's vector shows whether the two read the same states
    from lofit_fast.methods.activations import residual_activations

    acts_p = residual_activations(model, tok, train_pos, layers=layers, batch_size=8)
    acts_n = residual_activations(model, tok, train_neg, layers=layers, batch_size=8)
    recipe = {}
    for l in layers:
        d = acts_p[l].double() - acts_n[l].double()
        u = _t.linalg.svd(d - d.mean(0), full_matrices=False).Vh[0]
        hp, hn = acts_p[l].double() @ u, acts_n[l].double() @ u
        if (hp < hn).double().mean() > (hp > hn).double().mean():
            u = -u
        mean_sign = 1.0 if float((d @ u).mean()) > 0 else -1.0
        recipe[l] = {"cos_repeng_recipe_vs_repeng": cos(u.float(), theirs[l]),
                     "cos_lofit_vs_repeng_abs": abs(cosine[l]),
                     "signs_agree": bool(mean_sign > 0)}

    # steer the same way? last-token logit shifts on held-out prompts, each method with its own vectors
    enc = tok(test_pos + test_neg, return_tensors="pt", padding=True)
    last = enc["attention_mask"].sum(1) - 1 if tok.padding_side == "right" else _t.full((enc["input_ids"].shape[0],), enc["input_ids"].shape[1] - 1)
    rows_idx = _t.arange(enc["input_ids"].shape[0])

    def last_logits():
        with _t.no_grad():
            return model(**enc).logits[rows_idx, last].float()

    base = last_logits()
    shifts = {}
    for name, vecs in (("lofit_fast", ours), ("repeng", theirs), ("lofit_fast_pca_center", ours_repeng)):
        lofit_fast.steer(model, vecs, args.coeff)
        try:
            shifts[name] = (last_logits() - base).reshape(-1)
        finally:
            lofit_fast.unsteer(model)
    a, b = shifts["lofit_fast"], shifts["repeng"]
    c = shifts["lofit_fast_pca_center"]
    same_way = {"logit_shift_cosine": float(a @ b / (a.norm() * b.norm())),
                "logit_shift_cosine_pca_center": float(c @ b / (c.norm() * b.norm())), "coeff": args.coeff,
                "held_out_prompts": len(test_pos) + len(test_neg)}
    info = {"layers": layers, "pairs": len(train_pos), "cosine_per_layer": cosine,
            "cosine_per_layer_pca_center": cosine_recipe, "steer_same_way": same_way,
            "repeng_recipe_on_lofit_activations": recipe,
            "fit_seconds": {"lofit_fast": round(t_ours, 2), "repeng": round(t_repeng, 2)},
            "methods": {"lofit_fast": "repe.control_vector(method='pca'): top singular vector of the uncentered "
                                      "pos − neg differences, signed by the mean projection",
                        "repeng": "ControlVector.train(method='pca_diff'): sklearn PCA (centered) of the differences, "
                                  "signed by the majority vote over pairs"}}
    log(f"  repe: cosine per layer {({l: round(c, 4) for l, c in cosine.items()})}; logit shifts cosine "
        f"{same_way['logit_shift_cosine']:.4f}; with method='pca_center' "
        f"{({l: round(c, 4) for l, c in cosine_recipe.items()})}, shifts {same_way['logit_shift_cosine_pca_center']:.4f}; repeng's recipe on lofit_fast's activations vs repeng: "
        f"{({l: round(r['cos_repeng_recipe_vs_repeng'], 4) for l, r in recipe.items()})}")
    return ours, theirs, info


def bench_steering(model, tok, ctx, args, log) -> Tuple[List[Dict[str, str]], Dict]:
    import torch as _t

    ours, theirs, info = train_vectors(model, tok, args, log)
    providers = steering_providers(model, ours, args.coeff)
    ids = e2e.prompt_ids(model.config.vocab_size, 2, 16, ctx.device, seed=5)
    logits = {}
    with _t.no_grad():
        for name, p in providers.items():
            with p.attached():
                logits[name] = model(input_ids=ids, position_ids=batch_positions(*ids.shape[:1], 0, ids.shape[1])).logits.float()
    check = {"repeng_vs_steer_rel_err": rel(logits["repeng"], logits["steer"]),
             "merged_vs_steer_rel_err": rel(logits["steer_merged"], logits["steer"]),
             "steer_vs_base_rel_diff": rel(logits["steer"], logits["base"])}
    if not (check["repeng_vs_steer_rel_err"] <= 1e-5 and check["merged_vs_steer_rel_err"] <= 1e-4
            and check["steer_vs_base_rel_diff"] > 1e-3):
        raise RuntimeError(f"steering: repeng and lofit_fast disagree before timing: {check}")
    log(f"  steering: repeng == lofit_fast.steer == merged before timing: {check}")
    info["check"] = check
    rows = []
    ids = e2e.prompt_ids(model.config.vocab_size, args.steer_batch, args.steer_seq, ctx.device, seed=3)
    mask = _t.ones_like(ids)

    pos = batch_positions(ids.shape[0], 0, ids.shape[1])

    def fwd(ids=ids, mask=mask):
        with _t.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=pos)
    calls = {n: fwd for n in providers}
    rows += e2e.measure(ctx, "steer_forward", args.steer_batch, args.steer_seq, args.steer_batch * args.steer_seq,
                        providers, calls, args.infer_steps, args.warmup, log=log)
    for b in args.decode_batch:
        ids = e2e.prompt_ids(model.config.vocab_size, b, args.decode_prompt, ctx.device)
        mask = _t.ones_like(ids)

        def hf_decode(ids=ids, mask=mask):
            greedy_decode(lambda inp, m, cache, pos: model(input_ids=inp, attention_mask=m, past_key_values=cache,
                                                           position_ids=pos, use_cache=True, logits_to_keep=1),
                          ids, mask, args.decode_new, with_positions=True)
        calls = {n: hf_decode for n in providers}
        rows += e2e.measure(ctx, "steer_decode", b, args.decode_new, b * args.decode_new, providers, calls,
                            args.infer_steps, args.warmup, log=log)
    return rows, info


# -------------------------------------------------------------------------------------------------- llama.cpp
def llamacpp_check(model, tok, args, log) -> Dict:
    """lofit-fast's GGUF export read by llama.cpp (llama-cpp-python, when it is installed: it builds from source,
    ~9 min on 2 cores): prompt logits and greedy tokens of the exported file against the merged HF model, with
    llama.cpp on the unmodified source GGUF against the base model as the yardstick of llama.cpp's own error."""
    import tempfile

    import numpy as np
    import torch as _t
    from llama_cpp import Llama

    from lofit_fast.adapter.export import copy_sharing_tensors
    from lofit_fast.adapter.gguf_export import export_gguf
    from lofit_fast.models import smollm2_gguf

    if args.model != "smollm2":
        raise SystemExit("the llamacpp check needs --model smollm2 (a GGUF source)")
    _t.manual_seed(0)
    lofit_fast.patch(model, [(3, 1), (10, 4), (20, 0)], scale=False, offset=True, init_std=0.3)
    try:
        out = Path(tempfile.mkdtemp()) / "smollm2-lofit.gguf"
        export_gguf(model, out, source_gguf=smollm2_gguf())
        merged = lofit_fast.merge(copy_sharing_tensors(model))
        ids = tok("The capital of France is").input_ids
        x = _t.tensor([ids])
        with _t.no_grad():
            hf = {"merged": merged(x).logits[0].float().numpy()}
            gen = {"merged": merged.generate(x, max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()}
            with lofit_fast.disabled(model):
                hf["base"] = model(x).logits[0].float().numpy()
                gen["base"] = model.generate(x, max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    finally:
        lofit_fast.unpatch(model)

    def relerr(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    res = {"prompt_ids": ids, "heads": [[3, 1], [10, 4], [20, 0]], "hf_tokens": gen,
           "hf_merged_vs_base_rel": relerr(hf["merged"], hf["base"])}
    for name, path in (("exported", out), ("source", smollm2_gguf())):
        llm = Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=args.threads, seed=0)
        llm.reset()
        llm.eval(ids)
        lg = np.array(llm.scores[: len(ids)])
        toks = []
        for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            toks.append(int(t))
            if len(toks) == 8:
                break
        res[f"llamacpp_{name}"] = {"rel_err_vs_hf_merged": relerr(lg, hf["merged"]),
                                   "rel_err_vs_hf_base": relerr(lg, hf["base"]), "tokens": toks}
        del llm
    log(f"  llamacpp: {res}")
    return res


# ---------------------------------------------------------------------------------------------------- report
REFERENCE = {"step1": "floor", "step2": "floor", "decode": "base", "steer_forward": "base", "steer_decode": "base"}
ORDER = {"step1": ["fused", "pyvene"], "step2": ["fused", "pyvene"], "decode": ["fused", "merged", "pyvene"],
         "steer_forward": ["steer", "steer_merged", "repeng"], "steer_decode": ["steer", "steer_merged", "repeng"]}
TITLE = {"step1": "step 1 (A on all heads + L1), {b}×{s}", "step2": "step 2 (v on K heads), {b}×{s}",
         "decode": "decode {s} tokens, batch {b}", "steer_forward": "steered forward, {b}×{s}",
         "steer_decode": "steered decode {s} tokens, batch {b}"}


def ratios(rows: Sequence[Dict[str, str]]) -> List[Dict[str, object]]:
    """One entry per (workload, batch, seq): {provider: (time ratio, memory ratio)} against the reference."""
    groups: Dict[Tuple, Dict[str, Dict[str, str]]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["batch"], r["seq"]), {})[r["provider"]] = r
    out = []
    for (w, b, s), by in groups.items():
        ref = by[REFERENCE[w]]
        cells = {}
        for p in ORDER[w]:
            if p in by and by[p]["ms_p50"] and ref["ms_p50"]:
                t = float(by[p]["ms_p50"]) / float(ref["ms_p50"])
                m = float(by[p]["peak_mb"]) / float(ref["peak_mb"]) if by[p]["peak_mb"] and ref["peak_mb"] else None
                refm = float(ref["ms_p50"])
                cells[p] = (t, m, float(by[p]["ms_p50"]), float(by[p]["ms_p20"]) / refm, float(by[p]["ms_p80"]) / refm)
        out.append({"workload": w, "batch": int(b), "seq": int(s), "reference": REFERENCE[w],
                    "ref_ms": float(ref["ms_p50"]), "ref_p20": float(ref["ms_p20"]), "ref_p80": float(ref["ms_p80"]),
                    "cells": cells})
    return out


def markdown(rows, meta) -> str:
    lines = [f"# Peers benchmark ({meta['model']}, {meta['dtype']}, {meta['device']}, {meta['threads']} thread(s))", "",
             "Time and peak memory as ratios against the reference measured in the same run (floor for training "
             "steps, base for inference); lower is better. Cells: median time ratio / peak memory ratio. The "
             "reference column gives its median and [p20, p80] in ms: the spread of repeated runs on this (shared) "
             "machine, against which the ratios should be read.", "",
             "| workload | reference ms [p20, p80] | lofit_fast fused | lofit_fast merged | pyvene | lofit_fast steer | "
             "lofit_fast steer merged | repeng |", "|---|---|---|---|---|---|---|---|"]
    cols = ["fused", "merged", "pyvene", "steer", "steer_merged", "repeng"]
    for g in ratios(rows):
        cells = []
        for c in cols:
            if c in g["cells"]:
                t, m = g["cells"][c][:2]
                cells.append(f"{t:.2f} / {m:.3f}" if m is not None else f"{t:.2f}")
            else:
                cells.append("")
        title = TITLE[g["workload"]].format(b=g["batch"], s=g["seq"])
        lines.append(f"| {title} | {g['reference']} {g['ref_ms']:.0f} [{g['ref_p20']:.0f}, {g['ref_p80']:.0f}] | "
                     + " | ".join(cells) + " |")
    lines += ["", "Checks before timing:", "", "```", json.dumps(meta["checks"], indent=1), "```", "",
              "Command:", "", f"    {meta['command']}", ""]
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ratios(rows)
    colors = {"fused": "#1f77b4", "merged": "#2ca02c", "pyvene": "#d62728", "steer": "#9467bd",
              "steer_merged": "#17becf", "repeng": "#ff7f0e"}
    short = {"step1": "step 1\n{b}×{s}", "step2": "step 2\n{b}×{s}", "decode": "decode\nbatch {b}",
             "steer_forward": "steered fwd\n{b}×{s}", "steer_decode": "steered decode\nbatch {b}"}
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ticks, labels, seen, top = [], [], set(), 1.0
    for x, g in enumerate(groups):
        names = list(g["cells"])
        width = 0.8 / max(1, len(names))
        for i, n in enumerate(names):
            t, _, _, lo, hi = g["cells"][n]
            ax.bar(x + i * width, t, width=width, color=colors[n], label=n if n not in seen else None,
                   yerr=[[max(0.0, t - lo)], [max(0.0, hi - t)]], capsize=2, error_kw={"lw": 0.7})
            seen.add(n)
            top = max(top, hi)
        ticks.append(x + 0.4 - width / 2)
        labels.append(short[g["workload"]].format(b=g["batch"], s=g["seq"]))
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0, top * 1.08)
    ax.set_ylabel("median time / reference median (same run)")
    model = rows[0]["model"] if rows else "?"
    ax.set_title(f"lofit_fast vs pyvene and repeng, {model} fp32 CPU (reference: floor for training, base model "
                 "for inference; bars p20-p80)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
    plt.close(fig)
    from lofit_fast._files import atomic_write

    atomic_write(path, buf.getvalue())


def write_csv(path: Path, rows) -> None:
    from lofit_fast._files import atomic_write

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=e2e.HEADER, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    first, _, rest = __doc__.partition("\n")
    p = argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (the real model, default) or tiny (random, smoke runs)")
    p.add_argument("--workloads", default="step1,step2,decode,steer",
                   help="comma list of step1, step2, decode, steer; llamacpp alone: the GGUF export read by llama.cpp "
                        "(needs llama-cpp-python in the peers' venv; writes results/peers_llamacpp.json)")
    p.add_argument("--steps", type=int, default=8, help="timed repetitions per provider (training)")
    p.add_argument("--infer-steps", type=int, default=None, help="timed repetitions for inference (default --steps)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--completion-frac", type=float, default=0.25)
    p.add_argument("--decode-batch", default="1,8")
    p.add_argument("--decode-prompt", type=int, default=32)
    p.add_argument("--decode-new", type=int, default=16)
    p.add_argument("--steer-batch", type=int, default=8)
    p.add_argument("--steer-seq", type=int, default=64)
    p.add_argument("--coeff", type=float, default=8.0, help="steering strength (same for every steering provider)")
    p.add_argument("--pairs", type=int, default=64, help="contrastive pairs for the control vectors")
    p.add_argument("--held-out", type=int, default=16, help="held-out pairs for the steer-the-same-way check")
    p.add_argument("--statements", type=int, default=64)
    p.add_argument("--honesty-data", default=str(Path("/work/shared/data/honesty")))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--venv", default=str(DEFAULT_VENV), help="where to make the peers' venv if they do not import")
    p.add_argument("--results", default=str(BENCH / "results"), help="folder for peers_cpu.{csv,md,json,png}")
    return p


def run(args) -> int:
    global MODEL
    _late_imports()
    _numpy_shim()
    import torch as _t

    _t.set_num_threads(args.threads)
    args.decode_batch = [int(x) for x in str(args.decode_batch).split(",") if x]
    args.infer_steps = args.infer_steps or args.steps
    device = _t.device("cpu")
    if args.model == "smollm2":
        model, tok = lofit_fast.load_model("smollm2")
    elif args.model == "tiny":
        sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
        from tiny import byte_tokenizer

        model = e2e.build_model("tiny", device, _t.float32, vocab_size=259)
        tok = byte_tokenizer()
    else:
        raise SystemExit(f"--model must be smollm2 or tiny, got {args.model!r}")
    model.eval()
    model.requires_grad_(False)
    MODEL = model
    ctx = e2e.Context(args.model, "fp32", device, "cpu", _t.__version__, e2e.git_commit(), e2e.model_bytes(model))
    log = lambda m: print(m, flush=True)  # noqa: E731
    load_before = e2e.loadavg()
    started = time.time()
    rows, checks = [], {}
    for w in [x for x in args.workloads.split(",") if x]:
        log(f"== {w}")
        if w in ("step1", "step2"):
            r, c = bench_training(model, ctx, w, args, log)
        elif w == "decode":
            r, c = bench_decode(model, ctx, args, log)
        elif w == "steer":
            r, c = bench_steering(model, tok, ctx, args, log)
        elif w == "llamacpp":
            r, c = [], llamacpp_check(model, tok, args, log)
        else:
            raise SystemExit(f"unknown workload {w!r}")
        rows += r
        checks[w] = c
    from importlib.metadata import version

    meta = {"model": args.model, "dtype": "float32", "device": "cpu", "threads": args.threads,
            "command": args.command, "commit": ctx.commit, "seconds": round(time.time() - started, 1),
            "loadavg_before": load_before, "loadavg_after": e2e.loadavg(),
            "versions": {n: version(n) for n in ("torch", "transformers", "pyvene", "repeng", "numpy")},
            "venv": os.environ.get(VENV_FLAG), "checks": checks}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    from lofit_fast._files import atomic_write

    if not rows:  # only the llamacpp check: its own file, the timing results stay as they are
        atomic_write(results / "peers_llamacpp.json", json.dumps(meta, indent=1, default=str) + "\n")
        print(json.dumps(checks, indent=1, default=str))
        return 0
    write_csv(results / "peers_cpu.csv", rows)

    atomic_write(results / "peers_cpu.json", json.dumps(meta, indent=1, default=str) + "\n")
    md = markdown(rows, meta)
    atomic_write(results / "peers_cpu.md", md)
    plot(rows, results / "peers_cpu.png")
    print(md)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command = " ".join(["python bench/peers_bench.py", *argv])
    ensure_peers(Path(args.venv))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
