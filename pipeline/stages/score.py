"""Stage 3: explanations -> the NLA round trip: reconstruct each vector from its text, score it.

    nla-pipeline score --config configs/tiny.yaml
    nla-pipeline run --config configs/tiny.yaml          # the third stage whenever model.reconstructor is set

    from pipeline.stages.score import round_trip, fve_baseline
    cosine, mse = round_trip(predictions, vectors, scale=59.87)    # [rows] each, float32
    baseline, rows = fve_baseline(activation_files, scale=59.87)   # predict-the-mean error of the run

The release's formula (and Neuronpedia's): both vectors scaled to norm ``scale`` (sqrt(d_model)
unless the reconstructor says otherwise), ``mse = mean((p̂ - v̂)^2)`` (= 2(1 - cos)), ``cosine`` of
the raw vectors, and ``fve = 1 - mse / baseline``, where the baseline is the error of predicting the
mean: ``mean((v̂ - μ)^2)`` over every row and component of the run, ``μ`` the mean of the scaled
vectors. Rank 0 computes it in one pass over the activation files before any scoring (every rank
must use the same number), unless ``score.fve_baseline`` fixes it.

Each explanation file is a unit (the same shard/chunk layout as verbalize's); its rows are joined
to the vectors of the matching activation file by id and position (extract.positions may read
several positions of one row).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import __version__
from pipeline.io.activations import count_rows, read_activations, read_row_keys
from pipeline.driver import Unit
from pipeline.errors import PipelineError
from pipeline.io.layout import FINGERPRINT, StageDir
from pipeline.stages.verbalize import parquet_rows
from pipeline.protocol.nla_meta import META
from pipeline.protocol.verbalizer import vector_problem

log = logging.getLogger(__name__)
SUMMARY = "_summary.json"


def output_schema(d_model: int, keep_reconstruction: bool, metadata: dict) -> pa.Schema:
    fields = [pa.field("id", pa.string()), pa.field("position", pa.int32()), pa.field("token_id", pa.int32()),
              pa.field("cosine", pa.float32()), pa.field("mse", pa.float32()),
              pa.field("fve", pa.float32()), pa.field("finished", pa.bool_()), pa.field("n_generated", pa.int32()),
              pa.field("error", pa.string())]
    if keep_reconstruction:
        fields.append(pa.field("reconstruction", pa.list_(pa.float32(), d_model)))
    return pa.schema(fields, metadata=metadata)


def _scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows of ``x`` [rows, d] scaled to L2 norm ``scale``, in float32 (norm clamped at 1e-12)."""
    x = x.float()
    return x * (scale / x.norm(dim=1, keepdim=True).clamp_min(1e-12))


