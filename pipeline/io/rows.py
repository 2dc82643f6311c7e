"""Input rows: the column each ``data.format`` reads, and one row rendered to its token ids.

    from pipeline.io.rows import check_column, input_column, prefix_ids, render_rows, rendering
    check_column(path, schema, cfg.data)        # PipelineError naming the file when the column is wrong
    token_ids, problems = render_rows(tokenizer, values, cfg.data)   # problems: {row: why}, token_ids [] there
    token_ids, too_long, truncated = bound_rows(token_ids, cfg.data, max_tokens=4096)   # data.truncation
    prefix_ids(tokenizer, cfg.data)             # tokens every rendered row starts with ([] for text)
    rendering(cfg.data)                         # what the fingerprint and the file metadata record

Formats (``data.format``):
- ``prompt``: a string, rendered as one user message by the chat template with the generation
  prompt (the model card's rendering), then a plain tokenizer call.
- ``messages``: a list of ``{role, content}`` structs (other struct fields are ignored), rendered
  whole by the chat template, with the generation prompt when ``data.add_generation_prompt``.
- ``text``: raw text, no chat template, ``add_special_tokens=True`` (the NLA release's datagen).

This module gives each row's whole token sequence; which positions of it are read is the
extract stage's business, so a new position mode needs no change here.
"""
from __future__ import annotations

import pyarrow as pa

from pipeline.errors import PipelineError

FORMATS = ("prompt", "messages", "text")
PROMPT_RENDERING = "chat_template([{role: user, content: prompt}], add_generation_prompt=True)"


def input_column(data_cfg) -> str:
    """The column the configured format reads."""
    return getattr(data_cfg, f"{data_cfg.format}_column")


def rendering(data_cfg) -> str:
    """How a row becomes tokens, in words: part of extract's fingerprint and of each file's metadata."""
    if data_cfg.format == "messages":
        return f"chat_template(messages, add_generation_prompt={data_cfg.add_generation_prompt})"
    if data_cfg.format == "text":
        return "tokenizer(text, add_special_tokens=True), no chat template"
    return PROMPT_RENDERING


def is_string_like(t: pa.DataType) -> bool:
    """string, large_string, string_view (pyarrow >= 16), or a dictionary of one of them (what a
    pandas categorical becomes): every type whose ``to_pylist`` gives Python str."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)


def _is_message_list(t: pa.DataType) -> bool:
    """list<struct<role: string, content: string, ...>> (any list and string flavour)."""
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or getattr(pa.types, "is_list_view", lambda _: False)(t)):
        return False
    item = t.value_type
    if not pa.types.is_struct(item):
        return False
    fields = {item.field(i).name: item.field(i).type for i in range(item.num_fields)}
    return all(k in fields and is_string_like(fields[k]) for k in ("role", "content"))


def check_column(path: str, schema: pa.Schema, data_cfg) -> None:
    """The format's column exists and has the format's type; one line naming the file otherwise."""
    col, fmt = input_column(data_cfg), data_cfg.format
    if col not in schema.names:
        raise PipelineError(f"{path}: no column {col!r} (columns: {', '.join(schema.names)}); "
                            f"set data.{fmt}_column (data.format={fmt})")
    t = schema.field(col).type
    if fmt == "messages" and not _is_message_list(t):
        raise PipelineError(f"{path}: column {col!r} holds {t}, not a list of {{role, content}} string structs "
                            "(data.format=messages)")
    if fmt != "messages" and not is_string_like(t):
        raise PipelineError(f"{path}: column {col!r} holds {t}, not strings (data.format={fmt})")


def row_problem(value, data_cfg) -> str | None:
    """Why a row's value cannot be rendered (a null, a wrong type, a malformed message list), or None."""
    name = data_cfg.format
    if data_cfg.format != "messages":
        return None if isinstance(value, str) else f"{name} is {value!r}, not a string"
    if not isinstance(value, list):
        return f"messages is {value!r}, not a list"
    if not value:
        return "messages is an empty list"
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {k} is {m!r}: role and content must both be strings"
    return None


