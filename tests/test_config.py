"""Config validation: each bad value is a ValueError naming the field and the fix."""

import jax
import pytest

from flaxformer_lite import PRESETS, TransformerConfig, get_config, params


@pytest.mark.parametrize("changes, match", [
    (dict(d_model=100, num_heads=3), "d_model=100 is not divisible by num_heads=3"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads=3"),
    (dict(d_model=0), "d_model=0 must be a positive integer"),
    (dict(num_layers=-1), "num_layers"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(activation="tanh"), "activation='tanh' is not one of relu, gelu"),
    (dict(position="xpos"), "position='xpos' is not one of sinusoidal"),
    (dict(norm="batch"), "norm='batch' is not one of layer, rms"),
    (dict(norm_position="middle"), "norm_position"),
    (dict(dtype="float8"), "dtype"),
    (dict(param_dtype="float64"), "float64.*is not supported.*float32 precision"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(architecture="rnn"), "architecture"),
    (dict(pooler=True), "pooler"),
    (dict(position="rotary", head_dim=6, rotary_fraction=0.5), "rotary_fraction"),
    (dict(position="rotary", head_dim=8, rotary_fraction=0.1), "at least 2.*it rotates 0"),
    (dict(num_encoder_layers=2), "num_encoder_layers"),
    # Values that used to pass and give NaN logits, or fail later without naming the field.
    (dict(dropout_rate=None), "dropout_rate=None must be a finite number"),
    (dict(norm_eps=float("nan")), "norm_eps=nan"),
    (dict(norm_eps="1e-5"), "norm_eps='1e-5'"),
    (dict(init_std=-0.02), "init_std"),
    (dict(init="xavier"), "init"),
    (dict(position="sinusoidal", d_model=33, num_heads=3), "d_model=33 must be even"),
    (dict(position="rotary", rotary_base=0.0), "rotary_base"),
    (dict(position="rotary", rotary_base=1.0), "rotary_base=1.0"),  # one rate for every pair
    (dict(vocab_size=1), "vocab_size=1 must be at least 2"),
    (dict(position="rotary", rotary_fraction=float("nan")), "rotary_fraction"),
    (dict(position="relative", relative_num_buckets=2), "relative_num_buckets=2"),
    (dict(position="relative", relative_max_distance=8), "relative_max_distance=8"),
    (dict(architecture="encoder_only", type_vocab_size=2.5), "type_vocab_size=2.5"),
    (dict(scan_layers="yes"), "scan_layers='yes' must be True or False"),
    # Settings another field makes ignored: a sweep over them would train one model.
    (dict(rotary_base=5e5), "rotary_base=500000.0 has no effect with position='learned'"),
    (dict(position="rotary", relative_max_distance=64), "relative_max_distance=64 has no"),
    (dict(share_encoder_decoder_embeddings=False), "share_encoder_decoder_embeddings=False"),
    (dict(init="t5", init_std=0.5), "init_std=0.5 has no effect with init='t5'"),
    (dict(architecture="encoder_only", padding="trailing"), "padding='trailing' has no effect"),
    (dict(attention_implementation="xla", attention_dropout_rate=0.1),
     "'xla' has no attention dropout.*attention_dropout_rate=0.0"),
    (dict(pad_id=256), r"pad_id=256 must be a token id in \[0, vocab_size=256\) or None"),
    (dict(pad_id=True), "pad_id=True"),
    (dict(eos_id=256), r"eos_id=256 must be a token id in \[0, vocab_size=256\) or None"),
    (dict(eos_id=0), "eos_id=0 is the padding id"),
    (dict(pad_id=None, eos_id=True), "eos_id=True"),
    (dict(architecture="encoder_decoder", eos_id=0), "eos_id=0 is the padding id"),
    (dict(architecture="encoder_only", eos_id=2), "eos_id=2 has no effect"),
    (dict(architecture="encoder_decoder", pad_id=None), "pad_id=None has no effect"),
])
def test_bad_values_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**changes)


def test_relative_buckets_at_the_limit_are_valid_buckets():
    """The smallest accepted settings give in-range buckets, every distance a bucket."""
    import numpy as np

    from flaxformer_lite.ops import relative_position_bucket

    for architecture, bidirectional in (("decoder_only", False), ("encoder_only", True)):
        exact = 4 // (2 if not bidirectional else 4)
        TransformerConfig(architecture=architecture, position="relative",
                          relative_num_buckets=4, relative_max_distance=exact + 1)
        buckets = np.asarray(relative_position_bucket(
            np.arange(-50, 51), bidirectional=bidirectional, num_buckets=4,
            max_distance=exact + 1))
        assert buckets.min() >= 0 and buckets.max() < 4


