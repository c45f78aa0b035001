"""Feed-forward networks, activations, normalisation and a CPU-friendly matmul."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from flaxformer_lite.ops.fast_paths import enabled

Array = jnp.ndarray


# GELU with a hand-written backward pass that keeps only the input and re-evaluates the
# derivative inside the one fused loop that multiplies it by the incoming gradient: one pass over
# the activations each way. (Saving the derivative instead made the forward three passes on
# XLA:CPU, which does not fuse a loop with two outputs.) The exact form is `x * Phi(x)` with
# `Phi` from erf, as PyTorch computes it; `jax.nn.gelu`'s exact form goes through erfc, whose
# XLA:CPU expansion is ~3x slower, for a difference below 1e-6.
_SQRT_HALF = 2.0 ** -0.5
_INV_SQRT_2PI = (2.0 * math.pi) ** -0.5
_TANH_C = math.sqrt(2.0 / math.pi)


def _normal_cdf(xf):
    return 0.5 + 0.5 * jax.lax.erf(xf * _SQRT_HALF)


def _gelu_exact_formula(x):
    xf = x.astype(jnp.float32)
    return (xf * _normal_cdf(xf)).astype(x.dtype)


_gelu_exact = jax.custom_vjp(_gelu_exact_formula)


def _gelu_exact_bwd(x, g):
    xf = x.astype(jnp.float32)
    dydx = _normal_cdf(xf) + xf * jnp.exp(-0.5 * xf * xf) * _INV_SQRT_2PI
    return ((g.astype(jnp.float32) * dydx).astype(x.dtype),)


def _gelu_tanh_formula(x):
    return jax.nn.gelu(x, approximate=True)


_gelu_tanh = jax.custom_vjp(_gelu_tanh_formula)


def _gelu_tanh_bwd(x, g):
    xf = x.astype(jnp.float32)
    t = jnp.tanh(_TANH_C * (xf + 0.044715 * xf * xf * xf))
    dydx = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _TANH_C * (1.0 + 3 * 0.044715 * xf * xf)
    return ((g.astype(jnp.float32) * dydx).astype(x.dtype),)


def _keep_input(formula):
    # The forward rules call the plain formula, not the custom_vjp function: inside them it
    # would break forward-over-reverse (`jax.jvp` of `jax.grad`, `jax.hessian`).
    return lambda x: (formula(x), x)


_gelu_exact.defvjp(_keep_input(_gelu_exact_formula), _gelu_exact_bwd)
_gelu_tanh.defvjp(_keep_input(_gelu_tanh_formula), _gelu_tanh_bwd)


def _inexact(x):
    """`x` as an array of floats (integers promoted as `jax.nn.gelu` promotes them: the fast
    paths cast their result back to the input's dtype, which truncated GELU of integers)."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.result_type(float))


def _gelu(x):
    """Exact GELU, `x * Phi(x)`."""
    return _gelu_exact(_inexact(x)) if enabled("gelu_vjp") else jax.nn.gelu(x, approximate=False)


def _gelu_approx(x):
    """GELU's tanh approximation."""
    return _gelu_tanh(_inexact(x)) if enabled("gelu_vjp") else jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": _gelu,
    "gelu_tanh": _gelu_approx,
    "silu": jax.nn.silu,
    # gated variants (Shazeer 2020): act(x W_gate) * (x W_in); GEGLU with the tanh GELU, as
    # T5 v1.1 and its checkpoints compute it (the paper's exact GELU differs by ~1e-3)
    "swiglu": jax.nn.silu,
    "geglu": _gelu_approx,
    "reglu": jax.nn.relu,
}
GATED = ("swiglu", "geglu", "reglu")


def activation(name: str):
    """The elementwise function behind an activation name (gated names give the gate's)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not one of {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def matmul(x: Array, w: Array, barrier: bool = False) -> Array:
    """`x @ w` for `x [..., in]`, `w [in, out]`, with an optional CPU-friendly backward.

    With `barrier=True` the backward pass puts `lax.optimization_barrier` on the incoming
    gradient before its two matmuls. On XLA:CPU that stops the elementwise backward chain
    (activation', norm', residual) from being fused into the strided transpose the weight
    gradient needs. That halved a plain small GPT's step; with the backward passes of
    `ops.fast_paths` it measures neutral to slower, so models use it only when
    `TransformerConfig.matmul_barrier` is set. Math is unchanged. The weight gradient is
    accumulated in float32. Reverse mode only (a `custom_vjp`): `jax.jvp` of a model fails,
    `jax.jvp` of `jax.grad` (Hessian-vector products) works; with the fast path `matmul_vjp`
    off (`FLAXFORMER_LITE_DISABLE=matmul_vjp` or `all`) it is a plain `jnp.matmul`, without
    the barrier.
    """
    if jnp.ndim(w) != 2 or jnp.ndim(x) < 1 or jnp.shape(x)[-1] != jnp.shape(w)[0]:
        raise ValueError(f"matmul needs x [..., in] and w [in, out]; got x {jnp.shape(x)}, "
                         f"w {jnp.shape(w)}.")
    if not enabled("matmul_vjp"):
        return jnp.matmul(x, w)
    return _matmul(x, w, barrier)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: Array, w: Array, barrier: bool = False) -> Array:
    return jnp.matmul(x, w)


def matmul_padded_out(x: Array, w: Array, multiple: int, barrier: bool = False) -> Array:
    """`x @ w` (`x [..., in]`, `w [in, out]`) computed with `w`'s columns padded with zeros to a
    multiple of `multiple`, then sliced back to `[..., out]`: the same numbers, but a matmul
    whose output width accelerators tile evenly (a GPT-2 head of 50,257 columns is not).
    `multiple` 0 or a width that already fits: plain `matmul`."""
    pad = (-w.shape[-1]) % multiple if multiple else 0
    if not pad:
        return matmul(x, w, barrier)
    y = matmul(x, jnp.pad(w, ((0, 0), (0, pad))), barrier)
    return y[..., : w.shape[-1]]


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


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def column_sum(x: Array) -> Array:
    """Sum of `x [..., n]` over every axis but the last, as a float32 `[n]`.

    Computed as `ones @ x` (a matrix-vector product): XLA:CPU's column reduction of a large
    `[rows, n]` array is about 2x slower than its matrix-vector kernel.
    """
    x2 = x.reshape(-1, x.shape[-1])
    ones = jnp.ones((1, x2.shape[0]), x.dtype)
    return jnp.matmul(ones, x2, preferred_element_type=jnp.float32)[0]


def bias_add(y: Array, b: Array) -> Array:
    """`y + b` for `y [..., *b.shape]` (e.g. `b [n]`, or `[heads, head_dim]` unflattened).

    The bias gradient sums the cotangent over every leading axis in float32. Autodiff of
    `y + b` would sum a bfloat16 cotangent in bfloat16: on XLA:CPU a 4096-row bias gradient
    came out 3.8% off. For a 1-D bias the sum is a `column_sum` (fast path `bias_gemv`).
    """
    if jnp.ndim(b) > jnp.ndim(y) or jnp.shape(y)[jnp.ndim(y) - jnp.ndim(b):] != jnp.shape(b):
        raise ValueError(f"bias_add needs y [..., *b.shape]; got y {jnp.shape(y)}, "
                         f"b {jnp.shape(b)}.")
    # The custom gradient is y's own only when the sum keeps y's dtype (a float32 bias on
    # bfloat16 activations promotes: plain autodiff then casts y's gradient back).
    fast = enabled("bias_vjp") and jnp.result_type(y, b) == jnp.result_type(y)
    return _bias_add(y, b) if fast else y + b


@jax.custom_vjp
def _bias_add(y, b):
    return y + b


def _bias_add_fwd(y, b):
    return y + b, b


def _bias_add_bwd(b, g):
    if b.ndim == 1 and enabled("bias_gemv"):
        db = column_sum(g)
    else:
        db = jnp.sum(g, axis=tuple(range(g.ndim - b.ndim)), dtype=jnp.float32)
    return g, db.astype(b.dtype)


_bias_add.defvjp(_bias_add_fwd, _bias_add_bwd)


def _split(x: Array, axis: int) -> tuple[Array, ...]:
    return tuple(jax.lax.index_in_dim(x, i, axis, keepdims=False) for i in range(x.shape[axis]))


def unstack(x: Array, axis: int) -> tuple[Array, ...]:
    """`x` split along `axis` into `x.shape[axis]` arrays (e.g. q, k, v from a fused projection).

    Same values as indexing; the backward pass stacks the gradients in one copy, where the
    gradient of indexing pads each one to the full shape and adds the padded arrays.
    """
    return _unstack(x, axis) if enabled("unstack_vjp") else _split(x, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _unstack(x: Array, axis: int) -> tuple[Array, ...]:
    return _split(x, axis)


def _unstack_fwd(x, axis):
    return _split(x, axis), None


def _unstack_bwd(axis, _, grads):
    return (jnp.stack(grads, axis=axis),)


_unstack.defvjp(_unstack_fwd, _unstack_bwd)


def feed_forward(x: Array, w_in: Array, w_out: Array, *, activation_name: str = "relu",
                 b_in: Array | None = None, b_out: Array | None = None,
                 w_gate: Array | None = None, b_gate: Array | None = None) -> Array:
    """Position-wise feed-forward `act(x W_in + b_in) W_out + b_out` on `[..., d_model]`.

    Gated activations (swiglu, geglu, reglu) compute `act(x W_gate) * (x W_in)` and need `w_gate`.
    `w_in`, `w_gate`: `[d_model, d_ff]`; `w_out`: `[d_ff, d_model]`.
    """
    act = activation(activation_name)
    if (w_gate is not None or b_gate is not None) and activation_name not in GATED:
        raise ValueError(f"activation={activation_name!r} is not gated, so w_gate/b_gate would "
                         f"be ignored; use one of {', '.join(GATED)} or drop them.")
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


def _check_features(fn: str, x: Array, **params: Array | None) -> None:
    """A norm's scale and bias are `[features]` (a broadcastable `(1,)` ran forward, then
    failed in the hand-written gradient)."""
    for name, p in params.items():
        if p is not None and jnp.shape(p) != x.shape[-1:]:
            raise ValueError(f"{fn}: {name} has shape {jnp.shape(p)}; it must be [features] = "
                             f"{x.shape[-1:]}.")


def layer_norm(x: Array, scale: Array | None = None, bias: Array | None = None, *,
               eps: float = 1e-5) -> Array:
    """`(x - mean) / sqrt(var + eps) * scale + bias` over the last axis, computed in float32.

    `scale` and `bias` are optional (`[features]`); without a bias no bias gradient is computed.
    """
    _check_features("layer_norm", x, scale=scale, bias=bias)
    if scale is not None and enabled("layer_norm_vjp"):
        return _layer_norm(x, scale, bias, eps)
    return _affine_layer_norm(x, scale, bias, eps)[0]


def _affine_layer_norm(x, scale, bias, eps):
    """The forward formula (`scale` and `bias` may be None); also returns the float32 row mean
    and 1/std `[..., 1]` that the hand-written backward saves."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(var + eps)
    y = (xf - mean) * rstd
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype), mean, rstd


def rms_norm(x: Array, scale: Array | None = None, *, eps: float = 1e-6) -> Array:
    """`x / sqrt(mean(x^2) + eps) * scale` over the last axis (T5, LLaMA), in float32."""
    _check_features("rms_norm", x, scale=scale)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


# LayerNorm with a hand-written backward pass: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
# with g = dy * scale. It saves only the row mean and 1/std, where autodiff of the forward formula
# stores more and streams the activations several more times. The two row means are matrix-vector
# products with the scale, sum(g) = dy @ scale and sum(g * xhat) = (dy * xhat) @ scale, so g is
# never written out, dy * xhat is written once (the scale's gradient needs it too), and XLA:CPU
# does not split the reductions into its slower two-pass tree reduction.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps):
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    y, mean, rstd = _affine_layer_norm(x, scale, bias, eps)
    return y, (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, res, dy):
    x, mean, rstd, scale, bias = res
    n = x.shape[-1]
    dyf = dy.astype(jnp.float32)
    sf = scale.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dy_xhat = dyf * xhat
    mean_g = _row_dot(dyf, sf) / n
    mean_gx = _row_dot(dy_xhat, sf) / n
    dx = (dyf * sf - mean_g - xhat * mean_gx) * rstd
    dscale = _parameter_gradient(dy_xhat).astype(scale.dtype)
    dbias = None if bias is None else _parameter_gradient(dyf).astype(bias.dtype)
    return dx.astype(x.dtype), dscale, dbias


def _row_dot(a: Array, w: Array) -> Array:
    """`a [..., n] @ w [n]` as a float32 `[..., 1]`: one matrix-vector product."""
    a2 = a.reshape(-1, a.shape[-1])
    return jnp.dot(a2, w, preferred_element_type=jnp.float32).reshape(*a.shape[:-1], 1)


def _parameter_gradient(g: Array) -> Array:
    """Float32 `g [..., n]` summed over all but the last axis, as `column_sum` when enabled."""
    if enabled("bias_gemv"):
        return column_sum(g)
    return g.sum(tuple(range(g.ndim - 1)))


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)
