"""What the batch iterators share (``loader.TokenBatches``, ``mqar.MqarBatches``): one global
stream of rows, read a global batch at a time, each data-parallel rank its own slice of it."""

from __future__ import annotations

from abc import ABC, abstractmethod

from pretrain.errors import UserError


class RowCursor(ABC):
    """The global batch at ``cursor`` is rows ``cursor .. cursor + global_batch - 1`` of the
    stream; data-parallel rank r reads its ``local_batch`` rows from ``cursor + r * local_batch``.
    ``next`` returns the subclass's ``local_at(cursor)`` and advances ``cursor`` by the global
    batch, so a saved cursor names the same position under any data-parallel size."""

    def __init__(self, global_batch: int, dp_rank: int, dp_size: int, seq_len: int):
        if global_batch < 1 or dp_size < 1 or global_batch % dp_size:
            raise UserError(f"train.global_batch={global_batch} must be a positive multiple of the "
                            f"data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise UserError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
        self.global_batch, self.dp_rank, self.dp_size = global_batch, dp_rank, dp_size
        self.local_batch = global_batch // dp_size
        self.seq_len = seq_len
        self.cursor = 0  # global rows consumed

    def rank_rows(self, cursor: int) -> range:
        """The global row indices this rank reads in the batch at ``cursor``."""
        start = cursor + self.dp_rank * self.local_batch
        return range(start, start + self.local_batch)

    @abstractmethod
    def batch_at(self, cursor: int) -> dict:
        """This rank's rows (``rank_rows(cursor)``) of the global batch at ``cursor``."""

    def local_at(self, cursor: int) -> dict:
        """What this rank trains on at ``cursor`` (a subclass may read less than its rows)."""
        return self.batch_at(cursor)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.local_at(self.cursor)
        self.cursor += self.global_batch
        return batch

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len
