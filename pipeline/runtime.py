"""Process-level setup: which rank we are, which device we own, and logging for this rank.

    from pipeline.runtime import init_runtime
    rt = init_runtime(cfg)          # works alone, under accelerate launch, and under torchrun
    rt.rank, rt.world_size, rt.device, rt.is_main
    rt.setup_logging(out_dir)       # console on rank 0 only; every rank logs to its own file

Ranks never need to talk to each other after start-up (work is split by a rule every rank can
recompute), so the only collective is the barrier that orders rank 0's set-up before the others.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

LOGGER = "pipeline"


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    _state: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def main_process_first(self):
        """Rank 0 runs the block first (e.g. building a built-in model), then the others."""
        import contextlib

        return self._state.main_process_first() if self.world_size > 1 else contextlib.nullcontext()

    def barrier(self) -> None:
        if self.world_size > 1:
            self._state.wait_for_everyone()

    def setup_logging(self, level: str, log_file: Path | None = None) -> None:
        logger = logging.getLogger(LOGGER)
        logger.setLevel(level.upper())
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        fmt = logging.Formatter(f"%(asctime)s [rank {self.rank}] %(levelname)s %(name)s: %(message)s")
        if self.is_main:
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
            logger.addHandler(console)
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_file, encoding="utf-8")
            fh.setFormatter(fmt)
            logger.addHandler(fh)
        logger.propagate = False


def init_runtime(cfg) -> Runtime:
    """Rank, world size and device from accelerate's PartialState (env vars set by the launcher)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cpu = cfg.model.device == "cpu" or not torch.cuda.is_available()
    if world == 1:
        # A lone process needs no process group; PartialState would still work, but this keeps
        # single-process runs free of torch.distributed.
        device = torch.device("cpu") if want_cpu else torch.device("cuda", torch.cuda.current_device())
        return Runtime(0, 1, device)
    from accelerate import PartialState

    # Without CUDA, PartialState joins the (gloo) process group only when asked for the CPU.
    state = PartialState(cpu=want_cpu)
    return Runtime(state.process_index, state.num_processes, state.device, state)

