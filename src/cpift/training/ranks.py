"""The pipeline under torchrun: every rank trains, rank 0 alone runs the other steps.

SFT steps are collective (DDP or FSDP2 inside ``sft``); the merges, cores, clustering, evaluation and
bookkeeping write files, so rank 0 runs them and the other ranks wait for its verdict. Every decision
that depends on the file system (is this step done?) is rank 0's, broadcast, so all ranks take the same
branch whatever they see meanwhile. Outside torchrun (a world of one) each call is the plain one.
"""

from __future__ import annotations

from typing import Any, Callable

from cpift.errors import TrainingError


class Ranks:
    """Rank 0's decisions and steps, shared with the other ranks of the running process group."""

    def __init__(self, world: int, rank: int):
        self.world, self.rank = world, rank

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def agree(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)  # NCCL: through the current CUDA device
        return box[0]

    def leader_runs(self, what: str, fn: Callable[[], Any]) -> None:
        """``fn`` on rank 0; the other ranks wait, and stop with an error if it failed there."""
        error: BaseException | None = None
        if self.leader:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the others are told
                error = e
        failed = self.agree(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if failed is not None:
            raise TrainingError(f"{what}: stopped on rank {self.rank}: rank 0 failed ({failed})")
