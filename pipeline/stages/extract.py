"""Stage 1: Parquet rows (prompts, conversations, texts) -> last-token output of ``extract.layer`` (Arrow).

    nla-pipeline extract --config configs/tiny.yaml
    python -m pipeline extract --config configs/qwen2.5-7b-l20-av-v2.yaml data.paths='[prompts/*.parquet]'

    from pipeline.stages.extract import ExtractStage, extract_vectors
    vectors, stats, errors = extract_vectors(trunk, token_ids, max_batch_tokens=8192, pad_id=tok.pad_token_id)

Each row is rendered as ``data.format`` says (``pipeline.io.rows``): a prompt as one user message
with the chat template (add_generation_prompt=True), exactly as the model card does; a conversation
whole by the template; raw text with no template. Batches are right-padded with an explicit
attention mask, so every real token keeps the RoPE position it has alone, and the vector is
gathered at ``length - 1``.
"""
from __future__ import annotations

import hashlib
import logging

import torch

from pipeline import __version__
from pipeline.io.activations import ACTIVATION_FORMAT, count_rows, write_activations
from pipeline.engines.batching import token_budget_batches
from pipeline.driver import Unit
from pipeline.io.layout import StageDir
from pipeline.models.modeling import load_extract_model, load_model_config, load_tokenizer, model_identity, resolve_dtype, resolve_source
from pipeline.protocol.resolve import resolve_protocol
from pipeline.engines.prefix import SharedPrefix
from pipeline.io.rows import bound_rows, chat_prefix_ids, input_column, prefix_ids, render_prompts, render_rows, rendering
from pipeline.io.shards import bad_row_error, check_no_nulls, plan_chunks, read_values, resolve_shards, warn_duplicate_ids

log = logging.getLogger(__name__)

__all__ = ["ExtractStage", "chat_prefix_ids", "extract_vectors", "padding_fraction", "render_and_tokenize"]


def render_and_tokenize(tokenizer, prompts: list[str]) -> list[list[int]]:
    """The card's rendering of prompts (data.format=prompt); ``pipeline.io.rows`` renders every format."""
    return render_prompts(tokenizer, prompts)


def _forward_last(trunk, token_ids: list[list[int]], pad_id: int, prefix: SharedPrefix | None = None) -> torch.Tensor:
    """One right-padded batch -> each row's vector at its last real token, float32 [rows, d_model] on CPU.

    With ``prefix``, ``token_ids`` are the rows' suffixes after it: the prefix's cached keys and
    values stand in for its tokens, and the suffix tokens take positions from ``prefix.length`` on.
    """
    device = next(trunk.parameters()).device
    lengths = [len(t) for t in token_ids]
    rows, width = len(token_ids), max(lengths)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for row, t in enumerate(token_ids):  # right padding: real tokens keep the positions they have alone
        ids[row, : len(t)] = torch.tensor(t)
        mask[row, : len(t)] = 1
    kwargs = {"use_cache": False}
    if prefix is not None and prefix.length:
        mask = torch.cat([torch.ones(rows, prefix.length, dtype=torch.long), mask], dim=1)
        kwargs = {"position_ids": torch.arange(prefix.length, prefix.length + width, device=device).expand(rows, -1),
                  **prefix.kw(prefix.cache(rows))}
    if device.type == "cuda":  # pinned host memory makes the copies below asynchronous
        ids, mask = ids.pin_memory(), mask.pin_memory()
    hidden = trunk(input_ids=ids.to(device, non_blocking=True), attention_mask=mask.to(device, non_blocking=True),
                   **kwargs).last_hidden_state  # [rows, width, d_model]
    last = torch.tensor(lengths, device=device) - 1
    return hidden[torch.arange(rows, device=device), last].float().cpu()


def _forward_halving(trunk, token_ids: list[list[int]], pad_id: int,
                     prefix: SharedPrefix | None = None) -> tuple[torch.Tensor, dict[int, str]]:
    """Like _forward_last, but a batch that runs out of memory is split in two and retried, and a
    single row that still does not fit becomes an error: (vectors [rows, d_model], {row: message})."""
    try:
        return _forward_last(trunk, token_ids, pad_id, prefix), {}
    except torch.OutOfMemoryError:
        pass  # retried below: here the exception's traceback still holds the failed attempt's tensors
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(token_ids) == 1:
        n = len(token_ids[0]) + (prefix.length if prefix is not None else 0)
        return torch.zeros(1, trunk.config.hidden_size), {0: f"out of memory on one row of {n} tokens"}
    half = len(token_ids) // 2
    log.warning("out of memory on a batch of %d rows; splitting it in two", len(token_ids))
    first, first_errors = _forward_halving(trunk, token_ids[:half], pad_id, prefix)
    second, second_errors = _forward_halving(trunk, token_ids[half:], pad_id, prefix)
    return torch.cat([first, second]), {**first_errors, **{half + i: e for i, e in second_errors.items()}}


