"""EleutherAI's lm-evaluation-harness (`lm-eval`) on any stage's model, in JAX, on the mesh.

    python -m instructgpt_jax.eval --workdir=RUN [--export=export_ema] --tasks=hellaswag,arc_easy \\
        [--num_fewshot=K] [--limit=N] [--include_path=DIR] [--apply_chat_template] [--output=FILE]
    python -m instructgpt_jax.eval --hf_path=DIR --tasks=...        (a Hugging Face directory)
    lm_eval --model instructgpt_jax --model_args workdir=RUN,export=export --tasks ...   (after `import
        instructgpt_jax.eval`, or through `python -m instructgpt_jax.eval`, which registers it)

`JaxLM` is the harness's model backend (`lm_eval.api.model.TemplateLM`, registered as 'instructgpt_jax'):
  * loglikelihood: requests encoded as the harness's `hf` backend encodes them (the tokenizer's own BOS rule,
    a context's trailing spaces moved to the continuation, left truncation to the context length), sorted by
    length, padded to a few bucket lengths (powers of two: compilations stay bounded), rows sharded over the
    mesh's batch axes; the continuation's summed log-prob and whether greedy decoding gives it come back from
    the device, never the logits;
  * loglikelihood_rolling: the harness's disjoint windows of the context length, scored the same way;
  * generate_until: our jitted sampler (greedy unless the request samples; its temperature / top_k / top_p),
    stopping at every EOS id of the tokenizer; the text is cut at the request's `until` strings.
  * apply_chat_template: the run's chat template (the export's, or the checkpoint's), as transformers applies
    it (`continue_final_message` when the harness prefills an assistant turn).

`tasks_callback(config, model, tokenizer, template, mesh)` is what the stages call for `train.eval_tasks`:
the tasks on the current params (no export) every `train.eval_tasks_every` steps, logged to metrics.jsonl.

The task group `instructgpt` (tasks/instructgpt.yaml, found automatically) is the paper's public-benchmark
evaluation as far as the harness has it; the README maps each task to the paper's section.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from instructgpt_jax import checkpoints, scoring, sharding
from instructgpt_jax.errors import MissingFileError, UserError
from instructgpt_jax.models import ModelConfig, Transformer
from instructgpt_jax.sampling import left_pad_positions

try:
    import lm_eval
    import lm_eval.models  # noqa: F401  (the harness's own backends first: its registry loads them only when empty)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # the `eval` extra is not installed: importing works, using the backend says what to do
    lm_eval = None
    TemplateLM = object

    def register_model(*_):
        return lambda cls: cls

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")  # the `instructgpt` group
NAME = "instructgpt_jax"
INSTALL = "lm-eval is not installed: pip install 'instructgpt_jax[eval]' (or pip install lm-eval)"


def require_lm_eval():
    if lm_eval is None:
        raise UserError(INSTALL)


def bucket(n: int, cap: int, smallest: int = 16) -> int:
    """The padded length of a batch whose longest row has n tokens: the smallest of `smallest` x 2^k and
    3/4 of it (k >= 1) that holds n, at most `cap`. Two shapes per octave: few compilations, and at most a
    third of a row is padding."""
    b = smallest
    while b < n:
        b *= 2
    if b > smallest and b * 3 // 4 >= n:
        b = b * 3 // 4
    return max(min(b, cap), n)


def _score_rows(params, tokens, targets, weights, *, model):
    """Left-padded rows tokens [B, T] (pads -1) whose scored targets [B, C] are the last C positions' next
    tokens: per row the sum of log p(target) where weights [B, C] is 1, and whether every such target is the
    argmax. Only the last C positions get logits (C is a bucket of the longest continuation, T of the row)."""
    segments = (tokens >= 0).astype(jnp.int32)  # pads: segment 0, attending to nothing
    hidden = model.apply({"params": params}, jnp.maximum(tokens, 0), left_pad_positions(segments), segments,
                         last_n=targets.shape[1], return_hidden=True)
    st = scoring.token_stats(params, model, hidden, targets, correct=True)  # chunked LM head
    w = weights > 0
    return jnp.where(w, st["logp"], 0.0).sum(-1), jnp.all(st["correct"] | ~w, axis=-1)


@register_model(NAME)
class JaxLM(TemplateLM):
    """lm-eval's view of one of our models. Build it from a stage's workdir (`workdir=`, `export=`), a Hugging
    Face directory (`hf_path=`), or in Python from params: `JaxLM.from_params(model, params, tokenizer, template)`.

    batch_size: rows per forward pass (rounded up to a multiple of the mesh's data-parallel size).
    max_length: the context (default: the model's max_len). dtype: compute dtype ('float32' default: the
    harness's log-likelihoods to 1e-4). seed: sampling requests' PRNG seed.
    """

    def __init__(self, workdir: str = "", export: str = "", hf_path: str = "", batch_size=16, max_length=None,
                 dtype: str = "float32", max_gen_toks=256, seed=0, mesh=None, **unused):
        require_lm_eval()
        super().__init__()
        if not (hf_path or workdir):
            return  # from_params fills in the rest
        if hf_path and workdir:
            raise UserError("give --workdir (one of our runs) or --hf_path (a Hugging Face directory), not both")
        mesh = mesh or _workdir_mesh(workdir)
        load = functools.partial(_load_hf, hf_path) if hf_path else functools.partial(_load_export, workdir, export)
        model, params, tok, template, self._name = load(mesh, dtype)
        self._setup(model, params, tok, template, mesh, batch_size, max_length, max_gen_toks, seed)

    @classmethod
    def from_params(cls, model, params, tokenizer, template=None, *, mesh=None, batch_size=16, max_length=None,
                    max_gen_toks=256, seed=0, name="params"):
        """A backend over params already on the mesh (e.g. a training state's): nothing is copied."""
        self = cls()
        self._name = name
        mesh = mesh or jax.tree.leaves(params)[0].sharding.mesh
        self._setup(model, params, tokenizer, template, mesh, batch_size, max_length, max_gen_toks, seed)
        return self

    def _setup(self, model, params, tok, template, mesh, batch_size, max_length, max_gen_toks, seed):
        self.model, self.params, self.tokenizer_, self.template, self._mesh = model, params, tok, template, mesh
        dp = sharding.data_parallel_size(mesh)
        batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # the harness may pass 'auto'
        self._batch_size = -(-batch_size // dp) * dp
        self._max_length = int(max_length or model.cfg.max_len)
        self._max_gen_toks = int(max_gen_toks)
        self._rng = jax.random.PRNGKey(int(seed))
        self._score = jax.jit(functools.partial(_score_rows, model=model))
        self._samplers = {}

    # --- what the harness asks of a TemplateLM
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def prefix_token_id(self) -> int:  # an empty context is this token (the hf backend: BOS, else EOS)
        bos = self.tokenizer_.bos_id
        return bos if bos is not None else self.tokenizer_.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self._name

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
        """As `hf`: the tokenizer's specials (a BOS where the tokenizer adds one) unless the text already starts
        with the BOS string (a chat template wrote it) or `add_special_tokens` is False."""
        tok = self.tokenizer_
        add = tok.add_bos and tok.bos_id is not None and add_special_tokens is not False
        if add and add_special_tokens is None and string.startswith(tok.id_to_token(tok.bos_id)):
            add = False
        ids = ([tok.bos_id] if add else []) + tok.encode(string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        if not skip_special_tokens:
            return "".join(self.tokenizer_.id_to_token(i) if i in self.tokenizer_.special_ids
                           else self.tokenizer_.decode([i]) for i in ids)
        return self.tokenizer_.decode(ids)

    def chat_template(self, chat_template=False):
        if chat_template is False or chat_template is None:
            return None
        return self.template.source if self.template is not None else None

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        """The template on the harness's messages; with add_generation_prompt False the last (assistant) message
        is left open to be continued, as transformers' `continue_final_message` does."""
        from instructgpt_jax.data import chat
        if self.template is None:
            raise UserError(f"{self._name}: --apply_chat_template, but this model has no chat template (its run "
                            f"used none and its tokenizer has none)")
        messages = [dict(m) for m in chat_history]
        if add_generation_prompt:
            return chat.render(self.template, messages, self.tokenizer_, add_generation_prompt=True)
        tag = "CONTINUE_FINAL_MESSAGE_TAG "
        messages[-1]["content"] = messages[-1]["content"] + tag
        text = chat.render(self.template, messages, self.tokenizer_)
        at = text.rindex(tag.strip())
        return text[:at] if text[at:at + len(tag)] == tag else text[:at].rstrip()

    # --- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: ((context, continuation) or None, context ids, continuation ids) -> [(logprob, is_greedy)]."""
        from tqdm import tqdm
        rows = []
        for _, ctx, cont in requests:
            whole = (list(ctx) + list(cont))[-(self._max_length + 1):]
            rows.append((whole[:-1], whole[1:], min(len(cont), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: few shapes per batch
        out = [None] * len(rows)
        bar = tqdm(total=len(rows), desc="loglikelihood", disable=disable_tqdm or jax.process_index() != 0)
        for start in range(0, len(order), self._batch_size):
            idx = order[start:start + self._batch_size]
            t = bucket(len(rows[idx[0]][0]), self._max_length)
            c = bucket(max(rows[i][2] for i in idx), t, smallest=4)
            tokens = np.full((self._batch_size, t), -1, np.int32)  # left-padded: every row ends at t
            targets = np.zeros((self._batch_size, c), np.int32)
            weights = np.zeros((self._batch_size, c), np.float32)
            for r, i in enumerate(idx):
                inp, tgt, n = rows[i]
                tokens[r, t - len(inp):] = inp
                k = min(c, len(tgt))
                targets[r, c - k:], weights[r, c - n:] = tgt[-k:], 1.0
            batch = sharding.global_from_full(dict(tokens=tokens, targets=targets, weights=weights), self._mesh)
            with sharding.use(self._mesh):
                logp, greedy = self._score(self.params, batch["tokens"], batch["targets"], batch["weights"])
            logp, greedy = sharding.to_host((logp, greedy))
            for r, i in enumerate(idx):
                out[i] = (float(logp[r]), bool(greedy[r]))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
            bar.update(len(idx))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity tasks: each document's windows of the context length (each token predicted once, every
        window with as much context as fits), all documents' windows batched together."""
        from lm_eval import utils
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        total = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, scores):
            total[k] += lp
        for req, lp in zip(requests, total):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, lp)
        return total

    # --- generation
    def _sampler(self, n: int, greedy: bool, temperature: float, top_k: int, top_p: float):
        from instructgpt_jax import sampling
        key = (n, greedy, temperature, top_k, top_p)
        if key not in self._samplers:
            tok = self.tokenizer_
            self._samplers[key] = sampling.make_sampler(
                self.model, max_new_tokens=n, eos_id=tok.eos_ids, pad_id=tok.pad_id, greedy=greedy,
                temperature=1.0 if greedy else temperature, top_k=top_k, top_p=top_p)
        return self._samplers[key]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
        from tqdm import tqdm
        groups = {}  # requests with the same generation arguments are batched together
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out = [None] * len(requests)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or jax.process_index() != 0)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self._max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            n = int(kwargs.pop("max_gen_toks"))
            greedy = not kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) == 0.0
            sample = self._sampler(n, greedy, float(kwargs.get("temperature") or 1.0), int(kwargs.get("top_k") or 0),
                                   float(kwargs.get("top_p") or 1.0))
            if self._max_length <= n:
                raise UserError(f"max_gen_toks={n} leaves no room for a context of at most {self._max_length} tokens")
            encoded = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self._max_length - n)
                       for i in members}
            members = sorted(members, key=lambda i: -len(encoded[i]))
            for start in range(0, len(members), self._batch_size):
                idx = members[start:start + self._batch_size]
                p = bucket(len(encoded[idx[0]]), self._max_length - n)
                prompt = np.full((self._batch_size, p), self.tokenizer_.pad_id, np.int32)
                mask = np.zeros((self._batch_size, p), np.int32)
                mask[len(idx):, -1] = 1  # filler rows: one token each
                for r, i in enumerate(idx):
                    ids = encoded[i]
                    prompt[r, p - len(ids):], mask[r, p - len(ids):] = ids, 1
                batch = sharding.global_from_full(dict(prompt=prompt, mask=mask), self._mesh)
                self._rng, key = jax.random.split(self._rng)
                with sharding.use(self._mesh):
                    s = sample(self.params, batch["prompt"], batch["mask"], key)
                response, lengths = sharding.to_host((s["response"], s["lengths"]))
                for r, i in enumerate(idx):
                    text = self.tokenizer_.decode(response[r, :lengths[r]].tolist())
                    out[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(idx))
        bar.close()
        return out


# --------------------------------------------------------------------------- loading


def _workdir_mesh(workdir: str):
    """The stage's mesh (its config.json), else every device on the FSDP axis."""
    cfg = os.path.join(workdir, "config.json") if workdir else ""
    if cfg and os.path.exists(cfg):
        with open(cfg) as f:
            mesh = json.load(f).get("mesh")
        if mesh:
            try:
                return sharding.make_mesh(mesh)
            except ValueError:  # another device count than the run had
                pass
    return sharding.default_mesh()


def _load_export(workdir: str, export: str, mesh, dtype: str):
    from instructgpt_jax.data import chat
    from instructgpt_jax.data.tokenizer import load_tokenizer
    path = os.path.join(workdir, export) if export else workdir
    if not os.path.isdir(path):
        found = sorted(d for d in os.listdir(workdir) if os.path.exists(os.path.join(workdir, d, "meta.json"))) \
            if os.path.isdir(workdir) else []
        raise MissingFileError(f"--export={export}: {path} does not exist" + (f"; this run has {found}" if found else
                                                                               ""))
    exp = checkpoints.Export.open(path)
    if "rm_bias" in exp.meta:
        raise UserError(f"{exp.path} is a reward model: lm-eval tasks need a language model (SFT, DPO, PPO, GRPO, "
                        f"pretrain)")
    if not exp.has_tokenizer:
        raise UserError(f"{exp.path}: no tokenizer files in this export")
    model = Transformer(ModelConfig.from_config(dict(exp.model, dtype=dtype)))
    tok = load_tokenizer(exp.path)
    template = chat.resolve("auto", tok)  # the run's template (chat_template.jinja of the export)
    return model, exp.params(model, mesh), chat.with_end_of_turn(tok, template), template, str(exp)


def _load_hf(path: str, mesh, dtype: str):
    from instructgpt_jax import hf
    from instructgpt_jax.data import chat
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
        raise MissingFileError(f"--hf_path={path}: not a Hugging Face directory (no config.json)")
    model, params = hf.load_pretrained(path, mesh=mesh, dtype=dtype)
    tok = hf.load_tokenizer(path)
    template = chat.resolve("auto", tok)
    return model, params, chat.with_end_of_turn(tok, template), template, os.path.abspath(path)


# --------------------------------------------------------------------------- running tasks


def task_manager(include_path=None):
    """The harness's tasks plus ours (the `instructgpt` group) and any user directory / YAML file's folder."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager
    paths = [TASKS_DIR] + [p for p in (include_path or []) if p]
    return TaskManager(include_path=paths)


def split_tasks(tasks) -> tuple[list, list]:
    """'a,b,dir/task.yaml' -> (task names and YAML paths, directories to include: those of the YAML files)."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    return names, sorted({os.path.dirname(os.path.abspath(t)) for t in names if t.endswith((".yaml", ".yml"))})


def check_tasks(names, manager, key: str = "--tasks"):
    """A UserError naming every task that is neither known to the harness nor an existing YAML file."""
    yaml = lambda t: t.endswith((".yaml", ".yml"))  # noqa: E731
    missing = [t for t in names if (not os.path.isfile(t)) if yaml(t)] + \
              [t for t in names if not yaml(t) and not manager.match_tasks([t])]
    if missing:
        where = "--include_path=DIR" if key == "--tasks" else "config.train.eval_tasks_include_path"
        raise UserError(f"{key}: unknown task(s) {missing}; `lm_eval ls tasks` lists the harness's; {where} adds a "
                        f"directory of task YAML files")


def resolve_tasks(tasks, include_path=(), key: str = "--tasks"):
    """(task names, the TaskManager that knows them); unknown names are a UserError listing them."""
    names, dirs = split_tasks(tasks)
    if not names:
        raise UserError(f"{key} is empty: give task names (e.g. hellaswag,arc_easy), the group 'instructgpt', "
                        f"or paths to task YAML files")
    manager = task_manager([p for p in include_path if p] + dirs)
    check_tasks(names, manager, key)
    return names, manager


def run_tasks(lm, tasks, *, num_fewshot=None, limit=None, include_path=(), apply_chat_template=False,
              seed: int = 0, log_samples: bool = False, resolved=None) -> dict:
    """lm-eval's `simple_evaluate` on `lm` (a JaxLM); `resolved`: what `resolve_tasks` returned, if called."""
    names, manager = resolved or resolve_tasks(tasks, include_path)
    return lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                   task_manager=manager, apply_chat_template=apply_chat_template,
                                   log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                                   torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0)


