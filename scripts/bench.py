"""Throughput benchmark: the card's per-example code vs the pipeline vs the machine's matmul ceiling.

    python scripts/bench.py                      # 2-core CPU, float32, bench model at width 512 (a few minutes)
    python scripts/bench.py --quick              # smoke run (CI-sized)
    python scripts/bench.py --shape qwen2.5-7b --dtype bfloat16 --device cuda   # the real 7B shape on a GPU
    python scripts/bench.py --engines continuous,vllm   # adds vLLM (needs vLLM installed) to the verbalize rows
    python scripts/bench.py --engines continuous,vllm,vllm-adapter   # both vllm.lora modes side by side

Everything happens in one process, on one machine, with the same prompts:

1. A **bench model** with random weights is built locally (Qwen2, 28 layers, real vocab and tokenizer;
   ``--width`` sets the hidden size, ``--shape qwen2.5-7b`` the real one) plus a random LoRA in the
   card's layout (r 32, alpha 64, seven projections).
2. Prompts with long-tailed lengths (lognormal, median ~60 tokens, mostly 10-200, a tail past 1,000).
3. Each stage is timed three ways: the card's per-example code (``generate(max_new_tokens=1)`` with a
   hook; ``generate(inputs_embeds=...)`` at batch 1 on the PeftModel), the pipeline through its stage
   driver (the same code path as ``nla-pipeline extract|verbalize``), and a large matmul in the same
   dtype (the ceiling, timed just before and just after each stage's pipeline run). The card's code
   runs on half its rows just before the pipeline and on the other half just after, so a machine
   whose speed drifts (shared VMs do, by 20% here) favours neither side.

Useful FLOPs count only what the result needs: extract, layers 0..20 over real tokens (linear layers
plus causal attention), with the chat template's opening that every prompt shares (system block and
user header, 24 tokens) counted once, since its keys and values do not depend on the rest;
verbalize, the per-row suffix from the injection token on and every generated token through all
layers and the LM head (the shared prefix is computed once and not counted); score, layers 0..20
over each rendered reconstructor template (its shared opening counted once) plus the value head.
Random weights rarely emit EOS, so the bench model's LM-head row for <|im_end|> is scaled by
``--eos-scale`` (see pipeline.models.tiny.build_tiny_model); rows then stop at varied lengths, like real
explanations, and the report gives the distribution.

With ``--engines``, stage 2 runs once more for each engine after the first (``verbalize.engine=...``,
same vectors, same settings; vLLM with ``vllm.max_num_seqs`` = ``--batch-size``; ``vllm`` is
``vllm.lora=merged``, ``vllm-adapter`` is ``vllm.lora=adapter``), and the table
gets a row for each, with how many of its texts equal the card's and the first engine's. Its time,
like every stage's, excludes start-up (model load; for vLLM the engine start, given apart).

The table is written to docs/benchmarks.md (replacing the previous one for the same device kind and
``--engines``).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.models.tiny import build_tiny_adapter, build_tiny_model, cache_dir  # noqa: E402

SHAPES = {
    "qwen2.5-7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4},
}


def bench_shape(args) -> dict:
    if args.shape:
        return SHAPES[args.shape]
    heads = max(1, args.width // 128)
    return {"hidden_size": args.width, "intermediate_size": args.width * 3, "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2)}


def build_models(args, shape: dict) -> tuple[str, str]:
    key = f"bench-{shape['hidden_size']}-{shape['intermediate_size']}-{shape['num_attention_heads']}-{shape['num_key_value_heads']}-eos{args.eos_scale}"
    # Weights are stored in the bench dtype (bfloat16 for the 7B shape: 15 GB rather than 30) and
    # initialised on the bench device. float32 keeps the key it always had.
    key += "" if args.dtype == "float32" else f"-{args.dtype}"
    dtype, device = getattr(torch, args.dtype), torch.device(args.device).type
    tok_dir = build_tiny_model(cache_dir() / "tiny-qwen2-28l")  # reuse its tokenizer files
    base = build_tiny_model(cache_dir() / key, shape=shape, tokenizer_from=tok_dir, eos_scale=args.eos_scale,
                            dtype=dtype, device=device)
    return str(base), str(build_tiny_adapter(base, cache_dir() / f"{key}-lora", dtype=dtype, device=device))


def make_prompts(tokenizer, n: int, seed: int = 0) -> list[str]:
    """Random-word prompts whose token counts follow a long-tailed distribution."""
    rng = np.random.default_rng(seed)
    words = [w for w in (tokenizer.decode([i]) for i in range(1000, 20000)) if re.fullmatch(r" [a-z]{3,9}", w)]
    lengths = np.clip(rng.lognormal(np.log(60), 0.85, n), 10, 1600).astype(int)
    tail = rng.choice(n, size=max(1, n // 64), replace=False)
    lengths[tail] = rng.integers(1000, 1500, size=len(tail))
    return ["".join(rng.choice(words, size=k)).strip() for k in lengths]


def matmul_ceiling(device, dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps, t0 = 5, time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process high-water mark


# --- useful FLOPs ---------------------------------------------------------------------------------

def linear_params_per_layer(c) -> int:
    hd = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    return c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size


def attention_flops(c, query_positions: list[int]) -> float:
    """QK^T and AV for one layer: 4 * heads * head_dim * (number of keys each query attends to)."""
    return 4 * c.hidden_size * float(sum(p + 1 for p in query_positions))


def extract_flops(c, layers: int, lengths: list[int], prefix: int = 0) -> float:
    """Rows longer than the shared ``prefix`` need only their positions from ``prefix`` on."""
    per_token = 2 * linear_params_per_layer(c) * layers

    def flops(positions: range) -> float:
        return per_token * len(positions) + layers * attention_flops(c, list(positions))

    return flops(range(prefix)) + sum(flops(range(prefix if n > prefix else 0, n)) for n in lengths)


def verbalize_flops(c, prefix: int, suffix: int, generated: list[int]) -> float:
    L = c.num_hidden_layers
    per_token = 2 * linear_params_per_layer(c) * L
    head = 2 * c.hidden_size * c.vocab_size
    total = 0.0
    for g in generated:
        fed = suffix + max(g - 1, 0)  # suffix prefill, then every generated token but the last is fed back
        positions = list(range(prefix, prefix + fed))
        total += per_token * fed + L * attention_flops(c, positions) + head * g
    return total


# --- the card's per-example code ------------------------------------------------------------------

def card_extract(model, tokenizer, prompts, layer: int, device) -> float:
    act = {}

    def hook(mod, inp, out):
        if "h" not in act:
            act["h"] = (out[0] if isinstance(out, tuple) else out)[:, -1, :].detach()

    handle = model.base_model.model.model.layers[layer].register_forward_hook(hook)
    t0 = time.perf_counter()
    with torch.no_grad(), model.disable_adapter():
        for p in prompts:
            act.clear()
            chat = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            inputs = tokenizer(chat, return_tensors="pt").to(device)
            model.generate(**inputs, max_new_tokens=1, pad_token_id=tokenizer.eos_token_id)
    _sync(device)
    handle.remove()
    return time.perf_counter() - t0


def card_verbalize(model, tokenizer, prompt_text: str, vectors: torch.Tensor, device, max_new: int):
    inject_id = tokenizer.encode("㈎", add_special_tokens=False)[0]
    tokens = tokenizer.encode(prompt_text, add_special_tokens=True)
    pos = tokens.index(inject_id)
    ids = torch.tensor([tokens], device=device)
    generated = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for v in vectors:
            emb = model.get_input_embeddings()(ids).clone()
            v = v.to(device)
            emb[0, pos] = (v * (150.0 / v.float().norm().clamp_min(1e-12))).to(emb.dtype)
            out = model.generate(inputs_embeds=emb, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
            generated.append(out[0].tolist())  # only the new tokens: no input_ids were given
    _sync(device)
    return time.perf_counter() - t0, generated


def card_text(tokenizer, tokens: list[int], stop: str) -> str:
    """The card's text for its tokens, with bug 1 fixed: decode everything, cut at the stop string."""
    return tokenizer.decode(tokens, skip_special_tokens=True).split(stop)[0].strip()


