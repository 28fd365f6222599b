"""Every backend and dtype, and the error against chunk size
=========================================================

Compare backends and dtypes with ``mha_cupy.compare``: every usable library, float64 / float32 / float16 /
bfloat16.

Run: ``python examples/compare_backends_dtypes.py [--quick] [--plot FILE.png]``.
One layer, one input; the reference is the float64 NumPy result. Each row is
the layer moved to a backend and dtype, compared by ``mha_cupy.compare``:
scaled error, ulps in the lower precision, and whether it is within the
dtype's tolerance (float64 1e-10, float32 1e-5, float16 2**-9, bfloat16 2**-6).

Then the error against the key chunk size: ``scaled_dot_product_attention``
on every backend and dtype at chunk sizes from a few keys to all of them,
against attention computed directly in float64 on the unrounded inputs (so in half precision the error is
mostly that of rounding the inputs). The chunks change the rounding, never the result beyond it: every point
stays under its dtype's tolerance (the dashed lines). With matplotlib installed it draws the figure (``--plot``
saves it).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import numpy as np

import mha_cupy
import mha_cupy.testing
from _needs import command_line, finish, pyplot, save

BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "dask", "cupy")
DTYPES = ("float64", "float32", "float16", "bfloat16")
MARKERS = "os^vDx"


def on(xp: object, a: np.ndarray, dtype: str) -> object:
    """NumPy array ``a`` on ``xp`` in ``dtype``: moved in float64 or float32, rounded there (NumPy has no
    bfloat16)."""
    wide = "float64" if dtype == "float64" else "float32"
    return xp.astype(xp.asarray(a.astype(wide)), getattr(xp, dtype))


def layer_in(name: str, dtype: str, weights: dict) -> mha_cupy.MultiHeadAttention:
    layer = mha_cupy.MultiHeadAttention(emsize=64, nhead=4, d_k=16, d_v=16, dtype=dtype, xp=name)
    layer.set_parameters(**{n: on(layer.xp, w, dtype) for n, w in weights.items()})
    return layer


def layers(quick: bool) -> tuple[int, dict[tuple[str, str], object]]:
    """The layer on every backend and dtype against float64 NumPy; the namespace of each (backend, dtype) that
    ran."""
    x = np.random.default_rng(0).standard_normal((2, 16 if quick else 512, 64))
    base = mha_cupy.MultiHeadAttention(emsize=64, nhead=4, d_k=16, d_v=16, dtype="float64", seed=0)
    weights = {"w_qkv": base.w_qkv, "w_out": base.w_out}
    reference = base(x)
    failed, ran = 0, {}
    for name in BACKENDS:
        for dtype in DTYPES:
            try:
                layer = layer_in(name, dtype, weights)
            except (mha_cupy.BackendUnavailableError, TypeError, AttributeError) as exc:  # absent, or no such dtype
                print(f"{name:16s} {dtype:8s} skipped: {str(exc).split('; ')[0].splitlines()[0]}")
                continue
            c = mha_cupy.compare(layer(on(layer.xp, x, dtype)), reference)
            failed += not c.ok
            ran[name, dtype] = layer.xp
            print(f"{name:16s} {dtype:8s} {c}")
    return failed, ran


def direct(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Attention in float64, the whole score matrix at once: the independent reference."""
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bnts,bsnv->btnv", w / w.sum(-1, keepdims=True), v)


def chunk_sweep(quick: bool, ran: dict[tuple[str, str], object]) -> tuple[int, dict, list[int]]:
    """Scaled error of every (backend, dtype) that ran, at each key chunk size."""
    S = 64 if quick else 1024
    sizes = [2**i for i in range(2, S.bit_length())]
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, S, 4, 16)) for _ in range(3))
    reference = direct(q, k, v)
    errors, failed = {}, 0
    for (name, dtype), xp in sorted(ran.items()):
        args = [on(xp, a, dtype) for a in (q, k, v)]
        errors[name, dtype] = []
        for size in sizes:
            c = mha_cupy.compare(mha_cupy.scaled_dot_product_attention(*args, kv_chunk_size=size), reference)
            failed += not c.ok
            errors[name, dtype].append(c.scaled_error)
        print(f"{name:16s} {dtype:8s} scaled error over key chunks of {sizes[0]}-{sizes[-1]}: "
              f"{min(errors[name, dtype]):.1e}-{max(errors[name, dtype]):.1e}")
    return failed, errors, sizes


@contextlib.contextmanager
def jax_float64() -> Iterator[None]:
    """JAX with float64 (``jax_enable_x64``, a process-wide switch) while the comparisons run, as it was after."""
    if importlib.util.find_spec("jax") is None:
        yield
        return
    import jax

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def draw(errors: dict, sizes: list[int], path: str | None) -> None:
    plt = pyplot(path)
    if plt is None:
        print('no figure: matplotlib is not installed (python -m pip install ".[plot]")')
        return
    fig, axes = plt.subplots(1, len(DTYPES), figsize=(14, 3.8), sharex=True, constrained_layout=True)
    handles: dict = {}
    for ax, dtype in zip(axes, DTYPES):
        for (name, d), points in sorted(errors.items()):
            if d == dtype:
                i = BACKENDS.index(name)  # a colour and a marker each: equal errors overlap
                handles[name] = ax.plot(sizes, [max(e, 1e-18) for e in points], f"{MARKERS[i]}-", color=f"C{i}",
                                        alpha=0.8, markersize=9 - i, markerfacecolor="none")[0]
        handles["tolerance"] = ax.axhline(mha_cupy.testing.tolerance(dtype), color="k", ls="--", lw=1)
        ax.set(yscale="log", title=dtype, xlabel="key chunk size (kv_chunk_size)")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("scaled error vs float64 (0 drawn at 1e-18)")
    fig.legend(handles.values(), handles.keys(), loc="outside right center", fontsize="small")
    fig.suptitle("scaled_dot_product_attention: error against key chunk size, every backend and dtype")
    save(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = command_line(__doc__, plot=True).parse_args(argv)
    pyplot(args.plot)  # a missing matplotlib under --plot ends the run here, before the work
    with jax_float64():
        failed, ran = layers(args.quick)
        more, errors, sizes = chunk_sweep(args.quick, ran)
    draw(errors, sizes, args.plot)
    print("ok" if not failed + more else f"FAILED: {failed + more} comparisons beyond their tolerance")
    return 1 if failed + more else 0


if __name__ == "__main__":
    finish(main())
