"""The injection protocol, as small pure functions: prompt, normalize, inject, decode.

    from pipeline.protocol.verbalizer import build_prompt, normalize_to, inject, decode_row
    prompt = build_prompt(tokenizer, cfg.verbalizer, depth_pct=73)   # token ids + injection position
    embeds = inject(model.get_input_embeddings(), prompt, vectors)   # [batch, prompt_len, d_model]
    text, finished, n = decode_row(tokenizer, generated_ids, eos_ids, "</explanation>")

The verbalizer is data: every setting that differs between NLA checkpoints (template, chat
wrapping, special tokens, injection character and norm, neighbour check, stop string) comes from
``cfg.verbalizer``; nothing here is specific to one checkpoint.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class VerbalizerPrompt:
    token_ids: list[int]
    inject_pos: int      # index of the injection token in token_ids
    injection_id: int
    text: str
    depth_pct: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def depth_percent(layer: int, num_layers: int) -> int:
    """The depth the prompt names: round(100 * (layer + 0.5) / num_layers), 73 for layer 20 of 28."""
    return round(100 * (layer + 0.5) / num_layers)


def build_prompt(tokenizer, vcfg, depth_pct: int, where=lambda key: key) -> VerbalizerPrompt:
    """Fill the template, encode it once, and check the injection token occurs exactly once.

    ``where(key)`` names a key in errors (pipeline.protocol.resolve adds where its value came from).
    """
    if not vcfg.prompt_template:
        raise PipelineError("verbalizer.prompt_template is empty: set it in the config (see configs/)")
    # str.replace, not str.format: templates may hold other braces (JSON examples and the like).
    text = vcfg.prompt_template.replace("{depth_pct}", str(depth_pct)).replace("{injection_char}", vcfg.injection_char)
    char_ids = tokenizer.encode(vcfg.injection_char, add_special_tokens=False)
    if len(char_ids) != 1:
        raise PipelineError(
            f"{where('verbalizer.injection_char')} {vcfg.injection_char!r} encodes to {len(char_ids)} tokens "
            f"{char_ids}, not one"
        )
    injection_id = char_ids[0]
    if vcfg.injection_token_id is not None and injection_id != vcfg.injection_token_id:
        raise PipelineError(
            f"{where('verbalizer.injection_token_id')} is {vcfg.injection_token_id}, but the tokenizer encodes "
            f"{vcfg.injection_char!r} as {injection_id}: the checkpoint was trained with another tokenizer or vocabulary"
        )
    if vcfg.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=vcfg.add_special_tokens)
    positions = [i for i, t in enumerate(ids) if t == injection_id]
    if len(positions) != 1:
        raise PipelineError(
            f"{where('verbalizer.prompt_template')} must contain the injection token {vcfg.injection_char!r} exactly once "
            f"(as {{injection_char}}); it occurs {len(positions)} times"
        )
    pos = positions[0]
    if vcfg.neighbor_token_ids is not None:
        left = ids[pos - 1] if pos > 0 else None
        right = ids[pos + 1] if pos + 1 < len(ids) else None
        if [left, right] != list(vcfg.neighbor_token_ids):
            raise PipelineError(
                f"{where('verbalizer.neighbor_token_ids')}: expected {list(vcfg.neighbor_token_ids)} around the injection "
                f"token, the prompt has [{left}, {right}]"
            )
    return VerbalizerPrompt(ids, pos, injection_id, text, depth_pct)


def normalize_to(vectors: torch.Tensor, target_norm: float) -> torch.Tensor:
    """Scale each row to L2 norm ``target_norm`` (norm in float32, clamped at 1e-12). Never multiply by it."""
    v = vectors.float()
    return v * (target_norm / v.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def vector_problem(vector: torch.Tensor) -> str | None:
    """Why a vector must not reach the model, or None when it is fine."""
    if not torch.isfinite(vector).all():
        return "activation has non-finite values (NaN or inf)"
    if float(vector.float().norm()) == 0.0:
        return "activation has zero norm"
    return None


def inject(embedding: torch.nn.Module, prompt: VerbalizerPrompt, vectors: torch.Tensor, target_norm: float) -> torch.Tensor:
    """Prompt embeddings for each vector, with the normalized vector at the injection position.

    vectors: [batch, d_model] (any float dtype) -> [batch, prompt_len, d_model] in the embedding dtype.
    """
    weight = embedding.weight
    ids = torch.tensor([prompt.token_ids], device=weight.device)
    base = embedding(ids)  # [1, prompt_len, d_model]
    embeds = base.expand(vectors.shape[0], -1, -1).clone()
    embeds[:, prompt.inject_pos, :] = normalize_to(vectors.to(weight.device), target_norm).to(weight.dtype)
    return embeds


def _stop_index(tokenizer, tokens: list[int], stop_string: str) -> int | None:
    """Fewest leading tokens whose decoded text contains the stop string (handles splits across tokens)."""
    if stop_string not in tokenizer.decode(tokens, skip_special_tokens=True):
        return None
    lo, hi = 1, len(tokens)
    while lo < hi:  # containment only grows with the prefix, so bisect
        mid = (lo + hi) // 2
        if stop_string in tokenizer.decode(tokens[:mid], skip_special_tokens=True):
            hi = mid
        else:
            lo = mid + 1
    return lo


def decode_row(tokenizer, tokens: list[int], eos_ids: list[int], stop_string: str | None,
               start_string: str | None = None) -> tuple[str, bool, int]:
    """(explanation, finished, n_generated) of one generated row.

    ``n_generated`` counts tokens up to and including the one that produced EOS or completed the stop
    string; the explanation is the text before the stop string and, when the output opens with
    ``start_string`` (the release's AV writes ``<explanation>`` itself), after it; stripped.
    """
    ends = [i + 1 for i, t in enumerate(tokens) if t in eos_ids][:1]
    if stop_string:
        hit = _stop_index(tokenizer, tokens, stop_string)
        if hit is not None:
            ends.append(hit)
    n = min(ends) if ends else len(tokens)
    text = tokenizer.decode(tokens[:n], skip_special_tokens=True)
    if stop_string and stop_string in text:
        text = text.split(stop_string, 1)[0]
    if start_string and start_string in text:
        text = text.split(start_string, 1)[1]
    return text.strip(), bool(ends), n


def hf_generation_config(gcfg, stop_string: str | None):
    """Every generation setting that acts on the output, spelled out rather than inherited."""
    from transformers import GenerationConfig

    kwargs = dict(max_new_tokens=gcfg.max_new_tokens, do_sample=gcfg.do_sample,
                  repetition_penalty=gcfg.repetition_penalty, eos_token_id=list(gcfg.eos_token_ids) or None,
                  pad_token_id=gcfg.pad_token_id, stop_strings=[stop_string] if stop_string else None)
    if gcfg.do_sample:
        kwargs.update(temperature=gcfg.temperature, top_p=gcfg.top_p, top_k=gcfg.top_k)
    else:  # greedy ignores these; pin them to the library's neutral values so none is inherited
        kwargs.update(temperature=1.0, top_p=1.0, top_k=50)
    return GenerationConfig(**kwargs)