# --- the pipeline -----------------------------------------------------------------------------------

def pipeline_stage(stage_cls, cfg, rt, device, **inject):
    from pipeline.driver import run_stage

    _reset_peak(device)
    stage = stage_cls(cfg, rt, **inject)
    result = run_stage(stage, cfg, rt, overwrite=True)
    _sync(device)
    return result, stage, peak_memory_gib(device)


def around_pipeline(card, items, pipeline):
    """Time the card's code on half of ``items`` before the pipeline runs and on the other half after
    it: a machine whose speed drifts during the run (shared VMs do) then favours neither side.
    Returns (card seconds, the pipeline's return value)."""
    card(items[:1])  # untimed warm-up: the first generate call pays one-off set-up costs
    before = card(items[0::2])
    out = pipeline()
    return before + card(items[1::2]), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model")
    g.add_argument("--width", type=int, default=512, help="hidden size of the bench model (intermediate = 3x)")
    g.add_argument("--shape", choices=sorted(SHAPES), help="use a real model's shape instead of --width")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--attn", default="auto", help="model.attn_implementation for the pipeline (sdpa_gqa: cascade on CUDA too)")
    g.add_argument("--eos-scale", type=float, default=2.5, help="stretch of the <|im_end|> LM-head row (varied stop lengths)")
    g = ap.add_argument_group("workload")
    g.add_argument("--extract-rows", type=int, default=384)
    g.add_argument("--verbalize-rows", type=int, default=384)
    g.add_argument("--card-rows", type=int, default=24, help="rows timed with the card's per-example extraction")
    g.add_argument("--card-verbalize-rows", type=int, default=6, help="rows timed with the card's per-example generate")
    g.add_argument("--max-new-tokens", type=int, default=120)
    g.add_argument("--batch-size", type=int, default=256, help="verbalize.batch_size for the pipeline")
    g.add_argument("--engines", default="continuous",
                   help="comma-separated verbalize.engine values, timed one after another (e.g. continuous,vllm); "
                        "vllm-adapter is vllm with vllm.lora=adapter (not first)")
    g.add_argument("--max-batch-tokens", type=int, default=8192)
    g.add_argument("--quick", action="store_true", help="tiny smoke run: few rows, short generations")
    g = ap.add_argument_group("output")
    g.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    g.add_argument("--json", help="also write the raw numbers here")
    args = ap.parse_args(argv)
    if args.quick:
        args.extract_rows, args.verbalize_rows, args.card_rows, args.card_verbalize_rows = 32, 16, 4, 2
        args.max_new_tokens, args.width = 24, min(args.width, 256)

    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipeline.stages.extract import ExtractStage, chat_prefix_ids, padding_fraction
    from pipeline.runtime import Runtime
    from pipeline.stages.verbalize import VerbalizeStage
    from pipeline.protocol.verbalizer import build_prompt, depth_percent

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = bench_shape(args)
    base_dir, adapter_dir = build_models(args, shape)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    mcfg = AutoConfig.from_pretrained(base_dir)
    work = Path(tempfile.mkdtemp(prefix="nla-bench-"))
    prompts = make_prompts(tokenizer, args.extract_rows)
    pq.write_table(pa.table({"prompt": prompts}), work / "prompts.parquet")
    cfg = load_config(str(REPO / "configs" / "qwen2.5-7b-l20-av-v2.yaml"), [
        f"model.base={base_dir}", f"model.adapter={adapter_dir}", f"model.dtype={args.dtype}",
        f"model.device={device.type}", f"model.attn_implementation={args.attn}",
        f"data.paths=[{work / 'prompts.parquet'}]", "data.chunk_rows=512",
        f"extract.output_dir={work / 'extract'}", f"extract.max_batch_tokens={args.max_batch_tokens}",
        f"verbalize.output_dir={work / 'verbalize'}", f"verbalize.batch_size={args.batch_size}",
        f"verbalize.engine={args.engines.split(',')[0]}", f"vllm.max_num_seqs={args.batch_size}",
        f"generation.max_new_tokens={args.max_new_tokens}", "log_level=WARNING"])
    rt = Runtime(0, 1, device)
    report = {"args": vars(args), "shape": shape}

    matmul_n = 4096 if device.type == "cpu" else 8192

    def with_ceiling(run):
        """``run()`` between two readings of the matmul ceiling: a shared machine's speed drifts, so
        each stage is set against the ceiling of its own minutes."""
        before = matmul_ceiling(device, dtype, matmul_n)
        out = run()
        return out, [before, matmul_ceiling(device, dtype, matmul_n)]

    # --- stage 1 ------------------------------------------------------------------------------
    lengths = [len(t) for t in tokenizer.apply_chat_template(
        [[{"role": "user", "content": p}] for p in prompts], add_generation_prompt=True)["input_ids"]]
    prefix = len(chat_prefix_ids(tokenizer))  # every bench prompt starts with a letter: all rows share it
    useful = extract_flops(mcfg, cfg.extract.layer + 1, lengths, prefix)
    card_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, device_map={"": device}), adapter_dir).eval()
    # The card's code is slow, so it runs on a subset: every k-th row in length order, so that the
    # subset has the same length mix as the whole set and rows/s compare like with like.
    by_length = np.argsort(lengths, kind="stable")
    card_idx = by_length[np.linspace(0, len(prompts) - 1, min(args.card_rows, len(prompts))).round().astype(int)]
    card_s, ((result, stage, mem), ceilings) = around_pipeline(
        lambda idx: card_extract(card_model, tokenizer, [prompts[i] for i in idx], cfg.extract.layer, device),
        card_idx, lambda: with_ceiling(lambda: pipeline_stage(ExtractStage, cfg, rt, device)))
    card_tokens = sum(lengths[i] for i in card_idx)
    # What the card's code executes: all layers over every token, and the LM head at the last one.
    card_flops = extract_flops(mcfg, mcfg.num_hidden_layers, [lengths[i] for i in card_idx]) \
        + len(card_idx) * 2 * mcfg.hidden_size * mcfg.vocab_size
    report["extract"] = {
        "rows": result.rows, "seconds": result.seconds, "tokens": result.stats["tokens"],
        "computed_tokens": result.stats["computed_tokens"], "padding": padding_fraction(result.stats),
        "prefix_tokens": prefix, "useful_flops": useful, "peak_mem_gib": mem,
        "card_rows": len(card_idx), "card_seconds": card_s, "card_tokens": card_tokens, "card_flops": card_flops,
        "ceilings": ceilings,
        "tokens_p50_p90_max": [int(np.percentile(lengths, 50)), int(np.percentile(lengths, 90)), max(lengths)],
    }
    del stage

    # --- stage 2 ------------------------------------------------------------------------------
    from pipeline.io.activations import read_activations, write_activations

    vectors = np.concatenate([read_activations(f)[1] for f in sorted((work / "extract").glob("*/chunk_*.arrow"))])
    vectors = vectors[: args.verbalize_rows]
    shard = work / "acts" / "00000-bench"
    shard.mkdir(parents=True)
    write_activations(shard / "chunk_00000.arrow", [f"r{i}" for i in range(len(vectors))], vectors,
                      [0] * len(vectors), {})
    (shard / "_COMPLETE").write_text(json.dumps({"chunks": 1, "rows": len(vectors)}))
    cfg.verbalize.input_dir = str(work / "acts")
    prompt = build_prompt(tokenizer, cfg.verbalizer, depth_percent(cfg.extract.layer, mcfg.num_hidden_layers))
    card_vecs = torch.from_numpy(vectors[: args.card_verbalize_rows].copy())
    card_tokens: dict[int, list[int]] = {}

    def card(rows):
        seconds, gen = card_verbalize(card_model, tokenizer, prompt.text, card_vecs[rows], device, args.max_new_tokens)
        card_tokens.update(zip(rows.tolist(), gen))  # the warm-up row is timed again later: same tokens
        return seconds

    card_s, ((result, stage, mem), ceilings) = around_pipeline(
        card, np.arange(len(card_vecs)), lambda: with_ceiling(lambda: pipeline_stage(VerbalizeStage, cfg, rt, device)))
    assert stage.prompt.token_ids == prompt.token_ids
    table = pq.read_table(sorted((work / "verbalize").glob("*/chunk_*.parquet"))[0])
    generated = table.column("n_generated").to_pylist()
    suffix = len(prompt.token_ids) - prompt.inject_pos
    texts = table.column("explanation").to_pylist()
    same_text = sum(card_text(tokenizer, toks, cfg.verbalizer.stop_string) == texts[i] for i, toks in card_tokens.items())
    report["verbalize"] = {
        "rows": result.rows, "seconds": result.seconds, "generated_tokens": sum(generated),
        "useful_flops": verbalize_flops(mcfg, prompt.inject_pos, suffix, generated), "peak_mem_gib": mem,
        "finished_fraction": float(np.mean(table.column("finished").to_pylist())),
        "generated_p10_p50_p90": [int(np.percentile(generated, q)) for q in (10, 50, 90)],
        "card_rows": len(card_vecs), "card_seconds": card_s, "card_generated_tokens": sum(map(len, card_tokens.values())),
        "card_same_text": same_text, "ceilings": ceilings,
        "card_same_rows_pipeline_tokens": sum(generated[: len(card_vecs)]),
        "prompt_tokens": len(prompt.token_ids), "prefix_tokens": prompt.inject_pos,
    }
    del stage
    report["verbalize_engines"] = other_engines(args, cfg, rt, device, work, tokenizer, texts, card_tokens, with_ceiling)
    for other in report["verbalize_engines"].values():
        other["useful_flops"] = verbalize_flops(mcfg, prompt.inject_pos, suffix, other.pop("generated"))

    # --- stage 3 ------------------------------------------------------------------------------
    from pipeline.models.reconstructor import DEFAULT_TEMPLATE
    from pipeline.stages.score import ScoreStage
    from pipeline.models.tiny import build_tiny_ar

    ar_dir = build_tiny_ar(base_dir, Path(base_dir).with_name(Path(base_dir).name + "-ar"), layer=cfg.extract.layer)
    cfg.model.reconstructor, cfg.score.output_dir = str(ar_dir), str(work / "score")
    cfg.score.input_dir, cfg.score.max_batch_tokens = str(work / "verbalize"), args.max_batch_tokens
    ar_texts = [DEFAULT_TEMPLATE.replace("{explanation}", t) for t in texts]
    ar_lengths = [len(t) for t in tokenizer(ar_texts)["input_ids"]]
    ar_prefix = len(tokenizer(DEFAULT_TEMPLATE.split("{explanation}")[0])["input_ids"])
    (result, stage, mem), ceilings = with_ceiling(lambda: pipeline_stage(ScoreStage, cfg, rt, device))
    report["score"] = {
        "rows": result.rows, "seconds": result.seconds, "tokens": sum(ar_lengths), "peak_mem_gib": mem,
        # layers 0..20 over each rendered template (its shared opening once), then the value head
        "useful_flops": extract_flops(mcfg, cfg.extract.layer + 1, ar_lengths, ar_prefix)
        + len(ar_lengths) * 2 * mcfg.hidden_size ** 2,
        "ceilings": ceilings, "prefix_tokens": ar_prefix,
        "tokens_p50_max": [int(np.percentile(ar_lengths, 50)), max(ar_lengths)],
    }
    shutil.rmtree(work, ignore_errors=True)
    text = render(report, device, " ".join(["python", "scripts/bench.py", *(argv if argv is not None else sys.argv[1:])]))
    write_report(Path(args.out), text, device)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(text)
    return 0


