"""Continuous-batching decoder for the verbalizer: shared prompt prefix, eviction, refill, OOM halving.

    from pipeline.engines.decoding import Decoder
    decoder = Decoder(model, tokenizer, prompt, cfg.generation, cfg.verbalizer, max_rows=128)
    rows = decoder.run(vectors)     # [(token ids, finished, n_generated)] in input order
    for key, (tokens, finished, n) in decoder.stream((key, vector) for ...):   # as rows finish

Why hand-written: transformers' ``generate`` keeps finished rows in the batch until the longest row
ends and recomputes the prompt for every row, and its continuous-batching API takes token ids only,
not ``inputs_embeds``. Here:

- **Shared prefix.** Every row's prompt is identical up to the injection token, so the KV cache of
  that prefix is computed once per model load (pipeline.engines.prefix); only the suffix from the injection
  token on is prefilled per row. Rows' caches hold only their own columns and the attention function
  reads the prefix once per step for all rows (cascade attention, pipeline.engines.attention); with another
  ``attn_implementation`` the prefix is copied into each new row instead.
- **No work on finished rows.** A row leaves the batch the step it finishes (``batch_select_indices``
  on the cache) and a waiting row takes its slot. A row that joins late has masked "holes" in its
  cache columns (keys carry their RoPE rotation, so a key's column index does not matter); columns
  that are holes for every row are dropped.
- **Sliding windows, masked by position.** transformers builds masks from cache columns, taking
  column i for position i; here a column is not a position (holes, and with cascade attention the
  prefix is not in the rows' caches). For full attention that does not matter (the rows' 2-D mask
  is passed, and every real key before a query is visible), but a sliding window (Gemma 3, windowed
  Qwen2) is a distance in positions: for such models the decoder tracks each column's position and
  builds the masks itself, through the model's own mask interface (so sdpa, eager and ours each get
  their format), one per layer type in a dict as transformers' models take them: causal by
  position, and only the keys less than the window behind the query, prefix included. Those layers
  keep every key in the cache (the mask hides the old ones): explanations are short.
- **Plain path.** Where this cannot apply (a layer type that is neither full nor sliding-window
  attention, or sliding windows with an attention implementation whose masks are not per-row
  tensors, such as flash attention), one log line names the architecture and the reason, and rows
  are decoded by transformers' ``generate``, ``max_rows`` at a time, with the same results.
- **Exactly the card's decoding.** Greedy argmax over float32 logits after the repetition penalty
  over the generated tokens (transformers' rule, applied in place), stopping at any EOS id or once
  the decoded text contains the stop string, as ``generate(do_sample=False)`` does.
- **OOM halving.** A CUDA out-of-memory error halves the batch: rows in flight are put back in the
  queue (decoding is deterministic, so they restart with identical results) and nothing is lost.
  For that, a step (decoder body, LM head, choice of the next tokens) is one unit: on any error the
  cache is cropped back and the batch is left as it was. Admission, eviction and compaction allocate
  everything before they change anything.
"""
from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Hashable, Iterable, Iterator

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from pipeline.engines.kvcache import keep_columns
from pipeline.engines.prefix import SharedPrefix, supports_cascade
from pipeline.models.architecture import UnsupportedLayers, attention_kinds, final_logit_softcap
from pipeline.protocol.verbalizer import hf_generation_config, normalize_to

log = logging.getLogger(__name__)
OOM_ERRORS = (torch.OutOfMemoryError,)


@functools.lru_cache(maxsize=4)
def _tokens_containing(tokenizer, char: str) -> frozenset[int]:
    """Ids whose decoded text contains ``char`` (once per tokenizer: about 1 s for Qwen's vocabulary)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    return frozenset(i for i, text in enumerate(texts) if char in text)


class _Batch:
    """The rows being decoded: their cache, attention mask [rows, cols] (1 = a real key, 0 = a hole),
    each column's RoPE position [rows, cols] and the generated tokens."""

    def __init__(self, cache, mask: torch.Tensor, key_positions: torch.Tensor):
        self.cache, self.mask, self.key_positions = cache, mask, key_positions
        self.rows: list = []                # key of each batch row (its input index in run())
        self.tokens: list[list[int]] = []   # generated tokens of each batch row
        # The same tokens on the device, [rows, max_new_tokens], each row padded with its own first
        # token (see _choose): rebuilding it from the lists took 4 ms a step at 512 rows.
        self.history: torch.Tensor | None = None
        self.positions: list[int] = []      # RoPE position of the next token fed for each row

    def __len__(self) -> int:
        return len(self.rows)


