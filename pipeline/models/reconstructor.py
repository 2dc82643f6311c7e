"""The activation reconstructor (AR): read an explanation, predict the activation vector back.

    from pipeline.models.reconstructor import resolve_reconstructor, load_reconstructor, reconstruct
    spec = resolve_reconstructor(cfg)             # format, template, layer, scale: no weights loaded
    recon = load_reconstructor(cfg, spec, device)
    predictions, stats, errors = reconstruct(recon, ["a cat on a mat", ...], max_batch_tokens=8192)

Two checkpoint formats, told apart by their files:
- ``value_head``: the release's AR (e.g. kitft/nla-qwen2.5-7b-L20-ar), a causal-LM checkpoint cut after
  the read layer plus ``value_head.safetensors`` (Linear d_model -> d_model); its own tokenizer.
- ``lora``: a PEFT adapter on ``model.base`` (adapter_config.json); the prediction is the raw output
  of decoder layer ``layer`` itself (a ``value_head.safetensors`` beside the adapter is applied too).
Either way the rendered template is read at its last token, the final norm removed. Template, layer
and ``mse_scale`` come from the config when set, else the checkpoint's ``nla_meta.yaml``, else defaults.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pipeline.engines.attention import resolve_attention
from pipeline.errors import PipelineError
from pipeline.models.architecture import remove_final_norm
from pipeline.stages.extract import extract_vectors
from pipeline.models.modeling import (load_errors, load_model_config, load_tokenizer, model_identity, resolve_dtype,
                                      resolve_source)
from pipeline.protocol.nla_meta import LAYER_KEYS, META, Sidecar, checkpoint_files, read_sidecar
from pipeline.engines.prefix import SharedPrefix

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"
PLACEHOLDER = "{explanation}"
VALUE_HEAD = "value_head.safetensors"
# Where a sidecar keeps the template, first found wins (schema_version 2 and its variants).
TEMPLATE_KEYS = ("prompt_templates.reconstructor", "prompt_templates.critic", "prompt_templates.ar")
# The AR reads at its critic layer when the sidecar names one; then the generic layer keys.
AR_LAYER_KEYS = ("critic.extraction_layer_index",) + tuple(k for k in LAYER_KEYS if k != "critic.extraction_layer_index")
# Small files enough to resolve a Hub checkpoint: its weights are fetched only by load_reconstructor.
_METADATA_FILES = ["config.json", "adapter_config.json", VALUE_HEAD]
# Explanation openings probed to find the template tokens no explanation can change (see _prefix_ids).
_SEAM_PROBES = ["", "a", "A", " a", "1", ".", ">", "<", "\n", "{", "é", "你", "🙂"]


@dataclass(frozen=True)
class ReconstructorSpec:
    """Everything that decides the predictions, resolved without loading weights."""

    source: str              # resolved local directory, or a Hub id
    format: str              # "value_head" | "lora"
    template: str            # contains "{explanation}" exactly once
    add_special_tokens: bool
    layer: int               # decoder layer whose output is read
    mse_scale: float         # norm both vectors are scaled to before the MSE
    d_model: int
    sources: dict            # template/layer/mse_scale -> "config" | "nla_meta.yaml" | "default"
    local_dir: str = ""      # where the metadata files were read (source itself, or a Hub snapshot)
    value_head: str | None = None  # the value head file, when there is one
    identity: str = ""       # source plus a hash of its metadata files
    base_identity: str | None = None  # model.base, for the LoRA format

    def settings(self) -> dict:
        settings = {
            "reconstructor.format": self.format,
            "model.reconstructor": self.identity or self.source,
            "reconstructor.value_head": self.value_head is not None,
            "reconstructor.prompt_template": self.template,
            "reconstructor.add_special_tokens": self.add_special_tokens,
            "reconstructor.layer": self.layer,
            "reconstructor.mse_scale": self.mse_scale,
        }
        if self.base_identity is not None:
            settings["model.base"] = self.base_identity
        return settings


@dataclass
class Reconstructor:
    spec: ReconstructorSpec
    tokenizer: object
    trunk: torch.nn.Module                 # layers 0..spec.layer, final norm removed
    value_head: torch.nn.Linear | None     # float32, on the trunk's device
    prefix: SharedPrefix | None            # the template's opening, computed once


def check_width(spec: ReconstructorSpec, width: int, where: str) -> None:
    if width != spec.d_model:
        raise PipelineError(f"{where}: the reconstructor's d_model is {spec.d_model}, the vectors have {width}")




def _detect_format(name: str, local: Path) -> str:
    if (local / "adapter_config.json").exists():
        return "lora"
    if (local / "config.json").exists() and (local / VALUE_HEAD).exists():
        return "value_head"
    found = ", ".join(sorted(p.name for p in local.iterdir())[:8]) or "nothing"
    raise PipelineError(
        f"model.reconstructor {name!r} ({local}) is not an activation reconstructor: expected a value-head AR "
        f"(config.json + weights + {VALUE_HEAD}) or a LoRA AR (adapter_config.json); found {found}")








def _pick(config_value, meta_value, default):
    """(value, where it came from): a non-null config value wins, then the sidecar, then the default."""
    if config_value is not None:
        return config_value, "config"
    if meta_value is not None:
        return meta_value, META
    return default, "default"


def _template(cfg, meta: Sidecar) -> tuple[str, str]:
    name, meta_value = meta.first(TEMPLATE_KEYS)
    template, source = _pick(cfg.reconstructor.prompt_template, meta_value, DEFAULT_TEMPLATE)
    n = template.count(PLACEHOLDER) if isinstance(template, str) else 0
    if n != 1:
        key = "reconstructor.prompt_template" if source == "config" else meta.where(name)
        raise PipelineError(f"{key}: the AR prompt template must contain {PLACEHOLDER} exactly once "
                            f"(found {n} in {template!r})")
    return template, source


def _layer(cfg, meta: Sidecar, fmt: str, num_layers: int) -> tuple[int, str]:
    name, meta_value = meta.first(AR_LAYER_KEYS)
    default = num_layers - 1 if fmt == "value_head" else cfg.extract.layer
    layer, source = _pick(cfg.reconstructor.layer, meta_value, default)
    key = {"config": "reconstructor.layer", META: meta.where(name), "default": "extract.layer"}[source]
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise PipelineError(f"{key}: layer {layer!r} is outside the reconstructor's {num_layers} layers "
                            f"(0..{num_layers - 1})")
    return layer, source


def _mse_scale(cfg, meta: Sidecar, d_model: int) -> tuple[float, str]:
    raw = meta.get("extraction.mse_scale")
    if raw == "sqrt_d_model":  # the release's symbolic value
        raw = math.sqrt(d_model)
    elif isinstance(raw, str) and raw.lower() in ("raw", "none"):
        log.warning("%s: extraction.mse_scale is %r (no normalization); the score normalizes to sqrt(d_model) "
                    "unless reconstructor.mse_scale is set", meta.path, raw)
        raw = None
    given, source = _pick(cfg.reconstructor.mse_scale, raw, math.sqrt(d_model))
    try:
        scale = float(given)
    except (TypeError, ValueError):
        scale = float("nan")
    if not 0 < scale < math.inf:
        key = "reconstructor.mse_scale" if source == "config" else meta.where("extraction.mse_scale")
        raise PipelineError(f"{key}: mse_scale must be a positive number, got {given!r}")
    return scale, source


def _check_value_head(path: Path, d_model: int) -> None:
    """The head's shapes from the safetensors header: [d_model, d_model] weight, optional [d_model] bias."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise PipelineError(f"{path}: cannot read it as safetensors ({e})") from e
    if "weight" not in shapes:
        raise PipelineError(f"{path}: no 'weight' tensor (keys: {', '.join(shapes) or 'none'})")
    if shapes["weight"] != [d_model, d_model]:
        raise PipelineError(f"{path}: the value head's weight has shape {shapes['weight']}, expected "
                            f"[{d_model}, {d_model}] (d_model = the model's hidden_size)")
    if "bias" in shapes and shapes["bias"] != [d_model]:
        raise PipelineError(f"{path}: the value head's bias has shape {shapes['bias']}, expected [{d_model}]")


