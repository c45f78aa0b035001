"""The pure functions against float64 NumPy references and jax.nn.dot_product_attention."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import ops

B, LQ, LK, H, D = 2, 5, 7, 4, 8


def np_attention(q, k, v, mask=None, bias=None, scale=None):
    """float64 reference; q [b,q,h,d], k/v [b,k,hk,d]; mask/bias broadcast to [b,h,q,k]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    h, hk = q.shape[2], k.shape[2]
    k = np.repeat(k, h // hk, axis=2)
    v = np.repeat(v, h // hk, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    if mask is not None:
        s = np.where(np.asarray(mask), s, -1e30)
    s = s - s.max(-1, keepdims=True)
    w = np.exp(s)
    w = w / w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v), w


def rand(*shape, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def masks():
    rng = np.random.default_rng(0)
    kv_valid = np.ones((B, LK), bool)
    kv_valid[0, 5:] = False
    q_seg = np.array([[1, 1, 2, 2, 2], [1, 1, 1, 1, 0]])
    kv_seg = np.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0]])
    return {
        "none": None,
        "causal": np.asarray(ops.causal_mask(LQ, LK, offset=LK - LQ)),
        "padding": np.asarray(ops.padding_mask(np.ones((B, LQ), bool), kv_valid)),
        "segment": np.asarray(ops.segment_mask(q_seg, kv_seg)),
        "combined": np.asarray(ops.combine_masks(
            ops.causal_mask(LQ, LK, offset=LK - LQ), ops.padding_mask(np.ones((B, LQ)),
                                                                      kv_valid))),
        "per_head": rng.random((B, H, LQ, LK)) > 0.3,
    }


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("mask_name", ["none", "causal", "padding", "segment", "combined",
                                       "per_head"])
def test_attention_matches_numpy_and_jax(mask_name, kv_heads):
    q, k, v = rand(B, LQ, H, D, seed=1), rand(B, LK, kv_heads, D, seed=2), rand(
        B, LK, kv_heads, D, seed=3)
    mask = masks()[mask_name]
    if mask is not None and not mask.any(-1).all():  # rows with no key: defined but not compared
        mask = mask | (np.arange(LK) == 0)
    out, w = ops.scaled_dot_product_attention(q, k, v, mask=mask, return_weights=True)
    ref, ref_w = np_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(w, ref_w, atol=1e-6)
    jax_out = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else jnp.asarray(
        np.broadcast_to(mask, (B, H, LQ, LK))), implementation="xla")
    np.testing.assert_allclose(out, jax_out, atol=1e-5, rtol=1e-5)
    delegated = ops.scaled_dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(delegated, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_bias_and_is_causal(kv_heads):
    q, k, v = rand(B, LQ, H, D, seed=4), rand(B, LK, kv_heads, D, seed=5), rand(
        B, LK, kv_heads, D, seed=6)
    bias = rand(1, H, LQ, LK, seed=7)
    causal = np.asarray(ops.causal_mask(LQ, LK, offset=LK - LQ))
    out = ops.scaled_dot_product_attention(q, k, v, bias=bias, is_causal=True)
    ref, _ = np_attention(q, k, v, mask=causal, bias=bias)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    out_xla = ops.scaled_dot_product_attention(q, k, v, bias=bias, is_causal=True,
                                               implementation="xla")
    np.testing.assert_allclose(out_xla, ref, atol=1e-5, rtol=1e-5)


def test_attention_jits_and_differentiates():
    q, k, v = rand(B, LQ, H, D, seed=1), rand(B, LK, 2, D, seed=2), rand(B, LK, 2, D, seed=3)
    f = jax.jit(lambda q, k, v: ops.scaled_dot_product_attention(q, k, v).sum())
    g = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda q, k, v: jax.nn.dot_product_attention(q, k, v).sum(),
                     argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_bfloat16_softmax_in_float32():
    q, k, v = rand(B, LQ, H, D, seed=1), rand(B, LK, H, D, seed=2), rand(B, LK, H, D, seed=3)
    out16, w16 = ops.scaled_dot_product_attention(
        q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
        return_weights=True)
    assert out16.dtype == jnp.bfloat16 and w16.dtype == jnp.float32
    ref, _ = np_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(out16, np.float32), ref, atol=3e-2, rtol=3e-2)


