"""Where a trial's training split lives while it trains, and how its batches reach the model.

Three placements (``TrainConfig.placement``; ``host`` is the default and today's path):

* ``host``: the split stays in ordinary host memory; each step gathers its batch there
  and copies it to the device (``trainers.sequences.model_inputs``), synchronously.
* ``resident``: ``cat``, ``num`` and ``label`` are copied to the device once, before the
  first step, and every batch is gathered there: no host-to-device copy per step. The
  behaviour histories (ragged offsets into an event table) stay on the host and are
  gathered there as in ``host``.
* ``pinned``: the split stays on the host, each batch is gathered into one of two
  page-locked (pinned) buffers and copied with ``non_blocking=True``, so the copy can
  overlap the previous step's kernels.

``auto`` picks with :func:`choose_placement`: on a CPU device every placement is the same
memory, so ``host``; on an accelerator ``resident`` when the split takes at most
``resident_max_fraction`` of the device memory free when the trial starts (fractional
trials share one GPU, so free, not total, memory is what counts), else ``pinned``.

CPU twins: a forced ``resident`` or ``pinned`` runs on a CPU device too (``resident``
"copies" to the CPU, ``pinned`` gathers into plain buffers because page-locking needs an
accelerator), so the batch code of both paths is tested without a GPU; the batches are
the same tensors as ``host``'s, so a run's weights are identical across placements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from trainers.sequences import model_inputs

__all__ = ["BatchSource", "Placement", "PlacementMode", "choose_placement", "device_free_bytes",
           "split_bytes"]

Placement = Literal["host", "resident", "pinned"]
PlacementMode = Literal["host", "auto", "resident", "pinned"]


def split_bytes(split: Any) -> int:
    """Bytes that ``resident`` would copy to the device: ``cat``, ``num`` and ``label``.

    Example:
        >>> from trainers.data import Split
        >>> split_bytes(Split(torch.zeros(10, 2, dtype=torch.int64), torch.zeros(10, 1),
        ...                   torch.zeros(10)))
        240
    """
    return int(sum(t.numel() * t.element_size() for t in (split.cat, split.num, split.label)))


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes, or ``None`` for the CPU (not a budget we track)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def choose_placement(mode: PlacementMode, device_type: str, data_bytes: int,
                     free_bytes: int | None, max_fraction: float) -> Placement:
    """The placement a trial uses.

    Args:
        mode: ``TrainConfig.placement``; anything but ``auto`` is returned as is.
        device_type: ``cpu``, ``cuda``, ...
        data_bytes: what ``resident`` would copy (:func:`split_bytes`).
        free_bytes: the device's free memory (None: unknown, so not resident).
        max_fraction: the largest share of ``free_bytes`` the split may take.

    Example:
        >>> choose_placement("auto", "cuda", 10 << 30, 140 << 30, 0.25)
        'resident'
        >>> choose_placement("auto", "cuda", 40 << 30, 140 << 30, 0.25)
        'pinned'
        >>> choose_placement("auto", "cpu", 1, None, 0.25)
        'host'
    """
    if mode != "auto":
        return mode
    if device_type == "cpu":
        return "host"
    if free_bytes is not None and data_bytes <= max_fraction * free_bytes:
        return "resident"
    return "pinned"


@dataclass
class _Columns:
    cat: torch.Tensor
    num: torch.Tensor
    label: torch.Tensor


class BatchSource:
    """The model's inputs and the labels of index batches of one split, under a placement.

    Args:
        split: the training split (``cat``, ``num``, ``label``, optional ``history``).
        device: where the model is.
        placement: see the module docstring.
        max_batch: the largest batch asked for (sizes the ``pinned`` buffers).

    Example:
        >>> from trainers.data import Split
        >>> s = Split(torch.arange(8).view(4, 2), torch.zeros(4, 0), torch.ones(4))
        >>> src = BatchSource(s, torch.device("cpu"), "pinned", max_batch=2)
        >>> class M(nn.Module):
        ...     seq_len = 0
        >>> (cat, num), y = src.batch(M(), torch.tensor([3, 1]))
        >>> cat.tolist(), y.tolist()
        ([[6, 7], [2, 3]], [1.0, 1.0])
    """

    def __init__(self, split: Any, device: torch.device, placement: Placement,
                 max_batch: int) -> None:
        self.split, self.device, self.placement = split, device, placement
        self._pin = placement == "pinned" and device.type != "cpu"
        if placement == "resident":
            self._cols = _Columns(split.cat.to(device), split.num.to(device),
                                  split.label.to(device))
        elif placement == "pinned":
            n = min(max_batch, len(split))
            self._buffers = [self._alloc(n) for _ in range(2)]  # double buffering
            self._events: list[Any] = [None, None]
            self._slot = 0

    def _alloc(self, n: int) -> _Columns:
        s = self.split

        def buf(t: torch.Tensor) -> torch.Tensor:
            out = torch.empty((n, *t.shape[1:]), dtype=t.dtype)
            return out.pin_memory() if self._pin else out

        return _Columns(buf(s.cat), buf(s.num), buf(s.label))

    def batch(self, model: nn.Module, idx: torch.Tensor) -> tuple[tuple[torch.Tensor, ...],
                                                                  torch.Tensor]:
        """``(model inputs, labels)`` of examples ``idx`` (a CPU ``int64`` tensor)."""
        if self.placement == "host":
            return (model_inputs(model, self.split, idx, self.device),
                    self.split.label[idx].to(self.device))
        if self.placement == "resident":
            d = idx.to(self.device)
            cat, num, label = self._cols.cat[d], self._cols.num[d], self._cols.label[d]
        else:
            cat, num, label = self._pinned(idx)
        return (cat, num, *self._history(model, idx)), label

    def _pinned(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        slot, self._slot = self._slot, 1 - self._slot
        if self._events[slot] is not None:
            self._events[slot].synchronize()  # the copy out of this buffer has finished
        b, n = self._buffers[slot], idx.shape[0]
        out = []
        for src, dst in ((self.split.cat, b.cat), (self.split.num, b.num),
                         (self.split.label, b.label)):
            view = dst[:n]
            torch.index_select(src, 0, idx, out=view)
            out.append(view.to(self.device, non_blocking=self._pin))
        if self._pin and self.device.type == "cuda":
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
            self._events[slot] = event
        return out[0], out[1], out[2]

    def _history(self, model: nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k = int(getattr(model, "seq_len", 0))
        if k == 0:
            return ()
        history = getattr(self.split, "history", None)
        if history is None:  # model_inputs raises the one error message for this
            return model_inputs(model, self.split, idx, self.device)[2:]
        h: torch.Tensor = history.gather(idx, k)
        if self._pin:
            return (h.pin_memory().to(self.device, non_blocking=True),)
        return (h.to(self.device),)