def other_engines(args, cfg, rt, device, work, tokenizer, first_texts, card_tokens, with_ceiling) -> dict:
    """Stage 2 again with each engine after the first in ``--engines``: rows/s, tokens/s and how many
    texts equal the card's and the first engine's."""
    from pipeline.stages.verbalize import VerbalizeStage

    results = {}
    for engine in args.engines.split(",")[1:]:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.verbalize.engine, run_cfg.verbalize.output_dir = engine, str(work / f"verbalize-{engine}")
        if engine == "vllm-adapter":  # the other vllm.lora mode, timed beside the default (merged)
            run_cfg.verbalize.engine, run_cfg.vllm.lora = "vllm", "adapter"
        def timed():
            t0 = time.perf_counter()
            return pipeline_stage(VerbalizeStage, run_cfg, rt, device), time.perf_counter() - t0

        ((result, stage, mem), wall), ceilings = with_ceiling(timed)
        table = pq.read_table(sorted(Path(run_cfg.verbalize.output_dir).glob("*/chunk_*.parquet"))[0])
        texts, generated = table.column("explanation").to_pylist(), table.column("n_generated").to_pylist()
        results[engine] = {
            "rows": result.rows, "seconds": result.seconds, "generated_tokens": sum(generated), "ceilings": ceilings,
            "startup_seconds": wall - result.seconds,  # set-up: model load, merge, engine start
            "same_as_first": sum(a == b for a, b in zip(texts, first_texts)),
            "card_same_text": sum(card_text(tokenizer, toks, cfg.verbalizer.stop_string) == texts[i]
                                  for i, toks in card_tokens.items()),
            "peak_mem_gib": mem, "generated": generated,
            "generated_p10_p50_p90": [int(np.percentile(generated, q)) for q in (10, 50, 90)],
        }
        del stage
    return results


