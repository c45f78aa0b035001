"""Autoregressive decoding with a key/value cache: sampling, greedy search and beam search.

Everything here is a pure function of `(model, params, ids, ...)`; the work runs inside one
`jax.jit`, so sharded or replicated params decode without change. How a call proceeds:

1. **Prefill.** Decoder-only: the right-padded prompts `[batch, prompt_len]` go through the model
   in one `decode=True` call that writes their keys/values into the cache made by
   `models.init_cache`; each row's own length sets its validity and positions, so prompts of
   different lengths share a batch. Encoder-decoder: the encoder runs once.
2. **Loop.** One `lax.while_loop` feeds one token per row at the next cache slot (first each
   row's last prompt token, or the decoder start token 0), gets `[batch, vocab]` logits and
   chooses the next token(s). The first decoder call of an encoder-decoder model also projects
   the encoder output into the cross-attention keys/values, which later calls read from the
   cache. The loop stops early once every row has emitted a stop token (sampling) or no live
   beam can beat the finished ones (beam search).

`generate` (decoder-only) and `generate_seq2seq` (encoder-decoder) sample or search greedily;
`beam_search` handles both kinds with the GNMT length penalty; `generate_no_cache` is the
reference that recomputes the whole sequence at every step (for tests and the benchmark);
`fill_masks` gives a masked LM's guesses at its masks.

    python -m flaxformer_lite.decoding --benchmark   # tokens/s with and without the cache
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import numbers
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite.config import TransformerConfig
from flaxformer_lite.models import (
    DecoderOnly,
    EncoderDecoder,
    EncoderOnly,
    check_params_read,
    check_token_ids,
    concrete_range,
    init_cache,
    init_params,
    jit_model_fn,
    make_model,
    unwrap_params,
)
from flaxformer_lite.ops.sharding import explicit_sharding

Array = jnp.ndarray
# Stop tokens: ids and sequences of ids (stop strings), or an array [n] / [n, w] (-1 first).
StopTokens = Sequence[int | Sequence[int]] | Array

PAD_ID = 0  # padding; also the decoder start token of encoder-decoder models
EOS_ID = 1  # end of sequence (the tokenizers' EOS_ID)
# The default stop tokens: the library's tokenizers' EOS. Told apart from a caller's own (1,)
# by identity, as a vocabulary without padding (GPT-2's) has another meaning for id 1.
_LIBRARY_EOS = (EOS_ID,)
_NEG = -1.0e9  # "minus infinity" for scores: finite, so sums and ratios never produce NaN


class Generation(NamedTuple):
    """Result of `generate` / `generate_seq2seq` / `generate_no_cache` (a pytree).

    tokens: `[batch, max_new_tokens]` generated ids; the stop token is kept, the padding
      id after it (0 without one, `pad_id=None`: read `lengths`).
    lengths: `[batch]` number of generated tokens, stop token included.
    log_probs: `[batch]` sum of the model's log-probabilities (temperature 1, no filtering) of
      the generated tokens: the score greedy search maximises step by step.
    logits: `[batch, max_new_tokens, vocab]` float32 logits each token was chosen from, when
      `return_logits=True` (else None). After a row's stop token (past `lengths`) they are
      unspecified: the row keeps stepping on its padding, not on the sequence it ended.
    token_log_probs: `[batch, max_new_tokens]` float32 log-probability of each generated token
      under the model (temperature 1, no filtering); 0 past `lengths`, so a row sums to
      `log_probs`. What a KL penalty or per-token advantages read.
    sampled_log_probs: `[batch, max_new_tokens]` float32 log-probability of each token under
      the distribution it was drawn from: the temperature, top-k, top-p and the padding id's
      exclusion applied (`filter_logits`), i.e. the behaviour policy's; 0 past `lengths`, and
      0 throughout with `greedy=True` (the argmax is certain).
    """

    tokens: Array
    lengths: Array
    log_probs: Array
    logits: Array | None = None
    token_log_probs: Array | None = None
    sampled_log_probs: Array | None = None


class Beams(NamedTuple):
    """Result of `beam_search`, best beam first (a pytree).

    tokens: `[batch, beam, max_len]` generated ids (the prompt not repeated), EOS kept, the
      padding id after it (0 without one, `pad_id=None`: read `lengths`); beams beyond the
      sequences that exist are empty (that id, length 0, score -1e9).
    lengths: `[batch, beam]` tokens per beam, EOS included.
    scores: `[batch, beam]` `log_probs / length_penalty(lengths, alpha)`, sorted descending.
    log_probs: `[batch, beam]` total log-probability of each beam.
    """

    tokens: Array
    lengths: Array
    scores: Array
    log_probs: Array


# ---- token choice ------------------------------------------------------------------------------

def length_penalty(length: Array | int, alpha: float | Array) -> Array:
    """GNMT length penalty `((5 + length) / 6) ** alpha` (Wu et al. 2016, eq. 14)."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _check_alpha_range(alpha: np.ndarray | None, max_len: int) -> None:
    """Refuse a (concrete) `alpha` whose penalties over lengths 1..max_len leave float32's
    useful range: scores past the empty-beam mark (-1e9; alpha=-100 reported real beams as
    empty) or a penalty overflowing to inf (every score -0.0, unranked). A bound of 30 nats a
    token keeps every score above -1e8."""
    if alpha is None or float(alpha) == 0.0:
        return
    # In logs and on the host (inside a caller's jit, jnp would trace even constants).
    logs = [float(alpha) * math.log((5.0 + n) / 6.0) for n in (1, max_len)]
    low, high = min(logs), max(logs)
    if not (math.log(30.0 * max_len) - low < math.log(1e8) and high < math.log(1e30)):
        raise ValueError(f"alpha={float(alpha):g} puts the length penalty ((5 + length) / 6) ** "
                         f"alpha at 10**{low / math.log(10):.1f}..10**{high / math.log(10):.1f}"
                         " over lengths "
                         f"1..{max_len}: beyond what float32 scores rank; use an alpha nearer 0 "
                         "(GNMT: 0.6-1.0).")


def filter_logits(logits: Array, *, temperature: float | Array = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
    """The logits `[batch, vocab]` that `sample_logits` draws from: float32, divided by
    `temperature`, the tokens outside the `top_k` largest (0 = no limit) and outside the
    nucleus (`top_p`) set to `-inf`. `jax.nn.log_softmax` of the result gives each token's
    log-probability under the sampling distribution (`Generation.sampled_log_probs`).

    Tied tokens (common with bfloat16 logits) are ranked by id, lowest first, as `argmax`
    ranks them, so `top_k=1` keeps the argmax and the top-k set is exact; the nucleus keeps a
    token while the mass before it is below `top_p - 1e-6`, so float32 rounding of a
    cumulative sum that should equal `top_p` does not add a token. Logits of `-inf` (ruled
    out) stay out at any temperature: the logits are shifted by their maximum before they are
    divided, and the temperature is clipped to [1e-30, 1e30] (XLA may divide through a
    reciprocal, which float32 flushes to 0 past that), so a tiny temperature leaves the argmax
    alone and a huge one a uniform distribution, never NaN.
    """
    logits = logits.astype(jnp.float32)
    temperature = jnp.clip(jnp.asarray(temperature, jnp.float32), 1e-30, 1e30)
    logits = (logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True))) / temperature
    if top_k:
        values, ids = jax.lax.top_k(logits, top_k)  # descending, ties: lower ids first
        logits = _keep_first(logits, values[:, -1], ids[:, -1])
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1, stable=True)  # descending, ties by id
        ranked = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # The nucleus is a prefix of the ranking (the mass before a token only grows), and
        # the top token always stays: keep up to its last member.
        last = jnp.maximum(jnp.sum(mass_before < top_p - 1e-6, axis=-1), 1) - 1
        logits = _keep_first(logits, jnp.take_along_axis(ranked, last[:, None], axis=-1)[:, 0],
                             jnp.take_along_axis(order, last[:, None], axis=-1)[:, 0])
    return logits


