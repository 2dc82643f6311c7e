"""Input shards: default ids, duplicate ids, string-like prompt columns (no model involved)."""
import logging

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config import DataConfig
from pipeline.errors import PipelineError
from pipeline.io.shards import plan_chunks, read_prompts, resolve_shards
from tests.conftest import TINY_CONFIG, tiny_overrides, write_parquet


def all_ids(data_cfg):
    return [i for c in plan_chunks(resolve_shards(data_cfg), 2) for i in read_prompts(c, data_cfg)[0]]


def test_default_ids_differ_across_files_with_the_same_name(tmp_path):
    from pipeline.io.shards import find_duplicate_ids

    write_parquet(tmp_path / "en" / "train.parquet", {"prompt": ["a", "b", "c"]})
    write_parquet(tmp_path / "de" / "train.parquet", {"prompt": ["x", "y"]})
    cfg = DataConfig(paths=[str(tmp_path / "en" / "train.parquet"), str(tmp_path / "de" / "train.parquet")])
    assert all_ids(cfg) == ["00000-train:0", "00000-train:1", "00000-train:2", "00001-train:0", "00001-train:1"]
    assert find_duplicate_ids(resolve_shards(cfg), cfg) == (0, None)  # generated ids are never read


def test_duplicate_ids_are_counted_as_read_prompts_writes_them(tmp_path):
    from pipeline.io.shards import find_duplicate_ids

    write_parquet(tmp_path / "a.parquet", {"id": ["x", "y", "z", "1"], "prompt": ["p"] * 4}, row_group_size=2)
    write_parquet(tmp_path / "b.parquet", {"id": [1, 2, 3], "prompt": ["p"] * 3})  # 1 is written as '1'
    pd.DataFrame({"id": pd.Categorical(["z", "w", "x", "x"]), "prompt": ["p"] * 4}).to_parquet(tmp_path / "c.parquet")
    write_parquet(tmp_path / "d.parquet", {"prompt": ["p"] * 3})  # generated ids: unique
    cfg = DataConfig(paths=[str(tmp_path / "*.parquet")])
    assert find_duplicate_ids(resolve_shards(cfg), cfg) == (4, "x")  # '1' once, 'z' once, 'x' twice
    cfg = DataConfig(paths=[str(tmp_path / "b.parquet"), str(tmp_path / "d.parquet")])
    assert find_duplicate_ids(resolve_shards(cfg), cfg) == (0, None)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_duplicate_ids_in_a_run_give_one_warning_with_a_count(tmp_path):
    write_parquet(tmp_path / "in" / "a.parquet", {"id": ["r0", "r1", "r2"], "prompt": ["one", "two", "three"]})
    write_parquet(tmp_path / "in" / "b.parquet", {"id": ["r2", "r3", "r0", "r0"], "prompt": ["4", "5", "6", "7"]})
    # The module's own logger: an in-process CLI run replaces the handlers of "pipeline" and stops propagation.
    logger, collect = logging.getLogger("pipeline.io.shards"), Collect()
    logger.addHandler(collect)
    try:
        overrides = tiny_overrides(tmp_path, **{"data.paths": f"[{tmp_path / 'in' / '*.parquet'}]"})
        assert main(["extract", "--config", TINY_CONFIG, *overrides]) == 0
    finally:
        logger.removeHandler(collect)
    warnings = [r.getMessage() for r in collect.records if "share an id" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("data: 3 row(s) share an id with an earlier row (e.g. 'r0')")
    assert "data.id_column" in warnings[0]


@pytest.mark.parametrize("column", [
    pa.array(["a", "b", "a"], pa.string_view()),
    pa.array(["a", "b", "a"], pa.string()).dictionary_encode(),
], ids=["string_view", "dictionary"])
def test_string_like_prompt_columns_are_read_as_str(tmp_path, column):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": column, "id": column}), path, row_group_size=2)
    assert pq.read_schema(path).field("prompt").type == column.type
    cfg = DataConfig(paths=[str(path)])
    chunks = plan_chunks(resolve_shards(cfg), 2)
    got = [read_prompts(c, cfg) for c in chunks]
    assert [p for _, ps in got for p in ps] == ["a", "b", "a"]
    assert all(type(p) is str and type(i) is str for ids, ps in got for i, p in zip(ids, ps))


def test_dictionary_of_non_strings_is_still_refused(tmp_path):
    pq.write_table(pa.table({"prompt": pa.array([1, 2, 1]).dictionary_encode()}), tmp_path / "in.parquet")
    with pytest.raises(PipelineError, match="not strings"):
        resolve_shards(DataConfig(paths=[str(tmp_path / "in.parquet")]))
