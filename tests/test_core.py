"""The chunk loop's structure: how many array operations a call issues under a plan.

No GPU is here, so the accelerator default is shown by counting: every array operation
(a kernel launch on a GPU) the loop issues, on NumPy arrays that count their ufunc and
function calls, for the plan the accelerator budget gives at L=16384.
"""

from __future__ import annotations

import numpy as np

from mha_cupy._backends import Backend, NumpyBackend, resolve_backend
from mha_cupy._core import attend
from mha_cupy._plan import AttentionPlan, ChunkPlan, Problem, Sizes, plan_chunks


class Counted(np.ndarray):
    """A NumPy array that counts every ufunc (operators and in-place ones included) and function call."""

    calls = 0

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        Counted.calls += 1
        inputs = tuple(np.asarray(a) if isinstance(a, Counted) else a for a in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(np.asarray(a) if isinstance(a, Counted) else a for a in kwargs["out"])
        result = getattr(ufunc, method)(*inputs, **kwargs)
        return result.view(Counted) if isinstance(result, np.ndarray) else result

    def __array_function__(self, func, types, args, kwargs):
        Counted.calls += 1
        return super().__array_function__(func, tuple(t if t is not Counted else np.ndarray for t in types), args, kwargs)


class FreshTiles(NumpyBackend):
    """NumPy as an accelerator library runs it: fresh score arrays, the Array API softmax step (no compiled kernel)."""

    matmul_writes_out = False
    online_softmax = Backend.online_softmax


def count_ops(B, T, S, N, H, chunks):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32).view(Counted) for s in ((B, T, N, H), (B, S, N, H), (B, S, N, H)))
    # Scores into fresh arrays, which stay Counted (a reused tile is a plain ndarray): the same operations.
    be = FreshTiles(resolve_backend("numpy").xp)
    plan = AttentionPlan(scale=0.5, chunks=chunks, workers=1)
    Counted.calls = 0
    attend(q, k, v, be=be, plan=plan)
    return Counted.calls


def ops_model():
    """Operations per call = fixed + blocks * (per_block + key_chunks * per_chunk), measured on small problems."""
    one = count_ops(1, 4, 4, 2, 3, ChunkPlan(batch=1, q=4, kv=4))
    two = count_ops(1, 4, 8, 2, 3, ChunkPlan(batch=1, q=4, kv=4))
    two_blocks = count_ops(1, 8, 4, 2, 3, ChunkPlan(batch=1, q=4, kv=4))
    per_chunk = two - one
    per_block = two_blocks - one - per_chunk
    fixed = one - per_block - per_chunk
    return fixed, per_block, per_chunk


def test_operation_count_model_is_exact():
    fixed, per_block, per_chunk = ops_model()
    assert per_chunk > 0 and per_block > 0
    blocks, key_chunks = 2 * 3, 4  # batch 4 in pairs, 9 queries in threes, 16 keys in fours
    expected = fixed + blocks * (per_block + key_chunks * per_chunk)
    assert count_ops(4, 9, 16, 2, 3, ChunkPlan(batch=2, q=3, kv=4)) == expected


class FakeAccelerator(NumpyBackend):
    def is_cpu(self, device):
        return False

    def free_memory(self, device):
        return 40 * 2**30  # an 80 GB GPU with half its memory free


def test_accelerator_default_is_a_few_large_tiles_at_16k():
    L, N, H = 16384, 6, 32
    fixed, per_block, per_chunk = ops_model()
    cpu, fake = resolve_backend("numpy"), FakeAccelerator(resolve_backend("numpy").xp)
    counts = {}
    for name, be in (("cpu", cpu), ("accelerator", fake)):
        on_cpu = be.is_cpu("device")
        budget = be.default_memory_budget("device")
        workers = 2 if on_cpu else 1
        plan = plan_chunks(Problem(be=be, device="device", dtype=np.float32, sizes=Sizes(1, L, L, N, N, H, H), scale=1.0,
                                   workers=workers, budget=budget))
        blocks = -(-L // plan.q)
        counts[name] = (plan, fixed + blocks * (per_block + -(-L // plan.kv) * per_chunk))
    acc_plan, acc_ops = counts["accelerator"]
    cpu_plan, cpu_ops = counts["cpu"]
    assert (acc_plan.q, acc_plan.kv) == (4096, 4096)  # 4 x 4 tiles
    assert acc_ops < 400 < 20_000 < cpu_ops, counts
