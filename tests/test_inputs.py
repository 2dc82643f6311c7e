"""Inputs as users have them (issue 11): changed input files, row formats, bad rows, long rows. Every vector is
compared with a hooked forward of the full model, one row at a time, rendered here."""
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cli import main
from pipeline.io.rows import chat_prefix_ids
from tests.conftest import TINY_CONFIG, tiny_overrides, write_parquet
from tests.test_bad_input import expect_error
from tests.test_extract import read_output


def extract_argv(tmp_path, path, **extra):
    return ["extract", "--config", TINY_CONFIG,
            *tiny_overrides(tmp_path, **{"data.paths": f"[{path}]", "data.chunk_rows": 2, **extra})]


def test_a_rewritten_input_file_is_refused_naming_it(tmp_path, capsys):
    """A shard regenerated under the same name: resuming would mix its old chunks with new ones."""
    path = write_parquet(tmp_path / "in" / "a.parquet", {"prompt": ["one", "two", "three"]})
    assert main(extract_argv(tmp_path, path)) == 0
    settings = json.loads((tmp_path / "extract" / "_fingerprint.json").read_text())["settings"]
    identity = settings["data.files"][str(path)]
    assert identity["size"] == path.stat().st_size and identity["rows"] == 3
    (tmp_path / "extract" / "00000-a" / "chunk_00001.arrow").unlink()  # an interrupted run, to resume
    write_parquet(path, {"prompt": ["uno", "dos", "tres, otra vez"]})  # same name, same row count
    capsys.readouterr()
    line = expect_error(capsys, extract_argv(tmp_path, path), f"data.files[{path}]", "--overwrite")
    assert "parquet_footer_sha256" in line
    assert not (tmp_path / "extract" / "00000-a" / "chunk_00001.arrow").exists()  # nothing was run
    assert main(extract_argv(tmp_path, path) + ["--overwrite"]) == 0


def test_an_unchanged_input_file_resumes(tmp_path, capsys):
    path = write_parquet(tmp_path / "a.parquet", {"prompt": ["one", "two", "three"]})
    assert main(extract_argv(tmp_path, path)) == 0
    (tmp_path / "extract" / "00000-a" / "chunk_00001.arrow").unlink()
    path.touch()  # a new mtime alone (a copy, a restore) is not a change
    assert main(extract_argv(tmp_path, path)) == 0
    out = capsys.readouterr()
    assert "rank 0 wrote 1 row(s) in 1 chunk(s)" in out.out + out.err


# --- data.format: prompt | messages | text ---------------------------------------------------------

LONG = " ".join(f"sentence {i}: the {i}th idea, 你好 🙂." for i in range(40))
PROMPTS = ["What is 17 * 23?", LONG, "\n\nLeading blank lines: this row cannot reuse the cached prefix.", "a"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 17 * 23?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": LONG}],
    [{"role": "user", "content": "Объясни квантовую запутанность."}, {"role": "assistant", "content": "Коротко:"}],
]
TEXTS = ["The quick brown fox jumps over the lazy dog.", LONG, "<|im_start|>user\nnot a template, just text", "x"]


@pytest.fixture(scope="module")
def full_model(tiny_model_dir):
    """The whole tiny model (all 28 layers, LM head), float32: the reference runs it as it comes."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def reference_ids(tokenizer, fmt: str, value, add_generation_prompt: bool = True) -> list[int]:
    """Each format's rendering, written out here: the template (or none), then the tokenizer."""
    if fmt == "text":
        return tokenizer(value, add_special_tokens=True)["input_ids"]
    messages = [{"role": "user", "content": value}] if fmt == "prompt" else value
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt if fmt == "messages" else True)
    return tokenizer(text)["input_ids"]


def hooked_all(model, ids: list[int], layer: int = 20) -> torch.Tensor:
    """One row alone through the full model; decoder layer ``layer``'s output at every position [n, d]."""
    seen = {}

    def hook(mod, inp, out):  # returns None: the layer's output goes on unchanged
        seen["h"] = (out[0] if isinstance(out, tuple) else out)[0].float()

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return seen["h"]


def hooked_last(model, ids: list[int], layer: int = 20) -> torch.Tensor:
    """Decoder layer ``layer``'s output at the row's last position."""
    return hooked_all(model, ids, layer)[-1]


