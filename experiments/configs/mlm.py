"""A small BERT-style masked language model on the offline default corpus.

    python experiments/mlm.py --workdir=/tmp/mlm
"""

import ml_collections
from ml_collections.config_dict import placeholder

from flaxformer_lite.config import model_config_dict


def get_config():
    c = ml_collections.ConfigDict()
    c.dataset = "embedded"  # a text file/folder, "embedded", or a TFDS name
    c.data_dir = ""
    c.tokenizer = "bpe"  # char | byte | bpe | unigram; the MASK id is reserved
    c.vocab_size = 2000
    c.seq_len = 128
    c.mask_rate = 0.15
    c.batch_size = 32
    c.eval_batch_size = 64
    # 0 = the whole validation split; else the first eval_batches * eval_batch_size packed
    # rows of seq_len tokens
    c.eval_batches = 20
    c.num_steps = 1000
    c.seed = 0  # parameters, dropout, samples; and the data order unless data_seed is set
    c.data_seed = placeholder(int)  # the data order's (shuffling, masking); None: seed
    # The validation masks' seed: one eval set for every run, whatever its `seed`, so that
    # runs of a sweep are compared on the same masked tokens.
    c.eval_seed = 1
    c.log_every = 50
    c.eval_every = 250
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.progress = True
    # Every TransformerConfig field can be set (--config.model.d_ff=256); unset ones keep the
    # preset's value. gpu=True: `flaxformer_lite.gpu_config` (bfloat16, the head 128 wide;
    # cuDNN attention only with attention_dropout_rate=0, which it lacks); fields set here or
    # on the command line override those settings.
    c.model = model_config_dict(
        "bert-base", d_model=128, num_heads=4, d_ff=512, num_layers=4, max_len=128,
        dropout_rate=0.1, attention_dropout_rate=0.1, mlm_head=True)
    c.optimizer = ml_collections.ConfigDict(dict(
        optimizer="adamw", learning_rate=5e-4, schedule="cosine", warmup_steps=100,
        decay_steps=placeholder(int), final_learning_rate=5e-5, b1=0.9, b2=0.98, eps=1e-6,
        weight_decay=0.01, clip_norm=1.0, accumulation_steps=1))
    # cpu_devices: split a CPU host into that many JAX devices (0 = JAX's default)
    c.parallel = ml_collections.ConfigDict(dict(mode="auto", data=-1, fsdp=1, tensor=1,
                                                cpu_devices=0, microbatches=1))
    return c