def row_text(value, data_cfg) -> str | None:
    """A row shown as plain text (the report's prompt column): a conversation as 'role: content' lines."""
    if row_problem(value, data_cfg) is not None:
        return None if value is None else str(value)
    if data_cfg.format == "messages":
        return "\n".join(f"{m['role']}: {m['content']}" for m in value)
    return value


def render_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """The card's rendering: one user message, generation prompt, then a plain tokenizer call."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    return tokenizer(texts)["input_ids"] if texts else []


def _render_text(tokenizer, value, data_cfg) -> str:
    if data_cfg.format == "messages":
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=data_cfg.add_generation_prompt)
    return tokenizer.apply_chat_template([{"role": "user", "content": value}], tokenize=False,
                                         add_generation_prompt=True)


def render_rows(tokenizer, values: list, data_cfg) -> tuple[list[list[int]], dict[int, str]]:
    """(each row's token ids, {row: problem}); a row with a problem gets no tokens ([]).

    Rows are rendered to text one at a time (the chat template is Python), then tokenized in one
    call. The templated formats are tokenized as the card does (a plain tokenizer call on the
    rendered text); ``text`` with ``add_special_tokens=True``.
    """
    problems: dict[int, str] = {}
    texts: dict[int, str] = {}
    for i, value in enumerate(values):
        problem = row_problem(value, data_cfg)
        if problem is None and data_cfg.format != "text":
            try:  # a template may refuse a conversation (e.g. roles that do not alternate)
                texts[i] = _render_text(tokenizer, value, data_cfg)
            except Exception as e:  # noqa: BLE001  (jinja's TemplateError, or whatever the template raises)
                problem = f"the chat template refused it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        elif problem is None:
            texts[i] = value
        if problem is not None:
            problems[i] = problem
    rows = list(texts)
    special = {"add_special_tokens": True} if data_cfg.format == "text" else {}
    encoded = tokenizer([texts[i] for i in rows], **special)["input_ids"] if rows else []
    token_ids: list[list[int]] = [[] for _ in values]
    for i, ids in zip(rows, encoded):
        if ids:
            token_ids[i] = ids
        else:  # raw "" (no BOS in Qwen's tokenizer): there is no position to read
            problems[i] = f"{data_cfg.format} renders to no tokens"
    return token_ids, dict(sorted(problems.items()))


def bound_rows(token_ids: list[list[int]], data_cfg, max_tokens: int | None,
               from_model: bool = False) -> tuple[list[list[int]], dict[int, str], int]:
    """Rows longer than ``max_tokens``, as ``data.truncation`` says: (token ids, {row: why it is too
    long} for error_row, how many rows were cut). ``left`` drops a row's first tokens (the end, and
    with it the generation prompt, stays), ``right`` its last ones (the template's opening stays, so
    the row still reuses the shared prefix). ``from_model``: the bound is the model's, not the key's."""
    if max_tokens is None:
        return token_ids, {}, 0
    long_rows = [i for i, t in enumerate(token_ids) if len(t) > max_tokens]
    if data_cfg.truncation == "error_row":
        bound = (f"the model's maximum of {max_tokens} positions" if from_model
                 else f"data.max_tokens={max_tokens}")
        return token_ids, {i: f"{data_cfg.format} has {len(token_ids[i])} tokens, more than {bound}"
                           for i in long_rows}, 0
    cut = list(token_ids)
    for i in long_rows:
        cut[i] = cut[i][-max_tokens:] if data_cfg.truncation == "left" else cut[i][:max_tokens]
    return cut, {}, len(long_rows)


def chat_prefix_ids(tokenizer) -> list[int]:
    """The tokens every rendered prompt starts with: the template's text before the user's content
    (system block and user header). Empty when the template does not show the content verbatim."""
    sentinel = "\ue000"  # a private-use character no template adds
    text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text.split(sentinel)[0])["input_ids"] if sentinel in text else []


def prefix_ids(tokenizer, data_cfg) -> list[int]:
    """The shared prefix to cache for this format. A conversation that opens with a user message
    starts like a prompt; one that opens otherwise (its own system message) does not match and
    runs whole, as extract checks row by row. Raw text shares nothing but perhaps a BOS token,
    which is not worth a cache: none."""
    return [] if data_cfg.format == "text" else chat_prefix_ids(tokenizer)
