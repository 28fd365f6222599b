"""TabPFN-3.5's attention calls in TabPFN 9's two CPU precisions, TabPFN's own path against our backend as it
runs now (``TabPFNAttentionBackend(policy="all").run``), in one process: what ``policy="auto"`` decides from.

The calls are those a predict of TabPFN-3.5 (tabpfn 9's default model, default configuration) makes over S
training rows and T test rows, by kind:

- ``quantized``: the test rows over the training rows' int8 KV cache (``fit_mode="fit_with_cache"``):
  q ``[1, T, 16, 64]`` over 1 KV head of int8 keys and values with one scale each;
- ``dense``: the same over dense keys and values (``fit_mode="fit_preprocessors"``, TabPFN's default);
- ``decoder``: the decoder's test rows over the training rows, q ``[1, T, 6, 64]`` over 6 KV heads;
- ``self``: the training rows over themselves, ``[1, S, 16, 64]`` (T is S; measured once per S).

Precisions: ``bfloat16`` is TabPFN's default ``inference_precision="auto"`` on CPUs with AVX512-BF16 or AMX (the
calls come in bfloat16 under ``torch.autocast``), ``float32`` is ``inference_precision=torch.float32`` (and the
default elsewhere). For each: the median time of ``--repeats`` calls after a warm-up, and the scaled error
against float64 attention (max |a - r| / max(1, max |r|)).

Needs tabpfn 9 (``pip install "tabpfn==9.2.0" ".[fast]"``). Run, with nothing else on the machine:
``python benchmarks/bench_tabpfn_calls.py [--keys 10000 20000] [--test 1 64 1024] [--kinds ...]
[--precisions bfloat16 float32] [--repeats 5] [--dispatch avx2]``
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_dispatch_argument, apply_dispatch, header, median_time, new_result, write_result  # noqa: E402

KINDS = ("quantized", "dense", "decoder", "self")
PRECISIONS = ("bfloat16", "float32")


def call_inputs(kind: str, keys: int, queries: int, dtype, gen) -> dict:
    """The tensors of one call of ``kind``: ``q``, ``k``, ``v`` and ``quantized_kv`` (TabPFN's entry, or None)."""
    import torch
    from tabpfn.architectures.kv_cache import QuantizedKVCacheEntry

    heads, kv_heads = {"quantized": (16, 1), "dense": (16, 1), "decoder": (6, 6), "self": (16, 16)}[kind]
    rows = keys if kind == "self" else queries
    q = torch.randn(1, rows, heads, 64, generator=gen).to(dtype)
    if kind != "quantized":
        k, v = (torch.randn(1, keys, kv_heads, 64, generator=gen).to(dtype) for _ in range(2))
        return {"q": q, "k": k, "v": v, "quantized_kv": None}
    k8, v8 = (torch.randint(-127, 128, (1, keys, kv_heads, 64), generator=gen, dtype=torch.int8) for _ in range(2))
    entry = QuantizedKVCacheEntry(key=k8, value=v8, key_scale=torch.tensor([0.02]), value_scale=torch.tensor([0.03]))
    return {"q": q, "k": None, "v": None, "quantized_kv": entry}


def reference(q, k, v, quantized_kv):
    """Float64 attention, grouped heads expanded (a test-side computation, not ours)."""
    import torch

    if quantized_kv is not None:
        k = quantized_kv.key.double() * quantized_kv.key_scale.double()
        v = quantized_kv.value.double() * quantized_kv.value_scale.double()
    out = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(1, 2), k.double().transpose(1, 2), v.double().transpose(1, 2), enable_gqa=True)
    return out.transpose(1, 2)


def measure(kind: str, precision: str, keys: int, queries: int, repeats: int) -> list[dict]:
    import torch
    from tabpfn.architectures.shared.scaled_dot_product_attention import scaled_dot_product_attention as tabpfn_sdpa

    from mha_cupy.tabpfn import TabPFNAttentionBackend

    dtype = getattr(torch, precision)
    inputs = call_inputs(kind, keys, queries, dtype, torch.Generator().manual_seed(keys + queries))
    expected = reference(**inputs)
    backend = TabPFNAttentionBackend(policy="all")
    args, entry = (inputs["q"], inputs["k"], inputs["v"]), inputs["quantized_kv"]
    ways = {"tabpfn": lambda: tabpfn_sdpa(*args, quantized_kv=entry, backend=None),
            "ours": lambda: backend.run(*args, quantized_kv=entry)}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bfloat16" else contextlib.nullcontext()
    rows = []
    with torch.no_grad(), autocast:
        for name, call in ways.items():
            out = call()
            err = float((out.double() - expected).abs().max() / max(1.0, float(expected.abs().max())))
            rows.append({"kind": kind, "precision": precision, "keys": keys, "queries": inputs["q"].shape[1],
                         "way": name, "median_s": median_time(call, repeats), "scaled_error_vs_float64": err})
    for r in rows:
        r["vs_tabpfn"] = r["median_s"] / rows[0]["median_s"]
        print(f"{kind:9s} {precision:8s} S={keys} T={r['queries']:5d} {r['way']:6s} {r['median_s'] * 1e3:9.2f} ms  "
              f"x{r['vs_tabpfn']:.2f}  error {r['scaled_error_vs_float64']:.1e}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[10_000, 20_000])
    parser.add_argument("--test", type=int, nargs="+", default=[1, 64, 256, 1024])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    add_dispatch_argument(parser)
    args = parser.parse_args()
    apply_dispatch(args.dispatch)
    rows = [r for kind in args.kinds for p in args.precisions for s in args.keys
            for t in (args.test if kind != "self" else [s])
            for r in measure(kind, p, s, t, args.repeats if kind != "self" else max(1, args.repeats // 2))]
    result = new_result(rows, dispatch=args.dispatch)
    lines = header(f"TabPFN-3.5's attention calls, TabPFN's path against ours, {args.dispatch} dispatch", result,
                   "kinds: quantized/dense = q [1, T, 16, 64] over 1 KV head (int8 / dense), decoder = [1, T, 6, 64] "
                   "over 6, self = [1, S, 16, 64] over itself; bfloat16 under torch.autocast; medians; error vs "
                   "float64")
    lines += ["| kind | precision | keys | queries | way | ms | vs TabPFN | scaled error vs float64 |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['precision']} | {r['keys']} | {r['queries']} | {r['way']} | "
              f"{r['median_s'] * 1e3:.2f} | {r['vs_tabpfn']:.2f} | {r['scaled_error_vs_float64']:.1e} |" for r in rows]
    write_result(result, f"tabpfn-calls-{args.dispatch}", args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
