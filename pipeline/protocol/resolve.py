"""Which value each verbalizer protocol key takes: the user's config, the checkpoint's sidecar, or the default.

    from pipeline.protocol.resolve import resolve_protocol
    protocol = resolve_protocol(cfg)                  # reads the verbalizer's (or adapter's) nla_meta.yaml only
    protocol.cfg.verbalizer.prompt_template           # the value the stages use
    protocol.sources["verbalizer.injection_norm"]     # "config" | ".../nla_meta.yaml extraction.injection_scale" | "default"
    protocol = protocol.with_special_tokens(tokenizer, "kitft/nla-qwen2.5-7b-L20-av")   # eos/pad when unset
    protocol.record()                                  # {key: {"value", "source"}}, saved as _protocol.json

A key the user set (YAML, inherited YAML, or ``key=value``: ``cfg.is_set``) wins; a key left unset
takes the sidecar's value, and failing that the default. The sidecar is the one beside
``model.verbalizer`` or, for a LoRA verbalizer, beside ``model.adapter``. The reconstructor's sidecar is
read by pipeline.models.reconstructor through the same reader (pipeline.protocol.nla_meta).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

from pipeline.errors import PipelineError
from pipeline.protocol.nla_meta import LAYER_KEYS, Sidecar, checkpoint_files, read_sidecar

log = logging.getLogger(__name__)

# config key -> where a schema_version 2 sidecar keeps it (first found wins)
SIDECAR_KEYS = {
    "verbalizer.prompt_template": ("prompt_templates.av", "prompt_templates.actor"),
    "verbalizer.injection_char": ("tokens.injection_char",),
    "verbalizer.injection_token_id": ("tokens.injection_token_id",),
    "verbalizer.injection_norm": ("extraction.injection_scale",),
    "extract.layer": LAYER_KEYS,
}
NEIGHBOURS = ("tokens.injection_left_neighbor_id", "tokens.injection_right_neighbor_id")
# Recorded with their source, whether or not a sidecar can set them.
RECORDED = ("verbalizer.chat_template", "verbalizer.add_special_tokens", "verbalizer.depth_pct",
            "verbalizer.stop_string", "verbalizer.start_string", "generation.max_new_tokens",
            "generation.do_sample", "generation.repetition_penalty")


def _get(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _set(cfg, key: str, value) -> None:
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)


def verbalizer_checkpoint(cfg) -> tuple[str, str] | None:
    """(config key, name) of the checkpoint whose sidecar describes the verbalizer, or None."""
    if cfg.model.verbalizer:
        return "model.verbalizer", cfg.model.verbalizer
    if cfg.model.adapter:
        return "model.adapter", cfg.model.adapter
    return None


@dataclass
class Protocol:
    cfg: object                                  # a copy of the config with every key resolved
    sources: dict = field(default_factory=dict)  # key -> "config" | "<sidecar path> <name>" | "default" | ...
    sidecar: Sidecar = field(default_factory=lambda: Sidecar(None))

    def where(self, key: str) -> str:
        """``key`` plus where its value came from, for error messages."""
        source = self.sources.get(key, "default")
        return key if source == "config" else f"{key} (from {source})"

    def record(self) -> dict:
        keys = list(self.sources)
        return {"sidecar": str(self.sidecar.path) if self.sidecar else None,
                "values": {k: {"value": _get(self.cfg, k), "source": self.sources[k]} for k in keys}}

    def log(self, stage: str) -> None:
        lines = []
        for key, source in self.sources.items():
            value = _get(self.cfg, key)
            shown = repr(value) if not isinstance(value, str) or len(value) < 60 else repr(value[:57] + "...")
            lines.append(f"  {key} = {shown}  [{source}]")
        log.info("%s: protocol (value [source]):\n%s", stage, "\n".join(lines))

    def check_d_model(self, d_model: int, what: str) -> None:
        declared = self.sidecar.get("d_model") if self.sidecar else None
        if declared is not None and declared != d_model:
            raise PipelineError(f"{self.sidecar.path}: d_model is {declared}, but {what} has hidden_size {d_model}")

    def with_special_tokens(self, tokenizer, source: str) -> "Protocol":
        """Fill generation.eos_token_ids / pad_token_id, when unset, from the verbalizer's
        generation_config.json, else its tokenizer: another family's ids would never end a row."""
        from transformers import GenerationConfig

        try:
            gen = GenerationConfig.from_pretrained(source)
        except (OSError, ValueError):  # no generation_config.json: the tokenizer decides
            gen = None
        cfg = copy.deepcopy(self.cfg)
        sources = dict(self.sources)
        for key, from_gen, from_tok in (
                ("generation.eos_token_ids", getattr(gen, "eos_token_id", None), tokenizer.eos_token_id),
                ("generation.pad_token_id", getattr(gen, "pad_token_id", None),
                 tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)):
            if _get(cfg, key) is not None:
                sources[key] = "config" if self.cfg.is_set(key) else "default"
                continue
            value, where = (from_gen, f"{source} generation_config.json") if from_gen is not None else (
                from_tok, "the verbalizer's tokenizer")
            if key == "generation.eos_token_ids":
                value = [] if value is None else [value] if isinstance(value, int) else list(value)
            elif value is None:
                raise PipelineError(f"{key} is not set and neither {source}'s generation_config.json nor its "
                                    "tokenizer names one: set it in the config")
            _set(cfg, key, value)
            sources[key] = where
        return Protocol(cfg, sources, self.sidecar)


