"""Zero-copy strided views."""

from __future__ import annotations

from typing import Any

from ._backends import backend_of
from ._validation import check_array, check_positive_int, keyword_hints, shape_str

__all__ = ["broadcast_kv_across_heads"]


@keyword_hints
def broadcast_kv_across_heads(kv: Any, n: int) -> Any:
    """View each key/value head as ``n`` heads, without copying.

    Parameters
    ----------
    kv : array, shape ``[..., K, H]``
        Keys or values with ``K`` heads of size ``H``.
    n : int
        How many query heads share each key/value head (``G = N // K``).

    Returns
    -------
    array, shape ``[..., K, n, H]``
        A broadcast view of ``kv``: the new axis has stride zero wherever the
        library keeps broadcasts as views (NumPy, CuPy, PyTorch). Head
        ``k * n + g`` of a flattened ``[..., K * n, H]`` layout is kv head
        ``k``, the grouping TabPFN and ``torch`` (``enable_gqa``) use.
        Reshaping the result to ``[..., K * n, H]`` would copy; the attention
        core never does that, it folds the ``n`` query heads into GEMM rows.

    Examples
    --------
    >>> import numpy as np
    >>> from mha_cupy import broadcast_kv_across_heads
    >>> kv = np.zeros((2, 128, 2, 16), dtype=np.float32)      # [B, S, K, H]
    >>> view = broadcast_kv_across_heads(kv, 4)
    >>> view.shape, view.strides[-2], np.shares_memory(view, kv)
    ((2, 128, 2, 4, 16), 0, True)
    """
    check_array(kv, "kv")
    xp = backend_of(kv, names=("kv",)).xp
    n = check_positive_int(n, "n")
    if kv.ndim < 2:
        msg = f"kv must have at least 2 dimensions [..., kv_heads, d], got shape {shape_str(kv.shape)}"
        raise ValueError(msg)
    shape = (*kv.shape[:-1], n, kv.shape[-1])
    if n >= 2**63:  # every library's sizes are 64-bit: refused here, before the library's own error hides n
        msg = f"n={n} asks for a view of shape {shape_str(shape)}; n must be below 2**63 (sizes are 64-bit integers)"
        raise ValueError(msg)
    try:
        return xp.broadcast_to(xp.expand_dims(kv, axis=-2), shape)
    except (ValueError, RuntimeError, OverflowError, TypeError) as exc:  # the library's limit on a view's size
        library = type(kv).__module__.split(".")[0]
        msg = f"n={n} asks for a view of shape {shape_str(shape)}, which {library} refuses ({exc})"
        raise ValueError(msg) from None
