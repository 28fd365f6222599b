"""From a checked call to the plan of its chunk loops: ``Problem`` (what planning reads of a call, built by
``_call``), ``plan_attention`` (the ``AttentionPlan`` the loops follow) and ``plan_chunks`` (block sizes whose
working set fits the memory budget).

Letters as in ``mha_cupy.attention``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._backends import Backend

__all__ = [
    "ACCELERATOR_KV_CHUNK",
    "ACCELERATOR_Q_CHUNK",
    "ACCELERATOR_TILE_ELEMENTS",
    "DEFAULT_KV_CHUNK",
    "DEFAULT_Q_CHUNK",
    "INVARIANT_CHUNKS",
    "MIN_QUERY_ROWS_PER_WORKER",
    "TILE_ELEMENTS",
    "AttentionPlan",
    "ChunkPlan",
    "Problem",
    "Sizes",
    "ceil_div",
    "dequantized_key_bytes",
    "plan_attention",
    "plan_chunks",
]

#: Largest key/value chunk the planner picks by itself on a CPU: 256-1024 measured
#: fastest for NumPy on a 2-core x86 machine.
DEFAULT_KV_CHUNK = 512
#: The same on an accelerator (Rabe & Staats' 4096; not measured here), where tiles
#: are bounded by the budget alone.
ACCELERATOR_KV_CHUNK = 4096
#: Score elements per block that the planner aims for (4 MiB of float32): tiles that
#: stay in cache; measured 3-6 MiB fastest for NumPy on a 2-core x86 machine.
TILE_ELEMENTS = 2**20
#: Fewest (batch x query) rows per worker for which the planner splits the queries between the
#: workers; below it, a call keeps its queries in one block and splits the keys instead
#: (``AttentionPlan.key_splits``), so that K and V are read once in all rather than once per worker.
MIN_QUERY_ROWS_PER_WORKER = 64
#: Score elements of one block on an accelerator when few query rows leave the 4096 x 4096 tile half empty: a full
#: tile over 8 heads. One query over 1,000,000 int8 keys then runs as one key chunk instead of 245 (launch-bound on
#: an H200: 70-108 ms against 8 ms for dequantize-then-SDPA, benchmarks/results/gpu-2026-12-04.md).
ACCELERATOR_TILE_ELEMENTS = 8 * 4096 * 4096
#: Largest query chunk the planner picks by itself on a CPU.
DEFAULT_Q_CHUNK = 1024
#: The same on an accelerator (not measured on a GPU yet): with 4096-key chunks, a
#: 16384-long self-attention is 4 x 4 tiles when the budget allows.
ACCELERATOR_Q_CHUNK = 4096


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b > 0``."""
    return -(-a // b)


class Sizes(NamedTuple):
    """The sizes of one attention problem: ``(B, T, S, N, K, H, V)``."""

    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    d_k: int
    d_v: int


@dataclass(frozen=True)
class ChunkPlan:
    """Block sizes of the attention loop: batch rows, query rows, key rows."""

    batch: int
    q: int
    kv: int


#: The tiles of ``batch_invariant`` calls: keys in chunks of 512 from 0 (every row's reductions have one length),
#: queries in tiles of 32 (padded) where the chunk step runs as element-wise passes, whose vectorised remainders
#: would otherwise compute some rows differently. Where the library fuses the step in one kernel that treats
#: every query row alike (``Backend.fuses_fixed_order``), the query blocks are the budget's and nothing is padded.
INVARIANT_CHUNKS = ChunkPlan(batch=1, q=32, kv=512)


@dataclass(frozen=True)
class Problem:
    """One attention call, checked and resolved, without its arrays: what planning reads. Built by
    ``_call.check_call`` (and ``check_options`` for the layer, whose arrays do not exist yet when it plans)."""

    be: Backend
    device: Any
    dtype: Any
    #: Of one block of work: the whole call, or one ``save_peak_mem_factor`` part of a layer call.
    sizes: Sizes
    scale: float
    workers: int
    #: Bytes of the attention's working set (``_budget``); ``divisor`` divides it (``save_peak_mem_factor``).
    budget: int
    divisor: int = 1
    q_chunk: int | None = None
    kv_chunk: int | None = None
    is_causal: bool = False
    dropout_p: float = 0.0
    #: The dropout seed, drawn when ``dropout_p > 0`` and none was given; None without dropout.
    seed: int | None = None
    masked: bool = False
    biased: bool = False
    with_lse: bool = False
    batch_invariant: bool = False
    q_lengths: tuple[int, ...] | None = None
    kv_lengths: tuple[int, ...] | None = None
    window: tuple[int, int] | None = None
    softcap: float | None = None
    #: What one key of one batch row costs when quantized keys and values are dequantized chunk by chunk
    #: (0 when they are not quantized): those chunks take at most half of a worker's share.
    dequantized_key_bytes: int = 0
    #: Plan the backward's tiles (more temporaries per score and per row than the forward's).
    backward: bool = False

    @property
    def limited(self) -> bool:
        """Whether some query may not see some key for a reason other than an explicit mask."""
        return _limited(self)


@dataclass(frozen=True)
class AttentionPlan:
    """One attention call, resolved: everything the chunk loops need besides the arrays and their backend."""

    scale: float
    chunks: ChunkPlan
    workers: int
    is_causal: bool = False
    dropout_p: float = 0.0
    #: Philox key ``(low, high)`` of the dropout seed; None without dropout.
    dropout_key: tuple[int, int] | None = None
    #: Key ranges per block computed on separate workers and merged by log-sum-exp (few blocks, many keys).
    key_splits: int = 1
    #: Also return the log-sum-exp ``[B, T, N]`` of each query row's logits.
    with_lse: bool = False
    #: Fixed key chunks and fixed-order products, no key splits: every row's result is bitwise the same whatever
    #: else is in the call.
    batch_invariant: bool = False
    #: Queries padded to whole tiles (``INVARIANT_CHUNKS``: the element-wise invariant step).
    query_tiles: bool = False
    #: Query and key lengths ``(T, S)`` of the whole problem: the default row lengths and the alignment
    #: (None: those of the arrays ``attend`` is given).
    extent: tuple[int, int] | None = None
    #: Per batch row (whole problem): the queries and keys that exist (None: all T, all S). Queries past a row's
    #: length give 0 (lse ``-inf``); keys past it are hidden, and key chunks wholly past it are skipped.
    q_lengths: tuple[int, ...] | None = None
    kv_lengths: tuple[int, ...] | None = None
    #: Sliding window ``(left, right)``: query t of row b sees keys ``p - left <= s <= p + right``,
    #: ``p = t + kv_len(b) - q_len(b)`` (bottom-right, as causal); None: no window. Key chunks outside every
    #: query's window are skipped.
    window: tuple[int, int] | None = None
    #: Logit soft-capping: logits (after the scale, before bias and masks) become ``c * tanh(logits / c)``.
    softcap: float | None = None

    @property
    def limited(self) -> bool:
        """Whether some query may not see some key for a reason other than an explicit mask."""
        return _limited(self)

    def row_lengths(self, b: int) -> tuple[int, int]:
        """``(queries, keys)`` of batch row ``b`` of the whole problem."""
        T, S = self.extent or (0, 0)
        return (T if self.q_lengths is None else self.q_lengths[b]), (
            S if self.kv_lengths is None else self.kv_lengths[b]
        )

    def key_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """``key_splits`` ranges of whole key chunks covering ``[start, end)`` (``start`` on the chunk grid; fewer
        ranges when there are fewer chunks)."""
        chunks = ceil_div(end - start, self.chunks.kv)
        per = ceil_div(chunks, max(1, min(self.key_splits, chunks))) * self.chunks.kv if chunks > 0 else 1
        return [(s0, min(end, s0 + per)) for s0 in range(start, end, per)] or [(start, start)]

    def blocks(self, batch: int, q_len: int) -> list[tuple[int, int, int, int]]:
        """The (batch rows, query rows) blocks ``(b0, b1, t0, t1)``, batch-major."""
        c = self.chunks
        return [(b0, min(batch, b0 + c.batch), t0, min(q_len, t0 + c.q))
                for b0 in range(0, batch, c.batch) for t0 in range(0, q_len, c.q)]


def _limited(p: Problem | AttentionPlan) -> bool:
    """Causal, a window or row lengths: some query may not see some key."""
    return p.is_causal or p.window is not None or p.q_lengths is not None or p.kv_lengths is not None


def dequantized_key_bytes(sizes: Sizes, itemsize: int, *, keys: bool, values: bool) -> int:
    """What one key of one batch row costs when quantized keys (and or values) are dequantized chunk by chunk: the
    cast and the scaled copy of its K heads, in q's dtype (``itemsize`` bytes). 0 when neither is quantized."""
    return 2 * sizes.kv_heads * itemsize * (keys * sizes.d_k + values * sizes.d_v)


def plan_attention(problem: Problem) -> AttentionPlan:
    """The plan of a checked call: block sizes from its budget (``plan_chunks``); with ``batch_invariant``, key
    chunks of ``INVARIANT_CHUNKS`` whatever the budget and chunk sizes say, and its query tiles unless the step
    runs fused (``_fused``); key splits when blocks are fewer than workers."""
    B, T, S = problem.sizes.batch, problem.sizes.q_len, problem.sizes.kv_len
    fused = problem.batch_invariant and _fused(problem)
    # Key chunks of the grid's 512. With row lengths the call's keys run as far as its longest row, so a row's
    # sums run over whole 512s even past them (-inf there: its bits do not depend on the other rows' lengths);
    # without, every row has all S keys, and a chunk of a shorter call is S wide.
    kv = INVARIANT_CHUNKS.kv if problem.kv_lengths is not None else min(INVARIANT_CHUNKS.kv, max(S, 1))
    chunks = plan_chunks(dataclasses.replace(problem, kv_chunk=kv) if fused else problem)
    if fused:
        chunks = ChunkPlan(batch=chunks.batch, q=chunks.q, kv=kv)
    elif problem.batch_invariant:
        rows = chunks.batch * chunks.q // INVARIANT_CHUNKS.q
        chunks = ChunkPlan(batch=max(1, min(B, rows)), q=INVARIANT_CHUNKS.q, kv=kv)
    seed = problem.seed if problem.dropout_p > 0 else None
    return AttentionPlan(
        scale=problem.scale, chunks=chunks, workers=problem.workers, is_causal=problem.is_causal,
        dropout_p=problem.dropout_p if seed is not None else 0.0,
        dropout_key=None if seed is None else (seed & 0xFFFFFFFF, seed >> 32),
        key_splits=1 if problem.batch_invariant else _key_splits(chunks, problem),
        with_lse=problem.with_lse, batch_invariant=problem.batch_invariant,
        query_tiles=problem.batch_invariant and not fused, extent=(T, S),
        q_lengths=problem.q_lengths, kv_lengths=problem.kv_lengths, window=problem.window, softcap=problem.softcap)


def _fused(problem: Problem) -> bool:
    """Whether the chunk step of ``problem`` runs as one fused fixed-order kernel (``_core._online_softmax_step``
    takes it without bias, dropout or soft-capping; the backward never does)."""
    return (problem.be.fuses_fixed_order(problem.dtype) and not problem.biased and problem.softcap is None
            and problem.dropout_p == 0 and not problem.backward)


def _key_splits(chunks: ChunkPlan, problem: Problem) -> int:
    """Split the keys when there are fewer (batch, query) blocks than workers, so that every worker has
    work (TabPFN's test rows over many training rows: a handful of queries, hundreds of thousands of keys)."""
    sizes, workers = problem.sizes, problem.workers
    blocks = ceil_div(max(sizes.batch, 1), chunks.batch) * ceil_div(max(sizes.q_len, 1), chunks.q)
    if workers <= 1 or blocks >= workers or not problem.be.item_assignment:
        return 1
    return max(1, min(workers // blocks, ceil_div(sizes.kv_len, chunks.kv)))


def _balanced(length: int, chunk: int) -> int:
    """The smallest chunk that covers ``length`` in as many pieces as ``chunk`` does (256 = 128 + 128,
    not 222 + 34): a short last piece costs a whole step's overhead for little work."""
    return ceil_div(length, ceil_div(length, chunk)) if chunk > 0 else chunk


def _costs(problem: Problem) -> tuple[int, int, int]:
    """Bytes per score element alive at once in one step, per (batch, query, head) row outside the tile, and per
    key of one batch row outside the tile.

    Forward (``_core._online_softmax_step``): the tile and one temporary (the exponentials where they cannot be
    taken in place), one more for a mask's ``where``, a bias sum or the dropout select, the boolean mask, and
    the dropout hash's 64-bit lanes (ten alive at its peak: ~80-90 bytes per score measured in float32,
    ``tests/test_budget.py``); per row the scaled q, the accumulator, its update, max and sum. Backward
    (``_backward._block``): the probabilities, dP, ``dP - D`` and dS, the same extras (and the dropout factor);
    per row the scaled q, dO, O, dq and its update, D and the log-sum-exp; per key the chunk's keys and values
    (copied for the products) and its dK and dV terms. Dequantized key chunks (``dequantized_key_bytes``) count
    per key too.
    """
    itemsize = problem.be.itemsize(problem.be.compute_dtype(problem.dtype))
    masked = problem.masked or problem.limited
    biased = problem.biased or problem.softcap is not None
    dropout = problem.dropout_p > 0
    H, V = problem.sizes.d_k, problem.sizes.d_v
    if problem.backward:
        per_score = itemsize * (4 + masked + biased + 2 * dropout) + masked + 80 * dropout
        per_key = 2 * problem.sizes.kv_heads * (H + V) * itemsize
        return per_score, (3 * H + 2 * V + 4) * itemsize, per_key + problem.dequantized_key_bytes
    per_score = itemsize * (2 + masked + biased + dropout) + masked + 80 * dropout
    return per_score, (H + 2 * V + 4) * itemsize, problem.dequantized_key_bytes


def _share(problem: Problem, per_score: int) -> int:
    """Each worker's share of the budget; ``divisor`` divides it, but on a CPU not below one cache-sized tile:
    smaller tiles would cost speed for memory the factor's batch split already saves."""
    share = max(1, problem.budget // max(1, problem.workers))
    if problem.divisor > 1:
        floor = min(share, TILE_ELEMENTS * per_score) if problem.be.is_cpu(problem.device) else 1
        share = max(share // problem.divisor, floor)
    return share


def plan_chunks(problem: Problem) -> ChunkPlan:
    """Block sizes whose working set fits the problem's budget.

    Each of ``workers`` concurrent blocks gets an equal share of the budget (``_share``). Within it, on a CPU, a
    block's score tile is kept near ``TILE_ELEMENTS`` (larger tiles fall out of the caches and run slower), and
    blocks are made small enough that every worker gets one. Few (batch x query) rows read longer key chunks, up
    to a tile of ``TILE_ELEMENTS`` scores on a CPU and ``ACCELERATOR_TILE_ELEMENTS`` on an accelerator. Explicit
    ``q_chunk`` / ``kv_chunk`` are taken as given, clipped to the lengths; the budget then sizes what is left,
    down to blocks of one batch row. What each key costs (``_costs``) takes at most half of a worker's share.
    """
    per_score, per_row, deq = _costs(problem)
    share = _share(problem, per_score)
    on_cpu = problem.be.is_cpu(problem.device)
    s = problem.sizes
    q_len, kv_len, batch, heads = max(s.q_len, 1), max(s.kv_len, 1), max(s.batch, 1), s.heads
    dequantized_keys = max(1, share // 2 // deq) if deq else kv_len
    kv_chunk = problem.kv_chunk
    if kv_chunk is None:
        # few queries in all: longer key chunks keep the tile near the target size (the budget still caps it)
        default = max(DEFAULT_KV_CHUNK if on_cpu else ACCELERATOR_KV_CHUNK,
                      (TILE_ELEMENTS if on_cpu else ACCELERATOR_TILE_ELEMENTS) // (heads * batch * q_len))
        fits = max(0, (share // heads - per_row) // per_score)
        kv_chunk = _balanced(kv_len, min(kv_len, default, fits, dequantized_keys))
    kv_chunk = min(kv_chunk, kv_len)
    rows = (share - min(share // 2, kv_chunk * deq)) // (heads * (kv_chunk * per_score + per_row))
    q_chunk = problem.q_chunk
    if q_chunk is None or kv_chunk < 1:
        if rows < 1 or kv_chunk < 1:
            _too_small(problem, per_score, per_row, deq)
        if on_cpu:
            rows = min(rows, max(1, TILE_ELEMENTS // (heads * kv_chunk)))
        per_worker = ceil_div(batch * q_len, max(1, problem.workers))
        if per_worker >= MIN_QUERY_ROWS_PER_WORKER:  # else one block, and the keys are split between the workers
            rows = min(rows, per_worker)
        q_chunk = _balanced(q_len, min(q_len, DEFAULT_Q_CHUNK if on_cpu else ACCELERATOR_Q_CHUNK, rows))
    q_chunk = min(q_chunk, q_len)
    batch_cap = dequantized_keys // max(1, kv_chunk) if deq else batch
    b_chunk = max(1, min(batch, rows // q_chunk, batch_cap)) if rows >= q_chunk else 1
    return ChunkPlan(batch=b_chunk, q=q_chunk, kv=kv_chunk)


def _too_small(problem: Problem, per_score: int, per_row: int, per_key: int) -> None:
    heads, workers = problem.sizes.heads, problem.workers
    keys = min(max(problem.sizes.kv_len, 1), problem.kv_chunk or 1)
    need = (heads * (keys * per_score + per_row) + keys * per_key) * max(1, workers)
    fix = "raise memory_budget" if problem.batch_invariant else "raise memory_budget or pass kv_chunk_size"
    msg = (f"memory_budget of {problem.budget} bytes is too small for one query row of {heads} heads "
           f"(needs at least {need} bytes with {workers} worker(s)); {fix}")
    raise ValueError(msg)
