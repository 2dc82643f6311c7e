"""Command line: ``nla-pipeline {extract,verbalize,score,run,status,report} --config FILE [key=value ...]``.

    nla-pipeline run --config configs/tiny.yaml                 # offline demo, CPU
    nla-pipeline extract --config configs/qwen2.5-7b-l20-av-v2.yaml model.dtype=float32
    nla-pipeline verbalize --config configs/qwen2.5-7b-l20-av-v2.yaml --overwrite
    nla-pipeline score --config configs/tiny.yaml
    nla-pipeline report --config configs/tiny.yaml              # one HTML page: plots, throughput, explanations
    accelerate launch --num_processes 8 -m pipeline run --config configs/qwen2.5-7b-l20-av-v2.yaml

Every PipelineError becomes one line on stderr and exit status 1; nothing else is caught.
"""
from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import describe_keys, load_config
from pipeline.errors import PeerFailed, PipelineError

log = logging.getLogger("pipeline.cli")

COMMANDS = {
    "extract": "stage 1: prompts -> layer activations (Arrow)",
    "verbalize": "stage 2: activations -> explanations (Parquet)",
    "score": "stage 3: explanations -> reconstructed vectors, cosine and FVE (Parquet)",
    "run": "extract, then verbalize, then score when model.reconstructor is set",
    "status": "chunks done and pending, per stage",
    "report": "one self-contained HTML page of a run: plots, throughput, a searchable table of explanations",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nla-pipeline",
        description="Verbalize a language model's activations with an NLA verbalizer, at dataset scale.",
        epilog="config keys (override any with key=value):\n" + describe_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog="config keys:\n" + describe_keys(), formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", "-c", help="YAML config file (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. model.dtype=float32")
        if name not in ("status", "report"):
            p.add_argument("--overwrite", action="store_true", help="delete this stage's previous output and start clean")
    return parser


def _dispatch(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.command == "status":
        from pipeline.status import print_status

        print_status(cfg)
        return 0
    if args.command == "report":
        return _report(cfg)
    from pipeline.runtime import init_runtime

    rt = init_runtime(cfg)
    try:
        return _run(args, cfg, rt)
    except PeerFailed as e:
        # Rank 0 prints the error; this rank notes it in its own log file (if it has one yet), so
        # that the console shows one line per failure, not one per rank.
        if logging.getLogger("pipeline").handlers:
            log.error("%s", e)
        return 1
    finally:
        rt.close()


def _report(cfg) -> int:
    """Write the page and print its path (the one line on stdout); progress goes to the log."""
    import torch

    from pipeline.report import write_report
    from pipeline.runtime import Runtime

    Runtime(0, 1, torch.device("cpu")).setup_logging(cfg.log_level)  # console only: the report writes no log file
    print(write_report(cfg))
    return 0


def _resolve_models(cfg, command: str) -> None:
    from pipeline.models.modeling import resolve_source

    resolve_source(cfg.model.base, "model.base")
    # extract and score read the verbalizer's sidecar too when extract.layer is left to it
    wants_verbalizer = command in ("verbalize", "run") or not cfg.is_set("extract.layer")
    if cfg.model.adapter and wants_verbalizer:
        resolve_source(cfg.model.adapter, "model.adapter")
    if cfg.model.verbalizer and wants_verbalizer:
        resolve_source(cfg.model.verbalizer, "model.verbalizer")
    if cfg.model.reconstructor and command in ("score", "run"):
        resolve_source(cfg.model.reconstructor, "model.reconstructor")


def _run(args, cfg, rt) -> int:
    from pipeline.driver import run_pipeline, run_stage
    from pipeline.stages.extract import ExtractStage
    from pipeline.stages.score import ScoreStage
    from pipeline.stages.verbalize import VerbalizeStage

    # Rank 0 builds (builtin:) or downloads the models first, then the others find them in place.
    # Each step is a collective that also checks for errors: one rank's failure ends every rank.
    with rt.together("loading the models"):
        if rt.is_main:
            _resolve_models(cfg, args.command)
    with rt.together("setting up"):
        if not rt.is_main:
            _resolve_models(cfg, args.command)
        stages = {"extract": ExtractStage, "verbalize": VerbalizeStage, "score": ScoreStage}
        names = [args.command] if args.command != "run" else ["extract", "verbalize"] + (
            ["score"] if cfg.model.reconstructor else [])
        made = [stages[name](cfg, rt) for name in names]
    if args.command == "run":
        results = run_pipeline(*made[:2], cfg, rt, overwrite=args.overwrite, score_stage=(made[2:] or [None])[0])
    else:
        results = [run_stage(made[0], cfg, rt, overwrite=args.overwrite)]
    if rt.is_main:
        from pipeline.io.summary import print_summary

        print_summary(results, rt.world_size)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except PipelineError as e:
        print(f"nla-pipeline {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"nla-pipeline {args.command}: interrupted; finished chunks are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
