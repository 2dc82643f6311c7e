"""Any NLA checkpoint by config: nla_meta.yaml sidecars, fully fine-tuned verbalizers, the release's protocol.

The release-format verbalizer here is the tiny base with the tiny LoRA merged in and saved whole
(a full fine-tune), carrying a schema_version 2 nla_meta.yaml like kitft/nla-qwen2.5-7b-L20-av's.
Its texts are compared with the release's recipe (docs/inference.md) written out plainly below.
"""
import json
import logging
import shutil

import numpy as np
import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import PipelineError
from tests.conftest import REPO, tiny_overrides
from tests.test_verbalize import read_explanations, write_activation_dir

KITFT = str(REPO / "configs" / "kitft-qwen2.5-7b-l20.yaml")
INJECTION_CHAR = "㈎"
# prompt_templates.actor, as docs/inference.md of the release prints it
RELEASE_TEMPLATE = (
    "You are a meticulous AI researcher conducting an important investigation into activation vectors from a "
    "language model. Your overall task is to describe the semantic content of that activation vector.\n\n"
    "We will pass the vector enclosed in <concept> tags into your context. You must then produce an explanation "
    "for the vector, enclosed within <explanation> tags. The explanation consists of 2-3 text snippets describing "
    "that vector.\n\nHere is the vector:\n\n<concept>{injection_char}</concept>\n\nPlease provide an explanation.")
N = 6
MAX_NEW = 20


def release_meta(width: int, **changes) -> dict:
    meta = {"kind": "nla_model", "schema_version": 2, "role": "actor", "stage": "rl", "d_model": width,
            "extraction": {"injection_scale": 150.0, "mse_scale": None},
            "tokens": {"injection_char": INJECTION_CHAR, "injection_token_id": 149705,
                       "injection_left_neighbor_id": 29, "injection_right_neighbor_id": 522},
            "prompt_templates": {"actor": RELEASE_TEMPLATE, "critic": None},
            "critic": {"extraction_layer_index": 20},
            "trained_on": ["an unknown key, tolerated"]}
    for dotted, value in changes.items():
        node = meta
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return meta


@pytest.fixture(scope="module")
def release_av(tmp_path_factory, peft_model, tokenizer):
    """A fully fine-tuned verbalizer: the tiny base + LoRA merged, saved whole, with its sidecar; its
    generation_config.json ends rows at <|im_end|> alone (so the EOS ids visibly come from it)."""
    import copy

    out = tmp_path_factory.mktemp("release-av") / "av"
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.generation_config.eos_token_id = [151645]
    merged.generation_config.pad_token_id = 151643
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "nla_meta.yaml").write_text(yaml.safe_dump(release_meta(merged.config.hidden_size), allow_unicode=True))
    return out


def with_meta(src, dst, **changes):
    """A copy of a checkpoint directory whose sidecar has ``changes`` (a__b=value sets meta[a][b])."""
    shutil.copytree(src, dst)
    meta = release_meta(yaml.safe_load((src / "nla_meta.yaml").read_text())["d_model"], **changes)
    (dst / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    return dst


@pytest.fixture(scope="module")
def acts(tmp_path_factory, vectors):
    return write_activation_dir(tmp_path_factory.mktemp("acts") / "extract", vectors[:N].numpy(), chunk_rows=4)


def kitft_overrides(tmp_path, verbalizer, acts_dir, **extra):
    return tiny_overrides(tmp_path, **{"model.base": "builtin:tiny", "model.verbalizer": str(verbalizer),
                                       "model.reconstructor": "null", "model.dtype": "float32", "model.device": "cpu",
                                       "verbalize.input_dir": str(acts_dir), "verbalize.batch_size": 4,
                                       "generation.max_new_tokens": MAX_NEW, **extra})


def release_recipe(model, tokenizer, vector: torch.Tensor) -> str:
    """docs/inference.md steps 1-5 for one vector: chat-wrapped template (one-step tokenize), embed,
    neighbour-checked injection at norm 150, greedy decode, the text between the tags."""
    content = RELEASE_TEMPLATE.format(injection_char=INJECTION_CHAR)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                        add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    pos = next(p for p, t in enumerate(ids) if t == 149705 and ids[p - 1] == 29 and ids[p + 1] == 522)
    embeds = model.get_input_embeddings()(torch.tensor([ids])).clone()
    embeds[0, pos] = vector * (150.0 / vector.float().norm())
    with torch.no_grad():
        out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=MAX_NEW, do_sample=False, repetition_penalty=1.0,
                             eos_token_id=[151645], pad_token_id=151643)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    text = text.split("</explanation>")[0]
    return (text.split("<explanation>", 1)[1] if "<explanation>" in text else text).strip()


