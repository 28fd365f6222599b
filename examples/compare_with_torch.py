"""torch and tabpfn layers loaded into ours
========================================

Load a ``torch.nn.MultiheadAttention`` and a tabpfn 2.2.1 layer into ours, and compare the outputs.

Run: ``python examples/compare_with_torch.py [--quick]`` (needs ``pip install ".[reference]"``).
The torch module's state dict converts with
``convert_torch_nn_multihead_attention_state_dict``; a tabpfn layer's weights
are already in our layout (``w_qkv [3, N, H, E]``, ``w_out [N, V, E]``).

The documentation site shows this script without running it: tabpfn 2.2.1 cannot share the site's environment
with the tabpfn 9 of the TabPFN example. The tests run it.
"""

from __future__ import annotations

import os

import numpy as np

import mha_cupy
from _needs import command_line, finish, require


def from_torch_nn(x: np.ndarray) -> mha_cupy.Comparison:
    import torch

    torch.manual_seed(0)
    nn = torch.nn.MultiheadAttention(64, 4, bias=False, batch_first=True, dtype=torch.float64)
    ours = mha_cupy.MultiHeadAttention(emsize=64, nhead=4, d_k=16, d_v=16, dtype="float64")
    ours.set_parameters(**mha_cupy.convert_torch_nn_multihead_attention_state_dict(nn.state_dict(), 4, xp="numpy"))
    with torch.no_grad():
        expected = nn(*[torch.from_numpy(x)] * 3, need_weights=False)[0]
    return mha_cupy.compare(ours(x), expected)


def from_tabpfn(x: np.ndarray) -> mha_cupy.Comparison:
    os.environ.setdefault("SCIPY_ARRAY_API", "1")  # tabpfn 2.2.1's scikit-learn pin needs it beside array-api-compat
    import torch
    from tabpfn.architectures.base.attention.full_attention import MultiHeadAttention as TabPFNAttention
    from tabpfn.architectures.base.config import ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(emsize=64, nhead=4, max_num_classes=10, num_buckets=100)
    ref = TabPFNAttention(d_k=16, d_v=16, device=None, dtype=torch.float64, config=config)
    ours = mha_cupy.MultiHeadAttention(emsize=64, nhead=4, d_k=16, d_v=16, dtype="float64")
    ours.set_parameters(w_qkv=ref.w_qkv.detach().numpy(), w_out=ref.w_out.detach().numpy())
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), save_peak_mem_factor=None)
    return mha_cupy.compare(ours(x), expected)


def main(argv: list[str] | None = None) -> int:
    args = command_line(__doc__, "reference").parse_args(argv)
    require("reference", "torch", "tabpfn")
    x = np.random.default_rng(0).standard_normal((2, 32 if args.quick else 512, 64))
    results = {"torch.nn.MultiheadAttention": from_torch_nn(x), "tabpfn 2.2.1 MultiHeadAttention": from_tabpfn(x)}
    for name, c in results.items():
        print(f"ours vs {name}: {c}")
    return 0 if all(c.ok for c in results.values()) else 1


if __name__ == "__main__":
    finish(main())
