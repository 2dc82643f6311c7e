"""The fast paths keep the card's outputs: shared prefix, eviction/refill, OOM halving, order."""
import logging

import pytest
import torch

from pipeline.config import load_config
from pipeline.engines.decoding import Decoder
from pipeline.models.modeling import load_extract_model, load_verbalizer_model
from pipeline.protocol.verbalizer import build_prompt, decode_row
from tests.card_reference import card_text
from tests.conftest import TINY_CONFIG


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY_CONFIG)


@pytest.fixture(scope="module")
def merged(cfg, tiny_adapter_dir):
    return load_verbalizer_model(cfg, torch.device("cpu"))


class Recorder:
    """Forward pre-hook: records (rows, new tokens) of every model call; can fake an OOM above a size."""

    def __init__(self, model, oom_above: int | None = None):
        self.calls: list[tuple[int, int]] = []
        self.oom_above = oom_above
        self.handle = getattr(model, "model", model).register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids")
        if self.oom_above is not None and x.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError("injected: batch too large")
        self.calls.append((x.shape[0], x.shape[1]))


def texts(tokenizer, cfg, rows):
    return [decode_row(tokenizer, toks, cfg.generation.eos_token_ids, cfg.verbalizer.stop_string)[0] for toks, _, _ in rows]


def test_prefix_once_and_eviction_refill(merged, tokenizer, cfg, vectors, reference):
    prompt = build_prompt(tokenizer, cfg.verbalizer, 73)
    rec = Recorder(merged)
    try:
        decoder = Decoder(merged, tokenizer, prompt, cfg.generation, cfg.verbalizer, max_rows=4)
        first = decoder.run(vectors[:12])
        second = decoder.run(vectors[12:20])  # a second chunk reuses the same prefix cache
    finally:
        rec.handle.remove()
    suffix = len(prompt.token_ids) - prompt.inject_pos
    assert rec.calls[0] == (1, prompt.inject_pos)  # the shared prefix: once, for one row
    assert sum(1 for c in rec.calls if c[1] == prompt.inject_pos) == 1
    admits = [c for c in rec.calls[1:] if c[1] == suffix]
    steps = [c for c in rec.calls[1:] if c[1] == 1]
    assert len(admits) + len(steps) == len(rec.calls) - 1
    assert len(admits) > 2, "freed slots should be refilled"
    assert max(rows for rows, _ in rec.calls) <= 4
    rows = first + second
    # No work on finished rows: each row is fed exactly its generated tokens but the last.
    assert sum(r for r, _ in steps) == sum(n - 1 for _, _, n in rows)
    assert texts(tokenizer, cfg, rows) == [card_text(tokenizer, g) for g in reference[:20]]


def test_out_of_memory_halves_the_batch_and_loses_nothing(merged, tokenizer, cfg, vectors, reference, caplog):
    prompt = build_prompt(tokenizer, cfg.verbalizer, 73)
    decoder = Decoder(merged, tokenizer, prompt, cfg.generation, cfg.verbalizer, max_rows=16)
    rec = Recorder(merged, oom_above=3)
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline"):
            rows = decoder.run(vectors[:10])
    finally:
        rec.handle.remove()
    assert decoder.max_rows == 2
    assert "out of memory" in caplog.text
    assert texts(tokenizer, cfg, rows) == [card_text(tokenizer, g) for g in reference[:10]]


def test_out_of_memory_mid_decode_is_rolled_back(merged, tokenizer, cfg, vectors, reference):
    """An OOM after some steps: the cache is cropped back, half the rows requeued, results unchanged."""
    prompt = build_prompt(tokenizer, cfg.verbalizer, 73)
    decoder = Decoder(merged, tokenizer, prompt, cfg.generation, cfg.verbalizer, max_rows=6)
    state = {"steps": 0}

    def flaky(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]  # [rows, new tokens, d_model]
        if hidden.shape[1] == 1 and hidden.shape[0] > 3:
            state["steps"] += 1
            if state["steps"] == 5:
                raise torch.OutOfMemoryError("injected mid-decode")

    handle = merged.model.layers[10].register_forward_pre_hook(flaky, with_kwargs=True)
    try:
        rows = decoder.run(vectors[20:32])
    finally:
        handle.remove()
    assert decoder.max_rows == 3
    assert texts(tokenizer, cfg, rows) == [card_text(tokenizer, g) for g in reference[20:32]]