def test_the_release_protocol_from_its_sidecar_matches_the_recipe(tmp_path, release_av, acts, vectors, tokenizer):
    from transformers import AutoModelForCausalLM

    assert main(["verbalize", "--config", KITFT, *kitft_overrides(tmp_path, release_av, acts)]) == 0
    rows, _ = read_explanations(tmp_path / "verbalize")
    model = AutoModelForCausalLM.from_pretrained(release_av, dtype=torch.float32).eval()
    assert [r["explanation"] for r in rows] == [release_recipe(model, tokenizer, v) for v in vectors[:N]]

    record = json.loads((tmp_path / "verbalize" / "_protocol.json").read_text())
    values = record["values"]
    assert record["sidecar"] == str(release_av / "nla_meta.yaml")
    assert values["verbalizer.prompt_template"] == {
        "value": RELEASE_TEMPLATE, "source": f"{release_av / 'nla_meta.yaml'} prompt_templates.actor"}
    assert values["verbalizer.neighbor_token_ids"]["value"] == [29, 522]
    assert values["verbalizer.injection_token_id"]["value"] == 149705
    assert values["verbalizer.injection_norm"]["source"].endswith("extraction.injection_scale")
    assert values["extract.layer"] == {"value": 20,
                                       "source": f"{release_av / 'nla_meta.yaml'} critic.extraction_layer_index"}
    assert values["verbalizer.chat_template"] == {"value": True, "source": "config"}
    assert values["generation.eos_token_ids"] == {"value": [151645],
                                                  "source": f"{release_av} generation_config.json"}
    fingerprint = json.loads((tmp_path / "verbalize" / "_fingerprint.json").read_text())["settings"]
    assert fingerprint["model.verbalizer"].startswith(str(release_av))


def test_an_explicit_key_wins_over_the_sidecar_and_says_so(release_av, caplog):
    from pipeline.protocol.resolve import resolve_protocol

    cfg = load_config(KITFT, [f"model.verbalizer={release_av}", "model.base=builtin:tiny", "verbalizer.injection_norm=80"])
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        protocol = resolve_protocol(cfg)
    assert protocol.cfg.verbalizer.injection_norm == 80.0
    assert protocol.sources["verbalizer.injection_norm"] == "config"
    assert "verbalizer.injection_norm=80.0 from the config" in caplog.text and "says 150.0" in caplog.text
    # unset and absent from the sidecar: the default
    assert protocol.sources["verbalizer.depth_pct"] == "default"
    # the user's config object is left as it was
    assert cfg.verbalizer.prompt_template == ""


def test_extraction_reads_the_layer_from_the_sidecar_only_when_unset(tmp_path, release_av):
    from pipeline.protocol.resolve import resolve_protocol

    av = with_meta(release_av, tmp_path / "av", critic__extraction_layer_index=17)
    cfg = load_config(KITFT, [f"model.verbalizer={av}", "model.base=builtin:tiny"])
    protocol = resolve_protocol(cfg, stage="extract")
    assert protocol.cfg.extract.layer == 17 and protocol.sources["extract.layer"].endswith("critic.extraction_layer_index")
    explicit = load_config(KITFT, [f"model.verbalizer={tmp_path / 'missing'}", "model.base=builtin:tiny", "extract.layer=5"])
    assert resolve_protocol(explicit, stage="extract").cfg.extract.layer == 5  # the sidecar is not even looked for


