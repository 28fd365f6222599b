"""``mha-cupy compare``: one layer configuration on two backends, or against tabpfn, torch.nn or float64."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

from ._report import EXIT_MISMATCH, EXIT_OK, CliError, Report

AGAINST = ("tabpfn", "torch-nn", "float64")
#: Call keywords tabpfn's layer shares with ours; the others (chunking, budget, batch_invariant) are ours alone.
SHARED_CALL = ("save_peak_mem_factor", "reuse_first_head_kv", "add_input", "allow_inplace")
OURS_CALL = ("q_chunk_size", "kv_chunk_size", "memory_budget", "batch_invariant")


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    from .._backends import BACKEND_NAMES, FLOAT_DTYPES

    p = sub.add_parser("compare", parents=parents, help="one random layer on two backends, or against a reference",
                       description="Build one layer with random weights, run it on random inputs with --xp and with "
                       "the reference (--other backend, or --against tabpfn / torch-nn / float64), and print "
                       "mha_cupy.compare's verdict. Exit 1 when the difference exceeds the dtype's tolerance.")
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--other", choices=BACKEND_NAMES, help="reference: our layer, same weights, on this backend")
    ref.add_argument("--against", choices=AGAINST, help="reference: tabpfn 2.2.1's layer, torch.nn.MultiheadAttention "
                     "(both on torch's CPU, same weights), or our layer in float64 on NumPy")
    p.add_argument("--xp", default="numpy", choices=BACKEND_NAMES, help="the backend under test (default numpy)")
    p.add_argument("--dtype", default="float32", choices=tuple(FLOAT_DTYPES),
                   help="default float32; bfloat16 needs a backend that has it (torch, jax): weights and inputs are "
                   "drawn in float32 and rounded to bfloat16 on each side")
    # The names `bench` uses first (--q-len, --heads, --head-dim, --kv-len); this command's older ones still work.
    for names, default, what in ((("--batch",), 2, "batch size"), (("--q-len", "--length"), 128, "query length T"),
                                 (("--emsize",), 64, "embedding size E"), (("--heads", "--nhead"), 4, "query heads N"),
                                 (("--kv-share",), 1, "query heads per key/value head (share_kv_across_n_heads; or "
                                  "--kv-heads)"), (("--seed",), 0, "seed of weights and inputs")):
        p.add_argument(*names, dest=names[-1][2:].replace("-", "_"), type=int, default=default,
                       metavar=names[0][2:].replace("-", "_").upper(), help=f"{what} (default {default})")
    p.add_argument("--head-dim", "--d-k", dest="d_k", type=int, default=None, metavar="HEAD_DIM",
                   help="key/query size per head H "
                   "(default emsize // heads; emsize need not be divisible by heads when --head-dim and --d-v are "
                   "given)")
    p.add_argument("--d-v", type=int, default=None,
                   help="value size per head V (default: --head-dim, else emsize // heads)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads K (default heads // --kv-share); "
                   "--heads must be a multiple")
    p.add_argument("--rtol", type=float, default=None,
                   help="allowed scaled error (default: the tolerance of the lower precision, e.g. 1e-5 for float32)")
    p.add_argument("--atol", type=float, default=None, help="allowed absolute error on top (default 0)")
    p.add_argument("--kv-len", "--kv-length", dest="kv_length", type=int, default=None, metavar="KV_LEN",
                   help="key/value length S: "
                   "cross-attention on a second input x_kv (default: self-attention)")
    p.add_argument("--save-peak-mem-factor", type=int, default=None, help="layer call keyword (default None)")
    p.add_argument("--reuse-first-head-kv", action="store_true", help="layer call keyword (needs --kv-length)")
    p.add_argument("--add-input", action="store_true", help="layer call keyword: add x to the output")
    p.add_argument("--allow-inplace", action="store_true", help="layer call keyword (each side gets its own copy of x)")
    p.add_argument(
        "--q-chunk-size", type=int, default=None, help="ours only: queries per tile (default: from the budget)"
    )
    p.add_argument(
        "--kv-chunk-size", type=int, default=None, help="ours only: keys per tile (default: from the budget)"
    )
    p.add_argument("--memory-budget", default=None, help="ours only: bytes or '64MiB' (default: the device's)")
    p.add_argument("--batch-invariant", action="store_true", help="ours only: fixed-shape GEMMs per row")
    p.set_defaults(run=run)


@dataclass(frozen=True)
class Side:
    """One side of a comparison: its name, a function returning its output as an array, and for our layer the layer
    and inputs it runs (``held``: converted and cast to --dtype on its backend)."""

    name: str
    output: Callable[[], Any]
    held: tuple[Any, list[Any]] | None = None


def run(args: argparse.Namespace) -> Report:
    from ..comparison import compare

    _check_backends(args)
    layer = _our_layer(args)
    x, x_kv = _inputs(args)
    build = {"tabpfn": _tabpfn, "torch-nn": _torch_nn, "float64": _float64}.get(args.against, _other)
    ours, reference = build(args, layer, x, x_kv)
    c = compare(ours.output(), reference.output(), rtol=args.rtol, atol=args.atol)
    shapes = f"x {list(x.shape)}" + ("" if x_kv is None else f", x_kv {list(x_kv.shape)}")
    config = {k: v for k, v in vars(args).items() if k not in ("run", "json", "command")}
    heads = f"E={args.emsize} N={args.nhead} K={layer.nhead_kv} H={layer.d_k} V={layer.d_v}"
    text = f"{ours.name} vs {reference.name}, {args.dtype}, {heads}, {shapes}: {c}"
    data = {"config": config, "actual": ours.name, "reference": reference.name, "comparison": c.to_dict()}
    return Report(EXIT_OK if c.ok else EXIT_MISMATCH, data, text)


def _our_layer(args: argparse.Namespace) -> Any:
    from .._validation import check_positive_int
    from ..module import MultiHeadAttention

    optional = [n for n in ("kv_length", "d_k", "d_v", "kv_heads") if getattr(args, n) is not None]
    for name in ("batch", "length", "emsize", "nhead", "kv_share", *optional):
        check_positive_int(getattr(args, name), OPTION_NAMES.get(name, "--" + name.replace("_", "-")))
    d_k, d_v, share = head_sizes(args)
    return MultiHeadAttention(emsize=args.emsize, nhead=args.nhead, d_k=d_k, d_v=d_v, share_kv_across_n_heads=share,
                              dtype=_host_dtype(args), xp="numpy", seed=args.seed)


def _host_dtype(args: argparse.Namespace) -> str:
    """The dtype weights and inputs are drawn in on NumPy: --dtype, or float32 (which holds bfloat16 exactly)."""
    return "float32" if args.dtype == "bfloat16" else args.dtype


def _check_backends(args: argparse.Namespace) -> None:
    """--xp and --other usable here, with --dtype; errors name the option that chose the backend."""
    from .._backends import BackendUnavailableError, resolve_backend

    for option in ("xp", "other"):
        name = getattr(args, option)
        if name is None:
            continue
        try:
            be = resolve_backend(name)
        except BackendUnavailableError as exc:
            raise CliError(str(exc).replace(f"xp={name!r}", f"--{option} {name}", 1)) from exc
        if args.dtype == "float64":
            be.enable_float64()  # a whole-process tool: JAX's jax_enable_x64, as --dtype float64 asks
        dtypes = be.float_dtypes()
        if args.dtype not in dtypes:
            which = " (torch, jax)" if args.dtype == "bfloat16" else ""
            msg = (f"--dtype {args.dtype} needs a backend that has it{which}, got --{option} {name} with "
                   f"{', '.join(sorted(dtypes))}")
            raise CliError(msg)


#: The option a value is named by in messages, where its ``dest`` is an older spelling.
OPTION_NAMES = {"length": "--q-len", "nhead": "--heads", "d_k": "--head-dim", "kv_length": "--kv-len"}


def head_sizes(args: argparse.Namespace) -> tuple[int, int, int]:
    """``(d_k, d_v, share_kv_across_n_heads)`` from the options: --head-dim/--d-v, else emsize // heads; --kv-heads
    or --kv-share."""
    if args.d_k is None and args.d_v is None and args.emsize % args.nhead:
        msg = (f"--emsize must be a multiple of --heads, got --emsize {args.emsize} --heads {args.nhead}; "
               "or give the head sizes with --head-dim and --d-v")
        raise CliError(msg)
    d_k = args.d_k or args.d_v or args.emsize // args.nhead
    d_v = args.d_v or d_k
    if args.kv_heads is None:
        return d_k, d_v, args.kv_share
    if args.kv_share != 1:
        raise CliError(f"give --kv-heads or --kv-share, got --kv-heads {args.kv_heads} and --kv-share {args.kv_share}")
    if args.nhead % args.kv_heads:
        raise CliError(f"--heads must be a multiple of --kv-heads, got --heads {args.nhead} --kv-heads {args.kv_heads}")
    return d_k, d_v, args.nhead // args.kv_heads


def _inputs(args: argparse.Namespace) -> tuple[Any, Any]:
    """Random inputs in [-0.5, 0.5), on NumPy in ``--dtype`` (float32 for bfloat16); each side converts them."""
    from .._backends import resolve_backend
    from .._random import uniform

    xp = resolve_backend("numpy").xp

    def draw(stream: int, length: int) -> Any:
        return uniform(args.seed, stream, (args.batch, length, args.emsize), getattr(xp, _host_dtype(args)), xp=xp,
                       device=None) - 0.5

    return draw(101, args.length), None if args.kv_length is None else draw(102, args.kv_length)


def _call_kwargs(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n) not in (None, False)}


def _ours(args: argparse.Namespace, layer: Any, x: Any, x_kv: Any) -> Side:
    from .._backends import resolve_backend

    be = resolve_backend(args.xp)
    mine = layer.to(args.xp, dtype=args.dtype)
    xs = [_on(be, a, mine.dtype, mine.device) for a in (x, x_kv)]
    kwargs = _call_kwargs(args, SHARED_CALL + OURS_CALL)
    return Side(f"mha_cupy on {args.xp}", lambda: mine(*_copies(be.xp, xs), **kwargs), (mine, xs))


def _on(be: Any, a: Any, dtype: Any, device: Any = None) -> Any:
    """NumPy array ``a`` on backend ``be`` in ``dtype`` (rounded there, e.g. to bfloat16)."""
    from .._backends import convert

    if a is None:
        return None
    moved = convert(a, be, device)
    return be.xp.astype(moved, dtype, copy=False)


def _copies(xp: Any, arrays: list[Any]) -> list[Any]:
    # allow_inplace may overwrite x: every call gets fresh inputs, so the sides never share one.
    return [None if a is None else xp.asarray(a, copy=True) for a in arrays]


def _other(args: argparse.Namespace, layer: Any, x: Any, x_kv: Any) -> tuple[Side, Side]:
    theirs = argparse.Namespace(**{**vars(args), "xp": args.other})
    return _ours(args, layer, x, x_kv), _ours(theirs, layer, x, x_kv)


def _float64(args: argparse.Namespace, layer: Any, x: Any, x_kv: Any) -> tuple[Side, Side]:
    from .._backends import resolve_backend, to_numpy

    # The weights and inputs the side under test holds (rounded to --dtype there), widened: exact in float64.
    ours, host = _ours(args, layer, x, x_kv), resolve_backend("numpy")
    narrow, inputs = ours.held
    wide = narrow.to(host.xp, dtype="float64")
    xp = wide.xp
    xs = [None if a is None else _on(host, to_numpy(a), xp.float64) for a in inputs]
    kwargs = _call_kwargs(args, SHARED_CALL)
    return ours, Side("mha_cupy in float64 on numpy", lambda: wide(*_copies(xp, xs), **kwargs))


def _torch_side(args: argparse.Namespace) -> Any:
    if args.dtype == "float16":
        raise CliError(f"--against {args.against} runs on torch's CPU in float64, float32 or bfloat16, "
                       "got --dtype float16")
    try:
        import torch
    except ImportError as exc:
        raise CliError(f"--against {args.against} needs torch: pip install \".[reference]\" ({exc})") from exc
    torch.manual_seed(args.seed)
    return torch


def _tabpfn(args: argparse.Namespace, layer: Any, x: Any, x_kv: Any) -> tuple[Side, Side]:
    from .._reference import layer_like, reference_layer

    torch = _torch_side(args)
    d_k, d_v, share = head_sizes(args)
    try:
        ref = reference_layer(emsize=args.emsize, nhead=args.nhead, d_k=d_k, d_v=d_v, share_kv_across_n_heads=share,
                              dtype=_host_dtype(args), seed=args.seed)
    except ImportError as exc:
        raise CliError(f'--against tabpfn needs tabpfn 2.2.1: pip install ".[reference]" ({exc})') from exc
    except ValueError as exc:  # tabpfn's own config checks (pydantic): several lines, the reason among them
        reason = next(
            (line.strip() for line in str(exc).splitlines() if "Value error" in line), str(exc).splitlines()[0]
        )
        raise CliError(
            f"tabpfn 2.2.1's layer refuses this configuration: {reason.replace('Value error, ', '')}"
        ) from exc
    ours = _ours(args, layer_like(ref, xp="numpy", seed=args.seed), x, x_kv)
    dtype = getattr(torch, args.dtype)
    ref = ref.to(dtype)
    tx = [None if a is None else torch.from_numpy(a).to(dtype) for a in (x, x_kv)]
    kwargs = _call_kwargs(args, SHARED_CALL)

    def theirs() -> Any:
        with torch.no_grad():
            return ref(tx[0].clone(), tx[1], **kwargs)

    return ours, Side("tabpfn 2.2.1 on torch (CPU)", theirs)


def _torch_nn(args: argparse.Namespace, layer: Any, x: Any, x_kv: Any) -> tuple[Side, Side]:
    from ..weights import convert_torch_nn_multihead_attention_state_dict

    unsupported = [f"--{n.replace('_', '-')}" for n in SHARED_CALL if getattr(args, n) not in (None, False)]
    unsupported += [f"--{n.replace('_', '-')}" for n in ("d_k", "d_v", "kv_heads") if getattr(args, n) is not None]
    if args.kv_share != 1:
        unsupported.append("--kv-share")
    if unsupported:
        raise CliError(f"torch.nn.MultiheadAttention has no equivalent of {', '.join(unsupported)}")
    torch = _torch_side(args)
    nn = torch.nn.MultiheadAttention(args.emsize, args.nhead, bias=False, batch_first=True,
                                     dtype=getattr(torch, _host_dtype(args)))
    layer.set_parameters(**convert_torch_nn_multihead_attention_state_dict(nn.state_dict(), args.nhead, xp="numpy"))
    dtype = getattr(torch, args.dtype)
    nn = nn.to(dtype)
    tq = torch.from_numpy(x).to(dtype)
    tkv = tq if x_kv is None else torch.from_numpy(x_kv).to(dtype)

    def theirs() -> Any:
        with torch.no_grad():
            return nn(tq, tkv, tkv, need_weights=False)[0]

    return _ours(args, layer, x, x_kv), Side(f"torch.nn.MultiheadAttention (torch {torch.__version__}, CPU)", theirs)
