"""Memory budgets (``_budget``) and chunk planning (``_plan.plan_chunks``)."""

from __future__ import annotations

import pytest

from helpers import require

import mha_cupy
from mha_cupy._budget import parse_memory_budget, resolve_memory_budget
from mha_cupy._plan import Problem, Sizes
from mha_cupy._plan import plan_chunks as _plan_chunks


@pytest.mark.parametrize("text,nbytes", [("256MB", 256 * 10**6), ("64MiB", 64 * 2**20), ("1.5GB", 1_500_000_000),
                                         ("512", 512), (" 2 kib ", 2048), (1000, 1000)])
def test_parse(text, nbytes):
    assert parse_memory_budget(text) == nbytes


@pytest.mark.parametrize("bad,exc", [("12 parsecs", ValueError), ("", ValueError), (0, ValueError), (-5, ValueError),
                                     (1.5, TypeError), (True, TypeError), (None, TypeError)])
def test_parse_bad(bad, exc):
    with pytest.raises(exc, match="memory_budget"):
        parse_memory_budget(bad)


def test_default_budget_can_be_changed():
    assert mha_cupy.get_memory_budget() == 32 * 2**20  # the CPU default
    previous = mha_cupy.set_memory_budget("8MiB")
    try:
        assert previous is None  # per-device defaults were in force
        assert mha_cupy.get_memory_budget() == 8 * 2**20
    finally:
        mha_cupy.set_memory_budget(previous)
    assert mha_cupy.get_memory_budget() == 32 * 2**20


class FakeAccelerator(mha_cupy._backends.NumpyBackend):
    """NumPy arrays standing in for a GPU with 40 GiB free (no GPU here)."""

    def is_cpu(self, device):
        return False

    def free_memory(self, device):
        return 40 * 2**30


def test_accelerator_budget_is_a_share_of_free_memory():
    fake = FakeAccelerator(mha_cupy._backends.resolve_backend("numpy").xp)
    assert resolve_memory_budget(None, be=fake, device="gpu") == 10 * 2**30
    assert resolve_memory_budget("1GiB", be=fake, device="gpu") == 2**30
    previous = mha_cupy.set_memory_budget("64MiB")
    try:
        assert resolve_memory_budget(None, be=fake, device="gpu") == 64 * 2**20
    finally:
        mha_cupy.set_memory_budget(previous)


def plan_chunks(*, batch, q_len, kv_len, heads, d_k, d_v, compute_itemsize, dropout, masked, budget, q_chunk=None,
                kv_chunk=None, workers=1, on_cpu=True, backward=False):
    """``_plan.plan_chunks`` of a problem with these sizes and costs (float32 or float64 compute)."""
    import numpy as np

    be = mha_cupy._backends.resolve_backend("numpy")
    be = be if on_cpu else FakeAccelerator(be.xp)
    problem = Problem(be=be, device="cpu", dtype=np.float32 if compute_itemsize == 4 else np.float64,
                      sizes=Sizes(batch, q_len, kv_len, heads, heads, d_k, d_v), scale=1.0, workers=workers,
                      budget=budget, q_chunk=q_chunk, kv_chunk=kv_chunk, masked=masked,
                      dropout_p=0.5 if dropout else 0.0, seed=1 if dropout else None, backward=backward)
    return _plan_chunks(problem)


def shape(**kw):
    base = dict(batch=1, q_len=16384, kv_len=16384, heads=6, d_k=32, d_v=32, compute_itemsize=4, dropout=False,
                masked=False, budget=32 * 2**20)
    return {**base, **kw}


@pytest.mark.parametrize("budget", [2**20, 8 * 2**20, 32 * 2**20, 256 * 2**20])
def test_plan_fits_budget(budget):
    plan = plan_chunks(**shape(budget=budget))
    tile = 6 * plan.batch * plan.q * (plan.kv * 8 + (32 + 64 + 4) * 4)  # two float32 tiles alive per step
    assert tile <= budget
    assert plan.kv <= 4096 and plan.q >= 1


