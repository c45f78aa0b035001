"""Evaluation metrics: perplexity and bits per character/byte, BLEU, exact match.

- `perplexity` sums per-token negative log-likelihoods over a whole split (batches in the
  library's batch format) and reports `exp(mean NLL)`, bits per token and, given the split's
  character or byte count, bits per character / byte: the numbers a language-model table quotes.
- `bleu` scores detokenized text with sacrebleu and returns its signature, so a reported score
  says how it was computed (tokenizer, smoothing, casing, version).
- `exact_match` is sequence accuracy for the synthetic tasks (copy, reverse, sort, ...).
- `classify` gives a sequence classifier's (`TransformerConfig.num_classes`) predicted labels
  and class probabilities for texts or token ids.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu

from flaxformer_lite.models import (
    DecoderOnly,
    EncoderDecoder,
    EncoderOnly,
    batch_keys,
    check_batch,
    check_params_read,
    jit_model_fn,
    unwrap_params,
)
from flaxformer_lite.training.steps import class_logits, logits_fn, target_weights

Array = jnp.ndarray

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2  # data.tokenizers.BOS_ID: the first token of a classifier's rows

log = logging.getLogger(__name__)

# ---- likelihood ------------------------------------------------------------------------------

def _kind(model) -> type:
    kind = next((k for k in (DecoderOnly, EncoderDecoder, EncoderOnly) if isinstance(model, k)),
                None)
    if kind is None:
        raise ValueError(f"expected a DecoderOnly, EncoderDecoder or EncoderOnly model, got "
                         f"{type(model).__name__}.")
    return kind


def _model_logits(model, params, batch: dict) -> Array:
    """Logits `[batch, length, vocab]` predicting `batch["targets"]`, for any model kind, with
    every batch entry the model reads (a model of your own's `extra_batch_keys` too)."""
    _kind(model)
    return logits_fn(model, params, batch, deterministic=True)


def token_nll(model, params, batch: dict) -> tuple[Array, Array]:
    """Per-token negative log-likelihood `[batch, length]` (nats) and weights `[batch, length]`.

    Weights are `targets != config.pad_id` (0; with `pad_id=None`, `segment_ids != 0`, or all
    1 without segment ids), times the batch's `loss_weights` `[batch, length]` when given (e.g.
    0 on a prompt's targets: a completion's log-likelihood given the prompt); positions of
    weight 0 have NLL 0, and the NLL is weighted. Works for decoder-only (next-token),
    encoder-decoder (targets given inputs) and encoder-only masked-LM batches (the selected
    positions), always in deterministic mode.

    `params` bare or as `{"params": ...}`. The batch is checked first as `perplexity` checks
    it (targets outside the vocabulary, such as -100, or shapes that do not fit; values traced
    inside a caller's `jit` are not checked), then the computation is compiled once per model
    and shapes.
    """
    params = unwrap_params(params)
    _kind(model)
    if not isinstance(batch, Mapping) or "inputs" not in batch or "targets" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"token_nll needs a batch with 'inputs' and 'targets' arrays; got "
                         f"{got}.")
    check_batch(model.config, batch, extra_keys=tuple(getattr(model, "extra_batch_keys", ())))
    return _token_nll(model, params, batch)


@jit_model_fn(static_argnames=("model",))
def _token_nll(model, params, batch: dict) -> tuple[Array, Array]:
    logits = _model_logits(model, params, batch)
    targets = batch["targets"]
    weights = target_weights(model, batch, targets, at_head_positions=False)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return nll * weights, weights


def _pad_rows(config, arrays: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """A batch shorter than `rows` (a split's last) padded with zero rows, which carry no
    weight (targets at padding id 0, or segment ids / loss weights 0), so that it runs in the
    program compiled for the full batches; unchanged when zero rows would carry weight."""
    n = len(arrays["inputs"])
    weightless = (config.pad_id == 0 or config.architecture != "decoder_only"
                  or (config.pad_id is None and "segment_ids" in arrays)
                  or "loss_weights" in arrays)
    if n >= rows or not weightless or any(len(v) != n for v in arrays.values()):
        return arrays
    return {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)])
            for k, v in arrays.items()}