def test_stream_refills_across_chunk_boundaries(merged, tokenizer, cfg, vectors, reference):
    """Rows are pulled lazily (at most a batch ahead) and a second chunk's rows start decoding
    before the first chunk's have all finished; every result still matches the card."""
    prompt = build_prompt(tokenizer, cfg.verbalizer, 73)
    decoder = Decoder(merged, tokenizer, prompt, cfg.generation, cfg.verbalizer, max_rows=4)
    events = []

    def rows():
        for i in range(12):  # "chunks" 0..5 and 6..11
            events.append(("in", i))
            yield i, vectors[i]

    done = {}
    for key, result in decoder.stream(rows()):
        events.append(("out", key))
        done[key] = result
        pulled = sum(kind == "in" for kind, _ in events)
        assert pulled - len(done) <= 2 * decoder.max_rows  # in flight + one batch of lookahead
    last_of_first = max(n for n, (kind, key) in enumerate(events) if kind == "out" and key < 6)
    assert any(kind == "in" and key >= 6 for kind, key in events[:last_of_first])
    assert texts(tokenizer, cfg, [done[i] for i in range(12)]) == [card_text(tokenizer, g) for g in reference[:12]]


def test_extract_splits_a_batch_that_runs_out_of_memory(cfg, tokenizer, caplog):
    from pipeline.stages.extract import extract_vectors, render_and_tokenize

    trunk = load_extract_model(cfg, torch.device("cpu"))
    ids = render_and_tokenize(tokenizer, ["a", "bb bb", "ccc ccc ccc", "dddd", "e e e e e e"])
    expected, _, _ = extract_vectors(trunk, ids, max_batch_tokens=1 << 20, pad_id=tokenizer.pad_token_id)
    rec = Recorder(trunk, oom_above=1)  # trunk is the decoder body itself
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline"):
            got, _, _ = extract_vectors(trunk, ids, max_batch_tokens=1 << 20, pad_id=tokenizer.pad_token_id)
    finally:
        rec.handle.remove()
    assert all(rows == 1 for rows, _ in rec.calls)
    assert "out of memory" in caplog.text
    rel = (got - expected).abs().amax(dim=1) / expected.norm(dim=1)  # max |d| / ||ref||, per row
    assert rel.max() < 1e-5


def test_growable_layer_behaves_like_dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    from pipeline.engines.kvcache import GrowableLayer

    g = torch.Generator().manual_seed(0)
    ref, grow = DynamicLayer(), GrowableLayer()
    for n in (5, 1, 1, 70, 1):
        k, v = torch.randn(3, 2, n, 4, generator=g), torch.randn(3, 2, n, 4, generator=g)
        for layer in (ref, grow):
            keys, values = layer.update(k, v)
        torch.testing.assert_close(grow.keys, ref.keys)
        torch.testing.assert_close(grow.values, ref.values)
    for layer in (ref, grow):
        layer.crop(-2)
        layer.batch_select_indices(torch.tensor([2, 0]))
    assert grow.get_seq_length() == ref.get_seq_length() == 76
    torch.testing.assert_close(grow.keys, ref.keys)
    torch.testing.assert_close(grow.values, ref.values)


def test_growable_layer_grows_keys_and_values_together(monkeypatch):
    """An OOM while growing the values' buffer must not leave the keys' buffer grown alone."""
    from pipeline.engines.kvcache import GrowableLayer

    layer, k, big = GrowableLayer(), torch.randn(2, 1, 3, 4), torch.randn(2, 1, 100, 4)
    layer.update(k, k + 1)
    grow, calls = GrowableLayer._grow, []

    def flaky(*args):
        calls.append(args)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("injected")
        return grow(*args)
    monkeypatch.setattr(GrowableLayer, "_grow", staticmethod(flaky))
    with pytest.raises(torch.OutOfMemoryError):
        layer.update(big, big + 1)
    assert layer._k.shape == layer._v.shape
    assert torch.equal(layer.keys, k) and torch.equal(layer.values, k + 1)
    layer.update(big, big + 1)
    assert torch.equal(layer.keys, torch.cat([k, big], 2)) and torch.equal(layer.values, torch.cat([k, big], 2) + 1)


