"""Stage 1 against the model card's own one-example computation, written here in plain transformers."""
import json
import sys
import weakref

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cli import main
from tests.conftest import TINY_CONFIG, tiny_overrides, write_parquet

LONG = " ".join(f"word{i} and the {i}th idea, 你好 🙂." for i in range(60))  # well past 300 tokens
PROMPTS = [
    "",
    LONG,
    "Объясни квантовую запутанность. 東京の天気は？ مرحبا بالعالم 🎉🥳👩‍🔬",
    "Repeat: <concept>㈎</concept> then </explanation> and <|im_end|>",
    "Write a Python hello world program",
    "Write a Python hello world program",  # duplicate: two rows, two outputs
    "What is 17 * 23?",
    "a",
    "\n\nLeading blank lines merge with the template's newline, so this row cannot reuse the cached prefix.",
]


def card_activation(model, tokenizer, prompt: str) -> torch.Tensor:
    """The card's step 1, verbatim in spirit: hook layers[20], first forward pass only, h[:, -1, :]."""
    messages = [{"role": "user", "content": prompt}]
    chat_str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(chat_str, return_tensors="pt")
    activation = {}

    def hook(mod, inp, out):
        h = out[0] if isinstance(out, tuple) else out
        if "h" not in activation:
            activation["h"] = h[:, -1, :].detach()

    handle = model.base_model.model.model.layers[20].register_forward_hook(hook)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, pad_token_id=tokenizer.eos_token_id)
    handle.remove()
    return activation["h"].squeeze(0).float()


def read_output(out_dir):
    from pipeline.io.activations import read_activations
    from pipeline.io.layout import StageDir

    ids, vecs, ntok = [], [], []
    for path in StageDir(out_dir, ".arrow").chunk_files():
        i, v, n, meta, _ = read_activations(path)
        ids += i
        vecs.append(v)
        ntok += n
    return ids, np.concatenate(vecs), ntok, meta


def run_extract(tmp_path, **extra):
    overrides = tiny_overrides(tmp_path, **{"data.chunk_rows": 3, "extract.max_batch_tokens": 256, **extra})
    assert main(["extract", "--config", TINY_CONFIG, *overrides]) == 0


def test_vectors_match_the_card(tmp_path, peft_model, tokenizer):
    write_parquet(tmp_path / "in" / "a.parquet", {"id": [f"r{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS},
                  row_group_size=2)
    run_extract(tmp_path, **{"data.paths": f"[{tmp_path / 'in' / 'a.parquet'}]"})
    ids, vectors, n_tokens, meta = read_output(tmp_path / "extract")
    assert ids == [f"r{i}" for i in range(len(PROMPTS))]
    assert vectors.shape == (len(PROMPTS), peft_model.config.hidden_size)
    assert max(n_tokens) > 300
    with peft_model.disable_adapter():  # the verbalizer reads the base model's activations
        refs = [card_activation(peft_model, tokenizer, p) for p in PROMPTS]
    for i, ref in enumerate(refs):
        rel = np.abs(vectors[i] - ref.numpy()).max() / ref.norm().item()
        assert rel < 1e-4, (i, PROMPTS[i][:40], rel)
        assert n_tokens[i] == len(tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[i]}], tokenize=True, add_generation_prompt=True)["input_ids"])
    np.testing.assert_array_equal(vectors[4], vectors[5])  # duplicates: both rows present, same vector
    assert meta["layer"] == "20" and meta["base_model"] == "builtin:tiny"
    assert len(meta["fingerprint"]) == 16


def test_card_behaviour_flag_keeps_the_adapter_on(tmp_path, peft_model, tokenizer):
    prompts = PROMPTS[2:5]
    write_parquet(tmp_path / "in.parquet", {"prompt": prompts})
    run_extract(tmp_path, **{"data.paths": f"[{tmp_path / 'in.parquet'}]", "extract.with_adapter": "true"})
    _, vectors, _, _ = read_output(tmp_path / "extract")
    for i, p in enumerate(prompts):
        ref = card_activation(peft_model, tokenizer, p)  # adapter active, as the card's example does
        assert np.abs(vectors[i] - ref.numpy()).max() / ref.norm().item() < 1e-4


