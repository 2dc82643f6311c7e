"""Stage 2: activation files -> explanations (Parquet), by injecting each vector at the ㈎ token.

    nla-pipeline verbalize --config configs/tiny.yaml
    nla-pipeline verbalize --config configs/qwen2.5-7b-l20-av-v2.yaml verbalize.batch_size=256

    from pipeline.stages.verbalize import generate_explanations
    rows = generate_explanations(model, tokenizer, prompt, vectors, cfg)   # [(text, finished, n), ...]

This is the card's protocol with its two example bugs fixed: everything generated is decoded (the
card's ``generate(inputs_embeds=...)`` returns only new tokens), then cut at the stop string. Every
row has the same prompt, so no row is padded; the attention mask is still explicit. Two engines:
``continuous`` (default; pipeline.engines.decoding: shared prefix, continuous batching) and ``generate``
(transformers' generate per batch, the simple reference path), and ``vllm`` (pipeline.engines.vllm_engine,
``pip install "nla-pipeline[vllm]"``), which streams rows across chunks as ``continuous`` does.
"""
from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import __version__
from pipeline.io.activations import count_rows, read_activations, read_row_keys
from pipeline.engines.decoding import Decoder
from pipeline.driver import Unit
from pipeline.errors import PipelineError
from pipeline.io.layout import FINGERPRINT, StageDir
from pipeline.models.modeling import (
    load_model_config,
    load_tokenizer,
    load_verbalizer_model,
    model_identity,
    resolve_dtype,
    resolve_source,
    verbalizer_source,
)
from pipeline.protocol.resolve import resolve_protocol
from pipeline.protocol.verbalizer import (build_prompt, decode_row, depth_percent, hf_generation_config, inject,
                                         vector_problem)

log = logging.getLogger(__name__)

OUTPUT_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("position", pa.int32()),   # carried from the activation file: id + position is the row key
    pa.field("token_id", pa.int32()),
    pa.field("explanation", pa.string()),
    pa.field("finished", pa.bool_()),
    pa.field("n_generated", pa.int32()),
    pa.field("error", pa.string()),
])


def parquet_rows(path) -> int:
    """Rows of a Parquet file, from its footer; raises on a file without one (cut short)."""
    return pq.ParquetFile(path).metadata.num_rows


