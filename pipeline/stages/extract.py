"""Stage 1: Parquet rows (prompts, conversations, texts) -> output of ``extract.layer`` at chosen positions (Arrow).

    nla-pipeline extract --config configs/tiny.yaml
    python -m pipeline extract --config configs/qwen2.5-7b-l20-av-v2.yaml data.paths='[prompts/*.parquet]'

    from pipeline.stages.extract import ExtractStage, extract_vectors
    vectors, stats, errors = extract_vectors(trunk, token_ids, max_batch_tokens=8192, pad_id=tok.pad_token_id)

Each row is rendered as ``data.format`` says (``pipeline.io.rows``): a prompt as one user message
with the chat template (add_generation_prompt=True), exactly as the model card does; a conversation
whole by the template; raw text with no template. Batches are right-padded with an explicit
attention mask, so every real token keeps the RoPE position it has alone, and the vectors are
gathered at the row's positions (``extract.positions``, ``pipeline.io.positions``: the last token,
``length - 1``, by default), one output row per (row, position). A row longer than the batch budget
runs alone in pieces of it; vectors are written record batch by record batch, so memory stays
bounded for any length and position mode.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import __version__
from pipeline.io.activations import ACTIVATION_FORMAT, ActivationWriter, count_input_rows
from pipeline.engines.batching import token_budget_batches
from pipeline.driver import Unit
from pipeline.io.layout import StageDir
from pipeline.models.modeling import load_extract_model, load_model_config, load_tokenizer, model_identity, resolve_dtype, resolve_source
from pipeline.protocol.resolve import resolve_protocol
from pipeline.engines.kvcache import growable_cache
from pipeline.engines.prefix import SharedPrefix, cache_kwarg
from pipeline.io.positions import check_positions_column, explicit_problem, positions_rule, select_positions
from pipeline.io.rows import bound_rows, chat_prefix_ids, input_column, prefix_ids, render_prompts, render_rows, rendering
from pipeline.io.shards import bad_row_error, check_no_nulls, plan_chunks, read_schema, read_values, resolve_shards, warn_duplicate_ids

log = logging.getLogger(__name__)

__all__ = ["ExtractStage", "chat_prefix_ids", "extract_vectors", "padding_fraction", "render_and_tokenize"]


def render_and_tokenize(tokenizer, prompts: list[str]) -> list[list[int]]:
    """The card's rendering of prompts (data.format=prompt); ``pipeline.io.rows`` renders every format."""
    return render_prompts(tokenizer, prompts)


def _gather(hidden: torch.Tensor, positions: list[list[int]], offset: int, prefix: SharedPrefix | None) -> list[torch.Tensor]:
    """Each row's vectors at ``positions`` (indices into the whole row) from ``hidden`` [rows, width,
    d_model], which holds positions ``offset``.. of every row; a position before ``offset`` is in the
    shared prefix, whose output ``prefix.hidden`` holds. float32 [k, d_model] per row, on the CPU."""
    device = hidden.device
    rows = [r for r, ps in enumerate(positions) for p in ps if p >= offset]
    cols = [p - offset for ps in positions for p in ps if p >= offset]
    picked = hidden[torch.tensor(rows, dtype=torch.long, device=device),
                    torch.tensor(cols, dtype=torch.long, device=device)].float().cpu()  # one gather, one copy
    out, k = [], 0
    for ps in positions:
        before = [p for p in ps if p < offset]
        mine = picked[k : k + len(ps) - len(before)]
        k += len(ps) - len(before)
        out.append(torch.cat([prefix.hidden[before], mine]) if before else mine)
    return out


