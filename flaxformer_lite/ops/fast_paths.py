"""Switches for the hand-written fast paths, so a benchmark can measure what each one gives.

Every fast path computes the same math as the plain formula next to it (the tests compare them);
they differ only in how XLA lays the work out. All are on by default. To turn some off, list them
in the environment before the functions are traced:

    FLAXFORMER_LITE_DISABLE=cpu_attention,gelu_vjp python experiments/benchmark.py ...

- `cpu_attention`: attention with a hand-written backward pass on the CPU backend.
- `gelu_vjp`: GELU (exact through erf, not erfc) with a hand-written backward pass.
- `layer_norm_vjp`: LayerNorm with a hand-written backward pass.
- `bias_gemv`: bias and norm-parameter gradients as matrix-vector products.
- `unstack_vjp`: q/k/v split from a fused projection with a one-copy backward pass.
- `cached_attention`: decoding on the CPU backend attends over the KV cache before writing the
  new keys and values into it (`ops.cached_attention`), so XLA updates the cache in place.
- `matmul_vjp`: `ops.matmul` (every Dense layer) with a hand-written backward pass whose
  weight gradient is accumulated in float32 (and the `matmul_barrier` setting's barrier).
- `bias_vjp`: `ops.bias_add` with a hand-written backward pass summing the bias gradient in
  float32.
- `all`: every one of them.

The matmul backward barrier is a model setting instead (`TransformerConfig.matmul_barrier`).

Autodiff: these are reverse-mode rules (`jax.custom_vjp`). `jax.grad`, `jax.vjp`,
`jax.jacrev` and Hessian-vector products (`jax.jvp` of `jax.grad`, so `jax.hessian`) work with
them; forward mode of a model itself (`jax.jvp`, `jax.linearize`, `jax.jacfwd` of the logits)
fails with JAX's "can't apply forward-mode autodiff (jvp) to a custom_vjp function". For
forward mode, trace the model with `FLAXFORMER_LITE_DISABLE=all` (set in the environment, or in
`os.environ` before the first call that traces it): the plain formulas, the same math.
"""

from __future__ import annotations

import os

ENV = "FLAXFORMER_LITE_DISABLE"
NAMES = ("cpu_attention", "gelu_vjp", "layer_norm_vjp", "bias_gemv", "unstack_vjp",
         "cached_attention", "matmul_vjp", "bias_vjp")


def enabled(name: str) -> bool:
    """Whether fast path `name` is on (it is unless listed in `FLAXFORMER_LITE_DISABLE`, or
    that lists `all`)."""
    disabled = {s.strip() for s in os.environ.get(ENV, "").split(",") if s.strip()}
    unknown = sorted(disabled.difference((*NAMES, "all")))
    if unknown:
        raise ValueError(f"{ENV} names unknown fast paths {unknown}; known: {', '.join(NAMES)} "
                         "and all.")
    return name not in disabled and "all" not in disabled
