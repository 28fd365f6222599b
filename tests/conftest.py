"""One ``backend`` fixture over every installed array library (the SciPy pattern).

``backend`` gives the namespace, the device, and ``asarray`` to move NumPy test
data onto it; ``xp`` is its namespace alone.
"""

from __future__ import annotations

import os

# tabpfn 2.2.1 pins scikit-learn < 1.7, which refuses to import beside
# array-api-compat unless SciPy's array API support is switched on first.
os.environ.setdefault("SCIPY_ARRAY_API", "1")
# CuPy computes float32 products in TF32 (10-bit mantissas) when this is set: far outside the 1e-5 tolerance.
os.environ.pop("CUPY_TF32", None)

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from helpers import BACKEND_IDS, GPU_BACKEND_IDS, make_backend  # noqa: E402


# Property tests: derandomised, moderate counts in CI; `--hypothesis-profile=long` for many more.
settings.register_profile("ci", max_examples=30, derandomize=True, deadline=None, print_blob=True)
settings.register_profile("long", max_examples=1000, deadline=None, print_blob=True)
settings.load_profile("ci")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a GPU (CuPy, torch on CUDA, JAX on a GPU); skips where none is usable")
    config.addinivalue_line("markers", "reference: compares against tabpfn 2.2.1 / torch")
    config.addinivalue_line("markers", "slow: long tests (CI runs them; deselect locally with -m 'not slow')")
    try:
        import array_api_strict

        # Use only what the 2023.12 standard offers.
        array_api_strict.set_array_api_strict_flags(api_version="2023.12")
    except ImportError:
        pass
    try:
        import jax

        # The backend-parametrised suite compares float64 too; tests/test_backend_jax.py runs
        # float32 with x64 switched off as well.
        jax.config.update("jax_enable_x64", True)
    except ImportError:
        pass


def _params() -> list:
    params = []
    for name in BACKEND_IDS:
        # JAX compiles for every new shape (one-tile calls as one program, chunked ones step by step): its cases are
        # slow.
        marks = [pytest.mark.gpu] if name in GPU_BACKEND_IDS else [pytest.mark.slow] if name == "jax" else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


@pytest.fixture(params=_params())
def backend(request: pytest.FixtureRequest):
    return make_backend(request.param)


@pytest.fixture
def xp(backend):
    return backend.xp