def _forward_batch(trunk, token_ids: list[list[int]], pad_id: int, positions: list[list[int]],
                   prefix: SharedPrefix | None = None) -> list[torch.Tensor]:
    """One right-padded batch -> each row's vectors at its ``positions``, float32 [k, d_model] on CPU.

    With ``prefix``, ``token_ids`` are the rows' suffixes after it: the prefix's cached keys and
    values stand in for its tokens, and the suffix tokens take positions from ``prefix.length`` on.
    Positions still index the whole row; those inside the prefix come from ``prefix.hidden``.
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
    offset = prefix.length if prefix is not None else 0
    if offset:
        mask = torch.cat([torch.ones(rows, offset, dtype=torch.long), mask], dim=1)
        kwargs = {"position_ids": torch.arange(offset, offset + width, device=device).expand(rows, -1),
                  **prefix.kw(prefix.cache(rows))}
    if device.type == "cuda":  # pinned host memory makes the copies below asynchronous
        ids, mask = ids.pin_memory(), mask.pin_memory()
    hidden = trunk(input_ids=ids.to(device, non_blocking=True), attention_mask=mask.to(device, non_blocking=True),
                   **kwargs).last_hidden_state  # [rows, width, d_model]
    return _gather(hidden, positions, offset, prefix)


def _pieces(trunk, token_ids: list[int], positions: list[int], piece: int, prefix: SharedPrefix | None = None):
    """One row longer than the batch budget, in pieces of ``piece`` tokens on a growing KV cache
    (chunked prefill): yields (positions, float32 [k, d_model]) piece by piece. The activations in
    flight are one piece's, whatever the row's length; what grows with it is the cache, O(tokens x
    layers x kv width). Exact: every piece attends to all keys before it, and each token keeps its
    position. With ``prefix``, ``token_ids`` is the suffix after it, as in _forward_batch."""
    device = next(trunk.parameters()).device
    offset = prefix.length if prefix is not None else 0
    cache = prefix.cache(1) if prefix is not None else growable_cache()
    kw = prefix.kw(cache) if prefix is not None else {cache_kwarg(trunk): cache, "use_cache": True}
    inside = [p for p in positions if p < offset]
    if inside:
        yield inside, prefix.hidden[inside]
    for start in range(0, len(token_ids), piece):
        part = token_ids[start : start + piece]
        first = offset + start
        hidden = trunk(input_ids=torch.tensor([part], device=device),
                       attention_mask=torch.ones(1, first + len(part), dtype=torch.long, device=device),
                       position_ids=torch.arange(first, first + len(part), device=device)[None], **kw).last_hidden_state
        wanted = [p for p in positions if first <= p < first + len(part)]
        if wanted:
            yield wanted, hidden[0, torch.tensor(wanted, device=device) - first].float().cpu()


def _forward_pieces(trunk, token_ids: list[int], positions: list[int], piece: int,
                    prefix: SharedPrefix | None = None) -> torch.Tensor:
    """_pieces' vectors for one row, together: float32 [len(positions), d_model]."""
    return torch.cat([v for _, v in _pieces(trunk, token_ids, positions, piece, prefix)])


def _forward_halving(trunk, token_ids: list[list[int]], pad_id: int, positions: list[list[int]], max_batch_tokens: int,
                     prefix: SharedPrefix | None = None) -> tuple[list[torch.Tensor], dict[int, str]]:
    """Like _forward_batch, but a batch that runs out of memory is split in two and retried, and a
    single row that still does not fit becomes an error: (vectors per row, {row: message}). A row
    longer than ``max_batch_tokens`` runs alone, in pieces (_forward_pieces)."""
    try:
        if len(token_ids) == 1 and len(token_ids[0]) > max_batch_tokens:
            return [_forward_pieces(trunk, token_ids[0], positions[0], max_batch_tokens, prefix)], {}
        return _forward_batch(trunk, token_ids, pad_id, positions, prefix), {}
    except torch.OutOfMemoryError:
        pass  # retried below: here the exception's traceback still holds the failed attempt's tensors
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    d_model = trunk.config.hidden_size
    if len(token_ids) == 1:
        n = len(token_ids[0]) + (prefix.length if prefix is not None else 0)
        return [torch.zeros(0, d_model)], {0: f"out of memory on one row of {n} tokens"}
    half = len(token_ids) // 2
    log.warning("out of memory on a batch of %d rows; splitting it in two", len(token_ids))
    first, first_errors = _forward_halving(trunk, token_ids[:half], pad_id, positions[:half], max_batch_tokens, prefix)
    second, second_errors = _forward_halving(trunk, token_ids[half:], pad_id, positions[half:], max_batch_tokens,
                                             prefix)
    return first + second, {**first_errors, **{half + i: e for i, e in second_errors.items()}}


def _too_long(token_ids: list[list[int]], max_positions: int | None) -> dict[int, str]:
    """Rows with more tokens than the model has positions: run anyway, RoPE would extrapolate silently."""
    if max_positions is None:
        return {}
    return {i: f"prompt has {len(t)} tokens, more than the model's maximum of {max_positions} positions"
            for i, t in enumerate(token_ids) if len(t) > max_positions}


def _shares(token_ids: list[int], prefix: SharedPrefix | None) -> bool:
    """Whether a row runs on top of the cached prefix: it starts with the prefix and goes past it."""
    plen = prefix.length if prefix is not None and prefix.ids else 0
    return plen > 0 and len(token_ids) > plen and token_ids[:plen] == prefix.ids