def _too_long(token_ids: list[list[int]], max_positions: int | None) -> dict[int, str]:
    """Rows with more tokens than the model has positions: run anyway, RoPE would extrapolate silently."""
    if max_positions is None:
        return {}
    return {i: f"prompt has {len(t)} tokens, more than the model's maximum of {max_positions} positions"
            for i, t in enumerate(token_ids) if len(t) > max_positions}


@torch.inference_mode()
def extract_vectors(trunk, token_ids: list[list[int]], max_batch_tokens: int, pad_id: int,
                    prefix: SharedPrefix | None = None, skip: dict[int, str] | None = None):
    """Layer output at each row's last real token: float32 [rows, d_model] in input order, stats and
    errors ({row: message}; that row's vector is zeros). Rows in ``skip`` ({row: message}: bad
    rows the caller found) are not run and come back among the errors with their message.

    Rows that start with ``prefix.ids`` and go past them are run as
    suffixes on top of the cached prefix; the others (a template that tokenizes differently at the
    seam, say) are run whole. Rows longer than ``max_position_embeddings`` are not run, and a row that
    runs out of memory on its own is given up: both become errors. Stats: ``tokens`` real tokens of
    the rows fed to the model, ``reused_tokens`` prefix tokens not recomputed, ``computed_tokens`` tokens fed to the
    model including padding, ``error_rows``.
    """
    not_run = {**(skip or {}), **_too_long(token_ids, getattr(trunk.config, "max_position_embeddings", None))}
    errors = dict(not_run)
    plen = prefix.length if prefix is not None and prefix.ids else 0
    shared = [plen > 0 and len(t) > plen and t[:plen] == prefix.ids for t in token_ids]
    fed = [t[plen:] if s else t for t, s in zip(token_ids, shared)]
    lengths = [len(t) for t in fed]
    out = torch.zeros(len(token_ids), trunk.config.hidden_size, dtype=torch.float32)
    computed = 0
    for group, group_prefix in ((True, prefix), (False, None)):
        rows = [i for i, s in enumerate(shared) if s == group and i not in errors]
        for batch in token_budget_batches([lengths[i] for i in rows], max_batch_tokens):
            batch = [rows[i] for i in batch]
            vectors, batch_errors = _forward_halving(trunk, [fed[i] for i in batch], pad_id, group_prefix)
            out[torch.tensor(batch)] = vectors
            errors.update((batch[i], e) for i, e in batch_errors.items())
            computed += len(batch) * max(lengths[i] for i in batch)
    fed_rows = [i for i in range(len(token_ids)) if i not in not_run]
    stats = {"tokens": sum(len(token_ids[i]) for i in fed_rows), "computed_tokens": computed,
             "reused_tokens": plen * sum(shared[i] for i in fed_rows), "error_rows": len(errors)}
    return out, stats, dict(sorted(errors.items()))


def padding_fraction(stats: dict) -> float:
    """Share of the tokens fed to the model that were padding (reused prefix tokens are not fed)."""
    fed = stats["tokens"] - stats.get("reused_tokens", 0)
    return 1 - fed / stats["computed_tokens"] if stats.get("computed_tokens") else 0.0


