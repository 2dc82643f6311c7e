"""What the stages need to know about a decoder's architecture, read from what transformers exposes in
common (the config's ``layer_types`` and ``sliding_window``, the decoder module and its children), not
from a list of model types. Qwen2, Qwen3, Llama and Gemma-3 (text) are tested (tests/test_architectures.py).

    from pipeline.models.architecture import remove_final_norm, attention_kinds, final_logit_softcap
    remove_final_norm(trunk)          # the norm transformers applies to last_hidden_state -> identity
    attention_kinds(config)           # {"full_attention": None, "sliding_attention": 16}: window per layer type
    final_logit_softcap(config)       # the tanh cap Gemma's CausalLM puts on its logits, or None

Everything else differs between these architectures inside modules that the pipeline only calls:
Gemma's scaled input embeddings live in its embedding module (so ``get_input_embeddings()(ids)`` is
what the decoder layers consume, and an injected vector replaces exactly that), Qwen3's and Gemma's
q/k norms and Gemma's ``query_pre_attn_scalar`` live in the attention modules (which pass their
``scaling`` to the attention function), per-layer-type RoPE lives in the rotary module.
"""
from __future__ import annotations

import torch

from pipeline.errors import PipelineError

FULL, SLIDING = "full_attention", "sliding_attention"


class UnsupportedLayers(ValueError):
    """A layer type the pipeline's own masks do not know how to build (chunked, linear attention...)."""


def final_norm_name(decoder: torch.nn.Module) -> str:
    """The attribute of ``decoder`` (a base model such as Qwen2Model) holding its final norm.

    Found by shape, not by name: the one direct child, besides the input embedding and the layer
    list, whose parameters are all vectors of width ``hidden_size`` (a norm's weight, and its bias if
    any). Rotary embeddings hold only buffers; position embeddings are matrices.
    """
    width = decoder.config.hidden_size
    embed = decoder.get_input_embeddings()
    found = []
    for name, child in decoder.named_children():
        if child is embed or isinstance(child, torch.nn.ModuleList):
            continue
        params = list(child.parameters())
        if params and all(p.dim() == 1 and p.shape[0] == width for p in params):
            found.append(name)
    if len(found) != 1:
        raise PipelineError(f"cannot tell the final norm of {type(decoder).__name__} (candidates: {found or 'none'}): "
                            "the pipeline reads the un-normed residual stream and must remove it")
    return found[0]


def remove_final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """Replace the final norm by identity, in place: transformers applies it to ``last_hidden_state``,
    and the verbalizer and the AR read the raw residual stream. ``model``: a base model or a CausalLM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    setattr(decoder, final_norm_name(decoder), torch.nn.Identity())
    return model


def attention_kinds(config) -> dict[str | None, int | None]:
    """The decoder's kinds of attention layer: {layer type: sliding window, or None for full attention}.

    With ``config.layer_types`` (Qwen2, Qwen3, Gemma 3...) the keys are its layer types, which are
    also the keys the model takes in a dict of prepared masks. Without it every layer is alike:
    ``{None: config.sliding_window}`` (None for Llama; Mistral-style models slide in every layer).
    Raises UnsupportedLayers for a layer type that is neither full nor sliding-window attention.
    """
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not types:
        return {None: window}
    kinds: dict[str | None, int | None] = {}
    for t in types:
        if t == FULL:
            kinds[t] = None
        elif t == SLIDING and window:
            kinds[t] = window
        else:
            raise UnsupportedLayers(f"layer type {t!r}" + (" (no sliding_window set)" if t == SLIDING else ""))
    return kinds


def final_logit_softcap(config) -> float | None:
    """``final_logit_softcapping``: Gemma 2/3's CausalLMs return ``cap * tanh(lm_head(h) / cap)`` when set."""
    return getattr(config, "final_logit_softcapping", None) or None