def _keep_first(logits: Array, value: Array, last_id: Array) -> Array:
    """`logits` `[batch, vocab]` but the tokens ranked (by logit descending, then id) up to the
    token `last_id` `[batch]` of logit `value` `[batch]` set to `-inf`. Comparisons, not a
    scatter of the kept ids: on an Explicit mesh a scatter's layout cannot be inferred."""
    ids = jnp.arange(logits.shape[-1])[None, :]
    keep = (logits > value[:, None]) | ((logits == value[:, None]) & (ids <= last_id[:, None]))
    return jnp.where(keep, logits, -jnp.inf)


def sample_logits(logits: Array, rng: Array | None, *, temperature: float | Array = 1.0,
                  top_k: int = 0, top_p: float = 1.0, greedy: bool = False) -> Array:
    """Choose one token per row from `logits` `[batch, vocab]` -> ids `[batch]` int32.

    `greedy` takes the argmax. Otherwise one token is drawn with `rng` from
    `filter_logits(logits, temperature=..., top_k=..., top_p=...)`: the logits divided by
    `temperature`, restricted to the `top_k` largest (0 = no limit), then to the smallest set
    of most likely tokens whose probability reaches `top_p` (nucleus sampling; the most likely
    token always stays). Ties rank by id as `argmax` ranks them, so `top_k=1` is greedy; a
    tiny temperature gives the argmax and a huge one the uniform draw, never NaN.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _never_pad(scores: Array, low: float = _NEG, pad_id: int | None = PAD_ID) -> Array:
    """`scores` `[..., vocab]` with the padding id ruled out: an emitted pad would read as
    padding everywhere after (stripped from hypotheses, weight 0 when re-scored), so no loop
    chooses it; an untrained model often would. Log-probabilities stay the model's own.
    Sampling passes `low=-inf`, which no temperature brings back into reach. A vocabulary
    without a padding id (`pad_id=None`) keeps every id."""
    return scores if pad_id is None else scores.at[..., pad_id].set(low)


def _batch_split(tree, like: Array):
    """On an Explicit mesh (`jax.make_mesh`'s default), the leaves of `tree` (each `[batch,
    ...]`) split over the batch as `like` `[batch, ...]` is, else replicated on its mesh: an
    Explicit mesh needs a loop's state laid out as its body leaves it. Unchanged elsewhere."""
    sharding = explicit_sharding(like)
    if sharding is None:
        return tree
    batch = tuple(sharding.spec)[0] if len(sharding.spec) else None

    def split(x):
        spec = jax.sharding.PartitionSpec(batch, *(None,) * (x.ndim - 1))
        return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, spec))

    return jax.tree.map(split, tree)


def _repeat(x: Array, k: int, axis: int) -> Array:
    """`jnp.repeat(x, k, axis)`, keeping `x`'s layout on an Explicit mesh (which asks)."""
    sharding = explicit_sharding(x)
    if sharding is None:
        return jnp.repeat(x, k, axis=axis)
    return jnp.repeat(x, k, axis=axis, out_sharding=sharding)


def _take(x: Array, idx: Array, axis: int) -> Array:
    """`jnp.take(x, idx, axis)`, keeping `x`'s layout on an Explicit mesh (which asks)."""
    sharding = explicit_sharding(x)
    if sharding is None:
        return jnp.take(x, idx, axis=axis)
    return x.at[(slice(None),) * axis + (idx,)].get(out_sharding=sharding)


def _settled_while_loop(cond: Callable, body: Callable, state):
    """`lax.while_loop` whose initial state takes the layout the body gives it: on an Explicit
    mesh a cache made on one device (`init_cache`) otherwise differs from the one the body
    writes (`layers.fit_to_write`), and the loop refuses the mismatch. Elsewhere as is."""
    if any(explicit_sharding(x) is not None for x in jax.tree.leaves(state)):
        def moved(x, o) -> bool:  # the body returns `x` on a mesh, in another layout
            return (getattr(o, "sharding", None) is not None and not o.sharding.mesh.empty
                    and jax.typeof(x).sharding != o.sharding)

        for _ in range(3):  # each pass lays out what the previous pass's body wrote
            out = jax.eval_shape(body, state)
            if not any(map(moved, jax.tree.leaves(state), jax.tree.leaves(out))):
                break
            state = jax.tree.map(lambda x, o: jax.sharding.reshard(x, o.sharding)
                                 if moved(x, o) else x, state, out)
    return jax.lax.while_loop(cond, body, state)


# ---- the two kinds of decoder: prefill and one step -------------------------------------------
#
# A prefill returns `(cache, ctx, token0, pos0)`: the cache holding everything before the first
# token the loop feeds, per-row context (the encoder output), and that first token `[batch]`
# with its position `[batch]`: each row's last prompt token (decoder-only) or the start token 0
# (encoder-decoder). The loop feeds `token0` at `pos0`, then generated token `i - 1` at
# `pos0 + i`, so one model call per generated token and no second copy of the step.

def _lm_step(model, params, cache, ctx, tokens: Array, positions: Array):
    """Decoder-only: feed `tokens` `[n]` at `positions` `[n]` -> logits `[n, vocab]`, cache."""
    del ctx
    ids = tokens[:, None]
    logits, state = model.apply(
        {"params": params, "cache": cache}, ids, segment_ids=jnp.ones_like(ids),
        positions=positions[:, None], decode=True, mutable=["cache"])
    return logits[:, 0], state["cache"]


def _seq2seq_step(model, params, cache, ctx, tokens: Array, positions: Array):
    """Encoder-decoder: the same for the decoder, with the encoder output in `ctx`.

    The first call (cache index 0) projects the encoder output into the cross-attention keys
    and values and caches them; later calls only read the cache.
    """
    ids = tokens[:, None]
    # Explicit segment ids: a generated 0 is a real token here, not padding.
    logits, state = model.apply(
        {"params": params, "cache": cache}, ctx["encoded"], ids,
        encoder_segment_ids=ctx["encoder_segment_ids"], segment_ids=jnp.ones_like(ids),
        positions=positions[:, None], decode=True, method="decode", mutable=["cache"])
    return logits[:, 0], state["cache"]


def _prefill_lm(model, params, prompts: Array, prompt_lengths: Array, cache_len: int):
    """Write the prompts' columns but the last into the cache, in one call.

    Each row's last token is left for the loop, whose first step then yields the first new
    token. A shorter row's slots from its last token on are written with segment id 0 (never
    attended), so ragged prompts share the batch; prompts of one length write only valid
    slots, in order, which any decoder that caches what it is fed decodes right.
    """
    b, p = prompts.shape
    cache = init_cache(model, params, b, cache_len)
    last = jnp.maximum(prompt_lengths - 1, 0)
    token0 = jnp.take_along_axis(prompts, last[:, None], axis=1)[:, 0]
    if p == 1:
        return cache, {}, token0, last
    slots = jnp.arange(p - 1, dtype=jnp.int32)
    valid = (slots[None, :] < last[:, None]).astype(jnp.int32)
    _, state = model.apply(
        {"params": params, "cache": cache}, prompts[:, :-1], segment_ids=valid,
        positions=jnp.broadcast_to(slots, (b, p - 1)), decode=True, mutable=["cache"])
    return state["cache"], {}, token0, last


def _prefill_seq2seq(model, params, inputs: Array, cache_len: int, num_samples: int = 1):
    """Run the encoder once; the decoder starts from token 0 at position 0. With
    `num_samples = k` each source's encoding is repeated for k decoder rows (source i's rows
    are i*k ... i*k + k - 1): the encoder still runs once a source."""
    encoder_segment_ids = (inputs != PAD_ID).astype(jnp.int32)
    encoded = model.apply({"params": params}, inputs, segment_ids=encoder_segment_ids,
                          method="encode")
    if num_samples > 1:
        encoded = _repeat(encoded, num_samples, axis=0)
        encoder_segment_ids = _repeat(encoder_segment_ids, num_samples, axis=0)
    b = encoded.shape[0]
    ctx = {"encoded": encoded, "encoder_segment_ids": encoder_segment_ids}
    cache = init_cache(model, params, b, cache_len, encoded=encoded,
                       encoder_segment_ids=encoder_segment_ids)
    zeros = _batch_split(jnp.zeros((b,), jnp.int32), encoder_segment_ids)
    return cache, ctx, zeros + PAD_ID, zeros


# ---- sampling loop -----------------------------------------------------------------------------

def _sample_loop(step: Callable, cache, ctx, token0: Array, pos0: Array, dyn: dict, *,
                 vocab: int, pad_id: int | None, max_new_tokens: int, top_k: int,
                 top_p: float, greedy: bool, return_logits: bool) -> Generation:
    """Feed one token and choose the next per iteration of one `lax.while_loop`.

    `dyn` holds the traced settings: `rng`, `temperature` and `stop_tokens` (`[n, w]` stop
    sequences, right-aligned, -1 before a shorter one's ids; rows of -2 stop nothing).
    """
    b, n = token0.shape[0], max_new_tokens
    stops = dyn["stop_tokens"]

    def stopped(recent: Array) -> Array:
        """[batch]: the last `w` tokens `recent` `[batch, w]` end with a stop sequence."""
        equal = (recent[:, None, :] == stops[None]) | (stops[None] == -1)
        return jnp.any(jnp.all(equal, axis=-1) & (stops[None, :, -1] >= 0), axis=-1)

    def cond(state):
        return (state["i"] < n) & ~jnp.all(state["done"])

    def body(state):
        i, done = state["i"], state["done"]
        prev = jax.lax.dynamic_index_in_dim(state["tokens"], jnp.maximum(i - 1, 0), axis=1,
                                            keepdims=False)
        logits, cache = step(state["cache"], ctx, jnp.where(i == 0, token0, prev), pos0 + i)
        allowed = _never_pad(logits, -jnp.inf, pad_id)
        if greedy:
            token = sample_logits(allowed, None, greedy=True)
        else:
            drawn_from = filter_logits(allowed, temperature=dyn["temperature"], top_k=top_k,
                                       top_p=top_p)
            token = jax.random.categorical(jax.random.fold_in(dyn["rng"], i), drawn_from,
                                           axis=-1).astype(jnp.int32)
        token = jnp.where(done, _fill_id(pad_id), token)
        recent = jnp.concatenate([state["recent"][:, 1:], token[:, None]], axis=1)
        logp = jnp.where(done, 0.0, jnp.take_along_axis(jax.nn.log_softmax(logits),
                                                        token[:, None], axis=-1)[:, 0])
        new = {
            "i": i + 1, "cache": cache,
            "tokens": state["tokens"].at[:, i].set(token),
            "log_probs": state["log_probs"] + logp,
            "token_log_probs": state["token_log_probs"].at[:, i].set(logp),
            "lengths": state["lengths"] + (~done).astype(jnp.int32),
            "recent": recent,
            "done": done | stopped(recent),
        }
        if not greedy:
            behaviour = jnp.take_along_axis(jax.nn.log_softmax(drawn_from), token[:, None],
                                            axis=-1)[:, 0]
            new["sampled_log_probs"] = state["sampled_log_probs"].at[:, i].set(
                jnp.where(done, 0.0, behaviour))
        if return_logits:
            new["logits"] = state["logits"].at[:, i].set(logits)
        return new

    state = {
        "i": jnp.int32(0), "cache": cache,
        "tokens": jnp.full((b, n), _fill_id(pad_id), jnp.int32),  # what follows a stop
        "log_probs": jnp.zeros((b,), jnp.float32), "lengths": jnp.zeros((b,), jnp.int32),
        "token_log_probs": jnp.zeros((b, n), jnp.float32),
        "done": jnp.zeros((b,), bool),
        # The newest generated tokens (-3 before the first: a stop sequence never reaches back
        # into the prompt).
        "recent": jnp.full((b, stops.shape[1]), -3, jnp.int32),
    }
    if not greedy:
        state["sampled_log_probs"] = jnp.zeros((b, n), jnp.float32)
    if return_logits:
        state["logits"] = jnp.zeros((b, n, vocab), jnp.float32)
    per_row = {key: value for key, value in state.items() if key not in ("i", "cache")}
    state.update(_batch_split(per_row, token0))
    state = _settled_while_loop(cond, body, state)
    return Generation(state["tokens"], state["lengths"], state["log_probs"],
                      state.get("logits"), state["token_log_probs"],
                      state.get("sampled_log_probs", jnp.zeros_like(state["token_log_probs"])))


# ---- beam search -------------------------------------------------------------------------------

def _batch_axes(cache_shape_fn: Callable[[int], Any], batch: int):
    """Per cache leaf, the axis that holds the batch (None for scalars such as the index).

    Found by comparing the cache shapes for `batch` and `batch + 1` rows, so it holds whether the
    layers are a Python loop (`[batch, ...]`) or one `nn.scan` (`[layers, batch, ...]`).
    """
    a = cache_shape_fn(batch)
    b = cache_shape_fn(batch + 1)

    def axis(x, y):
        diff = [d for d, (m, k) in enumerate(zip(x.shape, y.shape)) if m != k]
        return diff[0] if diff else None

    return jax.tree.map(axis, a, b)


def _beam_loop(step: Callable, cache, ctx, token0: Array, pos0: Array, axes, *, vocab: int,
               pad_id: int | None, beam_size: int, alpha: Array, max_len: int,
               eos_id: Array) -> Beams:
    """Beam search over `[batch * beam]` rows, flattened batch-major (row = b * beam + k).

    All beams of a row start as copies of its prefilled cache; only beam 0 is live at first
    (the others have log-prob "-inf"), so the first step expands one beam.
    """
    b, k, t = token0.shape[0], beam_size, max_len
    cache = jax.tree.map(lambda x, ax: x if ax is None else _repeat(x, k, axis=ax),
                         cache, axes)
    ctx = jax.tree.map(lambda x: _repeat(x, k, axis=0), ctx)
    token0, pos0 = _repeat(token0, k, 0), _repeat(pos0, k, 0)

    def gather(x, idx):  # x [b, n, ...], idx [b, m] -> [b, m, ...]
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    def reorder_cache(cache, parents):  # parents [b, k]: the old beam each new beam extends
        flat = (jnp.arange(b)[:, None] * k + parents).reshape(-1)
        return jax.tree.map(lambda x, ax: x if ax is None else _take(x, flat, axis=ax),
                            cache, axes)

    def cond(state):
        # Log-probs only fall as a beam grows, so `logp / largest penalty still possible`
        # bounds any score a live beam can reach; a row is settled once its worst kept
        # finished beam beats that bound for its best live beam.
        i = state["i"]
        top_penalty = jnp.maximum(length_penalty(i + 1, alpha), length_penalty(t, alpha))
        best_live = state["live_logp"][:, 0] / top_penalty
        worst_fin = jnp.min(state["fin_scores"], axis=1)
        settled = jnp.all(state["fin_flags"], axis=1) & (worst_fin >= best_live)
        return (i < t) & ~jnp.all(settled)

    def body(state):
        """Feed the live beams' last tokens, extend each by every token, keep the top k
        finished and the top k live beams."""
        i = state["i"]
        prev = state["live_tokens"][:, :, jnp.maximum(i - 1, 0)].reshape(b * k)
        logits, cache = step(state["cache"], ctx, jnp.where(i == 0, token0, prev), pos0 + i)
        logp = jax.nn.log_softmax(logits).reshape(b, k, vocab)
        cand = state["live_logp"][:, :, None] + _never_pad(logp, pad_id=pad_id)
        cand = cand.reshape(b, k * vocab)
        cand_logp, cand_idx = jax.lax.top_k(cand, 2 * k)  # 2k: at least k do not end in EOS
        parent, token = cand_idx // vocab, (cand_idx % vocab).astype(jnp.int32)
        cand_tokens = gather(state["live_tokens"], parent).at[:, :, i].set(token)
        is_eos = (token[..., None] == eos_id).any(-1)  # eos_id: [m] ids, -2 = none
        # A beam finishes when it emits EOS among the top k candidates (or reaches max_len);
        # an EOS ranked below k is dropped, as top-k beam search would never have kept it.
        finishing = ((is_eos | (i + 1 == t)) & (jnp.arange(2 * k) < k)
                     & (cand_logp > _NEG / 2))
        cand_score = jnp.where(finishing, cand_logp / length_penalty(i + 1, alpha), _NEG)
        fin_scores, idx = jax.lax.top_k(
            jnp.concatenate([state["fin_scores"], cand_score], axis=1), k)

        def merge(old, new):
            return gather(jnp.concatenate([old, new], axis=1), idx)

        live_logp, live = jax.lax.top_k(jnp.where(is_eos, _NEG, cand_logp), k)
        return {
            "i": i + 1,
            "cache": reorder_cache(cache, gather(parent, live)),
            "live_logp": live_logp,
            "live_tokens": gather(cand_tokens, live),
            "fin_scores": fin_scores,
            "fin_tokens": merge(state["fin_tokens"], cand_tokens),
            "fin_logp": merge(state["fin_logp"], cand_logp),
            "fin_lengths": merge(state["fin_lengths"],
                                 jnp.zeros_like(cand_idx, jnp.int32) + (i + 1)),  # its layout
            "fin_flags": merge(state["fin_flags"], finishing),
        }

    state = {
        "i": jnp.int32(0), "cache": cache,
        "live_logp": jnp.tile(jnp.array([0.0] + [_NEG] * (k - 1), jnp.float32), (b, 1)),
        "live_tokens": jnp.full((b, k, t), _fill_id(pad_id), jnp.int32),
        "fin_scores": jnp.full((b, k), _NEG, jnp.float32),
        "fin_tokens": jnp.full((b, k, t), _fill_id(pad_id), jnp.int32),
        "fin_logp": jnp.full((b, k), _NEG, jnp.float32),
        "fin_lengths": jnp.zeros((b, k), jnp.int32),
        "fin_flags": jnp.zeros((b, k), bool),
    }
    per_row = {key: value for key, value in state.items() if key not in ("i", "cache")}
    state.update(_batch_split(per_row, token0.reshape(b, k)))
    state = _settled_while_loop(cond, body, state)
    return Beams(state["fin_tokens"], state["fin_lengths"], state["fin_scores"],
                 state["fin_logp"])


# ---- argument checks ---------------------------------------------------------------------------

def _pad_or(cfg: TransformerConfig, default: int) -> int:
    """The config's padding id, or `default` where it has none (`pad_id=None`)."""
    return default if cfg.pad_id is None else cfg.pad_id


def _fill_id(pad_id: int | None) -> int:
    """What a finished row holds after its stop token: the padding id, else 0."""
    return 0 if pad_id is None else pad_id


def _check_model(model, kinds: tuple[type, ...], fn: str, hint: str,
                 params=None) -> TransformerConfig:
    cfg = getattr(model, "config", None)
    if not isinstance(model, kinds) or not isinstance(cfg, TransformerConfig):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{fn} takes a {names} model, got {type(model).__name__}; {hint}. "
                         "A model of your own goes in as a subclass of one of them with a "
                         "TransformerConfig `config` (docs/decoding.md, \"Your own decoder\").")
    if params is not None:
        check_params_read(model, unwrap_params(params), fn)
    return cfg


def _check_ids(name: str, ids, vocab_size: int) -> None:
    check_token_ids(name, ids)
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column, got {ids.shape}.")
    span = concrete_range(ids)  # concrete: out-of-range ids decoded to NaN
    if span is not None:
        low, high = span
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} holds ids from {low} to {high}; they must lie in "
                             f"[0, {vocab_size}) (TransformerConfig.vocab_size).")


def _check_sources(inputs) -> None:
    """A source row of padding alone gives the decoder nothing to attend (its cross-attention
    averages masked slots); refuse it, as `generate` refuses an empty prompt. Sources without
    any EOS are reported once: the pipelines end every training source with one."""
    global _WARNED_NO_EOS
    if not isinstance(inputs, jax.core.Tracer):
        host = np.asarray(inputs)
        empty = np.flatnonzero(~(host != PAD_ID).any(axis=1))
        if empty.size:
            raise ValueError(f"inputs row(s) {empty.tolist()} hold only padding ({PAD_ID}); "
                             "give every row a source, or leave empty rows out.")
        if not _WARNED_NO_EOS and not (host == EOS_ID).any():
            _WARNED_NO_EOS = True
            logging.getLogger(__name__).warning(
                "No source row holds EOS (id %d). translation_pipeline ends every training "
                "source with it, and a model trained so decodes unframed sources poorly: "
                "frame them with flaxformer_lite.data.encode_sources.", EOS_ID)


_WARNED_NO_EOS = False


def _as_ids(name: str, ids):
    """Python lists (of equal-length rows) as an int32 array; arrays pass through. Either must
    hold integers (floats were truncated to ids without a word)."""
    if isinstance(ids, (list, tuple)):
        try:
            array = np.asarray(ids)
        except ValueError as error:
            raise ValueError(f"{name} rows differ in length; right-pad them with {PAD_ID} to "
                             "one width.") from error
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must hold integer ids, got {array.dtype} values.")
        return array.astype(np.int32)
    dtype = getattr(ids, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer ids, got a {dtype} array: cast it "
                         "(e.g. .astype(jnp.int32)) if its values are ids.")
    return ids


def _positive_int(name: str, value) -> int:
    try:
        number = 0 if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = 0
    if number < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    return number


def _check_total(cfg: TransformerConfig, prompt_len: int, new, new_name: str) -> int:
    """Prompt plus generated tokens must fit the model's `max_len` (checked before compiling)."""
    new = _positive_int(new_name, new)
    # Only learned positions have a table of max_len rows; with the others the parameters
    # do not depend on it, and the limit is the config's to raise (quality past the trained
    # lengths is another matter).
    longer = ("build it with a larger TransformerConfig.max_len" if cfg.position == "learned"
              else f"with position={cfg.position!r} the same parameters run at any length: "
              "pass the model make_model(config.replace(max_len=N))")
    if prompt_len >= cfg.max_len:
        raise ValueError(f"The prompts are {prompt_len} columns wide (padding included), which "
                         f"leaves no room for new tokens within the model's max_len="
                         f"{cfg.max_len}; shorten them or their padding, or {longer}.")
    if prompt_len + new > cfg.max_len:
        what = f"prompt length {prompt_len} + " if prompt_len else ""
        raise ValueError(
            f"{what}{new_name}={new} exceeds the model's max_len={cfg.max_len}; lower "
            f"{new_name} to at most {cfg.max_len - prompt_len}, or {longer}.")
    return new


def _sampling_args(cfg: TransformerConfig, rng, temperature, top_k, top_p, stop_tokens, greedy,
                   return_logits) -> tuple[dict, dict]:
    """Validate the sampling settings; split them into traced and static (compiled-in) ones.

    Temperature and stop tokens are traced, so changing them does not recompile; `top_k`,
    `top_p`, `greedy` and `return_logits` change the program and are static.
    """
    if not greedy:
        if rng is None:
            raise ValueError("sampling needs an rng (e.g. jax.random.key(0)); pass rng=... or "
                             "greedy=True.")
        if not _is_one_key(rng):
            raise ValueError(f"rng={rng!r:.60} must be one PRNG key: jax.random.key(seed) "
                             "(or a legacy jax.random.PRNGKey), not a seed or a batch of keys.")
        if jnp.ndim(temperature) != 0:
            raise ValueError(f"temperature must be one number, got shape "
                             f"{jnp.shape(temperature)}.")
        known = _concrete(temperature)
        if known is not None and not (np.isfinite(known) and known > 0):
            raise ValueError(f"temperature={temperature} must be a finite number > 0; for the "
                             "argmax use greedy=True.")
    if isinstance(top_p, jax.core.Tracer) or isinstance(top_k, jax.core.Tracer):
        raise ValueError("top_k and top_p are compiled into the sampler: pass Python numbers "
                         "(static arguments of your jit), not traced values.")
    try:
        k = -1 if isinstance(top_k, bool) else operator.index(top_k)
    except TypeError:
        k = -1
    if not 0 <= k <= cfg.vocab_size:
        raise ValueError(f"top_k={top_k!r} must be an int in [0, vocab_size={cfg.vocab_size}] "
                         "(0 = no top-k filtering).")
    try:
        known_p = (float("nan") if isinstance(top_p, (bool, str)) or np.ndim(top_p)
                   else float(top_p))
    except (TypeError, ValueError):
        known_p = float("nan")
    if not 0.0 < known_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = no nucleus filtering).")
    if stop_tokens is _LIBRARY_EOS and cfg.eos_id is not None:
        stop_tokens = (cfg.eos_id,)  # the config's end token is the default
    is_default = stop_tokens is _LIBRARY_EOS
    if is_default and cfg.pad_id is None:
        raise ValueError(
            f"stop_tokens: the default, the library's EOS id {EOS_ID}, is an ordinary token of a "
            "vocabulary without padding (TransformerConfig.pad_id=None; GPT-2's '\"'): pass "
            "this vocabulary's end token (GPT-2: stop_tokens=(50256,)), or () to run to "
            "max_new_tokens; or set TransformerConfig.eos_id, the default then.")
    stops = _stop_sequences(cfg, stop_tokens, is_default)
    dyn = {"rng": None if greedy else rng,
           "temperature": jnp.asarray(temperature, jnp.float32),
           "stop_tokens": stops}
    static = {"top_k": k, "top_p": float(top_p), "greedy": bool(greedy),
              "return_logits": bool(return_logits)}
    return dyn, static


def _is_one_key(rng) -> bool:
    """Whether `rng` is one PRNG key: typed (`jax.random.key`, shape ()) or raw uint32 `[2]`
    (`[4]` for the rbg implementation)."""
    if not isinstance(rng, (jax.Array, np.ndarray)):
        return False
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng.shape == ()
    return rng.dtype == np.uint32 and rng.ndim == 1  # [2] threefry, [4] rbg


def _stop_sequences(cfg: TransformerConfig, stop_tokens, is_default: bool) -> Array:
    """`stop_tokens` as the sampler's `[n, w]` matrix of stop sequences, right-aligned.

    Accepted: ids (each one token), sequences of ids (each a stop sequence; ids and sequences
    may be mixed), or an array: `[n]` ids or `[n, w]` sequences left-padded with -1. Concrete
    values are checked; rows are padded to a multiple of 4 with rows of -2 (which stop
    nothing), so small sets of one width share a compilation. A traced array (inside a
    caller's jit) is used as given.
    """
    stop_tokens = () if stop_tokens is None else stop_tokens
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(stop_tokens)):
        try:  # traced inside a caller's jit: nothing to check
            stops = jnp.asarray(stop_tokens, jnp.int32)
        except (TypeError, ValueError) as error:
            raise ValueError("traced stop_tokens must be one array: [n] ids or [n, w] stop "
                             f"sequences left-padded with -1 ({error}).") from None
        if stops.ndim not in (1, 2):
            raise ValueError(f"stop_tokens traced with shape {stops.shape}: pass [n] ids or "
                             "[n, w] stop sequences left-padded with -1.")
        stops = stops[:, None] if stops.ndim == 1 else stops
    else:
        rows = _stop_rows(stop_tokens)
        ids = [t for row in (rows or []) for t in row]
        bad = [t for t in ids if not isinstance(t, numbers.Integral) or isinstance(t, bool)
               or not 0 <= t < cfg.vocab_size or t == _pad_or(cfg, -1)]
        if rows is None or bad or not all(rows):
            default = (" (the default stop_tokens=(EOS_ID,) is this model's padding id: pass "
                       "stop_tokens= of its own vocabulary, or ())" if is_default else "")
            raise ValueError(
                f"stop_tokens={stop_tokens!r:.100} must be ids in [0, vocab_size="
                f"{cfg.vocab_size})" + ("" if cfg.pad_id is None else
                f" but the padding id {cfg.pad_id}, which is never emitted, so it could "
                "never stop a row") + "; each entry an id or a non-empty sequence of ids (a "
                f"stop sequence){default}.")
        width = max((len(row) for row in rows), default=1)
        stops = np.full((len(rows), width), -1, np.int32)  # -1: before a shorter sequence
        for i, row in enumerate(rows):
            stops[i, width - len(row):] = row
        stops = jnp.asarray(stops)
    return _pad_rows(stops)


def _pad_rows(x: Array) -> Array:
    """`x` `[n, ...]` with rows of -2 (matching no token) added up to a multiple of 4 rows (at
    least 4): small stop or end sets of one shape share a compilation."""
    pad = 4 * max(1, -(-x.shape[0] // 4)) - x.shape[0]
    return jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], -2, jnp.int32)])


def _eos_ids(cfg: TransformerConfig, eos_id, is_default: bool) -> Array:
    """`eos_id` (one id, a sequence of ids or an `[n]` array; any of them ends a beam) as
    `[m]` ids, padded to a multiple of 4 with -2 (which ends nothing) so small sets share a
    compilation. Concrete ids are checked; traced ones (inside a caller's jit) used as given."""
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(eos_id)):
        try:
            ids = jnp.asarray(eos_id, jnp.int32)
        except (TypeError, ValueError) as error:
            raise ValueError(f"traced eos_id must be one id or an [n] array of ids ({error})."
                             ) from None
        if ids.ndim > 1:
            raise ValueError(f"eos_id traced with shape {ids.shape}: pass one id or [n] ids.")
    else:
        try:
            known = np.asarray(eos_id)
        except (TypeError, ValueError):
            known = np.asarray("unreadable")
        if not (known.ndim <= 1 and known.size and np.issubdtype(known.dtype, np.integer)
                and ((0 <= known) & (known < cfg.vocab_size)
                     & (known != _pad_or(cfg, -1))).all()):
            default = (" (the default eos_id=EOS_ID is this model's padding id: pass an eos_id "
                       "of its own vocabulary)" if is_default else "")
            raise ValueError(f"eos_id={eos_id!r:.100} must be an id in [0, vocab_size="
                             f"{cfg.vocab_size})" + ("" if cfg.pad_id is None else
                             f" but the padding id {cfg.pad_id}, which is never emitted, so "
                             "it could never end a beam") + ", or a non-empty sequence of "
                             f"such ids (any of them ends a beam){default}.")
        ids = jnp.asarray(known, jnp.int32)
    return _pad_rows(ids.reshape(-1))


def _stop_rows(stop_tokens) -> list[list] | None:
    """Concrete `stop_tokens` as a list of stop sequences; None for an unreadable shape."""
    def scalar(x):
        return x.item() if isinstance(x, (np.generic, np.ndarray, jax.Array)) else x

    if isinstance(stop_tokens, (np.ndarray, jax.Array)):
        array = np.asarray(stop_tokens)
        if array.ndim == 2:  # [n, w], each row left-padded with -1
            return [list(itertools.dropwhile(lambda t: t == -1, row)) for row in array.tolist()]
        return [[t] for t in array.reshape(-1).tolist()] if array.ndim <= 1 else None
    if not isinstance(stop_tokens, Iterable) or isinstance(stop_tokens, str):
        return [[scalar(stop_tokens)]]  # one id
    rows = []
    for entry in stop_tokens:
        if isinstance(entry, str):
            return None
        if not isinstance(entry, Iterable) or np.ndim(entry) == 0:
            rows.append([scalar(entry)])
        elif any(isinstance(t, (str, Iterable)) and np.ndim(t) != 0 for t in entry):
            return None  # deeper nesting
        else:
            rows.append([scalar(t) for t in entry])
    return rows


def _concrete(x) -> np.ndarray | None:
    """`x` as a NumPy array, or None when it is traced (inside a caller's jit)."""
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        return None


_SIDES = ("right", "left")


def _lm_prompts(cfg: TransformerConfig, prompts, prompt_lengths, side: str, new,
                new_name: str):
    """`(prompts right-aligned, lengths, new)`, checked. Prompts padded wider than their longest
    row (a harness's fixed bucket width) are cut to the width `max_len` leaves for `new`
    tokens when their lengths are known and fit: one width per `max_len` and `new`, so one
    compilation, where the padding used to be refused as too long."""
    new = _positive_int(new_name, new)
    lengths = _prompt_lengths(prompts, prompt_lengths, cfg.pad_id, side)
    prompts = _right_aligned(prompts, lengths, side)
    room = cfg.max_len - new
    known = _concrete(lengths)
    if prompts.shape[1] > room >= 1 and known is not None and int(known.max()) <= room:
        prompts = prompts[:, :room]
    return prompts, lengths, _check_total(cfg, prompts.shape[1], new, new_name)


def _prompt_lengths(prompts, prompt_lengths, pad_id: int | None = PAD_ID,
                    side: str = "right") -> Array:
    """Default lengths count the non-pad tokens of the prompts, padded on `side` (every column
    without a padding id); validate when known, the padding's side included."""
    if side not in _SIDES:
        raise ValueError(f"padding_side={side!r} must be 'right' (tokens first, then padding) "
                         "or 'left' (padding first).")
    other = "left" if side == "right" else "right"
    if prompt_lengths is None and pad_id is None:
        return jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
    if prompt_lengths is None:
        known = _concrete(prompts)
        if known is not None:
            real = known != pad_id
            first = real if side == "right" else real[:, ::-1]  # tokens first, then padding
            bad = np.flatnonzero(~real.any(axis=1) | (first[:, 1:] & ~first[:, :-1]).any(axis=1))
            if bad.size:
                where = "before" if side == "right" else "after"
                raise ValueError(
                    f"prompts row(s) {bad.tolist()} are empty or not {side}-padded (a pad id "
                    f"{pad_id} {where} a token): pad every row on one side, and say which with "
                    f"padding_side= ('{side}' now; '{other}' for padding "
                    f"{'first' if other == 'left' else 'after the tokens'}). When {pad_id} is "
                    "a real token, pass prompt_lengths= as well.")
        return jnp.sum(prompts != pad_id, axis=1).astype(jnp.int32)
    if getattr(prompt_lengths, "shape", None) != (prompts.shape[0],):
        raise ValueError(f"prompt_lengths must have shape [batch]=({prompts.shape[0]},), got "
                         f"{getattr(prompt_lengths, 'shape', type(prompt_lengths).__name__)}.")
    known = _concrete(prompt_lengths)
    if known is not None and ((known < 1).any() or (known > prompts.shape[1]).any()):
        raise ValueError(f"prompt_lengths={known.tolist()} must be in [1, prompts.shape[1]="
                         f"{prompts.shape[1]}]; every prompt needs at least one token.")
    tokens = _concrete(prompts)
    if known is not None and tokens is not None and pad_id is not None:
        # Lengths over the wrong end would continue rows from their padding.
        width = tokens.shape[1]
        cols = np.arange(width)[None, :]
        inside = cols < known[:, None] if side == "right" else cols >= width - known[:, None]
        pad = tokens == pad_id
        bad = np.flatnonzero((inside & pad).any(axis=1) & (~inside & ~pad).any(axis=1))
        if bad.size:
            raise ValueError(
                f"prompts row(s) {bad.tolist()} look {other}-padded: their "
                f"{'first' if side == 'right' else 'last'} prompt_lengths[b] columns hold "
                f"the pad id {pad_id} while other columns hold "
                f"tokens. For prompts padded on the {other}, pass padding_side='{other}'.")
    return jnp.asarray(prompt_lengths, jnp.int32)


def _right_aligned(prompts: Array, lengths: Array, side: str) -> Array:
    """Left-padded prompts `[batch, width]` turned right-padded (each row rotated by its
    padding), which the prefill reads; right-padded ones as they are."""
    if side == "right":
        return prompts
    width = prompts.shape[1]
    cols = (jnp.arange(width)[None, :] + (width - lengths)[:, None]) % width
    return jnp.take_along_axis(jnp.asarray(prompts, jnp.int32), cols, axis=1)


# ---- public entry points ----------------------------------------------------------------------

def generate(model: DecoderOnly, params, prompts: Array, *, prompt_lengths: Array | None = None,
             max_new_tokens: int, rng: Array | None = None, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, stop_tokens: StopTokens = _LIBRARY_EOS,
             greedy: bool = False, return_logits: bool = False,
             padding_side: str = "right") -> Generation:
    """Continue `prompts` `[batch, prompt_len]` with a decoder-only model.

    `prompt_lengths` `[batch]` (default: the non-pad tokens per row) lets prompts of different
    lengths share the batch; each row continues from its own last token. The padding follows
    the tokens (`padding_side="right"`) or precedes them (`"left"`); either way a row's
    continuation is the unpadded prompt's. Sampling is set by
    `temperature`, `top_k`, `top_p` and `rng` (step `i` draws with `fold_in(rng, i)`, one draw
    over the batch: a row's sample depends on its row index, so the same key repeats a text
    for a prompt in the same row), or `greedy=True` for the argmax. A row stops at the first of
    its `stop_tokens` (kept in the output; the padding id after it; default
    `(config.eos_id,)`, else the library's EOS 1). Each entry of `stop_tokens` is an id or a
    sequence of ids (a stop string's tokens, e.g. `(13, 13)`), matched in the generated
    tokens only (not across the prompt's end); an array may give `[n]` ids or `[n, w]`
    sequences left-padded with -1. `prompt_len + max_new_tokens` must not
    exceed `config.max_len` (padding past the longest row is cut to fit when the lengths are
    known). With
    `config.pad_id=None` (a vocabulary without padding) every prompt
    column is a token unless `prompt_lengths` says otherwise, and any id may be generated.
    Returns a `Generation`: tokens `[batch, max_new_tokens]`, lengths, log_probs, per-token
    token_log_probs and sampled_log_probs (, logits).

    `model` may be a `DecoderOnly` subclass with layers of your own. Its `__call__(ids, *,
    segment_ids, positions, decode=True)` is then fed the prompts' columns but the last (a
    shorter row's tail with segment id 0: cached but never to be attended), then one token a
    call at explicit positions; `models.decode_state` does that bookkeeping.
    """
    cfg = _check_model(model, (DecoderOnly,), "generate",
                       "use generate_seq2seq for encoder-decoder models", params)
    prompts, prompt_lengths = _as_ids("prompts", prompts), _as_ids("prompt_lengths",
                                                                     prompt_lengths)
    _check_ids("prompts", prompts, cfg.vocab_size)
    dyn, static = _sampling_args(cfg, rng, temperature, top_k, top_p, stop_tokens, greedy,
                                 return_logits)
    prompts, lengths, max_new_tokens = _lm_prompts(cfg, prompts, prompt_lengths, padding_side,
                                                   max_new_tokens, "max_new_tokens")
    return _generate_lm(model, unwrap_params(params), jnp.asarray(prompts, jnp.int32), lengths, dyn,
                        max_new_tokens=max_new_tokens, **static)


def generate_seq2seq(model: EncoderDecoder, params, inputs: Array, *, max_new_tokens: int,
                     rng: Array | None = None, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, stop_tokens: StopTokens = _LIBRARY_EOS,
                     greedy: bool = False, return_logits: bool = False,
                     num_samples: int = 1) -> Generation:
    """Decode targets for source ids `inputs` `[batch, src_len]` (0 = padding, after each
    row's tokens as the pipelines pad them: with learned or sinusoidal positions a left-padded
    source shifts its positions, in training as here). Frame them as training did, ending in
    EOS: `data.encode_sources`.

    The encoder runs once; the decoder starts from token 0 and samples as in `generate`.
    `max_new_tokens` (the target length) must not exceed `config.max_len`. `num_samples = k`
    draws k samples a source, encoding each source once: the result has `batch * k` rows,
    source i's at `i * k ... i * k + k - 1` (with sampling; greedy would repeat one row).
    """
    cfg = _check_model(model, (EncoderDecoder,), "generate_seq2seq",
                       "use generate for decoder-only models", params)
    inputs = _as_ids("inputs", inputs)
    _check_ids("inputs", inputs, cfg.vocab_size)
    _check_sources(inputs)
    max_new_tokens = _check_total(cfg, 0, max_new_tokens, "max_new_tokens")
    num_samples = _positive_int("num_samples", num_samples)
    if num_samples > 1 and greedy:
        raise ValueError(f"num_samples={num_samples} with greedy=True would give {num_samples} "
                         "equal rows a source; sample (greedy=False, an rng) or use "
                         "beam_search for several distinct hypotheses.")
    dyn, static = _sampling_args(cfg, rng, temperature, top_k, top_p, stop_tokens, greedy,
                                 return_logits)
    return _generate_s2s(model, unwrap_params(params), jnp.asarray(inputs, jnp.int32), dyn,
                         max_new_tokens=max_new_tokens, num_samples=num_samples, **static)


def beam_search(model: DecoderOnly | EncoderDecoder, params, inputs: Array, *, beam_size: int,
                alpha: float = 0.6, max_len: int,
                eos_id: int | Sequence[int] | Array | None = None,
                prompt_lengths: Array | None = None, padding_side: str = "right") -> Beams:
    """Beam search with the GNMT length penalty; returns all `beam_size` beams, best first.

    `inputs`: source ids `[batch, src_len]` for an encoder-decoder model, or prompts
    `[batch, prompt_len]` (with optional `prompt_lengths`, padded on `padding_side` as in
    `generate`) for a decoder-only one; `max_len`
    bounds the generated tokens per beam. Each step extends every live beam by every token,
    retires beams that emit `eos_id` among the top `beam_size` candidates (score
    `log_prob / ((5 + length) / 6) ** alpha`), keeps the best `beam_size` unfinished ones, and
    stops once no live beam can beat the finished ones. Beams open at `max_len` are scored as
    they stand. `eos_id` is one id or several (a sequence or an `[n]` array: any of them ends
    a beam, as a chat model's end-of-turn and end-of-text tokens). `alpha` and `eos_id` are
    traced (tuning `alpha` does not recompile; a concrete one so far from 0 that float32
    scores cannot rank, e.g. -100, is refused). `eos_id` defaults to `config.eos_id`, else
    the library's EOS (1); a vocabulary without padding (`pad_id=None`, GPT-2's) must name its
    own (here or in the config).
    """
    cfg = _check_model(model, (DecoderOnly, EncoderDecoder), "beam_search",
                       "encoder-only models do not generate", params)
    inputs, prompt_lengths = _as_ids("inputs", inputs), _as_ids("prompt_lengths", prompt_lengths)
    _check_ids("inputs", inputs, cfg.vocab_size)
    known = _concrete(alpha)
    if known is not None and not (known.shape == () and np.isfinite(known)):
        raise ValueError(f"alpha={alpha} must be one finite number (the length penalty's "
                         "exponent; 0 = none).")
    if isinstance(model, DecoderOnly):
        inputs, lengths, max_len = _lm_prompts(cfg, inputs, prompt_lengths, padding_side,
                                               max_len, "max_len")
    else:
        max_len = _check_total(cfg, 0, max_len, "max_len")
        _check_sources(inputs)
        if prompt_lengths is not None or padding_side != "right":
            raise ValueError("prompt_lengths and padding_side apply to decoder-only models; an "
                             "encoder-decoder model reads source padding from inputs (0 = pad).")
        lengths = None
    beam_size = _positive_int("beam_size", beam_size)
    _check_alpha_range(known, max_len)
    if eos_id is None:
        eos_id = cfg.eos_id  # the config's end token is the default
    is_default = eos_id is None
    if is_default and cfg.pad_id is None:
        raise ValueError(
            f"eos_id: the default, the library's EOS id {EOS_ID}, is an ordinary token of a "
            "vocabulary without padding (TransformerConfig.pad_id=None; GPT-2's '\"'): pass "
            "this vocabulary's end token (GPT-2: eos_id=50256), or set "
            "TransformerConfig.eos_id, the default then.")
    eos_ids = _eos_ids(cfg, EOS_ID if is_default else eos_id, is_default)
    return _beam_search(model, unwrap_params(params), jnp.asarray(inputs, jnp.int32), lengths,
                        jnp.asarray(alpha, jnp.float32), eos_ids, beam_size=beam_size,
                        max_len=max_len)


def generate_no_cache(model: DecoderOnly, params, prompts: Array, *,
                      prompt_lengths: Array | None = None, max_new_tokens: int,
                      rng: Array | None = None, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, stop_tokens: StopTokens = _LIBRARY_EOS,
                      greedy: bool = False, return_logits: bool = False,
                      padding_side: str = "right") -> Generation:
    """`generate` without a cache: every step reruns the model over the whole sequence.

    Rows are kept contiguous in a `[batch, prompt_len + max_new_tokens - 1]` buffer and each
    step is one full forward over it (static shapes, so one compilation), i.e. the cost of the
    final length at every step. Same arguments and (up to float rounding) same result as
    `generate`; it is the reference for tests and the benchmark.
    """
    cfg = _check_model(model, (DecoderOnly,), "generate_no_cache",
                       "it covers decoder-only models only", params)
    prompts, prompt_lengths = _as_ids("prompts", prompts), _as_ids("prompt_lengths",
                                                                     prompt_lengths)
    _check_ids("prompts", prompts, cfg.vocab_size)
    dyn, static = _sampling_args(cfg, rng, temperature, top_k, top_p, stop_tokens, greedy,
                                 return_logits)
    prompts, lengths, max_new_tokens = _lm_prompts(cfg, prompts, prompt_lengths, padding_side,
                                                   max_new_tokens, "max_new_tokens")
    return _generate_lm_no_cache(model, unwrap_params(params), jnp.asarray(prompts, jnp.int32),
                                 lengths, dyn, max_new_tokens=max_new_tokens, **static)


def fill_masks(model: EncoderOnly, params, ids: Array, *, top_k: int = 5,
               exclude: Sequence[int] = ()) -> tuple[Array, Array]:
    """A masked LM's `top_k` guesses at every position of `ids` `[batch, length]` (framed and
    masked as in training, e.g. `data.encode_masked`): `(tokens, probs)`, each
    `[batch, length, top_k]`, most probable first; read them where `ids == MASK_ID`. Padding
    (id 0) is masked out of the attention as in training. Specials and the ids in `exclude`
    are never guessed (e.g. a SentencePiece tokenizer's `space_id`, the bare "▁" piece, which
    prints as nothing); `probs` are renormalised over the tokens that may be guessed."""
    cfg = _check_model(model, (EncoderOnly,), "fill_masks",
                       "use generate or beam_search for decoders")
    if not cfg.mlm_head:
        raise ValueError("fill_masks needs the masked-LM head: TransformerConfig.mlm_head=True.")
    check_params_read(model, unwrap_params(params), "fill_masks")
    top_k = _positive_int("top_k", top_k)
    ids = _as_ids("ids", ids)
    _check_ids("ids", ids, cfg.vocab_size)
    if exclude is None:
        given = []
    elif isinstance(exclude, (np.ndarray, jax.Array)):
        given = np.asarray(exclude).reshape(-1).tolist()
    elif isinstance(exclude, Iterable) and not isinstance(exclude, str):
        given = list(exclude)
    else:
        given = [exclude]  # one id
    if isinstance(exclude, str) or any(
            not isinstance(i, numbers.Integral) or isinstance(i, bool) for i in given):
        raise ValueError(f"exclude={exclude!r:.100} must be token ids (ints; one id or a "
                         "sequence of them).")
    exclude = tuple(sorted({int(i) for i in given}))
    if any(not 0 <= i < cfg.vocab_size for i in exclude):
        raise ValueError(f"exclude={list(exclude)} holds ids outside [0, {cfg.vocab_size}).")
    guessable = cfg.vocab_size - len(set(range(_FIRST_REAL_ID)) | set(exclude))
    if top_k > guessable:
        raise ValueError(
            f"top_k={top_k} exceeds the {guessable} ids fill_masks may guess (vocab_size="
            f"{cfg.vocab_size} less the special ids 0..{_FIRST_REAL_ID - 1} and "
            f"{len(set(exclude) - set(range(_FIRST_REAL_ID)))} excluded): ask for at most "
            f"{guessable}" + (", or exclude fewer ids." if exclude else "."))
    return _fill_masks(model, unwrap_params(params), jnp.asarray(ids, jnp.int32), top_k=top_k,
                       exclude=exclude)


@jit_model_fn(static_argnames=("model", "top_k", "exclude"))
def _fill_masks(model, params, ids, *, top_k, exclude):
    out = model.apply({"params": params}, ids, segment_ids=(ids != PAD_ID).astype(jnp.int32))
    logits = out["logits"].at[..., :_FIRST_REAL_ID].set(-jnp.inf)  # no PAD/EOS/BOS/UNK/MASK
    if exclude:
        logits = logits.at[..., jnp.asarray(exclude)].set(-jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    probs, tokens = jax.lax.top_k(probs, top_k)
    return tokens, probs


_FIRST_REAL_ID = 5  # the tokenizers' ids below it are PAD, EOS, BOS, UNK and MASK


# ---- compiled bodies -------------------------------------------------------------------------

_STATIC = ("model", "max_new_tokens", "top_k", "top_p", "greedy", "return_logits")


def _bind(step, model, params):
    return lambda cache, ctx, tokens, positions: step(model, params, cache, ctx, tokens,
                                                      positions)


@jit_model_fn(static_argnames=_STATIC)
def _generate_lm(model, params, prompts, prompt_lengths, dyn, **static) -> Generation:
    # Slots: the prompt's columns but the last, then the last prompt token and all but the
    # last new token.
    cache_len = prompts.shape[1] - 1 + static["max_new_tokens"]
    prefill = _prefill_lm(model, params, prompts, prompt_lengths, cache_len)
    return _sample_loop(_bind(_lm_step, model, params), *prefill, dyn,
                        vocab=model.config.vocab_size, pad_id=model.config.pad_id, **static)


@jit_model_fn(static_argnames=(*_STATIC, "num_samples"))
def _generate_s2s(model, params, inputs, dyn, num_samples=1, **static) -> Generation:
    prefill = _prefill_seq2seq(model, params, inputs, static["max_new_tokens"], num_samples)
    return _sample_loop(_bind(_seq2seq_step, model, params), *prefill, dyn,
                        vocab=model.config.vocab_size, pad_id=model.config.pad_id, **static)


@jit_model_fn(static_argnames=("model", "beam_size", "max_len"))
def _beam_search(model, params, inputs, prompt_lengths, alpha, eos_id, *, beam_size,
                 max_len) -> Beams:
    if isinstance(model, DecoderOnly):
        cache_len = inputs.shape[1] - 1 + max_len
        prefill = _prefill_lm(model, params, inputs, prompt_lengths, cache_len)
        step = _bind(_lm_step, model, params)

        def cache_shape(n):
            return jax.eval_shape(lambda: init_cache(model, params, n, cache_len))
    else:
        prefill = _prefill_seq2seq(model, params, inputs, max_len)
        step = _bind(_seq2seq_step, model, params)
        enc = prefill[1]["encoded"]

        def cache_shape(n):
            def fn(encoded, segment_ids):
                return init_cache(model, params, n, max_len, encoded=encoded,
                                  encoder_segment_ids=segment_ids)
            return jax.eval_shape(fn, jax.ShapeDtypeStruct((n,) + enc.shape[1:], enc.dtype),
                                  jax.ShapeDtypeStruct((n, enc.shape[1]), jnp.int32))
    axes = _batch_axes(cache_shape, inputs.shape[0])
    return _beam_loop(step, *prefill, axes, vocab=model.config.vocab_size,
                      pad_id=model.config.pad_id, beam_size=beam_size,
                      alpha=alpha, max_len=max_len, eos_id=eos_id)


@jit_model_fn(static_argnames=_STATIC)
def _generate_lm_no_cache(model, params, prompts, prompt_lengths, dyn, **static) -> Generation:
    b, p = prompts.shape
    total = p + static["max_new_tokens"] - 1
    slots = jnp.arange(total, dtype=jnp.int32)
    buffer = jnp.where(slots[None, :] < prompt_lengths[:, None],
                       jnp.pad(prompts, ((0, 0), (0, total - p))), PAD_ID)
    rows = jnp.arange(b)

    def step(buffer, ctx, tokens, positions):
        """Write `tokens` at `positions` (rows are contiguous: slot = position), then run the
        model over the whole buffer and read the logits there."""
        del ctx
        buffer = buffer.at[rows, positions].set(tokens)
        valid = (slots[None, :] <= positions[:, None]).astype(jnp.int32)
        logits = model.apply({"params": params}, buffer, segment_ids=valid)
        return logits[rows, positions], buffer

    last = prompt_lengths - 1
    return _sample_loop(step, buffer, {}, prompts[rows, last], last, dyn,
                        vocab=model.config.vocab_size, pad_id=model.config.pad_id, **static)


# ---- benchmark -----------------------------------------------------------------------------

BENCHMARK_CONFIG = TransformerConfig(
    architecture="decoder_only", vocab_size=256, d_model=384, num_heads=6, d_ff=1536,
    num_layers=6, max_len=512, activation="gelu", position="learned", dropout_rate=0.0)


def benchmark(config: TransformerConfig = BENCHMARK_CONFIG, *, batch_sizes: Sequence[int] = (1, 8),
              prompt_len: int = 16, new_tokens: int = 256, repeats: int = 3,
              seed: int = 0, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Greedy generation speed with and without the KV cache on the default device.

    Every step runs (no stop tokens). Returns one row per (batch, method): `batch`, `method`
    ("kv cache" / "no cache"), `seconds` (best of `repeats` runs of the compiled program after
    a warm-up run), `compile_seconds` and `tokens_per_s` (`batch * new_tokens / seconds`);
    `on_row` sees each row as soon as it is measured.
    """
    for name, value in (("prompt_len", prompt_len), ("new_tokens", new_tokens),
                        ("repeats", repeats), *(("batch_sizes", b) for b in batch_sizes)):
        _positive_int(name, value)
    model = make_model(config)
    key = jax.random.key(seed)
    params = init_params(config, key)
    rows = []
    for batch in batch_sizes:
        prompts = jax.random.randint(jax.random.fold_in(key, batch), (batch, prompt_len), 4,
                                     config.vocab_size, dtype=jnp.int32)
        for method, fn in (("kv cache", generate), ("no cache", generate_no_cache)):
            def tokens(params, prompts, fn=fn):
                return fn(model, params, prompts, max_new_tokens=new_tokens, greedy=True,
                          stop_tokens=()).tokens

            start = time.perf_counter()
            compiled = jax.jit(tokens).lower(params, prompts).compile()
            compile_s = time.perf_counter() - start
            jax.block_until_ready(compiled(params, prompts))  # warm-up: first-run allocations
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(compiled(params, prompts))
                times.append(time.perf_counter() - start)
            best = min(times)
            rows.append({"batch": batch, "method": method, "seconds": best,
                         "compile_seconds": compile_s,
                         "tokens_per_s": batch * new_tokens / best})
            if on_row is not None:
                on_row(rows[-1])
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of `benchmark` rows, with the cache's speed-up per batch size."""
    lines = ["| batch | method | seconds | tokens/s | speed-up |", "|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["batch"] == row["batch"] and r["method"] == "no cache")
        lines.append(f"| {row['batch']} | {row['method']} | {row['seconds']:.3f} | "
                     f"{row['tokens_per_s']:.1f} | {base['seconds'] / row['seconds']:.1f}x |")
    return "\n".join(lines)


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", action="store_true",
                        help="time generation with and without the KV cache")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not args.benchmark:
        parser.print_help()
        return
    cfg = BENCHMARK_CONFIG
    print(f"decoder-only GPT: {cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} "
          f"heads, vocab {cfg.vocab_size}; prompt {args.prompt_len}, {args.new_tokens} new "
          f"tokens, greedy, float32, {jax.devices()[0].platform}")
    rows = benchmark(cfg, batch_sizes=args.batch_sizes, prompt_len=args.prompt_len,
                     new_tokens=args.new_tokens, repeats=args.repeats,
                     on_row=lambda r: print(f"  batch {r['batch']}, {r['method']}: "
                                            f"{r['tokens_per_s']:.1f} tokens/s", flush=True))
    print(format_table(rows))


if __name__ == "__main__":
    _main()