@pytest.mark.parametrize("changes, message", [
    ({"tokens__injection_token_id": 149706},
     r"verbalizer.injection_token_id \(from .*nla_meta.yaml tokens.injection_token_id\) is 149706, but the tokenizer "
     r"encodes '㈎' as 149705"),
    ({"tokens__injection_right_neighbor_id": 523},
     r"verbalizer.neighbor_token_ids \(from .*nla_meta.yaml tokens.injection_\*_neighbor_id\): expected \[29, 523\]"),
    ({"role": "critic"}, r"nla_meta.yaml: role is 'critic' \(a reconstructor\), but model.verbalizer must name a verbalizer"),
    ({"d_model": 3584}, r"nla_meta.yaml: d_model is 3584, but model.verbalizer .* has hidden_size 64"),
    ({"extraction__injection_scale": None}, r"extraction.injection_scale is null \(raw, unnormalized injection\)"),
    ({"prompt_templates__actor": "no placeholder"}, r"prompt_templates.actor: the template has no \{injection_char\}"),
])
def test_a_sidecar_that_disagrees_is_refused_in_one_line(tmp_path, release_av, acts, capsys, changes, message):
    av = with_meta(release_av, tmp_path / "av", **changes)
    assert main(["verbalize", "--config", KITFT, *kitft_overrides(tmp_path, av, acts)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    import re
    assert re.search(message, err), err
    assert not list((tmp_path / "verbalize").glob("*/chunk_*"))


def test_adapter_and_verbalizer_together_are_refused_naming_both():
    with pytest.raises(PipelineError, match=r"model.adapter .* and model.verbalizer .* are both set"):
        load_config(KITFT, ["model.adapter=some/lora"])


def test_a_bullets_verbalizer_runs_to_the_token_cap(tmp_path, acts, vectors, peft_model, tokenizer):
    """No stop string, no EOS: every row ends at max_new_tokens, unfinished; texts equal a plain greedy loop."""
    from tests.conftest import TINY_CONFIG

    overrides = tiny_overrides(tmp_path, **{"verbalize.input_dir": str(acts), "verbalizer.stop_string": "null",
                                            "generation.eos_token_ids": "[]", "generation.max_new_tokens": 12,
                                            "generation.repetition_penalty": 1.0})
    assert main(["verbalize", "--config", TINY_CONFIG, *overrides]) == 0
    rows, _ = read_explanations(tmp_path / "verbalize")
    assert all(r["finished"] is False and r["n_generated"] == 12 for r in rows)

    from tests.card_reference import card_prompt
    ids = tokenizer.encode(card_prompt(), add_special_tokens=True)
    pos = ids.index(149705)
    embedding = peft_model.get_input_embeddings()
    expected = []
    for v in vectors[:N]:
        embeds = embedding(torch.tensor([ids])).clone()
        embeds[0, pos] = v * (150.0 / v.float().norm())
        generated = []
        with torch.no_grad():
            for _ in range(12):  # plain greedy, the whole sequence each step, no cache
                token = int(peft_model(inputs_embeds=embeds).logits[0, -1].argmax())
                generated.append(token)
                embeds = torch.cat([embeds, embedding(torch.tensor([[token]]))], dim=1)
        expected.append(tokenizer.decode(generated, skip_special_tokens=True).strip())
    assert [r["explanation"] for r in rows] == expected


def test_the_explanation_is_the_text_between_the_tags(tokenizer):
    from pipeline.protocol.verbalizer import decode_row

    tokens = tokenizer.encode("<explanation>\nA cat on a mat.\n</explanation>", add_special_tokens=False) + [151645]
    text, finished, n = decode_row(tokenizer, tokens, [151645], "</explanation>", "<explanation>")
    assert (text, finished) == ("A cat on a mat.", True)
    assert n == len(tokens) - 1  # ended by the stop string, before the EOS
    untagged = tokenizer.encode("no tags here", add_special_tokens=False)
    assert decode_row(tokenizer, untagged, [], "</explanation>", "<explanation>") == ("no tags here", False, len(untagged))