@torch.inference_mode()
def extract_at(trunk, token_ids: list[list[int]], positions: list[list[int]], max_batch_tokens: int, pad_id: int,
               prefix: SharedPrefix | None = None, skip: dict[int, str] | None = None):
    """Layer output at each row's ``positions`` (indices into its token ids, ascending): a float32
    [k, d_model] tensor per row in input order ([0, d_model] for an error row), stats and errors
    ({row: message}). Rows in ``skip`` ({row: message}: bad rows the caller found) are not run and
    come back among the errors with their message.

    Rows that start with ``prefix.ids`` and go past them are run as suffixes on top of the cached
    prefix (positions inside it are read from ``prefix.hidden``, which must then be kept); the others
    (a template that tokenizes differently at the seam, say) are run whole. Batches hold at most
    ``max_batch_tokens`` tokens, padding included; a longer row runs alone, in pieces of that many
    tokens. Rows longer than ``max_position_embeddings`` are not run, and a row that runs out of
    memory on its own is given up: both become errors. Stats: ``tokens`` real tokens of the rows fed
    to the model, ``reused_tokens`` prefix tokens not recomputed, ``computed_tokens`` tokens fed to the
    model including padding, ``error_rows``.
    """
    not_run = {**(skip or {}), **_too_long(token_ids, getattr(trunk.config, "max_position_embeddings", None))}
    errors = dict(not_run)
    plen = prefix.length if prefix is not None and prefix.ids else 0
    shared = [_shares(t, prefix) for t in token_ids]
    fed = [t[plen:] if s else t for t, s in zip(token_ids, shared)]
    lengths = [len(t) for t in fed]
    d_model = trunk.config.hidden_size
    out = [torch.zeros(0, d_model) for _ in token_ids]
    computed = 0
    for group, group_prefix in ((True, prefix), (False, None)):
        rows = [i for i, s in enumerate(shared) if s == group and i not in errors]
        for batch in token_budget_batches([lengths[i] for i in rows], max_batch_tokens):
            batch = [rows[i] for i in batch]
            vectors, batch_errors = _forward_halving(trunk, [fed[i] for i in batch], pad_id,
                                                     [positions[i] for i in batch], max_batch_tokens, group_prefix)
            for i, v in zip(batch, vectors):
                out[i] = v
            errors.update((batch[i], e) for i, e in batch_errors.items())
            computed += len(batch) * max(lengths[i] for i in batch)
    fed_rows = [i for i in range(len(token_ids)) if i not in not_run]
    stats = {"tokens": sum(len(token_ids[i]) for i in fed_rows), "computed_tokens": computed,
             "reused_tokens": plen * sum(shared[i] for i in fed_rows), "error_rows": len(errors)}
    return out, stats, dict(sorted(errors.items()))


def extract_vectors(trunk, token_ids: list[list[int]], max_batch_tokens: int, pad_id: int,
                    prefix: SharedPrefix | None = None, skip: dict[int, str] | None = None):
    """Layer output at each row's last real token: float32 [rows, d_model] in input order (zeros for
    an error row), stats and errors, as ``extract_at`` gives them."""
    last = [[len(t) - 1] if t else [] for t in token_ids]
    vectors, stats, errors = extract_at(trunk, token_ids, last, max_batch_tokens, pad_id, prefix, skip)
    out = torch.zeros(len(token_ids), trunk.config.hidden_size, dtype=torch.float32)
    for i, v in enumerate(vectors):
        if len(v):
            out[i] = v[0]
    return out, stats, errors


def padding_fraction(stats: dict) -> float:
    """Share of the tokens fed to the model that were padding (reused prefix tokens are not fed)."""
    fed = stats["tokens"] - stats.get("reused_tokens", 0)
    return 1 - fed / stats["computed_tokens"] if stats.get("computed_tokens") else 0.0


# A window's vectors (the output held in memory before it is written) stay under this many batch
# budgets; four, so that extract.positions=all still fills whole batches from consecutive rows.
WINDOW_BATCHES = 4


@dataclass
class Prepared:
    """One chunk read and tokenized: ids, token ids (after data.truncation), {row: why it is not
    run}, how many rows were cut, and each row's positions column (extract.positions=column)."""
    ids: list[str]
    token_ids: list[list[int]]
    not_run: dict[int, str]
    truncated: int
    explicit: list | None = None


