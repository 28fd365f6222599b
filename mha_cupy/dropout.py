"""Dropout's keep decisions: attention weight (batch ``b``, head ``h``, query ``i``, key ``j``) draws Philox
counter ``(j, i, h, b)`` under the call's seed and is kept when the first output word is at least
``round(p * 2**32)``, so the mask is the same on every library and at every chunking (``_random``).
"""

from __future__ import annotations

from typing import Any

import array_api_compat

from ._random import MASK32, philox4x32, split_seed
from ._validation import check_probability, check_seed

__all__ = ["keep_threshold", "keep_mask", "keep_decision"]


def keep_threshold(p: float) -> int:
    """The 32-bit threshold below which a weight is dropped with probability ``p``."""
    return min(round(p * 2**32), 2**32)


def keep_mask(seed: int, p: float, b: Any, h: Any, i: Any, j: Any) -> Any:
    """Boolean keep mask for dropout with probability ``p`` under ``seed``.

    ``b, h, i, j`` are index arrays (batch, head, query, key) of one Philox lane
    dtype that broadcast to the mask's shape; the result is True where the
    weight is kept.
    """
    return keep_decision(
        b, h, i, j, key=split_seed(check_seed(seed)), threshold=keep_threshold(check_probability(p, "p"))
    )


def keep_decision(b: Any, h: Any, i: Any, j: Any, *, key: tuple[int, int], threshold: int) -> Any:
    """``keep_mask`` from an already split key and threshold (the attention loop computes those once per call)."""
    w0, _, _, _ = philox4x32((j, i, h, b), key)
    xp = array_api_compat.array_namespace(w0)
    if threshold > MASK32:  # p == 1: no 32-bit word reaches 2**32
        return xp.zeros(w0.shape, dtype=xp.bool, device=array_api_compat.device(w0))
    return w0 >= xp.asarray(threshold, dtype=w0.dtype, device=array_api_compat.device(w0))