def test_attention_dropout():
    q, k, v = rand(B, LQ, H, D, seed=1), rand(B, LK, H, D, seed=2), rand(B, LK, H, D, seed=3)
    base = ops.scaled_dot_product_attention(q, k, v)
    same = ops.scaled_dot_product_attention(q, k, v, dropout_rate=0.5)  # no rng: no dropout
    np.testing.assert_array_equal(base, same)
    f = jax.jit(lambda r: ops.scaled_dot_product_attention(q, k, v, dropout_rate=0.5,
                                                           dropout_rng=r))
    a, a2, b = f(jax.random.key(1)), f(jax.random.key(1)), f(jax.random.key(2))
    np.testing.assert_array_equal(a, a2)
    assert not np.allclose(a, b)
    # Inverted dropout is unbiased: the mean over many keys approaches the undropped output.
    mean = jnp.mean(jax.vmap(f)(jax.random.split(jax.random.key(3), 2000)), axis=0)
    np.testing.assert_allclose(mean, base, atol=0.08)


def test_attention_errors():
    q = rand(B, LQ, 3, D)
    k = rand(B, LK, 2, D)
    with pytest.raises(ValueError, match="multiple"):
        ops.scaled_dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="implementation"):
        ops.scaled_dot_product_attention(q, q, q, implementation="flash")
    if jax.default_backend() != "gpu":  # was JAX's bare "cuDNN is not detected"
        with pytest.raises(ValueError, match="attention_implementation.*needs an NVIDIA GPU"):
            ops.scaled_dot_product_attention(q, q, q, implementation="cudnn")
    with pytest.raises(ValueError, match="dropout"):
        ops.scaled_dot_product_attention(q, q, q, implementation="xla", dropout_rate=0.1,
                                         dropout_rng=jax.random.key(0))
    with pytest.raises(ValueError, match="even number"):
        ops.apply_rotary(rand(1, 2, 1, 6), jnp.arange(2), fraction=0.5)
    x = rand(2, 3, 8)
    for bad in (dict(scale=jnp.ones(1)), dict(scale=jnp.ones(8), bias=jnp.zeros((1, 8)))):
        with pytest.raises(ValueError, match=r"must be \[features\]"):
            ops.layer_norm(x, **bad)
    with pytest.raises(ValueError, match=r"must be \[features\]"):
        ops.rms_norm(x, jnp.ones(()))
    # A gate given to an ungated activation was silently unused.
    w = rand(8, 16)
    with pytest.raises(ValueError, match="'gelu' is not gated.*w_gate"):
        ops.feed_forward(x, w, w.T, activation_name="gelu", w_gate=w)
    # The decoding path checks its bias and mask as the main function does (it failed in a
    # five-dimensional broadcast).
    qc, new_kv, cache = rand(2, 1, 4, D), rand(2, 1, 2, D), rand(2, 2, 6, D)
    for bad in (dict(bias=jnp.zeros((1, 4, 1, 5))), dict(mask=jnp.ones((2, 1, 2, 6), bool))):
        with pytest.raises(ValueError, match=r"of shape .* does not broadcast to \[batch, heads"):
            ops.cached_attention(qc, cache, cache, new_kv, new_kv, 2, **bad)


