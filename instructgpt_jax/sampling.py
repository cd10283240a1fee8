"""Autoregressive sampling with a KV cache: one prefill call, then a decode loop inside one jitted program.

    sampler = make_sampler(model, max_new_tokens=64, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=1.0)
    out = sampler(params, prompt_tokens, prompt_mask, rng)      # under `sharding.use(mesh)` when sharded

Prompts are LEFT-padded ([B, P], `prompt_mask` 1 on real tokens, every row at least one), so all
rows decode into the same cache slot at each step. A row's first real token has position 0; its
response continues the positions. Pads keep segment id 0 (masked for every later token), real
prompt and response tokens have segment id 1, so the cached decode computes exactly what one
full forward pass over prompt + response would.

Each step: last logits -> float32 -> / temperature -> top-k -> top-p (nucleus) -> `categorical`
(argmax when `greedy` or temperature == 0). A row stops at its first EOS (`eos_id`: one id or a
set of ids, e.g. `tokenizer.eos_ids` with Llama-3's <|eot_id|> and <|end_of_text|>), which belongs to
the response; later slots hold `pad_id` with response_mask 0. The loop is a `lax.while_loop` that
ends early once every row has stopped.

`logprobs` are log_softmax(logits / temperature) of the sampled token, i.e. under the tempered
model *before* top-k / top-p truncation (temperature 1 for greedy / temperature 0): that is the
policy PPO optimises, and PPO recomputes logprobs with its training forward pass anyway.

Sharding: params may be sharded any way; batch arrays over the batch axes. Trace the jitted
sampler under `sharding.use(mesh)`: the cache is then constrained to its logical axes
(`models.CACHE_LOGICAL_AXES`, batch-sharded); outside a mesh the constraints are no-ops.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from instructgpt_jax.models import CACHE_LOGICAL_AXES, init_cache


def left_pad_positions(mask: jax.Array) -> jax.Array:
    """[B, T] position ids for a left-padded mask: the first real token of each row is 0 (pads get 0)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Set logits outside the top-k, then outside the top-p nucleus, to -inf. logits: [..., V] float32.

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p (the most likely
    token is always kept); ties at the cut-off are all kept.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # mass strictly before this token
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _uniforms(rng, b: int) -> jax.Array:
    """[B] uniforms from one key, or one from each of B per-row keys."""
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    if rng.ndim == (1 if typed else 2):
        return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(rng)
    return jax.random.uniform(rng, (b,), jnp.float32)


def categorical(rng, logits: jax.Array, block: int = 256) -> jax.Array:
    """One sample per row from softmax(logits) ([B, V] float32, -inf allowed) -> [B] int32.
    `rng`: one key, or [B] keys (one per row).

    Inverse CDF with ONE uniform per row: `jax.random.categorical` draws B * V Gumbel variates,
    which at a 50k vocabulary on CPU costs more than the model's whole decode step. Two levels
    (sums of blocks of `block` tokens, then prefix sums inside the chosen block) keep the float32
    prefix sums short. Never returns a zero-probability token: a rounding overshoot is clamped to
    the last block / token with mass, and every other pick is the first index whose prefix sum
    exceeds the target, so its own mass is positive.
    """
    b, v = logits.shape
    nb = -(-v // block)
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    p = jnp.pad(p, ((0, 0), (0, nb * block - v))).reshape(b, nb, block)

    def first_above(cum, target, mass):  # first index with cum > target, at most the last one with mass
        last = cum.shape[-1] - 1 - jnp.argmax(mass[:, ::-1] > 0, axis=-1)
        return jnp.minimum(jnp.sum(cum <= target[:, None], axis=-1), last)

    block_mass = p.sum(-1)  # [B, nb]
    block_cum = jnp.cumsum(block_mass, axis=-1)
    target = _uniforms(rng, b) * block_cum[:, -1]
    blk = first_above(block_cum, target, block_mass)
    # Mass before the chosen block, read from the same prefix sums that chose it, so 0 <= target - before.
    before = jnp.where(blk > 0, jnp.take_along_axis(block_cum, jnp.maximum(blk - 1, 0)[:, None], -1)[:, 0], 0.0)
    inner = jnp.take_along_axis(p, blk[:, None, None], axis=1)[:, 0]  # [B, block]
    idx = first_above(jnp.cumsum(inner, axis=-1), target - before, inner)
    return (blk * block + idx).astype(jnp.int32)


def sample_token(logits, rng, *, temperature=1.0, top_k=0, top_p=1.0, greedy=False):
    """One step: logits [B, V] -> (tokens [B] int32, logprobs [B] float32; see module docstring)."""
    logits = logits.astype(jnp.float32)
    greedy = greedy or temperature == 0
    scaled = logits / (1.0 if greedy else temperature)
    if greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        tokens = categorical(rng, filter_logits(scaled, top_k, top_p))
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), logprobs


def eos_tuple(eos_id) -> tuple[int, ...]:
    """`eos_id` (an int or a sequence / set of ints) as a sorted tuple of distinct ints."""
    ids = (eos_id,) if isinstance(eos_id, int) or getattr(eos_id, "ndim", None) == 0 else tuple(eos_id)
    if not ids:
        raise ValueError("eos_id: need at least one EOS id")
    return tuple(sorted({int(i) for i in ids}))


def _constrain_cache(cache):
    return nn.with_logical_constraint(cache, CACHE_LOGICAL_AXES)


