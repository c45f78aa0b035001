"""Suite-wide settings and fixtures."""

import importlib.util
import os
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]

# The tests check what XLA computes, not how fast the code it emits runs, and they compile
# hundreds of small programs. LLVM's optimizations are ~70% of each XLA:CPU compile (a 2-layer
# train step: 10.4 s, 2.95 s without) and change only the machine code: the optimized HLO is the
# same, results agree to float rounding. So the suite, and the scripts it starts (they inherit
# the environment), compile at backend optimization level 0, unless XLA_FLAGS already sets one.
# Set before JAX creates its backend; subprocesses that set their own device count append it.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()


@pytest.fixture(scope="session")
def load_script():
    """`load_script("experiments/benchmark.py")`: a repository script imported as a module (its
    `main` not run), with the repository root on `sys.path` while it imports, as when run."""

    def load(path: str):
        spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(ROOT))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(ROOT))
        return module

    return load


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
