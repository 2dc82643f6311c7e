"""Token-budget batching: every row once, budget kept, padding bounded."""
import random

from pipeline.engines.batching import token_budget_batches


def test_every_row_once_within_budget_and_little_padding():
    rng = random.Random(0)
    lengths = [min(1500, int(rng.lognormvariate(4.1, 0.85)) + 20) for _ in range(500)]
    batches = token_budget_batches(lengths, max_tokens=4096)
    assert sorted(i for b in batches for i in b) == list(range(500))
    computed = 0
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * longest <= 4096
        computed += len(b) * longest
    assert 1 - sum(lengths) / computed < 0.10


def test_a_row_longer_than_the_budget_gets_its_own_batch():
    assert token_budget_batches([5000, 10, 12], max_tokens=1000) == [[0], [2, 1]]
