"""Applying a model to token sequences: response log-probs, values, rewards at the last token.

Every stage and the evaluation read models through these functions, so the RM scores what PPO
samples exactly as it was trained, and the PPO ratio, the DPO log-ratios and the reported KL all
come from one alignment of logits with tokens. Pure functions (jit them, or call them inside a
jitted step), plus `RewardModel`, a loaded reward model with its fitted bias.

Two layouts:
  * rollout rows: [B, P + N] = a left-padded prompt (`prompt_mask` [B, P]) then N response slots
    (`response_mask` [B, N], 1 up to and including EOS); positions count from each row's first real
    token, segment 0 marks pads (`sequence_inputs`).
  * scored rows (RM / DPO data): [..., T] right-padded BOS + prompt + completion + EOS, with
    `last_index` [...] (the EOS) and `prompt_len` [...] (BOS + prompt tokens).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from instructgpt_jax import checkpoints, losses, sharding
from instructgpt_jax.errors import UserError
from instructgpt_jax.models import ModelConfig, Transformer, lm_head_logits
from instructgpt_jax.sampling import left_pad_positions


def sequence_inputs(tokens, prompt_mask, response_mask):
    """Rollout rows as every model sees them: (tokens, positions, segments); segment 1 on real
    prompt + response tokens, 0 on pads (which attend to nothing and are never read)."""
    segments = jnp.concatenate([prompt_mask.astype(jnp.int32), response_mask.astype(jnp.int32)], axis=1)
    return tokens, left_pad_positions(segments), segments


def token_stats(params, model, hidden, targets, *, temperature: float = 1.0, entropy: bool = False,
                correct: bool = False, reference=None) -> dict:
    """The next-token distribution at each of N positions, from final hidden states [B, N, D] (a `Transformer`
    called with `return_hidden=True`) and targets [B, N]: {'logp': log π(target) float32 [B, N], 'entropy'
    (if asked), 'correct' (the target's logit is the row maximum; if asked)}. `temperature` divides the logits.
    `reference=(ref_params, ref_hidden)` (the same model's frozen params and their hidden states) adds
    'ref_logp' and 'kl' = KL(π‖π_ref) over the whole vocabulary at each position.

    With `model.cfg.logits_chunk` = C > 0 and B * N > C the LM head runs over chunks of max(1, C // B) positions
    of every row (about C tokens) inside `jax.checkpoint`: a chunk's logits exist only while it is computed (the
    backward recomputes them), so [B, N, V] float32 logits are never materialised, however many rows a batch
    has; values and gradients equal the unchunked ones. (The row axis stays whole: it is the sharded one.)"""
    cfg = model.cfg

    def stats(h, t, ref_h=None):
        logits = lm_head_logits(params, cfg, h)
        if temperature != 1.0:
            logits = logits / temperature
        out = {"logp": losses.token_logprobs(logits, t)}
        if entropy:
            out["entropy"] = losses.entropy(logits)
        if correct:
            out["correct"] = losses.target_is_max(logits, t)
        if ref_h is not None:
            ref_logits = lm_head_logits(reference[0], cfg, ref_h) / temperature
            out["ref_logp"] = losses.token_logprobs(ref_logits, t)
            lp = jax.nn.log_softmax(jax.lax.stop_gradient(logits).astype(jnp.float32))
            out["kl"] = jnp.sum(jnp.exp(lp) * (lp - jax.nn.log_softmax(ref_logits.astype(jnp.float32))), -1)
        return out

    inputs = (hidden, targets) + ((reference[1],) if reference is not None else ())
    b, n = targets.shape
    if not cfg.logits_chunk or b * n <= cfg.logits_chunk:
        return stats(*inputs)
    c = max(1, cfg.logits_chunk // b)  # positions per chunk
    k = -(-n // c)
    chunks = lambda x: jnp.pad(x, [(0, 0), (0, k * c - n)] + [(0, 0)] * (x.ndim - 2)).reshape(  # noqa: E731
        b, k, c, *x.shape[2:]).swapaxes(0, 1)
    out = jax.lax.map(jax.checkpoint(lambda xs: stats(*xs)), tuple(chunks(x) for x in inputs))
    return {key: v.swapaxes(0, 1).reshape(b, k * c)[:, :n] for key, v in out.items()}


def response_logprobs(params, model, tokens, positions, segments, prompt_len: int, temperature: float = 1.0,
                      entropy: bool = False):
    """log π(y_t | x, y_<t) of the N response tokens of rollout rows [B, P + N] -> ([B, N] float32, their
    entropies [B, N] if `entropy`, else None). `temperature` divides the logits as the sampler did. The LM head
    runs over chunks of about `model.cfg.logits_chunk` tokens (`token_stats`)."""
    hidden = model.apply({"params": params}, tokens, positions, segments, return_hidden=True)[:, prompt_len - 1:-1]
    st = token_stats(params, model, hidden, tokens[:, prompt_len:], temperature=temperature, entropy=entropy)
    return st["logp"], st.get("entropy")


def response_values(params, model, tokens, positions, segments, prompt_len: int):
    """V(state before each response token) [B, N]: a scalar-head model at the token just before it."""
    return model.apply({"params": params}, tokens, positions, segments)[:, prompt_len - 1:-1].astype(jnp.float32)


def rewards_at(values, last_index):
    """values [..., T] -> the value at each row's `last_index` [...] (where a reward is read)."""
    return jnp.take_along_axis(values, last_index[..., None].astype(jnp.int32), axis=-1)[..., 0]


def score(params, tokens, segment_ids, positions, last_index, *, model, bias=0.0):
    """Reward of each scored row (read at `last_index`, its EOS) plus the fitted bias.
    tokens / segment_ids / positions: [..., T]; last_index: [...]. Returns float32 [...]."""
    lead = tokens.shape[:-1]
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    values = model.apply({"params": params}, flat(tokens), flat(positions), flat(segment_ids))
    return rewards_at(values.reshape(*lead, -1).astype(jnp.float32), last_index) + bias


def completion_token_logprobs(params, model, batch, *, rng=None, reference=None):
    """Per-token log-probs over scored rows and the mask of the completion tokens (EOS included).

    batch: tokens / segment_ids / positions [B, K, T], last_index / prompt_len [B, K]. Position t predicts
    token t + 1, so targets are tokens[:, :, 1:] and the mask is 1 on targets at indices prompt_len ..
    last_index. Returns (`token_stats` of the rows: 'logp' [B*K, T-1] float32, and with `reference` (frozen
    params of the same model, no dropout) 'ref_logp' and 'kl'; the mask [B*K, T-1]). The LM head runs over
    chunks of about `model.cfg.logits_chunk` tokens. `rng` turns dropout on (training)."""
    b, k, t = batch["tokens"].shape
    flat = lambda x: x.reshape(b * k, *x.shape[2:])  # noqa: E731
    tokens, positions, segments = flat(batch["tokens"]), flat(batch["positions"]), flat(batch["segment_ids"])
    hidden = model.apply({"params": params}, tokens, positions, segments, deterministic=rng is None,
                         rngs=None if rng is None else {"dropout": rng}, return_hidden=True)[:, :-1]
    if reference is not None:
        ref_hidden = model.apply({"params": reference}, tokens, positions, segments, return_hidden=True)[:, :-1]
        reference = (reference, jax.lax.stop_gradient(ref_hidden))
    target = jnp.arange(1, t)[None]
    mask = (target >= flat(batch["prompt_len"])[:, None]) & (target <= flat(batch["last_index"])[:, None])
    return token_stats(params, model, hidden, tokens[:, 1:], reference=reference), mask


def completion_logprobs(params, model, batch, *, rng=None):
    """Summed log π(completion | prompt) of scored rows, EOS included: [B, K] float32
    (rows whose `valid` is 0 give meaningless values: mask them)."""
    st, mask = completion_token_logprobs(params, model, batch, rng=rng)
    b, k = batch["tokens"].shape[:2]
    return jnp.where(mask, st["logp"], 0.0).sum(-1).reshape(b, k)


def append_eos(tokens, prompt_mask, response_mask, ended, eos_id: int):
    """Rollout rows scored as the RM was trained: every completion ends with an EOS.

    A response cut at max_new_tokens (no EOS sampled) gets an EOS appended, exactly as the RM's
    training rows (`iterators.scoring_example`) append one after a cut completion. Returns
    (tokens, positions, segments [B, P + N + 1], last_index [B])."""
    b, p = prompt_mask.shape
    lengths = response_mask.sum(-1).astype(jnp.int32)
    tokens = jnp.concatenate([tokens, jnp.zeros((b, 1), tokens.dtype)], axis=1)
    last = p + lengths - ended.astype(jnp.int32)  # the sampled EOS, or the slot after the last token
    tokens = jnp.where(jnp.arange(tokens.shape[1])[None] == last[:, None], eos_id, tokens)
    response = (jnp.arange(response_mask.shape[1] + 1)[None] <= (last - p)[:, None]).astype(jnp.int32)
    t, pos, seg = sequence_inputs(tokens, prompt_mask, response)
    return t, pos, seg, last


@dataclasses.dataclass
class RewardModel:
    """An exported reward model: `rm(tokens, segment_ids, positions, last_index)` -> rewards + bias."""
    model: Transformer
    params: dict
    bias: float
    meta: dict

    @classmethod
    def load(cls, path: str, mesh=None, model_overrides: dict | None = None) -> "RewardModel":
        export = checkpoints.Export.open(path)
        meta = export.meta
        if "rm_bias" not in meta:
            raise UserError(f"{path} is a {meta.get('stage')!r} export, not a reward model (no rm_bias "
                            f"in its meta.json); give the RM stage's workdir")
        mesh = mesh or sharding.default_mesh()
        model = Transformer(ModelConfig.from_config({**meta["model"], **(model_overrides or {})}), head="scalar")
        return cls(model, export.params(model, mesh), float(meta["rm_bias"]), meta)

    def __call__(self, tokens, segment_ids, positions, last_index):
        return _jit_score(self.params, tokens, segment_ids, positions, last_index, model=self.model, bias=self.bias)

    def score_texts(self, tokenizer, prompts, completions, *, seq_len: int, max_prompt_len: int,
                    mesh=None, chat_template=None, messages=None) -> np.ndarray:
        """Rewards (bias included) of (prompt, completion) pairs, formatted exactly as in RM training
        (with `chat_template`: the prompt conversation `messages[i]`, or user = prompt, then the reply)."""
        from instructgpt_jax.data import iterators
        messages = messages or [None] * len(prompts)
        rows = [iterators.scoring_example(p, c, tokenizer, seq_len=seq_len, max_prompt_len=max_prompt_len,
                                          chat_template=chat_template, messages=m)
                for p, c, m in zip(prompts, completions, messages)]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        if mesh is not None and sharding.divides_batch(len(rows), mesh):
            batch = sharding.global_from_full(batch, mesh)
        out = self(batch["tokens"], batch["segment_ids"], batch["positions"], batch["last_index"])
        return np.asarray(sharding.to_host(out))

    def score_examples(self, examples, *, batch_size: int = 8, mesh=None) -> np.ndarray:
        """Rewards (bias included) of scored rows (`iterators.scoring_example` dicts of one seq_len),
        `batch_size` rows at a time. Each batch is cut to its longest row rounded up to a power of two
        (no work on padding, a few compilations rather than one per length) and filled up to batch_size
        with copies of its last row (one shape). Returns float32 [len(examples)]."""
        out = []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            n = len(chunk)
            chunk = chunk + chunk[-1:] * (batch_size - n)
            longest = max(int(e["last_index"]) for e in chunk) + 1
            length = min(len(chunk[0]["tokens"]), max(16, 1 << (longest - 1).bit_length()))
            batch = {k: np.stack([e[k][:length] for e in chunk]) for k in ("tokens", "segment_ids", "positions")}
            batch["last_index"] = np.array([e["last_index"] for e in chunk], np.int32)
            if mesh is not None and sharding.divides_batch(batch_size, mesh):
                batch = sharding.global_from_full(batch, mesh)
            rewards = self(batch["tokens"], batch["segment_ids"], batch["positions"], batch["last_index"])
            out.append(np.asarray(sharding.to_host(rewards), np.float32)[:n])
        return np.concatenate(out) if out else np.zeros(0, np.float32)


_jit_score = jax.jit(score, static_argnames="model")


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers give the same ids to every text: same backend file (tokenizer.json /
    tokenizer.model bytes), vocabulary, BOS and BOS rule. (EOS sets may differ: a template's end of turn.)"""
    return (type(a) is type(b) and a._backend_files() == b._backend_files() and a.vocab_size == b.vocab_size
            and a.bos_id == b.bos_id and a.add_bos == b.add_bos)


@dataclasses.dataclass
class Retokenizer:
    """Scores rollouts with a reward model whose tokenizer differs from the policy's: each response is
    decoded with the policy's tokenizer (up to its first EOS), then the prompt (its conversation, or its
    text) + response are encoded with the RM's tokenizer and chat template exactly as in RM training
    (`iterators.scoring_example`: the reply closed by the RM's end-of-turn / EOS), host-side."""
    rm: RewardModel
    tokenizer: object        # the RM's, its eos_ids holding its template's end of turn
    chat_template: object    # the RM's (None: plain BOS + prompt + response + EOS)
    seq_len: int
    max_prompt_len: int

    @classmethod
    def load(cls, rm_path: str, rm: RewardModel, policy_tokenizer) -> "Retokenizer | None":
        """None when the RM's export holds the policy's tokenizer (or none: then it is the policy's)."""
        import json
        import os

        from instructgpt_jax.data import chat, prepare
        from instructgpt_jax.data.tokenizer import load_tokenizer
        export = checkpoints.export_path(rm_path)
        if not any(os.path.exists(os.path.join(export, f)) for f in prepare.TOKENIZER_FILES):
            return None
        tok = load_tokenizer(export)
        if same_tokenizer(tok, policy_tokenizer):
            return None
        template_file = os.path.join(export, prepare.TEMPLATE_FILE)
        template = chat.resolve(template_file if os.path.exists(template_file) else "none", tok)
        tok = chat.with_end_of_turn(tok, template)
        # the RM's own row shape, from its stage's config.json (rows as it was trained on)
        cfg_path = os.path.join(os.path.dirname(export), "config.json")
        data = json.load(open(cfg_path)).get("data", {}) if os.path.exists(cfg_path) else {}
        seq_len = int(data.get("seq_len") or rm.model.cfg.max_len)
        return cls(rm, tok, template, seq_len, int(data.get("max_prompt_len") or seq_len // 2))

    def rows(self, policy_tokenizer, prompt_texts, prompt_messages, responses) -> dict:
        """Scored rows [b, seq_len] (tokens, segment_ids, positions, last_index) in the RM's tokens.
        prompt_messages[i]: the conversation as JSON ('' = the plain prompt_texts[i]); responses [b, N] ids."""
        import json

        from instructgpt_jax.data import iterators
        rows = [iterators.scoring_example(
            p, policy_tokenizer.decode(r), self.tokenizer, seq_len=self.seq_len, max_prompt_len=self.max_prompt_len,
            chat_template=self.chat_template, messages=json.loads(m) if m else None)
            for p, m, r in zip(prompt_texts, prompt_messages, np.asarray(responses))]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def __call__(self, policy_tokenizer, prompts: dict, responses, mesh) -> jax.Array:
        """Rewards (bias included) of this process's rows -> a global [b] array. prompts: this process's
        prompt batch (prompt_text, prompt_messages); responses: this process's [b, N] response ids."""
        batch = self.rows(policy_tokenizer, prompts["prompt_text"], prompts["prompt_messages"], responses)
        batch = sharding.host_to_global(batch, mesh)
        return self.rm(batch["tokens"], batch["segment_ids"], batch["positions"], batch["last_index"])
