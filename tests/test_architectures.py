"""Every stage on every supported architecture (Qwen2, Qwen3, Llama, Gemma-3 text), each against a plain
one-example-at-a-time reference written here in plain transformers + peft (eager attention, float32,
one prompt, one vector, one explanation at a time), never the pipeline's helpers.

The models are pipeline.models.tiny's random 28-layer stand-ins (``builtin:tiny-<arch>``), all with
the real Qwen2.5 tokenizer: only the vocabulary size matters to the mechanics. Gemma's exercises what
differs: embeddings scaled by sqrt(d_model) inside the embedding module, sliding-window layers (window
16, which every prompt here crosses; the verbalizer prompt's shared prefix is 106 tokens), a score
scale that is not head_dim**-0.5, and a softcap on the final logits.
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cli import main
from tests.card_reference import INJECTION_CHAR, card_prompt, varied_vectors
from tests.conftest import TINY_CONFIG, tiny_overrides, write_parquet
from tests.test_verbalize import read_explanations, write_activation_dir

ARCHS = ["qwen2", "qwen3", "llama", "gemma3"]
LAYER = 20
EOS = [151645, 151643]
STOP = "</explanation>"
MAX_NEW = 40  # enough for rows to stop at varied lengths (so refills leave holes), and quick
N_VECTORS = 8
PROMPTS = [
    "",
    "What is 17 * 23?",
    " ".join(f"word{i} and the {i}th idea, 你好 🙂." for i in range(12)),  # ~170 tokens: a batch of its own
    "Объясни квантовую запутанность. 東京の天気は？ 🎉🥳👩‍🔬",
    "\n\nLeading blank lines merge with the template's newline: this row runs whole, without the prefix.",
    "a",
    "Write a Python hello world program",
]
EXPLANATIONS = ["", "a cat sat on the mat", "数据 and 🙂 emoji", "word " * 50, "</text> <summary> tags", "ok"]
# configs/tiny.yaml with every reconstructor.* key at its default (the AR's nla_meta.yaml then decides).
RESET = ["reconstructor.prompt_template=null", "reconstructor.layer=null", "reconstructor.mse_scale=null",
         "reconstructor.add_special_tokens=true"]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


@functools.lru_cache(maxsize=None)
def arch_dirs(arch: str) -> dict:
    """The base model, its LoRA and its value-head AR, built once per session under the test cache."""
    from pipeline.models.tiny import resolve_builtin

    return {kind or "base": resolve_builtin(f"builtin:tiny-{arch}{kind}") for kind in ("", "-lora", "-ar")}


@pytest.fixture(scope="module")
def dirs(arch, offline_cache):
    return arch_dirs(arch)


@functools.lru_cache(maxsize=None)
def plain_model(path: str, adapter: str | None = None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()


@functools.lru_cache(maxsize=None)
def tokenizer_of(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def rel_err(got: np.ndarray, ref: torch.Tensor) -> float:
    return float(np.abs(got - ref.numpy()).max() / ref.norm().item())


# --- extract ------------------------------------------------------------------------------------------

def test_extract_matches_a_plain_forward(tmp_path, arch, dirs):
    from pipeline.io.activations import read_activations
    from pipeline.io.layout import StageDir

    write_parquet(tmp_path / "in.parquet", {"id": [f"r{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS})
    overrides = tiny_overrides(tmp_path, **{"model.base": dirs["base"], "data.paths": f"[{tmp_path / 'in.parquet'}]",
                                            "data.chunk_rows": 4, "extract.max_batch_tokens": 160})
    assert main(["extract", "--config", TINY_CONFIG, *overrides]) == 0
    vectors = np.concatenate([read_activations(p)[1] for p in StageDir(tmp_path / "extract", ".arrow").chunk_files()])

    model, tok = plain_model(dirs["base"]), tokenizer_of(dirs["base"])
    for i, prompt in enumerate(PROMPTS):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():  # hidden_states[layer + 1] is layer 20's raw output: the norm comes after layer 27
            ref = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][0, -1]
        assert rel_err(vectors[i], ref) < 1e-5, (arch, i, rel_err(vectors[i], ref))


# --- verbalize ----------------------------------------------------------------------------------------

VECTORS = varied_vectors(64)[:N_VECTORS]  # a one-hot, norms from 0.01 to 10^4, v1 = 1000 * v2


@pytest.fixture(scope="module")
def vectors():
    return VECTORS


def plain_explanation(model, tok, vector: torch.Tensor) -> tuple[str, bool, int]:
    """One vector through generate from inputs_embeds: the vector, normalized to 150, replaces the
    embedding the model consumes at the injection token (for Gemma the scaled one); everything
    generated is decoded, then cut at the stop string."""
    ids = tok.encode(card_prompt(), add_special_tokens=True)
    embeds = model.get_input_embeddings()(torch.tensor([ids])).clone()
    embeds[0, ids.index(tok.encode(INJECTION_CHAR, add_special_tokens=False)[0])] = vector * (150.0 / vector.norm())
    with torch.no_grad():
        out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                             max_new_tokens=MAX_NEW, do_sample=False, repetition_penalty=1.05, eos_token_id=EOS,
                             pad_token_id=151643)
    generated = out[0].tolist()
    stop_at = next((k for k in range(1, len(generated) + 1)
                    if STOP in tok.decode(generated[:k], skip_special_tokens=True)), None)
    n = stop_at or len(generated)
    text = tok.decode(generated, skip_special_tokens=True).split(STOP)[0].strip()
    return text, stop_at is not None or generated[-1] in EOS, n


@functools.lru_cache(maxsize=None)
def plain_explanations_for(arch: str) -> list[tuple[str, bool, int]]:
    dirs = arch_dirs(arch)
    model, tok = plain_model(dirs["base"], dirs["-lora"]), tokenizer_of(dirs["base"])
    return [plain_explanation(model, tok, v) for v in VECTORS]


@pytest.fixture(scope="module")
def plain_explanations(arch, dirs):
    return plain_explanations_for(arch)


def test_verbalize_matches_plain_generate(tmp_path, arch, dirs, vectors, plain_explanations):
    lengths = [n for _, _, n in plain_explanations]
    assert len(set(lengths)) > 2, f"rows should stop at varied lengths, so that refills leave holes: {lengths}"
    acts = write_activation_dir(tmp_path / "acts", vectors.numpy(), chunk_rows=5)
    # auto is our attention on CPU: cascade over the shared prefix. Gemma also runs transformers' eager
    # attention, with the prefix copied into each row and additive masks.
    for attn in ["auto", "eager"] if arch == "gemma3" else ["auto"]:
        out = tmp_path / attn
        overrides = tiny_overrides(out, **{"model.base": dirs["base"], "model.adapter": dirs["-lora"],
                                           "verbalize.input_dir": acts, "verbalize.batch_size": 3,
                                           "generation.max_new_tokens": MAX_NEW, "model.attn_implementation": attn})
        assert main(["verbalize", "--config", TINY_CONFIG, *overrides]) == 0
        rows, _ = read_explanations(out / "verbalize")
        got = [(r["explanation"], r["finished"], r["n_generated"]) for r in rows]
        assert got == plain_explanations, (arch, attn)
        assert "does not apply" not in (out / "verbalize" / "logs" / "rank00000.log").read_text()


def continuous_decoder(dirs, attn="sdpa_gqa", max_rows=3, max_new_tokens=MAX_NEW):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.config import load_config
    from pipeline.engines.decoding import Decoder
    from pipeline.protocol.verbalizer import build_prompt

    cfg = load_config(TINY_CONFIG, [f"generation.max_new_tokens={max_new_tokens}"])
    tok = tokenizer_of(dirs["base"])
    base = AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32, attn_implementation=attn)
    model = PeftModel.from_pretrained(base, dirs["-lora"]).merge_and_unload().eval()
    prompt = build_prompt(tok, cfg.verbalizer, depth_pct=73)
    return Decoder(model, tok, prompt, cfg.generation, cfg.verbalizer, max_rows=max_rows), model, prompt, cfg


def test_injected_vector_replaces_what_the_layers_consume(arch, dirs, vectors):
    """The first decoder layer's input at the injection position is the normalized vector itself (norm
    150, not Gemma's sqrt(d)-scaled 1200), and every other position is the embedding module's output
    (for Gemma, its weights times sqrt(d)). The decoder's logits are the CausalLM's (Gemma's softcap)."""
    from pipeline.protocol.verbalizer import inject, normalize_to

    decoder, model, prompt, cfg = continuous_decoder(dirs, max_rows=2, max_new_tokens=1)
    assert decoder.prefix.cascade and not decoder.plain
    seen = []
    layer0 = decoder.body.layers[0]

    def hook(module, args, kwargs):  # returns None: the layer's input goes on unchanged
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        decoder.run(vectors[4:6])
    finally:
        handle.remove()
    suffix = seen[0]  # the admission's prefill: [2 rows, suffix from the injection token on, d_model]
    expected = normalize_to(vectors[4:6], 150.0)
    torch.testing.assert_close(suffix[:, 0], expected, rtol=0, atol=0)
    assert torch.allclose(suffix[:, 0].norm(dim=-1), torch.tensor(150.0))
    scale = float(getattr(decoder.embed, "embed_scale", 1.0))
    assert (scale == 8.0) == (arch == "gemma3")
    weight = decoder.embed.weight
    torch.testing.assert_close(suffix[0, 1], weight[prompt.token_ids[prompt.inject_pos + 1]] * scale)
    # The generate engine's injection: the same row.
    embeds = inject(model.get_input_embeddings(), prompt, vectors[4:6], 150.0)
    torch.testing.assert_close(embeds[:, prompt.inject_pos], expected, rtol=0, atol=0)
    with torch.no_grad():
        full = model(inputs_embeds=embeds).logits[:, -1]
        hidden = decoder.body(inputs_embeds=embeds).last_hidden_state[:, -1]
        torch.testing.assert_close(decoder._logits(hidden), full.float())


def test_plain_path_when_masks_cannot_be_built(monkeypatch, caplog, offline_cache):
    """Gemma's sliding-window layers with an attention implementation whose masks are not per-row tensors
    (flash attention, on GPUs): one log line names the architecture and the reason, and generate decodes."""
    import pipeline.engines.decoding as decoding

    dirs, vectors, plain_explanations = arch_dirs("gemma3"), VECTORS, plain_explanations_for("gemma3")

    monkeypatch.setattr(decoding, "ALL_MASK_ATTENTION_FUNCTIONS", {})  # as if no dense mask function existed
    with caplog.at_level(logging.INFO, logger="pipeline"):
        decoder, *_ = continuous_decoder(dirs)
        rows = decoder.run(vectors)
    lines = [r.getMessage() for r in caplog.records if "does not apply" in r.getMessage()]
    assert len(lines) == 1 and "gemma3_text" in lines[0] and "sliding-window" in lines[0], lines
    from pipeline.protocol.verbalizer import decode_row

    tok = tokenizer_of(dirs["base"])
    got = [decode_row(tok, tokens, EOS, STOP) for tokens, _, _ in rows]
    assert got == plain_explanations
    assert [(f, n) for _, f, n in rows] == [(f, n) for _, f, n in plain_explanations]


# --- score --------------------------------------------------------------------------------------------

def plain_prediction(ar_dir: str, explanation: str) -> torch.Tensor:
    """The truncated AR (layers 0..20, as saved) on one rendered template: layer 20's raw output at the
    last token (a hook: hidden_states[-1] would be after the final norm), through the value head."""
    from safetensors.torch import load_file

    model, tok = plain_model(ar_dir), tokenizer_of(ar_dir)
    head = load_file(f"{ar_dir}/value_head.safetensors")
    ids = tok("Summary of the following text: <text>" + explanation + "</text> <summary>",
              return_tensors="pt")["input_ids"]
    seen = {}

    def hook(module, args, out):  # returns None: the layer's output goes on unchanged
        seen["h"] = (out[0] if isinstance(out, tuple) else out)[0, -1]

    handle = model.get_decoder().layers[LAYER].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return head["weight"] @ seen["h"] + (head["bias"] if "bias" in head else 0)


def test_score_matches_a_plain_forward(tmp_path, arch, dirs):
    n = len(EXPLANATIONS)
    vecs = torch.randn(n, 64, generator=torch.Generator().manual_seed(7)).numpy()
    ids = [f"v{i}" for i in range(n)]
    acts = write_activation_dir(tmp_path / "acts", vecs, ids=ids, chunk_rows=n)  # score pairs chunk i with chunk i
    shard = tmp_path / "expl" / "00000-test"
    shard.mkdir(parents=True)
    pq.write_table(pa.table({"id": ids, "explanation": EXPLANATIONS, "finished": [True] * n,
                             "n_generated": pa.array([5] * n, pa.int32()), "error": [None] * n}),
                   shard / "chunk_00000.parquet")
    overrides = tiny_overrides(tmp_path, **{"model.base": dirs["base"], "model.reconstructor": dirs["-ar"],
                                            "verbalize.input_dir": acts, "score.input_dir": tmp_path / "expl",
                                            "score.keep_reconstruction": "true", "score.max_batch_tokens": 64})
    assert main(["score", "--config", TINY_CONFIG, *overrides, *RESET]) == 0
    rows = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "score").glob("*/chunk_*.parquet"))])
    got = np.array(rows.column("reconstruction").to_pylist(), dtype=np.float32)
    for i, text in enumerate(EXPLANATIONS):
        ref = plain_prediction(dirs["-ar"], text)
        assert rel_err(got[i], ref) < 1e-5, (arch, i, rel_err(got[i], ref))