def round_trip(predictions: torch.Tensor, vectors: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine, mse) per row of predictions and vectors [rows, d_model], float32."""
    p, v = predictions.float(), vectors.float()
    cosine = (p * v).sum(dim=1) / (p.norm(dim=1) * v.norm(dim=1)).clamp_min(1e-12)
    mse = ((_scaled(p, scale) - _scaled(v, scale)) ** 2).mean(dim=1)
    return cosine, mse


def fve_baseline(paths, scale: float) -> tuple[float, int]:
    """(mean over rows and components of (v̂ - μ)², rows) over the valid vectors of ``paths``.

    One streaming pass: with every v̂ at norm ``scale``, the mean squared distance to the mean is
    (scale² - ‖μ‖²) / d, so only the running sum of v̂ is kept (float64)."""
    total, rows = None, 0
    for path in paths:
        _, vectors, _, _, errors = read_activations(path)
        v = torch.tensor(vectors)  # a copy: the file maps read-only memory
        ok = torch.isfinite(v).all(dim=1) & (v.norm(dim=1) > 0)
        ok[list(errors)] = False
        scaled = _scaled(v[ok], scale).double()
        total = scaled.sum(dim=0) if total is None else total + scaled.sum(dim=0)
        rows += int(ok.sum())
    if not rows:
        raise PipelineError("score: no valid activation vectors to compute the FVE baseline from; "
                            "set score.fve_baseline to a constant")
    mean = total / rows
    return float((scale ** 2 - mean.dot(mean)) / len(mean)), rows


def explanation_units(inp: StageDir) -> list[Unit]:
    """One unit per explanation file in ``inp``, with its row count; an unreadable file is one line."""
    units = []
    for path in inp.chunk_files():
        try:
            rows = parquet_rows(path)
        except Exception as e:  # noqa: BLE001 - any reader error is the same one line
            raise PipelineError(f"{path}: not a readable explanation file ({str(e).splitlines()[0]}); "
                                "run verbalize again to redo it") from e
        units.append(Unit(path.parent.name, int(path.stem.split("_")[1]), rows, path))
    return units


@dataclass(frozen=True)
class ScoreSource:
    explanations: object  # Path of the explanation file
    activations: object   # Path of the activation file it came from


class ScoreStage:
    """Per-chunk scoring plus what the driver needs. ``recon`` (a loaded Reconstructor) may be injected."""

    name = "score"

    def __init__(self, cfg, rt, recon=None):
        from pipeline.models.reconstructor import resolve_reconstructor

        from pipeline.protocol.resolve import resolve_protocol

        # extract.layer (a LoRA AR's default read layer) resolved as stage 1 resolves it.
        self.cfg = cfg = resolve_protocol(cfg, stage="extract").cfg
        self.rt = rt
        self.inp = StageDir(cfg.score_input_dir, ".parquet", count_rows=parquet_rows)
        self.acts = StageDir(cfg.verbalize_input_dir, ".arrow", count_rows=count_rows)
        self.out = StageDir(cfg.score.output_dir, ".parquet", count_rows=parquet_rows)
        self.spec = resolve_reconstructor(cfg)  # bad checkpoints and templates fail here, before any work
        self.recon = recon
        self.fingerprint: str | None = None
        self.shared: dict = {}  # the FVE baseline: computed by rank 0's plan(), broadcast by the driver

    def plan(self) -> list[Unit]:
        """Every explanation file, with the activation file it came from; then the FVE baseline."""
        units = [Unit(u.shard, u.index, u.num_rows, ScoreSource(u.source, self.acts.chunk_path(u.shard, u.index)))
                 for u in explanation_units(self.inp)]
        if not units:
            raise PipelineError(f"score.input_dir {self.inp.root}: no explanation files (run verbalize first)")
        self.shared = self.baseline([u.source.activations for u in units])
        return units

    def protocol_record(self) -> dict:
        """Saved as _protocol.json by rank 0 (the driver): the reconstructor's protocol and its sources."""
        spec = self.spec
        values = {"reconstructor.format": (spec.format, "the checkpoint's files"),
                  "reconstructor.prompt_template": (spec.template, spec.sources.get("template")),
                  "reconstructor.layer": (spec.layer, spec.sources.get("layer")),
                  "reconstructor.mse_scale": (spec.mse_scale, spec.sources.get("mse_scale"))}
        return {"sidecar": str(Path(spec.local_dir) / META) if (Path(spec.local_dir) / META).exists() else None,
                "values": {k: {"value": v, "source": src} for k, (v, src) in values.items()}}

    def log_protocol(self) -> None:
        spec = self.spec
        log.info("score: %s reconstructor %s; template %r (from %s), layer %d (from %s), scale %.4g (from %s)",
                 spec.format, spec.source, spec.template, spec.sources.get("template"), spec.layer,
                 spec.sources.get("layer"), spec.mse_scale, spec.sources.get("mse_scale"))

    def unit_from_verbalize(self, unit: Unit, verbalize_out: StageDir, extract_out: StageDir) -> Unit:
        """The score unit that reads a verbalize unit's output (used by ``run``)."""
        self.inp, self.acts = verbalize_out, extract_out
        return Unit(unit.shard, unit.index, unit.num_rows, ScoreSource(
            verbalize_out.chunk_path(unit.shard, unit.index), extract_out.chunk_path(unit.shard, unit.index)))

    def baseline(self, activation_files) -> dict:
        """The FVE baseline and where it came from (rank 0, before any scoring). The vectors' width
        is checked against the reconstructor's here too, before any model is loaded."""
        from pipeline.models.reconstructor import check_width

        self.log_protocol()
        activation_files = [p for p in activation_files if p.exists()]
        if activation_files:
            with pa.memory_map(str(activation_files[0])) as src:
                act = pa.ipc.open_stream(src).schema.field("activation").type
            check_width(self.spec, getattr(act, "list_size", None), str(activation_files[0]))
        if self.cfg.score.fve_baseline is not None:
            return {"fve_baseline": float(self.cfg.score.fve_baseline), "fve_baseline_source": "score.fve_baseline"}
        value, rows = fve_baseline(activation_files, self.spec.mse_scale)
        log.info("score: FVE baseline %.6f (predict-the-mean error over %d vector(s))", value, rows)
        return {"fve_baseline": value, "fve_baseline_source": f"predict-the-mean error of the {rows} scored vectors"}

    def expected_rows(self, unit: Unit) -> int:
        """Rows a finished output file must hold: its explanation file's (see VerbalizeStage's)."""
        try:
            return parquet_rows(unit.source.explanations)
        except Exception:  # noqa: BLE001 - missing or unreadable: the plan's count
            return unit.num_rows

    def shard_info(self, shard_name: str, units: list[Unit]) -> dict | None:
        marker = self.inp.shard_marker(shard_name)  # verbalize's: the shard's whole extent
        return marker if marker and "chunks" in marker and "rows" in marker else None

    def settings(self) -> dict:
        def input_fp(d: StageDir):
            path = d.root / FINGERPRINT
            return json.loads(path.read_text())["fingerprint"] if path.exists() else None

        return {"stage": "score", "explanations_fingerprint": input_fp(self.inp),
                "activations_fingerprint": input_fp(self.acts), **self.spec.settings(),
                "model.dtype": self.cfg.model.dtype, "score.keep_reconstruction": self.cfg.score.keep_reconstruction,
                "fve_baseline": self.shared.get("fve_baseline")}

    def setup(self) -> None:
        from pipeline.models.reconstructor import load_reconstructor

        if self.recon is None:
            self.recon = load_reconstructor(self.cfg, self.spec, self.rt.device)
        meta = {"nla_pipeline_version": __version__, "reconstructor": str(self.cfg.model.reconstructor),
                "format": self.spec.format, "template": self.spec.template, "layer": str(self.spec.layer),
                "mse_scale": str(self.spec.mse_scale), "fingerprint": str(self.fingerprint),
                "reconstructor_sources": json.dumps(self.spec.sources, sort_keys=True),
                **{k: str(v) for k, v in self.shared.items()}}
        self.schema = output_schema(self.spec.d_model, self.cfg.score.keep_reconstruction, meta)

    def process(self, unit: Unit, progress=None, prepared=None) -> dict:
        src = unit.source
        names = pq.read_schema(src.explanations).names
        keys = [c for c in ("position", "token_id") if c in names]  # files from before positions have neither
        expl = pq.read_table(src.explanations, columns=["id", *keys, "explanation", "finished", "n_generated", "error"])
        ids = expl.column("id").to_pylist()
        positions = expl.column("position").to_pylist() if "position" in keys else [None] * len(ids)
        texts, errors = expl.column("explanation").to_pylist(), expl.column("error").to_pylist()
        vectors = self._vectors(unit, list(zip(ids, positions)), errors)  # [rows, d]; a row without one has an error now
        todo = [i for i, e in enumerate(errors) if e is None]
        preds = torch.zeros(len(ids), self.spec.d_model)
        cosine, mse = torch.full((len(ids),), float("nan")), torch.full((len(ids),), float("nan"))
        stats: dict = {"tokens": 0, "scored_rows": 0, "error_rows": 0}
        if todo:
            from pipeline.models.reconstructor import reconstruct

            p, rstats, rerrors = reconstruct(self.recon, [texts[i] or "" for i in todo], self.cfg.score.max_batch_tokens)
            stats["tokens"] += rstats.get("tokens", 0)
            for j, e in rerrors.items():
                errors[todo[j]] = f"reconstructor: {e}"
            for j, i in enumerate(todo):
                if errors[i] is None and not torch.isfinite(p[j]).all():
                    errors[i] = "reconstructor: the prediction has non-finite values"
            keep = [j for j, i in enumerate(todo) if errors[i] is None]
            rows = torch.tensor([todo[j] for j in keep], dtype=torch.long)
            if len(keep):
                preds[rows] = p[keep]
                c, m = round_trip(p[keep], vectors[rows], self.spec.mse_scale)
                cosine[rows], mse[rows] = c, m
        baseline = self.shared["fve_baseline"]
        ok = [e is None for e in errors]
        stats["scored_rows"], stats["error_rows"] = sum(ok), len(ok) - sum(ok)
        columns = {
            "id": ids,
            "position": positions,
            "token_id": expl.column("token_id") if "token_id" in keys else [None] * len(ids),
            "cosine": pa.array(cosine.numpy(), pa.float32(), mask=~np.array(ok)),
            "mse": pa.array(mse.numpy(), pa.float32(), mask=~np.array(ok)),
            "fve": pa.array((1 - mse / baseline).numpy(), pa.float32(), mask=~np.array(ok)),
            "finished": expl.column("finished"), "n_generated": expl.column("n_generated"), "error": errors,
        }
        if self.cfg.score.keep_reconstruction:
            flat = pa.array(preds.numpy().reshape(-1), pa.float32())
            columns["reconstruction"] = pa.FixedSizeListArray.from_arrays(flat, self.spec.d_model, mask=pa.array(~np.array(ok)))
        table = pa.table(columns, schema=self.schema)
        self.out.write_chunk(self.out.chunk_path(unit.shard, unit.index), lambda tmp: pq.write_table(table, tmp))
        return stats

    def _vectors(self, unit: Unit, ids: list[tuple[str, int | None]], errors: list) -> torch.Tensor:
        """The vector of each explanation row, joined by (id, position): with extract.positions one id
        has many vectors. Rows with none (or a bad one) get an error, and vectors with no explanation
        are reported, in one line each."""
        out = torch.zeros(len(ids), self.spec.d_model)
        path = unit.source.activations
        if not path.exists():
            missing = [i for i, e in enumerate(errors) if e is None]
            for i in missing:
                errors[i] = f"no activation file {path}"
            log.warning("score %s chunk %d: no activation file %s; %d row(s) not scored", unit.shard, unit.index,
                        path, len(missing))
            return out
        act_ids, vectors, _, _, act_errors = read_activations(path, width=self.spec.d_model)
        act_positions = read_row_keys(path)["position"] or [None] * len(act_ids)
        act_ids = list(zip(act_ids, act_positions))
        where = {k: j for j, k in reversed(list(enumerate(act_ids)))}
        unmatched = []
        for i, key in enumerate(ids):
            j = where.get(key)
            if j is None:
                unmatched.append(key)
                errors[i] = errors[i] or f"no vector with this id{'' if key[1] is None else ' and position'} in {path}"
            else:
                out[i] = torch.tensor(vectors[j])
                problem = act_errors.get(j) or vector_problem(out[i])
                errors[i] = errors[i] or problem
        def shown(keys):
            return ", ".join(k if p is None else f"{k}@{p}" for k, p in keys[:10])

        if unmatched:
            log.warning("score %s chunk %d: %d explanation(s) have no vector in %s (ids %s)", unit.shard, unit.index,
                        len(unmatched), path, shown(unmatched))
        orphans = sorted(set(act_ids) - set(ids), key=str)
        if orphans:
            log.warning("score %s chunk %d: %d vector(s) in %s have no explanation (ids %s)", unit.shard, unit.index,
                        len(orphans), path, shown(orphans))
        return out

    def finish(self, units: list[Unit]) -> None:
        """Write ``_summary.json`` once every planned unit has its file (whichever rank sees that last)."""
        listing = self.out.listing({u.shard for u in units})
        if not all(self.out.chunk_name(u.index) in listing[u.shard] for u in units):
            return
        write_summary(self.out, self.inp, units, self.shared)