def test_sampling_runs_and_respects_the_cap(merged, tokenizer, cfg, vectors):
    import copy

    gcfg = copy.deepcopy(cfg.generation)
    gcfg.do_sample, gcfg.max_new_tokens = True, 6
    prompt = build_prompt(tokenizer, cfg.verbalizer, 73)
    torch.manual_seed(0)
    rows = Decoder(merged, tokenizer, prompt, gcfg, cfg.verbalizer, max_rows=3).run(vectors[:5])
    assert len(rows) == 5 and all(1 <= n <= 6 and len(toks) == n for toks, _, n in rows)


def test_cascade_is_refused_without_the_attention_that_takes_it(tiny_model_dir):
    from pipeline.engines.prefix import SharedPrefix

    trunk = load_extract_model(load_config(TINY_CONFIG, ["model.attn_implementation=sdpa"]), torch.device("cpu"))
    with pytest.raises(ValueError, match="sdpa_gqa"):
        SharedPrefix(trunk, input_ids=[151644, 8948], cascade=True)
    assert SharedPrefix(trunk, input_ids=[151644, 8948]).ids == [151644, 8948]


# --- a fault anywhere in a step is rolled back --------------------------------------------------------


def _fault(nth: int, accept, error=torch.OutOfMemoryError):
    """A check(*args) that raises ``error`` on the ``nth`` call for which ``accept(*args)`` holds, once."""
    seen = [0]

    def check(*args):
        if accept(*args):
            seen[0] += 1
            if seen[0] == nth:
                raise error("injected")
    return check


def _in_body(decoder, merged, monkeypatch):
    # The final norm runs after every layer has appended this step's keys and values.
    check = _fault(5, lambda h: h.shape[1] == 1 and h.shape[0] > 3)
    return merged.model.norm.register_forward_pre_hook(lambda m, args: check(args[0])).remove


def _in_head(decoder, merged, monkeypatch):
    check = _fault(6, lambda x: x.shape[0] > 3)  # admissions count too: the first call is one
    return merged.get_output_embeddings().register_forward_hook(lambda m, args, out: check(args[0])).remove


def _in_choice(decoder, merged, monkeypatch):
    choose, check = decoder._choose, _fault(4, lambda logits, history: history is not None and len(logits) > 3)

    def flaky(logits, history):
        nxt = choose(logits, history)  # the choice is made (and the logits penalized), then lost
        check(logits, history)
        return nxt
    monkeypatch.setattr(decoder, "_choose", flaky)
    return lambda: None


def _in_admission(decoder, merged, monkeypatch):
    """The LM head fails while a refill is prefilled (the batch is not empty)."""
    admit, state = decoder._admit, {"refill": False}

    def admitting(batch, rows, vectors):
        state["refill"] = batch is not None and len(batch) > 0
        try:
            return admit(batch, rows, vectors)
        finally:
            state["refill"] = False
    monkeypatch.setattr(decoder, "_admit", admitting)
    check = _fault(1, lambda x: state["refill"])
    return merged.get_output_embeddings().register_forward_hook(lambda m, args, out: check(args[0])).remove


def _in_merge(decoder, merged, monkeypatch):
    """Joining the batch runs out of memory concatenating the generated-token history."""
    cat, width = torch.cat, decoder.gcfg.max_new_tokens
    check = _fault(1, lambda ts: ts[0].dtype == torch.long and ts[0].dim() == 2 and ts[0].shape[1] == width)

    def flaky(tensors, *args, **kwargs):
        check(tensors)
        return cat(tensors, *args, **kwargs)
    monkeypatch.setattr(torch, "cat", flaky)
    return lambda: None


# Rows picked to be short (no row runs to max_new_tokens) but of mixed lengths, so batches refill.
@pytest.mark.parametrize("inject, rows, max_rows", [
    (_in_body, list(range(10)), 6),
    (_in_head, [0, 1, 2, 3, 8, 10, 11, 17], 8),
    (_in_choice, list(range(4, 14)), 6),
    (_in_admission, [10, 11, 12, 13, 14, 16, 18, 19, 20, 21], 6),
    (_in_merge, [26, 27, 28, 29, 30, 32, 33, 34, 35, 36], 6),
], ids=["body", "head", "choice", "admission", "merge"])
def test_an_out_of_memory_error_anywhere_in_a_step_changes_nothing(
        inject, rows, max_rows, merged, tokenizer, cfg, vectors, reference, monkeypatch):
    """The batch is halved and retried; every text is still the card's one-at-a-time text."""
    prompt = build_prompt(tokenizer, cfg.verbalizer, 73)
    decoder = Decoder(merged, tokenizer, prompt, cfg.generation, cfg.verbalizer, max_rows=max_rows)
    remove = inject(decoder, merged, monkeypatch)
    try:
        got = decoder.run(vectors[rows])
    finally:
        remove()
    assert decoder.max_rows == max_rows // 2
    assert texts(tokenizer, cfg, got) == [card_text(tokenizer, reference[i]) for i in rows]