class Decoder:
    def __init__(self, model, tokenizer, prompt, gcfg, vcfg, max_rows: int, refill_fraction: float = 0.125):
        self.tokenizer = tokenizer
        self.gcfg, self.vcfg = gcfg, vcfg
        self.max_rows = max_rows
        self.refill_at = max(1, int(max_rows * refill_fraction))
        self.eos = set(gcfg.eos_token_ids)
        self.stop = vcfg.stop_string
        # The stop string may be split over many byte-level tokens; decode a window that surely holds it.
        self.stop_window = 4 * len(self.stop.encode()) + 4 if self.stop else 0
        # A row's text can newly contain the stop string only if its newest token holds the stop
        # string's last character, so only those rows are decoded: decoding every row each step costs
        # 15 ms at 512 rows (as long as a whole 7B decode step on an H200). Exact for an ASCII last
        # character: its byte cannot be part of another character's UTF-8 encoding.
        self.stop_enders = _tokens_containing(tokenizer, self.stop[-1]) if self.stop and self.stop[-1].isascii() else None
        self.model, self.prompt = model, prompt
        # Gemma's embedding module scales by sqrt(d_model) itself: its output is what the layers consume,
        # and the injected vector replaces a row of it (normalized to the norm, never scaled again).
        self.embed = model.get_input_embeddings()
        # The decoder body and the LM head are called apart, so the head sees a 2-D [rows, d_model]
        # input: CausalLM's logits_to_keep slice is a strided 3-D view that CPU matmul turns into a
        # bmm against a broadcast weight (1.5 s for 96 rows at width 512, vs 10 ms). This assumes
        # logits = lm_head(hidden), then the config's final logit softcap when set (Gemma's CausalLM),
        # which holds for Qwen2, Qwen3, the Llama family and Gemma 2/3.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.body, self.head = base.get_decoder(), base.get_output_embeddings()
        self.softcap = final_logit_softcap(base.config)
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.plain = self._plan_masks(self.body.config)
        if self.plain:
            log.warning("verbalize: continuous decoding does not apply to %s: %s; decoding with transformers' "
                        "generate instead, %d rows at a time", self.body.config.model_type, self.plain, max_rows)
        self.penalty = gcfg.repetition_penalty
        self.warpers = LogitsProcessorList([
            TemperatureLogitsWarper(gcfg.temperature), TopKLogitsWarper(gcfg.top_k), TopPLogitsWarper(gcfg.top_p),
        ] if gcfg.do_sample else [])
        ids = torch.tensor([prompt.token_ids], device=self.device)
        with torch.inference_mode():
            embeds = self.embed(ids)  # [1, prompt_len, d_model]
            self.prompt_embeds = embeds
            self.suffix_embeds = embeds[0, prompt.inject_pos:]  # [suffix_len, d_model]
            if not self.plain:
                self.prefix = SharedPrefix(self.body, inputs_embeds=embeds[:, : prompt.inject_pos],
                                           cascade=supports_cascade(self.body))
        self.prefix_len = prompt.inject_pos
        self.prefix_positions = torch.arange(self.prefix_len, device=self.device)

    def _plan_masks(self, config) -> str | None:
        """Choose how attention masks are built; returns why continuous decoding cannot apply, or None.

        ``self.kinds``: {layer type (None: every layer): sliding window or None}. ``self.mask_interface``:
        the model's mask function, used when some layer has a sliding window; else None, and the
        decoder passes its 2-D [rows, cols] mask as it always has: with full attention only, the masks
        transformers builds from it are exact (the queries are the newest columns, a suffix's columns
        are in position order, holes are masked, and the whole prefix is visible), and cheaper.
        """
        try:
            self.kinds = attention_kinds(config)
        except UnsupportedLayers as e:
            return f"its {e} is neither full nor sliding-window attention, the only masks the decoder builds"
        self.mask_interface = None
        if all(w is None for w in self.kinds.values()):
            return None
        # A dict keyed by layer type when the config has layer types (they differ in their masks).
        self.mask_dict = None not in self.kinds
        impl = config._attn_implementation
        interface = ALL_MASK_ATTENTION_FUNCTIONS[impl] if impl in ALL_MASK_ATTENTION_FUNCTIONS else None
        try:  # a 1 x 2 probe: does this implementation's mask function give a dense [rows, 1, q, cols] tensor?
            probe = interface(batch_size=1, q_length=1, kv_length=2, q_offset=0, kv_offset=0,
                              mask_function=lambda b, h, q, kv: kv <= q, attention_mask=None,
                              allow_is_causal_skip=False, dtype=self.dtype, device=self.device, config=config,
                              use_vmap=False) if interface is not None else None
            dense = isinstance(probe, torch.Tensor) and tuple(probe.shape) == (1, 1, 1, 2)
        except Exception:  # noqa: BLE001 - any failure means: not a dense mask
            dense = False
        if dense:
            self.mask_interface = interface
        else:
            return (f"its sliding-window layers need per-row masks, which attn_implementation={impl!r} does not "
                    "take: its masks count cache columns, and refilled rows do not share them")
        return None

    def _attention_mask(self, valid: torch.Tensor, key_positions: torch.Tensor, query_positions: torch.Tensor):
        """The ``attention_mask`` for a forward whose queries sit at ``query_positions`` [rows, q], over the
        rows' own cache columns (this call's included): ``valid`` [rows, cols] (1 = a real key) and
        ``key_positions`` [rows, cols]. Causal by position; a sliding-window layer sees only keys less
        than its window behind the query, and with cascade attention its mask also covers the
        prefix's columns (positions 0..P-1), which the window may leave behind."""
        if self.mask_interface is None:
            return valid  # full attention only: transformers' masks from the 2-D one are exact
        keys, queries = key_positions[:, None, :], query_positions[:, :, None]
        causal = valid.bool()[:, None, :] & (keys <= queries)  # [rows, q, cols]
        by_window: dict = {}
        for window in set(self.kinds.values()):
            visible = causal
            if window is not None:
                visible = causal & (keys > queries - window)
                if self.prefix.cascade and self.prefix_len:
                    prefix = self.prefix_positions[None, None, :] > queries - window  # [rows, q, P]
                    visible = torch.cat([prefix, visible], dim=-1)
            rows, q, cols = visible.shape
            by_window[window] = self.mask_interface(
                batch_size=rows, q_length=q, kv_length=cols, q_offset=0, kv_offset=0,
                mask_function=lambda b, h, qi, kv, v=visible: v[b, qi, kv], attention_mask=None,
                allow_is_causal_skip=False, dtype=self.dtype, device=self.device, config=self.body.config,
                use_vmap=False)
        if not self.mask_dict:
            return by_window[next(iter(self.kinds.values()))]
        return {kind: by_window[window] for kind, window in self.kinds.items()}

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 [rows, vocab] from the last hidden states [rows, d_model], as the CausalLM computes them."""
        logits = self.head(hidden)
        if self.softcap is not None:  # in the model's dtype, as the CausalLM does before generate's cast
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    # --- public -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, vectors: torch.Tensor, progress=None) -> list[tuple[list[int], bool, int]]:
        """Decode every vector ([rows, d_model]); results in input order."""
        done = dict(self.stream(enumerate(vectors), progress))
        return [done[i] for i in range(len(vectors))]

    @torch.inference_mode()
    def stream(self, rows: Iterable[tuple[Hashable, torch.Tensor]], progress=None
               ) -> Iterator[tuple[Hashable, tuple[list[int], bool, int]]]:
        """Decode (key, vector) pairs, yielding (key, (tokens, finished, n_generated)) as each row ends.

        ``rows`` is read lazily, at most one batch ahead, so a caller can feed chunk after chunk and
        free slots are refilled across chunk boundaries instead of the batch draining at each one.
        """
        if self.plain:
            yield from self._plain_stream(rows, progress)
            return
        source = iter(rows)
        queue: deque = deque()
        vectors: dict = {}  # rows queued or in flight; a requeued row (OOM) is decoded again from here
        exhausted = False
        batch: _Batch | None = None
        while True:
            while not exhausted and len(queue) < self.max_rows:
                try:
                    key, vector = next(source)
                except StopIteration:
                    exhausted = True
                    break
                queue.append(key)
                vectors[key] = vector
            active = len(batch) if batch is not None else 0
            if not queue and not active:
                return
            free = self.max_rows - active
            take = []
            if queue and (active == 0 or free >= min(self.refill_at, len(queue))):
                take = [queue.popleft() for _ in range(min(free, len(queue)))]
            try:
                if take:
                    batch = self._admit(batch, take, torch.stack([vectors[k] for k in take]))
                else:
                    self._step(batch)
            except OOM_ERRORS:
                if self.max_rows == 1:
                    raise
                batch = self._halve(batch, queue, take)
                continue
            for key, result in self._retire(batch, progress):
                del vectors[key]
                yield key, result

    # --- steps --------------------------------------------------------------------------------------

    def _admit(self, batch: _Batch | None, rows: list, vectors: torch.Tensor) -> _Batch:
        """Prefill the suffix of new rows (keys ``rows``, vectors [n, d_model]) on top of the shared
        prefix and add them to the batch."""
        n = len(rows)
        embeds = self.suffix_embeds.unsqueeze(0).repeat(n, 1, 1)  # [n, suffix_len, d_model]
        embeds[:, 0] = normalize_to(vectors.to(self.device), self.vcfg.injection_norm).to(embeds.dtype)
        cache = self.prefix.cache(n)
        suffix_len = embeds.shape[1]
        total = self.prefix_len + suffix_len
        positions = torch.arange(self.prefix_len, total, device=self.device).expand(n, -1)
        mask = torch.ones(n, self.prefix.columns + suffix_len, dtype=torch.long, device=self.device)
        # The rows' own columns: the prefix's too unless cascading, then the suffix.
        key_positions = torch.arange(self.prefix_len - self.prefix.columns, total, device=self.device).repeat(n, 1)
        hidden = self.body(inputs_embeds=embeds, position_ids=positions,
                           attention_mask=self._attention_mask(mask, key_positions, positions),
                           **self.prefix.kw(cache)).last_hidden_state
        first = self._choose(self._logits(hidden[:, -1]), None)
        new = _Batch(cache, mask, key_positions)
        new.history = first.unsqueeze(1).expand(n, self.gcfg.max_new_tokens).clone()
        new.rows, new.tokens, new.positions = list(rows), [[t] for t in first.tolist()], [total] * n
        return new if batch is None or not len(batch) else self._merge(batch, new)

    def _merge(self, batch: _Batch, new: _Batch) -> _Batch:
        """Add new rows below the batch. They are never longer than the batch's rows (those hold the
        same prefix and suffix plus generated tokens), so their missing columns become masked holes."""
        width, cols = batch.mask.shape[1], new.mask.shape[1]
        # Allocate everything first: an OOM up to here changes nothing.
        mask = torch.cat([batch.mask, torch.nn.functional.pad(new.mask, (0, width - cols))])
        key_positions = torch.cat([batch.key_positions, torch.nn.functional.pad(new.key_positions, (0, width - cols))])
        history = torch.cat([batch.history, new.history])
        for layer in batch.cache.layers:
            layer.reserve_rows(len(batch) + len(new))
        for layer, fresh in zip(batch.cache.layers, new.cache.layers):  # copies into reserved rows
            layer.append_rows(fresh.keys, fresh.values)
        batch.mask, batch.key_positions, batch.history = mask, key_positions, history
        batch.rows += new.rows
        batch.tokens += new.tokens
        batch.positions += new.positions
        return batch

    def _step(self, batch: _Batch) -> None:
        """One decode step for every row in the batch.

        Body, head and choice are one unit. The body appends this step's keys and values to the
        cache; if anything fails before the step is committed, they are cropped off again and the
        batch is as it was, so a retry (after OOM halving) decodes exactly as if nothing had failed.
        """
        lengths = [layer.get_seq_length() for layer in batch.cache.layers]
        try:
            mask, key_positions, at, nxt, chosen = self._next_tokens(batch)
        except BaseException:  # OOM or not (even an interrupt): undo, then let the error go on
            for layer, length in zip(batch.cache.layers, lengths):
                if layer.get_seq_length() > length:
                    layer.crop(length - layer.get_seq_length())
            raise
        # Commit. Nothing here allocates: the history is written in place.
        batch.history.scatter_(1, at, nxt.unsqueeze(1))
        batch.mask, batch.key_positions = mask, key_positions
        for row, t in enumerate(chosen):
            batch.tokens[row].append(t)
            batch.positions[row] += 1

    def _next_tokens(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """The step's work; of the batch it changes only the cache (this step's keys and values).

        Returns the widened mask and key positions [rows, cols + 1], each row's new history column
        [rows, 1] and the new tokens [rows], also as a list (which waits for the device, so errors
        surface here).
        """
        ids = torch.tensor([[t[-1]] for t in batch.tokens], device=self.device)
        mask = torch.nn.functional.pad(batch.mask, (0, 1), value=1)
        positions = torch.tensor(batch.positions, device=self.device).unsqueeze(1)
        key_positions = torch.cat([batch.key_positions, positions], dim=1)
        hidden = self.body(input_ids=ids, attention_mask=self._attention_mask(mask, key_positions, positions),
                           position_ids=positions, **self.prefix.kw(batch.cache)).last_hidden_state
        lengths = [len(t) for t in batch.tokens]
        nxt = self._choose(self._logits(hidden[:, -1]), batch.history[:, : max(lengths)])
        # Every row has fewer than max_new_tokens tokens here (rows that reach it retire each step).
        at = torch.tensor(lengths, device=self.device).unsqueeze(1)
        return mask, key_positions, at, nxt, nxt.tolist()

    def _choose(self, logits: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        """Next token per row [rows]: repetition penalty over each row's generated tokens, then argmax
        (or sample).

        logits: float32 [rows, vocab], modified in place; history: [rows, width] token ids, or None
        at the first token.
        """
        if self.penalty != 1.0 and history is not None:
            # transformers' RepetitionPenaltyLogitsProcessor, done in place: the library's version
            # rewrites the whole [rows, vocab] tensor (42 ms for 96 rows x 152k vocab, vs 0.1 ms).
            # Rows have different lengths; each is padded with its own first token, and gather/scatter
            # of a repeated id writes the same value, so padding changes nothing. At the first token
            # (prefill) every history is empty and, as in generate, nothing is penalized.
            score = logits.gather(1, history)
            logits.scatter_(1, history, torch.where(score < 0, score * self.penalty, score / self.penalty))
        if self.gcfg.do_sample:
            # Temperature/top-k/top-p read only the scores; their input_ids argument is unused.
            logits = self.warpers(torch.empty(len(logits), 0, dtype=torch.long, device=logits.device), logits)
            return torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(1)
        return logits.argmax(dim=-1)

    def _finished(self, tokens: list[int]) -> bool:
        if tokens[-1] in self.eos:
            return True
        if self.stop:
            if self.stop_enders is not None and tokens[-1] not in self.stop_enders:
                return False
            tail = self.tokenizer.decode(tokens[-self.stop_window:], skip_special_tokens=True)
            return self.stop in tail
        return False

    def _retire(self, batch: _Batch, progress) -> list:
        """Move finished rows out of the batch, returning [(key, result)], and drop cache columns that
        no row uses any more."""
        keep, done = [], []
        for row, tokens in enumerate(batch.tokens):
            finished = self._finished(tokens)
            if finished or len(tokens) >= self.gcfg.max_new_tokens:
                done.append((batch.rows[row], (tokens, finished, len(tokens))))
                if progress is not None:
                    progress(1)
            else:
                keep.append(row)
        if len(keep) == len(batch):
            return done
        self._keep(batch, keep)
        if len(keep):
            self._compact(batch)
        return done

    def _compact(self, batch: _Batch) -> None:
        """Drop the cache columns that every row masks, once they are a quarter of the cache:
        dropping moves the whole cache, so it is not worth doing for one column at a time."""
        try:
            used = batch.mask.any(dim=0)
            if (~used).sum() * 4 <= used.numel():
                return
            cols = used.nonzero().squeeze(1)
            mask, key_positions = batch.mask[:, cols], batch.key_positions[:, cols]
            keep_columns(batch.cache, cols)  # allocates first: an OOM leaves the cache as it was
        except OOM_ERRORS:
            # Compaction is only an economy: the holes stay masked, and the next retirement retries.
            log.debug("out of memory while compacting the cache: skipped")
            return
        batch.mask, batch.key_positions = mask, key_positions

    def _keep(self, batch: _Batch, keep: list[int]) -> None:
        """Keep the rows ``keep``; the last survivors move into the freed slots, so the cache copies
        only the moved rows (see GrowableLayer.batch_select_indices). Row order is irrelevant."""
        n, kept = len(keep), set(keep)
        fillers = iter([r for r in keep if r >= n])
        keep = [r if r in kept else next(fillers) for r in range(n)]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        # allocated before anything moves
        mask, key_positions, history = batch.mask[index], batch.key_positions[index], batch.history[index]
        batch.cache.batch_select_indices(index)  # every moved row comes from beyond n: moved in place
        batch.mask, batch.key_positions, batch.history = mask, key_positions, history
        batch.rows = [batch.rows[i] for i in keep]
        batch.tokens = [batch.tokens[i] for i in keep]
        batch.positions = [batch.positions[i] for i in keep]

    def _halve(self, batch: _Batch | None, queue: deque, admitted: list[int]) -> _Batch | None:
        """After an out-of-memory error: halve the row limit and requeue rows so that none is lost."""
        self.max_rows = max(1, self.max_rows // 2)
        self.refill_at = max(1, min(self.refill_at, self.max_rows // 4))
        requeue = list(admitted)
        if batch is not None and len(batch) > self.max_rows:
            requeue = batch.rows[self.max_rows:] + requeue
            self._keep(batch, list(range(self.max_rows)))
        queue.extendleft(reversed(requeue))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("out of memory: retrying with at most %d rows per batch (%d row(s) requeued)",
                    self.max_rows, len(requeue))
        return batch

    # --- the plain path ---------------------------------------------------------------------------

    def _plain_stream(self, rows: Iterable[tuple[Hashable, torch.Tensor]], progress
                      ) -> Iterator[tuple[Hashable, tuple[list[int], bool, int]]]:
        """transformers' ``generate`` over ``max_rows`` rows at a time, for models the continuous decoder
        cannot mask exactly; results as ``stream`` gives them (no OOM halving here)."""
        batch: list = []
        for row in rows:
            batch.append(row)
            if len(batch) == self.max_rows:
                yield from self._generate(batch, progress)
                batch = []
        if batch:
            yield from self._generate(batch, progress)

    def _generate(self, batch: list, progress) -> Iterator[tuple[Hashable, tuple[list[int], bool, int]]]:
        g = self.gcfg
        embeds = self.prompt_embeds.expand(len(batch), -1, -1).clone()
        vectors = torch.stack([v for _, v in batch]).to(self.device)
        embeds[:, self.prompt.inject_pos] = normalize_to(vectors, self.vcfg.injection_norm).to(embeds.dtype)
        config = hf_generation_config(g, self.stop)
        out = self.model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                  device=self.device), generation_config=config, tokenizer=self.tokenizer)
        for (key, _), generated in zip(batch, out.tolist()):  # only new tokens: no input_ids were given
            # A finished row is padded up to the longest one: cut it where the decoder would have stopped.
            n = next((k for k in range(1, len(generated) + 1) if self._finished(generated[:k])), None)
            tokens = generated[:n] if n is not None else generated[: g.max_new_tokens]
            if progress is not None:
                progress(1)
            yield key, (tokens, n is not None, len(tokens))