def sample(params, prompt_tokens, prompt_mask, rng, row_ids=None, *, model, max_new_tokens: int, eos_id,
           pad_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
           return_logits: bool = False, use_cache: bool = True) -> dict:
    """Sample up to `max_new_tokens` tokens after left-padded prompts. Pure; jit it with everything after
    `rng` static (or use `make_sampler`).

    Args:
      params: the LM's params (`model` is a `Transformer` with head='lm').
      prompt_tokens: [B, P] int, left-padded. prompt_mask: [B, P], 1 on real tokens.
      rng: PRNG key (unused when greedy).
      row_ids: optional [B] ints: row b's draws come from its own key fold_in(key, row_ids[b]), so a
        batch sampled in chunks (with each row's index in the whole batch) gives the same tokens.
      eos_id: an EOS id, or a sequence / set of them (a row stops at the first of any); never pad_id.
      return_logits: also return 'logits' [B, N, V] float32, the raw logits each token was sampled from.
      use_cache: False recomputes the full sequence at every step instead of using the KV cache
        (same outputs, much slower: a reference for tests and benchmarks).

    Returns a dict: tokens [B, P+N] (prompt with pads set to pad_id, then response), response [B, N],
    response_mask [B, N] float32 (1 up to and including EOS), logprobs [B, N] float32 (0 where masked),
    lengths [B] int32 (response lengths), ended [B] bool (EOS was sampled).
    """
    cfg = model.cfg
    eos_ids = eos_tuple(eos_id)
    if pad_id in eos_ids:
        raise ValueError(f"pad_id={pad_id} is one of the EOS ids {list(eos_ids)}; PAD must never be an EOS")
    b, p = prompt_tokens.shape
    n = max_new_tokens
    if cfg.arch == "gpt" and p + n > cfg.max_len:
        raise ValueError(f"prompt length {p} + max_new_tokens {n} exceeds config.model.max_len={cfg.max_len} "
                         f"(the learned position table)")
    mask = prompt_mask.astype(jnp.int32)
    # The whole row as a full forward pass would see it: prompt then response slots.
    tokens = jnp.concatenate([jnp.where(mask == 1, prompt_tokens, pad_id), jnp.full((b, n), pad_id)],
                             axis=1).astype(jnp.int32)
    segments = jnp.concatenate([mask, jnp.ones((b, n), jnp.int32)], axis=1)
    positions = left_pad_positions(segments)
    apply = functools.partial(model.apply, {"params": params}, deterministic=True)

    if use_cache:
        cache = _constrain_cache(init_cache(cfg, b, p + n))
        logits, cache = apply(tokens[:, :p], positions[:, :p], segments[:, :p], cache=cache, cache_index=0,
                              last_only=True)

        def next_logits(cache, tokens, i):  # feed the token just written to slot p + i
            step = lambda x: jax.lax.dynamic_slice_in_dim(x, p + i, 1, axis=1)
            logits, cache = apply(step(tokens), step(positions), step(segments), cache=cache, cache_index=p + i)
            return logits[:, 0], _constrain_cache(cache)
    else:
        cache = ()
        logits = apply(tokens, positions, segments)[:, :p]

        def next_logits(cache, tokens, i):  # causal attention: slots after p + i do not matter
            return jax.lax.dynamic_index_in_dim(apply(tokens, positions, segments), p + i, axis=1,
                                                keepdims=False), cache

    state = dict(i=jnp.int32(0), tokens=tokens, logits=logits[:, -1], cache=cache,
                 done=jnp.zeros((b,), bool), lengths=jnp.zeros((b,), jnp.int32),
                 logprobs=jnp.zeros((b, n), jnp.float32))
    if return_logits:
        state["step_logits"] = jnp.zeros((b, n, cfg.vocab_size), jnp.float32)

    def body(s):
        i, done = s["i"], s["done"]
        key = jax.random.fold_in(rng, i)
        if row_ids is not None:
            key = jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids)
        tok, lp = sample_token(s["logits"], key, temperature=temperature, top_k=top_k,
                               top_p=top_p, greedy=greedy)
        tok = jnp.where(done, pad_id, tok)
        is_eos = jnp.any(tok[:, None] == jnp.asarray(eos_ids, jnp.int32)[None, :], axis=-1)
        s = dict(s, i=i + 1, done=done | is_eos, lengths=s["lengths"] + (~done),
                 tokens=jax.lax.dynamic_update_slice_in_dim(s["tokens"], tok[:, None], p + i, axis=1),
                 logprobs=s["logprobs"].at[:, i].set(jnp.where(done, 0.0, lp)))
        if return_logits:
            s["step_logits"] = s["step_logits"].at[:, i].set(s["logits"].astype(jnp.float32))
        # One forward more than needed at the last step; a cond to skip it costs more than it saves.
        s["logits"], s["cache"] = next_logits(s["cache"], s["tokens"], i)
        return s

    s = jax.lax.while_loop(lambda s: (s["i"] < n) & ~jnp.all(s["done"]), body, state)
    out = dict(tokens=s["tokens"], response=s["tokens"][:, p:],
               response_mask=(jnp.arange(n)[None] < s["lengths"][:, None]).astype(jnp.float32),
               logprobs=s["logprobs"], lengths=s["lengths"], ended=s["done"])
    if return_logits:
        out["logits"] = s["step_logits"]
    return out


def make_sampler(model, **options):
    """`jax.jit`ted `sample(params, prompt_tokens, prompt_mask, rng)` with `model` and the options fixed."""
    return jax.jit(functools.partial(sample, model=model, **options))