def perplexity(model, params, batches: Iterable[dict], *, num_characters: int | None = None,
               num_bytes: int | None = None) -> dict[str, float]:
    """Perplexity of `model` on a split given as an iterable of batches.

    Sums the NLL of every non-pad target token over all batches (float64 on the host),
    weighted by the batches' `loss_weights` where they have them (0 leaves a target out,
    e.g. a prompt's, while the model still reads it), and returns a dict: `tokens` (the sum
    of the weights), `nll` (total nats), `loss` (nats per token), `perplexity`
    (`exp(loss)`), `bits_per_token`, and, when the split's size in characters or UTF-8 bytes
    is given, `bits_per_character` / `bits_per_byte` (`nll / ln 2 / count`): the measure that
    compares models with different tokenizers (not for masked LMs, which score a sample of the
    tokens). Targets include EOS tokens if the batches do.
    """
    if isinstance(batches, Mapping):
        raise TypeError("perplexity takes an iterable of batches; wrap a single batch in a "
                        "list: perplexity(model, params, [batch]).")
    params = unwrap_params(params)
    _kind(model)
    keys = batch_keys(model.config.architecture, model)
    extra_keys = tuple(getattr(model, "extra_batch_keys", ()))
    if isinstance(model, EncoderOnly) and not model.config.mlm_head:
        raise ValueError("perplexity of an EncoderOnly model needs TransformerConfig.mlm_head=True "
                         "(the masked-LM logits).")
    check_params_read(model, params, "perplexity")
    if isinstance(model, EncoderOnly) and (num_characters is not None or num_bytes is not None):
        raise ValueError("num_characters/num_bytes: a masked LM scores only the masked ~15% of "
                         "the tokens, so bits per character of the whole split would mean "
                         "nothing (it follows the mask rate); leave them out and compare "
                         "`loss` at the same mask rate.")
    total_nll, total_tokens, rows = 0.0, 0.0, 0
    for i, batch in enumerate(batches):
        if "inputs" not in batch or "targets" not in batch:
            raise ValueError(f"batch {i} needs 'inputs' and 'targets' arrays, got keys "
                             f"{sorted(batch)}.")
        check_batch(model.config, batch, extra_keys=extra_keys)
        arrays = {k: np.asarray(batch[k]) for k in keys if batch.get(k) is not None}
        rows = rows or len(arrays["inputs"])
        arrays = _pad_rows(model.config, arrays, rows)
        nll, weights = _token_nll(model, params, {k: jnp.asarray(v) for k, v in arrays.items()})
        total_nll += float(np.sum(np.asarray(nll, np.float64)))
        total_tokens += float(np.sum(np.asarray(weights, np.float64)))
    if total_tokens == 0:
        raise ValueError(f"the batches hold no target tokens (all targets are "
                         f"{model.config.pad_id} = padding, or their loss_weights 0).")
    loss = total_nll / total_tokens
    out = {"tokens": int(total_tokens) if total_tokens.is_integer() else total_tokens,
           "nll": total_nll, "loss": loss, "perplexity": math.exp(loss),
           "bits_per_token": loss / math.log(2)}
    for name, arg, count in (("bits_per_character", "num_characters", num_characters),
                             ("bits_per_byte", "num_bytes", num_bytes)):
        if count is not None:
            if count <= 0:
                raise ValueError(f"{arg}={count} must be positive (the split's size).")
            out[name] = total_nll / math.log(2) / count
    return out


# ---- classification --------------------------------------------------------------------------

@jit_model_fn(static_argnames=("model",))
def _class_probabilities(model, params, batch: dict) -> Array:
    logits = class_logits(model, params, batch, deterministic=True)  # as the eval step reads
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


_UNFRAMED_WARNED = False  # classify's warning about rows without BOS, once a process


def _warn_unframed(ids: np.ndarray) -> None:
    """Warns (once a process) when id rows do not start with BOS: the classifier reads the
    first position, where the fine-tuning rows always held BOS, so unframed rows (a bare
    `tokenizer.encode`) are predicted poorly without any error."""
    global _UNFRAMED_WARNED
    if _UNFRAMED_WARNED or ids.ndim != 2 or not ids.shape[1] or ids.dtype.kind not in "iu":
        return
    unframed = int(np.sum((ids[:, 0] != BOS_ID) & np.any(ids != 0, axis=-1)))
    if unframed:
        _UNFRAMED_WARNED = True
        log.warning("classify: %d of %d id rows do not start with BOS (id %d); a classifier "
                    "reads the first position, which held BOS in every row it was trained on, "
                    "so these predictions are poor. Frame rows as [BOS] + ids + [EOS] "
                    "(data.encode_texts, or pass the texts with tokenizer=).", unframed,
                    len(ids), BOS_ID)