def _snapshot(batch):
    layers = [(layer.keys.clone(), layer.values.clone()) for layer in batch.cache.layers]
    return (batch.mask.clone(), batch.history.clone(), [list(t) for t in batch.tokens], list(batch.positions),
            list(batch.rows), layers)


def _assert_same(a, b):
    (mask, history, tokens, positions, rows, layers), (mask2, history2, tokens2, positions2, rows2, layers2) = a, b
    assert torch.equal(mask, mask2) and torch.equal(history, history2)
    assert (tokens, positions, rows) == (tokens2, positions2, rows2)
    assert len(layers) == len(layers2)
    for (k, v), (k2, v2) in zip(layers, layers2):
        assert torch.equal(k, k2) and torch.equal(v, v2)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, ValueError])
def test_a_failed_step_leaves_the_batch_as_it_was(error, merged, tokenizer, cfg, vectors):
    """Any error in the LM head (after the body appended this step's K/V) is undone and propagates."""
    prompt = build_prompt(tokenizer, cfg.verbalizer, 73)
    decoder = Decoder(merged, tokenizer, prompt, cfg.generation, cfg.verbalizer, max_rows=4)
    with torch.inference_mode():
        batch, twin = (decoder._admit(None, [0, 1, 2], vectors[:3]) for _ in range(2))
        decoder._step(batch)
        decoder._step(twin)
        before = _snapshot(batch)
        check = _fault(1, lambda x: True, error)
        handle = merged.get_output_embeddings().register_forward_hook(lambda m, args, out: check(args[0]))
        try:
            with pytest.raises(error, match="injected"):
                decoder._step(batch)
        finally:
            handle.remove()
        _assert_same(_snapshot(batch), before)
        decoder._step(batch)  # and the retried step is the step that never failed
        decoder._step(twin)
        _assert_same(_snapshot(batch), _snapshot(twin))


class _NoMemory:
    """Stands for a tensor whose indexing runs out of memory."""

    def __getitem__(self, index):
        raise torch.OutOfMemoryError("injected")


def test_eviction_and_compaction_allocate_before_they_move_anything(merged, tokenizer, cfg, vectors, monkeypatch,
                                                                      caplog):
    prompt = build_prompt(tokenizer, cfg.verbalizer, 73)
    decoder = Decoder(merged, tokenizer, prompt, cfg.generation, cfg.verbalizer, max_rows=4)
    with torch.inference_mode():
        batch = decoder._admit(None, [0, 1, 2, 3], vectors[:4])
        decoder._step(batch)
        before, history = _snapshot(batch), batch.history
        batch.history = _NoMemory()
        with pytest.raises(torch.OutOfMemoryError):
            decoder._keep(batch, [0, 3])  # row 3 would move into slot 1
        batch.history = history
        _assert_same(_snapshot(batch), before)

        batch.mask[:, : batch.mask.shape[1] // 2] = 0  # half the columns are holes for every row
        before = _snapshot(batch)

        def no_memory(*args, **kwargs):
            raise torch.OutOfMemoryError("injected")
        with monkeypatch.context() as patch, caplog.at_level(logging.DEBUG, logger="pipeline"):
            patch.setattr(torch.Tensor, "new_empty", no_memory)
            decoder._compact(batch)  # compaction is an economy: skipped, and nothing changed
        _assert_same(_snapshot(batch), before)
        assert "compact" in caplog.text

        decoder._compact(batch)
        cols = before[0].any(dim=0).nonzero().squeeze(1)
        assert torch.equal(batch.mask, before[0][:, cols])
        for layer, (k, v) in zip(batch.cache.layers, before[-1]):
            assert torch.equal(layer.keys, k[:, :, cols]) and torch.equal(layer.values, v[:, :, cols])