@pytest.mark.parametrize("fmt, gen", [("prompt", True), ("messages", True), ("messages", False), ("text", True)])
def test_each_format_matches_a_hooked_forward(tmp_path, full_model, tokenizer, fmt, gen):
    values = {"prompt": PROMPTS, "messages": CONVERSATIONS, "text": TEXTS}[fmt]
    column = {"prompt": "question", "messages": "conversation", "text": "body"}[fmt]
    path = write_parquet(tmp_path / "in.parquet", {column: values, "id": [f"r{i}" for i in range(len(values))]})
    argv = extract_argv(tmp_path, path, **{"data.format": fmt, f"data.{fmt}_column": column,
                                           "data.add_generation_prompt": str(gen).lower(),
                                           "extract.max_batch_tokens": 300})
    assert main(argv) == 0
    ids, vectors, n_tokens, meta = read_output(tmp_path / "extract")
    assert ids == [f"r{i}" for i in range(len(values))]
    for i, value in enumerate(values):
        want = reference_ids(tokenizer, fmt, value, gen)
        assert n_tokens[i] == len(want), i
        ref = hooked_last(full_model, want)
        assert np.abs(vectors[i] - ref.numpy()).max() / ref.norm().item() < 1e-4, (fmt, i)
    rendering = {"prompt": "chat_template([{role: user, content: prompt}], add_generation_prompt=True)",
                 "messages": f"chat_template(messages, add_generation_prompt={gen})",
                 "text": "tokenizer(text, add_special_tokens=True), no chat template"}[fmt]
    assert meta["prompt_rendering"] == rendering and meta["data_format"] == fmt
    settings = json.loads((tmp_path / "extract" / "_fingerprint.json").read_text())["settings"]
    assert settings["prompt_rendering"] == rendering and settings[f"data.{fmt}_column"] == column
    assert ("chat_template_sha256" in settings) == (fmt != "text")
    log = (tmp_path / "extract" / "logs" / "rank00000.log").read_text()
    reused = sum(int(n) for n in re.findall(r"\((\d+) from the cached prefix\)", log))
    prefix = len(chat_prefix_ids(tokenizer))
    # Rows that open with a user message reuse the template's opening; a system message, raw text,
    # or a seam that tokenizes differently (the blank lines) run whole.
    shared = {"prompt": [0, 1, 3], "messages": [0, 2, 3], "text": []}[fmt]
    assert reused == prefix * len(shared)


def test_a_format_change_is_a_fingerprint_change(tmp_path, capsys):
    path = write_parquet(tmp_path / "in.parquet", {"prompt": PROMPTS, "text": TEXTS})
    assert main(extract_argv(tmp_path, path)) == 0
    capsys.readouterr()
    expect_error(capsys, extract_argv(tmp_path, path, **{"data.format": "text"}), "data.format: 'prompt' -> 'text'")


@pytest.mark.parametrize("fmt, columns, words", [
    ("messages", {"messages": ["not", "a list"]}, ["'messages'", "not a list of {role, content}"]),
    ("messages", {"messages": [[{"role": "user", "text": "hi"}]]}, ["'messages'", "not a list of {role, content}"]),
    ("messages", {"prompt": ["hi"]}, ["no column 'messages'", "data.messages_column"]),
    ("text", {"text": [1, 2]}, ["'text'", "not strings"]),
])
def test_a_column_of_the_wrong_type_is_refused_naming_the_file(tmp_path, capsys, fmt, columns, words):
    path = write_parquet(tmp_path / "in.parquet", columns)
    expect_error(capsys, extract_argv(tmp_path, path, **{"data.format": fmt}), str(path), *words)


# --- data.on_bad_row: error | skip ------------------------------------------------------------------

BAD = {  # format -> (column values with bad rows, {row: the problem the error names})
    "prompt": (["fine", None, "also fine", "last"], {1: "prompt is None, not a string"}),
    "text": (["fine", "", None, "x"], {1: "text renders to no tokens", 2: "text is None, not a string"}),
    "messages": ([[{"role": "user", "content": "fine"}], None, [],
                  [{"role": "user", "content": None}], [{"role": None, "content": "x"}],
                  [{"role": "user", "content": "fine too"}, {"role": "assistant", "content": "ok"}]],
                 {1: "messages is None, not a list", 2: "messages is an empty list",
                  3: "message 0 is {'role': 'user', 'content': None}: role and content must both be strings",
                  4: "message 0 is {'role': None, 'content': 'x'}: role and content must both be strings"}),
}


@pytest.mark.parametrize("fmt", ["prompt", "text", "messages"])
def test_a_bad_row_stops_the_run_naming_file_and_row(tmp_path, capsys, fmt):
    values, problems = BAD[fmt]
    path = write_parquet(tmp_path / "in.parquet", {fmt: values})
    # A null string is found from the Parquet footer's null counts at planning, before the model
    # loads (so text's null row 2 is named before its empty row 1); other bad rows when their chunk is read.
    nulls = [i for i, v in enumerate(values) if v is None]
    row = nulls[0] if fmt != "messages" else min(problems)
    line = expect_error(capsys, extract_argv(tmp_path, path, **{"data.format": fmt}), str(path), f"row {row}: ",
                        problems[row], "data.on_bad_row=skip")
    assert (tmp_path / "extract" / "_fingerprint.json").exists() == (fmt == "messages")  # planning failed
    assert not list((tmp_path / "extract").rglob("chunk_*.arrow")), line


