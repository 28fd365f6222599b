"""Time and memory against length, beside torch
============================================

Time and peak memory against sequence length, mha_cupy beside torch's SDPA, from ``mha-cupy bench --json``.

Run: ``python examples/time_and_memory_vs_length.py [--quick] [--plot FILE.png]`` (torch, from the ``reference``
extra or on its own, adds its side; without it only ours is measured).
Self-attention, B=1, 6 heads of 32, float32 on NumPy, from 1,024 to 8,192 tokens (256 to 1,024 with
``--quick``). ``mha-cupy bench`` first checks that both outputs agree, then takes medians of interleaved calls and
the peak RSS growth of one call in a fresh process. The score matrix grows with the square of the length; our
working set stays within the memory budget (32 MiB on CPUs), so the peak is the output plus a bounded block.
"""

from __future__ import annotations

import json
import subprocess
import sys

from _needs import command_line, finish, pyplot, save


def bench(lengths: list[int], repeats: int) -> list[dict]:
    """The rows of ``mha-cupy bench --json`` over ``lengths``, run as a user would run it (its progress goes to
    stderr: a tqdm bar on a terminal, else a line per length)."""
    run = subprocess.run([sys.executable, "-m", "mha_cupy", "bench", "--q-len", ",".join(map(str, lengths)),
                          "--repeats", str(repeats), "--json"], stdout=subprocess.PIPE, text=True, check=False)
    data = json.loads(run.stdout)
    if run.returncode != 0:
        sys.exit(f"mha-cupy bench failed: {data.get('error') or data['rows'][-1]['comparison']}")
    return data["rows"]


def draw(rows: list[dict], path: str | None) -> None:
    plt = pyplot(path)
    if plt is None:
        print('no figure: matplotlib is not installed (python -m pip install ".[plot]")')
        return
    x = [r["q_len"] for r in rows]
    memory = "ours_peak_bytes" in rows[0]  # measured only under Linux
    fig, axes = plt.subplots(1, 1 + memory, figsize=(5 + 5 * memory, 3.8), constrained_layout=True, squeeze=False)
    for side, label, style in (("ours", "mha_cupy (NumPy)", "o-"), ("torch", "torch SDPA", "s--")):
        if f"{side}_s" in rows[0]:
            axes[0][0].plot(x, [r[f"{side}_s"] * 1e3 for r in rows], style, label=label)
        if memory and f"{side}_peak_bytes" in rows[0]:
            axes[0][1].plot(x, [r[f"{side}_peak_bytes"] / 2**20 for r in rows], style, label=label)
    axes[0][0].set(yscale="log", ylabel="median time per call (ms)", title="time")
    if memory:
        axes[0][1].set(ylabel="peak RSS growth of one call (MiB)", title="peak memory", ylim=(0, None))
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel("sequence length T = S")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("self-attention, B=1, 6 heads of 32, float32, CPU")
    save(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = command_line(__doc__, plot=True, needs='torch adds its side (python -m pip install torch, or the '
                        '"reference" extra); matplotlib draws the figure (the "plot" extra)').parse_args(argv)
    pyplot(args.plot)  # a missing matplotlib under --plot ends the run here, before the work
    lengths = [256, 512, 1024] if args.quick else [1024, 2048, 4096, 8192]
    rows = bench(lengths, 3 if args.quick else 5)
    for r in rows:
        theirs = f"; torch {r['torch_s'] * 1e3:.1f} ms" if "torch_s" in r else ""
        memory = f", peak {r['ours_peak_bytes'] / 2**20:.1f} MiB" if "ours_peak_bytes" in r else ""
        print(f"T = S = {r['q_len']:5d}: ours {r['ours_s'] * 1e3:.1f} ms{memory}{theirs}")
    draw(rows, args.plot)
    print("ok: outputs agree with torch's at every length" if "torch_s" in rows[0] else "ok (torch not installed)")
    return 0


if __name__ == "__main__":
    finish(main())
