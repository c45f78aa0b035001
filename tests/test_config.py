"""Config validation: each bad value is a ValueError naming the field and the fix."""

import jax
import pytest

from flaxformer_lite import PRESETS, TransformerConfig, get_config


@pytest.mark.parametrize("changes, match", [
    (dict(d_model=100, num_heads=3), "d_model=100 is not divisible by num_heads=3"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads=3"),
    (dict(d_model=0), "d_model=0 must be a positive integer"),
    (dict(num_layers=-1), "num_layers"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(activation="tanh"), "activation='tanh' is not one of relu, gelu"),
    (dict(position="alibi"), "position='alibi' is not one of sinusoidal"),
    (dict(norm="batch"), "norm='batch' is not one of layer, rms"),
    (dict(norm_position="middle"), "norm_position"),
    (dict(dtype="float8"), "dtype"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(architecture="rnn"), "architecture"),
    (dict(pooler=True), "pooler"),
    (dict(position="rotary", head_dim=6, rotary_fraction=0.5), "rotary_fraction"),
    (dict(num_encoder_layers=2), "num_encoder_layers"),
])
def test_bad_values_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**changes)


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
