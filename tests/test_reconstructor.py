"""The activation reconstructor against a plain one-example reference, its sidecar precedence and its
refusals of bad checkpoints (each a one-line PipelineError naming the key or the file)."""
import json
import math
import os
import shutil

import pytest
import torch
import yaml

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.models.reconstructor import (DEFAULT_TEMPLATE, check_width, load_reconstructor, reconstruct,
                                    resolve_reconstructor)
from tests.ar_reference import reference_prediction
from tests.conftest import TINY_CONFIG

CPU = torch.device("cpu")
LONG = " ".join(f"idea{i}: the {i}th thought, 你好 🙂." for i in range(40))  # 400+ tokens
EXPLANATIONS = [
    "",
    LONG,
    "Объясни квантовую запутанность. 東京の天気は？ مرحبا بالعالم 🎉🥳👩‍🔬",
    "literal {explanation} and {braces}, {} {{x}} %s {0}",
    "A cat sitting on a mat.",
    "A cat sitting on a mat.",  # duplicate: two rows, the same prediction
    " leading space",
    ">>> opens with the tag's own character",
    "</text> <summary> tags inside the explanation",
    "\n\nblank lines first",
    "a",
    "code: def f(x): return {'k': x}",
]


# The tiny config with every reconstructor.* key at its default, whatever configs/tiny.yaml sets there.
RESET = ["reconstructor.prompt_template=null", "reconstructor.layer=null", "reconstructor.mse_scale=null",
         "reconstructor.add_special_tokens=true"]


def ar_config(reconstructor: str, *overrides: str):
    return load_config(TINY_CONFIG, [*RESET, f"model.reconstructor={reconstructor}", *overrides])


@pytest.fixture(scope="session")
def value_head_ar(tiny_ar_dir):
    cfg = ar_config("builtin:tiny-ar")
    return load_reconstructor(cfg, resolve_reconstructor(cfg), CPU)


@pytest.fixture(scope="session")
def lora_ar(tiny_ar_lora_dir):
    cfg = ar_config("builtin:tiny-ar-lora")
    return load_reconstructor(cfg, resolve_reconstructor(cfg), CPU)


def _copy_or_link(src: str, dst: str) -> None:
    """The 80 MB weights are linked (no test writes them); every other file is a real copy to edit."""
    if os.path.basename(src) == "model.safetensors":
        os.symlink(src, dst)
    else:
        shutil.copy(src, dst)


@pytest.fixture
def ar_copy(tmp_path, tiny_ar_dir):
    """A copy of the tiny value-head AR to break."""
    return shutil.copytree(tiny_ar_dir, tmp_path / "ar", copy_function=_copy_or_link)


def assert_matches(got: torch.Tensor, refs: list[torch.Tensor], texts: list[str]) -> None:
    assert got.dtype == torch.float32 and got.shape == (len(refs), refs[0].shape[0])
    for i, ref in enumerate(refs):
        rel = ((got[i] - ref).abs().max() / ref.norm()).item()
        assert rel <= 1e-5, (i, texts[i][:40], rel)


def test_value_head_ar_matches_the_reference(value_head_ar, tiny_ar_dir):
    spec = value_head_ar.spec
    assert (spec.format, spec.layer, spec.mse_scale, spec.d_model) == ("value_head", 20, 8.0, 64)
    assert spec.sources == {"template": "nla_meta.yaml", "layer": "nla_meta.yaml", "mse_scale": "nla_meta.yaml"}
    assert spec.template == DEFAULT_TEMPLATE and spec.source == tiny_ar_dir
    assert len(value_head_ar.trunk.layers) == 21 and value_head_ar.value_head.bias is None
    got, stats, errors = reconstruct(value_head_ar, EXPLANATIONS, max_batch_tokens=64)  # several batches
    assert errors == {} and stats["error_rows"] == 0
    assert stats["tokens"] > 500 and stats["reused_tokens"] > 0
    refs = [reference_prediction(tiny_ar_dir, e, DEFAULT_TEMPLATE, 20) for e in EXPLANATIONS]
    assert_matches(got, refs, EXPLANATIONS)
    assert torch.equal(got[4], got[5])
    assert got.norm(dim=1).min() > 1.0  # not degenerate
    assert not torch.allclose(got[4], got[10])