def write_summary(out: StageDir, explanations: StageDir, units: list[Unit], shared: dict) -> dict:
    """Rows scored and failed, mean and median cosine and FVE, the baseline, the best and worst row."""
    cos, fve, best, worst = [], [], None, None
    for u in units:
        t = pq.read_table(out.chunk_path(u.shard, u.index), columns=["id", "cosine", "fve"])
        c, f = t.column("cosine").to_numpy(zero_copy_only=False), t.column("fve").to_numpy(zero_copy_only=False)
        cos.append(c)
        fve.append(f)
        valid = ~np.isnan(f)
        if valid.any():
            hi, lo = int(np.nanargmax(f)), int(np.nanargmin(f))
            if best is None or f[hi] > best[0]:
                best = (float(f[hi]), u, hi)
            if worst is None or f[lo] < worst[0]:
                worst = (float(f[lo]), u, lo)
    cos_all, fve_all = np.concatenate(cos), np.concatenate(fve)
    scored = int((~np.isnan(fve_all)).sum())

    def stat(fn, x):
        return float(fn(x[~np.isnan(x)])) if scored else None

    def row(found):
        if found is None:
            return None
        value, u, i = found
        t = pq.read_table(explanations.chunk_path(u.shard, u.index), columns=["id", "explanation"]).slice(i, 1)
        return {"id": t.column("id")[0].as_py(), "fve": value, "explanation": t.column("explanation")[0].as_py()}

    summary = {"rows_scored": scored, "rows_failed": int(len(fve_all) - scored),
               "cosine_mean": stat(np.mean, cos_all), "cosine_median": stat(np.median, cos_all),
               "fve_mean": stat(np.mean, fve_all), "fve_median": stat(np.median, fve_all),
               **shared, "best": row(best), "worst": row(worst)}
    text = json.dumps(summary, indent=1, ensure_ascii=False)
    out.write_atomic(out.root / SUMMARY, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return summary
