"""Data parallelism under Hugging Face accelerate: DDP (default) or FSDP2 (``parallel: fsdp``).

Launch: ``accelerate launch --num_processes N -m opdlens.opd CONFIG.yaml`` (or ``torchrun
--nproc_per_node N -m opdlens.opd CONFIG.yaml``). Each process holds the student, a teacher copy
and its rollout engine; the global batch is split into equal contiguous shares of questions; the
logged sums are gathered and added, so the log equals the single-process log.

* ``ddp``: every process holds the whole student and its AdamW state; gradients are all-reduced.
* ``fsdp``: the student's float32 weights, gradients and AdamW state are sharded over the
  processes (torch's FSDP2 ``fully_shard``: each decoder layer, then the root, as accelerate's
  ``transformer_based_wrap``); every forward all-gathers a layer's weights, every backward
  reduce-scatters its gradients. The rollout engine samples from a whole copy of the weights
  (:mod:`opdlens.opd.rollout_weights`), refreshed by gathering after each step. Checkpoints are
  gathered to whole tensors (the main process writes the same safetensors + JSON files as DDP),
  so a run resumes on any number of processes and under either strategy.

Why ``fully_shard`` is applied here and not by ``Accelerator(fsdp_plugin=...)``: accelerate 1.16
turns FSDP on only for accelerator devices (its ``AcceleratorState`` never makes a ``MULTI_CPU``
run ``DistributedType.FSDP``), so its plugin cannot run in the 2-CPU-process test; applying the
same FSDP2 call ourselves keeps one code path, the one the CPU test runs, on CPU and GPU.
accelerate still launches the processes and provides the collectives. docs/OPD.md has the memory
arithmetic (a 7B student on 8 × 80 GB).
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

    def __init__(self, device: torch.device, parallel: str = "ddp") -> None:
        if parallel not in ("ddp", "fsdp"):
            raise OpdlensError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")
        self.acc: Any = None
        self.parallel = parallel
        self.rank, self.world, self.device, self.is_main = 0, 1, device, True
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by accelerate / torchrun
            from accelerate import Accelerator

            self.acc = Accelerator(cpu=device.type == "cpu", mixed_precision="no")
            self.rank, self.world = self.acc.process_index, self.acc.num_processes
            self.device, self.is_main = self.acc.device, self.acc.is_main_process

    @property
    def sharded(self) -> bool:
        """True when the student's weights are FSDP shards (``parallel: fsdp`` on several processes)."""
        return self.parallel == "fsdp" and self.world > 1

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to run forward/backward through: DDP-wrapped, or sharded in place by FSDP2
        (build the optimizer afterwards: sharding replaces the parameters)."""
        if self.world == 1:
            return model
        if self.sharded:
            from opdlens.opd.fsdp import shard

            return shard(model, self.device)
        return self.acc.prepare_model(model, device_placement=True)

    def no_sync(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        """Defer DDP's all-reduce to the last micro-batch. FSDP reduce-scatters every micro-batch:
        deferring would hold whole (unsharded) gradients, the memory FSDP is there to save."""
        return self.acc.no_sync(model) if self.world > 1 and not self.sharded else contextlib.nullcontext()

    def max_int(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return int(self.acc.reduce(t, reduction="max").item())

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