def test_replace_revalidates_and_configs_hash():
    cfg = get_config("gpt2")
    with pytest.raises(ValueError, match="num_heads"):
        cfg.replace(num_heads=5)
    assert hash(cfg) == hash(get_config("gpt2"))
    assert jax.jit(lambda x, c: x * c.d_model, static_argnums=1)(1.0, cfg) == 768.0


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="gpt3-175b"):
        get_config("gpt4")


def test_presets_have_expected_shapes():
    assert set(PRESETS) >= {"transformer-base", "transformer-big", "bert-base", "bert-large",
                            "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt3-small",
                            "gpt3-medium", "gpt3-large", "gpt3-xl", "gpt3-2.7b", "gpt3-6.7b",
                            "gpt3-13b", "gpt3-175b", "t5-small", "t5-base", "t5-large"}
    big = get_config("transformer-big")
    assert (big.d_model, big.d_ff, big.num_heads, big.encoder_layers) == (1024, 4096, 16, 6)
    g = get_config("gpt3-175b")
    assert (g.num_layers, g.d_model, g.num_heads, g.dim_per_head) == (96, 12288, 96, 128)


@pytest.mark.parametrize("name", ["gpt2", "bert-base", "t5-small", "transformer-base"])
def test_gpu_config_keeps_the_parameters_and_applies_the_settings(name):
    from flaxformer_lite import gpu_config, params

    base = get_config(name)
    fast = gpu_config(name, trailing_padding=True)
    # No parameter changes (counted through the `ops` attention: cuDNN does not trace on a CPU).
    assert params.breakdown(fast.replace(attention_implementation="ops")) == params.breakdown(base)
    assert (fast.dtype, fast.param_dtype, fast.vocab_pad_multiple) == ("bfloat16", "float32", 128)
    # cuDNN has no attention dropout: presets trained with it keep their implementation.
    expected = "cudnn" if base.attention_dropout_rate == 0 else base.attention_implementation
    assert fast.attention_implementation == expected
    # The trailing-padding promise only means something to a decoder-only model.
    assert fast.padding == ("trailing" if base.architecture == "decoder_only" else "anywhere")
    assert gpu_config(name).padding == "anywhere"


def test_gpu_config_overrides_win():
    from flaxformer_lite import gpu_config

    config = gpu_config("gpt2", trailing_padding=True, attention_dropout_rate=0.0,
                        dtype="float16", vocab_pad_multiple=64, num_layers=2)
    assert config.attention_implementation == "cudnn"  # dropout off: cuDNN
    assert (config.dtype, config.vocab_pad_multiple, config.num_layers) == ("float16", 64, 2)
    with pytest.raises(ValueError, match="vocab_pad_multiple"):
        gpu_config("gpt2", vocab_pad_multiple=-1)


def test_numpy_scalars_and_dtype_objects_are_plain_values():
    """NumPy ints were refused (d_model=np.int64(16)) while NumPy floats passed through, and
    `dtype=jnp.bfloat16`, Flax's spelling, was refused."""
    import jax.numpy as jnp
    import numpy as np

    c = get_config("gpt2", d_model=np.int64(64), num_heads=np.int32(4), dtype=jnp.bfloat16,
                   dropout_rate=np.float32(0.5), use_bias=np.bool_(False))
    plain = get_config("gpt2", d_model=64, num_heads=4, dtype="bfloat16", dropout_rate=0.5,
                       use_bias=False)
    assert c == plain and hash(c) == hash(plain) and type(c.d_model) is int


def test_a_shrunk_t5_preset_shrinks_its_heads():
    c = get_config("t5-small", d_model=32, num_heads=2)
    assert c.dim_per_head == 16 and get_config("t5-base").dim_per_head == 64


def test_untying_t5_names_the_preset_field_to_change():
    """The message blamed scale_tied_logits, which only the preset had set."""
    with pytest.raises(ValueError, match="also set scale_tied_logits=False"):
        get_config("t5-small", tie_embeddings=False)
    v11 = get_config("t5-small", activation="geglu", tie_embeddings=False,
                     scale_tied_logits=False, d_ff=1024, num_heads=6, head_dim=64, num_layers=8)
    assert params.count(v11) == 76_961_152  # google/t5-v1_1-small
