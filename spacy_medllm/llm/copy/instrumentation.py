"""Counting the model calls of any forward path (plain ``generate``, prompt lookup, the
constrained decoder) the same way, for the benchmarks and tests that compare them."""
from contextlib import contextmanager
from typing import Any, Iterator, List

from .batch import forward_module


@contextmanager
def count_forward_passes(model: Any) -> Iterator[List[int]]:
    """Count forward calls of ``model`` (a one-element list, updated in place), at
    :func:`forward_module`."""
    counter = [0]

    def hook(*_: Any) -> None:
        counter[0] += 1

    handle = forward_module(model).register_forward_pre_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()
