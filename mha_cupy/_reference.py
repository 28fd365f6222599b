"""The reference harness: TabPFN 2.2.1's layer built beside ours, and the fixtures replayed.

Test and command-line tooling, not runtime code: imported by ``mha_cupy.cli``
and the tests only. The reference needs ``pip install ".[reference]"``
(torch 2.13.0, tabpfn 2.2.1); it is imported only when asked for.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from pathlib import Path
from typing import Any

import numpy

from ._backends import convert, dtype_name, resolve_backend, to_numpy
from .module import MultiHeadAttention
from .testing import scaled_error, tolerance
from .weights import WEIGHT_NAMES, convert_torch_nn_multihead_attention_state_dict

__all__ = [
    "packaged_fixtures",
    "load_npz",
    "reference_layer",
    "reference_weights",
    "layer_like",
    "replay_fixture",
    "verify_fixtures",
]



def packaged_fixtures() -> Path:
    """The folder of reference fixtures installed with the package (``manifest.json`` and one ``.npz`` per case)."""
    return Path(str(importlib.resources.files("mha_cupy") / "fixtures"))


def load_npz(path: Any) -> dict[str, numpy.ndarray]:
    """All arrays of an ``.npz`` file, read into host memory."""
    with numpy.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def _reference_imports() -> tuple[Any, Any, Any]:
    # tabpfn 2.2.1 pins scikit-learn < 1.7, whose array-API check fails when
    # array-api-compat is installed unless SciPy's array API support is on.
    os.environ.setdefault("SCIPY_ARRAY_API", "1")
    import torch
    from tabpfn.architectures.base.attention.full_attention import MultiHeadAttention as Ref
    from tabpfn.architectures.base.config import ModelConfig

    return torch, Ref, ModelConfig


def reference_layer(*, emsize: int, nhead: int, init_gain: float = 1.0, precomputed_kv: Any = None,
                    dtype: str = "float64", seed: int = 0, **layer: Any) -> Any:
    """TabPFN 2.2.1's ``MultiHeadAttention`` on the CPU, its weights initialised by itself under
    ``torch.manual_seed(seed)``.

    ``layer``: the reference's own keywords (``d_k``, ``d_v``, ``share_kv_across_n_heads``, ``dropout_p``,
    ``softmax_scale``, ``initialize_output_to_zero``), which ours share."""
    torch, Ref, ModelConfig = _reference_imports()
    torch.manual_seed(seed)
    # max_num_classes and num_buckets are required by the config but unused by attention.
    config = ModelConfig(emsize=emsize, nhead=nhead, attention_init_gain=init_gain, max_num_classes=10, num_buckets=100)
    pre = None if precomputed_kv is None else torch.as_tensor(to_numpy(precomputed_kv))
    return Ref(device=None, dtype=getattr(torch, dtype), config=config, precomputed_kv=pre, **layer)


def reference_weights(ref: Any) -> dict[str, Any]:
    """The reference layer's weights as NumPy arrays, by attribute name (absent ones left out)."""
    return {n: to_numpy(getattr(ref, n)).copy() for n in WEIGHT_NAMES if getattr(ref, n) is not None}


def layer_like(ref: Any, *, xp: Any = None, device: Any = None, seed: int = 0) -> Any:
    """Our ``MultiHeadAttention`` with the reference layer's configuration and weights, in namespace ``xp``."""
    target = resolve_backend(xp)
    dtype = dtype_name(ref.w_out.dtype)
    # Only a layer without key/value weights was built on precomputed keys/values.
    precomputed = ref._kv_cache is not None and all(getattr(ref, n) is None for n in ("w_qkv", "w_kv", "w_k"))
    pre = convert(to_numpy(ref._kv_cache), target, device) if precomputed else None
    layer = MultiHeadAttention(
        emsize=ref._input_size, nhead=ref._nhead, d_k=ref._d_k, d_v=ref._d_v,
        share_kv_across_n_heads=ref._nhead // ref._nhead_kv, dropout_p=ref.dropout_p,
        softmax_scale=ref.softmax_scale, precomputed_kv=pre, dtype=dtype, xp=target.xp, device=device, seed=seed,
    )
    weights = {n: convert(a, target, device) for n, a in reference_weights(ref).items()}
    layer.set_parameters(precomputed_kv=pre, **weights)
    return layer


