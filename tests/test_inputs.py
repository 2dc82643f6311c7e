"""Inputs as users have them (issue 11): changed input files, row formats; each format's vectors against
a hooked forward of the full model, one row at a time."""
import json
import re

import numpy as np
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


def hooked_last(model, ids: list[int], layer: int = 20) -> torch.Tensor:
    """One row alone through the full model; decoder layer ``layer``'s output at the last position."""
    seen = {}

    def hook(mod, inp, out):  # returns None: the layer's output goes on unchanged
        seen["h"] = (out[0] if isinstance(out, tuple) else out)[0, -1].float()

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return seen["h"]


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
