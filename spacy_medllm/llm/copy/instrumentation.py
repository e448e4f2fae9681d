"""Counting the model calls of any forward path (plain ``generate``, prompt lookup, the
constrained decoder) the same way, and the decoder's host<->device transfers, for the
benchmarks and tests that compare them."""
from contextlib import contextmanager
from typing import Any, Iterator, List

from .batch import forward_module
from .transfer import TRANSFERS


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


@contextmanager
def count_transfers() -> Iterator[List[int]]:
    """Count the decoder's host<->device transfers inside the block (a one-element list,
    updated when the block ends): every one goes through :mod:`.transfer`."""
    counter = [0]
    before = TRANSFERS[0]
    try:
        yield counter
    finally:
        counter[0] = TRANSFERS[0] - before
