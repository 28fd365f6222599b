"""Memory budgets and the chunk sizes they allow.

One budget bounds the working set of the attention loop of one call: the
score tiles and their temporaries plus the per-row accumulators of the blocks
in flight. Inputs, the output and the projections are not counted. Unless set
with ``set_memory_budget``, each device has its own default (the library
adapter's ``default_memory_budget``: 32 MiB on CPUs, a share of the free memory
on accelerators).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ._backends import Backend, resolve_backend
from ._validation import check_positive_int, keyword_hints

__all__ = [
    "ACCELERATOR_KV_CHUNK",
    "ACCELERATOR_Q_CHUNK",
    "ACCELERATOR_TILE_ELEMENTS",
    "DEFAULT_KV_CHUNK",
    "DEFAULT_Q_CHUNK",
    "MIN_QUERY_ROWS_PER_WORKER",
    "TILE_ELEMENTS",
    "ChunkPlan",
    "get_memory_budget",
    "set_memory_budget",
    "parse_memory_budget",
    "resolve_memory_budget",
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
#: (``_core``), so that K and V are read once in all rather than once per worker.
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

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")

#: Set by ``set_memory_budget``; None: each device's default.
_budget_override: int | None = None


def parse_memory_budget(value: Any, name: str = "memory_budget") -> int:
    """Bytes from an integral scalar or a string such as ``"256MB"`` (10**6) or ``"32MiB"`` (2**20)."""
    if not isinstance(value, str):
        return check_positive_int(value, name)
    match = _BUDGET_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        msg = f"{name} must look like '256MB', '64MiB' or '1GB' (units {sorted(u for u in _UNITS if u)}), got {value!r}"
        raise ValueError(msg)
    amount = float(match.group(1)) * _UNITS[unit]
    if not 1 <= amount < 2**63:
        msg = f"{name} must be between 1 byte and 2**63 bytes, got {value!r}"
        raise ValueError(msg)
    return int(amount)


def resolve_memory_budget(value: Any, *, be: Backend, device: Any) -> int:
    """Bytes of one call's budget: ``value`` if given, else the set default, else the device's default."""
    if value is not None:
        return parse_memory_budget(value)
    if _budget_override is not None:
        return _budget_override
    return be.default_memory_budget(device)


@keyword_hints
def get_memory_budget(xp: Any = None, device: Any = None) -> int:
    """The budget in bytes that a call on ``xp`` (default NumPy) and ``device`` uses when it names none.

    That is the value given to ``set_memory_budget`` if any, else the device's
    default: 32 MiB on CPUs, a quarter of the free memory on accelerators.
    """
    be = resolve_backend(xp)
    return resolve_memory_budget(None, be=be, device=be.default_device() if device is None else device)


@keyword_hints
def set_memory_budget(value: int | str | None) -> int | None:
    """Set the budget of every later call that names none, on every device; ``None`` restores the
    per-device defaults. Returns the previous setting (None when the defaults were in force)."""
    global _budget_override
    previous = _budget_override
    _budget_override = None if value is None else parse_memory_budget(value)
    return previous


def _balanced(length: int, chunk: int) -> int:
    """The smallest chunk that covers ``length`` in as many pieces as ``chunk`` does (256 = 128 + 128,
    not 222 + 34): a short last piece costs a whole step's overhead for little work."""
    return -(-length // -(-length // chunk)) if chunk > 0 else chunk


@dataclass(frozen=True)
class ChunkPlan:
    """Block sizes of the attention loop: batch rows, query rows, key rows."""

    batch: int
    q: int
    kv: int


def plan_chunks(
    *,
    batch: int,
    q_len: int,
    kv_len: int,
    heads: int,
    d_k: int,
    d_v: int,
    compute_itemsize: int,
    dropout: bool,
    masked: bool,
    budget: int,
    biased: bool = False,
    q_chunk: int | None = None,
    kv_chunk: int | None = None,
    workers: int = 1,
    on_cpu: bool = True,
    divisor: int = 1,
    dequantized_key_bytes: int = 0,
) -> ChunkPlan:
    """Choose block sizes whose working set fits ``budget`` bytes.

    Each of ``workers`` concurrent blocks gets an equal share of the budget.
    Within it, on a CPU, a block's score tile is kept near ``TILE_ELEMENTS``
    (larger tiles fall out of the caches and run slower), and blocks are made
    small enough that every worker gets one. Few (batch x query) rows read
    longer key chunks, up to a tile of ``TILE_ELEMENTS`` scores on a CPU and
    ``ACCELERATOR_TILE_ELEMENTS`` on an accelerator. Explicit ``q_chunk`` /
    ``kv_chunk`` (validated by the caller) are taken as given, clipped to the
    lengths; the budget then sizes what is left, down to blocks of one batch row.
    ``divisor`` (``save_peak_mem_factor``) divides each worker's share, but on a
    CPU not below one cache-sized tile: smaller tiles would cost speed for
    memory the factor's batch split already saves. ``dequantized_key_bytes``
    is what one key of one batch row costs when quantized keys and values are
    dequantized chunk by chunk (0 when they are not quantized): those chunks
    take at most half of a worker's share.
    """
    explicit_kv = kv_chunk

    # Bytes per score element alive at once in one step (``_core._online_softmax_step``): the tile and
    # one temporary (the exponentials where they cannot be taken in place), one more for a mask's
    # ``where``, a bias sum or the dropout select, the boolean mask, and the dropout hash's 64-bit lanes
    # (ten alive at its peak: ~80-90 bytes per score measured in float32, `test_working_set_stays_within_the_budget`).
    per_score = compute_itemsize * (2 + masked + biased + dropout) + masked + 80 * dropout
    # Bytes per (batch, query, head) row outside the tile: scaled q, accumulator, its update, max and sum.
    per_row = (d_k + 2 * d_v + 4) * compute_itemsize
    share = max(1, budget // max(1, workers))
    if divisor > 1:
        floor = min(share, TILE_ELEMENTS * per_score) if on_cpu else 1
        share = max(share // divisor, floor)

    q_len, kv_len, batch = max(q_len, 1), max(kv_len, 1), max(batch, 1)
    dequantized_keys = max(1, share // 2 // dequantized_key_bytes) if dequantized_key_bytes else kv_len
    if kv_chunk is None:
        # few queries in all: longer key chunks keep the tile near the target size (the budget still caps it)
        default = max(DEFAULT_KV_CHUNK if on_cpu else ACCELERATOR_KV_CHUNK,
                      (TILE_ELEMENTS if on_cpu else ACCELERATOR_TILE_ELEMENTS) // (heads * batch * q_len))
        fits = max(0, (share // heads - per_row) // per_score)
        kv_chunk = _balanced(kv_len, min(kv_len, default, fits, dequantized_keys))
    kv_chunk = min(kv_chunk, kv_len)
    row_bytes = heads * (kv_chunk * per_score + per_row)
    rows = (share - min(share // 2, kv_chunk * dequantized_key_bytes)) // row_bytes
    if q_chunk is None or kv_chunk < 1:
        if rows < 1 or kv_chunk < 1:
            need = heads * (min(kv_len, explicit_kv or 1) * per_score + per_row) * max(1, workers)
            msg = (
                f"memory_budget of {budget} bytes is too small for one query row of {heads} heads "
                f"(needs at least {need} bytes with {workers} worker(s)); raise memory_budget or pass kv_chunk_size"
            )
            raise ValueError(msg)
        if on_cpu:
            rows = min(rows, max(1, TILE_ELEMENTS // (heads * kv_chunk)))
        per_worker = -(-batch * q_len // max(1, workers))
        if per_worker >= MIN_QUERY_ROWS_PER_WORKER:  # else one block, and the keys are split between the workers
            rows = min(rows, per_worker)
        q_chunk = _balanced(q_len, min(q_len, DEFAULT_Q_CHUNK if on_cpu else ACCELERATOR_Q_CHUNK, rows))
    q_chunk = min(q_chunk, q_len)
    batch_cap = dequantized_keys // max(1, kv_chunk) if dequantized_key_bytes else batch
    b_chunk = max(1, min(batch, rows // q_chunk, batch_cap)) if rows >= q_chunk else 1
    return ChunkPlan(batch=b_chunk, q=q_chunk, kv=kv_chunk)
