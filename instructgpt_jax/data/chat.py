"""Chat templates: conversations `[{"role", "content"}, ...]` -> text -> token ids with an assistant-only loss mask.

Templates are Jinja, rendered the way `transformers` renders a checkpoint's chat template: a sandboxed
environment (`ImmutableSandboxedEnvironment`, trim_blocks, lstrip_blocks, loop controls), the globals
`raise_exception`, `strftime_now`, the `tojson` filter (no HTML escaping), `{% generation %}` blocks
accepted, and the variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `unk_token`.

Choosing one (`resolve`, from `config.data.chat_template`):
  '' or 'auto'   the tokenizer's own template when it has one, else 'none'
  'none'         no template: today's plain `BOS + prompt + response + EOS` formatting (resolves to None)
  'chatml'       <|im_start|>role\\ncontent<|im_end|>\\n ... (Qwen, many fine-tunes)
  'llama2'       <s>[INST] user [/INST] assistant </s> ... (system folded into the first user turn)
  'llama3'       <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|> ...
  a path         a .jinja file

Token ids: the whole rendered text is tokenised once (`tokenizer.encode_with_offsets`; special-token
strings become special tokens), so ids equal `AutoTokenizer(...).apply_chat_template(..., tokenize=True)`;
a BOS is put in front only when the tokenizer adds one (`add_bos`) and the text does not start with it.
Assistant spans are found by rendering prefixes of the conversation: the span of assistant message i is
render(messages[:i], add_generation_prompt=True) .. render(messages[:i+1]); a token is in the span when
its first character is. The loss covers the span up to and including its first EOS token (the turn's
end-of-turn token, e.g. <|im_end|>), so nothing of the next turn's header. A template whose render of a
prefix is not a prefix of the full render is an error naming the row.

End of turn and EOS: sampling stops at `tokenizer.eos_ids`. `end_of_turn_ids(template, tokenizer)`
renders a probe conversation and takes the first special token after the assistant's content (e.g.
<|im_end|>, <|eot_id|>, </s>); `with_end_of_turn(tokenizer, template)` returns the tokenizer with that
token added to `eos_ids` (the iterators call it; stages must sample with its `eos_ids` too). A template
whose assistant turns end with no special token of the tokenizer is an error: sampling could never stop.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

BUILTIN = {"chatml": CHATML, "llama2": LLAMA2, "llama3": LLAMA3}
CHOICES = ("auto", "none", *BUILTIN)


class ChatTemplate:
    """A named Jinja chat template (compiled on first use; pickles as its source)."""

    def __init__(self, name: str, source: str):
        self.name, self.source = name, source

    def __getstate__(self):
        return {"name": self.name, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["name"], state["source"])

    def __eq__(self, other):
        return isinstance(other, ChatTemplate) and other.source == self.source

    def __hash__(self):
        return hash(self.source)

    def __repr__(self):
        return f"ChatTemplate({self.name!r})"

    def render(self, messages, *, add_generation_prompt: bool = False, **special_tokens) -> str:
        """The template applied to `messages` (jinja errors become ValueError naming the template)."""
        import jinja2

        try:
            return _compile(self.source).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                **special_tokens)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template {self.name!r}: {e}") from e


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template: Jinja syntax error at line {e.lineno}: {e.message}") from e


def resolve(value, tokenizer=None) -> ChatTemplate | None:
    """`config.data.chat_template` -> a ChatTemplate, or None for 'none' (see module docstring).

    value: None / 'none', '' / 'auto', a built-in name, a path to a .jinja file, or a ChatTemplate.
    """
    if value is None or isinstance(value, ChatTemplate):
        return value
    v = str(value).strip()
    if v in ("", "auto"):
        own = getattr(tokenizer, "chat_template", None)
        return ChatTemplate("tokenizer", own) if own else None
    if v == "none":
        return None
    if v in BUILTIN:
        return ChatTemplate(v, BUILTIN[v])
    if os.path.isfile(v):
        with open(v, encoding="utf-8") as f:
            source = f.read()
        _compile(source)  # syntax errors now, with the file's name below
        return ChatTemplate(v, source)
    raise ValueError(f"config.data.chat_template={value!r}: not a built-in template or an existing .jinja file; "
                     f"valid choices: {', '.join(repr(c) for c in CHOICES)} or a path to a .jinja file")


def special_tokens(tokenizer) -> dict:
    """The token strings a template sees (transformers passes the tokenizer's special tokens)."""
    out = {}
    for name in ("bos", "eos", "unk"):
        i = getattr(tokenizer, name + "_id", None)
        if i is not None:
            out[name + "_token"] = tokenizer.id_to_token(i)
    return out


def render(template: ChatTemplate, messages, tokenizer, *, add_generation_prompt: bool = False) -> str:
    return template.render(messages, add_generation_prompt=add_generation_prompt, **special_tokens(tokenizer))


def as_messages(row: dict, *, with_response: bool) -> list[dict]:
    """A canonical row's conversation: its `messages`, or (user = prompt[, assistant = response]) when
    it has none (plain rows, and rows without the key)."""
    messages = row.get("messages")
    if messages is not None and len(messages):
        return [{"role": _s(m["role"]), "content": _s(m["content"])} for m in messages]
    out = [{"role": "user", "content": _s(row["prompt"])}]
    if with_response:
        out.append({"role": "assistant", "content": _s(row["response"])})
    return out


def _s(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else x


def _encode(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """ids and character starts of the rendered text, BOS put in front per `tokenizer.add_bos`."""
    ids, starts = tokenizer.encode_with_offsets(text)
    if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids, starts = [tokenizer.bos_id] + ids, [0] + starts
    return ids, starts


def _prefix_error(where: str, template: ChatTemplate, i: int) -> ValueError:
    return ValueError(f"{where}: chat template {template.name!r} renders the conversation up to message {i} "
                      "differently from the start of the whole conversation, so the assistant turn cannot be "
                      "located (the template changes earlier turns depending on later ones)")


def _cut_at_eos(idx: list[int], ids: list[int], eos_ids) -> list[int]:
    """Token indices `idx` up to and including the first one whose id is an EOS."""
    for n, k in enumerate(idx):
        if ids[k] in eos_ids:
            return idx[: n + 1]
    return idx


def sft_ids(template: ChatTemplate, messages, tokenizer, *, where: str = "a row") -> tuple[list[int], list[int]]:
    """A conversation -> (ids, loss_mask) with 1 on each assistant turn (content + end-of-turn token)."""
    messages = list(messages)
    full = render(template, messages, tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        a = render(template, messages[:i], tokenizer, add_generation_prompt=True)
        b = render(template, messages[: i + 1], tokenizer)
        if not (b.startswith(a) and full.startswith(b)):
            raise _prefix_error(where, template, i)
        spans.append((len(a), len(b)))
    ids, starts = _encode(full, tokenizer)
    mask = [0] * len(ids)
    for lo, hi in spans:
        for k in _cut_at_eos([k for k, s in enumerate(starts) if lo <= s < hi], ids, tokenizer.eos_ids):
            mask[k] = 1
    return ids, mask


def prompt_ids(template: ChatTemplate, messages, tokenizer) -> list[int]:
    """The conversation so far with the generation prompt (the assistant header) -> ids to sample from."""
    return _encode(render(template, messages, tokenizer, add_generation_prompt=True), tokenizer)[0]


def scoring_ids(template: ChatTemplate, messages, response: str, tokenizer, *,
                where: str = "a row") -> tuple[list[int], list[int], int]:
    """(prompt conversation, response text) -> (prompt ids, response ids, end id): the ids of the
    rendered conversation with the response as the assistant's turn, split where the generation prompt
    ends; the response part ends at its end-of-turn token, returned apart as `end id` (an EOS, where
    the reward is read; `tokenizer.eos_id` when the turn has none)."""
    messages = list(messages)
    a = render(template, messages, tokenizer, add_generation_prompt=True)
    full = render(template, messages + [{"role": "assistant", "content": _s(response)}], tokenizer)
    if not full.startswith(a):
        raise _prefix_error(where, template, len(messages))
    ids, starts = _encode(full, tokenizer)
    n = sum(1 for s in starts if s < len(a))
    body = _cut_at_eos(list(range(n, len(ids))), ids, tokenizer.eos_ids)
    if body and ids[body[-1]] in tokenizer.eos_ids:
        return ids[:n], [ids[k] for k in body[:-1]], ids[body[-1]]
    return ids[:n], [ids[k] for k in body], tokenizer.eos_id


def end_of_turn_ids(template: ChatTemplate, tokenizer) -> frozenset:
    """The special token that closes an assistant turn (see module docstring); error when there is none."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
    a = render(template, probe[:1], tokenizer, add_generation_prompt=True)
    b = render(template, probe, tokenizer)
    if not b.startswith(a):
        raise _prefix_error("a probe conversation (user, assistant)", template, 1)
    ids, starts = tokenizer.encode_with_offsets(b)
    content_end = b.find("Yes", len(a)) + len("Yes") if "Yes" in b[len(a):] else len(a)
    special = getattr(tokenizer, "special_ids", frozenset()) | tokenizer.eos_ids
    for k, s in enumerate(starts):
        if s >= content_end and ids[k] in special:
            return frozenset([ids[k]])
    raise ValueError(f"chat template {template.name!r}: an assistant turn ends with {b[content_end:]!r}, which holds "
                     "no special token of this tokenizer, so sampling could never stop; close assistant turns with "
                     "{{ eos_token }} or a special token of the tokenizer, or use another template")


def with_end_of_turn(tokenizer, template: ChatTemplate | None):
    """The tokenizer whose eos_ids also hold the template's end-of-turn token (itself for 'none')."""
    if template is None:
        return tokenizer
    return tokenizer.with_eos_ids(end_of_turn_ids(template, tokenizer))
