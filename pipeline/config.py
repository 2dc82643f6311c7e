"""Typed run configuration: YAML file, then ``key=value`` overrides, unknown keys refused.

    from pipeline.config import load_config
    cfg = load_config("configs/tiny.yaml", ["model.dtype=float32", "data.chunk_rows=64"])
    cfg.extract.layer        # 20
    print(describe_keys())   # every key with its one-line doc (used by --help)

Every field carries its doc in ``metadata["help"]``; the README's key table is the same text.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.errors import PipelineError


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    base: str = _f("Qwen/Qwen2.5-7B-Instruct", "base model: HF id, local directory, or builtin:tiny")
    adapter: str | None = _f(None, "verbalizer LoRA on model.base: HF id, local directory, or builtin:tiny-lora "
                             "(stage 2); set this or model.verbalizer, not both")
    verbalizer: str | None = _f(None, "fully fine-tuned verbalizer (AV), used in stage 2 in place of model.base + "
                                "model.adapter: HF id or local directory; stage 1 still reads model.base")
    dtype: str = _f("auto", "auto|bfloat16|float16|float32; auto is bfloat16 on CUDA, float32 on CPU")
    device: str = _f("auto", "auto|cpu|cuda; auto picks this process's GPU when there is one")
    attn_implementation: str = _f("auto", "auto (CPU: sdpa_gqa, CUDA: sdpa), sdpa_gqa (grouped-KV SDPA + shared-prefix "
                                  "attention, pipeline/engines/attention.py) or any from_pretrained value: sdpa|eager|flash_attention_2")
    allow_adapter_base_mismatch: bool = _f(False, "load an adapter whose recorded base differs from model.base")
    reconstructor: str | None = _f(None, "activation reconstructor (AR) for stage 3 (score): HF id, local directory, "
                                   "or builtin:tiny-ar; null means run has no score stage")


@dataclass
class DataConfig:
    paths: list[str] = _f([], "Parquet files or globs, in order, local or fsspec URLs (hf://, s3://, gs://, "
                          "https://, file://); empty means the bundled sample prompts")
    format: str = _f("prompt", "prompt|messages|text: a string rendered as one user message by the chat template; "
                     "a list of {role, content} rendered whole by it; raw text, no template")
    prompt_column: str = _f("prompt", "column holding each prompt (data.format=prompt; rendered as one user message)")
    messages_column: str = _f("messages", "column holding each conversation, a list of {role, content} structs "
                              "(data.format=messages)")
    text_column: str = _f("text", "column holding each raw text (data.format=text)")
    add_generation_prompt: bool = _f(True, "data.format=messages: end the rendering with the assistant header, "
                                     "as prompt does")
    id_column: str = _f("id", "column holding row ids; when absent the id is '<shard name>:<row index>', "
                         "e.g. 00000-train:17")
    chunk_rows: int = _f(256, "rows per chunk, the unit of work, output file and resume")
    max_tokens: int | None = _f(None, "most tokens a rendered row may have; null: the model's max_position_embeddings")
    truncation: str = _f("error_row", "error_row|left|right: a longer row becomes an error row, or loses its first "
                         "tokens (left: keeps the end) or its last ones (right: keeps the start)")
    on_bad_row: str = _f("error", "error|skip: a null, a wrong type, a malformed message list or an empty rendering "
                         "stops the run naming its file and row, or becomes an error row (null activation) and "
                         "the run goes on")
    remote_timeout_s: float = _f(60.0, "URLs in data.paths: seconds to wait for the server (to connect, or "
                                 "between bytes, http/https) before the read fails naming the URL")


@dataclass
class ExtractConfig:
    output_dir: str = _f("outputs/extract", "where activation Arrow files are written")
    layer: int = _f(20, "decoder layer whose output is kept (model.model.layers[layer])")
    max_batch_tokens: int = _f(8192, "token budget per forward pass, padding included")
    output_dtype: str = _f("float32", "float32|float16 for the stored activation vectors")
    with_adapter: bool = _f(False, "extract with model.adapter active (the card's bug; off by default)")
    positions: str = _f("last", "last|all|random|column: which positions of each rendered row are read (one output "
                        "row per position, keyed by id + position)")
    positions_per_row: int = _f(10, "extract.positions=random: positions drawn per row (a row with fewer eligible "
                                "ones gives all of them)")
    min_position: int = _f(50, "extract.positions=random: the first index that may be drawn (the NLA release's 50)")
    seed: int = _f(0, "extract.positions=random: with each row's id, seeds that row's draw (the same positions on "
                   "resume and with any process count)")
    positions_column: str = _f("positions", "extract.positions=column: a list<int> column of positions per row; "
                               "negative ones count from the end")


@dataclass
class VerbalizerConfig:
    prompt_template: str = _f("", "verbalizer prompt with {depth_pct} and {injection_char} placeholders")
    chat_template: bool = _f(False, "wrap the prompt in the chat template as one user message")
    add_special_tokens: bool = _f(True, "add_special_tokens when encoding the prompt")
    injection_char: str = _f("㈎", "the character whose embedding is replaced by the activation")
    injection_token_id: int | None = _f(None, "the id injection_char must encode to (checked); null: not checked")
    injection_norm: float = _f(150.0, "L2 norm each vector is normalized to (never multiplied by)")
    depth_pct: int | None = _f(None, "depth named in the prompt; null means round(100*(layer+0.5)/num_layers)")
    neighbor_token_ids: list[int] | None = _f(None, "optional [left, right] token ids required beside the injection token")
    stop_string: str | None = _f("</explanation>", "text that ends an explanation (cut, not kept); null for none")
    start_string: str | None = _f(None, "text the output opens with before the explanation (cut with what precedes "
                                  "it), e.g. <explanation>; null for none")


@dataclass
class GenerationConfig:
    max_new_tokens: int = _f(120, "most tokens generated per row")
    do_sample: bool = _f(False, "sampling; the card decodes greedily")
    repetition_penalty: float = _f(1.05, "penalty over generated tokens (Qwen2.5-Instruct's default)")
    temperature: float = _f(0.7, "used only when do_sample is true")
    top_p: float = _f(0.8, "used only when do_sample is true")
    top_k: int = _f(20, "used only when do_sample is true")
    eos_token_ids: list[int] | None = _f(None, "token ids that end generation; null: the verbalizer's "
                                         "generation_config.json, else its tokenizer's eos; [] for none (a token cap)")
    pad_token_id: int | None = _f(None, "pad id for finished rows; null: the verbalizer's generation_config.json, "
                                  "else its tokenizer's pad or eos")


@dataclass
class VerbalizeConfig:
    input_dir: str | None = _f(None, "activation files to read; null means extract.output_dir")
    output_dir: str = _f("outputs/verbalize", "where explanation Parquet files are written")
    batch_size: int = _f(64, "most rows decoded at once (continuous batching refills freed slots)")
    engine: str = _f("continuous", "continuous (shared prefix, eviction/refill) | generate (plain HF generate per batch) "
                     "| vllm (vLLM with prompt_embeds; pip install 'nla-pipeline[vllm]'; keys vllm.*)")
    merge_lora: bool = _f(True, "merge the LoRA into the weights for inference (peft merge_and_unload)")


@dataclass
class VllmConfig:
    max_num_seqs: int = _f(256, "verbalize.engine=vllm: most sequences vLLM's scheduler decodes at once")
    gpu_memory_utilization: float | None = _f(None, "verbalize.engine=vllm: fraction of the GPU's memory vLLM may "
                                              "take (weights + KV cache; on CPU, of the machine's memory); null: 0.9 "
                                              "on CUDA, 0.3 on CPU")
    max_model_len: int | None = _f(None, "verbalize.engine=vllm: context length vLLM plans for; null: the verbalizer "
                                   "prompt's length + generation.max_new_tokens")
    enable_prefix_caching: bool = _f(True, "verbalize.engine=vllm: reuse the KV cache of the prompt prefix every "
                                     "row shares")
    lora: str = _f("merged", "verbalize.engine=vllm: merged (LoRA merged into a checkpoint written once under "
                   "vllm.merged_dir) | adapter (served as a vLLM LoRA request, max_lora_rank from adapter_config.json)")
    merged_dir: str | None = _f(None, "verbalize.engine=vllm, vllm.lora=merged: where merged checkpoints are kept, "
                                "one per base + adapter + dtype; null: $NLA_PIPELINE_CACHE (~/.cache/nla-pipeline)/merged")


@dataclass
class ReconstructorConfig:
    prompt_template: str | None = _f(None, "AR prompt with {explanation} once; null: the checkpoint's nla_meta.yaml, "
                                     "else the release's 'Summary of the following text: <text>{explanation}</text> <summary>'")
    add_special_tokens: bool = _f(True, "add_special_tokens when encoding the AR prompt")
    layer: int | None = _f(None, "decoder layer whose output the AR reads; null: nla_meta.yaml, else the AR's last "
                           "layer (value head) or extract.layer (LoRA)")
    mse_scale: float | None = _f(None, "norm both vectors are scaled to before the MSE; null: nla_meta.yaml "
                                 "extraction.mse_scale, else sqrt(d_model)")


@dataclass
class ScoreConfig:
    input_dir: str | None = _f(None, "explanation files to score; null means verbalize.output_dir")
    output_dir: str = _f("outputs/score", "where score Parquet files and _summary.json are written")
    max_batch_tokens: int = _f(8192, "token budget per AR forward pass, padding included")
    fve_baseline: float | None = _f(None, "FVE denominator; null: the predict-the-mean error of the scored vectors")
    keep_reconstruction: bool = _f(False, "also write each predicted vector (column 'reconstruction')")


@dataclass
class ReportConfig:
    output: str | None = _f(None, "HTML file 'nla-pipeline report' writes; null means report.html in the common "
                            "parent of the stage output directories")
    sample_rows: int = _f(2000, "rows in the page's table of explanations: a uniform random sample of the run, by id")
    best_worst: int = _f(20, "rows in each of the best and the worst tables, by FVE (when scored)")
    seed: int = _f(0, "seed of the table's sample (the same seed and ids give the same rows)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    verbalizer: VerbalizerConfig = field(default_factory=VerbalizerConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    verbalize: VerbalizeConfig = field(default_factory=VerbalizeConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    reconstructor: ReconstructorConfig = field(default_factory=ReconstructorConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    log_level: str = _f("INFO", "logging level for the console and the per-rank log files")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def is_set(self, key: str) -> bool:
        """Whether the user set ``key`` (dotted) in a YAML file (inherited ones included) or on the
        command line. Such a value wins over a checkpoint's nla_meta.yaml; a default does not."""
        return key in getattr(self, "_explicit", ())

    @property
    def verbalize_input_dir(self) -> str:
        return self.verbalize.input_dir or self.extract.output_dir

    @property
    def score_input_dir(self) -> str:
        return self.score.input_dir or self.verbalize.output_dir


