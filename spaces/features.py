"""What the model frame needs to know about a dataset: its feature layout, nothing else.

The data layer (``trainers``) produces a :class:`FeatureSpec` beside the encoded tensors;
the model frame (``spaces.model``) builds its embeddings from it. Blocks never see it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureSpec:
    """Layout of one encoded dataset.

    Args:
        cardinalities: vocabulary size of each categorical field, out-of-vocabulary id
            included (ids of field ``f`` lie in ``[0, cardinalities[f])``).
        n_numeric: number of numeric fields (already normalised, float32).
        field_names: names of the categorical fields then the numeric ones, for reports.

    Example:
        >>> FeatureSpec(cardinalities=(10, 3), n_numeric=1).n_fields
        3
    """

    cardinalities: tuple[int, ...]
    n_numeric: int = 0
    field_names: tuple[str, ...] = ()

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

    @property
    def n_categorical(self) -> int:
        return len(self.cardinalities)

    @property
    def n_fields(self) -> int:
        return self.n_categorical + self.n_numeric

    @property
    def total_vocab(self) -> int:
        return sum(self.cardinalities)
