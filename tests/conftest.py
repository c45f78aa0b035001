"""Suite-wide settings."""

import jax
import pytest


@pytest.fixture(scope="session", autouse=True)
def full_precision_float32_matmuls():
    """Float32 matmuls at full precision on accelerators.

    The tests compare against float64 NumPy references with tolerances for float32 arithmetic.
    JAX's default precision on NVIDIA GPUs multiplies float32 in TF32 (and on TPUs in bfloat16
    passes), which misses them by ~1e-3 for reasons that are not the library's. CPUs already
    compute float32 dots in float32; there nothing changes.
    """
    if jax.default_backend() == "cpu":
        yield
        return
    with jax.default_matmul_precision("highest"):
        yield