def test_lora_ar_matches_the_reference(lora_ar, tiny_model_dir, tiny_ar_lora_dir):
    spec = lora_ar.spec
    assert (spec.format, spec.layer, spec.mse_scale, spec.d_model) == ("lora", 20, 8.0, 64)
    assert spec.sources == {"template": "default", "layer": "default", "mse_scale": "default"}
    assert lora_ar.value_head is None and len(lora_ar.trunk.layers) == 21
    got, stats, errors = reconstruct(lora_ar, EXPLANATIONS, max_batch_tokens=4096)
    assert errors == {} and stats["reused_tokens"] > 0
    refs = [reference_prediction((tiny_model_dir, tiny_ar_lora_dir), e, DEFAULT_TEMPLATE, 20) for e in EXPLANATIONS]
    assert_matches(got, refs, EXPLANATIONS)
    assert torch.equal(got[4], got[5])


def test_the_template_opening_is_computed_once_and_only_suffixes_are_fed(value_head_ar, tiny_ar_dir):
    """Each row goes through the trunk as its tokens after the cached opening; one whose tokens differ
    there (here: a template whose head the explanation can merge with) runs whole and is still right."""
    recon = value_head_ar
    tok, prefix = recon.tokenizer, recon.prefix
    assert tok.decode(prefix.ids) == "Summary of the following text: <text"  # the '>' joins the explanation
    texts = ["short", LONG, "A cat sitting on a mat."]
    ids = tok([DEFAULT_TEMPLATE.replace("{explanation}", t) for t in texts])["input_ids"]
    widths = []
    handle = recon.trunk.layers[0].register_forward_pre_hook(
        lambda mod, args, kw: widths.append((args or [kw["hidden_states"]])[0].shape[1]), with_kwargs=True)
    try:
        got, stats, _ = reconstruct(recon, texts, max_batch_tokens=1 << 20)
    finally:
        handle.remove()
    assert stats["reused_tokens"] == prefix.length * 3
    assert max(len(t) for t in ids) not in widths and max(len(t) for t in ids) - prefix.length in widths
    refs = [reference_prediction(tiny_ar_dir, t, DEFAULT_TEMPLATE, 20) for t in texts]
    assert_matches(got, refs, texts)


def test_config_values_win_over_the_sidecar_and_a_seam_mismatch_runs_whole(tiny_ar_dir):
    """Every config value wins. The template's opening 'Read this text' is cached, but 'text' + 'ual'
    tokenizes as ' textual': those rows' tokens do not start with the cached ones, and they run whole."""
    template = "Read this text{explanation} -> vector:"
    cfg = ar_config("builtin:tiny-ar", f"reconstructor.prompt_template='{template}'", "reconstructor.layer=10",
                    "reconstructor.mse_scale=3", "reconstructor.add_special_tokens=false")
    spec = resolve_reconstructor(cfg)
    assert (spec.template, spec.layer, spec.mse_scale, spec.add_special_tokens) == (template, 10, 3.0, False)
    assert spec.sources == {"template": "config", "layer": "config", "mse_scale": "config"}
    recon = load_reconstructor(cfg, spec, CPU)
    assert len(recon.trunk.layers) == 11  # truncated to layer + 1
    texts = [" cat", "ual: a word", "book", *EXPLANATIONS[2:6]]
    ids = recon.tokenizer([template.replace("{explanation}", t) for t in texts], add_special_tokens=False)["input_ids"]
    plen = recon.prefix.length
    shared = [t[:plen] == recon.prefix.ids and len(t) > plen for t in ids]
    assert recon.tokenizer.decode(recon.prefix.ids) == "Read this text"
    assert not shared[1] and not shared[2] and sum(shared) >= 3
    got, stats, _ = reconstruct(recon, texts, max_batch_tokens=4096)
    assert stats["reused_tokens"] == plen * sum(shared)
    assert_matches(got, [reference_prediction(tiny_ar_dir, t, template, 10, add_special_tokens=False)
                         for t in texts], texts)
    settings = spec.settings()
    assert settings["reconstructor.prompt_template"] == template and settings["reconstructor.layer"] == 10
    assert settings != resolve_reconstructor(ar_config("builtin:tiny-ar")).settings()
    json.dumps(settings)


def edit_meta(ar_dir, edit) -> None:
    path = ar_dir / "nla_meta.yaml"
    meta = yaml.safe_load(path.read_text())
    edit(meta)
    path.write_text(yaml.safe_dump(meta, allow_unicode=True))


