"""Counter-based random numbers: Philox known answers in every lane dtype and on every backend, derived seeds,
uniform numbers."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import philox_by_the_book, require, uniform_by_the_book
from mha_cupy import _random as R
from mha_cupy._backends import resolve_backend, to_numpy

# Random123 tests/kat_vectors, philox4x32 10: counter, key, output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers_scalar(counter, key, expected):
    assert R.philox4x32_scalar(counter, key) == expected == philox_by_the_book(counter, key)


@pytest.mark.parametrize("lanes", ["uint64", "int64", "uint32"])
def test_philox_every_lane_dtype_gives_the_same_bits(lanes):
    rng = np.random.default_rng(0)
    counters = rng.integers(0, 2**32, size=(4, 64), dtype=np.uint64)
    key = (0xA4093822, 0x299F31D0)
    words = R.philox4x32(tuple(c.astype(lanes) for c in counters), key)
    expected = [philox_by_the_book(tuple(int(c[n]) for c in counters), key) for n in range(64)]
    for w in range(4):
        assert words[w].dtype == np.dtype(lanes)
        assert [int(x) for x in words[w]] == [e[w] for e in expected]


def test_philox_known_answers_on_every_backend(backend):
    lanes = backend.adapter.philox_lanes()
    cols = [backend.asarray(np.array([c[i] for c, _, _ in KAT], dtype=np.uint64)) for i in range(4)]
    cols = [backend.xp.astype(c, lanes) for c in cols]
    for row, (_, key, expected) in enumerate(KAT):
        words = R.philox4x32(tuple(c[row:row + 1] for c in cols), key)
        assert [int(to_numpy(w)[0]) for w in words] == list(expected)


def test_derive_seed_streams_differ():
    seeds = {R.derive_seed(5, 7, i) for i in range(100)} | {R.derive_seed(6, 7, 0)}
    assert len(seeds) == 101 and all(0 <= s < 2**64 for s in seeds)


def test_uniform_is_identical_across_backends(backend):
    for dtype, bits in (("float64", 53), ("float32", 24)):
        ref = uniform_by_the_book(9, 3, 20, bits).reshape(4, 5).astype(dtype)
        got = R.uniform(9, 3, (4, 5), backend.dtype(dtype), xp=backend.xp, device=backend.device)
        np.testing.assert_array_equal(to_numpy(got), ref)
        assert ref.min() >= 0 and ref.max() < 1


def test_uniform_distribution():
    stats = require("scipy.stats")
    u = np.asarray(R.uniform(1, 1, (20000,), np.float64, xp=resolve_backend("numpy").xp, device="cpu"))
    assert stats.kstest(u, "uniform").pvalue > 1e-3
