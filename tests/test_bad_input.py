"""Bad input: one readable line naming the file, row or key; exit status 1; no file under a final name."""
import json
import shutil

import numpy as np
import pytest

from pipeline.cli import main
from tests.conftest import TINY_CONFIG, tiny_overrides, write_parquet
from tests.test_verbalize import write_activation_dir


def final_files(root):
    return [p for p in root.rglob("chunk_*") if not p.name.startswith(".")] if root.exists() else []


def expect_error(capsys, argv, *words):
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def extract_argv(tmp_path, paths, **extra):
    return ["extract", "--config", TINY_CONFIG, *tiny_overrides(tmp_path, **{"data.paths": paths, **extra})]


def test_missing_prompt_column(tmp_path, capsys):
    f = write_parquet(tmp_path / "in.parquet", {"text": ["hi"]})
    expect_error(capsys, extract_argv(tmp_path, f"[{f}]"), str(f), "'prompt'", "data.prompt_column")
    assert not final_files(tmp_path / "extract")


def test_non_string_prompt_column(tmp_path, capsys):
    f = write_parquet(tmp_path / "in.parquet", {"prompt": [1, 2]})
    expect_error(capsys, extract_argv(tmp_path, f"[{f}]"), str(f), "not strings")


def test_null_prompt_names_its_row(tmp_path, capsys):
    f = write_parquet(tmp_path / "in.parquet", {"prompt": ["fine", None, "fine"]})
    expect_error(capsys, extract_argv(tmp_path, f"[{f}]"), str(f), "row 1")
    assert not final_files(tmp_path / "extract")


def test_file_that_is_not_parquet(tmp_path, capsys):
    f = tmp_path / "in.parquet"
    f.write_text("id,prompt\n1,hello\n")
    expect_error(capsys, extract_argv(tmp_path, f"[{f}]"), str(f), "not a readable Parquet file")


def test_empty_glob(tmp_path, capsys):
    expect_error(capsys, extract_argv(tmp_path, f"[{tmp_path}/nothing/*.parquet]"), "matched no files")


def test_model_path_that_does_not_exist(tmp_path, capsys):
    argv = extract_argv(tmp_path, "[]", **{"model.base": str(tmp_path / "no-such-model")})
    expect_error(capsys, argv, "model.base", "does not exist")
    assert not final_files(tmp_path / "extract")


def test_hub_model_without_network(tmp_path, capsys):
    # HF_HUB_OFFLINE=1 (set for the whole session) is how "no network" looks to huggingface_hub.
    argv = extract_argv(tmp_path, "[]", **{"model.base": "Qwen/Qwen2.5-7B-Instruct"})
    expect_error(capsys, argv, "model.base", "Qwen/Qwen2.5-7B-Instruct", "network")


def test_unknown_override_key(tmp_path, capsys):
    expect_error(capsys, ["extract", "--config", TINY_CONFIG, "extract.layr=3"], "extract.layr")


# --- stage 2 -------------------------------------------------------------------------------------

def verbalize_argv(tmp_path, input_dir, **extra):
    return ["verbalize", "--config", TINY_CONFIG,
            *tiny_overrides(tmp_path, **{"verbalize.input_dir": str(input_dir), **extra})]


@pytest.fixture
def acts(tmp_path):
    return write_activation_dir(tmp_path / "acts", np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32))