@pytest.mark.parametrize("implementation", ["ops", "xla"])
def test_attention_refuses_mismatched_operands_on_every_path(implementation):
    """The CPU path used to slice a longer v, mask or bias down to fit, and a float additive
    mask (0 / -1e9) was read as booleans: it attended everything *but* the allowed keys."""
    q, k = rand(2, 5, 4, 8), rand(2, 5, 4, 8)
    attend = functools.partial(ops.scaled_dot_product_attention, implementation=implementation)
    cases = [
        (dict(q=q, k=k, v=rand(2, 6, 4, 8)), "k, v must share"),
        (dict(q=q, k=rand(1, 5, 4, 8), v=rand(1, 5, 4, 8)), "batch sizes must agree"),
        (dict(q=q, k=rand(2, 5, 4, 6), v=rand(2, 5, 4, 6)), "head_dim"),
        (dict(q=q, k=k, v=k, mask=jnp.ones((2, 1, 5, 6), bool)), "mask of shape"),
        (dict(q=q, k=k, v=k, bias=jnp.zeros((1, 4, 7, 5))), "bias of shape"),
        (dict(q=q, k=k, v=k, bias=jnp.zeros((1, 3, 5, 5))), "bias of shape"),
        (dict(q=q, k=k, v=k, mask=jnp.where(ops.causal_mask(5), 0.0, -1e9)), "as `bias=`"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            attend(**kwargs)
    # Broadcastable masks and biases still pass: [q, k], [b, 1, 1, k], [1, h, q, k].
    for extra in (dict(mask=ops.causal_mask(5)), dict(mask=jnp.ones((2, 1, 1, 5), bool)),
                  dict(bias=jnp.zeros((1, 4, 5, 5)))):
        assert attend(q, k, k, **extra).shape == q.shape


def test_attention_scale_may_be_traced_and_masks_may_be_integers():
    """A scale from the caller's jit (the CPU path compiles its scale in, so such a call
    takes the plain path), and a 0/1 int mask on every implementation."""
    q, k = rand(B, LQ, 2, D, seed=3), rand(B, LK, 2, D, seed=4)
    want = ops.scaled_dot_product_attention(q, k, k, scale=0.5)
    got = jax.jit(lambda s: ops.scaled_dot_product_attention(q, k, k, scale=s))(0.5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    mask = np.asarray(ops.causal_mask(LQ, LK), np.int32)
    want = ops.scaled_dot_product_attention(q, k, k, mask=mask.astype(bool))
    for impl in ("ops", "xla"):
        np.testing.assert_allclose(
            ops.scaled_dot_product_attention(q, k, k, mask=mask, implementation=impl), want,
            rtol=1e-5, atol=1e-6, err_msg=impl)


@pytest.mark.parametrize("kv_heads, new, dtype, index", [
    (4, 1, "float32", 4), (2, 3, "float32", 4),  # one decoded token; a prompt chunk
    (2, 3, "float32", 0),  # a prompt into an empty cache: the prefill's own branch
    (2, 1, "bfloat16", 4), (2, 3, "bfloat16", 4),  # grouped bfloat16 dots XLA:CPU cannot run
    (2, 3, "bfloat16", 0)])
def test_cached_attention_equals_attention_over_the_written_cache(kv_heads, new, dtype, index):
    """Reading the cache before the write gives attention over the cache after it."""
    length = 9
    normal = np.random.default_rng(0).standard_normal  # (jax.random compiles per shape)

    def draw(shape):  # values the dtype holds exactly, so the reference sees the same inputs
        return np.asarray(jnp.asarray(normal(shape), dtype), np.float32)

    atol = 2e-5 if dtype == "float32" else 2e-2
    q = draw((B, new, H, D))
    k_new, v_new = draw((2, B, new, kv_heads, D))
    # Stale slots (>= index) hold garbage: they must not matter.
    k_cache, v_cache = draw((2, B, kv_heads, length, D))
    written_k = np.asarray(k_cache).transpose(0, 2, 1, 3).copy()
    written_v = np.asarray(v_cache).transpose(0, 2, 1, 3).copy()
    written_k[:, index:index + new], written_v[:, index:index + new] = k_new, v_new
    # The decoder's mask: valid slots (row 1 has a padded slot) up to each new token.
    valid = np.ones((B, length), bool)
    valid[1, 2] = False
    slots = np.arange(length)
    causal = slots[None, :] <= index + np.arange(new)[:, None]
    mask = valid[:, None, None, :] & causal[None, None]
    bias = normal((1, H, new, length), np.float32)
    jitted = jax.jit(ops.cached_attention, static_argnames=("causal",))

    def attend(*arrays, **kw):
        out = jitted(*(jnp.asarray(x, dtype) for x in arrays[:5]), *arrays[5:], **kw)
        assert out.dtype == dtype
        return np.asarray(out, np.float32)

    for kw in (dict(mask=mask), dict(mask=mask, bias=bias)):
        ref, _ = np_attention(q, written_k, written_v, **kw)
        out = attend(q, k_cache, v_cache, k_new, v_new, index, **kw)
        np.testing.assert_allclose(out, ref, atol=atol)
    # Without a mask the new tokens attend the valid slots and, causally, each other.
    ref, _ = np_attention(q, written_k, written_v,
                          mask=np.broadcast_to(slots[None, :] <= index + np.arange(new)[:, None],
                                               (B, H, new, length)))
    out = attend(q, k_cache, v_cache, k_new, v_new, jnp.int32(index))
    np.testing.assert_allclose(out, ref, atol=atol)
    # A mask that is not causal (a prefix LM's) stays as given: the prefill's branch used to
    # add causality (`causal=True` says the mask is causal, for its query blocks).
    prefix = np.zeros((B, 1, new, length), bool)
    prefix[..., :index + new] = True
    ref, _ = np_attention(q, written_k, written_v, mask=np.broadcast_to(prefix, (B, H, new,
                                                                                length)))
    np.testing.assert_allclose(attend(q, k_cache, v_cache, k_new, v_new, index, mask=prefix),
                               ref, atol=atol)
    np.testing.assert_allclose(attend(q, k_cache, v_cache, k_new, v_new, index, mask=mask,
                                      causal=True), np_attention(q, written_k, written_v,
                                                                 mask=mask)[0], atol=atol)


def test_mask_builders_match_loops():
    q_seg = np.array([[1, 1, 2, 0]])
    kv_seg = np.array([[1, 2, 2, 0, 1]])
    seg = np.asarray(ops.segment_mask(q_seg, kv_seg))[0, 0]
    for i in range(4):
        for j in range(5):
            assert seg[i, j] == (q_seg[0, i] == kv_seg[0, j] and q_seg[0, i] != 0)
    causal = np.asarray(ops.causal_mask(3, 5, offset=2))[0, 0]
    for i in range(3):
        for j in range(5):
            assert causal[i, j] == (j <= i + 2)
    pad = np.asarray(ops.padding_mask(np.array([[5, 0]]), np.array([[7, 9, 0]])))[0, 0]
    np.testing.assert_array_equal(pad, [[True, True, False], [False, False, False]])
    packed = np.asarray(ops.make_attention_mask(np.array([[1, 1, 2, 2]]), causal=True))[0, 0]
    expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(packed, expected)
    # Per-segment positions given once serve both sides of self-attention (the keys used to
    # default to the row index, which masked every query of the second segment).
    for side in ("q_positions", "kv_positions"):
        by_position = ops.make_attention_mask(np.array([[1, 1, 2, 2]]), causal=True,
                                              **{side: np.array([[0, 1, 0, 1]])})
        np.testing.assert_array_equal(np.asarray(by_position)[0, 0], expected)
    assert ops.combine_masks(None, None) is None


def test_window_and_prefix_masks_match_loops():
    for q_len, kv_len, window, offset in ((5, 5, 2, 0), (3, 7, 3, 4), (4, 4, 10, 0)):
        got = np.asarray(ops.sliding_window_mask(q_len, kv_len, window=window, offset=offset))
        assert got.shape == (1, 1, q_len, kv_len)
        for i in range(q_len):
            for j in range(kv_len):
                assert got[0, 0, i, j] == (i + offset - window < j <= i + offset), (i, j)
    prefix = np.array([3, 0, 5])
    got = np.asarray(ops.prefix_lm_mask(prefix, 5))
    assert got.shape == (3, 1, 5, 5)
    for b in range(3):
        for i in range(5):
            for j in range(5):
                assert got[b, 0, i, j] == (j <= i or j < prefix[b]), (b, i, j)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=f"window={bad!r}"):
            ops.sliding_window_mask(4, window=bad)
    np.testing.assert_array_equal(ops.sliding_window_mask(4, window=np.int64(2)),
                                  ops.sliding_window_mask(4, window=2))


def test_alibi_slopes_and_bias_follow_the_paper():
    """Slopes: 2^-1 ... 2^-8 for 8 heads (Press et al. 2022); for 12, the 8-head slopes then
    the odd-indexed ones of 16 heads, 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 (the reference code)."""
    np.testing.assert_allclose(ops.alibi_slopes(8), [2.0 ** -i for i in range(1, 9)])
    np.testing.assert_allclose(ops.alibi_slopes(12), [2.0 ** -i for i in range(1, 9)]
                               + [2.0 ** -(i + 0.5) for i in range(4)], rtol=1e-6)
    np.testing.assert_allclose(ops.alibi_slopes(1), [2.0 ** -8])
    np.testing.assert_array_equal(ops.alibi_slopes(np.int64(12)), ops.alibi_slopes(12))
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="num_heads"):
            ops.alibi_slopes(bad)
    q, k = np.array([[3, 4]]), np.array([[0, 1, 2, 3, 4]])
    bias = np.asarray(ops.alibi_bias(12, q, k))
    slopes = ops.alibi_slopes(12)
    assert bias.shape == (1, 12, 2, 5)
    for h in range(12):
        for i in range(2):
            for j in range(5):
                assert bias[0, h, i, j] == pytest.approx(-slopes[h] * abs(q[0, i] - k[0, j]))
    assert ops.alibi_bias(4, np.arange(3), np.arange(5)).shape == (1, 4, 3, 5)


def test_sinusoidal_matches_paper_formula():
    length, d = 50, 16
    table = np.asarray(ops.sinusoidal_embedding(jnp.arange(length), d))
    for pos in range(length):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert abs(table[pos, 2 * i] - math.sin(angle)) < 1e-5
            assert abs(table[pos, 2 * i + 1] - math.cos(angle)) < 1e-5
    np.testing.assert_allclose(ops.sinusoidal_table(length, d), table, atol=1e-5)


def test_rotary_matches_complex_reference_and_is_relative():
    x = np.asarray(rand(1, 6, 2, 8, seed=9), np.float64)
    pos = np.arange(6) + 3
    out = np.asarray(ops.apply_rotary(jnp.asarray(x, jnp.float32), pos[None]))
    half = 4
    freqs = 10000.0 ** (-np.arange(half) * 2.0 / 8)
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * pos[None, :, None, None] * freqs)
    np.testing.assert_allclose(out, np.concatenate([z.real, z.imag], -1), atol=1e-5)
    # q.k depends only on the position difference.
    q, k = rand(1, 1, 1, 8, seed=10), rand(1, 1, 1, 8, seed=11)

    def score(pq, pk):
        return float((ops.apply_rotary(q, jnp.array([[pq]])) *
                      ops.apply_rotary(k, jnp.array([[pk]]))).sum())

    assert abs(score(5, 2) - score(105, 102)) < 1e-4
    partial = ops.apply_rotary(jnp.asarray(x, jnp.float32), pos[None], fraction=0.5)
    np.testing.assert_array_equal(np.asarray(partial)[..., 4:], np.float32(x[..., 4:]))