def _check_lora_base(cfg, source: str) -> None:
    """Refuse a LoRA AR trained on another base, unless model.allow_adapter_base_mismatch is set."""
    from peft import PeftConfig

    with load_errors("the adapter config", "model.reconstructor", source):
        recorded = PeftConfig.from_pretrained(source).base_model_name_or_path
    base = cfg.model.base
    if not recorded or recorded == base or (
            os.path.isdir(recorded) and Path(recorded).resolve() == Path(resolve_source(base, "model.base")).resolve()):
        return
    message = f"model.reconstructor {cfg.model.reconstructor!r} was trained on {recorded!r}, but model.base is {base!r}"
    if not cfg.model.allow_adapter_base_mismatch:
        raise PipelineError(message + "; set model.allow_adapter_base_mismatch=true to load it anyway")
    log.warning("!!! %s; loading it anyway because model.allow_adapter_base_mismatch is set !!!", message)


def _identity(source: str, local: Path) -> str:
    digest = hashlib.sha256()
    for name in ("config.json", "adapter_config.json", META):
        if (local / name).exists():
            digest.update(name.encode() + b"\0" + (local / name).read_bytes())
    return f"{source}#{digest.hexdigest()[:12]}"


def resolve_reconstructor(cfg) -> ReconstructorSpec:
    """Format, template, layer and scale of ``model.reconstructor``; every bad input fails here."""
    from transformers import AutoConfig

    name = cfg.model.reconstructor
    if not name:
        raise PipelineError("model.reconstructor is not set: the score stage needs an activation reconstructor "
                            "(HF id, local directory, or builtin:tiny-ar)")
    source = resolve_source(name, "model.reconstructor")
    local = checkpoint_files(source, "model.reconstructor", _METADATA_FILES)
    fmt = _detect_format(name, local)
    meta = read_sidecar(local, role="reconstructor", key="model.reconstructor")
    if fmt == "value_head":
        with load_errors("the reconstructor's config", "model.reconstructor", str(local)):
            model_config = AutoConfig.from_pretrained(local)
        base_identity = None
    else:
        if cfg.model.adapter and os.path.realpath(source) == os.path.realpath(
                resolve_source(cfg.model.adapter, "model.adapter")):
            raise PipelineError(f"model.reconstructor {name!r} is model.adapter, the verbalizer: "
                                "name the AR checkpoint")
        _check_lora_base(cfg, source)
        model_config = load_model_config(cfg)
        base_identity = model_identity(resolve_source(cfg.model.base, "model.base"))
    d_model, num_layers = model_config.hidden_size, model_config.num_hidden_layers
    if meta.get("d_model") is not None and meta.get("d_model") != d_model:
        raise PipelineError(f"{meta.path}: d_model is {meta.get('d_model')}, but the model's hidden_size is {d_model}")
    template, template_from = _template(cfg, meta)
    layer, layer_from = _layer(cfg, meta, fmt, num_layers)
    mse_scale, scale_from = _mse_scale(cfg, meta, d_model)
    head = local / VALUE_HEAD if (local / VALUE_HEAD).exists() else None
    if head is not None:
        _check_value_head(head, d_model)
    return ReconstructorSpec(
        source=source, format=fmt, template=template, add_special_tokens=cfg.reconstructor.add_special_tokens,
        layer=layer, mse_scale=mse_scale, d_model=d_model,
        sources={"template": template_from, "layer": layer_from, "mse_scale": scale_from},
        local_dir=str(local), value_head=str(head) if head else None, identity=_identity(source, local),
        base_identity=base_identity)


