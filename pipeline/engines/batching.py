"""Token-budget batching: sort rows by length, fill each batch up to a padded-token budget.

    from pipeline.engines.batching import token_budget_batches
    batches = token_budget_batches([12, 300, 15, 40], max_tokens=1024)   # lists of row indices

Sorting happens within one chunk (a bounded window), so memory stays bounded and the caller
restores input order by the indices it gets back.
"""
from __future__ import annotations


def token_budget_batches(lengths: list[int], max_tokens: int, max_padding: float = 0.1,
                         slack: int = 8) -> list[list[int]]:
    """Group row indices, longest first, so that rows x longest row <= max_tokens (one row at least).

    A row also starts a new batch when it is shorter than the batch's longest row by more than
    ``max_padding`` of it (and more than ``slack`` tokens), so no row is padded by more than that:
    filling a long row's batch with short rows would spend most of the budget on padding.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        too_short = longest - lengths[i] > max(slack, max_padding * longest)
        if current and ((len(current) + 1) * longest > max_tokens or too_short):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches

