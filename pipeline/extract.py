"""Stage 1: prompts (Parquet) -> last-real-token output of decoder layer ``extract.layer`` (Arrow).

    nla-pipeline extract --config configs/tiny.yaml
    python -m pipeline extract --config configs/qwen2.5-7b-l20-av-v2.yaml data.paths='[prompts/*.parquet]'

    from pipeline.extract import ExtractStage, extract_vectors
    vectors, stats = extract_vectors(trunk, token_ids, max_batch_tokens=8192, pad_id=tok.pad_token_id)

Each prompt is rendered as one user message with the chat template (add_generation_prompt=True),
exactly as the model card does. Batches are right-padded with an explicit attention mask, so every
real token keeps the RoPE position it has alone, and the vector is gathered at ``length - 1``.
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch

from pipeline import __version__
from pipeline.activations import write_activations
from pipeline.config import fingerprint
from pipeline.batching import token_budget_batches
from pipeline.driver import Unit
from pipeline.layout import StageDir
from pipeline.modeling import load_extract_model, load_model_config, load_tokenizer, model_identity, resolve_dtype, resolve_source
from pipeline.shards import plan_chunks, read_prompts, resolve_shards

log = logging.getLogger(__name__)

PROMPT_RENDERING = "chat_template([{role: user, content: prompt}], add_generation_prompt=True)"


def render_and_tokenize(tokenizer, prompts: list[str]) -> list[list[int]]:
    """The card's rendering: one user message, generation prompt, then a plain tokenizer call."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    return tokenizer(texts)["input_ids"]


@torch.inference_mode()
def extract_vectors(trunk, token_ids: list[list[int]], max_batch_tokens: int, pad_id: int):
    """Layer output at each row's last real token: float32 [rows, d_model] in input order, plus stats."""
    device = next(trunk.parameters()).device
    lengths = [len(t) for t in token_ids]
    batches = token_budget_batches(lengths, max_batch_tokens)
    d_model = trunk.config.hidden_size
    out = torch.empty(len(token_ids), d_model, dtype=torch.float32)
    for batch in batches:
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # right padding: real tokens keep positions 0..len-1
            ids[row, : lengths[i]] = torch.tensor(token_ids[i])
            mask[row, : lengths[i]] = 1
        hidden = trunk(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        last = torch.tensor([lengths[i] - 1 for i in batch], device=device)
        picked = hidden[torch.arange(len(batch), device=device), last]  # [batch, d_model]
        out[torch.tensor(batch)] = picked.float().cpu()
    stats = {"tokens": sum(lengths), "computed_tokens": sum(len(b) * max(lengths[i] for i in b) for b in batches),
             "batches": len(batches)}
    return out, stats


class ExtractStage:
    """Per-chunk extraction plus what the driver needs. ``trunk``/``tokenizer`` may be injected."""

    name = "extract"

    def __init__(self, cfg, rt, trunk=None, tokenizer=None):
        self.cfg, self.rt = cfg, rt
        self.out = StageDir(cfg.extract.output_dir, suffix=".arrow")
        self.trunk, self.tokenizer = trunk, tokenizer
        self.shards = resolve_shards(cfg.data)
        self.dtype = str(resolve_dtype(cfg.model.dtype, rt.device)).replace("torch.", "")

    def plan(self) -> list[Unit]:
        return [Unit(c.shard.name, c.index, c.num_rows, c) for c in plan_chunks(self.shards, self.cfg.data.chunk_rows)]

    def shard_ready(self, shard_name: str) -> bool:
        return True  # every chunk of an input shard is planned up front

    def settings(self) -> dict:
        cfg = self.cfg
        tok = self.tokenizer or load_tokenizer(cfg)
        self.tokenizer = tok
        settings = {
            "stage": "extract",
            "model.base": model_identity(resolve_source(cfg.model.base, "model.base")),
            "model.dtype": self.dtype,
            "extract.layer": cfg.extract.layer,
            "extract.output_dtype": cfg.extract.output_dtype,
            "extract.with_adapter": cfg.extract.with_adapter,
            "prompt_rendering": PROMPT_RENDERING,
            "chat_template_sha256": hashlib.sha256((tok.chat_template or "").encode()).hexdigest()[:16],
            "data.paths": [s.path for s in self.shards],
            "data.prompt_column": cfg.data.prompt_column,
            "data.id_column": cfg.data.id_column,
            "data.chunk_rows": cfg.data.chunk_rows,
        }
        if cfg.extract.with_adapter:
            settings["model.adapter"] = cfg.model.adapter
        return settings

    def setup(self) -> None:
        if self.trunk is None:
            self.trunk = load_extract_model(self.cfg, self.rt.device)
        self.metadata = {
            "nla_pipeline_version": __version__,
            "base_model": self.cfg.model.base,
            "layer": self.cfg.extract.layer,
            "num_layers": self._num_layers(),
            "dtype": self.dtype,
            "prompt_rendering": PROMPT_RENDERING,
            "with_adapter": self.cfg.extract.with_adapter,
            "fingerprint": fingerprint(self.settings()),
        }

    def _num_layers(self) -> int:
        return load_model_config(self.cfg).num_hidden_layers

    def process(self, unit: Unit) -> dict:
        ids, prompts = read_prompts(unit.source, self.cfg.data)
        token_ids = render_and_tokenize(self.tokenizer, prompts)
        vectors, stats = extract_vectors(self.trunk, token_ids, self.cfg.extract.max_batch_tokens,
                                         self.tokenizer.pad_token_id)
        pad = 1 - stats["tokens"] / max(stats["computed_tokens"], 1)
        log.info("extract %s chunk %d: %d rows, %d tokens, padding %.1f%%", unit.shard, unit.index,
                 len(ids), stats["tokens"], 100 * pad)
        path = self.out.chunk_path(unit.shard, unit.index)
        self.out.write_atomic(path, lambda tmp: write_activations(
            tmp, ids, vectors.numpy(), [len(t) for t in token_ids], self.metadata, self.cfg.extract.output_dtype))
        return {"tokens": stats["tokens"], "computed_tokens": stats["computed_tokens"]}

