"""One TabPFN 9 attention call over an int8 KV cache under TabPFN's default bfloat16 autocast (CPUs with
AVX512-BF16 or AMX), three ways, in one process: TabPFN's own path, our backend as it runs now (the torch adapter
with autocast off), and our torch adapter left under autocast (what the backend did before: bfloat16 products).

For each: the median time of ``--repeats`` calls after a warm-up, and the scaled error against float64 attention
over the dequantized cache (max |a - r| / max(1, max |r|)). The call's shape is TabPFN-3.5's test rows over its
training rows: q ``[1, T, 16, 64]`` bfloat16 over 1 KV head of int8 keys and values with one scale each.

Needs tabpfn 9 (``pip install "tabpfn==9.2.0" ".[fast]"``). Run, with nothing else on the machine:
``python benchmarks/bench_tabpfn_autocast.py [--keys 20000] [--test 1 64 1024] [--repeats 5] [--dispatch avx2]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_dispatch_argument, apply_dispatch, header, median_time, new_result, write_result  # noqa: E402


def measure(keys: int, queries: int, repeats: int) -> list[dict]:
    import torch
    from tabpfn.architectures.kv_cache import QuantizedKVCacheEntry
    from tabpfn.architectures.shared.scaled_dot_product_attention import scaled_dot_product_attention as tabpfn_sdpa

    import mha_cupy
    from mha_cupy.tabpfn import TabPFNAttentionBackend

    gen = torch.Generator().manual_seed(queries)
    q = torch.randn(1, queries, 16, 64, generator=gen).to(torch.bfloat16)
    k8, v8 = (torch.randint(-127, 128, (1, keys, 1, 64), generator=gen, dtype=torch.int8) for _ in range(2))
    ks, vs = torch.tensor([0.02]), torch.tensor([0.03])
    entry = QuantizedKVCacheEntry(key=k8, value=v8, key_scale=ks, value_scale=vs)
    k, v = (t.double() * s for t, s in ((k8, ks), (v8, vs)))
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True).transpose(1, 2)
    backend = TabPFNAttentionBackend(policy="all")
    ways = {
        "tabpfn": lambda: tabpfn_sdpa(q, None, None, quantized_kv=entry, backend=None),
        "ours (autocast off)": lambda: backend.run(q, None, None, quantized_kv=entry),
        "ours under autocast": lambda: mha_cupy.scaled_dot_product_attention(q, k8, v8, k_scale=ks, v_scale=vs),
    }
    rows = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for name, call in ways.items():
            out = call()
            err = float((out.double() - reference).abs().max() / max(1.0, float(reference.abs().max())))
            rows.append({"keys": keys, "queries": queries, "way": name, "median_s": median_time(call, repeats),
                         "scaled_error_vs_float64": err})
    base = rows[0]["median_s"]
    for r in rows:
        r["vs_tabpfn"] = r["median_s"] / base
        print(f"S={keys} T={queries:5d} {r['way']:22s} {r['median_s'] * 1e3:9.2f} ms  x{r['vs_tabpfn']:.2f}  "
              f"error {r['scaled_error_vs_float64']:.1e}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[20_000])
    parser.add_argument("--test", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    add_dispatch_argument(parser)
    args = parser.parse_args()
    apply_dispatch(args.dispatch)
    rows = [r for s in args.keys for t in args.test for r in measure(s, t, args.repeats)]
    result = new_result(rows, dispatch=args.dispatch)
    lines = header(f"One TabPFN 9 call over an int8 cache under bfloat16 autocast, {args.dispatch} dispatch", result,
                   "q [1, T, 16, 64] bfloat16 over 1 KV head of int8 keys/values; medians; error vs float64")
    lines += ["| keys | queries | way | ms | vs TabPFN | scaled error vs float64 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['keys']} | {r['queries']} | {r['way']} | {r['median_s'] * 1e3:.2f} | {r['vs_tabpfn']:.2f} | "
              f"{r['scaled_error_vs_float64']:.1e} |" for r in rows]
    write_result(result, f"tabpfn-autocast-{args.dispatch}", args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
