"""Property tests (hypothesis): the op against the float64 reference over drawn shapes, head subsets, dtypes,
strides and leading dimensions on every available backend, forward and backward; and adapter files damaged
at random always give an AdapterFormatError and leave the model unchanged."""
import json
import os
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lofit_fast  # noqa: E402
from lofit_fast.adapter import AdapterFormatError, load_adapter, save_adapter  # noqa: E402
from lofit_fast.adapter.schema import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402

from conftest import device_for  # noqa: E402
from models import random_ids, tiny_model  # noqa: E402
from reference import GRAD_TOL, OUT_TOL, reference_forward, reference_grads, rel_err  # noqa: E402

BACKENDS = [b for b in lofit_fast.available_backends() if b in ("torch", "cpp", "triton", "cuda")]
SETTINGS = settings(max_examples=int(os.environ.get("LOFIT_HYPOTHESIS_EXAMPLES", "12")), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def op_cases(draw):
    backend = draw(st.sampled_from(BACKENDS))
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if backend != "cpp" else [])
    dtype = draw(st.sampled_from(dtypes))
    d = draw(st.sampled_from([16, 32, 64]))
    H = draw(st.integers(1, 5))
    heads = sorted(draw(st.sets(st.integers(0, H - 1), max_size=H)))
    lead = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    D_out = draw(st.integers(1, 70))
    mode = draw(st.sampled_from(["both", "scale", "offset"]))
    layout = draw(st.sampled_from(["contiguous", "strided", "transposed"]))
    return backend, dtype, d, H, heads, lead, D_out, mode, layout, draw(st.booleans()), draw(st.integers(0, 2**31))


def _x(lead, C, dtype, layout, device):
    if layout == "strided":
        return torch.randn(*lead, 2 * C, device=device).to(dtype)[..., ::2]
    if layout == "transposed" and len(lead) == 1:
        return torch.randn(C, lead[0], device=device).to(dtype).t()
    return torch.randn(*lead, C, device=device).to(dtype)


@SETTINGS
@given(op_cases())
def test_op_matches_the_float64_reference(case):
    backend, dtype, d, H, heads, lead, D_out, mode, layout, with_bias, seed = case
    torch.manual_seed(seed)
    device = device_for(backend)
    C = H * d
    x = _x(lead, C, dtype, layout, device).requires_grad_(True)
    W = (torch.randn(D_out, C, device=device) / math.sqrt(C)).to(dtype)
    b = torch.randn(D_out, device=device).to(dtype) if with_bias else None
    h = torch.tensor(heads, dtype=torch.int64, device=device)
    K = len(heads)
    A = (0.5 * torch.randn(K, d, device=device)).requires_grad_(True) if mode != "offset" else None
    v = (0.5 * torch.randn(K, d, device=device)).requires_grad_(True) if mode != "scale" else None
    y = lofit_fast.head_affine_linear(x, W, b, h, A, v, d, backend=backend)
    cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    mag = lambda t: None if t is None else t.detach().cpu().abs()  # noqa: E731
    # Drawn shapes include single sums with cancellation, where ‖ref‖ says nothing about rounding; the error is
    # measured against the same sums taken over absolute values, the scale that rounding errors have.
    ref = reference_forward(cpu(x), cpu(W), cpu(b), h.cpu(), cpu(A), cpu(v), d)
    scale = reference_forward(mag(x), mag(W), mag(b), h.cpu(), mag(A), mag(v), d)
    assert y.shape == (*lead, D_out) and y.dtype == dtype
    assert rel_err(y - ref.to(y.device), torch.zeros_like(ref)) / max(scale.norm().item(), 1e-30) < OUT_TOL[dtype]
    dy = torch.randn_like(y)
    params = [p for p in (x, A, v) if p is not None]
    grads = torch.autograd.grad(y, params, dy, allow_unused=True)
    refs = reference_grads(cpu(x), cpu(W), h.cpu(), cpu(A), cpu(v), d, cpu(dy))
    scales = reference_grads(mag(x), mag(W), h.cpu(), mag(A), mag(v), d, mag(dy))
    pairs = [(refs[0].reshape(x.shape), scales[0].reshape(x.shape))]
    pairs += [(r, sc) for r, sc, p in ((refs[1], scales[1], A), (refs[2], scales[2], v)) if p is not None]
    for g, (r, sc) in zip(grads, pairs):
        if r.numel() == 0:
            continue
        g = g if g is not None else torch.zeros_like(r)
        err = (g.detach().double().cpu() - r).norm().item() / max(sc.norm().item(), 1e-30)
        assert err < GRAD_TOL[dtype]


@pytest.fixture(scope="module")
def adapter_bytes(tmp_path_factory):
    model = lofit_fast.patch(tiny_model("llama", attn="eager"), {0: [1, 2], 1: [0]}, scale=True, offset=True,
                             init_std=0.1)
    directory = tmp_path_factory.mktemp("adapter")
    save_adapter(model, directory)
    return (directory / CONFIG_NAME).read_bytes(), (directory / WEIGHTS_NAME).read_bytes()


@st.composite
def damage(draw):
    target = draw(st.sampled_from([CONFIG_NAME, WEIGHTS_NAME]))
    kind = draw(st.sampled_from(["truncate", "flip", "edit"] if target == CONFIG_NAME else ["truncate", "flip"]))
    return target, kind, draw(st.floats(0, 1, exclude_max=True)), draw(st.integers(0, 7)), draw(st.integers(0, 10**6))


def _edited_json(data: bytes, pick: int) -> bytes:
    """A well-formed JSON config with one field changed to something plausible but wrong."""
    config = json.loads(data)
    keys = sorted(config)
    key = keys[pick % len(keys)]
    value = config[key]
    replacements = {bool: lambda x: not x, int: lambda x: x + 1, str: lambda x: x + "x", list: lambda x: x[:-1] or [7],
                    dict: lambda x: {**x, "9": [0]}, type(None): lambda x: 3}
    config[key] = replacements.get(type(value), lambda x: None)(value)
    return json.dumps(config).encode()


@SETTINGS
@given(damage())
def test_damaged_adapter_files_fail_cleanly(tmp_path_factory, adapter_bytes, hit):
    target, kind, where, bit, pick = hit
    config, weights = adapter_bytes
    directory = tmp_path_factory.mktemp("damaged")
    files = {CONFIG_NAME: bytearray(config), WEIGHTS_NAME: bytearray(weights)}
    data = files[target]
    pos = int(where * len(data))
    if kind == "truncate":
        del data[pos:]
    elif kind == "flip":
        data[pos] ^= 1 << bit
    else:
        files[target] = bytearray(_edited_json(bytes(data), pick))
    for name, content in files.items():
        (directory / name).write_bytes(bytes(content))
    model = tiny_model("llama", attn="eager")
    before = {k: t.clone() for k, t in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    try:
        load_adapter(model, directory)
    except AdapterFormatError:
        pass
    else:
        # Some edits keep the adapter valid (a bit flip in the JSON's whitespace, a changed free-text field):
        # then it must load exactly as the original did.
        original = tiny_model("llama", attn="eager")
        good = tmp_path_factory.mktemp("good")
        (good / CONFIG_NAME).write_bytes(config)
        (good / WEIGHTS_NAME).write_bytes(weights)
        load_adapter(original, good)
        ids = random_ids(seq=8)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, original(ids).logits)
        return
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())
