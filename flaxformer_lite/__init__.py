"""flaxformer_lite: the Transformer and its descendants as a functional JAX/Flax library.

Names are imported on first use (PEP 562), so `import flaxformer_lite.perf` (the first line of a
training script, before JAX starts) or `python -m flaxformer_lite.params` does not pay for
importing JAX and Flax first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_NAMES = {
    "PRESETS": "config", "TransformerConfig": "config", "get_config": "config",
    "gpu_config": "config",
    "DecoderLayer": "layers", "Dense": "layers", "Embed": "layers", "EncoderLayer": "layers",
    "FeedForward": "layers", "LayerStack": "layers", "MultiHeadAttention": "layers",
    "Norm": "layers", "RelativePositionBias": "layers", "TransformerLayer": "layers",
    "shift_right": "layers",
    "T5": "models", "Decoder": "models", "DecoderOnly": "models", "Encoder": "models",
    "EncoderDecoder": "models", "EncoderOnly": "models", "init_cache": "models",
    "init_params": "models", "make_model": "models", "merge_params": "models",
    "MergeReport": "models", "stack_layers": "models", "unstack_layers": "models",
}
_SUBMODULES = ("convert", "ops", "params")

__all__ = [
    "PRESETS", "T5", "Decoder", "DecoderLayer", "DecoderOnly", "Dense", "Embed", "Encoder",
    "convert", "EncoderDecoder", "EncoderLayer", "EncoderOnly", "FeedForward", "LayerStack",
    "MergeReport", "MultiHeadAttention", "Norm", "params", "RelativePositionBias",
    "TransformerConfig", "TransformerLayer", "get_config", "gpu_config", "init_cache",
    "init_params", "make_model", "merge_params", "ops", "shift_right", "stack_layers",
    "unstack_layers",
]


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # static analysers see the eager imports
    from flaxformer_lite import convert, ops, params
    from flaxformer_lite.config import PRESETS, TransformerConfig, get_config, gpu_config
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
        MergeReport,
        init_cache,
        init_params,
        make_model,
        merge_params,
        stack_layers,
        unstack_layers,
    )