def flat_metrics(results: dict, prefix: str = "tasks/") -> dict:
    """{'tasks/<task>/<metric>': float} from a results dict (the harness's 'acc,none' -> 'acc')."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not name.endswith("_stderr") \
                    and name != "sample_len":
                out[f"{prefix}{task}/{name}" + (f"_{filt}" if filt not in ("", "none") else "")] = float(value)
    return out


def tasks_callback(config, model, tokenizer, template, mesh, params_of=lambda state: state["params"]):
    """For a stage's loop: `train.eval_tasks` on the current params every `train.eval_tasks_every` steps
    (and at the last), as {'tasks/<task>/<metric>': value}; None when no tasks are asked for."""
    t = config.train
    if not t.get("eval_tasks", ""):
        return None
    for key in ("eval_tasks_every", "eval_tasks_limit"):
        if t[key] < 0:
            raise UserError(f"config.train.{key}={t[key]}; must be >= 0")
    if t.eval_tasks_include_path and not os.path.isdir(t.eval_tasks_include_path):
        raise UserError(f"config.train.eval_tasks_include_path={t.eval_tasks_include_path!r} is not a directory")
    resolved = resolve_tasks(t.eval_tasks, [t.eval_tasks_include_path], "config.train.eval_tasks")  # fail now
    lm = None  # one backend for the whole run: its jitted scorer and samplers compile once

    def run(state) -> dict:
        nonlocal lm
        if lm is None:
            lm = JaxLM.from_params(model, params_of(state), tokenizer, template, mesh=mesh, seed=config.seed)
        lm.params = params_of(state)
        return flat_metrics(run_tasks(lm, None, limit=t.eval_tasks_limit or None, seed=config.seed,
                                      resolved=resolved))
    return run


def write_results(results: dict, path: str) -> str:
    from lm_eval.utils import handle_non_serializable
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    checkpoints.write_json_atomic(path, json.loads(json.dumps(results, default=handle_non_serializable)))
    return path


# --------------------------------------------------------------------------- command line


def _cli():
    """`python -m instructgpt_jax.eval --workdir=RUN --tasks=...`: mistakes print one line `error: ...` and exit
    with status 2 (--debug or INSTRUCTGPT_DEBUG=1 shows the traceback), as the other commands do."""
    from absl import app, flags

    from instructgpt_jax import errors

    usage = ("usage: python -m instructgpt_jax.eval --workdir=RUN [--export=export_ema] --tasks=T1,T2 "
             "[--num_fewshot=K] [--limit=N] [--include_path=DIR] [--apply_chat_template] [--output=FILE], "
             "or --hf_path=DIR instead of --workdir")
    flags.DEFINE_string("workdir", None, "A stage's workdir (its export/ is evaluated).")
    flags.DEFINE_string("export", "export", "Which export of the workdir: export, or export_ema (PPO's EMA policy).")
    flags.DEFINE_string("hf_path", None, "A Hugging Face directory (config.json + safetensors + tokenizer) instead.")
    flags.DEFINE_string("tasks", None, "Comma-separated lm-eval task / group names or task YAML files; "
                                       "'instructgpt' = the paper's public benchmarks.")
    flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per request (default: each task's own).")
    flags.DEFINE_float("limit", None, "Examples per task (a fraction if < 1); for quick checks, not for reporting.")
    flags.DEFINE_string("include_path", None, "A directory of extra task YAML files.")
    flags.DEFINE_bool("apply_chat_template", False, "Render each request with the model's chat template.")
    flags.DEFINE_string("output", None, "Results JSON (default: WORKDIR/evals/<timestamp>.json, or "
                                        "HF_PATH/evals/<timestamp>.json).")
    flags.DEFINE_integer("batch_size", 16, "Rows per forward pass.")
    flags.DEFINE_string("dtype", "float32", "Compute dtype: float32 or bfloat16.")
    flags.DEFINE_integer("max_length", None, "Context length (default: the model's).")
    flags.DEFINE_integer("seed", 0, "Seed of few-shot sampling and of sampled generations.")
    flags.DEFINE_bool("log_samples", False, "Also write every request and response into the results JSON.")
    flags.DEFINE_bool("debug", False, f"Show the traceback of an error; also {errors.DEBUG_ENV}=1.")

    debug, fail = errors.debug_requested, errors.exit_user_error

    def parse(argv):
        if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
            print(usage + "\n\n" + flags.FLAGS.module_help(sys.modules[__name__]))
            sys.exit(0)
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as e:
            if debug(argv):
                raise
            fail(errors.one_line(e))
        f = flags.FLAGS
        if len(rest) > 1:
            fail(f"unexpected arguments {rest[1:]}; {usage}")
        if bool(f.workdir) == bool(f.hf_path):
            fail(f"give --workdir or --hf_path (one of them); {usage}")
        if not f.tasks:
            fail(f"--tasks is required; {usage}")
        if f.batch_size < 1:
            fail(f"--batch_size={f.batch_size}: must be at least 1")
        if f.dtype not in ("float32", "bfloat16"):
            fail(f"--dtype={f.dtype}: valid choices are float32 and bfloat16")
        for name in ("limit", "max_length"):
            if f[name].value is not None and f[name].value <= 0:
                fail(f"--{name}={f[name].value}: must be > 0")
        if f.num_fewshot is not None and f.num_fewshot < 0:
            fail(f"--num_fewshot={f.num_fewshot}: must be >= 0")
        if f.include_path and not os.path.isdir(f.include_path):
            fail(f"--include_path={f.include_path}: not a directory")
        return rest

    def main(argv):
        from absl import logging
        logging.set_verbosity(logging.WARNING)
        f = flags.FLAGS
        try:
            require_lm_eval()
            resolved = resolve_tasks(f.tasks, [f.include_path])  # before loading any weights
            lm = JaxLM(workdir=f.workdir or "", export=f.export if f.workdir else "", hf_path=f.hf_path or "",
                       batch_size=f.batch_size, max_length=f.max_length, dtype=f.dtype, seed=f.seed)
            limit = None if f.limit is None else (int(f.limit) if f.limit >= 1 else f.limit)
            results = run_tasks(lm, None, num_fewshot=f.num_fewshot, limit=limit, resolved=resolved,
                                apply_chat_template=f.apply_chat_template, seed=f.seed, log_samples=f.log_samples)
        except errors.USER_ERRORS as e:
            if debug(argv):
                raise
            fail(errors.one_line(e))
        if jax.process_index() != 0:
            return
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = f.output or os.path.join(f.workdir or f.hf_path, "evals", f"{stamp}.json")
        results["model_source"] = lm.tokenizer_name
        write_results(results, out)
        from lm_eval.utils import make_table
        print(make_table(results))
        if "groups" in results:
            print(make_table(results, "groups"))
        print(f"results written to {out}")

    app.run(main, flags_parser=parse)


if __name__ == "__main__":
    _cli()
