"""PyTorch tensors on the CPU or CUDA. Torch parallelises every operation itself (one worker)
and has no shifts or additions on uint32, so Philox runs in int64 lanes here."""

from __future__ import annotations

import functools
import importlib
from typing import Any

import array_api_compat
import numpy

from . import _numba
from ._base import Backend
from ._numpy import NumpyBackend

__all__ = ["TorchBackend"]


class TorchBackend(Backend):
    name = "torch"
    package = "torch"
    install_hint = "pip install torch (or, from a checkout, pip install \".[reference]\")"

    @staticmethod
    def is_namespace(module: Any) -> bool:
        return array_api_compat.is_torch_namespace(module)

    @staticmethod
    def namespace_of_module(module: Any) -> Any:
        torch = importlib.import_module("torch")
        return array_api_compat.array_namespace(torch.empty(0))

    def is_cpu(self, device: Any) -> bool:
        return device.type == "cpu"

    def check_device(self, device: Any) -> Any:
        import torch

        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            msg = f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r} ({exc})"
            raise ValueError(msg) from None
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            msg = (f"device {device!r} is not available here (torch.cuda.is_available() is "
                   f"{torch.cuda.is_available()}, {torch.cuda.device_count()} CUDA devices)")
            raise ValueError(msg)
        return dev

    def free_memory(self, device: Any) -> int:
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free) + int(cached)

    def philox_lanes(self) -> Any:
        return self.xp.int64

    def to_numpy(self, x: Any) -> numpy.ndarray:
        """A host copy (a view, for CPU tensors) of ``x``; bfloat16 as float32, which holds it exactly; float8 as
        ml_dtypes' float8 (the same bytes), or a TypeError naming ml_dtypes when it is missing."""
        x = x.detach().cpu()
        if x.dtype == self.xp.bfloat16:  # float32's upper half: widened by NumPy, not by a torch op, whose OpenMP
            # threads would spin beside NumPy's workers for milliseconds after (+6 ms a TabPFN call of 64 rows)
            bits = x.view(self.xp.int16).numpy().view(numpy.uint16)
            return (bits.astype(numpy.uint32) << 16).view(numpy.float32)
        if x.dtype == getattr(self.xp, "float8_e4m3fn", None):  # torch will not hand float8 to NumPy itself
            return x.view(self.xp.uint8).numpy().view(_ml_float8("torch.float8_e4m3fn tensors"))
        return x.numpy()

    def from_numpy(self, a: numpy.ndarray, device: Any) -> Any:
        if a.dtype.name == "float8_e4m3fn":  # ml_dtypes' float8, which torch.asarray refuses: the same bytes
            return self.xp.from_numpy(a.view(numpy.uint8)).view(self.xp.float8_e4m3fn).to(device)
        return super().from_numpy(a, device)

    def bfloat16_from_numpy(self, a: numpy.ndarray) -> Any:
        """float32 ``a`` rounded to a bfloat16 CPU tensor as torch rounds (to nearest, ties to even; NaN stays
        NaN), by NumPy: a torch op here would leave OpenMP threads spinning beside NumPy's workers of the next call."""
        bits = numpy.ascontiguousarray(a, dtype=numpy.float32).view(numpy.uint32)
        rounded = ((bits + numpy.uint32(0x7FFF) + ((bits >> 16) & numpy.uint32(1))) >> 16).astype(numpy.uint16)
        rounded[numpy.isnan(a)] = 0x7FC0
        return self.xp.from_numpy(rounded.view(numpy.int16)).view(self.xp.bfloat16)

    def exp_(self, x: Any) -> Any:
        return x.exp_()

    def matmul(self, a: Any, b: Any, *, fixed_order: bool = False) -> Any:
        # CPU tensors share memory with NumPy arrays: the compiled fixed-order product, the same bits, in the
        # compute dtype. Detached: gradients of these products come from the explicit backward (layer_vjp).
        if not (fixed_order and a.device.type == "cpu" and _numba.load() is not None):
            return super().matmul(a, b, fixed_order=fixed_order)
        import torch

        cdt = self.compute_dtype(a.dtype)
        host = (x.detach().to(cdt).numpy() for x in (a, b))
        return torch.from_numpy(_numpy_backend().matmul(*host, fixed_order=True)).to(a.dtype)

    def needs_grad(self, *arrays: Any) -> bool:
        import torch

        return torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in arrays)

    def differentiable(self, forward: Any, backward: Any, inputs: tuple[Any, ...]) -> Any:
        return _autograd_node().apply(forward, backward, *inputs)


@functools.cache
def _numpy_backend() -> NumpyBackend:
    return NumpyBackend(NumpyBackend.namespace_of_module(numpy))


@functools.cache
def _autograd_node() -> Any:
    """A ``torch.autograd.Function`` around an explicit forward and backward (made once, when first needed)."""
    import torch

    class ExplicitBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, forward: Any, backward: Any, *inputs: Any) -> Any:
            outputs, residuals = forward(*(None if x is None else x.detach() for x in inputs))
            ctx.backward_fn = backward
            ctx.save_for_backward(*residuals)
            ctx.mark_non_differentiable(*outputs[1:])
            return outputs if len(outputs) > 1 else outputs[0]

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:
            return (None, None, *ctx.backward_fn(ctx.saved_tensors, grads[0]))

    return ExplicitBackward


def _ml_float8(what: str) -> Any:
    """ml_dtypes' float8_e4m3fn, the NumPy dtype of ``what``; a TypeError saying how to install it when missing."""
    try:
        import ml_dtypes
    except ImportError:
        msg = f"{what} need ml_dtypes to reach NumPy, which has no float8: pip install ml_dtypes (or \".[fast]\")"
        raise TypeError(msg) from None
    return numpy.dtype(ml_dtypes.float8_e4m3fn)
