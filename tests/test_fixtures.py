"""The fixtures are real reference data, and our layer reproduces every case on every backend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_matches_reference
from mha_cupy._reference import replay_fixture

FIXTURES = Path(__file__).resolve().parent.parent / "mha_cupy" / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
CASES = {c["case_id"]: c for c in MANIFEST["cases"]}

# case_id: (seed, batch, q_len, kv_len, emsize, nhead, d_k, d_v) from the table
SEED_CASES = {
    "basic_self_attn_small": (42, 2, 4, 4, 32, 4, 8, 8),
    "cross_attention": (123, 1, 6, 8, 64, 4, 16, 16),
    "different_dk_dv": (456, 2, 4, 4, 48, 3, 12, 20),
    "kv_sharing": (789, 1, 4, 4, 64, 8, 8, 8),
    "with_caching": (101112, 1, 6, 6, 32, 4, 8, 8),
    "use_cached_kv": (131415, 1, 4, 4, 32, 2, 16, 16),
    "streaming": (161718, 1, 8, 8, 48, 4, 12, 12),
    "large_batch_dropout": (192021, 4, 3, 3, 64, 8, 8, 8),
}


def load(case_id: str) -> dict:
    with np.load(FIXTURES / CASES[case_id]["filename"]) as npz:
        return {k: npz[k] for k in npz.files}


def test_manifest_generated_by_tabpfn():
    assert MANIFEST["generator"] == "fixtures/generate.py"
    assert MANIFEST["reference"].startswith("tabpfn 2.2.1")


@pytest.mark.parametrize("case_id", sorted(SEED_CASES))
def test_seed_cases_present_with_their_configs(case_id):
    seed, B, Lq, Lkv, E, H, dk, dv = SEED_CASES[case_id]
    for cid in (case_id, f"{case_id}_float32"):
        c = CASES[cid]
        cfg = c["config"]
        assert c["seed"] == seed
        assert (cfg["batch"], cfg["q_len"], cfg["kv_len"], cfg["emsize"], cfg["nhead"], cfg["d_k"], cfg["d_v"]) == (
            B, Lq, Lkv, E, H, dk, dv)
        for field in ("case_id", "filename", "seed", "dtype", "config", "input_keys", "weight_keys", "output_keys",
                      "cache_keys"):
            assert field in c
    assert CASES["kv_sharing"]["config"]["share_kv_across_n_heads"] == 2
    assert set(CASES["kv_sharing"]["weight_keys"]) == {"w_q", "w_kv", "w_out"}
    assert set(CASES["different_dk_dv"]["weight_keys"]) == {"w_q", "w_k", "w_v", "w_out"}
    assert CASES["large_batch_dropout"]["config"]["dropout_p"] == 0.1
    assert CASES["streaming"]["config"]["chunk_size"] == 4
    assert load("use_cached_kv")["x_new_query"].shape == (1, 2, 32)


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_fixture_arrays_are_not_constant(case_id):
    for key, arr in load(case_id).items():
        assert arr.size <= 1 or not np.all(arr == arr.flat[0]), f"{case_id}:{key} is constant"
        assert np.all(np.isfinite(arr)), f"{case_id}:{key} has non-finite values"


def test_every_option_has_a_fixture():
    used = set()
    for c in CASES.values():
        used.update(k for k, v in c["config"].items() if v not in (None, False))
    for option in ("add_input", "save_peak_mem_factor", "reuse_first_head_kv", "only_cache_first_head_kv",
                   "precomputed", "softmax_scale", "state_dict_conversion", "share_kv_across_n_heads", "x_kv",
                   "leading_shape", "dropout_p", "chunk_size", "new_query_len"):
        assert option in used, option
    assert {c["config"]["cache_scenario"] for c in CASES.values()} == {"none", "cache_kv", "use_cached", "streaming"}


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_replay_matches_reference(case_id, backend):
    entry = CASES[case_id]
    data = load(case_id)
    ours = replay_fixture(entry, data, xp=backend.xp, device=backend.device)
    dtype = backend.dtype(entry["dtype"])
    keys = entry["output_keys"] + entry["cache_keys"]
    assert keys and set(keys) <= set(ours)
    for key in keys:
        assert_matches_reference(ours[key], data[key], xp=backend.xp, dtype=dtype, device=backend.device, what=f"{case_id}:{key}")


def test_replay_does_not_modify_inputs_without_allow_inplace():
    entry = CASES["add_input"]
    data = load("add_input")
    before = data["x"].copy()
    replay_fixture(entry, data)
    np.testing.assert_array_equal(data["x"], before)