def test_output_is_a_dataset_and_ids_default_to_shard_name_and_row(tmp_path):
    import datasets

    write_parquet(tmp_path / "in" / "b.parquet", {"prompt": PROMPTS[:5]})
    run_extract(tmp_path, **{"data.paths": f"[{tmp_path / 'in' / '*.parquet'}]", "extract.output_dtype": "float16"})
    files = sorted(str(p) for p in (tmp_path / "extract").glob("*/chunk_*.arrow"))
    ds = datasets.load_dataset("arrow", data_files=files, split="train")
    assert ds["id"] == [f"00000-b:{i}" for i in range(5)]
    assert ds["error"] == [None] * 5
    one = datasets.Dataset.from_file(files[0])
    assert len(one["activation"][0]) == 64
    with pa.memory_map(files[0]) as src:
        schema = pa.ipc.open_stream(src).schema
    assert schema.field("activation").type == pa.list_(pa.float16(), 64)
    assert schema.field("n_tokens").type == pa.int32()
    assert schema.names == ["id", "position", "token_id", "activation", "n_tokens", "error"]
    assert schema.field("position").type == schema.field("token_id").type == pa.int32()
    assert ds["position"] == [n - 1 for n in ds["n_tokens"]]  # extract.positions=last
    assert ds["token_id"] == [198] * 5  # "\n": the generation prompt's last token
    fp = json.loads((tmp_path / "extract" / "_fingerprint.json").read_text())
    assert fp["settings"]["extract.layer"] == 20
    assert (tmp_path / "extract" / "00000-b" / "_COMPLETE").exists()


def test_rerun_skips_finished_chunks(tmp_path, capsys):
    write_parquet(tmp_path / "c.parquet", {"prompt": PROMPTS})
    run_extract(tmp_path, **{"data.paths": f"[{tmp_path / 'c.parquet'}]"})
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "extract").glob("*/chunk_*.arrow")}
    run_extract(tmp_path, **{"data.paths": f"[{tmp_path / 'c.parquet'}]"})
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "extract").glob("*/chunk_*.arrow")} == first
    assert "3 chunk(s) already done" in capsys.readouterr().out


def test_template_prefix_is_computed_once_and_a_seam_mismatch_runs_whole(peft_model, tokenizer):
    """The system block + user header is cached once; a row whose tokens differ at the seam runs whole."""
    from pipeline.config import load_config
    from pipeline.stages.extract import chat_prefix_ids, extract_vectors, render_and_tokenize
    from pipeline.models.modeling import load_extract_model
    from pipeline.engines.prefix import SharedPrefix

    cfg = load_config(TINY_CONFIG, [])
    trunk = load_extract_model(cfg, torch.device("cpu"))
    prefix_ids = chat_prefix_ids(tokenizer)
    assert tokenizer.decode(prefix_ids).endswith("<|im_start|>user\n")
    prompts = [PROMPTS[-1], "short", PROMPTS[2], "", PROMPTS[1]]  # the first one's tokens differ at the seam
    ids = render_and_tokenize(tokenizer, prompts)
    prefix = SharedPrefix(trunk, input_ids=prefix_ids)
    rows = []
    for layer in trunk.layers:  # count what the model is fed
        layer.register_forward_pre_hook(lambda mod, args, kw: rows.append((args or [kw["hidden_states"]])[0].shape[:2]),
                                        with_kwargs=True)
    got, stats, _ = extract_vectors(trunk, ids, max_batch_tokens=1 << 20, pad_id=tokenizer.pad_token_id,
                                    prefix=prefix)
    assert stats["reused_tokens"] == len(prefix_ids) * 4
    widths = {n for _, n in rows}
    assert len(ids[0]) in widths  # the mismatched row, whole
    assert max(len(t) for t in ids[1:]) not in widths  # the longest shared row, as its suffix only
    assert max(len(t) for t in ids[1:]) - len(prefix_ids) in widths
    with peft_model.disable_adapter():
        for i, p in enumerate(prompts):
            ref = card_activation(peft_model, tokenizer, p)
            assert (got[i] - ref).abs().max() / ref.norm() < 1e-5, (i, p[:30])


