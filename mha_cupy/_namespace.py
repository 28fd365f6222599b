"""Resolving array namespaces, devices and dtypes, and moving arrays between them.

This is the only module of the package that imports NumPy: everything else
receives an Array API namespace ``xp`` and calls only what the standard
(2023.12) defines.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import array_api_compat
import numpy

__all__ = [
    "NAMESPACE_NAMES",
    "DEFAULT_DTYPE",
    "BackendUnavailableError",
    "namespace_of",
    "resolve_namespace",
    "resolve_dtype",
    "compute_dtype",
    "dtype_name",
    "device_of",
    "default_device",
    "namespace_name",
    "is_cpu",
    "itemsize",
    "is_float_dtype",
    "convert",
    "to_numpy",
    "load_npz",
]

NAMESPACE_NAMES = ("numpy", "cupy", "torch", "array_api_strict")

#: The layer's default dtype, spelled as in the reference API (``numpy.float32``);
#: ``resolve_dtype`` maps it to the chosen namespace's float32.
DEFAULT_DTYPE = numpy.float32

CUPY_INSTALL_HINT = (
    "install CuPy for your CUDA version with `pip install mha_cupy[cuda12]` "
    "(CUDA 12) or `pip install mha_cupy[cuda13]` (CUDA 13)"
)


class BackendUnavailableError(RuntimeError):
    """An array library was asked for that cannot run here.

    ``reason`` is ``"not-installed"`` when the package cannot be imported and
    ``"no-device"`` when it imports but finds no usable device (CuPy without a
    CUDA driver or GPU).
    """

    def __init__(self, message: str, *, library: str, reason: str) -> None:
        super().__init__(message)
        self.library = library
        self.reason = reason


def _require_cupy() -> ModuleType:
    try:
        cupy = importlib.import_module("cupy")
    except ImportError as exc:
        msg = f"xp='cupy' needs CuPy, which is not installed ({exc}); {CUPY_INSTALL_HINT}"
        raise BackendUnavailableError(msg, library="cupy", reason="not-installed") from exc
    try:
        available = bool(cupy.is_available())
    except Exception:  # a broken driver can raise instead of answering False
        available = False
    if not available:
        msg = (
            "xp='cupy': CuPy is installed but finds no usable CUDA driver or GPU "
            "(cupy.is_available() is False); run on a machine with an NVIDIA GPU and "
            f"driver, or use xp='numpy'. If the CuPy build does not match the driver, {CUPY_INSTALL_HINT}"
        )
        raise BackendUnavailableError(msg, library="cupy", reason="no-device")
    return cupy


def resolve_namespace(xp: Any = None) -> Any:
    """Return the Array API namespace for ``xp``.

    ``xp`` may be ``None`` (NumPy), one of the names in ``NAMESPACE_NAMES``,
    a library module (``numpy``, ``cupy``, ``torch``, ``array_api_strict``) or
    any module that already is an Array API namespace.
    """
    if xp is None:
        xp = "numpy"
    if isinstance(xp, str):
        if xp not in NAMESPACE_NAMES:
            msg = f"xp must be a namespace module or one of {NAMESPACE_NAMES}, got {xp!r}"
            raise ValueError(msg)
        if xp == "cupy":
            module = _require_cupy()
        else:
            try:
                module = importlib.import_module(xp)
            except ImportError as exc:
                msg = f"xp={xp!r} needs the package {xp!r}, which is not installed ({exc})"
                raise BackendUnavailableError(msg, library=xp, reason="not-installed") from exc
    elif isinstance(xp, ModuleType):
        module = xp
    else:
        msg = f"xp must be a namespace module or one of {NAMESPACE_NAMES}, got {type(xp).__name__} {xp!r}"
        raise TypeError(msg)

    name = module.__name__
    if name in ("numpy", "array_api_compat.numpy"):
        return array_api_compat.array_namespace(numpy.empty(0))
    if name in ("cupy", "array_api_compat.cupy"):
        cupy = _require_cupy()
        return array_api_compat.array_namespace(cupy.empty(0))
    if name in ("torch", "array_api_compat.torch"):
        torch = importlib.import_module("torch")
        return array_api_compat.array_namespace(torch.empty(0))
    if hasattr(module, "__array_api_version__"):
        return module
    msg = f"xp={name!r} is not an Array API namespace (no __array_api_version__)"
    raise TypeError(msg)


def namespace_of(*arrays: Any, names: tuple[str, ...] | None = None) -> Any:
    """Resolve the namespace shared by ``arrays`` (``None`` entries are ignored).

    Raises ``TypeError`` when an entry is not an array or the arrays come from
    different libraries, and ``ValueError`` when they live on different devices.
    ``names`` labels the arrays in messages.
    """
    present = [(i, a) for i, a in enumerate(arrays) if a is not None]
    labels = names if names is not None else tuple(f"argument {i}" for i in range(len(arrays)))
    for i, a in present:
        if not array_api_compat.is_array_api_obj(a) or isinstance(a, (int, float, complex, bool)):
            msg = f"{labels[i]} must be an array, got {type(a).__module__}.{type(a).__name__}"
            raise TypeError(msg)
    try:
        xp = array_api_compat.array_namespace(*(a for _, a in present))
    except TypeError as exc:
        kinds = ", ".join(f"{labels[i]}: {type(a).__module__}.{type(a).__name__}" for i, a in present)
        msg = f"all arrays must come from one array library, got {kinds}"
        raise TypeError(msg) from exc
    if present:
        first_i, first = present[0]
        first_device = device_of(first)
        for i, a in present[1:]:
            dev = device_of(a)
            if dev != first_device:
                msg = (
                    f"all arrays must be on one device: {labels[first_i]} is on {first_device}, "
                    f"got {labels[i]} on {dev}"
                )
                raise ValueError(msg)
    return xp


def device_of(x: Any) -> Any:
    """The device of array ``x``."""
    return array_api_compat.device(x)


def default_device(xp: Any) -> Any:
    """The device that ``xp`` creates arrays on when none is given."""
    return device_of(xp.empty((0,)))


def namespace_name(xp: Any) -> str:
    """A short name of the library behind ``xp`` (e.g. ``"numpy"``)."""
    name = xp.__name__
    return name.removeprefix("array_api_compat.").split(".")[0]


def is_cpu(xp: Any, device: Any) -> bool:
    """Whether arrays of ``xp`` on ``device`` live in host memory (tile sizes follow CPU caches there)."""
    name = namespace_name(xp)
    if name == "cupy":
        return False
    if name == "torch":
        return str(device).startswith("cpu")
    return True


_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def dtype_name(dtype: Any) -> str:
    """A readable name for a dtype of any library (``"float32"``)."""
    text = str(dtype)
    for prefix in ("torch.", "array_api_strict.", "<class 'numpy.", "dtype('"):
        text = text.removeprefix(prefix)
    return text.rstrip("')>")


def resolve_dtype(dtype: Any, xp: Any) -> Any:
    """Translate ``dtype`` (a name, a NumPy dtype or a dtype of ``xp``) into ``xp``'s float dtype."""
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = numpy.dtype(dtype).name
        except TypeError:
            name = dtype_name(dtype)
    if name not in _FLOAT_NAMES or not hasattr(xp, name):
        available = [n for n in _FLOAT_NAMES if hasattr(xp, n)]
        msg = f"dtype must be one of the floating dtypes {available} of {namespace_name(xp)}, got {dtype!r}"
        raise TypeError(msg)
    return getattr(xp, name)