def _sidecar_value(meta: Sidecar, key: str, names: tuple[str, ...]):
    """(value, source) the sidecar gives ``key``, validated; (None, None) when it gives none."""
    if key == "verbalizer.neighbor_token_ids":
        left, right = (meta.get(n) for n in NEIGHBOURS)
        if left is None and right is None:
            return None, None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right)):
            raise PipelineError(f"{meta.path}: {' and '.join(NEIGHBOURS)} must both be token ids, got {left!r}, {right!r}")
        return [left, right], f"{meta.path} tokens.injection_*_neighbor_id"
    name, value = meta.first(names)
    if name is None:
        return None, None
    where = meta.where(name)
    if key == "verbalizer.injection_norm":
        if value == "sqrt_d_model":  # the release's symbolic value
            if not isinstance(meta.get("d_model"), int):
                raise PipelineError(f"{where} is 'sqrt_d_model' but the sidecar has no d_model")
            value = math.sqrt(meta.get("d_model"))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise PipelineError(f"{where}: expected a positive number, got {value!r}; set verbalizer.injection_norm")
        return float(value), where
    expected = {"verbalizer.prompt_template": str, "verbalizer.injection_char": str}.get(key, int)
    if not isinstance(value, expected) or isinstance(value, bool):
        raise PipelineError(f"{where}: expected {expected.__name__}, got {value!r}")
    if key == "verbalizer.prompt_template" and "{injection_char}" not in value:
        raise PipelineError(f"{where}: the template has no {{injection_char}} placeholder")
    return value, where


def _raw_injection_scale(meta: Sidecar, cfg) -> None:
    """The release writes injection_scale null for "inject raw"; the card's rule always normalizes."""
    extraction = meta.get("extraction")
    if isinstance(extraction, dict) and "injection_scale" in extraction and extraction["injection_scale"] is None \
            and not cfg.is_set("verbalizer.injection_norm"):
        raise PipelineError(f"{meta.where('extraction.injection_scale')} is null (raw, unnormalized injection), "
                            "which this pipeline does not do: set verbalizer.injection_norm explicitly")


def resolve_protocol(cfg, stage: str = "verbalize") -> Protocol:
    """The config with every protocol key resolved, and where each value came from.

    ``stage="extract"`` needs only ``extract.layer``: the sidecar is read only when the user left
    that key unset, so extraction never waits on a verbalizer it does not use.
    """
    resolved = copy.deepcopy(cfg)
    keys = ["extract.layer"] if stage == "extract" else list(SIDECAR_KEYS) + ["verbalizer.neighbor_token_ids"]
    checkpoint = verbalizer_checkpoint(cfg)
    meta = Sidecar(None)
    if checkpoint and not all(cfg.is_set(k) for k in keys):
        from pipeline.models.modeling import resolve_source

        key, name = checkpoint
        local = checkpoint_files(resolve_source(name, key), key, ["config.json", "adapter_config.json"])
        meta = read_sidecar(local, role="verbalizer", key=key)
    sources = {}
    names = dict(SIDECAR_KEYS, **{"verbalizer.neighbor_token_ids": NEIGHBOURS})
    if meta:
        _raw_injection_scale(meta, cfg)
    for key in keys:
        value, where = _sidecar_value(meta, key, names[key]) if meta else (None, None)
        if cfg.is_set(key):
            sources[key] = "config"
            if where is not None and value != _get(cfg, key):
                log.warning("%s=%r from the config, although %s says %r", key, _get(cfg, key), where, value)
        elif where is not None:
            _set(resolved, key, value)
            sources[key] = where
        else:
            sources[key] = "default"
    if stage != "extract":
        sources.update({k: "config" if cfg.is_set(k) else "default" for k in RECORDED})
    return Protocol(resolved, sources, meta)
