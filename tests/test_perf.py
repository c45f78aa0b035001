"""The CPU fast paths (hand-written backward passes, chunked attention) against plain autodiff,
and the process settings of `flaxformer_lite.perf`."""

import importlib.util
import json
import os
import subprocess
import sys
import types

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxformer_lite as fl
from flaxformer_lite import ops, perf
from flaxformer_lite.ops import attention as attention_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rand(*shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def reference_attention(q, k, v, bias=None, mask=None, is_causal=False):
    """Plain composition of public pieces: weights from `attention_weights`, then weights @ v."""
    b, lq, h, d = q.shape
    hk = k.shape[2]
    w = ops.attention_weights(q, k, bias=bias, mask=mask, is_causal=is_causal)
    w = w.reshape(b, hk, h // hk, lq, -1)
    return jnp.einsum("bhgqk,bkhd->bqhgd", w, v).reshape(b, lq, h, d)


def numpy_attention(q, k, v, bias=None, mask=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    if mask is not None:
        s = np.where(np.asarray(mask), s, -1e30)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


@pytest.fixture(params=["whole batch", "chunked", "query blocks", "chunked, query blocks",
                        "query chunks", "chunked, query chunks"])
def chunking(request, monkeypatch):
    """Run the CPU attention path on the whole batch or one batch row per chunk, causal
    attention in one block or in blocks of two queries (the last block shorter), and
    bidirectional attention in one piece or scanned over chunks of two queries (the remainder
    in a last call)."""
    if "chunked" in request.param:
        monkeypatch.setattr(attention_module, "_CHUNK_MIN_BYTES", 0)
        monkeypatch.setattr(attention_module, "_CHUNK_BYTES", 1)
    if "blocks" in request.param:
        monkeypatch.setattr(attention_module, "_query_block", lambda lq: 2)
    if "query chunks" in request.param:
        monkeypatch.setattr(attention_module, "_query_chunk",
                            lambda h, lq, lk, causal, chunk: lq if causal else 2)
    return request.param


@pytest.mark.parametrize("kv_heads, bias_kind, mask_kind", [
    (4, "none", "none"), (2, "shared", "causal"), (1, "per_row", "per_row"),
    (4, "per_row", "causal"), (2, "none", "per_row"), (4, "shared", "none"),
    (2, "per_key", "causal")])
def test_cpu_attention_matches_autodiff(chunking, kv_heads, bias_kind, mask_kind):
    assert jax.default_backend() == "cpu"
    b, lq, lk, h, d = 3, 5, 6, 4, 8
    q, k, v = rand(b, lq, h, d, seed=1), rand(b, lk, kv_heads, d, seed=2), rand(
        b, lk, kv_heads, d, seed=3)
    ct = rand(b, lq, h, d, seed=4)
    bias = {"none": None, "shared": rand(1, h, lq, lk, seed=5),
            "per_row": rand(b, 1, lq, lk, seed=5), "per_key": rand(1, h, 1, lk, seed=5)}[bias_kind]
    mask = None
    if mask_kind == "per_row":
        mask = np.array(jax.random.bernoulli(jax.random.key(6), 0.7, (b, 1, lq, lk)))
        mask[..., 0] = True  # every query sees a key
    causal = mask_kind == "causal"

    def loss(fn):
        def f(q, k, v, bias):
            return (fn(q, k, v, bias=bias, mask=mask, is_causal=causal) * ct).sum()
        return f

    args = (q, k, v, bias)
    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
    out = jax.jit(lambda *a: ops.scaled_dot_product_attention(
        *a[:3], bias=a[3], mask=mask, is_causal=causal))(*args)
    full_mask = mask
    if causal:
        full_mask = np.asarray(ops.causal_mask(lq, lk, offset=lk - lq))
    np.testing.assert_allclose(out, numpy_attention(q, k, v, bias, full_mask), atol=1e-5,
                               rtol=1e-5)
    got = jax.jit(jax.grad(loss(ops.scaled_dot_product_attention), argnums))(*args)
    want = jax.jit(jax.grad(loss(reference_attention), argnums))(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("lq, lk", [(6, 4), (4, 7)])
def test_cpu_attention_causal_with_unequal_lengths(chunking, lq, lk):
    """Queries are the last `lq` positions of the keys; with more queries than keys the first
    rows see no key at all (uniform weights, as `attention_weights`)."""
    q, k, v = rand(2, lq, 4, 8, seed=1), rand(2, lk, 2, 8, seed=2), rand(2, lk, 2, 8, seed=3)
    bias = rand(1, 4, lq, lk, seed=5)
    ct = rand(2, lq, 4, 8, seed=4)

    def loss(fn):
        return lambda q, k, v, bias: (fn(q, k, v, bias=bias, is_causal=True) * ct).sum()

    got = jax.jit(jax.value_and_grad(loss(ops.scaled_dot_product_attention), (0, 1, 2, 3)))(
        q, k, v, bias)
    want = jax.jit(jax.value_and_grad(loss(reference_attention), (0, 1, 2, 3)))(q, k, v, bias)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)


def test_causal_query_blocks_cover_the_keys_they_need():
    blocks = attention_module._blocks
    assert blocks(5, 5, False, 2) == [(0, 5, 5)]
    assert blocks(5, 5, True, 2) == [(0, 2, 2), (2, 4, 4), (4, 5, 5)]
    assert blocks(4, 7, True, 3) == [(0, 3, 6), (3, 4, 7)]  # queries are the last 4 keys
    for lq in (64, 128, 256, 1000, 4096):
        size = attention_module._query_block(lq)
        assert 32 <= size and -(-lq // size) <= 16


def test_cpu_attention_matches_jax_nn_gradients(chunking):
    q, k, v = rand(4, 8, 4, 16, seed=1), rand(4, 8, 2, 16, seed=2), rand(4, 8, 2, 16, seed=3)
    ct = rand(4, 8, 4, 16, seed=4)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v, is_causal=True) * ct).sum()

    got = jax.grad(loss(ops.scaled_dot_product_attention), (0, 1, 2))(q, k, v)
    want = jax.jit(jax.grad(loss(lambda *a, **kw: jax.nn.dot_product_attention(
        *a, **kw, implementation="xla")), (0, 1, 2)))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)


def test_batch_chunk_sizes():
    chunk = attention_module._batch_chunk
    assert chunk(64, 6 * 256 * 256) == 64  # 96 MiB of scores: whole batch
    assert chunk(12, 4 * 64 * 64) == 12
    assert chunk(16, 12 * 1024 * 1024) == 1  # gpt2 context: one 48 MiB row at a time
    assert chunk(64, 16 * 512 * 512) == 2  # 16 MiB rows, 32 MiB chunks
    for b in (6, 10, 64):
        assert b % chunk(b, 16 * 512 * 512) == 0
    # Bidirectional scores of one batch chunk past 256 MiB run in scanned query chunks of
    # ~32 MiB: one 8192-token row of 4 heads (1 GiB of scores) in 256-query chunks.
    queries = attention_module._query_chunk
    assert queries(4, 8192, 8192, False, 1) == 256
    assert queries(4, 8192, 8192, True, 1) == 8192  # causal: its query blocks instead
    assert queries(6, 256, 256, False, 64) == 256  # 96 MiB: whole
    assert queries(1, 65536, 65536, False, 1) == 128
    assert queries(64, 4096, 16384, False, 1) == 64  # at least 64 queries


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh"])
def test_gelu_backward_matches_autodiff(name):
    x = jnp.linspace(-9.0, 9.0, 2001)
    approximate = name == "gelu_tanh"
    act = ops.activation(name)
    # the exact form is x * Phi(x) through erf (jax.nn.gelu uses erfc): equal to float rounding
    np.testing.assert_allclose(act(x), jax.nn.gelu(x, approximate=approximate), atol=1e-6,
                               rtol=1e-6)
    got = jax.vmap(jax.grad(act))(x)
    want = jax.vmap(jax.grad(lambda z: jax.nn.gelu(z, approximate=approximate)))(x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # and both against float64: the formula, and a central difference of it
    x64 = np.linspace(-4.0, 4.0, 81)
    if approximate:
        def f(z):
            return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
    else:
        from math import erf
        def f(z):
            return 0.5 * z * (1 + np.vectorize(erf)(z / np.sqrt(2)))
    x32 = jnp.asarray(x64, jnp.float32)
    np.testing.assert_allclose(act(x32), f(x64), atol=1e-6, rtol=1e-6)
    fd = (f(x64 + 1e-6) - f(x64 - 1e-6)) / 2e-6
    np.testing.assert_allclose(jax.vmap(jax.grad(act))(x32), fd, atol=2e-5)
    # bfloat16 in, bfloat16 out (computed in float32 inside)
    xb = x32.astype(jnp.bfloat16)
    assert act(xb).dtype == jnp.bfloat16 and jax.grad(lambda z: act(z).sum())(xb).dtype == xb.dtype


@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_backward_matches_autodiff(with_bias):
    x = rand(3, 5, 32, seed=1) * 3 + 1
    scale, ct = rand(32, seed=2), rand(3, 5, 32, seed=4)
    bias = rand(32, seed=3) if with_bias else None

    def plain(x, s, b):
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * s
        return y if b is None else y + b

    def loss(fn):
        return lambda x, s, b: (fn(x, s, b) * ct).sum()

    args = (0, 1, 2) if with_bias else (0, 1)
    np.testing.assert_array_equal(ops.layer_norm(x, scale, bias), plain(x, scale, bias))
    got = jax.jit(jax.grad(loss(ops.layer_norm), args))(x, scale, bias)
    want = jax.grad(loss(plain), args)(x, scale, bias)
    assert len(got) == len(args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    y16 = ops.layer_norm(x.astype(jnp.bfloat16), scale, bias)
    assert y16.dtype == jnp.bfloat16


def test_unstack_matches_indexing():
    x = rand(2, 3, 3, 4, 5)
    parts = ops.unstack(x, 2)
    assert len(parts) == 3
    for i, p in enumerate(parts):
        np.testing.assert_array_equal(p, x[:, :, i])
    cts = [rand(2, 3, 4, 5, seed=i) for i in range(3)]
    got = jax.grad(lambda x: sum((p * c).sum() for p, c in zip(ops.unstack(x, 2), cts)))(x)
    np.testing.assert_array_equal(got, jnp.stack(cts, axis=2))


def test_bias_add_and_column_sum():
    y, b, ct = rand(4, 6, 16, seed=1), rand(16, seed=2), rand(4, 6, 16, seed=3)
    np.testing.assert_allclose(ops.column_sum(y), np.asarray(y, np.float64).sum((0, 1)),
                               atol=1e-5, rtol=1e-5)
    got = jax.jit(jax.grad(lambda y, b: (ops.bias_add(y, b) * ct).sum(), (0, 1)))(y, b)
    np.testing.assert_array_equal(got[0], ct)
    np.testing.assert_allclose(got[1], np.asarray(ct, np.float64).sum((0, 1)), atol=1e-5,
                               rtol=1e-5)


def test_model_gradients_same_with_fast_paths_off(monkeypatch):
    """A whole GPT's loss and gradients with every fast path and the matmul barrier on == with
    all of them off."""
    from flaxformer_lite import get_config, init_params, make_model
    from flaxformer_lite.ops import fast_paths

    def grads(barrier: bool):
        cfg = get_config("gpt2", vocab_size=50, d_model=32, num_heads=4, d_ff=64, num_layers=2,
                         max_len=16, dropout_rate=0.0, attention_dropout_rate=0.0,
                         matmul_barrier=barrier)
        model = make_model(cfg)
        params = init_params(cfg, jax.random.key(0))
        ids = jax.random.randint(jax.random.key(1), (3, 16), 0, 50)

        def loss(p):
            logits = model.apply({"params": p}, ids)
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])
        return jax.jit(jax.value_and_grad(loss))(params)  # a fresh trace reads the switches

    fast = grads(barrier=True)
    monkeypatch.setenv(fast_paths.ENV, ",".join(fast_paths.NAMES))
    plain = grads(barrier=False)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-4)


def test_forward_mode_of_a_model_with_every_fast_path_off(monkeypatch):
    """`jax.jvp` of a model's logits fails on the hand-written backward passes (matmul and
    bias_add's included); with FLAXFORMER_LITE_DISABLE=all it runs and its directional
    derivative equals the one reverse mode gives with the fast paths on."""
    from flaxformer_lite import get_config, init_params, make_model
    from flaxformer_lite.ops import fast_paths

    cfg = get_config("gpt2", vocab_size=50, d_model=32, num_heads=4, d_ff=64, num_layers=2,
                     max_len=16)
    model = make_model(cfg)
    params = flax.linen.meta.unbox(init_params(cfg, jax.random.key(0)))
    ids = jax.random.randint(jax.random.key(1), (2, 16), 1, 50)
    direction = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape), params)

    def logits(p):
        return model.apply({"params": p}, ids)

    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(logits, (params,), (direction,))
    out, vjp = jax.vjp(logits, params)
    cotangent = jax.random.normal(jax.random.key(3), out.shape)
    reverse = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(vjp(cotangent)[0]),
                                                 jax.tree.leaves(direction)))
    monkeypatch.setenv(fast_paths.ENV, "all")
    forward = jnp.vdot(cotangent, jax.jvp(logits, (params,), (direction,))[1])
    np.testing.assert_allclose(forward, reverse, rtol=1e-4)
    monkeypatch.setenv(fast_paths.ENV, "all,nonsense")
    with pytest.raises(ValueError, match=r"unknown fast paths \['nonsense'\].* and all"):
        fast_paths.enabled("gelu_vjp")


