"""The activation reconstructor's one-example computation in plain transformers + peft + safetensors.

Test code only: the batched pipeline (pipeline/models/reconstructor.py) is compared with this, and this never
calls the pipeline. The FULL causal LM is loaded (no truncation), the rendered template goes through
one forward pass, and a forward hook on ``layers[layer]`` takes that layer's raw output at the last
token (``hidden_states[-1]`` would be after the final norm).

    from tests.ar_reference import reference_prediction
    p = reference_prediction(ar_dir, "a cat", template, layer=20)                     # value-head AR
    p = reference_prediction((base_dir, adapter_dir), "a cat", template, layer=20)   # LoRA AR
"""
from __future__ import annotations

import functools
import os

import torch

TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"


@functools.lru_cache(maxsize=None)
def _value_head_ar(ar_dir: str):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ar_dir, dtype=torch.float32).eval()
    head = load_file(os.path.join(ar_dir, "value_head.safetensors"))
    return model, model.model.layers, AutoTokenizer.from_pretrained(ar_dir), head


@functools.lru_cache(maxsize=None)
def _lora_ar(base_dir: str, adapter_dir: str, head_file: str | None):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()  # unmerged: the adapter's own forward
    head = load_file(head_file) if head_file else None
    return model, model.base_model.model.model.layers, AutoTokenizer.from_pretrained(base_dir), head


def reference_prediction(checkpoint, explanation: str, template: str = TEMPLATE, layer: int = 20,
                         add_special_tokens: bool = True, value_head: str | None = None) -> torch.Tensor:
    """float32 [d_model]: the AR's prediction for one explanation.

    ``checkpoint``: a value-head AR directory (its value_head.safetensors is applied), or a
    ``(base_dir, adapter_dir)`` pair for a LoRA AR (``value_head``: an optional head file for it).
    """
    if isinstance(checkpoint, (tuple, list)):
        model, layers, tokenizer, head = _lora_ar(str(checkpoint[0]), str(checkpoint[1]), value_head)
    else:
        model, layers, tokenizer, head = _value_head_ar(str(checkpoint))
    text = template.replace("{explanation}", explanation)
    ids = tokenizer(text, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"]
    seen = {}

    def hook(module, args, output):
        seen["h"] = (output[0] if isinstance(output, tuple) else output)[0, -1].detach().float()

    handle = layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=ids, logits_to_keep=1)  # the LM head is not what is read: skip its 152k-wide GEMM
    finally:
        handle.remove()
    h = seen["h"]  # [d_model], the raw residual stream after layers[layer]
    if head is None:
        return h
    prediction = head["weight"].float() @ h
    return prediction + head["bias"].float() if "bias" in head else prediction
