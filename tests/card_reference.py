"""The model card's one-example verbalizer protocol in plain transformers + peft (bug 1 fixed).

Test code only: the batched pipeline is compared with this, and this never calls the pipeline.
"""
import math

import torch

INJECTION_CHAR = "㈎"
N_VECTORS = 40


def card_prompt() -> str:
    """The card's av_prompt, copied from its example."""
    LAYER = 20
    depth_pct = round(100 * (LAYER + 0.5) / 28)
    return (
        "You are a meticulous AI researcher conducting an important investigation "
        "into activation vectors from a language model. Your overall task is to "
        "describe the semantic content of that activation vector.\n\n"
        "We will pass the vector enclosed in <concept> tags into your context, "
        "along with the network depth where it was extracted. "
        "You must then produce an explanation for the vector, enclosed within "
        "<explanation> tags. The explanation consists of 2-3 text snippets "
        "describing that vector.\n\n"
        f"Here is the vector from depth {depth_pct}% of the network:\n\n"
        f"<concept>{INJECTION_CHAR}</concept>\n\n"
        "Please provide an explanation.\n\n"
        "<explanation>"
    )


def card_generate(model, tokenizer, act: torch.Tensor, scale: str = "normalize") -> list[int]:
    """The card's steps 2-4 for one vector; returns every token generate gives back."""
    def normalize_activation(v, target_norm):
        norm = v.float().norm().clamp_min(1e-12)
        return v * (target_norm / norm)

    injection_token_id = tokenizer.encode(INJECTION_CHAR, add_special_tokens=False)[0]
    tokens = tokenizer.encode(card_prompt(), add_special_tokens=True)
    inject_pos = next(i for i, t in enumerate(tokens) if t == injection_token_id)
    input_ids = torch.tensor([tokens])
    embeddings = model.get_input_embeddings()(input_ids).clone()
    injected = normalize_activation(act.to(embeddings.dtype), 150.0) if scale == "normalize" else act * 150.0
    embeddings[0, inject_pos, :] = injected
    with torch.no_grad():
        output = model.generate(inputs_embeds=embeddings, max_new_tokens=120, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
    return output[0].tolist()


def card_text(tokenizer, generated: list[int], stop: str = "</explanation>") -> str:
    text = tokenizer.decode(generated, skip_special_tokens=True)  # all of it: generate returned only new tokens
    if stop in text:
        text = text.split(stop)[0]
    return text.strip()


def varied_vectors(d_model: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    v = torch.randn(N_VECTORS, d_model, generator=g)
    norms = torch.logspace(-2, 4, N_VECTORS)[torch.randperm(N_VECTORS, generator=g)]
    v = v / v.norm(dim=-1, keepdim=True) * norms[:, None]
    v[0] = 0.0
    v[0, 3] = 7.0                      # one-hot
    v[1] = v[2] * 1000.0               # same direction, different norm: must verbalize identically
    v[5] = v[4] + 0.5 * v[4].norm() * torch.randn(d_model, generator=g) / math.sqrt(d_model)
    return v