def _t5_bucket(rel, bidirectional, num_buckets=32, max_distance=128):
    """Scalar T5 bucket, written from the paper's description."""
    ret = 0
    n = -rel
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            ret += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                          * (num_buckets - max_exact))
    return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets(bidirectional):
    rel = np.arange(-300, 300)
    got = np.asarray(ops.relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional))
    want = np.array([_t5_bucket(int(r), bidirectional) for r in rel])
    np.testing.assert_array_equal(got, want)
    assert got.min() >= 0 and got.max() < 32


def test_relative_bias_shapes():
    table = rand(32, H)
    bias = ops.relative_position_bias(table, jnp.arange(3), jnp.arange(5), bidirectional=True,
                                      num_buckets=32, max_distance=128)
    assert bias.shape == (1, H, 3, 5)
    np.testing.assert_allclose(bias[0, :, 1, 1], table[0])


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "swiglu", "geglu"])
def test_feed_forward_matches_numpy(act):
    x = np.asarray(rand(3, 8, seed=1), np.float64)
    w_in, w_out, w_gate = (np.asarray(rand(*s, seed=i + 2), np.float64)
                           for i, s in enumerate([(8, 16), (16, 8), (8, 16)]))
    b_in = np.asarray(rand(16, seed=7), np.float64)
    erf = np.vectorize(math.erf)
    fns = {
        "relu": lambda z: np.maximum(z, 0),
        "gelu": lambda z: 0.5 * z * (1 + erf(z / math.sqrt(2))),
        "gelu_tanh": lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) *
                                                      (z + 0.044715 * z ** 3))),
    }
    fns["swiglu"] = lambda z: z / (1 + np.exp(-z))
    fns["geglu"] = fns["gelu_tanh"]
    h = x @ w_in + b_in
    ref = (fns[act](x @ w_gate) * h if act in ("swiglu", "geglu") else fns[act](h)) @ w_out
    gated = act in ops.functional.GATED
    got = ops.feed_forward(*(jnp.asarray(a, jnp.float32) for a in (x, w_in, w_out)),
                           activation_name=act, b_in=jnp.asarray(b_in, jnp.float32),
                           w_gate=jnp.asarray(w_gate, jnp.float32) if gated else None)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_norms_match_numpy():
    x = np.asarray(rand(4, 16, seed=1), np.float64) * 3 + 1
    scale, bias = np.linspace(0.5, 1.5, 16), np.linspace(-1, 1, 16)
    ln = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * scale + bias
    np.testing.assert_allclose(ops.layer_norm(jnp.float32(x), jnp.float32(scale),
                                              jnp.float32(bias)), ln, atol=1e-5)
    np.testing.assert_allclose(ops.layer_norm(jnp.float32(x), jnp.float32(scale)), ln - bias,
                               atol=1e-5)
    rms = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(ops.rms_norm(jnp.float32(x), jnp.float32(scale)), rms, atol=1e-5)
    assert ops.rms_norm(jnp.bfloat16(x)).dtype == jnp.bfloat16