def _run(code: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": REPO, **env}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_configure_cpu_adds_flags_only_when_unset():
    code = ("import os, json; from flaxformer_lite import perf; a = perf.configure_cpu(); "
            "import jax; jax.devices(); "
            "print(json.dumps([a['xla_flags'], os.environ.get('XLA_FLAGS', '')]))")
    added, flags = json.loads(_run(code, {"XLA_FLAGS": ""}))
    assert added == [f"{k}={v}" for k, v in perf.CPU_XLA_FLAGS.items()]
    assert flags.split() == added
    user = "--xla_cpu_experimental_ynn_fusion_type=dot --xla_force_host_platform_device_count=2"
    added, flags = json.loads(_run(code, {"XLA_FLAGS": user}))
    assert added == [] and flags == user  # the user's value wins


def test_configure_cpu_after_backend_warns():
    code = ("import warnings, jax; jax.devices(); from flaxformer_lite import perf\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); a = perf.configure_cpu(malloc=False)\n"
            "print(len(w), a['xla_flags'])")
    assert _run(code, {}) == "1 []"


def test_compilation_cache_default_user_choice_and_off(tmp_path):
    code = ("import jax, jax.numpy as jnp; from flaxformer_lite import perf; "
            "d = perf.enable_compilation_cache(); "
            "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready(); "
            "print(d, jax.config.jax_compilation_cache_dir or 'unset')")
    clean = {"JAX_COMPILATION_CACHE_DIR": "", "FLAXFORMER_LITE_COMPILATION_CACHE": "",
             "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    default = tmp_path / "xdg" / "flaxformer_lite" / "jax"
    assert _run(code, clean) == f"{default} {default}"
    assert _run(code, {**clean, "FLAXFORMER_LITE_COMPILATION_CACHE": "0"}) == "None unset"
    user = tmp_path / "user"
    assert _run(code, {**clean, "JAX_COMPILATION_CACHE_DIR": str(user)}) == f"{user} {user}"
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    assert _run(code, {**clean, "FLAXFORMER_LITE_COMPILATION_CACHE": str(blocked / "c")}
                ) == "None unset"  # warns and runs uncached
    switch = tmp_path / "switch"
    assert _run(code, {**clean, "FLAXFORMER_LITE_COMPILATION_CACHE": str(switch)}
                ) == f"{switch} {switch}"


def test_step_compiler_options(monkeypatch):
    cpu, gpu = types.SimpleNamespace(platform="cpu"), types.SimpleNamespace(platform="gpu")
    monkeypatch.delenv("FLAXFORMER_LITE_ONEDNN", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setattr(perf, "cpu_vendor", lambda: "AuthenticAMD")  # measured slower there
    assert perf.step_compiler_options([cpu]) == {}
    monkeypatch.setenv("FLAXFORMER_LITE_ONEDNN", "1")  # unless asked for
    assert perf.step_compiler_options([cpu]) == perf.CPU_STEP_COMPILER_OPTIONS
    monkeypatch.delenv("FLAXFORMER_LITE_ONEDNN")
    monkeypatch.setattr(perf, "cpu_vendor", lambda: "GenuineIntel")
    assert perf.step_compiler_options([cpu, cpu]) == perf.CPU_STEP_COMPILER_OPTIONS
    assert perf.step_compiler_options([cpu, gpu]) == {}
    assert perf.step_compiler_options([]) == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=false")  # the user's flag wins
    assert "xla_cpu_use_onednn" not in perf.step_compiler_options([cpu])
    monkeypatch.setenv("FLAXFORMER_LITE_ONEDNN", "0")
    assert perf.step_compiler_options([cpu]) == {}


def test_cpu_vendor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert perf.cpu_vendor(str(info)) == "AuthenticAMD"
    info.write_text("processor\t: 0\nCPU implementer\t: 0x41\n")  # an Arm host names none
    assert perf.cpu_vendor(str(info)) == ""
    assert perf.cpu_vendor(str(tmp_path / "missing")) == ""


def test_jemalloc_env():
    env = perf.jemalloc_env({"PATH": "/bin"})
    if perf.jemalloc_path() is None:
        assert "LD_PRELOAD" not in env
    else:
        assert "jemalloc" in env["LD_PRELOAD"] and env["MALLOC_CONF"] == perf.JEMALLOC_CONF
    kept = perf.jemalloc_env({"LD_PRELOAD": "/usr/lib/libtcmalloc.so"})
    assert kept["LD_PRELOAD"] == "/usr/lib/libtcmalloc.so"


def test_benchmark_attention_and_decoding_sections_run(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(REPO, "experiments", "benchmark.py"),
           "--sections=attention,decoding,profile", "--attention_lengths=16,32",
           "--attention_heads=2", "--attention_head_dim=8", "--attention_repeats=1",
           "--decoding_batch=2", "--decoding_new_tokens=3", "--decoding_repeats=1",
           "--models=nanogpt-char", "--profile_steps=2", f"--out={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = res["attention"]["rows"]
    assert [r["length"] for r in rows] == [16, 32]
    for r in rows:
        assert r["ops"]["median_s"] > 0 and r["xla"]["median_s"] > 0
        assert r["max_abs_diff_vs_ops"]["xla"] < 1e-4
        if importlib.util.find_spec("torch") is not None:  # the bench extra is installed
            assert r["torch_sdpa"]["median_s"] > 0
        else:
            assert "torch_sdpa" not in r
    dec = res["decoding"]
    assert dec["model"] == "small" and dec["dtype"] == "float32"
    assert sorted((r["batch"], r["method"]) for r in dec["rows"]) == [
        (2, "kv cache"), (2, "no cache")]
    assert all(r["seconds"] > 0 for r in dec["rows"])
    # Each row is printed as soon as it is measured, so a run cut short keeps its rows.
    assert proc.stdout.count("decoding: batch ") == 2
    # The profile of a real step: every op's time lands in one category and one component,
    # and the metadata attributes nearly all of it to the model's parts and passes.
    prof = res["profile"]["nanogpt-char"]
    busy = prof["busy_s"]
    assert busy > 0 and prof["categories"]["matmul"]["seconds"] > 0
    assert sum(c["seconds"] for c in prof["categories"].values()) == pytest.approx(busy)
    assert 0 < prof["busy_wall_s"] <= min(busy, prof["wall_s"]) * (1 + 1e-9)
    comps = prof["components"]
    assert sum(sum(v.values()) for v in comps.values()) == pytest.approx(prof["busy_wall_s"])
    for name in ("attention projections", "attention: scores, softmax, values",
                 "feed-forward", "norms"):
        assert comps[name]["forward"] > 0 and comps[name]["backward"] > 0, name
        assert comps[name]["other"] == 0, name
    assert comps["optimizer update, rest"]["other"] > 0
    assert sum(comps.get("no metadata (rewritten by XLA)", {}).values()) < 0.2 * busy
    assert "by model component" in proc.stdout


def test_profile_splits_op_time_by_component_and_pass(load_script):
    bench = load_script("experiments/benchmark.py")
    hlo = "\n".join([
        "ENTRY %main {",
        '  %dot.1 = f32[8,4]{1,0} dot(%a, %b), metadata={op_name="jit(train_step)/'
        'transpose(jvp(DecoderOnly))/decoder/layers/layer_0/mlp/wi/dot_general"}',
        '  %exp_fusion.2 = f32[8,4]{1,0} fusion(%dot.1), kind=kLoop, metadata={op_name='
        '"jit(train_step)/jvp(DecoderOnly)/decoder/layers/layer_1/self_attention/exp"}',
        '  %fusion.5 = f32[8,4]{1,0} fusion(%dot.1), kind=kLoop, metadata={op_name='
        '"jit(train_step)/jvp(DecoderOnly)/decoder/layers/layer_1/self_attention_norm/mul"}',
        '  ROOT %add.4 = f32[8,4]{1,0} add(%x, %y), metadata={op_name="jit(train_step)/add"}',
        "  %copy.3 = f32[8,4]{1,0} copy(%dot.1)",
        "}"])
    names = bench.hlo_op_names(hlo)
    assert names["dot.1"].endswith("mlp/wi/dot_general") and "copy.3" not in names
    assert bench.op_component(names["exp_fusion.2"]) == (
        "attention: scores, softmax, values", "forward")
    assert bench.op_component(
        "jit(f)/transpose(jvp(T5))/encoder/layers/layer_0/cross_attention/key_value/add") == (
        "attention projections", "backward")
    meta = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": 7,
             "args": {"name": "XLAEigen"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "python"}}]

    def op(name, ts, dur=1.0, tid=7):
        return {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": ts, "dur": dur}

    # Two steps; the matmul's time runs to its completion marker; a host-side event on
    # another thread is no op, nor is a loop around the ops. Microseconds.
    events = meta + [op("dot.1", 0, 2), op("end: dot.1", 30), op("exp_fusion.2", 10, 10),
                     op("fusion.5", 40, 10), op("add.4", 50, 20), op("copy.3", 70, 10),
                     op("python_work", 80, 100, tid=8), op("while.9", 0, 80)]
    events += [dict(e, ts=e["ts"] + 1000) for e in events if e["ph"] == "X"]
    out = bench.summarize_trace({"traceEvents": events}, 2, 2000e-6, names)
    assert out["busy_s"] == pytest.approx(80e-6)
    # In flight: [0, 30] (the exp inside it) and [40, 80] of each step's 1000.
    assert out["busy_wall_s"] == pytest.approx(70e-6)
    assert out["idle_s"] == pytest.approx((2000 - 2 * 70) * 1e-6 / 2)
    # The step's time: the matmul and the exp share [10, 20] half and half.
    matmul = out["categories"]["matmul"]
    assert (matmul["seconds"], matmul["wall_seconds"]) == (pytest.approx(30e-6),
                                                           pytest.approx(25e-6))
    comps = out["components"]
    assert comps["feed-forward"] == {"forward": 0, "backward": pytest.approx(25e-6), "other": 0}
    assert comps["attention: scores, softmax, values"]["forward"] == pytest.approx(5e-6)
    assert comps["norms"]["forward"] == pytest.approx(10e-6)
    assert comps["optimizer update, rest"]["other"] == pytest.approx(20e-6)
    assert comps["no metadata (rewritten by XLA)"]["other"] == pytest.approx(10e-6)
    assert [bench.op_category(n) for n in ("dot.1", "all-reduce.3", "Rendezvous",
                                           "wrapped_reduce.2", "exp_fusion.2")] == [
        "matmul", "collective/wait", "collective/wait", "reduction", "elementwise"]


def test_profile_reads_gpu_stream_kernels(load_script):
    """On a GPU the ops are the kernels on the device's streams, named by their HLO op in
    `args.hlo_op`; host threads, even in the device's process, are no ops."""
    bench = load_script("experiments/benchmark.py")
    names = {"dot.1": "jit(train_step)/jvp(DecoderOnly)/decoder/layers/layer_0/mlp/wi/dot_general",
             "fusion.2": "jit(train_step)/transpose(jvp(DecoderOnly))/decoder/layers/layer_0/"
                         "self_attention/exp"}
    meta = [{"ph": "M", "name": "process_name", "pid": 3, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 4, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 3, "tid": 1,
             "args": {"name": "Stream #12(Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": 3, "tid": 2,
             "args": {"name": "Stream #14(Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": 3, "tid": 9,
             "args": {"name": "XlaModule"}},
            {"ph": "M", "name": "thread_name", "pid": 4, "tid": 5, "args": {"name": "python"}}]

    def kernel(name, hlo, ts, dur, tid=1, pid=3):
        return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur,
                "args": {"hlo_op": hlo} if hlo else {}}

    events = meta + [kernel("sm90_xmma_gemm_f32", "dot.1", 0, 6),
                     kernel("loop_exp_fusion", "fusion.2", 4, 4, tid=2),
                     kernel("jit_train_step", None, 0, 10, tid=9),
                     kernel("Execute", None, 0, 10, tid=5, pid=4)]
    out = bench.summarize_trace({"traceEvents": events}, 1, 20e-6, names)
    assert out["busy_s"] == pytest.approx(10e-6) and out["busy_wall_s"] == pytest.approx(8e-6)
    assert out["idle_s"] == pytest.approx(12e-6)
    comps = out["components"]
    assert comps["feed-forward"]["forward"] == pytest.approx(5e-6)  # [4, 6] shared
    assert comps["attention: scores, softmax, values"]["backward"] == pytest.approx(3e-6)
    assert out["top"][0]["op"] == "dot.1" and out["categories"]["matmul"]["ops"] == 1


def test_benchmark_decoding_models(load_script):
    bench = load_script("experiments/benchmark.py")
    gpt2 = bench.decoding_config("gpt2", "bfloat16")
    assert (gpt2.num_layers, gpt2.d_model, gpt2.vocab_size, gpt2.dtype) == (
        12, 768, 50257, "bfloat16")
    assert bench.decoding_config("small").vocab_size == 256
    with pytest.raises(ValueError, match="decoding_model"):
        bench.decoding_config("gpt3")


@pytest.mark.slow
def test_benchmark_train_section_runs(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(REPO, "experiments", "benchmark.py"),
           "--sections=train", "--models=nanogpt-char", "--frameworks=jax", "--repeats=1",
           "--round_seconds=0.01", "--variant=dp2:cpu_devices=2,microbatches=2",
           "--variant=b24l1:batch=24,cfg.num_layers=1", f"--out={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (res,) = json.loads(out.read_text())["train"]
    row, dp2, b24l1 = res["rows"]
    assert row["framework"] == "jax" and row["step_s"] > 0 and row["devices"] == 1
    assert row["flops_per_token"] > 6 * 800_000  # 6N with N ~ 0.8M parameters, plus attention
    assert 0 < row["mfu_measured_matmul"] and row["mfu_datasheet"] is None
    # The MFU reference is the best matmul rate of any round: JAX with the step's compile
    # options and, where it has any (oneDNN on Intel CPUs), without them (no PyTorch here).
    by_round = res["matmul_flops_per_s_by_round"]
    with_options = bool(perf.step_compiler_options(jax.devices()))
    assert len(by_round["jax"]) == 1 and not by_round["torch"]
    assert len(by_round["jax_default"]) == (1 if with_options else 0)
    assert res["matmul_peak_flops_per_s"] == max(by_round["jax"] + by_round["jax_default"])
    assert row["mfu_measured_matmul"] == pytest.approx(
        row["achieved_flops_per_s"] / res["matmul_peak_flops_per_s"])
    # The same step data parallel over the CPU as two devices, each device's rows in two
    # micro-batches: after as many steps, the same loss.
    assert dp2["framework"] == "dp2" and dp2["devices"] == 2 and dp2["step_s"] > 0
    assert dp2["flops_per_token"] == row["flops_per_token"]
    np.testing.assert_allclose(dp2["loss"], row["loss"], rtol=1e-4)
    # Another batch size and depth: its own tokens count, the speed ratio is per token (one
    # round, so the round's median is the row's step time), and it is credited with its own
    # model's FLOPs.
    assert (row["batch"], b24l1["batch"]) == (12, 24)
    assert b24l1["tokens_per_s"] == pytest.approx(24 * 64 / b24l1["step_s"])
    assert b24l1["speed_vs_jax"] == pytest.approx(row["step_s"] / b24l1["step_s"] * 2)
    from flaxformer_lite.params import flops_per_token
    base_cfg = fl.get_config("gpt2", vocab_size=res["shape"]["vocab"], num_layers=4,
                             d_model=128, num_heads=4, d_ff=512, max_len=64)
    assert row["flops_per_token"] == flops_per_token(base_cfg, 64)["total"]
    assert b24l1["flops_per_token"] == flops_per_token(base_cfg.replace(num_layers=1),
                                                       64)["total"]
    assert b24l1["achieved_flops_per_s"] == pytest.approx(
        b24l1["flops_per_token"] * b24l1["tokens_per_s"])


def test_benchmark_flags_and_ratios(load_script, capsys):
    """Bad flags stop the command before any worker starts, naming the flag; speed ratios pair
    the same rounds; datasheet peaks match the most specific device name."""
    bench = load_script("experiments/benchmark.py")
    for argv, match in [
            (["--variant=mb:microbatch=2"], "unknown key 'microbatch'"),
            (["--variant=jax:batch=24"], "name of its own"),
            (["--variant=a:batch=2", "--variant=a:batch=3"], "row names must differ"),
            (["--variant=a:cpu_devices=two"], "cpu_devices='two'"),
            (["--frameworks=troch"], "unknown 'troch'"),
            (["--repeats=0"], "not a positive integer"),
            (["--decoding_batch=1,a"], "--decoding_batch"),
            (["--attention_lengths=1k"], "--attention_lengths")]:
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2 and match in capsys.readouterr().err, argv
    assert bench._parse_variant("a:XLA_FLAGS=--x,cfg.num_layers=2,batch=4") == (
        "a", {"XLA_FLAGS": "--x"}, {"num_layers": 2}, {"batch": 4})
    nan = float("nan")
    assert bench.speed_ratio([1.0, 2.0, 3.0], [nan, 2.0, 3.0]) == 1.0
    assert bench.speed_ratio([2.0, 4.0], [1.0, 1.0], ref_work=2.0) == 1.5
    assert bench.datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert bench.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.datasheet_peak("cpu") is None


def test_launcher_sets_environment():
    code = ("import os; print(os.environ.get('LD_PRELOAD', ''), '|',"
            " os.environ.get('GLIBC_TUNABLES', ''), '|', os.environ['XLA_FLAGS'])")
    out = subprocess.run([sys.executable, "-m", "flaxformer_lite.perf", "-c", code],
                         capture_output=True, text=True, timeout=60,
                         env={**_allocator_free_env(), "PYTHONPATH": REPO, "XLA_FLAGS": ""})
    assert out.returncode == 0, out.stderr
    preload, tunables, flags = out.stdout.strip().split("|")
    jemalloc, hugepages = _expected_allocator_env()
    assert ("jemalloc" in preload) == jemalloc
    assert (perf.GLIBC_HUGEPAGE_TUNABLE in tunables) == hugepages
    assert flags.split() == [f"{k}={v}" for k, v in perf.CPU_XLA_FLAGS.items()]


def test_fast_path_switches(monkeypatch):
    from flaxformer_lite.ops import fast_paths
    monkeypatch.setenv(fast_paths.ENV, "gelu_vjp, bias_gemv")
    assert not fast_paths.enabled("gelu_vjp") and not fast_paths.enabled("bias_gemv")
    assert fast_paths.enabled("cpu_attention")
    monkeypatch.setenv(fast_paths.ENV, "gelu_vjpp")
    with pytest.raises(ValueError, match="gelu_vjpp"):
        fast_paths.enabled("gelu_vjp")


def _allocator_free_env(*drop: str) -> dict[str, str]:
    """This process's environment without allocator settings (and without `drop`)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", *drop)}


def _expected_allocator_env() -> tuple[bool, bool]:
    """(jemalloc preloaded, huge pages tunable) that `allocator_env` gives on this machine."""
    if perf.jemalloc_path() is not None:
        return True, False
    return False, "GLIBC_TUNABLES" in perf.hugepage_env(_allocator_free_env())


@pytest.mark.parametrize("opt_out", [False, True])
def test_relaunch_with_fast_malloc(tmp_path, opt_out):
    script = tmp_path / "script.py"
    script.write_text("import os, sys\nfrom flaxformer_lite import perf\n"
                      "perf.relaunch_with_fast_malloc()\n"
                      "print(os.environ.get('LD_PRELOAD', ''), '|',"
                      " os.environ.get('GLIBC_TUNABLES', ''), '|', sys.argv[1:])\n")
    env = _allocator_free_env("FLAXFORMER_LITE_RELAUNCHED")
    env.update(PYTHONPATH=REPO, FLAXFORMER_LITE_RELAUNCH="0" if opt_out else "1")
    out = subprocess.run([sys.executable, str(script), "--flag=1"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    preload, tunables, args = out.stdout.strip().split("|")
    assert args.strip() == "['--flag=1']"  # same arguments after the relaunch
    jemalloc, hugepages = _expected_allocator_env()
    assert ("jemalloc" in preload) == (jemalloc and not opt_out)
    assert (perf.GLIBC_HUGEPAGE_TUNABLE in tunables) == (hugepages and not opt_out)


def test_relaunch_leaves_a_script_read_from_stdin_running():
    """`python - < script.py`: the relaunch reran `python -` on the consumed stdin, so the rest
    of the script never ran (exit status 0)."""
    code = ("import os\nfrom flaxformer_lite import perf\n"
            "print('relaunched' if perf.relaunch_with_fast_malloc() else 'kept',"
            " os.environ.get('FLAXFORMER_LITE_RELAUNCHED', ''))\n")
    env = _allocator_free_env("FLAXFORMER_LITE_RELAUNCHED")
    env.update(PYTHONPATH=REPO, FLAXFORMER_LITE_RELAUNCH="1")
    out = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["kept"]


def test_transparent_hugepages_and_glibc_version(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert perf.transparent_hugepages(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert perf.transparent_hugepages(str(f)) == "always"
    assert perf.transparent_hugepages(str(tmp_path / "missing")) == ""
    v = perf.glibc_version()
    assert v is None or (v[0] == 2 and v[1] > 0)


def test_hugepage_env():
    on = dict(thp="madvise", glibc=(2, 36))
    env = perf.hugepage_env({"PATH": "/bin"}, **on)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": perf.GLIBC_HUGEPAGE_TUNABLE}
    # Other tunables are kept; the user's own hugetlb setting wins.
    env = perf.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, **on)
    assert env["GLIBC_TUNABLES"] == ("glibc.malloc.tcache_count=0:"
                                     + perf.GLIBC_HUGEPAGE_TUNABLE)
    mine = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert perf.hugepage_env(mine, **on) == mine
    # Nothing to gain: pages huge already, or none; an old glibc; another allocator.
    assert perf.hugepage_env({}, thp="always", glibc=(2, 36)) == {}
    assert perf.hugepage_env({}, thp="never", glibc=(2, 36)) == {}
    assert perf.hugepage_env({}, thp="madvise", glibc=(2, 31)) == {}
    jem = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}
    assert perf.hugepage_env(jem, **on) == jem


def test_hugepages_cut_page_faults():
    """The tunable does what it is for: a large block malloc'd, touched and freed over and over
    costs a fraction of the page faults (glibc maps and unmaps it each time)."""
    if "GLIBC_TUNABLES" not in perf.hugepage_env({}):
        pytest.skip("transparent huge pages in madvise mode and glibc >= 2.35 needed")
    code = ("import ctypes, resource\n"
            "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p\n"
            "libc.free.argtypes = [ctypes.c_void_p]\n"
            "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(5):\n"  # 64 MiB each time, written through, freed
            "    p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20); libc.free(p)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)\n")
    faults = {}
    plain = _allocator_free_env()
    for name, env in (("plain", plain), ("huge", perf.hugepage_env(plain))):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        faults[name] = int(out.stdout)
    assert faults["plain"] > 5 * 16_000  # 4 KiB pages: 16k faults per 64 MiB block
    assert faults["huge"] < faults["plain"] / 10, faults


def test_perf_import_does_not_start_jax_and_package_names_resolve():
    code = ("import sys; import flaxformer_lite.perf; before = 'jax' in sys.modules; "
            "import flaxformer_lite as fl; "
            "ok = all(getattr(fl, n) is not None for n in fl.__all__); "
            "print(before, ok, sorted(fl.__all__) == sorted([*fl._NAMES, *fl._SUBMODULES]))")
    assert _run(code, {}) == "False True True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_lower_thread_priority_affects_only_the_calling_thread():
    import threading

    seen = {}

    def work():
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        seen["done"] = perf.lower_thread_priority(3)
        seen["change"] = os.getpriority(os.PRIO_PROCESS, tid) - before

    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == {"done": True, "change": 3}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


def test_compiled_ahead_compiles_once_and_calls_wait_for_it(caplog):
    """A function warmed up in the background is not compiled again by its first call, and a
    program lowered by the caller and compiled ahead is not either."""
    import logging

    def doubled_sine(x):
        return jnp.sin(x) * 2

    def halved_cosine(x):
        return jnp.cos(x) / 2

    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    sine = perf.CompiledAhead(jax.jit(doubled_sine))
    cosine = perf.CompiledAhead(jax.jit(halved_cosine))
    before = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)  # process-wide: the warm-up runs on a thread
    try:
        with caplog.at_level(logging.WARNING):
            sine.warm_up(jax.ShapeDtypeStruct(x.shape, x.dtype))
            cosine.compile_ahead(cosine.lower(x))
            assert sine.compiling and cosine.compiling  # the first calls must wait for these
            out = sine(x), cosine(x)
    finally:
        jax.config.update("jax_log_compiles", before)
    assert not sine.compiling and not cosine.compiling
    for name in ("doubled_sine", "halved_cosine"):
        assert sum(f"Compiling jit({name})" in r.getMessage() for r in caplog.records) == 1
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(out[0], np.sin(x64) * 2, rtol=1e-6)
    np.testing.assert_allclose(out[1], np.cos(x64) / 2, rtol=1e-6, atol=1e-7)


def test_compiled_ahead_warm_up_raises_tracing_errors_at_once():
    """A sampler that cannot trace (lm.py with temperature 0) used to fail only at its first
    call, the first evaluation, after that many training steps; the thread swallowed it."""
    def refuses(x):
        raise ValueError("temperature=0.0 must be a finite number > 0")

    fn = perf.CompiledAhead(jax.jit(refuses))
    with pytest.raises(ValueError, match="temperature"):
        fn.warm_up(jax.ShapeDtypeStruct((3,), jnp.float32))
    assert not fn.compiling
