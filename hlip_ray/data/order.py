"""The data order: which study a training run reads at each global position.

Epoch ``e`` visits the training studies in a permutation drawn from ``(seed, e)``, and the
*position* ``p = e * N + i`` of the ``i``-th study of epoch ``e`` is the number of studies consumed
before it, over all workers. A run resumes at a position, whatever its number of workers. Per-study
draws (scans tried, scans sampled, sentence order) come from ``study_rng``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def study_rng(seed: int, epoch: int, study_id: str, stream: int = 0) -> np.random.Generator:
    """A generator for one study's draws in one epoch (scan sampling, sentence order); another
    ``stream`` gives independent draws of the same study (sentence dropout, the one sentence)."""
    key = int.from_bytes(hashlib.sha256(study_id.encode("utf-8")).digest()[:8], "big")
    return np.random.default_rng([seed, epoch, key] + ([stream] if stream else []))


class DataOrder:
    """Which study sits at each global position: epoch ``e`` is a permutation drawn from (seed, e).

    ``position = epoch * num_studies + offset``; the study is ``permutation(seed, epoch)[offset]``.
    """

    def __init__(self, num_studies: int, seed: int) -> None:
        if num_studies <= 0:
            raise ValueError("the training split has no studies")
        self.num_studies = num_studies
        self.seed = seed
        self._epoch, self._permutation = -1, np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._permutation = np.random.default_rng([self.seed, epoch, 0x0D17A]).permutation(self.num_studies)
        return self._permutation

    def locate(self, position: int) -> tuple[int, int]:
        """``(epoch, index of the study in the item list)`` at a global position."""
        epoch, offset = divmod(int(position), self.num_studies)
        return epoch, int(self.permutation(epoch)[offset])


class StudiesAtPositions:
    """A study source over positions: ``{"id": k}`` -> the study record at position ``start + k`` of
    the data order, tagged with it (and with the position's epoch), read and built by ``source``."""

    def __init__(self, items: list[dict[str, Any]], source, seed: int, start: int) -> None:
        self.items = items
        self.source = source
        self.order = DataOrder(len(items), seed)
        self.start = start

    @property
    def drops_studies(self) -> bool:
        return self.source.drops_studies

    def read(self, row: dict[str, Any], epoch: int = 0) -> tuple[int, int, int, Any]:
        """The row's position, the epoch and item it falls on, and the source's read of that study
        (the epoch is the position's, not the argument)."""
        position = self.start + int(row["id"])
        epoch, index = self.order.locate(position)
        return position, epoch, index, self.source.read(self.items[index], epoch)

    def build(self, row: dict[str, Any], epoch: int, read: tuple[int, int, int, Any]) -> list[dict[str, Any]]:
        position, epoch, index, files = read
        return [{**record, "position": position} for record in self.source.build(self.items[index], epoch, files)]
