"""Every host<->device transfer of the decoder, in one place and counted.

On a GPU each transfer is a stall between passes, so the decoder sends what a pass needs
as one tensor (:class:`Payload`) and reads back one tensor of choices (:func:`to_host`).
Counting them here makes the number per pass a tested property, also on a CPU where the
"device" is the host itself.
"""
from typing import Any, List, Sequence, Union

TRANSFERS = [0]  # host<->device transfers since import (read through instrumentation.count_transfers)


def to_host(tensor: Any) -> List[Any]:
    """``tensor.tolist()``, one device->host transfer."""
    TRANSFERS[0] += 1
    return tensor.tolist()


class Payload:
    """Integer parts bound for the device, sent as one tensor: a pass's ids, positions,
    mask, selected positions, option rows and cache indices travel together."""

    def __init__(self) -> None:
        self.parts: List[Any] = []

    def add(self, values: Union[Sequence[int], Any]) -> int:
        """Queue ``values`` (a list of ints or a host tensor, flattened); returns its part
        number in :meth:`send`'s result."""
        self.parts.append(values)
        return len(self.parts) - 1

    def send(self, device: Any) -> List[Any]:
        """One host->device transfer of every part; the parts as flat int64 device tensors."""
        import torch

        flat = [torch.as_tensor(p, dtype=torch.long).flatten() for p in self.parts]
        TRANSFERS[0] += 1
        sent = torch.cat(flat).to(device) if flat else torch.zeros(0, dtype=torch.long, device=device)
        return list(sent.split([len(p) for p in flat]))
