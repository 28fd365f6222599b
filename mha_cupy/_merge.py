"""Merging attention over disjoint key sets by log-sum-exp, and the max that treats "nothing seen" as 0.

Letters as in ``_core``. A partial result over some keys is its normalised
output ``out [..., V]`` and log-sum-exp ``lse [...]`` (``-inf`` where the row saw
no key). Over the union of the key sets:
``lse = log sum_i exp(lse_i)``, ``out = sum_i exp(lse_i - lse) out_i``; rows no
part saw give ``out = 0``, ``lse = -inf``. Exact up to rounding, and the same
bits for the same parts in the same order (xformers' ``merge_attentions``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["merge_partials", "safe_max"]


def safe_max(m: Any, *, xp: Any) -> Any:
    """``m`` with 0 where it is infinite: the shift for rows that have seen no key yet (``m = -inf``)."""
    return xp.where(xp.isinf(m), xp.zeros_like(m), m)


def merge_partials(outs: Sequence[Any], lses: Sequence[Any], *, xp: Any) -> tuple[Any, Any]:
    """``(out, lse)`` of the union of disjoint key sets from their parts ``outs [..., V]``, ``lses [...]``."""
    if len(outs) == 1:
        return outs[0], lses[0]
    m = lses[0]
    for lse in lses[1:]:
        m = xp.maximum(m, lse)
    shift = safe_max(m, xp=xp)
    total, acc = None, None
    for out, lse in zip(outs, lses):
        w = xp.exp(lse - shift)
        total = w if total is None else total + w
        acc = out * w[..., None] if acc is None else acc + out * w[..., None]
    empty = total == 0
    denom = xp.where(empty, xp.ones_like(total), total)
    return acc / denom[..., None], xp.where(empty, xp.full_like(m, -math.inf), shift + xp.log(denom))
