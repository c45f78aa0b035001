"""nanoGPT's CPU recipe for Tiny Shakespeare, character level.

4 layers, 4 heads, d_model 128, context 64, batch 12, 2000 steps, dropout 0, no biases in the
dense layers or the LayerNorms (nanoGPT's bias=False), AdamW (0.9, 0.99),
weight decay 0.1, clip 1.0, lr 1e-3 warming up for 100 steps then cosine to 1e-4; validation is
the last 10% of the characters. Evaluated on the whole validation split (111k characters) at steps
1000 and 2000: about the forward-pass budget of nanoGPT's nine 20-batch estimates on both splits.

    python experiments/lm.py --config=experiments/configs/shakespeare_char.py \
        --workdir=/tmp/shakespeare --config.dataset=../shared/data/tinyshakespeare/input.txt
"""

import importlib.util
import os

_base = importlib.util.spec_from_file_location(
    "lm_config", os.path.join(os.path.dirname(__file__), "lm.py"))
lm = importlib.util.module_from_spec(_base)
_base.loader.exec_module(lm)


def get_config():
    c = lm.get_config()
    c.dataset = "../shared/data/tinyshakespeare/input.txt"
    c.seq_len = 64
    c.batch_size = 12
    c.num_steps = 2000
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.model.max_len = 64
    c.model.norm_bias = False
    c.sample_length = 63
    return c