@pytest.mark.parametrize("fmt", ["prompt", "text", "messages"])
def test_skip_writes_error_rows_and_goes_on(tmp_path, full_model, tokenizer, fmt):
    values, problems = BAD[fmt]
    path = write_parquet(tmp_path / "in.parquet", {fmt: values, "id": [f"r{i}" for i in range(len(values))]})
    assert main(extract_argv(tmp_path, path, **{"data.format": fmt, "data.on_bad_row": "skip"})) == 0
    rows = [r for f in sorted((tmp_path / "extract").rglob("chunk_*.arrow"))
            for r in pa.ipc.open_stream(pa.memory_map(str(f))).read_all().to_pylist()]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(values))]
    for i, r in enumerate(rows):
        if i in problems:
            assert r["error"] == f"bad row: {problems[i]} (column {fmt!r})" and r["activation"] is None, i
            assert r["n_tokens"] == 0
        else:
            ref = hooked_last(full_model, reference_ids(tokenizer, fmt, values[i]))
            assert r["error"] is None
            assert np.abs(np.array(r["activation"]) - ref.numpy()).max() / ref.norm().item() < 1e-4, i
    log = (tmp_path / "extract" / "logs" / "rank00000.log").read_text()
    assert sum(f"{path} row {i} (id r{i}): bad row: " in log for i in problems) == len(problems)


def test_later_stages_pass_skipped_rows_through(tmp_path):
    path = write_parquet(tmp_path / "in.parquet", {"prompt": ["one", None, "three"]})
    argv = ["run", "--config", TINY_CONFIG, *tiny_overrides(tmp_path, **{
        "data.paths": f"[{path}]", "data.on_bad_row": "skip", "generation.max_new_tokens": 3})]
    assert main(argv) == 0
    error = "extract: bad row: prompt is None, not a string (column 'prompt')"
    verbalized = pq.read_table(tmp_path / "verbalize" / "00000-in" / "chunk_00000.parquet").to_pylist()
    assert [r["error"] for r in verbalized] == [None, error, None]
    assert verbalized[1]["explanation"] == "" and verbalized[1]["finished"] is False
    scored = pq.read_table(tmp_path / "score" / "00000-in" / "chunk_00000.parquet").to_pylist()
    assert scored[1]["fve"] is None and scored[1]["error"] and scored[0]["fve"] is not None
    summary = json.loads((tmp_path / "score" / "_summary.json").read_text())
    assert (summary["rows_scored"], summary["rows_failed"]) == (2, 1), summary


def test_nulls_are_found_from_the_footer_in_the_right_column_and_row_group(tmp_path):
    from pipeline.config import DataConfig
    from pipeline.errors import PipelineError
    from pipeline.io.shards import check_no_nulls, resolve_shards

    convo = [[{"role": "user", "content": "hi"}]] * 5  # a nested column first: leaves outnumber fields
    path = write_parquet(tmp_path / "in.parquet", {"messages": convo, "text": ["a", None, "b", "c", "d"],
                                                   "prompt": ["a", "b", "c", "d", None]}, row_group_size=2)
    cfg = DataConfig(paths=[str(path)])
    with pytest.raises(PipelineError, match=r"in.parquet: row 4: prompt is None"):
        check_no_nulls(resolve_shards(cfg), cfg)
    cfg = DataConfig(paths=[str(path)], format="text")
    with pytest.raises(PipelineError, match=r"in.parquet: row 1: text is None"):
        check_no_nulls(resolve_shards(cfg), cfg)
    cfg = DataConfig(paths=[str(path)], format="messages")
    check_no_nulls(resolve_shards(cfg), cfg)  # lists: their nulls are not in the leaves' counts


# --- long rows: data.max_tokens, data.truncation; rows past the batch budget -------------------------

@pytest.mark.parametrize("fmt, truncation", [("prompt", "error_row"), ("prompt", "left"), ("prompt", "right"),
                                             ("text", "left"), ("messages", "right")])