def _check_type(value, tp, key: str):
    """Coerce/validate one YAML value against a field's annotation; ints may stand for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _check_type(value, next(a for a in args if a is not type(None)), key)
    if origin is list:
        if not isinstance(value, list):
            raise PipelineError(f"config key {key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_type(v, item, key) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise PipelineError(f"config key {key}: expected {tp.__name__}, got {value!r}")
    return value


def _apply(obj, updates: dict, prefix: str = "", explicit: set | None = None) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise PipelineError(f"unknown config key {key!r}; valid keys: nla-pipeline --help")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise PipelineError(f"config key {key}: expected a mapping of its sub-keys")
            _apply(current, v, key + ".", explicit)
        else:
            setattr(obj, k, _check_type(v, hints[k], key))
            if explicit is not None:
                explicit.add(key)


def _parse_override(item: str) -> dict:
    if "=" not in item:
        raise PipelineError(f"override {item!r} is not key=value (for example model.dtype=float32)")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return nested


def _load_yaml(cfg: Config, path: Path, explicit: set, seen: tuple = ()) -> None:
    """Apply one YAML file; ``inherit: other.yaml`` (relative to it) is applied first."""
    if path.resolve() in seen:
        raise PipelineError(f"config {path}: 'inherit' loops back to itself")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise PipelineError(f"cannot read config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise PipelineError(f"config {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise PipelineError(f"config {path}: expected a mapping at the top level")
    parent = data.pop("inherit", None)
    if parent:
        _load_yaml(cfg, path.parent / parent, explicit, seen + (path.resolve(),))
    _apply(cfg, data, explicit=explicit)


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    cfg = Config()
    explicit: set[str] = set()
    if path:
        _load_yaml(cfg, Path(path), explicit)
    for item in overrides:
        _apply(cfg, _parse_override(item), explicit=explicit)
    cfg._explicit = frozenset(explicit)  # not a field: never saved, never a key a user can set
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    choices = {
        "model.dtype": (cfg.model.dtype, ("auto", "bfloat16", "float16", "float32")),
        "model.device": (cfg.model.device, ("auto", "cpu", "cuda")),
        "extract.output_dtype": (cfg.extract.output_dtype, ("float32", "float16")),
        "verbalize.engine": (cfg.verbalize.engine, ("continuous", "generate", "vllm")),
        "vllm.lora": (cfg.vllm.lora, ("merged", "adapter")),
        "data.format": (cfg.data.format, ("prompt", "messages", "text")),
        "data.on_bad_row": (cfg.data.on_bad_row, ("error", "skip")),
        "data.truncation": (cfg.data.truncation, ("error_row", "left", "right")),
        "extract.positions": (cfg.extract.positions, ("last", "all", "random", "column")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise PipelineError(f"config key {key}: {value!r} is not one of {'|'.join(allowed)}")
    for key, value in (("data.chunk_rows", cfg.data.chunk_rows), ("extract.max_batch_tokens", cfg.extract.max_batch_tokens),
                       ("verbalize.batch_size", cfg.verbalize.batch_size),
                       ("score.max_batch_tokens", cfg.score.max_batch_tokens),
                       ("generation.max_new_tokens", cfg.generation.max_new_tokens),
                       ("report.sample_rows", cfg.report.sample_rows),
                       ("extract.positions_per_row", cfg.extract.positions_per_row),
                       ("vllm.max_num_seqs", cfg.vllm.max_num_seqs), ("vllm.max_model_len", cfg.vllm.max_model_len or 1)):
        if value < 1:
            raise PipelineError(f"config key {key}: must be at least 1, got {value}")
    if cfg.vllm.gpu_memory_utilization is not None and not 0 < cfg.vllm.gpu_memory_utilization <= 1:
        raise PipelineError("config key vllm.gpu_memory_utilization: must be in (0, 1], got "
                            f"{cfg.vllm.gpu_memory_utilization}")
    if cfg.extract.min_position < 0:
        raise PipelineError(f"config key extract.min_position: must be at least 0, got {cfg.extract.min_position}")
    if not cfg.data.remote_timeout_s > 0:
        raise PipelineError(f"config key data.remote_timeout_s: must be more than 0, got {cfg.data.remote_timeout_s}")
    if cfg.data.max_tokens is not None and cfg.data.max_tokens < 1:
        raise PipelineError(f"config key data.max_tokens: must be at least 1 (or null), got {cfg.data.max_tokens}")
    if cfg.model.adapter and cfg.model.verbalizer:
        raise PipelineError(f"config keys model.adapter ({cfg.model.adapter!r}) and model.verbalizer "
                            f"({cfg.model.verbalizer!r}) are both set: stage 2 runs either a LoRA on model.base "
                            "or a fully fine-tuned verbalizer; set one to null")
    if cfg.report.best_worst < 0:
        raise PipelineError(f"config key report.best_worst: must be at least 0, got {cfg.report.best_worst}")
    # Each stage owns its directory (fingerprint, markers, --overwrite): two stages must not share one.
    dirs = {"extract.output_dir": cfg.extract.output_dir, "verbalize.output_dir": cfg.verbalize.output_dir,
            "score.output_dir": cfg.score.output_dir}
    for key, value in (("verbalize.input_dir", cfg.verbalize.input_dir), ("score.input_dir", cfg.score.input_dir)):
        if value:
            dirs[key] = value
    reads = {("extract.output_dir", "verbalize.input_dir"), ("verbalize.output_dir", "score.input_dir")}
    seen: dict[str, str] = {}
    for key, value in dirs.items():
        path = os.path.abspath(os.path.expanduser(value))
        if path in seen and (seen[path], key) not in reads:
            raise PipelineError(f"config keys {seen[path]} and {key} name the same directory {value!r}; "
                                "give each stage its own output directory")
        seen.setdefault(path, key)


def describe_keys() -> str:
    """``section.key  default  doc`` for every key, for --help and the README."""
    lines = []

    def walk(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                shown = json.dumps(value, ensure_ascii=False)
                shown = shown if len(shown) < 24 else shown[:21] + "..."
                lines.append(f"  {prefix + f.name:<36} {shown:<24} {f.metadata.get('help', '')}")

    walk(Config())
    return "\n".join(lines)


def fingerprint(settings: dict) -> str:
    """A short stable hash of the settings that change a stage's outputs."""
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