def test_plan_small_problem_is_one_block():
    plan = plan_chunks(**shape(batch=3, q_len=5, kv_len=7))
    assert (plan.batch, plan.q, plan.kv) == (3, 5, 7)


def test_plan_chunks_the_batch_when_needed():
    plan = plan_chunks(**shape(batch=10_000, q_len=100, kv_len=100, budget=16 * 2**20))
    assert plan.q == 100 and plan.kv == 100 and 1 <= plan.batch < 10_000


def test_explicit_sizes_win_and_are_clipped():
    plan = plan_chunks(**shape(q_len=10, kv_len=20), q_chunk=3, kv_chunk=50)
    assert (plan.q, plan.kv) == (3, 20)


def test_budget_too_small_for_one_row():
    with pytest.raises(ValueError, match="memory_budget of 100 bytes is too small for one query row"):
        plan_chunks(**shape(budget=100))


def test_accelerator_plan_fills_the_budget_with_long_key_chunks():
    cpu = plan_chunks(**shape(budget=256 * 2**20))
    gpu = plan_chunks(**shape(budget=256 * 2**20), on_cpu=False)
    assert cpu.kv == 512 and 6 * cpu.q * cpu.kv <= 2**20
    assert gpu.kv == 4096 and gpu.q > cpu.q


def test_accelerator_plan_reads_many_keys_per_chunk_for_few_queries():
    """One query row of 8 heads over 1,000,000 keys: one key chunk on an accelerator (245 chunks of 4096 were
    launch-bound on an H200), within the budget; a budget too small for that still caps the chunk."""
    few = dict(batch=1, q_len=1, kv_len=1_000_000, heads=8, d_k=64, d_v=64, compute_itemsize=4, dropout=False,
               masked=False)
    assert plan_chunks(**few, budget=8 * 2**30, on_cpu=False).kv == 1_000_000
    assert 16000 <= plan_chunks(**{**few, "q_len": 1024}, budget=8 * 2**30, on_cpu=False).kv <= 16384
    small = plan_chunks(**few, budget=16 * 2**20, on_cpu=False)
    assert small.kv < 1_000_000 and 8 * small.kv * 4 * 2 <= 16 * 2**20


def test_is_cpu():
    from mha_cupy._backends import resolve_backend

    assert resolve_backend("numpy").is_cpu("cpu")
    torch = require("torch", reason="needs torch")
    assert resolve_backend("torch").is_cpu(torch.device("cpu"))
    assert not resolve_backend("torch").is_cpu(torch.device("cuda", 0))


@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(dropout_p=0.1, seed=1), dict(bias=True)],
                         ids=["plain", "causal", "dropout", "bias"])
def test_working_set_stays_within_the_budget(kw):
    """The planner's bytes-per-score model is honest: traced peak minus the output stays under the budget."""
    import tracemalloc

    import numpy as np

    from mha_cupy import scaled_dot_product_attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2048, 6, 32), dtype=np.float32) for _ in range(3))
    if kw.get("bias"):
        kw = dict(bias=rng.standard_normal((2048, 1, 2048), dtype=np.float32))
    budget = 2 * 2**20
    scaled_dot_product_attention(q[:, :4], k[:, :4], v[:, :4])  # loads numba's kernels: once, not the call's
    tracemalloc.start()
    try:
        out = scaled_dot_product_attention(q, k, v, memory_budget=budget, workers=1, **kw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - out.nbytes <= budget, f"{(peak - out.nbytes) / 2**20:.2f} MiB over a {budget / 2**20:.0f} MiB budget"


def test_few_queries_get_one_block_and_long_key_chunks():
    # q [1, 8, 8 heads] over 262144 keys on 2 workers: one block (the keys are split between the
    # workers, tests/test_attention.py), key chunks long enough for a ~1M-score tile.
    plan = plan_chunks(**shape(q_len=8, kv_len=262144, heads=8, d_k=64, d_v=64), workers=2)
    assert (plan.batch, plan.q) == (1, 8) and plan.kv == 2**20 // 64
    many = plan_chunks(**shape(q_len=4096, kv_len=4096), workers=2)
    assert many.kv == 512 and many.q < 4096  # enough queries: they are split, chunks stay cache-sized


@pytest.mark.parametrize("workers", [1, 2])
def test_dequantized_chunks_stay_within_the_budget(workers):
    """Few queries over many int8 keys: the dequantized key and value chunks count against the budget (without
    them in the plan, the longer key chunks of few-query calls would dequantize the whole cache at once)."""
    import tracemalloc

    import numpy as np

    from mha_cupy import scaled_dot_product_attention

    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 4, 8, 64), dtype=np.float32)
    k, v = (rng.integers(-127, 128, (1, 60_000, 8, 64), dtype=np.int8) for _ in range(2))
    scaled_dot_product_attention(q, k[:, :4], v[:, :4], k_scale=0.01, v_scale=0.01)  # numba's kernels load once
    budget = 4 * 2**20
    tracemalloc.start()
    try:
        out = scaled_dot_product_attention(q, k, v, k_scale=0.01, v_scale=0.01, memory_budget=budget, workers=workers)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - out.nbytes <= budget, f"{(peak - out.nbytes) / 2**20:.2f} MiB over a {budget / 2**20:.0f} MiB budget"