class ExtractStage:
    """Per-chunk extraction plus what the driver needs. ``trunk``/``tokenizer`` may be injected."""

    name = "extract"

    def __init__(self, cfg, rt, trunk=None, tokenizer=None):
        # extract.layer, when the user left it unset, comes from the verbalizer's nla_meta.yaml.
        self.protocol = resolve_protocol(cfg, stage="extract")
        self.cfg = cfg = self.protocol.cfg
        self.rt = rt
        self.out = StageDir(cfg.extract.output_dir, suffix=".arrow", count_rows=count_rows)
        self.trunk, self.tokenizer = trunk, tokenizer
        self.shards = None  # resolved by plan(), on rank 0 only (each input file's footer is read once)
        self.fingerprint: str | None = None  # set by the driver from rank 0's settings
        self.dtype = str(resolve_dtype(cfg.model.dtype, rt.device)).replace("torch.", "")

    def plan(self) -> list[Unit]:
        """Every chunk of every input file; the files are opened and their columns checked here."""
        self.shards = resolve_shards(self.cfg.data)
        warn_duplicate_ids(self.shards, self.cfg.data)
        if self.cfg.data.on_bad_row == "error":
            check_no_nulls(self.shards, self.cfg.data)
        return [Unit(c.shard.name, c.index, c.num_rows, c) for c in plan_chunks(self.shards, self.cfg.data.chunk_rows)]

    def protocol_record(self) -> dict:
        """Saved as _protocol.json by rank 0 (the driver): the layer and where it came from."""
        self.protocol.log(self.name)
        return self.protocol.record()

    def shard_info(self, shard_name: str, units: list[Unit]) -> dict:
        """Every chunk of an input shard is planned up front, so the plan's units are the whole shard."""
        return {"chunks": len(units), "rows": sum(u.num_rows for u in units)}

    def settings(self) -> dict:
        cfg = self.cfg
        tok = self.tokenizer or load_tokenizer(cfg)
        self.tokenizer = tok
        settings = {
            "stage": "extract",
            "activation_format": ACTIVATION_FORMAT,
            "model.base": model_identity(resolve_source(cfg.model.base, "model.base")),
            "model.dtype": self.dtype,
            "extract.layer": cfg.extract.layer,
            "extract.output_dtype": cfg.extract.output_dtype,
            "extract.with_adapter": cfg.extract.with_adapter,
            "prompt_rendering": rendering(cfg.data),
            "data.paths": [s.path for s in self.shards],
            "data.files": {s.path: s.identity for s in self.shards},  # a rewritten file must not resume
            "data.format": cfg.data.format,
            f"data.{cfg.data.format}_column": input_column(cfg.data),
            "data.id_column": cfg.data.id_column,
            "data.chunk_rows": cfg.data.chunk_rows,
            # data.on_bad_row is not here: a run stopped by a bad row may resume with skip.
            "data.max_tokens": self.max_tokens(),
            "data.truncation": cfg.data.truncation,
        }
        if cfg.data.format != "text":  # raw text never meets the template
            settings["chat_template_sha256"] = hashlib.sha256((tok.chat_template or "").encode()).hexdigest()[:16]
        if cfg.data.format == "messages":
            settings["data.add_generation_prompt"] = cfg.data.add_generation_prompt
        if cfg.extract.with_adapter:
            settings["model.adapter"] = cfg.model.adapter
        return settings

    def setup(self) -> None:
        if self.trunk is None:
            self.trunk = load_extract_model(self.cfg, self.rt.device)
        self.tokenizer = self.tokenizer or load_tokenizer(self.cfg)
        # Keys and values of the template's opening (system block + user header), once per model
        # load; none for raw text, which shares no opening.
        shared = prefix_ids(self.tokenizer, self.cfg.data)
        self.prefix = SharedPrefix(self.trunk, input_ids=shared) if shared else None
        self.metadata = {
            "nla_pipeline_version": __version__,
            "base_model": self.cfg.model.base,
            "layer": self.cfg.extract.layer,
            "num_layers": load_model_config(self.cfg).num_hidden_layers,
            "dtype": self.dtype,
            "prompt_rendering": rendering(self.cfg.data),
            "data_format": self.cfg.data.format,
            "max_tokens": self.max_tokens(),
            "truncation": self.cfg.data.truncation,
            "with_adapter": self.cfg.extract.with_adapter,
            "fingerprint": self.fingerprint,
        }

    def prepare(self, unit: Unit) -> tuple[list[str], list[list[int]], dict[int, str]]:
        """Read and tokenize one chunk (CPU work the driver overlaps with the previous chunk's forward):
        (ids, token ids, {row: why it is not run}). A bad row stops the run here, before this chunk's
        model work, unless data.on_bad_row=skip."""
        chunk = unit.source
        ids, values = read_values(chunk, self.cfg.data)
        token_ids, problems = render_rows(self.tokenizer, values, self.cfg.data)
        if problems and self.cfg.data.on_bad_row == "error":
            row, problem = next(iter(problems.items()))
            raise bad_row_error(chunk.shard.path, chunk.start + row, problem, self.cfg.data)
        col = input_column(self.cfg.data)
        not_run = {i: f"bad row: {p} (column {col!r})" for i, p in problems.items()}
        token_ids, too_long, truncated = bound_rows(token_ids, self.cfg.data, self.max_tokens(),
                                                    from_model=self.cfg.data.max_tokens is None)
        return ids, token_ids, {**not_run, **too_long}, truncated

    def max_tokens(self) -> int | None:
        """data.max_tokens, or the model's maximum position when unset."""
        if self.cfg.data.max_tokens is not None:
            return self.cfg.data.max_tokens
        config = self.trunk.config if self.trunk is not None else load_model_config(self.cfg)
        return getattr(config, "max_position_embeddings", None)

    def process(self, unit: Unit, progress=None, prepared=None) -> dict:
        ids, token_ids, not_run, truncated = prepared if prepared is not None else self.prepare(unit)
        vectors, stats, errors = extract_vectors(self.trunk, token_ids, self.cfg.extract.max_batch_tokens,
                                                 self.tokenizer.pad_token_id, self.prefix, skip=not_run)
        stats["truncated_rows"] = truncated
        chunk = unit.source
        for i, e in errors.items():
            log.warning("%s row %d (id %s): %s; not extracted: its activation is null and its 'error' says why",
                        chunk.shard.path, chunk.start + i, ids[i], e)
        log.info("extract %s chunk %d: %d rows, %d tokens (%d from the cached prefix), padding %.1f%%%s", unit.shard,
                 unit.index, len(ids), stats["tokens"], stats["reused_tokens"], 100 * padding_fraction(stats),
                 f", {truncated} row(s) cut to {self.max_tokens()} tokens ({self.cfg.data.truncation})" if truncated else "")
        path = self.out.chunk_path(unit.shard, unit.index)
        self.out.write_chunk(path, lambda tmp: write_activations(
            tmp, ids, vectors.numpy(), [len(t) for t in token_ids], self.metadata, self.cfg.extract.output_dtype,
            errors))
        return stats

