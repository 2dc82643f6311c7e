"""extract.positions (issue 11): every (row, position) vector against a hooked forward of the full model,
one row at a time, for each format and mode; random draws that do not depend on the chunking; rows with no
eligible position; explicit positions; bounded memory; the keys carried into verbalize and score."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from tests.conftest import TINY_CONFIG, tiny_overrides, write_parquet
from tests.test_bad_input import expect_error
from tests.test_inputs import CONVERSATIONS, LONG, PROMPTS, TEXTS, extract_argv, full_model, hooked_all, reference_ids  # noqa: F401 (full_model: a fixture)

VALUES = {"prompt": PROMPTS, "messages": CONVERSATIONS, "text": TEXTS}


def output_rows(out_dir) -> list[dict]:
    """Every output row, read with plain pyarrow, in file order."""
    return [r for f in sorted((out_dir).rglob("chunk_*.arrow"))
            for r in pa.ipc.open_stream(pa.memory_map(str(f))).read_all().to_pylist()]


def expected_positions(mode: str, n: int, explicit=None) -> list[int] | None:
    """The rule for the modes whose choice is not random, written out here."""
    if mode == "all":
        return list(range(n))
    if mode == "column":
        return sorted({p % n for p in explicit if -n <= p < n})
    return None


EXPLICIT = [[0, -1, 5], [-3, 2, 2, 10_000], [1], [-1, 0]]  # repeats and out-of-range ones are dropped


@pytest.mark.parametrize("mode", ["all", "random", "column"])
@pytest.mark.parametrize("fmt", ["prompt", "messages", "text"])
def test_every_position_matches_a_hooked_forward(tmp_path, full_model, tokenizer, fmt, mode):
    values = VALUES[fmt]
    ids = [f"r{i}" for i in range(len(values))]
    path = write_parquet(tmp_path / "in.parquet", {fmt: values, "id": ids, "where": EXPLICIT})
    # A small batch budget: the long rows run alone in pieces, and with mode=all their vectors are
    # written piece by piece; the short ones in batches, in windows of consecutive rows.
    extra = {"data.format": fmt, "extract.positions": mode, "extract.max_batch_tokens": 96,
             "extract.positions_per_row": 4, "extract.min_position": 20, "extract.positions_column": "where"}
    assert main(extract_argv(tmp_path, path, **extra)) == 0
    rows = output_rows(tmp_path / "extract")
    by_row = {}
    for r in rows:
        by_row.setdefault(r["id"], []).append(r)
    assert list(by_row) == ids  # input order, each row's positions together
    for i, value in enumerate(values):
        want = reference_ids(tokenizer, fmt, value)
        n = len(want)
        got = by_row[ids[i]]
        positions = [r["position"] for r in got]
        if mode == "random":
            eligible = range(20, n)
            if not eligible:
                assert len(got) == 1 and got[0]["error"].startswith("no position at index >= extract.min_position=20")
                continue
            assert len(positions) == min(4, len(eligible)) and set(positions) <= set(eligible)
            assert positions == sorted(set(positions))
        else:
            assert positions == expected_positions(mode, n, EXPLICIT[i]), (fmt, mode, i)
        ref = hooked_all(full_model, want)
        for r in got:
            p = r["position"]
            assert r["error"] is None and r["n_tokens"] == n and r["token_id"] == want[p], (fmt, mode, i, p)
            err = np.abs(np.array(r["activation"]) - ref[p].numpy()).max() / ref[p].norm().item()
            assert err < 1e-4, (fmt, mode, i, p, err)
    settings = json.loads((tmp_path / "extract" / "_fingerprint.json").read_text())["settings"]
    assert settings["extract.positions"].startswith(mode)


def test_random_positions_do_not_depend_on_chunking_or_resume(tmp_path):
    """The draw is a function of the seed and the row id: other chunk sizes and a resume read the same
    positions; another seed reads others."""
    texts = [LONG + f" {i}" for i in range(5)]
    path = write_parquet(tmp_path / "in.parquet", {"text": texts, "id": [f"d{i}" for i in range(5)]})

    def drawn(out, **extra):
        argv = ["extract", "--config", TINY_CONFIG, *tiny_overrides(out, **{
            "data.paths": f"[{path}]", "data.format": "text", "extract.positions": "random",
            "extract.positions_per_row": 10, **extra})]
        assert main(argv) == 0
        return [(r["id"], r["position"]) for r in output_rows(out / "extract")]

    first = drawn(tmp_path / "a", **{"data.chunk_rows": 2})
    assert len(first) == 50 and all(p >= 50 for _, p in first)
    assert drawn(tmp_path / "b", **{"data.chunk_rows": 3}) == first
    (tmp_path / "a" / "extract" / "00000-in" / "chunk_00001.arrow").unlink()  # resume one chunk
    assert drawn(tmp_path / "a", **{"data.chunk_rows": 2}) == first
    assert drawn(tmp_path / "c", **{"data.chunk_rows": 2, "extract.seed": 7}) != first
    per_row = {}
    for i, p in first:
        per_row.setdefault(i, []).append(p)
    assert len({tuple(v) for v in per_row.values()}) == 5  # each row its own draw, not one shared pattern
    # datasets reads the whole stage in input order: row by row, each row's positions ascending
    import datasets
    ds = datasets.load_dataset("arrow", data_files=str(tmp_path / "b" / "extract" / "*" / "chunk_*.arrow"), split="train")
    assert list(zip(ds["id"], ds["position"])) == first
    assert [i for i, _ in first] == sorted(i for i, _ in first) and all(v == sorted(v) for v in per_row.values())


def test_two_processes_and_a_killed_run_resumed_read_the_same_positions(tmp_path, offline_cache, tiny_adapter_dir):
    """Under ``run``: verbalize's units are counted in extract's input rows while its files hold one
    row per position; a resume after SIGKILL must still accept the finished files and redo the rest."""
    from tests.test_resume import cli, kill_when

    inputs = tmp_path / "in"
    write_parquet(inputs / "docs.parquet", {"text": [LONG + f" {i}" for i in range(6)]})
    extra = ("data.format=text", "extract.positions=random", "extract.positions_per_row=3")

    def rows(out):
        acts = [(r["id"], r["position"], r["token_id"]) for r in output_rows(out / "extract")]
        expl = [(r["id"], r["position"], r["explanation"]) for f in sorted((out / "verbalize").rglob("chunk_*.parquet"))
                for r in pq.read_table(f).to_pylist()]
        return acts, expl

    cli(offline_cache, "run", inputs, tmp_path / "one", *extra)
    one = rows(tmp_path / "one")
    assert len(one[0]) == len(one[1]) == 18
    cli(offline_cache, "run", inputs, tmp_path / "two", *extra, procs=2)
    assert rows(tmp_path / "two") == one
    killed = tmp_path / "killed"
    kill_when(offline_cache, "run", inputs, killed, "verbalize/*/chunk_*.parquet", 1, *extra, hook="chunk_delay@0=0.5")
    proc = cli(offline_cache, "run", inputs, killed, *extra)
    assert "it will be written again" not in proc.stderr  # finished files were valid, not redone
    assert rows(killed) == one


def test_a_row_with_no_eligible_position_is_an_error_row_and_the_run_goes_on(tmp_path, capsys):
    path = write_parquet(tmp_path / "in.parquet", {"text": ["short", LONG], "id": ["s", "l"]})
    assert main(extract_argv(tmp_path, path, **{"data.format": "text", "extract.positions": "random"})) == 0
    rows = output_rows(tmp_path / "extract")
    short = [r for r in rows if r["id"] == "s"]
    assert len(short) == 1 and short[0]["activation"] is None and short[0]["position"] is None
    assert short[0]["error"].startswith("no position at index >= extract.min_position=50 (the row has ")
    assert len([r for r in rows if r["id"] == "l"]) == 10
    log = (tmp_path / "extract" / "logs" / "rank00000.log").read_text()
    assert "row 0 (id s): no position at index >= extract.min_position=50" in log


def test_explicit_positions_bad_rows_and_column_checks(tmp_path, capsys):
    path = write_parquet(tmp_path / "in.parquet", {"prompt": ["one", "two", "three"],
                                                    "where": [[-1], None, [99_999]]})
    over = {"extract.positions": "column", "extract.positions_column": "where"}
    expect_error(capsys, extract_argv(tmp_path, path, **over), str(path), "row 1: where is null",
                 "data.on_bad_row=skip")
    assert main(extract_argv(tmp_path, path, **over, **{"data.on_bad_row": "skip"}) + ["--overwrite"]) == 0
    rows = output_rows(tmp_path / "extract")
    assert [r["error"] is None for r in rows] == [True, False, False]
    assert rows[1]["error"] == "bad row: where is null (column 'where')"
    assert rows[2]["error"].startswith("none of the positions [99999] is inside the row's")
    assert rows[0]["position"] == rows[0]["n_tokens"] - 1
    for columns, words in (({"prompt": ["x"]}, ["no column 'where'", "extract.positions_column"]),
                           ({"prompt": ["x"], "where": ["0"]}, ["'where' holds string", "lists of integers"])):
        bad = write_parquet(tmp_path / "bad.parquet", columns)
        capsys.readouterr()
        expect_error(capsys, extract_argv(tmp_path / "b", bad, **over), str(bad), *words)


def test_mode_all_writes_a_long_row_in_record_batches_of_bounded_size(tmp_path, tokenizer, capsys):
    """Bounded memory for any document length: a row's vectors go to the file piece by piece (each
    record batch at most one batch budget of vectors), and no forward is fed more than the budget."""
    text = " ".join([LONG] * 4)
    n = len(tokenizer(text, add_special_tokens=True)["input_ids"])
    budget = 128
    assert n > 8 * budget
    path = write_parquet(tmp_path / "in.parquet", {"text": [text, "tiny", text[:300]]})
    assert main(extract_argv(tmp_path, path, **{"data.format": "text", "extract.positions": "all",
                                                "extract.max_batch_tokens": budget, "data.chunk_rows": 3})) == 0
    (f,) = sorted((tmp_path / "extract").rglob("chunk_*.arrow"))
    reader = pa.ipc.open_stream(pa.memory_map(str(f)))
    sizes = [b.num_rows for b in reader]
    assert sum(sizes) > n and max(sizes) <= 4 * budget and len(sizes) >= n // budget
    assert reader.schema.metadata[b"input_rows"] == b"3"
    # The finished chunk counts as its 3 input rows on resume (not as its thousand-odd vectors).
    capsys.readouterr()
    assert main(extract_argv(tmp_path, path, **{"data.format": "text", "extract.positions": "all",
                                                "extract.max_batch_tokens": budget, "data.chunk_rows": 3})) == 0
    out = capsys.readouterr()
    assert "1 already done, 0 to do" in out.out + out.err and "written again" not in out.out + out.err


def test_verbalize_and_score_carry_position_and_token_id(tmp_path, tokenizer):
    """A run with a reconstructor: every later output row keys back to its (id, position), and the
    README's join gives each explanation its token."""
    import pandas as pd

    path = write_parquet(tmp_path / "in.parquet", {"text": [LONG, "short text"], "id": ["a", "b"]})
    argv = ["run", "--config", TINY_CONFIG, *tiny_overrides(tmp_path, **{
        "data.paths": f"[{path}]", "data.format": "text", "extract.positions": "random",
        "extract.positions_per_row": 3, "model.reconstructor": "builtin:tiny-ar", "generation.max_new_tokens": 4})]
    assert main(argv) == 0
    acts = pd.DataFrame(output_rows(tmp_path / "extract"))[["id", "position", "token_id", "error"]]
    expl = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "verbalize").rglob("chunk_*.parquet")))
    score = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "score").rglob("chunk_*.parquet")))
    assert len(acts) == 4 and acts["error"].notna().sum() == 1  # "short text" has no index >= 50
    for out in (expl, score):
        assert out["id"].tolist() == acts["id"].tolist()
        assert out["position"].astype("Int64").tolist() == acts["position"].astype("Int64").tolist()
        assert out["token_id"].astype("Int64").tolist() == acts["token_id"].astype("Int64").tolist()
    assert score["fve"].notna().sum() == 3
    assert pq.read_schema(next((tmp_path / "score").rglob("chunk_*.parquet"))).field("position").type == pa.int32()
    # The README's join back to the text: explanations with their scores, and the token each was read at.
    rows = expl.merge(score[["id", "position", "cosine", "fve"]], on=["id", "position"])
    assert len(rows) == 4 and rows["explanation"].notna().all()
    rows = rows[rows["error"].isna()].astype({"position": "int32", "token_id": "int32"})
    rows["token"] = [tokenizer.decode([t]) for t in rows["token_id"]]
    ids = tokenizer(LONG, add_special_tokens=True)["input_ids"]
    assert len(rows) == 3 and (rows["id"] == "a").all()
    assert [tokenizer.decode([ids[p]]) for p in rows["position"]] == rows["token"].tolist()