def _truncate(config, layer: int):
    """Keep layers 0..layer: from_pretrained then never materialises the later layers' weights."""
    config.num_hidden_layers = layer + 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[: layer + 1]
    return config


def _load_trunk(cfg, spec: ReconstructorSpec, device: torch.device, kwargs: dict):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if spec.format == "value_head":
        with load_errors("the reconstructor", "model.reconstructor", spec.source):
            config = _truncate(AutoConfig.from_pretrained(spec.source), spec.layer)
            return AutoModel.from_pretrained(spec.source, config=config, **kwargs)
    from peft import PeftModel

    base = resolve_source(cfg.model.base, "model.base")
    with load_errors("the base model", "model.base", base):
        model = AutoModelForCausalLM.from_pretrained(base, config=_truncate(load_model_config(cfg), spec.layer),
                                                     **kwargs)
    with load_errors("the reconstructor adapter", "model.reconstructor", spec.source):
        model = PeftModel.from_pretrained(model, spec.source).merge_and_unload()
    return model.model


def _load_value_head(path: str, d_model: int, device: torch.device) -> torch.nn.Linear:
    from safetensors.torch import load_file

    tensors = load_file(path)
    head = torch.nn.Linear(d_model, d_model, bias="bias" in tensors, dtype=torch.float32, device=device)
    with torch.no_grad():
        head.weight.copy_(tensors["weight"].float())
        if "bias" in tensors:
            head.bias.copy_(tensors["bias"].float())
    return head.eval().requires_grad_(False)


