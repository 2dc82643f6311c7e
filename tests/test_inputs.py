"""Inputs as users have them (issue 11): changed input files; more to come (formats, bad rows, long rows)."""
import json

from pipeline.cli import main
from tests.conftest import TINY_CONFIG, tiny_overrides, write_parquet
from tests.test_bad_input import expect_error


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
