"""JAX: immutable arrays (results are assembled functionally, caches updated with ``at``), and
float64/int64/uint64 only under ``jax_enable_x64``."""

from __future__ import annotations

import functools
import importlib
from typing import Any

import array_api_compat
import numpy

from ._base import CPU_MEMORY_BUDGET, Backend

__all__ = ["JaxBackend"]


class JaxBackend(Backend):
    name = "jax"
    package = "jax.numpy"
    install_hint = "pip install jax (CPU) or jax[cuda12]"
    item_assignment = False

    @staticmethod
    def is_namespace(module: Any) -> bool:
        return array_api_compat.is_jax_namespace(module) or getattr(module, "__name__", None) == "jax"

    @staticmethod
    def namespace_of_module(module: Any) -> Any:
        return importlib.import_module("jax.numpy")

    def default_device(self) -> Any:
        import jax

        # The namespace info answers None ("JAX decides"); arrays report a concrete device.
        return jax.config.jax_default_device or jax.devices()[0]

    def enable_float64(self) -> None:
        import jax

        jax.config.update("jax_enable_x64", True)

    def float_dtype(self, spec: Any) -> Any:
        try:
            return super().float_dtype(spec)
        except TypeError as exc:
            if "float64" in str(spec) and "float64" not in self.float_dtypes():
                msg = f"{exc}; JAX offers float64 only with jax.config.update('jax_enable_x64', True) at startup"
                raise TypeError(msg) from None
            raise

    def is_cpu(self, device: Any) -> bool:
        if device is None:  # traced arrays (inside jax.grad or jit) report no device: JAX's default one
            device = self.default_device()
        return device.platform == "cpu"

    def free_memory(self, device: Any) -> int:
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            return CPU_MEMORY_BUDGET
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))

    def matmul(self, a: Any, b: Any, *, fixed_order: bool = False) -> Any:
        # On GPUs JAX's default precision multiplies float32 in TF32 (10-bit mantissas): 3e-4 off the reference
        # (measured on an H200, benchmarks/results/gpu-2026-12-04.md). HIGHEST is full float32; a no-op on CPUs.
        if fixed_order:
            return super().matmul(a, b, fixed_order=True)
        import jax

        return self.xp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)

    @functools.cache  # noqa: B019 - one compiled wrapper per function, for the process
    def compile(self, fn: Any, static_argnames: tuple[str, ...] = ()) -> Any:
        # Eager JAX compiles every operation for every new shape; one jitted step per shape is far cheaper.
        import jax

        return jax.jit(fn, static_argnames=static_argnames)

    def to_numpy(self, x: Any) -> numpy.ndarray:
        if x.dtype == self.xp.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
            x = self.xp.astype(x, self.xp.float32)
        return numpy.asarray(x)

    def traced(self, x: Any) -> bool:
        import jax

        if not isinstance(x, jax.core.Tracer):
            return False
        try:  # under jax.grad alone the values are there, under jax.jit they are not (only small arrays come here)
            bool(self.xp.all(x == x))
        except jax.errors.ConcretizationTypeError:
            return True
        return False

    def needs_grad(self, *arrays: Any) -> bool:
        import jax

        # Inside jax.grad (or jit) inputs are tracers: the custom VJP then gives JAX our backward.
        return any(isinstance(a, jax.core.Tracer) for a in arrays if a is not None)

    def differentiable(self, forward: Any, backward: Any, inputs: tuple[Any, ...]) -> Any:
        import jax

        @jax.custom_vjp
        def node(*xs: Any) -> Any:
            outputs, _ = forward(*xs)
            return outputs if len(outputs) > 1 else outputs[0]

        def node_fwd(*xs: Any) -> tuple[Any, Any]:
            outputs, residuals = forward(*xs)
            return (outputs if len(outputs) > 1 else outputs[0]), residuals

        def node_bwd(residuals: Any, grads: Any) -> tuple[Any, ...]:
            return tuple(backward(residuals, grads[0] if isinstance(grads, tuple) else grads))

        node.defvjp(node_fwd, node_bwd)
        return node(*inputs)