def activation_units(inp: StageDir) -> list[Unit]:
    """One unit per activation file in ``inp``, with its row count; an unreadable file is one line."""
    units = []
    for path in inp.chunk_files():
        try:
            rows = count_rows(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise PipelineError(f"{path}: not a readable activation file ({str(e).splitlines()[0]}); "
                                "run extract again to redo it") from e
        units.append(Unit(path.parent.name, int(path.stem.split("_")[1]), rows, path))
    return units


@torch.inference_mode()
def generate_explanations(model, tokenizer, prompt, vectors: torch.Tensor, cfg) -> list[tuple[str, bool, int]]:
    """(explanation, finished, n_generated) per vector; vectors [batch, d_model], all valid."""
    embeds = inject(model.get_input_embeddings(), prompt, vectors, cfg.verbalizer.injection_norm)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    stop = cfg.verbalizer.stop_string
    out = model.generate(
        inputs_embeds=embeds, attention_mask=mask, generation_config=hf_generation_config(cfg.generation, stop),
        tokenizer=tokenizer,
    )  # [batch, new_tokens]: only the generated tokens, since no input_ids were given
    eos = list(cfg.generation.eos_token_ids)
    return [decode_row(tokenizer, row.tolist(), eos, stop, cfg.verbalizer.start_string) for row in out.cpu()]


@dataclass
class _Chunk:
    """One activation file in flight: its rows, which are bad, and the explanations so far."""
    unit: Unit
    ids: list[str]
    vectors: torch.Tensor
    errors: list[str | None]
    good: list[int]
    keys: dict[str, list | None] = field(default_factory=dict)  # position, token_id (None: not in the file)
    results: dict[int, tuple[str, bool, int]] = field(default_factory=dict)

    @property
    def row_weight(self) -> float:
        """Progress per row: the plan counts a unit's rows as extract's input rows under ``run``, and
        with extract.positions an input row gives several vectors."""
        return self.unit.num_rows / len(self.ids) if self.ids else 1.0


def _drain(queue: deque):
    while queue:
        yield queue.popleft()


class VerbalizeStage:
    """Per-chunk verbalization plus what the driver needs. ``model``/``tokenizer`` may be injected."""

    name = "verbalize"

    def __init__(self, cfg, rt, model=None, tokenizer=None):
        self.rt = rt
        self.inp = StageDir(cfg.verbalize_input_dir, suffix=".arrow", count_rows=count_rows)
        self.out = StageDir(cfg.verbalize.output_dir, suffix=".parquet", count_rows=parquet_rows)
        self.fingerprint: str | None = None  # set by the driver from rank 0's settings
        # Every protocol value resolved (config > the verbalizer's nla_meta.yaml > default) before any work.
        if cfg.verbalize.engine == "vllm":  # before anything is planned or written: one line naming the extra
            from pipeline.engines.vllm_engine import import_vllm

            import_vllm()
        self.source_key, self.source = verbalizer_source(cfg)
        self.model, self.tokenizer = model, tokenizer or load_tokenizer(cfg, "model.verbalizer")
        self.protocol = resolve_protocol(cfg).with_special_tokens(self.tokenizer, self.source)
        self.cfg = cfg = self.protocol.cfg
        self.d_model = load_model_config(cfg, "model.verbalizer").hidden_size
        self.protocol.check_d_model(self.d_model, f"{self.source_key} {self.source}")
        depth = cfg.verbalizer.depth_pct
        if depth is None:  # the depth of the model whose activations these are
            depth = depth_percent(cfg.extract.layer, load_model_config(cfg).num_hidden_layers)
        # Built (and checked) before any model work: a bad template or token id fails here.
        self.prompt = build_prompt(self.tokenizer, cfg.verbalizer, depth, where=self.protocol.where)
        self.dtype = str(resolve_dtype(cfg.model.dtype, rt.device)).replace("torch.", "")

    def plan(self) -> list[Unit]:
        """Every activation file under the input directory, checked before any model work. Run by
        rank 0 alone (the driver broadcasts it): extract may still be adding files, and ranks that
        listed at different moments would split different lists."""
        units = activation_units(self.inp)
        if not units:
            raise PipelineError(f"verbalize.input_dir {self.inp.root}: no activation files (run extract first)")
        for unit in units:
            with pa.memory_map(str(unit.source)) as src:
                schema = pa.ipc.open_stream(src).schema
            act = schema.field("activation").type if "activation" in schema.names else None
            if act is None or not (pa.types.is_list(act) or pa.types.is_large_list(act)):  # lists: checked per row
                self._check_width(unit.source, getattr(act, "list_size", None))
        incomplete = sorted({u.shard for u in units if not self.inp.shard_complete(u.shard)})
        if incomplete:
            log.warning("verbalize: extract has not finished shard(s) %s; verbalizing the chunks that exist",
                        ", ".join(incomplete))
        return units

    def expected_rows(self, unit: Unit) -> int:
        """Rows a finished output file must hold: its activation file's. Under ``run`` the plan
        counts extract's input rows, which differ once extract.positions reads several per row."""
        try:
            return count_rows(unit.source)
        except (OSError, pa.ArrowInvalid):
            return unit.num_rows

    def unit_from_extract(self, unit: Unit, extract_out: StageDir) -> Unit:
        """The verbalize unit that reads an extract unit's output (used by ``run``)."""
        self.inp = extract_out  # under `run`, the input is always this run's extract output
        return Unit(unit.shard, unit.index, unit.num_rows, extract_out.chunk_path(unit.shard, unit.index))

    def _check_width(self, path, width: int | None) -> None:
        if width != self.d_model:
            raise PipelineError(
                f"{path}: activations have width {width}, but the verbalizer {self.source} has d_model {self.d_model}"
            )

    def shard_info(self, shard_name: str, units: list[Unit]) -> dict | None:
        """The shard's full extent, from extract's marker: the plan may have been listed while
        extract was still writing the shard, so its own units are not the whole shard. None while
        extract's marker, with its counts, is missing."""
        marker = self.inp.shard_marker(shard_name)
        return marker if marker and "chunks" in marker and "rows" in marker else None

    def protocol_record(self) -> dict:
        """Saved as _protocol.json beside the outputs by rank 0 (the driver), and logged."""
        self.protocol.log(self.name)
        return self.protocol.record()

    def settings(self) -> dict:
        cfg = self.cfg
        input_fp = self.inp.root / FINGERPRINT
        return {
            "stage": "verbalize",
            "input_fingerprint": json.loads(input_fp.read_text())["fingerprint"] if input_fp.exists() else None,
            "model.base": model_identity(resolve_source(cfg.model.base, "model.base")),
            "model.adapter": cfg.model.adapter,
            "model.verbalizer": model_identity(self.source) if cfg.model.verbalizer else None,
            "model.dtype": self.dtype,
            "prompt_sha256": self.prompt.sha256,
            "depth_pct": self.prompt.depth_pct,
            **{f"verbalizer.{k}": v for k, v in vars(cfg.verbalizer).items() if k != "prompt_template"},
            **{f"generation.{k}": v for k, v in vars(cfg.generation).items()},
            # continuous and generate write the same texts and keep the fingerprint they always had
            # (their outputs resume under either); vLLM's kernels are another computation.
            **({"verbalize.engine": "vllm", "vllm.lora": cfg.vllm.lora} if cfg.verbalize.engine == "vllm" else {}),
        }

    def setup(self) -> None:
        cfg = self.cfg
        self.decoder = None
        if cfg.verbalize.engine == "vllm":  # vLLM loads the weights itself: no transformers model here
            from pipeline.engines.vllm_engine import VllmDecoder

            self.decoder = VllmDecoder(cfg, self.tokenizer, self.prompt, self.rt.device, self.dtype)
        elif self.model is None:
            self.model = load_verbalizer_model(self.cfg, self.rt.device)
        if cfg.verbalize.engine == "continuous":  # the shared prefix is prefilled here, once per model load
            self.decoder = Decoder(self.model, self.tokenizer, self.prompt, cfg.generation, cfg.verbalizer,
                                   max_rows=cfg.verbalize.batch_size)
        self.metadata = {
            "nla_pipeline_version": __version__, "base_model": cfg.model.base, "adapter": str(cfg.model.adapter),
            "verbalizer": str(cfg.model.verbalizer),
            "prompt_sha256": self.prompt.sha256, "depth_pct": str(self.prompt.depth_pct),
            "injection_norm": str(cfg.verbalizer.injection_norm), "stop_string": str(cfg.verbalizer.stop_string),
            "generation": json.dumps(vars(cfg.generation), sort_keys=True), "dtype": self.dtype,
            "engine": cfg.verbalize.engine, "fingerprint": self.fingerprint,
        }

    def _generate(self, vectors: torch.Tensor) -> list[tuple[str, bool, int]]:
        """The ``generate`` engine: transformers' generate, batch after batch."""
        bs = self.cfg.verbalize.batch_size
        return [r for s in range(0, len(vectors), bs)
                for r in generate_explanations(self.model, self.tokenizer, self.prompt, vectors[s : s + bs], self.cfg)]

    def _decode(self, tokens: list[int]) -> tuple[str, bool, int]:
        vcfg = self.cfg.verbalizer
        return decode_row(self.tokenizer, tokens, list(self.cfg.generation.eos_token_ids), vcfg.stop_string,
                          vcfg.start_string)

    def _load(self, unit: Unit) -> _Chunk:
        """Read one activation file and find its bad rows (they get an error, not a generation)."""
        ids, vectors, _, _, width_errors = read_activations(unit.source, width=self.d_model)
        self._check_width(unit.source, vectors.shape[1])  # under `run`, the file did not exist at plan time
        vectors = torch.from_numpy(vectors.copy())  # [rows, d_model] float32
        errors = [width_errors.get(i) or vector_problem(v) for i, v in enumerate(vectors)]
        for i, e in enumerate(errors):
            if e is not None:
                log.warning("%s row %d (id %s): %s; skipped", unit.source, i, ids[i], e)
        return _Chunk(unit, ids, vectors, errors, [i for i, e in enumerate(errors) if e is None],
                      read_row_keys(unit.source))

    def _write(self, chunk: _Chunk) -> dict:
        results, ids = chunk.results, chunk.ids
        none = [None] * len(ids)
        table = pa.table({
            "id": ids,
            "position": chunk.keys.get("position") or none,
            "token_id": chunk.keys.get("token_id") or none,
            "explanation": [results[i][0] if i in results else "" for i in range(len(ids))],
            "finished": [results[i][1] if i in results else False for i in range(len(ids))],
            "n_generated": [results[i][2] if i in results else 0 for i in range(len(ids))],
            "error": chunk.errors,
        }, schema=OUTPUT_SCHEMA.with_metadata(self.metadata))
        unit = chunk.unit
        self.out.write_chunk(self.out.chunk_path(unit.shard, unit.index), lambda tmp: pq.write_table(table, tmp))
        return {"generated_tokens": sum(r[2] for r in results.values()), "bad_rows": len(ids) - len(chunk.good)}

    def process(self, unit: Unit, progress=None, prepared=None) -> dict:
        """One chunk on its own (the driver calls process_stream)."""
        ((_, stats),) = self.process_stream([(unit, prepared)], progress)
        return stats

    def process_stream(self, units, progress=None):
        """Yield (unit, stats) as chunks are written. With the continuous (or vllm) engine, one decoder stream
        runs through all of ``units`` [(unit, prepared)]: the next chunk's rows fill slots as soon as
        they free up, and a chunk is written the moment its last row ends, so the batch never drains
        at a chunk boundary. A file that fails to read stops the intake; rows already in flight are
        finished and written before the error is raised."""
        if self.decoder is None:
            for unit, _ in units:
                chunk = self._load(unit)
                chunk.results = dict(zip(chunk.good, self._generate(chunk.vectors[chunk.good])))
                yield unit, self._write(chunk)
            return
        tick = progress
        open_chunks: dict[tuple[str, int], _Chunk] = {}
        ready: deque[_Chunk] = deque()
        failure: list[BaseException] = []

        def rows():
            try:
                for unit, _ in units:
                    chunk = self._load(unit)
                    if not chunk.good:
                        ready.append(chunk)
                        continue
                    key = (unit.shard, unit.index)
                    open_chunks[key] = chunk
                    for i in chunk.good:
                        yield (key, i), chunk.vectors[i]
            except Exception as e:  # noqa: BLE001 - re-raised below, after the rows in flight are written
                failure.append(e)

        for (key, i), (tokens, _, _) in self.decoder.stream(rows(), None):
            chunk = open_chunks[key]
            chunk.results[i] = self._decode(tokens)
            if tick is not None:
                tick(chunk.row_weight)
            if len(chunk.results) == len(chunk.good):
                ready.append(open_chunks.pop(key))
            yield from ((c.unit, self._write(c)) for c in _drain(ready))
        yield from ((c.unit, self._write(c)) for c in _drain(ready))  # chunks with no good rows, at the end
        if failure:
            raise failure[0]
