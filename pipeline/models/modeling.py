"""Load the tokenizer, the truncated extraction model and the verbalizer (base + LoRA).

    from pipeline.models.modeling import load_tokenizer, load_extract_model, load_verbalizer_model
    tok = load_tokenizer(cfg)
    trunk = load_extract_model(cfg, device)       # layers 0..layer only, final norm removed
    vtok = load_tokenizer(cfg, "model.verbalizer")  # the verbalizer's own tokenizer, when it is a full fine-tune
    model = load_verbalizer_model(cfg, device)    # model.verbalizer, or model.base + model.adapter (merged if asked)

Every loader goes through ``from_pretrained`` exactly as a Hub model would, so the tiny offline
model (``builtin:tiny``) exercises the real code path. Load failures become one-line PipelineErrors.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from pipeline.engines.attention import resolve_attention
from pipeline.errors import PipelineError
from pipeline.models.architecture import remove_final_norm

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def resolve_source(name: str, key: str) -> str:
    """A local directory, a built-in tiny model, or a Hub id; a missing local path is an error."""
    if name.startswith("builtin:"):
        from pipeline.models.tiny import resolve_builtin

        return resolve_builtin(name)
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") != 1 or os.path.exists(expanded)
    if looks_local:
        raise PipelineError(f"{key}: model path {name!r} does not exist (expected a directory or a Hub id org/name)")
    return name


@contextlib.contextmanager
def load_errors(what: str, key: str, source: str):
    """Turn the many ways from_pretrained fails (offline, 404, bad files) into one readable line."""
    import transformers

    previous = transformers.logging.get_verbosity()
    # Loading a truncated model reports layers 21.. and lm_head as "unexpected": that is the point.
    transformers.logging.set_verbosity_error()
    try:
        yield
    except PipelineError:
        raise
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if os.path.isdir(source) else (
            " (not in the local Hugging Face cache and the Hub is unreachable or HF_HUB_OFFLINE is set:"
            " use a local directory, or download it first where there is network)")
        raise PipelineError(f"{key}: cannot load {what} from {source!r}: {first}{hint}") from e
    finally:
        transformers.logging.set_verbosity(previous)


def verbalizer_source(cfg) -> tuple[str, str]:
    """(config key, resolved source) of the model stage 2 runs: model.verbalizer, else model.base."""
    if cfg.model.verbalizer:
        return "model.verbalizer", resolve_source(cfg.model.verbalizer, "model.verbalizer")
    return "model.base", resolve_source(cfg.model.base, "model.base")


def _role_source(cfg, role: str) -> tuple[str, str]:
    return verbalizer_source(cfg) if role == "model.verbalizer" else (
        "model.base", resolve_source(cfg.model.base, "model.base"))


def load_tokenizer(cfg, role: str = "model.base"):
    """model.base's tokenizer; with role="model.verbalizer", the verbalizer's (model.base's for a LoRA)."""
    from transformers import AutoTokenizer

    key, source = _role_source(cfg, role)
    with load_errors("the tokenizer", key, source):
        tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:  # padding ids are never attended to; the attention mask is always explicit
        tok.pad_token = tok.eos_token
    return tok


def load_model_config(cfg, role: str = "model.base"):
    """model.base's config; with role="model.verbalizer", the verbalizer's (model.base's for a LoRA)."""
    from transformers import AutoConfig

    key, source = _role_source(cfg, role)
    with load_errors("the model config", key, source):
        return AutoConfig.from_pretrained(source)


def load_extract_model(cfg, device: torch.device):
    """The base model's decoder trunk, cut after ``extract.layer``, returning that layer's raw output.

    Layers past ``layer`` and the LM head are left out of the config, so from_pretrained skips their
    weights and they are never materialised on the device (``layer_types``, where the config has one,
    is cut to match). The final norm is replaced by identity: transformers applies it to
    ``last_hidden_state``, and the verbalizer reads the un-normed residual.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    source = resolve_source(cfg.model.base, "model.base")
    config = load_model_config(cfg)
    layer = cfg.extract.layer
    if not 0 <= layer < config.num_hidden_layers:
        raise PipelineError(f"extract.layer={layer} is outside the model's {config.num_hidden_layers} layers")
    config.num_hidden_layers = layer + 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[: layer + 1]
    dtype = resolve_dtype(cfg.model.dtype, device)
    kwargs = dict(config=config, dtype=dtype, attn_implementation=resolve_attention(cfg.model.attn_implementation, device),
                  device_map={"": device})
    with load_errors("the base model", "model.base", source):
        if cfg.extract.with_adapter:
            # The card's behaviour, kept behind a flag: merge the LoRA into the truncated model.
            model = _apply_adapter(cfg, AutoModelForCausalLM.from_pretrained(source, **kwargs), merge=True).model
        else:
            model = AutoModel.from_pretrained(source, **kwargs)
    remove_final_norm(model)  # found by shape, whatever the architecture calls it
    return model.eval().requires_grad_(False)


def _check_adapter_base(cfg, adapter_source: str) -> None:
    """Refuse an adapter trained on another base unless model.allow_adapter_base_mismatch is set."""
    from peft import PeftConfig

    with load_errors("the adapter config", "model.adapter", adapter_source):
        recorded = PeftConfig.from_pretrained(adapter_source).base_model_name_or_path
    if not recorded:
        return
    base = cfg.model.base
    same = recorded == base or (
        os.path.isdir(recorded) and Path(recorded).resolve() == Path(resolve_source(base, "model.base")).resolve()
    )
    if same:
        return
    message = (f"model.adapter {cfg.model.adapter!r} was trained on {recorded!r}, but model.base is {base!r}")
    if not cfg.model.allow_adapter_base_mismatch:
        raise PipelineError(message + "; set model.allow_adapter_base_mismatch=true to load it anyway")
    log.warning("!!! %s; loading it anyway because model.allow_adapter_base_mismatch is set !!!", message)


def _apply_adapter(cfg, base_model, merge: bool):
    from peft import PeftModel

    if not cfg.model.adapter:
        raise PipelineError("neither model.adapter nor model.verbalizer is set: stage 2 needs a verbalizer "
                            "(a LoRA on model.base, or a fully fine-tuned checkpoint; HF id or directory)")
    source = resolve_source(cfg.model.adapter, "model.adapter")
    _check_adapter_base(cfg, source)
    with load_errors("the adapter", "model.adapter", source):
        model = PeftModel.from_pretrained(base_model, source)
    return model.merge_and_unload() if merge else model


def load_verbalizer_model(cfg, device: torch.device):
    """model.verbalizer as it is (a full fine-tune), or model.base with the model.adapter LoRA,
    merged into the weights when verbalize.merge_lora."""
    from transformers import AutoModelForCausalLM

    key, source = verbalizer_source(cfg)
    dtype = resolve_dtype(cfg.model.dtype, device)
    with load_errors("the verbalizer" if cfg.model.verbalizer else "the base model", key, source):
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=resolve_attention(cfg.model.attn_implementation, device), device_map={"": device}
        )
    if not cfg.model.verbalizer:
        model = _apply_adapter(cfg, model, merge=cfg.verbalize.merge_lora)
    return model.eval().requires_grad_(False)


def model_identity(source: str) -> str:
    """What to record for a model in metadata: the Hub id, or the local path plus its config's hash."""
    config = Path(source) / "config.json"
    if config.exists():
        import hashlib

        return f"{source}#{hashlib.sha256(config.read_bytes()).hexdigest()[:12]}"
    return source
