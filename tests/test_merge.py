"""The log-sum-exp merge of partial results over disjoint key sets, against a direct float64 attention over the
union, on every backend."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest

from helpers import naive_attention, naive_lse
from mha_cupy._merge import merge_partials, safe_max
from mha_cupy.testing import assert_close


@pytest.mark.parametrize("cuts", [(0, 9), (0, 4, 9), (0, 1, 5, 9)], ids=str)
def test_merge_equals_attention_over_the_union(backend, cuts):
    rng = np.random.default_rng(len(cuts))
    q, k, v = (rng.standard_normal(s) for s in ((2, 5, 4, 3), (2, 9, 2, 3), (2, 9, 2, 6)))
    mask = rng.random((2, 5, 1, 9)) > 0.4
    mask[0, 0] = False  # a row that sees no key at all
    mask[1, :, :, 0:1] = False  # the first part sees nothing in batch row 1 when it is key 0 alone
    parts = [(naive_attention(q, k[:, a:b], v[:, a:b], mask=mask[..., a:b]), naive_lse(q, k[:, a:b], mask=mask[..., a:b]))
             for a, b in zip(cuts, cuts[1:])]
    xp = backend.xp
    out, lse = merge_partials([backend.asarray(o) for o, _ in parts], [backend.asarray(s) for _, s in parts], xp=xp)
    assert_close(out, backend.asarray(naive_attention(q, k, v, mask=mask)), rtol=1e-12)
    want = naive_lse(q, k, mask=mask)
    assert np.array_equal(np.isneginf(np.asarray(backend.adapter.to_numpy(lse))), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(np.asarray(backend.adapter.to_numpy(lse))[finite], want[finite], rtol=0, atol=1e-12)


def test_safe_max_takes_no_key_seen_as_zero():
    m = np.array([-np.inf, 2.0, np.inf, -3.0])
    np.testing.assert_array_equal(safe_max(m, xp=array_api_compat.array_namespace(m)), [0.0, 2.0, 0.0, -3.0])
