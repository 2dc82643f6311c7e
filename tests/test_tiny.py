"""The offline stand-ins: the real Qwen2.5 tokenizer and the tiny model's shape and generation config."""
import json
from pathlib import Path


def test_injection_char_is_one_token(tokenizer):
    assert tokenizer.encode("㈎", add_special_tokens=False) == [149705]


def test_known_ids(tokenizer):
    assert tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    # Neighbours of ㈎ in the verbalizer prompt, as NOTES.md gives them.
    assert tokenizer.encode(">", add_special_tokens=False) == [29]
    assert tokenizer.encode("</", add_special_tokens=False) == [522]
    assert tokenizer.encode("Hello world") == [9707, 1879]  # Qwen adds no BOS


def test_chat_template_inserts_default_system_message(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # Token ids of the system block as Qwen2.5's own tokenizer produces them (public server debug log).
    assert tokenizer(text)["input_ids"][:21] == [151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364,
                                                 14817, 13, 1446, 525, 264, 10950, 17847, 13, 151645, 198]
    assert tokenizer(text)["input_ids"][-3:] == [151644, 77091, 198]


def test_tiny_model_shape(tiny_model_dir):
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    assert config["num_hidden_layers"] == 28
    assert config["vocab_size"] == 152064
    gen = json.loads((Path(tiny_model_dir) / "generation_config.json").read_text())
    # Qwen2.5-7B-Instruct's generation_config.json, as NOTES.md quotes it.
    expected = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                "eos_token_id": [151645, 151643], "pad_token_id": 151643}
    for key, value in expected.items():
        assert gen[key] == value, key


def test_an_interrupted_build_is_reported_not_loaded(tmp_path):
    import pytest

    from pipeline.errors import PipelineError
    from pipeline.models.tiny import build_tiny_model

    half = tmp_path / "tiny"
    half.mkdir()
    (half / "tokenizer.json").write_text("{}")  # a directory left without its config
    with pytest.raises(PipelineError, match="incomplete"):
        build_tiny_model(half)


def test_builtin_names_cover_each_architecture(tiny_model_dir, tmp_path):
    import pytest

    from pipeline.errors import PipelineError
    from pipeline.models.tiny import BUILTINS, TINY_ARCHS, build_tiny_model, resolve_builtin

    assert set(TINY_ARCHS) == {"qwen2", "qwen3", "llama", "gemma3"}
    for arch in ("", *(f"-{a}" for a in TINY_ARCHS)):
        for kind in ("", "-lora", "-ar", "-ar-lora"):
            assert f"builtin:tiny{arch}{kind}" in BUILTINS
    assert resolve_builtin("builtin:tiny-qwen2") == tiny_model_dir  # builtin:tiny is the Qwen2
    with pytest.raises(PipelineError, match="unknown built-in model 'builtin:tiny-gpt2'"):
        resolve_builtin("builtin:tiny-gpt2")
    with pytest.raises(PipelineError, match="unknown tiny architecture 'gpt2'"):
        build_tiny_model(tmp_path / "x", arch="gpt2")