@pytest.mark.parametrize("barrier", [False, True])
def test_matmul_gradient_matches_plain(barrier):
    x, w = rand(3, 4, 8, seed=1), rand(8, 5, seed=2)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.tanh(f(x, w)))

    got = jax.jit(jax.grad(loss(lambda x, w: ops.matmul(x, w, barrier)), (0, 1)))(x, w)
    want = jax.grad(loss(jnp.matmul), (0, 1))(x, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias_shape, fast", [((96,), True), ((96,), False), ((3, 4, 8), True)])
def test_bfloat16_bias_gradient_is_summed_in_float32(monkeypatch, bias_shape, fast):
    """The bias gradient of a bfloat16 layer sums 4096 rows; summed in bfloat16 (plain
    autodiff of `y + b` on XLA:CPU) it was 3.8% off. Reference: the float64 sum of the same
    bfloat16 cotangent; allowed: the final rounding to bfloat16 (2**-8 relative)."""
    from flaxformer_lite.ops import fast_paths

    if not fast:
        monkeypatch.setenv(fast_paths.ENV, "bias_gemv")
    rng = np.random.default_rng(0)
    shape = (64, 64, *bias_shape)
    y = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    b = jnp.zeros(bias_shape, jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal(shape) + 0.5, jnp.bfloat16)
    db = jax.jit(lambda y, b, g: jax.vjp(ops.bias_add, y, b)[1](g)[1])(y, b, g)
    assert db.dtype == jnp.bfloat16 and db.shape == bias_shape
    ref = np.asarray(g, np.float64).sum(axis=(0, 1))
    np.testing.assert_allclose(np.asarray(db, np.float64), ref, rtol=2 ** -8)


def test_bfloat16_causal_kv_gradients_are_summed_in_float32():
    """The causal CPU path sums one k/v gradient per query block; summed in bfloat16, 16
    blocks made dk 5x less accurate than dq (1.5e-2 against float32's gradients)."""
    length, heads, dim = 1024, 2, 16
    rng = np.random.default_rng(0)
    q, k, v, ct = (jnp.asarray(rng.standard_normal((1, length, heads, dim)), jnp.bfloat16)
                   for _ in range(4))

    def loss(implementation, dtype):
        def f(q, k, v):
            out = ops.scaled_dot_product_attention(
                q.astype(dtype), k.astype(dtype), v.astype(dtype), is_causal=True,
                implementation=implementation)
            return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32))
        return jax.jit(jax.grad(f, (0, 1, 2)))

    got = loss("ops", jnp.bfloat16)(q, k, v)
    want = loss("xla", jnp.float32)(*(x.astype(jnp.float32) for x in (q, k, v)))
    for name, g, w in zip("qkv", got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w)
        assert np.abs(g - w).max() / np.abs(w).max() < 5e-3, name  # bfloat16's rounding