def test_no_activation_files(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    expect_error(capsys, verbalize_argv(tmp_path, tmp_path / "empty"), "no activation files", "run extract first")


def test_activation_width_differs_from_d_model(tmp_path, capsys):
    write_activation_dir(tmp_path / "acts", np.ones((2, 32), dtype=np.float32))
    expect_error(capsys, verbalize_argv(tmp_path, tmp_path / "acts"), "chunk_00000.arrow", "width 32", "d_model 64")
    assert not final_files(tmp_path / "verbalize")


def test_adapter_path_that_does_not_exist(tmp_path, acts, capsys):
    argv = verbalize_argv(tmp_path, acts, **{"model.adapter": str(tmp_path / "no-adapter")})
    expect_error(capsys, argv, "model.adapter", "does not exist")
    assert not final_files(tmp_path / "verbalize")


def test_adapter_for_another_base_is_refused_then_allowed(tmp_path, acts, tiny_adapter_dir, capsys):
    other = tmp_path / "other-adapter"
    shutil.copytree(tiny_adapter_dir, other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/another-model"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    argv = verbalize_argv(tmp_path, acts, **{"model.adapter": str(other), "generation.max_new_tokens": 4})
    expect_error(capsys, argv, "someone/another-model", "model.allow_adapter_base_mismatch")
    assert not final_files(tmp_path / "verbalize")
    assert main(argv + ["model.allow_adapter_base_mismatch=true"]) == 0
    assert "someone/another-model" in capsys.readouterr().err  # warned loudly
    assert len(final_files(tmp_path / "verbalize")) == 1


@pytest.mark.parametrize("template, count", [("no injection here, depth {depth_pct}%", 0),
                                             ("<concept>{injection_char}</concept> and ㈎ again", 2)])
def test_template_needs_exactly_one_injection_token(tmp_path, acts, capsys, template, count):
    argv = verbalize_argv(tmp_path, acts, **{"verbalizer.prompt_template": json.dumps(template)})
    expect_error(capsys, argv, "verbalizer.prompt_template", f"occurs {count} times")
    assert not final_files(tmp_path / "verbalize")


def test_neighbour_check(tmp_path, acts, capsys):
    argv = verbalize_argv(tmp_path, acts, **{"verbalizer.neighbor_token_ids": "[1, 2]"})
    expect_error(capsys, argv, "neighbor_token_ids", "[29, 522]")


def test_layer_outside_the_model(tmp_path, capsys):
    expect_error(capsys, extract_argv(tmp_path, "[]", **{"extract.layer": 40}), "extract.layer=40", "28 layers")
    assert not final_files(tmp_path / "extract")


def test_injection_char_that_is_not_one_token(tmp_path, acts, capsys):
    argv = verbalize_argv(tmp_path, acts, **{"verbalizer.injection_char": "㈎㈎"})
    expect_error(capsys, argv, "verbalizer.injection_char", "2 tokens")


def test_config_inherit_loop(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    expect_error(capsys, ["status", "--config", str(tmp_path / "a.yaml")], "loops back")


def test_file_unreadable_mid_run_keeps_the_rows_in_flight(tmp_path, capsys, monkeypatch):
    """A chunk that fails to read after planning stops the intake; the chunk whose rows were already
    decoding is finished and written, then the error is reported."""
    import pipeline.stages.verbalize
    from pipeline.errors import PipelineError

    real = pipeline.stages.verbalize.read_activations

    def flaky(path, **kw):
        if path.name == "chunk_00001.arrow":
            raise PipelineError(f"{path}: not a readable activation file (simulated)")
        return real(path, **kw)

    monkeypatch.setattr(pipeline.stages.verbalize, "read_activations", flaky)
    write_activation_dir(tmp_path / "acts", np.random.default_rng(1).normal(size=(9, 64)).astype(np.float32) * 50,
                         chunk_rows=4)
    argv = verbalize_argv(tmp_path, tmp_path / "acts", **{"verbalize.batch_size": 4, "generation.max_new_tokens": 6})
    expect_error(capsys, argv, "chunk_00001.arrow", "simulated")
    assert [p.name for p in final_files(tmp_path / "verbalize")] == ["chunk_00000.parquet"]


# --- output directories, --overwrite ---------------------------------------------------------------

def test_overwrite_refuses_a_directory_that_is_not_this_stages_output(tmp_path, capsys):
    """extract.output_dir pointed by mistake at the folder that holds the inputs."""
    f = write_parquet(tmp_path / "data" / "in.parquet", {"prompt": ["hi", "there"]})
    (tmp_path / "data" / "notes.txt").write_text("mine")
    argv = ["extract", "--config", TINY_CONFIG, f"data.paths=[{f}]", f"extract.output_dir={tmp_path / 'data'}",
            f"verbalize.output_dir={tmp_path / 'v'}", "--overwrite"]
    expect_error(capsys, argv, "--overwrite refused", "extract.output_dir", "in.parquet")
    assert f.exists() and (tmp_path / "data" / "notes.txt").read_text() == "mine"
    assert not final_files(tmp_path / "data")


def test_overwrite_refuses_the_other_stages_output(tmp_path, capsys):
    f = write_parquet(tmp_path / "in.parquet", {"prompt": ["hi", "there"]})
    base = ["--config", TINY_CONFIG, f"data.paths=[{f}]", "generation.max_new_tokens=3"]
    assert main(["run", *base, *tiny_overrides(tmp_path)]) == 0
    capsys.readouterr()
    # The verbalize output given as extract's output directory, then --overwrite.
    argv = ["extract", *base, f"extract.output_dir={tmp_path / 'verbalize'}", f"verbalize.output_dir={tmp_path / 'v2'}",
            "--overwrite"]
    expect_error(capsys, argv, "--overwrite refused", "holds verbalize output, not extract output")
    assert len(final_files(tmp_path / "verbalize")) == 1


def test_overwrite_deletes_only_what_the_stage_wrote(tmp_path, capsys):
    """extract.output_dir is the parent of verbalize.output_dir, and holds a file of the user's."""
    import pyarrow.parquet as pq

    f = write_parquet(tmp_path / "in.parquet", {"prompt": ["hi", "there"]})
    out = tmp_path / "out"
    base = ["--config", TINY_CONFIG, f"data.paths=[{f}]", "generation.max_new_tokens=3",
            f"extract.output_dir={out}", f"verbalize.output_dir={out / 'verbalize'}", f"score.output_dir={out / 'score'}"]
    assert main(["run", *base]) == 0
    (out / "README.txt").write_text("my notes")
    (out / "00000-in" / "plot.png").write_bytes(b"png")  # a user's file inside a shard directory
    before = pq.read_table(out / "verbalize" / "00000-in" / "chunk_00000.parquet")
    assert main(["extract", *base, "extract.output_dtype=float16", "--overwrite"]) == 0
    assert (out / "README.txt").read_text() == "my notes" and (out / "00000-in" / "plot.png").exists()
    assert pq.read_table(out / "verbalize" / "00000-in" / "chunk_00000.parquet").equals(before)
    assert "float16" in (out / "_fingerprint.json").read_text()
    assert (out / "00000-in" / "chunk_00000.arrow").exists() and (out / "00000-in" / "_COMPLETE").exists()


def test_two_stages_cannot_share_an_output_directory(tmp_path, capsys):
    argv = ["run", "--config", TINY_CONFIG, f"extract.output_dir={tmp_path}", f"verbalize.output_dir={tmp_path}/"]
    expect_error(capsys, argv, "extract.output_dir", "verbalize.output_dir", "same directory")


def test_an_empty_activation_file_is_one_line(tmp_path, acts, capsys):
    (acts / "00000-test" / "chunk_00001.arrow").write_bytes(b"")  # a crash left a final name, no bytes
    expect_error(capsys, verbalize_argv(tmp_path, acts), "chunk_00001.arrow", "not a readable activation file",
                 "run extract again")
    assert not final_files(tmp_path / "verbalize")
