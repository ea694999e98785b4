r"""
Which rows this process explains when several run at once.

``torchrun`` and ``accelerate launch`` start one process per device and tell each
its place in the environment variables ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``
(several nodes included, through torchrun's rendezvous). A row belongs to the shard
``crc32(id) % WORLD_SIZE``: deterministic, independent of the row order and of the
other processes, so no process group is needed.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Shard", "shard_of"]


def shard_of(row_id: str, world_size: int) -> int:
    r"""
    Returns:
        *int*: The rank that explains the row with id ``row_id``.
    """
    return zlib.crc32(row_id.encode("utf-8")) % world_size


@dataclass(frozen=True)
class Shard:
    r"""
    This process's place among the processes of one run.

    Attributes:
        rank (int): The global rank, 0 to ``world_size - 1``.
        world_size (int): The number of processes.
        local_rank (int): The rank on this node (which device to use).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Shard:
        r"""
        The shard of this process, from ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``
        (set by torchrun and accelerate); one process when they are absent.

        Raises:
            ValueError: When the variables are not integers or the rank is out of range.
        """
        env = os.environ if environ is None else environ
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError as error:
            raise ValueError(
                f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({error}); "
                "start the processes with torchrun or accelerate launch"
            ) from error
        if world < 1 or not 0 <= rank < world:
            raise ValueError(
                f"RANK={rank} is not within WORLD_SIZE={world}; start the processes with "
                "torchrun or accelerate launch"
            )
        return cls(rank=rank, world_size=world, local_rank=local)

    def owns(self, row_id: str) -> bool:
        r"""
        Returns:
            *bool*: Whether this process explains the row with id ``row_id``.
        """
        return shard_of(row_id, self.world_size) == self.rank