@pytest.mark.parametrize("is_causal", [False, True])
def test_fast_paths_keep_each_input_dtype_in_mixed_precision(is_causal):
    """bfloat16 activations with float32 biases or keys (a researcher's own mix): the custom
    gradients of bias_add and attention's q came back float32, which a lax.scan carry
    refuses; plain autodiff (the reference) keeps each input's dtype. GELU of integers was
    truncated back to integers."""
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.standard_normal((4, 8)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal(8), jnp.float32)
    gy, gb = jax.grad(lambda y, b: jnp.sum(ops.bias_add(y, b)), (0, 1))(y, b)
    assert (gy.dtype, gb.dtype) == (jnp.bfloat16, jnp.float32)
    q = jnp.asarray(rng.standard_normal((1, 6, 2, 4)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((1, 6, 2, 4)), jnp.float32) for _ in range(2))

    def step(carry, _):  # q as a scan carry: its gradient must keep q's dtype
        out = ops.scaled_dot_product_attention(carry, k, v, is_causal=is_causal)
        return out.astype(carry.dtype), None

    dq = jax.grad(lambda q: jnp.sum(jax.lax.scan(step, q, None, length=2)[0]
                                    .astype(jnp.float32)))(q)
    assert dq.dtype == jnp.bfloat16 and bool(jnp.isfinite(dq.astype(jnp.float32)).all())
    ints = jnp.arange(-2, 4)
    for name in ("gelu", "gelu_tanh"):
        np.testing.assert_allclose(ops.activation(name)(ints),
                                   jax.nn.gelu(ints, approximate=name == "gelu_tanh"),
                                   rtol=1e-6, atol=1e-6)


