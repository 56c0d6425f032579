"""Split a dataset among federated clients with flwr-datasets partitioners (docs/design.md §5).

``partition_dataset`` hands an in-memory ``datasets.Dataset`` to a Flower
partitioner (``partitioner.dataset = ds``, then ``load_partition(i)``) and
returns every partition, each non-empty, together covering every row exactly
once. Two things about those partitioners shape this wrapper:

* ``IidPartitioner`` cuts the dataset into *contiguous* shards without
  shuffling, so a sorted dataset would give non-IID shards. We shuffle with
  ``seed`` first.
* ``DirichletPartitioner`` redraws the Dirichlet proportions when a partition
  ends up below ``min_partition_size`` (with a warning per redraw) and raises
  after 11 draws. With few label values, many partitions and a small alpha
  (3 labels, 20 partitions, alpha 0.1) almost every draw leaves some partition
  empty. We ask for ``min_partition_size=1`` (non-empty, the weakest
  constraint, so the label skew is as Dirichlet-like as possible), silence the
  redraw warnings, try a few seeds derived from ``seed`` and then raise a
  ``ValueError`` that says what to change.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Literal, get_args

from datasets import Dataset

Scheme = Literal["iid", "dirichlet"]

DIRICHLET_SEED_TRIES = 4
"""Partitioner seeds tried (``seed``, then derived ones) before giving up on non-empty partitions."""

_SEED_STRIDE = 1_000_003


def _validate(
    dataset: object, num_partitions: object, scheme: object, alpha: object, partition_by: object, seed: object
) -> None:
    if not isinstance(dataset, Dataset):
        raise TypeError(f"partition_dataset: dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    if scheme not in get_args(Scheme):
        raise ValueError(f"partition_dataset: scheme={scheme!r} is not one of {list(get_args(Scheme))}")
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, numbers.Integral) or num_partitions < 1:
        raise ValueError(f"partition_dataset: num_partitions={num_partitions!r} must be an int >= 1")
    if num_partitions > len(dataset):
        raise ValueError(
            f"partition_dataset: num_partitions={num_partitions} is more than the {len(dataset)} rows of the "
            "dataset; every partition must be non-empty"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or not alpha > 0:
        raise ValueError(f"partition_dataset: alpha={alpha!r} must be a finite number > 0")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"partition_dataset: seed={seed!r} must be an int")
    if scheme == "dirichlet" and partition_by not in dataset.column_names:
        raise ValueError(
            f"partition_dataset: partition_by={partition_by!r} is not a column of the dataset "
            f"(columns: {dataset.column_names})"
        )


def _standalone(partition: Dataset) -> Dataset:
    """A copy holding only the partition's rows (``select`` keeps the whole table behind an index map);
    built with ``from_dict`` because ``flatten_indices`` prints a progress bar per partition."""
    return Dataset.from_dict(partition.to_dict(), features=partition.features)


def partition_dataset(
    dataset: Dataset,
    num_partitions: int,
    *,
    scheme: Scheme = "iid",
    alpha: float = 0.5,
    partition_by: str = "label",
    seed: int = 0,
) -> list[Dataset]:
    """Split ``dataset`` into ``num_partitions`` non-empty partitions covering each row exactly once.

    Args:
        dataset: an in-memory ``datasets.Dataset`` (e.g. the train split of ``load_task``).
        num_partitions: number of clients, 1..len(dataset).
        scheme: ``"iid"``: shuffle with ``seed``, then ``IidPartitioner``
            (contiguous shards whose sizes differ by at most one);
            ``"dirichlet"``: ``DirichletPartitioner`` over the values of
            ``partition_by`` (the smaller ``alpha``, the more skewed the label
            mix and the sizes), ``min_partition_size=1``, no self-balancing.
        alpha: Dirichlet concentration (> 0); ignored by ``"iid"``.
        partition_by: label column of the Dirichlet scheme.
        seed: makes the split deterministic.

    Returns:
        The partitions in client order, each a standalone in-memory ``Dataset``.

    Raises:
        ValueError: a bad argument (the message quotes it), or Dirichlet draws
            that keep leaving a partition empty.
    """
    _validate(dataset, num_partitions, scheme, alpha, partition_by, seed)
    num_partitions, seed = int(num_partitions), int(seed)
    # Imported here: flwr_datasets pulls in its plotting helpers (~3 s) at import time.
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = dataset.shuffle(seed=seed)
        return [_standalone(partitioner.load_partition(i)) for i in range(num_partitions)]

    failure: ValueError | None = None
    for attempt in range(DIRICHLET_SEED_TRIES):
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=partition_by,
            alpha=float(alpha),
            min_partition_size=1,
            self_balancing=False,
            shuffle=True,
            seed=seed + attempt * _SEED_STRIDE,
        )
        partitioner.dataset = dataset
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            try:
                return [_standalone(partitioner.load_partition(i)) for i in range(num_partitions)]
            except ValueError as err:  # flwr: "The max number of attempts (10) was reached."
                failure = err
    num_labels = len(dataset.unique(partition_by))
    raise ValueError(
        f"partition_dataset: Dirichlet(alpha={alpha!r}) over {num_labels} value(s) of {partition_by!r} left some of "
        f"the {num_partitions} partitions of {len(dataset)} rows empty in every draw "
        f"({DIRICHLET_SEED_TRIES} seeds x 11 draws); raise alpha, use fewer partitions or more rows"
    ) from failure
