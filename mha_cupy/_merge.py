"""Merging attention over disjoint key sets by log-sum-exp, and the max that treats "nothing seen" as 0.

Letters as in ``mha_cupy.attention``. A partial result over some keys is its normalised
output ``out [..., V]`` and log-sum-exp ``lse [...]`` (``-inf`` where the row saw
no key). Over the union of the key sets:
``lse = log sum_i exp(lse_i)``, ``out = sum_i exp(lse_i - lse) out_i``; rows no
part saw give ``out = 0``, ``lse = -inf``. Exact up to rounding, and the same
bits for the same parts in the same order (xformers' ``merge_attentions``).
"""

from __future__ import annotations

import math
from typing import Any
from collections.abc import Sequence

__all__ = ["merge_partials", "safe_max"]


def safe_max(m: Any, *, xp: Any) -> Any:
    """``m`` with 0 where it is infinite: the shift for rows that have seen no key yet (``m = -inf``)."""
    return xp.where(xp.isinf(m), xp.zeros_like(m), m)


def merge_partials(outs: Sequence[Any], lses: Sequence[Any], *, xp: Any,
                   bases: Sequence[Any] | None = None) -> tuple[Any, Any]:
    """``(out, lse)`` of the union of disjoint key sets from their parts ``outs [..., V]``, ``lses [...]``.

    With ``bases``, part i's log-sum-exp is ``bases[i] + lses[i]`` (a running max and the log of its sum, as the
    chunk loop keeps them): the weights then come from differences of the maxima, exact, where rounding a
    large log-sum-exp first would cost up to ulp(|lse|) of each weight.
    """
    tops = lses if bases is None else bases
    if len(outs) == 1:
        return outs[0], tops[0] if bases is None else _lse(bases[0], lses[0], xp=xp)
    m = tops[0]
    for top in tops[1:]:
        m = xp.maximum(m, top)
    shift = safe_max(m, xp=xp)
    total, acc = None, None
    for i, out in enumerate(outs):
        w = xp.exp(tops[i] - shift) if bases is None else xp.exp((bases[i] - shift) + lses[i])
        total = w if total is None else total + w
        acc = out * w[..., None] if acc is None else acc + out * w[..., None]
    empty = total == 0
    denom = xp.where(empty, xp.ones_like(total), total)
    return acc / denom[..., None], xp.where(empty, xp.full_like(m, -math.inf), shift + xp.log(denom))


def _lse(base: Any, rest: Any, *, xp: Any) -> Any:
    """``base + rest``, ``-inf`` where the row saw no key (``base = -inf``)."""
    return xp.where(xp.isinf(base), base, base + rest)
