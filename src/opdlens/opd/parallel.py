"""Data parallelism through Hugging Face accelerate (DDP); one process is the same code path.

Launch: ``accelerate launch --num_processes N -m opdlens.opd CONFIG.yaml`` (or ``torchrun
--nproc_per_node N -m opdlens.opd CONFIG.yaml``). Each process holds the student (wrapped in
DDP), a teacher copy and its rollout engine; the global batch of ``batch_size`` rollouts is split
into equal contiguous shares of questions. Gradients are all-reduced by DDP; the logged sums
are gathered and added, so the log equals the single-process log. See docs/OPD.md for why DDP
(and not FSDP or a TRL trainer) is the default.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

from opdlens.errors import OpdlensError
from opdlens.opd.runlog import MetricSums

T = TypeVar("T")


class Dist:
    """Rank, world size and the collectives the trainer needs (an :class:`accelerate.Accelerator`)."""

    def __init__(self, device: torch.device) -> None:
        self.acc: Any = None
        self.rank, self.world, self.device, self.is_main = 0, 1, device, True
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by accelerate / torchrun
            from accelerate import Accelerator

            self.acc = Accelerator(cpu=device.type == "cpu", mixed_precision="no")
            self.rank, self.world = self.acc.process_index, self.acc.num_processes
            self.device, self.is_main = self.acc.device, self.acc.is_main_process

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to run forward/backward through (DDP-wrapped when there are several processes)."""
        if self.world == 1:
            return model
        return self.acc.prepare_model(model, device_placement=True)

    def no_sync(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        return self.acc.no_sync(model) if self.world > 1 else contextlib.nullcontext()

    def sum_ints(self, *values: int) -> list[int]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return [int(x) for x in self.acc.reduce(t, reduction="sum").tolist()]

    def merge(self, sums: MetricSums) -> MetricSums:
        if self.world == 1:
            return sums
        from accelerate.utils import gather_object

        out = MetricSums()
        for part in gather_object([sums]):
            out.merge(part)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            self.acc.wait_for_everyone()

    def share(self, items: Sequence[T], what: str = "batch") -> tuple[list[T], int]:
        """This process's contiguous share of ``items`` and its start index (equal shares)."""
        if len(items) % self.world:
            raise OpdlensError(
                f"the {what} of {len(items)} questions does not split over {self.world} processes: "
                "make batch_size / samples_per_prompt a multiple of the process count"
            )
        n = len(items) // self.world
        return list(items[self.rank * n : (self.rank + 1) * n]), self.rank * n

    def block(self, items: Sequence[T]) -> tuple[list[T], int]:
        """This process's contiguous block of ``items`` (the last may be shorter) and its start."""
        n = math.ceil(len(items) / self.world)
        return list(items[self.rank * n : (self.rank + 1) * n]), self.rank * n