def test_a_traced_dropout_rate_is_applied():
    """A dropout rate passed as a jit argument (a sweep) failed in a bool conversion."""
    q = rand(B, LQ, H, D, seed=1)
    f = jax.jit(lambda rate: ops.scaled_dot_product_attention(
        q, q, q, dropout_rate=rate, dropout_rng=jax.random.key(0)))
    np.testing.assert_array_equal(f(0.5), jax.jit(lambda: ops.scaled_dot_product_attention(
        q, q, q, dropout_rate=0.5, dropout_rng=jax.random.key(0)))())
    np.testing.assert_allclose(f(0.0), ops.scaled_dot_product_attention(q, q, q), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_forward_over_reverse_through_the_fast_paths(activation):
    """A Hessian-vector product (`jax.jvp` of `jax.grad`) through GELU and the fused q/k/v
    split: their forward rules called the custom_vjp functions, which forward mode refuses."""
    x = jnp.linspace(-3.0, 3.0, 12).reshape(3, 4)

    def f(x):
        a, b, c = ops.unstack(jnp.stack([x, 2 * x, x * x]), 0)
        return jnp.sum(ops.activation(activation)(a * b + c))

    def plain(x):
        return jnp.sum(jax.nn.gelu(3 * x * x, approximate=activation == "gelu_tanh"))

    t = jnp.ones_like(x)
    hvp = jax.jvp(jax.grad(f), (x,), (t,))[1]
    np.testing.assert_allclose(hvp, jax.jvp(jax.grad(plain), (x,), (t,))[1], rtol=1e-4,
                               atol=1e-4)


def test_matmul_bias_add_and_empty_queries_are_refused_before_the_backward_pass():
    x = jnp.ones((3, 4))
    for w in (jnp.ones((4, 4, 4)), jnp.ones((4,)), jnp.ones((5, 2))):
        with pytest.raises(ValueError, match="matmul needs x"):
            ops.matmul(x, w)
    for y, b in ((jnp.ones((3, 5, 8)), jnp.ones((1, 8))), (jnp.ones((3, 5, 1)), jnp.ones(8))):
        with pytest.raises(ValueError, match="bias_add needs"):
            ops.bias_add(y, b)
    q = jnp.ones((1, 0, 2, 4))
    kv = jnp.ones((1, 3, 2, 4))
    with pytest.raises(ValueError, match="no queries"):
        ops.scaled_dot_product_attention(q, kv, kv, is_causal=True)


def test_every_attention_entry_point_checks_its_inputs():
    """The functions beside `scaled_dot_product_attention` used to skip its checks: a float
    additive mask was read as booleans (attending everything but the allowed keys), a 3-D q
    failed in an unpack, and a cache index past the end was clamped onto the last slots."""
    q, k = rand(2, 5, 4, 8), rand(2, 5, 4, 8)
    additive = jnp.where(ops.causal_mask(5), 0.0, -1e9)
    with pytest.raises(ValueError, match="as `bias=`"):
        ops.attention_weights(q, k, mask=additive)
    with pytest.raises(ValueError, match=r"\[batch, length, heads, head_dim\]"):
        ops.attention_weights(q[0], k)
    cache = rand(2, 4, 9, 8)  # [batch, kv_heads, slots, head_dim]
    new = rand(2, 1, 4, 8)
    with pytest.raises(ValueError, match="as `bias=`"):
        ops.cached_attention(q[:, :1], cache, cache, new, new, 3, mask=jnp.zeros((1, 1, 1, 9)))
    with pytest.raises(ValueError, match=r"k_cache"):
        ops.cached_attention(q[:, :1], cache[0], cache, new, new, 3)
    with pytest.raises(ValueError, match="do not fit a cache of 9 slots"):
        ops.cached_attention(q[:, :1], cache, cache, new, new, 9)
    assert ops.cached_attention(q[:, :1], cache, cache, new, new, 8).shape == (2, 1, 4, 8)
    for rate in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"dropout_rate=.* \[0, 1\)"):
            ops.scaled_dot_product_attention(q, k, k, dropout_rate=rate,
                                             dropout_rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"\[batch, length, heads, head_dim\]"):
        ops.apply_rotary(rand(5, 4, 8), jnp.arange(5))
    with pytest.raises(ValueError, match="even d_model"):
        ops.sinusoidal_table(4, 7)
    with pytest.raises(ValueError, match=r"8 rows for num_buckets=32"):
        ops.relative_position_bias(jnp.zeros((8, 4)), jnp.arange(5), jnp.arange(5),
                                   bidirectional=True, num_buckets=32, max_distance=128)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_delegated_attention_keeps_the_advised_mask_value_finite(dtype):
    """`bias=jnp.finfo(jnp.float32).min`, the value the mask error advises, rounds to -inf in
    bfloat16/float16; jax's attention then gave NaN outputs and gradients on padded rows."""
    q = rand(2, 4, 2, 8, dtype=dtype)
    valid = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
    bias = jnp.where(valid[:, None, None, :] & valid[:, None, :, None], 0.0,
                     jnp.finfo(jnp.float32).min)

    def loss(q):
        out = ops.scaled_dot_product_attention(q, q, q, bias=bias, implementation="xla")
        return jnp.sum(jnp.where(valid[:, :, None, None], out, 0).astype(jnp.float32))

    value, grad = jax.value_and_grad(loss)(q)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad, np.float32)))
    ref = ops.scaled_dot_product_attention(q.astype(jnp.float32), q.astype(jnp.float32),
                                           q.astype(jnp.float32), mask=valid[:, None, None, :])
    out = ops.scaled_dot_product_attention(q, q, q, bias=bias, implementation="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32)[0], np.asarray(ref)[0], atol=3e-2)
    np.testing.assert_allclose(np.asarray(out, np.float32)[1, :2], np.asarray(ref)[1, :2],
                               atol=3e-2)


def test_segment_positions_restart_with_each_segment():
    rng = np.random.default_rng(0)
    seg = np.sort(rng.integers(0, 4, (5, 17)), axis=1)[:, ::-1].copy()  # 3, 3, 2, ..., 0
    seg[0] = 1  # one long segment
    want = np.zeros_like(seg)
    for b in range(seg.shape[0]):
        for t in range(1, seg.shape[1]):
            want[b, t] = want[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
    np.testing.assert_array_equal(ops.segment_positions(seg), want)
