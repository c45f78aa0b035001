"""Pure functions holding the Transformer's math: no Flax, no state, all jit-compatible."""

from flaxformer_lite.ops.attention import (
    attention_weights,
    cached_attention,
    scaled_dot_product_attention,
)
from flaxformer_lite.ops.functional import (
    ACTIVATIONS,
    activation,
    bias_add,
    column_sum,
    feed_forward,
    layer_norm,
    matmul,
    matmul_padded_out,
    rms_norm,
    unstack,
)
from flaxformer_lite.ops.masks import (
    causal_mask,
    causal_mask_from_positions,
    combine_masks,
    make_attention_mask,
    padding_mask,
    prefix_lm_mask,
    segment_mask,
    sliding_window_mask,
)
from flaxformer_lite.ops.positions import (
    alibi_bias,
    alibi_slopes,
    apply_rotary,
    relative_position_bias,
    relative_position_bucket,
    segment_positions,
    sinusoidal_embedding,
    sinusoidal_table,
)

__all__ = [
    "ACTIVATIONS", "activation", "alibi_bias", "alibi_slopes", "apply_rotary",
    "attention_weights", "bias_add",
    "cached_attention", "causal_mask", "causal_mask_from_positions", "column_sum",
    "combine_masks", "feed_forward", "layer_norm",
    "make_attention_mask", "matmul", "matmul_padded_out", "padding_mask", "prefix_lm_mask",
    "relative_position_bias", "relative_position_bucket", "rms_norm",
    "scaled_dot_product_attention", "segment_mask", "segment_positions", "sliding_window_mask",
    "sinusoidal_embedding", "sinusoidal_table", "unstack",
]