class _Replay:
    """One fixture case being recomputed: its data on the target backend, our layer, and our results so far."""

    def __init__(self, entry: dict, data: dict, target: Any, device: Any) -> None:
        self.entry, self.data, self.target, self.device = entry, data, target, device
        self.cfg = cfg = entry["config"]
        self.pre = self.arr("precomputed_kv") if cfg.get("precomputed") == "kv" else None
        self.layer = MultiHeadAttention(
            emsize=cfg["emsize"], nhead=cfg["nhead"], d_k=cfg["d_k"], d_v=cfg["d_v"],
            share_kv_across_n_heads=cfg["share_kv_across_n_heads"], dropout_p=cfg["dropout_p"],
            softmax_scale=cfg.get("softmax_scale"), precomputed_kv=self.pre, dtype=entry["dtype"], xp=target.xp,
            device=device, seed=entry["seed"],
        )
        if cfg.get("state_dict_conversion"):
            sd = {"in_proj_weight": self.arr("in_proj_weight"), "out_proj.weight": self.arr("out_proj_weight")}
            weights = convert_torch_nn_multihead_attention_state_dict(sd, cfg["nhead"])
        else:
            weights = {k: self.arr(k) for k in entry["weight_keys"]}
        self.layer.set_parameters(precomputed_kv=self.pre, **weights)
        self.x = self.arr("x")
        self.x_kv = self.arr("x_kv") if "x_kv" in data else None
        self.call = {k: cfg[k] for k in ("add_input", "allow_inplace", "save_peak_mem_factor", "reuse_first_head_kv")
                     if k in cfg}
        self.ours: dict[str, Any] = {}

    def arr(self, key: str) -> Any:
        return convert(self.data[key], self.target, self.device)

    def caches(self, kv_name: str) -> None:
        layer = self.layer
        if layer.kv_cache is not None:
            self.ours[kv_name] = layer.kv_cache
        else:
            self.ours["k_cache"], self.ours["v_cache"] = layer.k_cache, layer.v_cache

    def no_cache(self) -> None:
        layer, ours = self.layer, self.ours
        if self.pre is not None:
            ours["output"] = layer(self.x, use_cached_kv=True, **self.call)
        else:
            ours["output"] = layer(self.target.xp.asarray(self.x, copy=True), self.x_kv, **self.call)
        if "output_torch_nn" in self.entry["output_keys"]:
            ours["output_torch_nn"] = ours["output"]

    def cached(self, scenario: str) -> None:
        # Self-attention caches directly here (the reference needed a copy of x as x_kv).
        layer, ours = self.layer, self.ours
        only = self.cfg.get("only_cache_first_head_kv", False)
        ours["output_with_cache"] = layer(self.x, self.x_kv, cache_kv=True, only_cache_first_head_kv=only)
        if scenario == "cache_kv":
            self.caches("kv_cache")
            ours["output"] = layer(self.x, self.x_kv)
        else:
            self.caches("kv_cache_used")
            ours["output_with_cached_kv"] = layer(self.arr("x_new_query"), use_cached_kv=True)

    def streaming(self) -> None:
        n = 1
        while f"x_chunk{n}" in self.data:
            self.ours[f"output_chunk{n}"] = self.layer(self.arr(f"x_chunk{n}"), self.x)
            n += 1
        self.ours["output_full_reference"] = self.layer(self.x)


#: What each fixture ``cache_scenario`` calls.
_SCENARIOS = {
    "none": _Replay.no_cache,
    "cache_kv": lambda replay: replay.cached("cache_kv"),
    "use_cached": lambda replay: replay.cached("use_cached"),
    "streaming": _Replay.streaming,
}


def replay_fixture(entry: dict, data: dict, *, xp: Any = None, device: Any = None) -> dict[str, Any]:
    """Recompute a fixture case with our layer from its manifest ``entry`` and npz ``data``.

    Returns our arrays (in namespace ``xp``) under the case's output and cache keys.
    """
    scenario = entry["config"]["cache_scenario"]
    if scenario not in _SCENARIOS:
        msg = f"unknown cache_scenario {scenario!r} in case {entry['case_id']}"
        raise ValueError(msg)
    replay = _Replay(entry, data, resolve_backend(xp), device)
    _SCENARIOS[scenario](replay)
    return replay.ours


def verify_fixtures(directory: Any, *, xp: Any = None, device: Any = None) -> list[dict[str, Any]]:
    """Replay every case of ``directory/manifest.json``; one row per compared array.

    Rows: ``case_id, key, dtype, error, tolerance, ok``.
    """
    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    rows = []
    for entry in manifest["cases"]:
        data = load_npz(directory / entry["filename"])
        ours = replay_fixture(entry, data, xp=xp, device=device)
        for key in entry["output_keys"] + entry["cache_keys"]:
            err = scaled_error(ours[key], data[key])
            tol = tolerance(entry["dtype"])
            rows.append({"case_id": entry["case_id"], "key": key, "dtype": entry["dtype"],
                         "error": err, "tolerance": tol, "ok": err <= tol})
    return rows