def compute_dtype(dtype: Any, xp: Any) -> Any:
    """Dtype for logits, softmax and accumulation: at least float32."""
    if dtype == xp.float64:
        return xp.float64
    return xp.float32


def itemsize(dtype: Any, xp: Any) -> int:
    """Bytes per element of a float dtype of ``xp``."""
    if dtype == xp.float64:
        return 8
    return 4 if dtype == xp.float32 else 2


def is_float_dtype(dtype: Any, xp: Any) -> bool:
    """Whether ``dtype`` is one of the real floating dtypes ``xp`` offers."""
    return any(hasattr(xp, n) and dtype == getattr(xp, n) for n in _FLOAT_NAMES)


def to_numpy(x: Any) -> numpy.ndarray:
    """Copy array ``x`` of any supported library to a NumPy array on the host.

    Explicit host transfer: for tests, comparisons and saving, never the hot path.
    """
    if isinstance(x, numpy.ndarray):
        return x
    module = type(x).__module__.split(".")[0]
    if module == "cupy":
        return x.get()
    if module == "torch":
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16; float32 holds it exactly
            x = x.float()
        return x.numpy()
    if module == "array_api_strict":
        xp = array_api_compat.array_namespace(x)
        host = xp.asarray(x, device=xp.Device("CPU_DEVICE"))
        return numpy.asarray(host)
    return numpy.asarray(x)


def convert(x: Any, xp: Any, device: Any = None) -> Any:
    """Return ``x`` as an array of namespace ``xp`` on ``device`` (default: ``xp``'s default).

    Goes through DLPack or ``xp.asarray`` on the host; never through Python lists.
    """
    if x is None:
        return None
    src = array_api_compat.array_namespace(x)
    if src is xp and (device is None or device_of(x) == device):
        return x
    if src is xp:
        return xp.asarray(x, device=device)
    try:
        moved = xp.from_dlpack(x)
        if device is not None and device_of(moved) != device:
            moved = xp.asarray(moved, device=device)
        return moved
    except Exception:  # noqa: BLE001 - DLPack across devices is refused; fall back to the host
        pass
    host = to_numpy(x)
    if namespace_name(xp) == "array_api_strict":
        return xp.asarray(host, device=device) if device is not None else xp.asarray(host)
    return xp.asarray(host, device=device)


def load_npz(path: Any) -> dict[str, numpy.ndarray]:
    """All arrays of an ``.npz`` file, read into host memory."""
    with numpy.load(path) as npz:
        return {k: npz[k] for k in npz.files}
