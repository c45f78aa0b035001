"""Feed-forward networks, activations, normalisation and a CPU-friendly matmul."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jnp.ndarray


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": _gelu_exact,
    "gelu_tanh": _gelu_tanh,
    "silu": jax.nn.silu,
    # gated variants (Shazeer 2020): act(x W_gate) * (x W_in)
    "swiglu": jax.nn.silu,
    "geglu": _gelu_tanh,
    "reglu": jax.nn.relu,
}
GATED = ("swiglu", "geglu", "reglu")


def activation(name: str):
    """The elementwise function behind an activation name (gated names give the gate's)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not one of {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: Array, w: Array, barrier: bool = False) -> Array:
    """`x @ w` for `x [..., in]`, `w [in, out]`, with an optional CPU-friendly backward.

    With `barrier=True` the backward pass puts `lax.optimization_barrier` on the incoming
    gradient before its two matmuls. On XLA:CPU that stops the elementwise backward chain
    (activation', norm', residual) from being fused into the strided transpose the weight
    gradient needs, which roughly halves the step time of small models. Math is unchanged.
    """
    return jnp.matmul(x, w)


def _matmul_fwd(x, w, barrier):
    return jnp.matmul(x, w), (x, w)


def _matmul_bwd(barrier, res, dy):
    x, w = res
    if barrier:
        dy = jax.lax.optimization_barrier(dy)
    dx = jnp.matmul(dy, w.T).astype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dw = jnp.matmul(x2.T, dy2, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def feed_forward(x: Array, w_in: Array, w_out: Array, *, activation_name: str = "relu",
                 b_in: Array | None = None, b_out: Array | None = None,
                 w_gate: Array | None = None, b_gate: Array | None = None) -> Array:
    """Position-wise feed-forward `act(x W_in + b_in) W_out + b_out` on `[..., d_model]`.

    Gated activations (swiglu, geglu, reglu) compute `act(x W_gate) * (x W_in)` and need `w_gate`.
    `w_in`, `w_gate`: `[d_model, d_ff]`; `w_out`: `[d_ff, d_model]`.
    """
    act = activation(activation_name)
    h = x @ w_in
    if b_in is not None:
        h = h + b_in
    if activation_name in GATED:
        if w_gate is None:
            raise ValueError(f"activation={activation_name!r} is gated and needs w_gate.")
        gate = x @ w_gate
        if b_gate is not None:
            gate = gate + b_gate
        h = act(gate) * h
    else:
        h = act(h)
    y = h @ w_out
    return y + b_out if b_out is not None else y


def layer_norm(x: Array, scale: Array | None = None, bias: Array | None = None, *,
               eps: float = 1e-5) -> Array:
    """`(x - mean) / sqrt(var + eps) * scale + bias` over the last axis, computed in float32."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def rms_norm(x: Array, scale: Array | None = None, *, eps: float = 1e-6) -> Array:
    """`x / sqrt(mean(x^2) + eps) * scale` over the last axis (T5, LLaMA), in float32."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)