def _prefix_ids(tokenizer, spec: ReconstructorSpec) -> list[int]:
    """The template's opening tokens that stay the same whatever the explanation starts with.

    The text before {explanation} alone is not enough: Qwen's pre-tokenizer glues a lone '>' to the
    letters after it, so '<text>' + 'cat' ends in '>cat', not '>'. Rows that still differ run whole.
    """
    head = spec.template.split(PLACEHOLDER)[0]
    rows = tokenizer([head] + [spec.template.replace(PLACEHOLDER, p) for p in _SEAM_PROBES],
                     add_special_tokens=spec.add_special_tokens)["input_ids"]
    n = 0
    while all(len(r) > n for r in rows) and len({r[n] for r in rows}) == 1:
        n += 1
    return rows[0][:n]


def _check_suffix(tokenizer, spec: ReconstructorSpec) -> None:
    """A sidecar's tokens.critic_suffix_ids are how the template ended in training: warn when ours differs."""
    meta = read_sidecar(Path(spec.local_dir), role="reconstructor", key="model.reconstructor") if spec.local_dir else None
    suffix = meta.get("tokens.critic_suffix_ids") if meta else None
    if not suffix:
        return
    ids = tokenizer(spec.template.replace(PLACEHOLDER, ""), add_special_tokens=spec.add_special_tokens)["input_ids"]
    if ids[-len(suffix):] != list(suffix):
        log.warning("the AR prompt template's last tokens %s differ from %s tokens.critic_suffix_ids %s: the AR "
                    "was trained on another prompt ending", ids[-len(suffix):], Path(spec.local_dir) / META, suffix)


def load_reconstructor(cfg, spec: ReconstructorSpec, device: torch.device) -> Reconstructor:
    """Tokenizer, truncated trunk (final norm removed), value head and the template's shared prefix."""
    from transformers import AutoTokenizer

    dtype = resolve_dtype(cfg.model.dtype, device)
    kwargs = dict(dtype=dtype, attn_implementation=resolve_attention(cfg.model.attn_implementation, device),
                  device_map={"": device})
    trunk = _load_trunk(cfg, spec, device, kwargs)
    remove_final_norm(trunk)
    trunk = trunk.eval().requires_grad_(False)
    if spec.format == "value_head":
        with load_errors("the reconstructor's tokenizer", "model.reconstructor", spec.source):
            tokenizer = AutoTokenizer.from_pretrained(spec.source)
        if tokenizer.pad_token is None:  # padding is never attended to: the attention mask is explicit
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = load_tokenizer(cfg)
    _check_suffix(tokenizer, spec)
    head = _load_value_head(spec.value_head, spec.d_model, device) if spec.value_head else None
    prefix = SharedPrefix(trunk, input_ids=_prefix_ids(tokenizer, spec))
    return Reconstructor(spec=spec, tokenizer=tokenizer, trunk=trunk, value_head=head, prefix=prefix)


def render(spec: ReconstructorSpec, explanation: str) -> str:
    """The AR's input text; str.replace, since explanations may contain braces."""
    return spec.template.replace(PLACEHOLDER, explanation)


@torch.inference_mode()
def reconstruct(recon: Reconstructor, explanations: list[str], max_batch_tokens: int):
    """Predicted vectors float32 [n, d_model] on CPU in input order, extract_vectors' stats, {row: error}.

    An error row (too long for the model, out of memory alone) predicts zeros.
    """
    spec = recon.spec
    if not explanations:
        return torch.zeros(0, spec.d_model), {"tokens": 0, "computed_tokens": 0, "reused_tokens": 0,
                                               "error_rows": 0}, {}
    texts = [render(spec, e) for e in explanations]
    token_ids = recon.tokenizer(texts, add_special_tokens=spec.add_special_tokens)["input_ids"]
    hidden, stats, errors = extract_vectors(recon.trunk, token_ids, max_batch_tokens,
                                            recon.tokenizer.pad_token_id, recon.prefix)  # [n, d_model]
    if recon.value_head is None:
        predictions = hidden
    else:
        device = recon.value_head.weight.device
        predictions = recon.value_head(hidden.to(device)).float().cpu()
    if errors:
        predictions[torch.tensor(sorted(errors))] = 0.0
    return predictions, stats, errors