def test_long_rows_are_error_rows_or_cut(tmp_path, full_model, tokenizer, fmt, truncation):
    values = {"prompt": PROMPTS, "messages": CONVERSATIONS, "text": TEXTS}[fmt]
    limit = 40
    path = write_parquet(tmp_path / "in.parquet", {fmt: values})
    argv = extract_argv(tmp_path, path, **{"data.format": fmt, "data.max_tokens": limit, "data.truncation": truncation})
    assert main(argv) == 0
    _, vectors, n_tokens, meta = read_output(tmp_path / "extract")
    assert (meta["max_tokens"], meta["truncation"]) == (str(limit), truncation)
    rows = [r for f in sorted((tmp_path / "extract").rglob("chunk_*.arrow"))
            for r in pa.ipc.open_stream(pa.memory_map(str(f))).read_all().to_pylist()]
    whole = [reference_ids(tokenizer, fmt, v) for v in values]
    assert any(len(w) > limit for w in whole) and any(len(w) <= limit for w in whole)
    for i, want in enumerate(whole):
        if len(want) > limit and truncation == "error_row":
            assert rows[i]["error"] == f"{fmt} has {len(want)} tokens, more than data.max_tokens={limit}"
            assert rows[i]["activation"] is None and n_tokens[i] == len(want)
            continue
        if len(want) > limit:
            want = want[-limit:] if truncation == "left" else want[:limit]
        ref = hooked_last(full_model, want)
        assert rows[i]["error"] is None and n_tokens[i] == len(want), i
        assert np.abs(vectors[i] - ref.numpy()).max() / ref.norm().item() < 1e-4, (i, truncation)
    settings = json.loads((tmp_path / "extract" / "_fingerprint.json").read_text())["settings"]
    assert (settings["data.max_tokens"], settings["data.truncation"]) == (limit, truncation)


def test_max_tokens_defaults_to_the_models_positions(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "in.parquet", {"prompt": ["a", "hello " * 4100]})
    assert main(extract_argv(tmp_path, path, **{"data.truncation": "right"})) == 0
    _, vectors, n_tokens, meta = read_output(tmp_path / "extract")
    assert meta["max_tokens"] == "4096" and n_tokens[1] == 4096 and vectors[1].any()


def test_a_row_past_the_batch_budget_runs_alone_in_pieces_of_the_budget(tokenizer, full_model):
    """Bounded memory for any length: no forward pass is fed more than extract.max_batch_tokens tokens;
    a longer row runs alone, piece after piece on its own KV cache, and its vector is still exact."""
    from pipeline.config import load_config
    from pipeline.engines.prefix import SharedPrefix
    from pipeline.models.modeling import load_extract_model
    from pipeline.stages.extract import extract_vectors

    trunk = load_extract_model(load_config(TINY_CONFIG, []), torch.device("cpu"))
    prefix = SharedPrefix(trunk, input_ids=chat_prefix_ids(tokenizer))
    ids = [reference_ids(tokenizer, "prompt", p) for p in ["a", LONG, "b", LONG + " more", "c"]]
    budget = 64
    assert len(ids[1]) - prefix.length > 4 * budget and len(ids[0]) - prefix.length < budget // 3
    batches = []
    trunk.register_forward_pre_hook(lambda mod, args, kw: batches.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    got, stats, errors = extract_vectors(trunk, ids, max_batch_tokens=budget, pad_id=tokenizer.pad_token_id,
                                         prefix=prefix)
    assert not errors
    assert all(rows * width <= budget for rows, width in batches)
    pieces = [w for rows, w in batches if rows == 1 and w > budget // 3]
    long_total = sum(len(ids[i]) - prefix.length for i in (1, 3))
    assert sum(w for rows, w in batches) >= long_total and len(pieces) >= 2 * 4  # each long row: several pieces
    for i, row in enumerate(ids):
        ref = hooked_last(full_model, row)
        assert (got[i] - ref).abs().max() / ref.norm() < 1e-4, i


def test_the_report_shows_a_conversation_as_role_lines(tmp_path):
    """prompts_by_id (the report's prompt column) reads the format's column; a conversation as text."""
    from pipeline.config import DataConfig
    from pipeline.io.shards import prompts_by_id, resolve_shards

    path = write_parquet(tmp_path / "in.parquet", {"messages": CONVERSATIONS[:2], "id": ["a", "b"]})
    cfg = DataConfig(paths=[str(path)], format="messages")
    assert prompts_by_id(resolve_shards(cfg), cfg, {"b"}) == {
        "b": "system: You are terse.\nuser: Name a colour."}
    path = write_parquet(tmp_path / "t.parquet", {"text": TEXTS[:2]})
    cfg = DataConfig(paths=[str(path)], format="text")
    assert prompts_by_id(resolve_shards(cfg), cfg, {"00000-t:1"}) == {"00000-t:1": LONG}
