"""lofit_fast.ops._cache: the per-parameter-version caches of the CUDA backend's prepared operands (CPU-only)."""
import gc

import pytest
import torch

from lofit_fast.ops._cache import DerivedCache, build_detached, cacheable


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, *tensors):
        self.calls += 1
        return sum(t.sum() for t in tensors if t is not None) + self.calls * 0


def test_hit_returns_the_same_object():
    cache, build = DerivedCache(), Counter()
    w, h = torch.randn(4, 8), torch.tensor([0, 2])
    first = cache.get((w, h), 8, lambda: build(w))
    second = cache.get((w, h), 8, lambda: build(w))
    assert first is second and build.calls == 1
    assert (cache.hits, cache.misses, cache.uncached) == (1, 1, 0)


def test_extra_key_and_none_sources_are_part_of_the_key():
    cache, build = DerivedCache(), Counter()
    w, b = torch.randn(4, 8), torch.randn(4)
    cache.get((w, None), 8, lambda: build(w))
    cache.get((w, None), 4, lambda: build(w))  # another head_dim
    cache.get((w, b), 8, lambda: build(w, b))  # a bias instead of None
    assert build.calls == 3 and len(cache) == 3
    cache.get((w, None), 8, lambda: build(w))
    assert build.calls == 3


@pytest.mark.parametrize("change", ["inplace_no_grad", "optimizer_step", "data_swap", "index_put"])
def test_in_place_changes_invalidate(change):
    cache = DerivedCache()
    v = torch.nn.Parameter(torch.zeros(2, 4))
    value = lambda: cache.get((v,), None, lambda: v.detach().clone())  # noqa: E731
    before = value()
    if change == "inplace_no_grad":
        with torch.no_grad():
            v.add_(1.0)
    elif change == "optimizer_step":
        v.grad = torch.ones_like(v)
        torch.optim.SGD([v], lr=1.0).step()
    elif change == "data_swap":
        v.data = torch.full((2, 4), 3.0)  # a new storage: data_ptr changes
    else:
        with torch.no_grad():
            v[0, 0] = 5.0
    after = value()
    assert after is not before
    assert torch.equal(after, v.detach())
    assert value() is after  # and cached again


def test_entry_is_dropped_when_a_source_is_freed():
    cache = DerivedCache()
    w, h = torch.randn(4, 8), torch.tensor([1])
    cache.get((w, h), 8, lambda: w.sum())
    assert len(cache) == 1
    del w
    gc.collect()
    assert len(cache) == 0
    w2 = torch.randn(4, 8)  # may reuse the freed id: must not hit the old entry
    got = cache.get((w2, h), 8, lambda: w2.sum())
    assert torch.equal(got, w2.sum())


def test_replaced_entry_callback_does_not_drop_the_new_one():
    cache = DerivedCache()
    w, h = torch.randn(4, 8), torch.tensor([1])
    cache.get((w, h), None, lambda: 1)
    with torch.no_grad():
        w.mul_(2)
    assert cache.get((w, h), None, lambda: 2) == 2  # replaced under the same key
    gc.collect()
    assert len(cache) == 1 and cache.get((w, h), None, lambda: 3) == 2


def test_no_strong_reference_to_sources():
    import weakref

    cache = DerivedCache()
    w = torch.randn(4, 8)
    ref = weakref.ref(w)
    cache.get((w,), None, lambda: torch.ones(1))
    del w
    gc.collect()
    assert ref() is None


def test_inference_tensors_are_never_cached():
    cache, build = DerivedCache(), Counter()
    with torch.inference_mode():
        w = torch.randn(4, 8)
    assert w.is_inference()
    cache.get((w,), None, lambda: build(w))
    cache.get((w,), None, lambda: build(w))
    assert build.calls == 2 and len(cache) == 0 and cache.uncached == 2


def test_inference_mode_with_normal_parameters_caches():
    """Decode under inference_mode: x is an inference tensor, the parameters are not."""
    cache, build = DerivedCache(), Counter()
    w = torch.randn(4, 8)
    with torch.inference_mode():
        x = torch.randn(2, 8)
        assert cacheable((w,), (x,))
        def double(t):
            build(t)
            return t * 2

        a = cache.get((w,), None, lambda: build_detached(double, w))
        b = cache.get((w,), None, lambda: build_detached(double, w))
    assert a is b and build.calls == 1 and not a.is_inference()  # built outside inference mode: usable with autograd
    assert torch.equal(a, w * 2)


def test_build_detached_records_no_graph():
    v = torch.randn(3, requires_grad=True)
    out = build_detached(lambda t: t * 3, v)
    assert not out.requires_grad and out.grad_fn is None


def test_tensor_subclasses_and_tracing_are_not_cached():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(4, 8)
    assert not cacheable((fake,))
    assert not cacheable((torch.randn(2),), (fake,))  # a fake companion (x) too

    calls = []

    def f(w):
        assert not cacheable((w,))
        calls.append(1)
        return w * 2

    torch.compile(f, backend="eager", fullgraph=True)(torch.randn(3))
    assert calls  # traced with is_compiling() true


def test_parameters_and_plain_tensors_are_cacheable():
    p = torch.nn.Parameter(torch.randn(2))
    assert cacheable((p, None, torch.tensor([0])))
