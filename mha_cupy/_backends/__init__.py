"""One adapter per array library behind one interface (the pattern of einops' ``_backends.py``).

Everything library-specific lives in the ``_<library>.py`` modules beside this
one; the rest of the package asks the adapter (a ``Backend``) and otherwise
calls only the Array API standard. This package is the only runtime code that
imports NumPy, and it imports the other libraries only when asked for them.
"""

from __future__ import annotations

import difflib
import functools
import sys
from types import ModuleType
from typing import Any

import array_api_compat

from ._array_api_strict import ArrayApiStrictBackend
from ._base import ACCELERATOR_BUDGET_FRACTION, CPU_MEMORY_BUDGET, Backend, BackendUnavailableError
from ._dtypes import FLOAT_DTYPES, HALF_NAMES, QUANTIZED_MAX
from ._cupy import CupyBackend
from ._dask import DaskBackend
from ._jax import JaxBackend
from ._numpy import DEFAULT_DTYPE, NumpyBackend
from ._torch import TorchBackend

__all__ = [
    "ACCELERATOR_BUDGET_FRACTION",
    "BACKEND_NAMES",
    "CPU_MEMORY_BUDGET",
    "DEFAULT_DTYPE",
    "FLOAT_DTYPES",
    "HALF_NAMES",
    "QUANTIZED_MAX",
    "ArrayApiStrictBackend",
    "Backend",
    "BackendUnavailableError",
    "CupyBackend",
    "DaskBackend",
    "JaxBackend",
    "NumpyBackend",
    "TorchBackend",
    "backend_of",
    "convert",
    "device_of",
    "dtype_name",
    "resolve_backend",
    "same_device",
    "to_numpy",
]

_ADAPTERS: tuple[type[Backend], ...] = (NumpyBackend, CupyBackend, TorchBackend, ArrayApiStrictBackend, JaxBackend,
                                         DaskBackend)
#: The names ``xp=`` accepts.
BACKEND_NAMES = tuple(a.name for a in _ADAPTERS)


def device_of(x: Any) -> Any:
    """The device of array ``x`` (None for a traced JAX array inside ``jax.grad`` or ``jit``)."""
    return array_api_compat.device(x)


def same_device(a: Any, b: Any) -> bool:
    """Whether devices ``a`` and ``b`` are one; an unknown device (None: a traced array) matches any."""
    return a is None or b is None or a == b


@functools.cache
def _backend_for_namespace(xp: Any) -> Backend:
    for adapter in _ADAPTERS:
        if adapter.is_namespace(xp):
            return adapter(xp)
    return Backend(xp)


#: Names people write for a library, and ours (``resolve_backend``'s hint).
_XP_ALIASES = {"pytorch": "torch", "np": "numpy", "jnp": "jax", "jax.numpy": "jax", "cp": "cupy",
               "dask.array": "dask", "da": "dask", "array-api-strict": "array_api_strict"}


def resolve_backend(xp: Any = None) -> Backend:
    """The adapter for ``xp``: ``None`` (NumPy), a name in ``BACKEND_NAMES``, a library module
    (``numpy``, ``cupy``, ``torch``, ``jax``, ...) or any Array API namespace."""
    if xp is None:
        xp = "numpy"
    if isinstance(xp, str):
        adapter = next((a for a in _ADAPTERS if a.name == xp), None)
        if adapter is None:
            close = _XP_ALIASES.get(xp.lower()) or next(iter(difflib.get_close_matches(xp, BACKEND_NAMES, n=1)), None)
            hint = f"; did you mean {close!r}?" if close else ""
            msg = f"xp must be a namespace module or one of {BACKEND_NAMES}, got {xp!r}{hint}"
            raise ValueError(msg)
        return _backend_for_namespace(adapter.load())
    if not isinstance(xp, ModuleType):
        msg = f"xp must be a namespace module or one of {BACKEND_NAMES}, got {type(xp).__name__} {xp!r}"
        raise TypeError(msg)
    adapter = next((a for a in _ADAPTERS if a.is_namespace(xp)), None)
    if adapter is not None:
        return _backend_for_namespace(adapter.namespace_of_module(xp))
    if hasattr(xp, "__array_api_version__"):
        return _backend_for_namespace(xp)
    msg = f"xp={xp.__name__!r} is not an Array API namespace (no __array_api_version__)"
    raise TypeError(msg)


def backend_of(*arrays: Any, names: tuple[str, ...]) -> Backend:
    """The adapter of the library that all ``arrays`` come from (``None`` entries are ignored).

    Raises ``TypeError`` when an entry is not an array or the arrays come from
    different libraries, and ``ValueError`` when they live on different devices.
    ``names`` labels the arrays in messages.
    """
    present = [(name, a) for name, a in zip(names, arrays) if a is not None]
    for name, a in present:
        if not Backend.is_array(a):
            msg = f"{name} must be an array, got {type(a).__module__}.{type(a).__name__}"
            raise TypeError(msg)
    try:
        xp = array_api_compat.array_namespace(*(a for _, a in present))
    except TypeError as exc:
        kinds = ", ".join(f"{name}: {type(a).__module__}.{type(a).__name__}" for name, a in present)
        msg = f"all arrays must come from one array library, got {kinds}"
        raise TypeError(msg) from exc
    if present:
        first_name, first = present[0]
        for name, a in present[1:]:
            if not same_device(device_of(a), device_of(first)):
                msg = (f"all arrays must be on one device: {first_name} is on {device_of(first)}, "
                       f"got {name} on {device_of(a)}")
                raise ValueError(msg)
    return _backend_for_namespace(xp)


def dtype_name(dtype: Any) -> str:
    """The standard's name of a dtype of any library that is already imported (``"float32"``)."""
    for adapter in _ADAPTERS:
        if adapter.package.split(".")[0] not in sys.modules:
            continue
        try:
            name = resolve_backend(adapter.name).known_dtype_name(dtype)
        except BackendUnavailableError:
            continue
        if name is not None:
            return name
    return str(dtype)


def to_numpy(x: Any) -> Any:
    """Copy array ``x`` of any supported library to a NumPy array on the host.

    Explicit host transfer: for tests, comparisons and saving, never the hot path.
    """
    return backend_of(x, names=("x",)).to_numpy(x)


def convert(x: Any, target: Backend, device: Any = None) -> Any:
    """``x`` as an array of ``target``'s library on ``device`` (default: the library's default).

    Goes through DLPack where both libraries allow it, else through a host copy;
    never through Python lists.
    """
    if x is None:
        return None
    source = backend_of(x, names=("x",))
    if source.xp is target.xp:
        return x if device is None or device_of(x) == device else array_api_compat.to_device(x, device)
    try:
        moved = target.xp.from_dlpack(x)
        if device is not None and device_of(moved) != device:
            moved = array_api_compat.to_device(moved, device)
        return moved
    except Exception:  # noqa: BLE001 - DLPack across devices or dtypes is refused; go through the host
        pass
    return target.from_numpy(source.to_numpy(x), device if device is not None else target.default_device())