def machine(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def render(r: dict, device, command: str) -> str:
    e, v, sc = r["extract"], r["verbalize"], r["score"]
    e_ceil, v_ceil, s_ceil = (sum(x["ceilings"]) / len(x["ceilings"]) for x in (e, v, sc))
    e_rps, e_card = e["rows"] / e["seconds"], e["card_rows"] / e["card_seconds"]
    v_rps, v_card = v["rows"] / v["seconds"], v["card_rows"] / v["card_seconds"]
    # The card's code is timed on a subset whose rows may be longer or shorter on average than the
    # whole set, so the speed-up is also given per token, which does not depend on that mix.
    e_tok = (e["tokens"] / e["seconds"]) / (e["card_tokens"] / e["card_seconds"])
    v_tok = (v["generated_tokens"] / v["seconds"]) / (v["card_generated_tokens"] / v["card_seconds"])
    e_util, v_util = e["useful_flops"] / e["seconds"] / e_ceil, v["useful_flops"] / v["seconds"] / v_ceil
    pad = e["padding"]
    s = r["shape"]
    lines = [
        f"## {device.type.upper()}{heading_engines(r['args']['engines'])}: {machine(device)}",
        "",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Command: `{command}`",
        f"- Bench model: Qwen2, 28 layers, d_model {s['hidden_size']}, intermediate {s['intermediate_size']}, "
        f"{s['num_attention_heads']} heads / {s['num_key_value_heads']} KV heads, vocab 152064, random weights, "
        f"{r['args']['dtype']}; random LoRA r 32 (merged by the pipeline, unmerged PeftModel for the card's code).",
        f"- Matmul ceiling ({'4096' if device.type == 'cpu' else '8192'}² in {r['args']['dtype']}, timed here just before and "
        f"just after each stage's pipeline run; a stage's fraction uses the mean of its two): extract "
        f"{'/'.join(f'{c / 1e9:,.1f}' for c in e['ceilings'])}, verbalize "
        f"{'/'.join(f'{c / 1e9:,.1f}' for c in v['ceilings'])}, score "
        f"{'/'.join(f'{c / 1e9:,.1f}' for c in sc['ceilings'])} GFLOP/s",
        f"- Extract prompts: {e['rows']} rows, chat-templated length p50/p90/max = "
        f"{'/'.join(map(str, e['tokens_p50_p90_max']))} tokens, of which the first {e['prefix_tokens']} (system block and "
        f"user header) are the same in every row; the card's code timed on {e['card_rows']} of them, "
        "spread evenly over the length order (half just before the pipeline, half just after).",
        f"- Verbalize: {v['rows']} vectors, max_new_tokens {r['args']['max_new_tokens']}, prompt {v['prompt_tokens']} tokens "
        f"(shared prefix {v['prefix_tokens']}); rows stop at varied lengths (EOS row of the LM head scaled by "
        f"{r['args']['eos_scale']}): generated p10/p50/p90 = {'/'.join(map(str, v['generated_p10_p50_p90']))}, "
        f"{100 * v['finished_fraction']:.0f}% finished before the cap; the card's code timed on {v['card_rows']} of them, "
        f"whose text the pipeline reproduced exactly on {v['card_same_text']} of {v['card_rows']}.",
        f"- Score: those {sc['rows']} explanations through a random value-head reconstructor (layers 0..20 of the bench "
        f"model, value head {s['hidden_size']}x{s['hidden_size']}); the release's template, {sc['tokens_p50_max'][0]} "
        f"tokens at the median, {sc['tokens_p50_max'][1]} at most, its first {sc['prefix_tokens']} shared. The card "
        "has no reconstructor code, so there is no per-example row.",
        "",
        "| stage | way | rows/s | tokens/s | vs card (rows/s) | vs card (tokens/s) | useful FLOP/s | of ceiling | padding | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| extract | card, per example | {e_card:.2f} | {e['card_tokens'] / e['card_seconds']:,.0f} | 1.0x | 1.0x | | | 0% | |",
        f"| extract | pipeline | {e_rps:.2f} | {e['tokens'] / e['seconds']:,.0f} | {e_rps / e_card:.1f}x | {e_tok:.1f}x | "
        f"{e['useful_flops'] / e['seconds'] / 1e9:,.1f} G | {100 * e_util:.0f}% | {100 * pad:.1f}% | {e['peak_mem_gib']:.2f} GiB |",
        f"| verbalize | card, per example | {v_card:.3f} | {v['card_generated_tokens'] / v['card_seconds']:,.1f} | 1.0x | 1.0x | | | | |",
        f"| verbalize | {engine_label(r['args']['engines'].split(',')[0])} | {v_rps:.3f} | "
        f"{v['generated_tokens'] / v['seconds']:,.1f} | {v_rps / v_card:.1f}x | {v_tok:.1f}x | "
        f"{v['useful_flops'] / v['seconds'] / 1e9:,.1f} G | {100 * v_util:.0f}% | 0% | {v['peak_mem_gib']:.2f} GiB |",
        *engine_rows(r.get("verbalize_engines", {}), v, v_card),
        f"| score | pipeline | {sc['rows'] / sc['seconds']:.2f} | {sc['tokens'] / sc['seconds']:,.0f} | | | "
        f"{sc['useful_flops'] / sc['seconds'] / 1e9:,.1f} G | {100 * sc['useful_flops'] / sc['seconds'] / s_ceil:.0f}% | "
        f"| {sc['peak_mem_gib']:.2f} GiB |",
        "",
        *engine_notes(r.get("verbalize_engines", {}), r["args"]["engines"].split(",")[0], v["rows"]),
        f"The card's extract code executes {e['card_flops'] / e['card_seconds'] / 1e9:,.1f} GFLOP/s here (all "
        "28 layers over every token, the LM head at the last one), "
        f"{100 * e['card_flops'] / e['card_seconds'] / e_ceil:.0f}% of the ceiling; a pipeline running its useful FLOPs at "
        f"the ceiling would be {e_ceil / (e['useful_flops'] / e['tokens']) / (e['card_tokens'] / e['card_seconds']):.1f}x "
        "the card in tokens/s.",
        "",
        "tokens/s: prompt tokens for extract, generated tokens for verbalize, template tokens for score. Peak memory: "
        + ("torch.cuda.max_memory_allocated per stage." if device.type == "cuda" else
           "the process's resident high-water mark (ru_maxrss) after the stage, so it includes what came before."),
    ]
    return "\n".join(lines) + "\n"


def heading_engines(engines: str) -> str:
    """A run with other engines gets a section of its own (it may run in another environment: vLLM's)."""
    return "" if engines == "continuous" else f", engines {engines}"


def engine_label(engine: str) -> str:
    return "pipeline" if engine == "continuous" else f"pipeline, {engine}"


def engine_setting(engine: str) -> str:
    """The config an --engines name stands for."""
    lora = {"vllm": " vllm.lora=merged", "vllm-adapter": " vllm.lora=adapter"}.get(engine, "")
    return f"verbalize.engine={engine.removesuffix('-adapter')}{lora}"


def engine_rows(engines: dict, v: dict, v_card: float) -> list[str]:
    """A verbalize row per engine after the first in --engines."""
    rows = []
    for engine, x in engines.items():
        rps, ceiling = x["rows"] / x["seconds"], sum(x["ceilings"]) / len(x["ceilings"])
        tok = (x["generated_tokens"] / x["seconds"]) / (v["card_generated_tokens"] / v["card_seconds"])
        rows.append(f"| verbalize | {engine_label(engine)} | {rps:.3f} | {x['generated_tokens'] / x['seconds']:,.1f} | "
                    f"{rps / v_card:.1f}x | {tok:.1f}x | {x['useful_flops'] / x['seconds'] / 1e9:,.1f} G | "
                    f"{100 * x['useful_flops'] / x['seconds'] / ceiling:.0f}% | 0% | "
                    + (f"{x['peak_mem_gib']:.2f} GiB (this process; not vLLM's workers) |" if engine.startswith("vllm")
                       else f"{x['peak_mem_gib']:.2f} GiB |"))
    return rows


def engine_notes(engines: dict, first: str, rows: int) -> list[str]:
    notes = [f"{engine_setting(engine)}: start-up (not in its rows/s) {x['startup_seconds']:.0f} s; its texts equal the "
             f"card's on {x['card_same_text']} of the card's rows and {first}'s on {x['same_as_first']} of {rows}; "
             f"generated p10/p50/p90 = {'/'.join(map(str, x['generated_p10_p50_p90']))}."
             for engine, x in engines.items()]
    return notes + [""] if notes else []


def write_report(path: Path, section: str, device) -> None:
    """Replace this device kind's section of docs/benchmarks.md, keeping the others."""
    header = "# Benchmarks\n\nWritten by `scripts/bench.py`; each section is replaced when the bench runs again on that kind of device.\n"
    old = path.read_text(encoding="utf-8") if path.exists() else header
    kind = section.split(":", 1)[0]  # "## CPU" or "## CUDA", plus ", engines ..." when --engines has more than one
    parts = re.split(r"(?m)^(?=## )", old)
    kept = [p for p in parts[1:] if p.split(":", 1)[0].split("\n", 1)[0] != kind]
    if not any(p.startswith("## CUDA") for p in kept + [section]):
        kept.append("## CUDA\n\nNo GPU figure has been measured yet (none was available to the sessions so far). "
                    "On a GPU run:\n`python scripts/bench.py --shape qwen2.5-7b --dtype bfloat16 --device cuda`\n"
                    "(on a lent H200: `scripts/device_bench.sh`, one prepared call).\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(parts[0].rstrip() + "\n\n" + "\n".join([section] + [p.rstrip() + "\n" for p in kept]), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
