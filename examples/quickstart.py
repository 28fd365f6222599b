"""Quickstart
==========

Quickstart: TabPFN's attention on NumPy, checked against a fixture made by tabpfn 2.2.1.

Run: ``python examples/quickstart.py`` (the fixtures ship with the package, so any directory works).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import mha_cupy
from _needs import command_line, finish
from mha_cupy.testing import assert_close

FIXTURES = Path(mha_cupy.__file__).parent / "fixtures"  # installed with the package


def main() -> int:
    command_line(__doc__, quick="accepted like every example's; this one is small already").parse_args()
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    case = next(c for c in manifest["cases"] if c["case_id"] == "basic_self_attn_small")
    cfg = case["config"]
    data = np.load(FIXTURES / case["filename"])

    # A layer with the reference's configuration, in float64 on NumPy ...
    layer = mha_cupy.MultiHeadAttention(emsize=cfg["emsize"], nhead=cfg["nhead"], d_k=cfg["d_k"], d_v=cfg["d_v"],
                                        dtype=case["dtype"], xp="numpy", seed=0)
    # ... carrying the weights the reference initialised itself.
    layer.set_parameters(**{k: data[k] for k in case["weight_keys"]})

    out = layer(data["x"])
    err = assert_close(out, data["output"], what="basic_self_attn_small")
    print(f"layer output {out.shape} {out.dtype}: scaled max error vs tabpfn {err:.2e} (tolerance 1e-10)")

    # The same numbers at any chunking: the core never holds more than one score tile.
    tiny = layer(data["x"], q_chunk_size=1, kv_chunk_size=1)
    err_chunked = assert_close(tiny, data["output"], what="chunked")
    print(f"with 1x1 chunks: scaled max error vs tabpfn {err_chunked:.2e}")

    # The functional core: grouped heads (8 query heads on 2 kv heads), causal.
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 6, 8, 4))
    k = rng.standard_normal((1, 6, 2, 4))
    v = rng.standard_normal((1, 6, 2, 4))
    y = mha_cupy.scaled_dot_product_attention(q, k, v, is_causal=True)
    print(f"scaled_dot_product_attention: q {q.shape}, k/v {k.shape} -> {y.shape}")
    print("OK")
    return 0


if __name__ == "__main__":
    finish(main())