def classify(model, params, inputs: Sequence[str] | np.ndarray, *, tokenizer=None,
             max_len: int | None = None, token_type_ids: np.ndarray | None = None,
             batch_size: int = 64) -> dict[str, np.ndarray]:
    """A sequence classifier's predictions (`EncoderOnly` with `config.num_classes > 0`):
    `{"labels": [n] int32 (argmax), "probabilities": [n, num_classes] float32}`.

    `inputs`: a list of `n` texts, framed with `tokenizer` as `classification_pipeline`
    frames its rows (`data.encode_texts`: `[BOS] + ids + [EOS]`, cut to `max_len`, default
    the model's), or token ids `[n, length]` already framed so (0 = padding; rows that do not
    start with BOS are predicted poorly, and warned about once a process). A pair of texts
    is refused: sentence pairs are not supported.
    Deterministic (no dropout); run in batches of `batch_size` rows, a shorter last one
    padded to a power of two (a few compiled programs at most). Params the model never reads
    are refused (`check_params_read`).
    """
    _kind(model)
    cfg = model.config
    if not isinstance(model, EncoderOnly) or not cfg.num_classes:
        raise ValueError("classify needs a sequence classifier: an EncoderOnly model with "
                         "TransformerConfig.num_classes > 0 (and pooler=True).")
    params = unwrap_params(params)
    check_params_read(model, params, "classify")
    if isinstance(inputs, str):
        raise TypeError("classify takes a list of texts (or ids [n, length]); one string "
                        "would be read as many: classify(model, params, [text], ...).")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"classify: batch_size={batch_size!r} must be a positive integer.")
    if len(inputs) == 0:  # an empty list holds neither texts nor ids
        return {"labels": np.zeros(0, np.int32),
                "probabilities": np.zeros((0, cfg.num_classes), np.float32)}
    first = inputs[0]
    if isinstance(first, (tuple, list)) and len(first) and isinstance(first[0], str):
        from flaxformer_lite.data.labelled import PAIRS_UNSUPPORTED

        raise TypeError(f"classify: input 0 is a {type(first).__name__} of texts "
                        f"({first!r:.60}); {PAIRS_UNSUPPORTED}.")
    if isinstance(first, str):
        if tokenizer is None:
            raise ValueError("classify: texts need the tokenizer the classifier was trained "
                             "with (tokenizer=...); or pass token ids [n, length].")
        from flaxformer_lite.data.pipeline import encode_texts

        ids = encode_texts(tokenizer, list(inputs), cfg.max_len if max_len is None else max_len)
    else:
        ids = np.asarray(inputs)
        _warn_unframed(ids)
    extra = {} if token_type_ids is None else {"token_type_ids": np.asarray(token_type_ids)}
    check_batch(cfg, {"inputs": ids, "labels": np.zeros(len(ids), np.int32), **extra})
    if not np.all(np.any(ids != 0, axis=-1)):
        row = int(np.flatnonzero(~np.any(ids != 0, axis=-1))[0])
        raise ValueError(f"classify: row {row} of the inputs is all padding (0); every row "
                         "needs its tokens (framed: [BOS] + ids + [EOS]).")
    entries = {"inputs": ids, **extra}
    probs = []
    for start in range(0, len(ids), batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in entries.items()}
        rows = len(chunk["inputs"])
        fill = min(batch_size, 1 << (rows - 1).bit_length()) - rows  # all-padding rows
        chunk = {k: jnp.asarray(np.pad(v, [(0, fill)] + [(0, 0)] * (v.ndim - 1)), jnp.int32)
                 for k, v in chunk.items()}
        probs.append(np.asarray(_class_probabilities(model, params, chunk))[:rows])
    probabilities = (np.concatenate(probs) if probs  # ids of no rows: [0, length]
                     else np.zeros((0, cfg.num_classes), np.float32))
    return {"labels": probabilities.argmax(-1).astype(np.int32),
            "probabilities": probabilities.astype(np.float32)}


# ---- sequences -------------------------------------------------------------------------------

def strip_ids(ids: Sequence[int] | np.ndarray, *, eos_id: int | None = EOS_ID,
              pad_id: int | None = PAD_ID) -> list[int]:
    """Token ids up to (not including) the first `eos_id`, with `pad_id` tokens removed.
    The defaults are the library tokenizers' (EOS 1, padding 0): for a vocabulary without
    padding (`config.pad_id=None`, GPT-2's, where 0 is "!") pass `pad_id=None` and its own
    `eos_id` (`config.eos_id`), here and in `exact_match` / `bleu_from_ids`."""
    ids = np.asarray(ids)
    if ids.ndim > 1:
        raise ValueError(f"strip_ids takes one sequence; got an array of shape {ids.shape} "
                         "(beam search's tokens are [n, beams, length]: take the best beam, "
                         "tokens[:, 0]).")
    out = []
    for t in ids.reshape(-1).tolist():
        if eos_id is not None and t == eos_id:
            break
        if pad_id is None or t != pad_id:
            out.append(t)
    return out


