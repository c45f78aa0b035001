"""Character-level GPT on the offline default corpus (the Python standard library's docstrings).

The README's first command: a real language model trained in a few minutes on any CPU.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from flaxformer_lite.config import model_config_dict


def get_config():
    c = ml_collections.ConfigDict()
    c.dataset = "embedded"  # a text file/folder, "embedded", or a TFDS name (tiny_shakespeare)
    c.data_dir = ""  # prepared data and tokenizers; "" = the library default
    c.tokenizer = "char"  # char | byte | bpe | unigram
    c.vocab_size = 0  # SentencePiece vocabulary size
    c.sampler = "windows"  # windows (random windows of the running text) | packed (documents)
    c.seq_len = 64
    c.batch_size = 12
    c.eval_batch_size = 128
    c.eval_batches = 0  # 0 = the whole validation split
    c.num_steps = 2000
    c.seed = 0  # parameters, dropout, samples; and the data order unless data_seed is set
    c.data_seed = placeholder(int)  # the data order's (shuffling, masking); None: seed
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.progress = True
    c.num_samples = 1
    c.sample_length = 200
    c.sample_prompt = "\n"
    c.temperature = 0.8
    c.top_k = 0
    # Every TransformerConfig field can be set (--config.model.num_kv_heads=2); unset ones
    # keep the preset's value. gpu=True: `flaxformer_lite.gpu_config(..., trailing_padding=True)`
    # (bfloat16, cuDNN attention, causal alone: rows of running text pad only at their end, the
    # head 128 wide); fields set here or on the command line override those settings.
    c.model = model_config_dict(
        "gpt2", d_model=128, num_heads=4, d_ff=512, num_layers=4, max_len=256,
        dropout_rate=0.0, attention_dropout_rate=0.0, use_bias=False, norm_bias=True,
        activation="gelu")
    c.optimizer = ml_collections.ConfigDict(dict(
        optimizer="adamw", learning_rate=1e-3, schedule="cosine", warmup_steps=100,
        decay_steps=placeholder(int), final_learning_rate=1e-4, b1=0.9, b2=0.99, eps=1e-8,
        weight_decay=0.1, clip_norm=1.0, accumulation_steps=1))
    # cpu_devices: split a CPU host into that many JAX devices (0 = JAX's default, one), which
    # the "auto" mode then trains data parallel. Two run this model's step 1.1-1.2x (Intel
    # Xeon) to 1.5x (AMD EPYC) faster on a 2-core CPU than one (docs/performance.md); it
    # changes nothing on a GPU or TPU host, whose accelerators train.
    c.parallel = ml_collections.ConfigDict(dict(mode="auto", data=-1, fsdp=1, tensor=1,
                                                cpu_devices=2, microbatches=1))
    return c
