"""The KV cache of a prefix that every row starts with, computed once and copied into each batch.

    from pipeline.engines.prefix import SharedPrefix
    prefix = SharedPrefix(body, input_ids=[151644, 8948, ...])        # or inputs_embeds=[1, P, d_model]
    prefix.hidden                         # with keep_hidden=True: body's output at the prefix, [P, d_model]
    prefix.ids, prefix.length             # the tokens it stands for (None if built from embeddings), P
    cache = prefix.cache(rows=32)          # a fresh cache holding the prefix for 32 rows
    hidden = body(input_ids=suffixes, position_ids=prefix.length + arange(S), attention_mask=..., **prefix.kw(cache))
    # attention_mask covers prefix.columns + the suffix: the prefix's columns sit in each row's cache,
    # unless cascade=True (pipeline.engines.attention's shared-prefix attention reads them once for all rows)

Both stages feed many rows that open with the same tokens: every extract prompt is rendered with
the same system block and user header (24 tokens with Qwen2.5's template), and every verbalizer
prompt is identical up to the injection token (106 tokens). With causal attention the keys and
values of those positions do not depend on what follows, so they are computed once per model load
and only each row's own suffix goes through the model. transformers has prefix caching only inside
its continuous-batching server (token ids, no ``inputs_embeds``), so this small piece is ours.
"""
from __future__ import annotations

import inspect

import torch

from pipeline.engines.attention import NAME as SDPA_GQA
from pipeline.engines.kvcache import growable_cache


def cache_kwarg(body) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); the name this version takes."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def supports_cascade(body) -> bool:
    """Whether the model's attention function takes ``shared_prefix`` (only pipeline.engines.attention's does)."""
    return getattr(body.config, "_attn_implementation", None) == SDPA_GQA


class SharedPrefix:
    """``cascade``: keep the prefix out of the rows' caches and pass it to the attention function,
    which reads it once per step for all rows. Worth it when queries are few (decoding); a long
    prefill is better served by the fused SDPA kernels over per-row copies."""

    def __init__(self, body, input_ids: list[int] | None = None, inputs_embeds: torch.Tensor | None = None,
                 cascade: bool = False, keep_hidden: bool = False):
        if cascade and not supports_cascade(body):
            raise ValueError(f"shared-prefix attention needs attn_implementation={SDPA_GQA!r}")
        self.body, self.cascade = body, cascade
        self.ids = list(input_ids) if input_ids is not None else None  # None when built from embeddings
        self.cache_kw = cache_kwarg(body)
        device = next(body.parameters()).device
        if inputs_embeds is None:
            inputs_embeds = body.get_input_embeddings()(torch.tensor([input_ids or []], dtype=torch.long, device=device))
        self.length = inputs_embeds.shape[1]
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        # keep_hidden: the body's output at the prefix's positions, float32 [P, d_model] on the CPU
        # (extract reads positions inside the prefix from it when it reads more than the last token).
        self.hidden: torch.Tensor | None = None
        if self.length:
            cache = growable_cache()
            with torch.inference_mode():
                out = self.body(inputs_embeds=inputs_embeds, use_cache=True, **{self.cache_kw: cache})
            self.kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
            if keep_hidden:
                self.hidden = out.last_hidden_state[0].float().cpu()

    @property
    def columns(self) -> int:
        """How many cache columns (and attention-mask columns) the prefix takes in each row."""
        return 0 if self.cascade else self.length

    def kw(self, cache) -> dict:
        """Forward kwargs for a call on top of the prefix with ``cache``."""
        kw = {self.cache_kw: cache, "use_cache": True}
        if self.cascade and self.kv:
            kw["shared_prefix"] = self.kv
        return kw

    def cache(self, rows: int):
        """A new growable cache for ``rows`` rows, holding the prefix's keys and values unless cascading."""
        cache = growable_cache()
        for i, (k, v) in enumerate([] if self.cascade else self.kv):
            cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), i)
        return cache
