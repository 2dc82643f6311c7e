"""Config loading: YAML, dotted overrides, inheritance, and refusal of unknown keys and bad values."""
import pytest

from pipeline.config import describe_keys, fingerprint, load_config
from pipeline.errors import PipelineError
from tests.conftest import REPO

REAL = str(REPO / "configs" / "qwen2.5-7b-l20-av-v2.yaml")


def test_real_config_holds_the_protocol():
    cfg = load_config(REAL)
    assert cfg.model.base == "Qwen/Qwen2.5-7B-Instruct"
    assert cfg.model.adapter == "anicka/nla-qwen2.5-7b-L20-av-v2"
    assert cfg.extract.layer == 20
    assert cfg.verbalizer.injection_char == "㈎" and cfg.verbalizer.injection_norm == 150.0
    assert "{depth_pct}%" in cfg.verbalizer.prompt_template and cfg.verbalizer.prompt_template.endswith("<explanation>")
    assert cfg.verbalizer.chat_template is False and cfg.verbalizer.add_special_tokens is True
    g = cfg.generation
    assert (g.max_new_tokens, g.do_sample, g.repetition_penalty) == (120, False, 1.05)
    assert g.eos_token_ids == [151645, 151643] and g.pad_token_id == 151643
    assert cfg.verbalizer.stop_string == "</explanation>"


def test_overrides_are_typed_and_dotted():
    cfg = load_config(REAL, ["model.dtype=float32", "data.paths=[a.parquet, b/*.parquet]", "data.chunk_rows=8",
                             "verbalizer.injection_norm=100", "verbalizer.stop_string=null"])
    assert cfg.model.dtype == "float32"
    assert cfg.data.paths == ["a.parquet", "b/*.parquet"]
    assert cfg.data.chunk_rows == 8
    assert cfg.verbalizer.injection_norm == 100.0
    assert cfg.verbalizer.stop_string is None


def test_tiny_config_inherits_the_real_protocol():
    real, tiny = load_config(REAL), load_config(str(REPO / "configs" / "tiny.yaml"))
    assert tiny.model.base == "builtin:tiny"
    assert tiny.verbalizer == real.verbalizer and tiny.generation == real.generation


@pytest.mark.parametrize("override, words", [
    ("model.nope=1", "model.nope"),
    ("nope=1", "nope"),
    ("model.dtype=float8", "model.dtype"),
    ("data.chunk_rows=abc", "data.chunk_rows"),
    ("data.chunk_rows=0", "data.chunk_rows"),
    ("model.dtype", "key=value"),
    ("verbalize.engine=vllms", "verbalize.engine"),
    ("vllm.lora=both", "vllm.lora"),
    ("vllm.max_num_seqs=0", "vllm.max_num_seqs"),
    ("vllm.max_model_len=-5", "vllm.max_model_len"),
    ("vllm.gpu_memory_utilization=1.5", "vllm.gpu_memory_utilization"),
    ("vllm.gpu_memory_utilization=0", "vllm.gpu_memory_utilization"),
    ("vllm.enable_prefix_caching=maybe", "vllm.enable_prefix_caching"),
    ("vllm.tensor_parallel_size=2", "vllm.tensor_parallel_size"),
])
def test_bad_keys_are_refused_by_name(override, words):
    with pytest.raises(PipelineError, match=words.replace(".", r"\.")):
        load_config(REAL, [override])


def test_unknown_key_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extract:\n  layerz: 3\n")
    with pytest.raises(PipelineError, match=r"extract\.layerz"):
        load_config(str(bad))


def test_every_key_is_documented():
    for line in describe_keys().splitlines():
        key, *_rest = line.split()
        assert len(line.split(None, 2)) == 3, f"{key} has no doc"


def test_fingerprint_changes_with_settings():
    assert fingerprint({"a": 1}) == fingerprint({"a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_readme_documents_every_key():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for line in describe_keys().splitlines():
        key = line.split()[0]
        assert f"| `{key}` |" in readme, f"{key} is missing from the README's key table"


def test_the_kitft_config_leaves_the_sidecar_its_keys():
    """The release pair's config sets how the prompt is wrapped and cut, and leaves to nla_meta.yaml
    every value the sidecar holds (each would otherwise override it)."""
    cfg = load_config(str(REPO / "configs" / "kitft-qwen2.5-7b-l20.yaml"))
    assert cfg.model.verbalizer == "kitft/nla-qwen2.5-7b-L20-av" and cfg.model.adapter is None
    assert cfg.model.reconstructor == "kitft/nla-qwen2.5-7b-L20-ar"
    assert (cfg.verbalizer.chat_template, cfg.verbalizer.add_special_tokens) == (True, False)
    assert (cfg.verbalizer.start_string, cfg.verbalizer.stop_string) == ("<explanation>", "</explanation>")
    for key in ("verbalizer.prompt_template", "verbalizer.injection_char", "verbalizer.injection_token_id",
                "verbalizer.neighbor_token_ids", "verbalizer.injection_norm", "extract.layer",
                "generation.eos_token_ids", "reconstructor.prompt_template"):
        assert not cfg.is_set(key), key
