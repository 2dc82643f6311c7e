"""Shared fixtures: the real Qwen2.5 tokenizer and a tiny random 28-layer Qwen2 (+ LoRA), built once.

Everything runs offline in a temp dir. NLA_PIPELINE_CACHE points at the session's temp dir, so
``builtin:tiny`` in configs/tiny.yaml resolves to the very model these fixtures build.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent
# huggingface_hub reads HF_HUB_OFFLINE when it is first imported (during collection), so set it here.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def offline_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("nla-cache")
    old = {"NLA_PIPELINE_CACHE": os.environ.get("NLA_PIPELINE_CACHE")}
    os.environ["NLA_PIPELINE_CACHE"] = str(cache)
    yield cache
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def reset_pipeline_logger():
    """An in-process CLI run gives the ``pipeline`` logger its own handlers (one on the stderr that
    pytest captured for that test) and stops propagation; undo that, so that caplog sees records."""
    yield
    logger = logging.getLogger("pipeline")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True


@pytest.fixture(scope="session")
def tiny_model_dir(offline_cache) -> str:
    from pipeline.models.tiny import resolve_builtin

    return resolve_builtin("builtin:tiny")


@pytest.fixture(scope="session")
def tiny_adapter_dir(offline_cache, tiny_model_dir) -> str:
    from pipeline.models.tiny import resolve_builtin

    return resolve_builtin("builtin:tiny-lora")


@pytest.fixture(scope="session")
def tiny_ar_dir(offline_cache, tiny_model_dir) -> str:
    from pipeline.models.tiny import resolve_builtin

    return resolve_builtin("builtin:tiny-ar")


@pytest.fixture(scope="session")
def tiny_ar_lora_dir(offline_cache, tiny_model_dir) -> str:
    from pipeline.models.tiny import resolve_builtin

    return resolve_builtin("builtin:tiny-ar-lora")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_parquet(path: Path, columns: dict, row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def tiny_overrides(tmp_path: Path, **extra) -> list[str]:
    """key=value overrides that point every stage's outputs into tmp_path."""
    items = {"extract.output_dir": str(tmp_path / "extract"), "verbalize.output_dir": str(tmp_path / "verbalize"),
             "score.output_dir": str(tmp_path / "score")}
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


TINY_CONFIG = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, offline_cache, tiny_adapter_dir):
    """One ``nla-pipeline run --config configs/tiny.yaml`` end to end, in a subprocess: (its output
    directory, the finished process). Shared by the CLI test and the report tests; treat it as read-only."""
    out = tmp_path_factory.mktemp("tiny-run")
    env = {**os.environ, "NLA_PIPELINE_CACHE": str(offline_cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", TINY_CONFIG, *tiny_overrides(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="session")
def peft_model(tiny_model_dir, tiny_adapter_dir):
    """The card's model: base + LoRA as a PeftModel, float32, unmerged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, tiny_adapter_dir).eval()


@pytest.fixture(scope="session")
def vectors(peft_model):
    from tests.card_reference import varied_vectors

    return varied_vectors(peft_model.config.hidden_size)


@pytest.fixture(scope="session")
def reference(peft_model, tokenizer, vectors):
    """Every test vector through the card's one-at-a-time generate (computed once per session)."""
    from tests.card_reference import card_generate

    return [card_generate(peft_model, tokenizer, v) for v in vectors]
