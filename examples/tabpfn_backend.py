"""mha_cupy as TabPFN 9's attention
================================

mha_cupy as the attention of TabPFN 9 (tabpfn 9.x): register it, then use TabPFN as usual.

Needs tabpfn 9 and torch (``python -m pip install ".[fast]" "tabpfn>=9"``; tabpfn 9 cannot share an environment with the
tabpfn 2.2.1 of ``.[reference]``). This script builds a TabPFN-3 with random weights (no checkpoint download),
fits it with an int8 KV cache, predicts from the cache through mha_cupy and through TabPFN's own attention, and
checks that the two agree. With a fitted classifier it is the same two lines::

    import mha_cupy.tabpfn
    from tabpfn import TabPFNClassifier

    mha_cupy.tabpfn.register()                      # policy="auto": the calls over quantized KV caches
    clf = TabPFNClassifier(fit_mode="fit_with_cache", kv_cache_precision="int8").fit(X_train, y_train)
    proba = clf.predict_proba(X_test)               # attention over the cache runs in mha_cupy, chunk by chunk
    mha_cupy.tabpfn.unregister()                    # TabPFN's own path again

``register(policy="all")`` takes every attention call, ``register(batch_invariant=True)`` makes each call's rows
independent of the others in it.

Run: ``python examples/tabpfn_backend.py [--plot FILE.png]`` (TabPFN-3's default 24 layers, 20,000 training
rows: minutes, each step announced) or with ``--quick`` (seconds), in an environment with tabpfn 9.
"""

from __future__ import annotations

import importlib.metadata
import sys
import time
from typing import TYPE_CHECKING

import mha_cupy.tabpfn
from _needs import command_line, pyplot, save, step

if TYPE_CHECKING:
    import torch


def main() -> None:
    args = command_line(__doc__, plot=True, needs='needs tabpfn 9 and torch, in an environment of their own: '
                        'python -m pip install ".[fast]" "tabpfn>=9"').parse_args()
    pyplot(args.plot)  # a missing matplotlib under --plot ends the run here, before the work
    try:
        import torch
        from tabpfn.architectures import tabpfn_v3
        from tabpfn.architectures.interface import PerformanceOptions
        from tabpfn.architectures.shared.attention_backends import recorded_attention_backends
    except Exception as exc:  # noqa: BLE001 - missing, or tabpfn 2.2.1 (which also fails on import beside array-api-compat)
        try:
            found = f"tabpfn {importlib.metadata.version('tabpfn')} is installed"
        except importlib.metadata.PackageNotFoundError:
            found = "tabpfn is not installed"
        print(f"tabpfn_backend.py needs tabpfn 9 and torch in an environment of their own ({found}; "
              f"{type(exc).__name__}): pip install \"tabpfn>=9\" \".[fast]\"", file=sys.stderr)
        raise SystemExit(2) from None
    n_train, n_test, nlayers = (10_000, 64, 2) if args.quick else (20_000, 256, 24)

    torch.manual_seed(0)
    model = tabpfn_v3.get_architecture(tabpfn_v3.TabPFNV3Config(max_num_classes=10, nlayers=nlayers)).eval()
    gen = torch.Generator().manual_seed(0)
    # Random weights everywhere: TabPFN's initialisation zeroes projections that would hide attention.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / max(1, p.shape[-1]) ** 0.5))
    x = torch.randn(n_train + n_test, 1, 10, generator=gen)  # [rows, batch, features]
    y = torch.randint(0, 3, (n_train,), generator=gen).float()

    with torch.no_grad():
        step(f"fitting: {n_train:,} training rows through {nlayers} layers into an int8 KV cache")
        _, cache = model(x[:n_train], y, return_kv_cache=True,
                         performance_options=PerformanceOptions(kv_cache_dtype=torch.int8))
        step("predicting with TabPFN's own attention (twice)")
        theirs, t_theirs = predict(model, x[n_train:], y, cache)
        step("predicting with mha_cupy's (twice)")

        backend = mha_cupy.tabpfn.register()  # policy="auto"
        try:
            with recorded_attention_backends() as calls:
                ours, t_ours = predict(model, x[n_train:], y, cache)
        finally:
            mha_cupy.tabpfn.unregister()

    taken = sum(c is backend for c in calls) // 2  # two predicts
    error = float((ours - theirs).abs().max()) / max(1.0, float(theirs.abs().max()))
    status = "ok" if error <= 1e-5 and taken > nlayers else "FAILED"
    print(f"{status}: TabPFN-3 ({nlayers} layers), {n_train} training rows in an int8 cache, {n_test} test rows: "
          f"{taken} of {len(calls) // 2} attention calls ran in mha_cupy ({mha_cupy.tabpfn.AUTO_RULE}); "
          f"scaled error {error:.1e} against TabPFN's own attention; predict {t_ours:.2f} s (TabPFN {t_theirs:.2f} s)")
    draw(t_theirs, t_ours, error, f"TabPFN-3 ({nlayers} layers), {n_train:,} training rows, {n_test} test rows",
         args.plot)
    if status != "ok":
        raise SystemExit(1)


def draw(t_theirs: float, t_ours: float, error: float, title: str, path: str | None) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7.5, 2.8), constrained_layout=True)
    bars = ax.barh(["TabPFN's own attention", "mha_cupy"], [t_theirs, t_ours], color=["C7", "C0"])
    ax.bar_label(bars, fmt="%.2f s", padding=3)
    ax.set(xlabel="predict from the int8 cache (s)", xlim=(0, 1.25 * max(t_theirs, t_ours)),
           title=f"{title}\nscaled error against TabPFN's own: {error:.1e}")
    save(fig, path)


def predict(model: torch.nn.Module, x_test: torch.Tensor, y: torch.Tensor, cache: object) -> tuple[torch.Tensor, float]:
    """Predictions from the cache, and the seconds of the second of two predicts (the first loads numba's
    compiled kernels, once per process)."""
    model(x_test, y, kv_cache=cache, x_is_test_only=True)
    start = time.perf_counter()
    out = model(x_test, y, kv_cache=cache, x_is_test_only=True)
    return out, time.perf_counter() - start


if __name__ == "__main__":
    main()