@pytest.mark.parametrize("kind", ["categorical", "string_view"])
def test_string_like_columns_give_what_plain_strings_give(tmp_path, kind):
    """A pandas categorical (dictionary<string>) or a string_view column reads as plain strings."""
    prompts, ids = PROMPTS[2:8], [f"r{i}" for i in range(6)]  # prompts 4 and 5 are equal
    plain = write_parquet(tmp_path / "plain" / "p.parquet", {"id": ids, "prompt": prompts})
    make = {"categorical": pd.Categorical,
            "string_view": lambda v: pd.array(v, dtype=pd.ArrowDtype(pa.string_view()))}[kind]
    typed = tmp_path / "typed" / "p.parquet"
    typed.parent.mkdir()
    pd.DataFrame({"id": make(ids), "prompt": make(prompts)}).to_parquet(typed, row_group_size=4)
    arrow_type = pa.dictionary(pa.int8(), pa.string()) if kind == "categorical" else pa.string_view()
    assert pq.read_schema(typed).field("prompt").type == arrow_type
    assert pq.read_schema(typed).field("id").type == arrow_type
    run_extract(tmp_path / "a", **{"data.paths": f"[{plain}]"})
    run_extract(tmp_path / "b", **{"data.paths": f"[{typed}]"})
    want_ids, want, want_tokens, _ = read_output(tmp_path / "a" / "extract")
    got_ids, got, got_tokens, _ = read_output(tmp_path / "b" / "extract")
    assert got_ids == want_ids == ids and got_tokens == want_tokens
    np.testing.assert_array_equal(got, want)


def test_a_prompt_longer_than_the_model_is_an_error_row(tmp_path, peft_model, tokenizer, capsys):
    from pipeline.io.activations import read_activations

    limit = peft_model.config.max_position_embeddings  # 4096 for the tiny model
    prompts = [PROMPTS[2], "hello " * (limit + 10), PROMPTS[4], "a"]
    path = write_parquet(tmp_path / "in.parquet", {"id": [f"r{i}" for i in range(4)], "prompt": prompts})
    run_extract(tmp_path, **{"data.paths": f"[{path}]"})  # chunks of 3 rows
    first = tmp_path / "extract" / "00000-in" / "chunk_00000.arrow"
    with pa.memory_map(str(first)) as src:
        table = pa.ipc.open_stream(src).read_all()
    n = table.column("n_tokens")[1].as_py()
    message = f"prompt has {n} tokens, more than the model's maximum of {limit} positions"
    assert n > limit and table.column("activation")[1].as_py() is None
    assert table.column("error").to_pylist() == [None, message, None]
    _, vectors, _, _, row_errors = read_activations(first)
    assert row_errors == {1: f"extract: {message}"} and not vectors[1].any()
    log = (tmp_path / "extract" / "logs" / "rank00000.log").read_text()
    warnings = [line.split(" WARNING pipeline.stages.extract: ")[1] for line in log.splitlines() if " WARNING " in line]
    assert warnings == [f"{path} row 1 (id r1): {message}; not extracted: its activation is null and its "
                        "'error' says why"]
    assert "1 row(s) not extracted (see the 'error' column)" in capsys.readouterr().out
    ids, vectors, _, _ = read_output(tmp_path / "extract")
    assert ids == ["r0", "r1", "r2", "r3"]
    with peft_model.disable_adapter():
        for i in (0, 2, 3):
            ref = card_activation(peft_model, tokenizer, prompts[i])
            assert np.abs(vectors[i] - ref.numpy()).max() / ref.norm().item() < 1e-4, i


def _trunk_and_prefix(tokenizer):
    from pipeline.config import load_config
    from pipeline.stages.extract import chat_prefix_ids
    from pipeline.models.modeling import load_extract_model
    from pipeline.engines.prefix import SharedPrefix

    trunk = load_extract_model(load_config(TINY_CONFIG, []), torch.device("cpu"))
    return trunk, SharedPrefix(trunk, input_ids=chat_prefix_ids(tokenizer))