def exact_match(predictions: Sequence[Any] | np.ndarray, targets: Sequence[Any] | np.ndarray,
                *, eos_id: int | None = EOS_ID, pad_id: int | None = PAD_ID) -> float:
    """Fraction of examples whose prediction equals the target exactly.

    Examples are strings (compared as they are) or token-id sequences / array rows (compared
    after `strip_ids`, so trailing EOS and padding do not matter; rows may differ in width).
    """
    if len(predictions) != len(targets):
        raise ValueError(f"predictions ({len(predictions)}) and targets ({len(targets)}) must "
                         "have the same number of examples.")
    if len(targets) == 0:
        raise ValueError("exact_match needs at least one example.")

    def norm(x):
        return x if isinstance(x, str) else strip_ids(x, eos_id=eos_id, pad_id=pad_id)

    hits = sum(norm(p) == norm(t) for p, t in zip(predictions, targets))
    return hits / len(targets)


# ---- BLEU ----------------------------------------------------------------------------------

def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], *,
         tokenize: str = "13a", lowercase: bool = False) -> dict[str, Any]:
    """Corpus BLEU of detokenized `hypotheses` with sacrebleu.

    `references`: one reference string per hypothesis, or several reference streams (a list of
    lists, each as long as `hypotheses`). Returns `bleu` (0-100), `signature` (sacrebleu's, to
    print next to the score), `precisions` (1-4 gram, %), `brevity_penalty`, `sys_len`,
    `ref_len`.
    """
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise TypeError("bleu takes lists of sentences (a string would be read as one sentence "
                        "per character): bleu([hypothesis], [reference]).")
    hypotheses = list(hypotheses)
    if not hypotheses:
        raise ValueError("bleu needs at least one hypothesis.")
    references = list(references)
    if not references:
        raise ValueError("bleu needs references: one string per hypothesis, or a list of "
                         "reference streams.")
    streams = ([references] if isinstance(references[0], str)
               else [list(r) for r in references])
    for i, stream in enumerate(streams):
        if len(stream) != len(hypotheses):
            raise ValueError(f"reference stream {i} has {len(stream)} sentences but there are "
                             f"{len(hypotheses)} hypotheses; they must align one to one.")
        if not all(isinstance(s, str) for s in stream):
            raise ValueError("references must be strings (detokenized text).")
    if not all(isinstance(h, str) for h in hypotheses):
        raise ValueError("hypotheses must be strings (detokenized text); use bleu_from_ids for "
                         "token ids.")
    if tokenize not in sacrebleu.metrics.BLEU.TOKENIZERS:
        raise ValueError(f"tokenize={tokenize!r} is not one of sacrebleu's "
                         f"{', '.join(sacrebleu.metrics.BLEU.TOKENIZERS)}.")
    metric = sacrebleu.metrics.BLEU(tokenize=tokenize, lowercase=lowercase)
    result = metric.corpus_score(hypotheses, streams)
    return {"bleu": float(result.score), "signature": str(metric.get_signature()),
            "precisions": [float(p) for p in result.precisions],
            "brevity_penalty": float(result.bp), "sys_len": int(result.sys_len),
            "ref_len": int(result.ref_len)}


def bleu_from_ids(hypothesis_ids: Sequence[Sequence[int]] | np.ndarray,
                  references: Sequence[str] | Sequence[Sequence[str]],
                  detokenize: Callable[[list[int]], str], *, eos_id: int | None = EOS_ID,
                  pad_id: int | None = PAD_ID, **bleu_kwargs) -> dict[str, Any]:
    """`bleu` of generated id rows (`[n, length]`, cut at EOS, pads dropped, then detokenized)
    against reference text: score the raw references, never re-tokenized ones."""
    rows = list(hypothesis_ids)
    if any(np.ndim(row) != 1 for row in rows):  # [n, beams, length] would join the beams
        raise ValueError("hypothesis_ids must be [n, length] id rows (one per hypothesis); for "
                         "beam_search output pass the best beams, beams.tokens[:, 0].")
    hypotheses = [detokenize(strip_ids(row, eos_id=eos_id, pad_id=pad_id))
                  for row in rows]
    return bleu(hypotheses, references, **bleu_kwargs)
