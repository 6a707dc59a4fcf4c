"""What the model frame needs to know about a dataset: its feature layout, nothing else.

The data layer (``trainers``) produces a :class:`FeatureSpec` beside the encoded tensors;
the model frame (``spaces.model``) builds its embeddings from it. Blocks never see it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Time-gap buckets of a history step: ``1 + min(floor(log2(1 + gap_seconds)), 39)``;
#: id 0 is the padding of a history shorter than ``K`` (``trainers.sequences``).
N_GAP_BUCKETS = 40


@dataclass(frozen=True)
class SequenceSpec:
    """Layout of a dataset's behaviour histories (``trainers.sequences``).

    A history step is four numbers: the item (an id of the categorical field
    ``item_field``, so it shares that field's embedding rows), the action (``0`` =
    padding, ``1 + label`` of the earlier interaction, so ``1..n_actions``), the
    time-gap bucket (``0`` = padding, ``1..N_GAP_BUCKETS``) and the gap itself in
    seconds (HSTU's relative time bias buckets it).

    Args:
        item_field: index of the item field among the categorical fields.
        n_actions: distinct actions (2 for a 0/1 label).

    Example:
        >>> SequenceSpec(item_field=1).action_rows
        3
    """

    item_field: int
    n_actions: int = 2

    def __post_init__(self) -> None:
        if self.item_field < 0 or self.n_actions < 1:
            raise ValueError(f"bad SequenceSpec {self}")

    @property
    def action_rows(self) -> int:
        """Rows of the action embedding table (padding included)."""
        return self.n_actions + 1

    @property
    def gap_rows(self) -> int:
        """Rows of the time-gap embedding table (padding included)."""
        return N_GAP_BUCKETS + 1


@dataclass(frozen=True)
class FeatureSpec:
    """Layout of one encoded dataset.

    Args:
        cardinalities: vocabulary size of each categorical field, out-of-vocabulary id
            included (ids of field ``f`` lie in ``[0, cardinalities[f])``).
        n_numeric: number of numeric fields (already normalised, float32).
        field_names: names of the categorical fields then the numeric ones, for reports.
        sequence: the behaviour-history layout, or ``None`` when the dataset has none
            (then only ``seq_len = 0`` models can be built).

    Example:
        >>> FeatureSpec(cardinalities=(10, 3), n_numeric=1).n_fields
        3
    """

    cardinalities: tuple[int, ...]
    n_numeric: int = 0
    field_names: tuple[str, ...] = ()
    sequence: SequenceSpec | None = None

    def __post_init__(self) -> None:
        if not self.cardinalities and self.n_numeric == 0:
            raise ValueError("a FeatureSpec needs at least one categorical or numeric field")
        if any(c < 1 for c in self.cardinalities):
            raise ValueError(f"every cardinality must be >= 1, got {self.cardinalities}")
        if self.n_numeric < 0:
            raise ValueError(f"n_numeric must be >= 0, got {self.n_numeric}")
        if self.field_names and len(self.field_names) != self.n_fields:
            raise ValueError(
                f"{len(self.field_names)} field names for {self.n_fields} fields"
            )
        if self.sequence is not None and self.sequence.item_field >= self.n_categorical:
            raise ValueError(
                f"sequence item_field {self.sequence.item_field} is not one of the "
                f"{self.n_categorical} categorical fields"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; ``sequence`` appears only when set (a history-free spec reads
        as it always did). Loads back with :meth:`from_dict`.

        Example:
            >>> spec = FeatureSpec((10, 3), 1, ("a", "b", "c"), SequenceSpec(item_field=1))
            >>> FeatureSpec.from_dict(spec.to_dict()) == spec
            True
        """
        out: dict[str, Any] = {"cardinalities": list(self.cardinalities),
                               "n_numeric": self.n_numeric, "field_names": list(self.field_names)}
        if self.sequence is not None:
            out["sequence"] = {"item_field": self.sequence.item_field,
                               "n_actions": self.sequence.n_actions}
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FeatureSpec:
        """The spec :meth:`to_dict` wrote."""
        seq = raw.get("sequence")
        return cls(
            cardinalities=tuple(int(c) for c in raw["cardinalities"]),
            n_numeric=int(raw["n_numeric"]),
            field_names=tuple(raw["field_names"]),
            sequence=None if seq is None else SequenceSpec(int(seq["item_field"]),
                                                           int(seq["n_actions"])),
        )

    @property
    def n_categorical(self) -> int:
        return len(self.cardinalities)

    @property
    def n_fields(self) -> int:
        return self.n_categorical + self.n_numeric

    @property
    def total_vocab(self) -> int:
        return sum(self.cardinalities)
