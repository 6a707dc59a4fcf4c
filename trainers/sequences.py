"""Behaviour sequences: each example's last ``K`` interactions of its user, strictly before it.

Storage is K-free. One :class:`EventTable` holds every interaction of the dataset once,
sorted by (user, time, row): its item id (the *encoded* id of the item field, so a
history step shares the target item's embedding row), its action (``1 + label``; 0 is
padding) and its timestamp. Each example stores two offsets into that table,
``start`` (its user's first event) and ``end`` (its user's first event at or after the
example's own timestamp), plus its own timestamp for the time gaps::

    history(i) = events[max(start_i, end_i - K) : end_i]      (oldest -> newest)

so the memory is ``13 bytes x events + 24 bytes x examples`` whatever ``K`` is, and a
history of length ``K`` exists only for the examples of one batch (:meth:`Histories.gather`).

No leakage: ``end_i`` is found by a binary search on the key ``(user, time rank)`` with
``side="left"``, so an event of the same user at the same timestamp as the example (a
tie) or later is never in its history, whatever split either row is in. With the
per-user temporal split (``split="user_temporal"``) every history of a train example is
made of train rows; with a random split a train example's history may hold interactions
(and their labels) that are val or test rows of the same user, as a production log
would: use the temporal split for sequence results (docs/data.md).

Example:
    >>> user = np.array([0, 0, 1, 0]); t = np.array([1.0, 2.0, 1.0, 2.0])
    >>> table, hist = build_histories(user, t, np.array([5, 6, 7, 8]),
    ...                               np.array([1, 0, 1, 1], np.float32), {"all": np.arange(4)})
    >>> hist["all"].gather(torch.arange(4), 2)[..., 0].tolist()  # item ids, 0 = padding
    [[0, 0], [0, 5], [0, 0], [0, 5]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from spaces.blocks.attention import time_buckets

__all__ = [
    "EventTable",
    "Histories",
    "build_histories",
    "eval_batch_size",
    "gap_buckets",
    "history_facts",
    "model_inputs",
    "user_temporal_split",
]


@dataclass(frozen=True)
class EventTable:
    """Every interaction once, sorted by (user, time, row).

    Args:
        item: ``(E,)`` int32 encoded item ids (the item field's ids; 0 = OOV).
        action: ``(E,)`` int8 ``1 + label`` (0 is reserved for padding).
        time: ``(E,)`` float64 timestamps (seconds).
    """

    item: torch.Tensor
    action: torch.Tensor
    time: torch.Tensor

    def __post_init__(self) -> None:
        n = self.item.shape[0]
        if self.action.shape != (n,) or self.time.shape != (n,) or self.item.dim() != 1:
            raise ValueError("EventTable needs item, action and time of one length")

    def __len__(self) -> int:
        return int(self.item.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the three columns (the whole table; no ``K`` in it)."""
        return sum(t.numel() * t.element_size() for t in (self.item, self.action, self.time))


def gap_buckets(gap: torch.Tensor) -> torch.Tensor:
    """Time-gap bucket ids ``1 + min(floor(log2(1 + gap)), N_GAP_BUCKETS - 1)``, gap in
    seconds (negative gaps count as 0); the buckets of HSTU's time bias too
    (``spaces.blocks.attention.time_buckets``).

    Example:
        >>> gap_buckets(torch.tensor([0.0, 1.0, 60.0, 86400.0, 1e30])).tolist()
        [1, 2, 6, 17, 40]
    """
    return time_buckets(gap)


@dataclass(frozen=True)
class Histories:
    """The histories of one split: offsets into a shared :class:`EventTable`.

    Args:
        events: the table (shared by every split of a dataset).
        start: ``(N,)`` int64 index of each example's user's first event.
        end: ``(N,)`` int64 index of the user's first event at or after the example's time.
        time: ``(N,)`` float64 the example's own timestamp (for the time gaps).
    """

    events: EventTable
    start: torch.Tensor
    end: torch.Tensor
    time: torch.Tensor

    def __post_init__(self) -> None:
        n = self.start.shape[0]
        if self.end.shape != (n,) or self.time.shape != (n,):
            raise ValueError("Histories needs start, end and time of one length")

    def __len__(self) -> int:
        return int(self.start.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of this split's offsets and timestamps (the event table not included)."""
        return sum(t.numel() * t.element_size() for t in (self.start, self.end, self.time))

    def lengths(self) -> torch.Tensor:
        """``(N,)`` the number of earlier events of each example's user."""
        return self.end - self.start

    def gather(self, idx: torch.Tensor | slice, k: int) -> torch.Tensor:
        """The last ``k`` steps of the histories of examples ``idx``, oldest first.

        Returns:
            ``(B, k, 4)`` int64: item id, action (``1 + label``), time-gap bucket, and the
            gap in whole seconds (``floor(t_example − t_event)``, for HSTU's relative time
            bias); a history shorter than ``k`` is left-padded with zeros in all four.
        """
        end, start, t = self.end[idx], self.start[idx], self.time[idx]  # (B,)
        pos = end[:, None] - k + torch.arange(k)  # (B, k): oldest .. newest
        valid = pos >= start[:, None]  # (B, k)
        pos = pos.clamp(min=0)
        ev = self.events
        item = ev.item[pos].to(torch.int64)
        action = ev.action[pos].to(torch.int64)
        seconds = (t[:, None] - ev.time[pos]).clamp(min=0.0)  # (B, k) float64
        gap = gap_buckets(seconds)
        out = torch.stack([item, action, gap, seconds.clamp(max=2.0**62).floor().to(torch.int64)], dim=-1)  # (B, k, 4)
        return out * valid[..., None]


def _rank(time: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense rank of each timestamp (equal times share a rank) and the rank count."""
    uniq, inverse = np.unique(time, return_inverse=True)
    return inverse.astype(np.int64), len(uniq)


def build_histories(
    user: np.ndarray,
    time: np.ndarray,
    item: np.ndarray,
    label: np.ndarray,
    parts: dict[str, np.ndarray],
) -> tuple[EventTable, dict[str, Histories]]:
    """The event table of all rows and each part's offsets into it.

    Args:
        user: ``(N,)`` int64 user codes (``-1`` = missing: such a row has no history and
            is in no other row's history).
        time: ``(N,)`` float64 timestamps.
        item: ``(N,)`` encoded item ids (the item field's ids).
        label: ``(N,)`` 0/1 labels: the action of each interaction.
        parts: name -> row indices (the splits).

    Returns:
        the table and ``name -> Histories`` for each part.
    """
    n = len(user)
    rank, n_ranks = _rank(time)
    stride = n_ranks + 1
    user = user.astype(np.int64)
    order = np.lexsort((np.arange(n), time, user))  # by user, then time, then row
    key = np.where(user >= 0, user * stride + rank, -1)  # (N,) (user, time rank)
    key_sorted = key[order]
    end = np.searchsorted(key_sorted, key, side="left")  # first event at or after (u, t)
    start = np.searchsorted(key_sorted, user * stride, side="left")  # user's first event
    start = np.where(user >= 0, start, end)  # a row without a user has no history
    table = EventTable(
        item=torch.from_numpy(np.ascontiguousarray(item[order], dtype=np.int32)),
        action=torch.from_numpy((label[order] > 0.5).astype(np.int8) + 1),
        time=torch.from_numpy(np.ascontiguousarray(time[order], dtype=np.float64)),
    )
    out = {
        name: Histories(
            events=table,
            start=torch.from_numpy(start[idx].astype(np.int64)),
            end=torch.from_numpy(end[idx].astype(np.int64)),
            time=torch.from_numpy(np.ascontiguousarray(time[idx], dtype=np.float64)),
        )
        for name, idx in parts.items()
    }
    return table, out


def user_temporal_split(
    user: np.ndarray, time: np.ndarray, fractions: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per user: the last ``round(n_u·f_test)`` interactions are test, the
    ``round(n_u·f_val)`` before them val, the rest train (time order, ties by row;
    rounding half up). Rows without a user (code ``-1``) are train. Indices sorted.

    Example:
        >>> u = np.repeat([0, 1], 10); t = np.tile(np.arange(10.0), 2)
        >>> [len(p) for p in user_temporal_split(u, t, (0.8, 0.1, 0.1))]
        [16, 2, 2]
    """
    n = len(user)
    order = np.lexsort((np.arange(n), time, user))
    u = user[order]
    first = np.r_[True, u[1:] != u[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    pos = np.arange(n) - group_start  # position within the user, time order
    counts = np.bincount(np.cumsum(first) - 1)
    size = counts[np.cumsum(first) - 1]  # the user's interaction count, per row
    n_test = np.floor(size * fractions[2] + 0.5).astype(np.int64)
    n_val = np.floor(size * fractions[1] + 0.5).astype(np.int64)
    from_end = size - pos  # 1 for the user's last interaction
    which = np.where(from_end <= n_test, 2, np.where(from_end <= n_test + n_val, 1, 0))
    which[u < 0] = 0
    part = np.empty(n, dtype=np.int64)
    part[order] = which
    a, b, c = (np.flatnonzero(part == k) for k in range(3))
    return a, b, c


def model_inputs(
    model: nn.Module, split: Any, idx: torch.Tensor | slice, device: str | torch.device
) -> tuple[torch.Tensor, ...]:
    """The arguments of ``model`` for examples ``idx`` of ``split``: ``(cat, num)``, plus
    the ``(B, K, 4)`` histories when the model reads ``K = model.seq_len > 0`` steps.

    Raises:
        ValueError: the model reads histories and the split has none.
    """
    cat, num = split.cat[idx].to(device), split.num[idx].to(device)
    k = int(getattr(model, "seq_len", 0))
    if k == 0:
        return cat, num
    history: Histories | None = getattr(split, "history", None)
    if history is None:
        raise ValueError(
            f"the model reads histories (seq_len={k}) but the data has none: "
            "load it with DataConfig(sequences=True)"
        )
    return cat, num, history.gather(idx, k).to(device)


#: up to this history length an evaluation batch keeps its size
EVAL_FULL_BATCH_K = 16


def eval_batch_size(model: nn.Module, batch_size: int) -> int:
    """The evaluation batch for ``model``: ``batch_size`` for a history-free model or
    ``K <= EVAL_FULL_BATCH_K``, else scaled by ``EVAL_FULL_BATCH_K / K`` (at least 64,
    or ``batch_size`` when that is smaller),
    so an evaluation's peak memory does not grow with ``K`` (full attention holds a
    ``B x heads x K^2`` score tensor: at ``K = 256`` a batch of 8192 took ~9 GB).

    Example:
        >>> m = nn.Module(); m.seq_len = 256
        >>> eval_batch_size(m, 8192)
        512
    """
    k = int(getattr(model, "seq_len", 0))
    if k <= EVAL_FULL_BATCH_K:
        return batch_size
    return max(min(64, batch_size), batch_size * EVAL_FULL_BATCH_K // k)


def history_facts(table: EventTable, parts: dict[str, Histories]) -> dict[str, Any]:
    """JSON-able facts of the histories for the dataset meta."""
    facts: dict[str, Any] = {"events": len(table), "event_table_bytes": table.nbytes,
                             "offset_bytes": sum(h.nbytes for h in parts.values())}
    for name, h in parts.items():
        lengths = h.lengths().to(torch.float64)
        facts[f"{name}_mean_length"] = float(lengths.mean()) if len(h) else 0.0
        facts[f"{name}_empty_share"] = float((lengths == 0).to(torch.float64).mean()) if len(h) else 0.0
    facts["bytes_per_example"] = (facts["event_table_bytes"] + facts["offset_bytes"]) / max(
        sum(len(h) for h in parts.values()), 1)
    return facts
