"""flaxformer_lite: the Transformer and its descendants as a functional JAX/Flax library."""

from flaxformer_lite import ops, params
from flaxformer_lite.config import PRESETS, TransformerConfig, get_config
from flaxformer_lite.layers import (
    DecoderLayer,
    Dense,
    Embed,
    EncoderLayer,
    FeedForward,
    LayerStack,
    MultiHeadAttention,
    Norm,
    RelativePositionBias,
    TransformerLayer,
    shift_right,
)
from flaxformer_lite.models import (
    T5,
    Decoder,
    DecoderOnly,
    Encoder,
    EncoderDecoder,
    EncoderOnly,
    init_cache,
    init_params,
    make_model,
)

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "T5", "Decoder", "DecoderLayer", "DecoderOnly", "Dense", "Embed", "Encoder",
    "EncoderDecoder", "EncoderLayer", "EncoderOnly", "FeedForward", "LayerStack",
    "MultiHeadAttention", "Norm", "params", "RelativePositionBias", "TransformerConfig",
    "TransformerLayer", "get_config", "init_cache", "init_params", "make_model", "ops",
    "shift_right",
]