class ExtractStage:
    """Per-chunk extraction plus what the driver needs. ``trunk``/``tokenizer`` may be injected."""

    name = "extract"

    def __init__(self, cfg, rt, trunk=None, tokenizer=None):
        # extract.layer, when the user left it unset, comes from the verbalizer's nla_meta.yaml.
        self.protocol = resolve_protocol(cfg, stage="extract")
        self.cfg = cfg = self.protocol.cfg
        self.rt = rt
        # A finished chunk is checked against the input rows it covers (its metadata's input_rows).
        self.out = StageDir(cfg.extract.output_dir, suffix=".arrow", count_rows=count_input_rows)
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
        if self.cfg.extract.positions == "column":
            for shard in self.shards:
                check_positions_column(shard.path, read_schema(shard), self.cfg.extract.positions_column)
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
            "extract.positions": positions_rule(cfg.extract),
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
        # load; none for raw text, which shares no opening. Reading more than the last token may
        # read inside it: then its output is kept too.
        shared = prefix_ids(self.tokenizer, self.cfg.data)
        self.prefix = (SharedPrefix(self.trunk, input_ids=shared, keep_hidden=self.cfg.extract.positions != "last")
                       if shared else None)
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
            "positions": positions_rule(self.cfg.extract),
            "with_adapter": self.cfg.extract.with_adapter,
            "fingerprint": self.fingerprint,
        }

    def prepare(self, unit: Unit) -> Prepared:
        """Read and tokenize one chunk (CPU work the driver overlaps with the previous chunk's forward).
        A bad row stops the run here, before this chunk's model work, unless data.on_bad_row=skip."""
        chunk, ecfg = unit.source, self.cfg.extract
        extra = [ecfg.positions_column] if ecfg.positions == "column" else []
        ids, values, columns = read_values(chunk, self.cfg.data, extra)
        token_ids, problems = render_rows(self.tokenizer, values, self.cfg.data)
        col = input_column(self.cfg.data)
        problems = {i: (p, col) for i, p in problems.items()}  # {row: (problem, the column it is in)}
        for i, value in enumerate(columns.get(ecfg.positions_column) or []):
            problem = explicit_problem(value, ecfg.positions_column)
            if problem is not None and i not in problems:
                problems[i] = (problem, ecfg.positions_column)
        if problems and self.cfg.data.on_bad_row == "error":
            row, (problem, column) = min(problems.items())
            raise bad_row_error(chunk.shard.path, chunk.start + row, problem, self.cfg.data, column)
        not_run = {i: f"bad row: {p} (column {c!r})" for i, (p, c) in problems.items()}
        token_ids, too_long, truncated = bound_rows(token_ids, self.cfg.data, self.max_tokens(),
                                                    from_model=self.cfg.data.max_tokens is None)
        return Prepared(ids, token_ids, {**not_run, **too_long}, truncated, columns.get(ecfg.positions_column))

    def max_tokens(self) -> int | None:
        """data.max_tokens, or the model's maximum position when unset."""
        if self.cfg.data.max_tokens is not None:
            return self.cfg.data.max_tokens
        config = self.trunk.config if self.trunk is not None else load_model_config(self.cfg)
        return getattr(config, "max_position_embeddings", None)

    def _positions(self, prep: Prepared) -> tuple[list[list[int]], dict[int, str]]:
        """Each row's positions (extract.positions), and {row: why it is not run}: the prepared
        problems, rows too long for the model, and rows with no eligible position."""
        not_run = {**prep.not_run,
                   **_too_long(prep.token_ids, getattr(self.trunk.config, "max_position_embeddings", None))}
        positions = []
        for i, tokens in enumerate(prep.token_ids):
            chosen, problem = [], None
            if i not in not_run:
                explicit = prep.explicit[i] if prep.explicit is not None else None
                chosen, problem = select_positions(self.cfg.extract, len(tokens), prep.ids[i], explicit)
            if problem is not None:
                not_run[i] = problem
            positions.append(chosen)
        return positions, dict(sorted(not_run.items()))

    def _windows(self, prep: Prepared, positions: list[list[int]], not_run: dict[int, str]):
        """Consecutive rows, in input order, whose vectors together stay under WINDOW_BATCHES batch
        budgets (at least one row): a window's output is held in memory, then written. A row longer
        than the batch budget is a window of its own, streamed piece by piece (``long`` is True)."""
        budget = self.cfg.extract.max_batch_tokens
        window, held = [], 0
        for i, tokens in enumerate(prep.token_ids):
            fed = len(tokens) - (self.prefix.length if _shares(tokens, self.prefix) else 0)
            if i not in not_run and fed > budget:
                if window:
                    yield window, False
                window, held = [], 0
                yield [i], True
                continue
            if window and held + len(positions[i]) > WINDOW_BATCHES * budget:
                yield window, False
                window, held = [], 0
            window.append(i)
            held += len(positions[i])
        if window:
            yield window, False

    def process(self, unit: Unit, progress=None, prepared=None) -> dict:
        prep = prepared if prepared is not None else self.prepare(unit)
        positions, not_run = self._positions(prep)
        stats = {"tokens": 0, "computed_tokens": 0, "reused_tokens": 0, "error_rows": 0, "vectors": 0}
        path = self.out.chunk_path(unit.shard, unit.index)
        # Written as it is computed (an activation file can hold many vectors per input row), so
        # not through the background writer: an earlier chunk's write lands first.
        self.out.flush()
        self.out.write_atomic(path, lambda tmp: self._compute_and_write(tmp, unit, prep, positions, not_run, stats))
        stats["truncated_rows"] = prep.truncated
        log.info("extract %s chunk %d: %d rows, %d vector(s), %d tokens (%d from the cached prefix), padding %.1f%%%s",
                 unit.shard, unit.index, len(prep.ids), stats["vectors"], stats["tokens"], stats["reused_tokens"],
                 100 * padding_fraction(stats),
                 f", {prep.truncated} row(s) cut to {self.max_tokens()} tokens ({self.cfg.data.truncation})"
                 if prep.truncated else "")
        return stats

    def _compute_and_write(self, tmp, unit: Unit, prep: Prepared, positions, not_run, stats) -> None:
        chunk, tokens, budget = unit.source, prep.token_ids, self.cfg.extract.max_batch_tokens
        metadata = {**self.metadata, "input_rows": unit.num_rows}
        d_model = self.trunk.config.hidden_size
        pad_id = self.tokenizer.pad_token_id

        def report(i, error):
            stats["error_rows"] += 1
            log.warning("%s row %d (id %s): %s; not extracted: its activation is null and its 'error' says why",
                        chunk.shard.path, chunk.start + i, prep.ids[i], error)

        def rows_of(i, at, vectors):
            """Output columns of row i's vectors at positions ``at``."""
            return ([prep.ids[i]] * len(at), vectors, [len(tokens[i])] * len(at), at, [tokens[i][p] for p in at])

        with ActivationWriter(tmp, d_model, metadata, self.cfg.extract.output_dtype) as writer:
            for window, long in self._windows(prep, positions, not_run):
                if long:
                    i = window[0]
                    stats["tokens"] += len(tokens[i])
                    shares = _shares(tokens[i], self.prefix)
                    prefix = self.prefix if shares else None
                    fed = tokens[i][prefix.length:] if shares else tokens[i]
                    stats["computed_tokens"] += len(fed)
                    stats["reused_tokens"] += len(tokens[i]) - len(fed)
                    done = 0
                    try:
                        with torch.inference_mode():
                            for at, vectors in _pieces(self.trunk, fed, positions[i], budget, prefix):
                                writer.write(*rows_of(i, at, vectors.numpy()))
                                done += len(at)
                    except torch.OutOfMemoryError:
                        left = len(positions[i]) - done
                        error = (f"out of memory on one row of {len(tokens[i])} tokens"
                                 + (f" after {done} of its {len(positions[i])} positions were written" if done else ""))
                        report(i, error)
                        writer.write([prep.ids[i]], np.zeros((1, d_model), np.float32), [len(tokens[i])],
                                     errors={0: f"{error}; {left} position(s) not extracted"})
                    stats["vectors"] += done
                    continue
                skip = {j: not_run[i] for j, i in enumerate(window) if i in not_run}
                vectors, st, errors = extract_at(self.trunk, [tokens[i] for i in window], [positions[i] for i in window],
                                                 budget, pad_id, self.prefix, skip=skip)
                for key in ("tokens", "computed_tokens", "reused_tokens"):
                    stats[key] += st[key]
                columns = ([], [], [], [], [])
                row_errors = {}
                for j, i in enumerate(window):
                    if j in errors:
                        report(i, errors[j])
                        row_errors[len(columns[0])] = errors[j]
                        for column, value in zip(columns, ([prep.ids[i]], [np.zeros((1, d_model), np.float32)],
                                                           [len(tokens[i])], [None], [None])):
                            column.extend(value)
                        continue
                    at = positions[i]
                    ids, _, n, pos, tok = rows_of(i, at, None)
                    for column, value in zip(columns, (ids, [vectors[j].numpy()], n, pos, tok)):
                        column.extend(value)
                    stats["vectors"] += len(at)
                ids, blocks, n, pos, tok = columns
                writer.write(ids, np.concatenate(blocks) if blocks else np.zeros((0, d_model), np.float32), n, pos, tok,
                             row_errors)
