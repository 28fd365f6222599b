"""``mha-cupy bench --plot``: time and peak memory against length, ours beside torch's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._report import CliError


def plot(rows: list[dict[str, Any]], config: dict[str, Any], path: str) -> str:
    """Write a two-panel PNG (time, peak memory) of the sweep in ``rows``; return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.ticker
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise CliError(f"--plot needs matplotlib: python -m pip install \".[plot]\" ({exc})") from exc
    key = "q_len" if len({r["q_len"] for r in rows}) > 1 or len({r["kv_len"] for r in rows}) == 1 else "kv_len"
    x = [r[key] for r in rows]
    memory = "ours_peak_bytes" in rows[0]  # not with --no-memory, nor off the CPU
    fig, axes = plt.subplots(1, 2 if memory else 1, figsize=(10 if memory else 5.5, 4), constrained_layout=True,
                             squeeze=False)
    ax_t, ax_m = axes[0][0], (axes[0][1] if memory else None)
    for side, label, style in (("ours", f"mha_cupy ({config['xp']})", "o-"), ("torch", "torch SDPA", "s--")):
        if f"{side}_s" in rows[0]:
            ax_t.plot(x, [r[f"{side}_s"] for r in rows], style, label=label)
        if memory and f"{side}_peak_bytes" in rows[0]:
            ax_m.plot(x, [r[f"{side}_peak_bytes"] / 2**20 for r in rows], style, label=label)
    ax_t.set(yscale="log", ylabel="median time per call (s)", title="time")
    if memory:
        ax_m.set(ylabel="peak RSS growth of one call (MiB)", title="peak memory", ylim=(0, None))
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("query length T" if key == "q_len" else "key length S")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"B={config['batch']} N={config['heads']} K={config['kv_heads']} d={config['dim']} {config['dtype']}"
                 + (" causal" if config["causal"] else ""))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
