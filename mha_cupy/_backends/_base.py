"""The interface every library adapter implements, with the standard's answers as defaults.

An adapter holds only what is specific to its library; everything here is
written against the Array API standard (2023.12) and array-api-compat, so a
library without an adapter of its own (any module with
``__array_api_version__``) runs on this base class alone.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from contextlib import AbstractContextManager as ContextManager
from typing import Any, ClassVar

import array_api_compat
import numpy

from ._dtypes import HALF_NAMES, QUANTIZED_MAX

__all__ = ["Backend", "BackendUnavailableError", "CPU_MEMORY_BUDGET", "ACCELERATOR_BUDGET_FRACTION",
           "fixed_order_matmul"]

#: Working-set budget of one call on a CPU when none is set: tiles that stay in cache
#: matter more there than a larger budget (see ``_budget.plan_chunks``).
CPU_MEMORY_BUDGET = 32 * 2**20
#: Share of an accelerator's free memory that one call may use by default: a few large
#: tiles instead of thousands of small kernel launches, leaving room for the caller.
ACCELERATOR_BUDGET_FRACTION = 0.25



class BackendUnavailableError(RuntimeError):
    """An array library was asked for that cannot run here.

    ``reason`` is ``"not-installed"`` when the package cannot be imported and
    ``"no-device"`` when it imports but finds no usable device (CuPy without a
    CUDA driver or GPU).
    """

    # Public as mha_cupy.BackendUnavailableError: tracebacks and reprs name it there, not by this private path.
    __module__ = "mha_cupy"

    def __init__(self, message: str, *, library: str, reason: str) -> None:
        super().__init__(message)
        self.library = library
        self.reason = reason


class Backend:
    """What mha_cupy needs to know about one array library, for its namespace ``xp``.

    Subclasses override the class attributes and the few methods where their
    library differs from the standard.
    """

    #: Short name, as accepted by ``xp=``.
    name: ClassVar[str] = "generic"
    #: The package to import for ``xp=name``.
    package: ClassVar[str] = ""
    #: How to install it, for error messages.
    install_hint: ClassVar[str] = ""
    #: Whether arrays support ``x[idx] = y`` (JAX's do not: results are assembled functionally).
    item_assignment: ClassVar[bool] = True
    #: Whether ``matmul_into`` writes into ``out`` without a temporary (NumPy's ``out=``): the core then
    #: reuses one score tile per block.
    matmul_writes_out: ClassVar[bool] = False
    #: Whether arrays are lazy and chunked (Dask): attention then runs one task per block of chunks.
    lazy_blocks: ClassVar[bool] = False

    def __init__(self, xp: Any) -> None:
        self.xp = xp

    def __repr__(self) -> str:
        return f"<mha_cupy backend {self.name}>"

    # -- recognising and loading ------------------------------------------------------------

    @staticmethod
    def is_namespace(module: Any) -> bool:
        """Whether ``module`` (a library module or its Array API namespace) belongs to this adapter."""
        return False

    @classmethod
    def load(cls) -> Any:
        """Import the library and return its Array API namespace, or raise ``BackendUnavailableError``."""
        return cls.namespace_of_module(cls.import_package())

    @classmethod
    def import_package(cls) -> Any:
        """The library's package, or ``BackendUnavailableError`` (``"not-installed"``) with the install hint."""
        try:
            return importlib.import_module(cls.package)
        except ImportError as exc:
            msg = (
                f"xp={cls.name!r} needs the package {cls.package!r}, which is not installed ({exc}); {cls.install_hint}"
            )
            raise BackendUnavailableError(msg, library=cls.name, reason="not-installed") from exc

    @staticmethod
    def namespace_of_module(module: Any) -> Any:
        """The Array API namespace of a library module (array-api-compat's wrapper where there is one)."""
        return module

    # -- devices ----------------------------------------------------------------------------

    def default_device(self) -> Any:
        """The device arrays are created on when none is given."""
        return self.xp.__array_namespace_info__().default_device()

    def is_cpu(self, device: Any) -> bool:
        """Whether arrays on ``device`` live in host memory (tiles then follow CPU caches)."""
        return True

    def check_device(self, device: Any) -> Any:
        """``device`` as this library's device object, or a ValueError naming it and the devices there are."""
        devices = list(self.xp.__array_namespace_info__().devices())
        if any(device == d for d in devices):
            return device
        msg = f"device must be one of {self.name}'s devices {devices}, got {device!r}"
        raise ValueError(msg)

    def default_workers(self, device: Any) -> int:
        """Threads over independent blocks when the caller names none."""
        return 1

    def parallel_section(self) -> ContextManager[None]:
        """Entered around a thread pool over blocks (NumPy holds BLAS to one thread there)."""
        return contextlib.nullcontext()

    def default_memory_budget(self, device: Any) -> int:
        """Working-set bytes of one call when none is set: ``CPU_MEMORY_BUDGET`` on CPUs,
        ``ACCELERATOR_BUDGET_FRACTION`` of the free memory on accelerators."""
        if self.is_cpu(device):
            return CPU_MEMORY_BUDGET
        return max(CPU_MEMORY_BUDGET, int(self.free_memory(device) * ACCELERATOR_BUDGET_FRACTION))

    def free_memory(self, device: Any) -> int:
        """Bytes an accelerator can still allocate (its driver's free memory plus the library's cached pool)."""
        return CPU_MEMORY_BUDGET

    def describe_device(self, device: Any) -> dict[str, Any]:
        """What ``mha-cupy info`` shows of a device beyond its name in the library (accelerators: model, memory)."""
        return {}

    # -- dtypes -----------------------------------------------------------------------------

    def float_dtypes(self) -> dict[str, Any]:
        """The real floating dtypes this library offers now, by name (half precisions included)."""
        found = dict(self.xp.__array_namespace_info__().dtypes(kind="real floating"))
        for name in HALF_NAMES:
            if hasattr(self.xp, name):
                found[name] = getattr(self.xp, name)
        return found

    def dtype_name(self, dtype: Any) -> str:
        """The standard's name of ``dtype`` (``"float32"``); ``str(dtype)`` for a dtype it does not know."""
        return self.known_dtype_name(dtype) or str(dtype)

    def known_dtype_name(self, dtype: Any) -> str | None:
        """The standard's name of ``dtype`` if it is one of this library's dtypes, else None."""
        known = {**self.xp.__array_namespace_info__().dtypes(), **self.float_dtypes()}
        with warnings.catch_warnings():  # array_api_strict warns when asked about another library's dtype
            warnings.simplefilter("ignore")
            return next((name for name, dt in known.items() if dt == dtype), None)

    def float_dtype(self, spec: Any) -> Any:
        """``spec`` (a name, a NumPy dtype or a dtype of this library) as this library's float dtype."""
        available = self.float_dtypes()
        if spec is None:
            msg = f"dtype must be one of the floating dtypes {sorted(available)} of {self.name}, got None"
            raise TypeError(msg)
        name = spec if isinstance(spec, str) else self.dtype_name(spec)
        if name not in available and not isinstance(spec, str):
            with contextlib.suppress(TypeError):
                name = numpy.dtype(spec).name
        if name not in available:
            library = type(spec).__module__.split(".")[0]
            foreign = library not in ("builtins", "numpy", self.name) and not isinstance(spec, str)
            hint = f" (a dtype of {library}: pass xp={library!r}, or the dtype's name)" if foreign else ""
            msg = f"dtype must be one of the floating dtypes {sorted(available)} of {self.name}, got {spec!r}{hint}"
            raise TypeError(msg)
        return available[name]

    def quantized_dtypes(self) -> dict[str, Any]:
        """Storage dtypes of quantized keys and values (``k_scale``/``v_scale``) by name: ``int8`` always,
        ``float8_e4m3fn`` where the library has it (TabPFN 9's two KV-cache dtypes)."""
        return {name: getattr(self.xp, name) for name in QUANTIZED_MAX if hasattr(self.xp, name)}

    def enable_float64(self) -> None:
        """Make float64 available where the library gates it behind a switch (JAX's ``jax_enable_x64``);
        for whole-process tools such as ``mha-cupy verify``, never called by the library itself."""

    def compute_dtype(self, dtype: Any) -> Any:
        """Dtype of logits, softmax and accumulation: float64 for float64, else float32."""
        return self.xp.float64 if dtype == self.xp.float64 else self.xp.float32

    def itemsize(self, dtype: Any) -> int:
        """Bytes per element of a float dtype."""
        return self.xp.finfo(dtype).bits // 8

    def philox_lanes(self) -> Any:
        """The integer dtype that carries Philox's 32-bit words (see ``dropout``): uint64 where the
        library has it (one exact 64-bit product per multiply), else uint32."""
        return (
            self.xp.uint64
            if "uint64" in self.xp.__array_namespace_info__().dtypes(kind="unsigned integer")
            else self.xp.uint32
        )

    # -- host copies and fast paths ---------------------------------------------------------

    def to_numpy(self, x: Any) -> numpy.ndarray:
        """A NumPy copy of ``x`` on the host (for comparisons and saving, never the hot path)."""
        return numpy.asarray(x)

    def from_numpy(self, a: numpy.ndarray, device: Any) -> Any:
        """Host array ``a`` as an array of this library on ``device``."""
        return self.xp.asarray(a, device=device)

    def exp_(self, x: Any) -> Any:
        """``exp(x)``, written into ``x`` where the library can (the array must be the caller's own)."""
        return self.xp.exp(x)

    def matmul(self, a: Any, b: Any, *, fixed_order: bool = False) -> Any:
        """``a [..., M, D] @ b [..., D, F]``; with ``fixed_order`` every element is summed in order of the
        inner index, each product and sum rounded (``fixed_order_matmul``), in the compute dtype (float32 for
        half precisions, whose 16-bit partial sums would lose a digit), so that a row's bits do not depend on
        its position or on the other rows (``batch_invariant``). Leading dims must be equal."""
        if not fixed_order:
            return self.xp.matmul(a, b)
        cdt = self.compute_dtype(a.dtype)
        if a.dtype == cdt:
            return fixed_order_matmul(a, b, xp=self.xp)
        return self.xp.astype(fixed_order_matmul(self.xp.astype(a, cdt), self.xp.astype(b, cdt), xp=self.xp), a.dtype)

    def matmul_into(self, a: Any, b: Any, out: Any, *, fixed_order: bool = False) -> None:
        """Write ``matmul(a, b)`` into ``out`` (the caller's own array), without a temporary where the library can."""
        out[...] = self.matmul(a, b, fixed_order=fixed_order)

    def online_softmax(self, scores: Any, m: Any, l: Any, acc: Any, scalars: tuple[Any, Any, Any]) -> tuple[Any, ...]:
        """One key chunk of the online softmax: ``(p, m', l', acc')`` from the chunk's scaled, biased and masked
        ``scores [b,K,t,G,s]`` and the running max ``m``, sum ``l`` (``[b,K,t,G,1]``) and accumulator
        ``acc [b,K,t*G,V]``: ``m' = max(m, rowmax)``, ``p = exp(scores - m')``, ``l' = l exp(m - m') + rowsum(p)``,
        ``acc' = acc exp(m - m')``, with ``m'`` taken as 0 where it is ``-inf`` (nothing visible yet).

        ``scores``, ``m``, ``l`` and ``acc`` are the caller's own and may be overwritten; ``scalars`` holds
        ``-inf``, 0 and 1 as 0-d arrays of the compute dtype.
        """
        xp, (neg_inf, zero, _) = self.xp, scalars
        m_new = xp.maximum(m, xp.max(scores, axis=-1, keepdims=True))
        m_safe = xp.where(m_new == neg_inf, zero, m_new)
        scores -= m_safe
        p = self.exp_(scores)
        alpha = xp.exp(m - m_safe)
        l *= alpha
        l += xp.sum(p, axis=-1, keepdims=True)
        acc *= xp.reshape(alpha, (acc.shape[0], acc.shape[1], acc.shape[2], 1))
        return p, m_new, l, acc

    def fuses_fixed_order(self, dtype: Any) -> bool:
        """Whether ``attend_chunk`` runs calls of ``dtype`` with ``fixed_order`` (one kernel that treats every query
        row alike, whatever the block: ``batch_invariant`` then needs no query tiles)."""
        return False

    def attend_chunk(self, qb: Any, kb: Any, vb: Any, m: Any, l: Any, acc: Any, allowed: Any, *,
                     fixed_order: bool, width: int) -> bool:
        """One key chunk of attention fused in one kernel, in place, where the library has one: scores
        ``qb [b,K,t*G,H] @ kb [b,K,H,s]``, hidden where ``allowed [b|1,K|1,t|1,G|1,s|1]`` (or None) is False, then
        ``online_softmax`` over ``width >= s`` entries (the chunk grid's: -inf past s) and ``acc += p @ vb [b,K,s,V]``,
        the products ``fixed_order`` ones or not. Returns whether it ran (False: the caller runs the steps one by
        one). None here."""
        return False

    def compile(self, fn: Any, static_argnames: tuple[str, ...] = ()) -> Any:
        """``fn`` made fast for this library (JAX: ``jax.jit``); as it is where arrays run eagerly."""
        return fn

    # -- gradients --------------------------------------------------------------------------

    def traced(self, x: Any) -> bool:
        """Whether ``x`` is traced, its values unknown until the program runs (JAX inside ``jax.jit``)."""
        return False

    def needs_grad(self, *arrays: Any) -> bool:
        """Whether the library's autograd should see a call on ``arrays`` (torch: grad mode and ``requires_grad``)."""
        return False

    def differentiable(self, forward: Any, backward: Any, inputs: tuple[Any, ...]) -> Any:
        """Run ``forward(*inputs) -> (outputs, residuals)`` as one node of the library's autograd, whose
        gradients are ``backward(residuals, *output_grads) -> input_grads``; the first output carries the gradient."""
        msg = f"{self.name} has no autograd for mha_cupy to join"
        raise TypeError(msg)

    @staticmethod
    def is_array(x: Any) -> bool:
        """Whether ``x`` is an array (Python scalars are not)."""
        return array_api_compat.is_array_api_obj(x) and not isinstance(x, (int, float, complex, bool))


def fixed_order_matmul(a: Any, b: Any, *, xp: Any) -> Any:
    """``a [..., M, D] @ b [..., D, F]`` as ``((0 + a_0 b_0) + a_1 b_1) + ...`` per element, in order of the
    inner index, every product and sum rounded by itself (element-wise operations: no FMA, no reassociation).

    The arithmetic of one output element depends on nothing but its own row and column, on every library
    and CPU (except float32 subnormals on CuPy, whose element-wise kernels flush them to zero:
    ``cupy/cuda/compiler.py`` compiles with ``-ftz=true``); D element-wise steps, so it is slow (the NumPy and
    torch adapters run a compiled kernel with the same bits where numba is installed).
    """
    shape = (*a.shape[:-1], b.shape[-1])
    out = xp.zeros(shape, dtype=a.dtype, device=array_api_compat.device(a))
    for i in range(a.shape[-1]):
        out = out + a[..., i:i + 1] * b[..., i:i + 1, :]
    return out
