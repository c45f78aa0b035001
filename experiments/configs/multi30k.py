"""Multi30k German -> English with a small pre-LN Transformer and a shared SentencePiece vocab.

    python experiments/translate.py --config=experiments/configs/multi30k.py \
        --workdir=/tmp/multi30k --config.dataset=../shared/data/multi30k
"""

import importlib.util
import os

_base = importlib.util.spec_from_file_location(
    "translate_config", os.path.join(os.path.dirname(__file__), "translate.py"))
translate = importlib.util.module_from_spec(_base)
_base.loader.exec_module(translate)


def get_config():
    c = translate.get_config()
    c.dataset = "../shared/data/multi30k"  # train/val/test_2016_flickr.{de,en}
    c.source_lang = "de"
    c.target_lang = "en"
    c.tokenizer = "bpe"
    c.vocab_size = 8000
    c.max_source_len = 64
    c.max_target_len = 64
    c.max_decode_len = 64
    c.batch_size = 48  # rows of 64 tokens, several sentences packed per row
    c.pack = True
    c.num_steps = 1200
    c.eval_every = 400
    c.checkpoint_every = 200
    c.eval_split = "validation"
    c.test_split = "test_2016_flickr"
    c.eval_decode_examples = 256
    c.metric = "bleu"
    c.beam_size = 4
    c.alpha = 0.6
    c.label_smoothing = 0.1
    # Dropout also on the feed-forward's hidden activation, as tensor2tensor's and Flax's WMT
    # Transformers do (the paper's presets leave it out); the README's result used it.
    c.model.update(dict(d_model=256, num_heads=4, d_ff=1024, num_layers=3, max_len=64,
                        dropout_rate=0.2, attention_dropout_rate=0.0, ffn_hidden_dropout=True))
    c.optimizer.update(dict(learning_rate=1e-3, schedule="cosine", warmup_steps=200,
                            final_learning_rate=1e-5, weight_decay=0.0))
    return c
