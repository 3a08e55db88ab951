"""Test helper for per-sample counts (``Solution.nfe`` is a ``[batch]`` int64 tensor for every solver)."""

import torch


def uniform(count) -> int:
    """The count every sample shares, as an int (fails if the samples differ)."""
    if not torch.is_tensor(count):
        return int(count)
    values = set(count.tolist())
    assert len(values) == 1, f"samples have different counts: {sorted(values)}"
    return values.pop()