def test_sidecar_keys_in_their_other_places_and_the_defaults(ar_copy):
    def other_places(meta):
        del meta["critic"], meta["extraction"]["mse_scale"]
        meta["extraction_layer_index"] = 15
        meta["prompt_templates"] = {"reconstructor": "R: {explanation}", "critic": "C: {explanation}"}
        meta["future_key"] = {"unknown": True}  # tolerated

    edit_meta(ar_copy, other_places)
    spec = resolve_reconstructor(ar_config(str(ar_copy)))
    assert (spec.template, spec.layer, spec.mse_scale) == ("R: {explanation}", 15, math.sqrt(64))
    assert spec.sources == {"template": "nla_meta.yaml", "layer": "nla_meta.yaml", "mse_scale": "default"}
    edit_meta(ar_copy, lambda m: m.update(prompt_templates={"ar": "A: {explanation}"},
                                          extraction={"mse_scale": "sqrt_d_model"}))
    spec = resolve_reconstructor(ar_config(str(ar_copy)))
    assert (spec.template, spec.mse_scale, spec.sources["mse_scale"]) == ("A: {explanation}", 8.0, "nla_meta.yaml")
    (ar_copy / "nla_meta.yaml").unlink()
    spec = resolve_reconstructor(ar_config(str(ar_copy)))
    assert (spec.template, spec.layer, spec.mse_scale) == (DEFAULT_TEMPLATE, 20, 8.0)  # layer: config's last
    assert spec.sources == {"template": "default", "layer": "default", "mse_scale": "default"}


def test_a_lora_ar_may_carry_a_value_head(tmp_path, lora_ar, tiny_ar_lora_dir, tiny_ar_dir):
    from safetensors.torch import load_file

    lora = tmp_path / "lora-head"
    shutil.copytree(tiny_ar_lora_dir, lora)
    shutil.copy(f"{tiny_ar_dir}/value_head.safetensors", lora)
    cfg = ar_config(str(lora))
    spec = resolve_reconstructor(cfg)
    assert spec.format == "lora" and spec.value_head and spec.settings()["reconstructor.value_head"] is True
    texts = EXPLANATIONS[4:7]
    got, _, _ = reconstruct(load_reconstructor(cfg, spec, CPU), texts, max_batch_tokens=4096)
    hidden, _, _ = reconstruct(lora_ar, texts, max_batch_tokens=4096)  # the same adapter, without the head
    weight = load_file(str(lora / "value_head.safetensors"))["weight"]
    assert_matches(got, list(hidden @ weight.T), texts)


def test_rows_too_long_for_the_model_are_error_rows_and_no_rows_is_fine(value_head_ar):
    limit = value_head_ar.trunk.config.max_position_embeddings
    got, stats, errors = reconstruct(value_head_ar, ["a", "hello " * (limit + 5), "b"], max_batch_tokens=4096)
    assert list(errors) == [1] and "more than the model's maximum" in errors[1] and stats["error_rows"] == 1
    assert not got[1].any() and got[0].any() and got[2].any()
    got, stats, errors = reconstruct(value_head_ar, [], max_batch_tokens=4096)
    assert got.shape == (0, 64) and errors == {} and stats["tokens"] == 0


def test_check_width(value_head_ar):
    check_width(value_head_ar.spec, 64, "x.arrow")
    with pytest.raises(PipelineError, match=r"^x\.arrow: the reconstructor's d_model is 64, the vectors have 3584$"):
        check_width(value_head_ar.spec, 3584, "x.arrow")


def _save_head(path, **tensors):
    from safetensors.torch import save_file

    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path))


BROKEN = {
    "value head shape": (lambda d: _save_head(d / "value_head.safetensors", weight=(64, 32)),
                         r"value_head\.safetensors: .*\[64, 32\], expected \[64, 64\]"),
    "value head bias": (lambda d: _save_head(d / "value_head.safetensors", weight=(64, 64), bias=(32,)),
                        r"value_head\.safetensors: .*bias has shape \[32\], expected \[64\]"),
    "value head key": (lambda d: _save_head(d / "value_head.safetensors", w=(64, 64)),
                       r"value_head\.safetensors: no 'weight'"),
    "neither format": (lambda d: (d / "value_head.safetensors").unlink(),
                       r"model\.reconstructor .* is not an activation reconstructor: .*value_head\.safetensors"
                       r".*adapter_config\.json"),
    "role": (lambda d: edit_meta(d, lambda m: m.update(role="av")), r"nla_meta\.yaml: role is 'av'"),
    "sidecar template": (lambda d: edit_meta(d, lambda m: m.update(prompt_templates={"critic": "no placeholder"})),
                         r"nla_meta\.yaml prompt_templates\.critic: .*exactly once"),
    "sidecar layer": (lambda d: edit_meta(d, lambda m: m.update(critic={"extraction_layer_index": 21})),
                      r"nla_meta\.yaml critic\.extraction_layer_index: layer 21 is outside .* 21 layers"),
    "sidecar d_model": (lambda d: edit_meta(d, lambda m: m.update(d_model=3584)),
                        r"nla_meta\.yaml: d_model is 3584, but the model's hidden_size is 64"),
    "sidecar scale": (lambda d: edit_meta(d, lambda m: m.update(extraction={"mse_scale": -1})),
                      r"nla_meta\.yaml extraction\.mse_scale: .*positive"),
    "sidecar yaml": (lambda d: (d / "nla_meta.yaml").write_text("role: [unclosed"), r"nla_meta\.yaml: cannot read"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_checkpoint_is_one_line_naming_the_file(ar_copy, case):
    breaks, message = BROKEN[case]
    breaks(ar_copy)
    with pytest.raises(PipelineError, match=message) as e:
        resolve_reconstructor(ar_config(str(ar_copy)))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["model.reconstructor=/no/such/ar"], r"model\.reconstructor: model path '/no/such/ar' does not exist"),
    (["model.reconstructor=null"], r"model\.reconstructor is not set"),
    (["model.reconstructor=someorg/not-cached-ar"], r"model\.reconstructor: cannot load .*someorg/not-cached-ar"),
    (["model.reconstructor=builtin:tiny-ar", "reconstructor.prompt_template=no placeholder"],
     r"reconstructor\.prompt_template: .*exactly once"),
    (["model.reconstructor=builtin:tiny-ar", "reconstructor.prompt_template='{explanation} {explanation}'"],
     r"reconstructor\.prompt_template: .*\(found 2"),
    (["model.reconstructor=builtin:tiny-ar", "reconstructor.layer=21"], r"reconstructor\.layer: layer 21 is outside"),
    (["model.reconstructor=builtin:tiny-ar", "reconstructor.mse_scale=0"], r"reconstructor\.mse_scale: .*positive"),
    (["model.reconstructor=builtin:tiny-ar-lora", "extract.layer=28"], r"extract\.layer: layer 28 is outside"),
    (["model.reconstructor=builtin:tiny-ar-nope"], r"unknown built-in model .*builtin:tiny-ar-lora"),
    (["model.reconstructor=builtin:tiny-lora"], r"model\.reconstructor 'builtin:tiny-lora' is model\.adapter"),
])
def test_bad_settings_are_one_line_naming_the_key(tiny_ar_dir, tiny_ar_lora_dir, tiny_adapter_dir, overrides,
                                                 message):
    with pytest.raises(PipelineError, match=message) as e:
        resolve_reconstructor(load_config(TINY_CONFIG, [*RESET, *overrides]))
    assert "\n" not in str(e.value)


def test_a_lora_ar_for_another_base_is_refused_unless_allowed(tmp_path, tiny_ar_lora_dir):
    lora = tmp_path / "lora"
    shutil.copytree(tiny_ar_lora_dir, lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "Qwen/Other"}))
    with pytest.raises(PipelineError, match=r"model\.reconstructor .* was trained on 'Qwen/Other'.*allow_adapter"):
        resolve_reconstructor(ar_config(str(lora)))
    assert resolve_reconstructor(ar_config(str(lora), "model.allow_adapter_base_mismatch=true")).format == "lora"


def test_the_tiny_ar_is_in_the_release_layout(tiny_ar_dir, tiny_model_dir, tokenizer):
    from safetensors.torch import load_file

    config = json.loads(open(f"{tiny_ar_dir}/config.json").read())
    assert config["num_hidden_layers"] == 21 and config["hidden_size"] == 64
    meta = yaml.safe_load(open(f"{tiny_ar_dir}/nla_meta.yaml").read())
    assert meta["schema_version"] == 2 and meta["role"] == "critic" and meta["d_model"] == 64
    assert meta["extraction"]["mse_scale"] == 8.0 and meta["critic"]["extraction_layer_index"] == 20
    assert meta["prompt_templates"]["critic"] == DEFAULT_TEMPLATE
    assert meta["tokens"]["critic_suffix_ids"] == [1318, 29, 366, 1708, 29]  # NOTES.md's ids
    assert load_file(f"{tiny_ar_dir}/value_head.safetensors")["weight"].shape == (64, 64)
    ar, base = load_file(f"{tiny_ar_dir}/model.safetensors"), load_file(f"{tiny_model_dir}/model.safetensors")
    assert "model.layers.20.mlp.up_proj.weight" in ar and "model.layers.21.mlp.up_proj.weight" not in ar
    key = "model.layers.3.self_attn.q_proj.weight"
    assert not torch.equal(ar[key], base[key]) and torch.corrcoef(torch.stack([ar[key].flatten(),
                                                                               base[key].flatten()]))[0, 1] > 0.9