def _traced_peak(fn):
    """``fn()`` and the growth of traced memory at its peak (NumPy's arrays included), in bytes."""
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("budget", [2 * 2**20, 8 * 2**20, 32 * 2**20], ids=["2MiB", "8MiB", "32MiB"])
@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(dropout_p=0.1, seed=1)], ids=["plain", "causal", "dropout"])
def test_backward_working_set_stays_within_the_budget(kw, budget):
    """The vjp's score tiles, their temporaries and each chunk's keys, values and key gradients fit the budget: the
    traced peak of the whole call minus its three outputs and the forward's output and log-sum-exp (which the
    backward reads, as the forward's own output is not counted) stays under it (one worker: each further worker
    holds a dq of its own key range)."""
    import numpy as np

    from mha_cupy import scaled_dot_product_attention_vjp as vjp

    rng = np.random.default_rng(0)
    q, k, v, d_out = (rng.standard_normal((1, 4096, 6, 32), dtype=np.float32) for _ in range(4))
    vjp(q[:, :4], k[:, :4], v[:, :4], d_out[:, :4])  # numba's kernels load once, not in the call
    grads, peak = _traced_peak(lambda: vjp(q, k, v, d_out, memory_budget=budget, workers=1, **kw))
    held = sum(g.nbytes for g in grads) + q.nbytes + q.nbytes // 32
    assert peak - held <= budget, f"{(peak - held) / 2**20:.2f} MiB over a {budget / 2**20:.0f} MiB budget"


@pytest.mark.parametrize("budget", [2 * 2**20, 8 * 2**20, 32 * 2**20], ids=["2MiB", "8MiB", "32MiB"])
def test_layer_backward_working_set_stays_within_the_budget(budget, monkeypatch):
    """The same for ``MultiHeadAttention.vjp``'s attention (projections and weight gradients are not the
    attention's): the traced peak of its attention backward minus its output, log-sum-exp and three gradients."""
    import numpy as np

    import mha_cupy._route as route

    real, peaks = route.vjp, []

    def measured(*args, **kwargs):
        (out, grads), peak = _traced_peak(lambda: real(*args, **kwargs))
        peaks.append(peak - out.nbytes - out.nbytes // 32 - sum(g.nbytes for g in grads))
        return out, grads

    layer = mha_cupy.MultiHeadAttention(emsize=192, nhead=6, d_k=32, d_v=32, seed=0)
    x = np.random.default_rng(1).standard_normal((1, 4096, 192), dtype=np.float32)
    layer.vjp(x[:, :4], x[:, :4])
    monkeypatch.setattr(route, "vjp", measured)
    layer.vjp(x, x, memory_budget=budget, workers=1)
    assert peaks and peaks[0] <= budget, f"{peaks[0] / 2**20:.2f} MiB over a {budget / 2**20:.0f} MiB budget"