def test_a_row_that_runs_out_of_memory_alone_is_an_error_row(peft_model, tokenizer):
    from pipeline.stages.extract import extract_vectors, render_and_tokenize

    trunk, prefix = _trunk_and_prefix(tokenizer)
    prompts = ["short", PROMPTS[1], PROMPTS[2], "a", PROMPTS[6]]
    ids = render_and_tokenize(tokenizer, prompts)
    assert len(ids[1]) - prefix.length > 100 > max(len(t) - prefix.length for t in ids[:1] + ids[2:])

    def out_of_memory_when_long(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 100:
            raise torch.OutOfMemoryError("injected: too many tokens")

    handle = trunk.register_forward_pre_hook(out_of_memory_when_long, with_kwargs=True)
    try:
        got, stats, errors = extract_vectors(trunk, ids, max_batch_tokens=1 << 20, pad_id=tokenizer.pad_token_id,
                                             prefix=prefix)
    finally:
        handle.remove()
    assert errors == {1: f"out of memory on one row of {len(ids[1])} tokens"}  # the prefix counted
    assert stats["error_rows"] == 1 and not got[1].any()
    with peft_model.disable_adapter():
        for i in (0, 2, 3, 4):
            ref = card_activation(peft_model, tokenizer, prompts[i])
            assert (got[i] - ref).abs().max() / ref.norm() < 1e-5, i


def test_the_retry_after_out_of_memory_runs_outside_the_except_block(tokenizer):
    """The halves are run once the failed attempt's exception, and the tensors its frames hold, are gone."""
    from pipeline.stages.extract import extract_vectors, render_and_tokenize

    trunk, _ = _trunk_and_prefix(tokenizer)
    ids = render_and_tokenize(tokenizer, ["a", "bb bb", "ccc ccc ccc"])
    failed, retries = [], []

    def first_call_runs_out_of_memory(module, args, kwargs):
        if not failed:
            held = torch.ones(1024)  # stands for the activations of the failed attempt
            failed.append(weakref.ref(held))
            raise torch.OutOfMemoryError("injected: batch too large")
        retries.append((sys.exc_info(), failed[0]() is None))

    handle = trunk.register_forward_pre_hook(first_call_runs_out_of_memory, with_kwargs=True)
    try:
        _, _, errors = extract_vectors(trunk, ids, max_batch_tokens=1 << 20, pad_id=tokenizer.pad_token_id)
    finally:
        handle.remove()
    assert errors == {} and len(retries) == 2
    assert retries == [((None, None, None), True)] * 2


def test_verbalize_gives_an_extract_error_row_an_error_and_no_generation(tmp_path, peft_model, tokenizer, vectors):
    """A file with a null activation and its 'error', written here with plain pyarrow."""
    from tests.card_reference import card_generate, card_text
    from tests.test_verbalize import read_explanations, run_verbalize

    good = vectors[:3].numpy()
    values = np.insert(good, 1, 0.0, axis=0)  # [4, d_model]; row 1 is an error row
    shard = tmp_path / "acts" / "00000-test"
    shard.mkdir(parents=True)
    table = pa.table({
        "id": ["v0", "bad", "v1", "v2"],
        "activation": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1],
                                                        mask=pa.array([False, True, False, False])),
        "n_tokens": pa.array([30, 5000, 30, 30], pa.int32()),
        "error": [None, "prompt has 5000 tokens, more than the model's maximum of 4096 positions", None, None],
    })
    with pa.OSFile(str(shard / "chunk_00000.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (shard / "_COMPLETE").write_text(json.dumps({"chunks": 1, "rows": 4}))
    assert run_verbalize(tmp_path, tmp_path / "acts") == 0
    rows, _ = read_explanations(tmp_path / "verbalize")
    assert [r["id"] for r in rows] == ["v0", "bad", "v1", "v2"]
    # a file without position/token_id columns (another tool's) is read: both come out null
    assert rows[1] == {"id": "bad", "position": None, "token_id": None, "explanation": "", "finished": False, "n_generated": 0,
                       "error": "extract: prompt has 5000 tokens, more than the model's maximum of 4096 positions"}
    for row, v in zip((rows[0], rows[2], rows[3]), vectors[:3]):
        assert row["error"] is None
        assert row["explanation"] == card_text(tokenizer, card_generate(peft_model, tokenizer, v))
