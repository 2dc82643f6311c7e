"""Process-level setup: which rank we are, which device we own, logging, and the start-up collectives.

    from pipeline.runtime import init_runtime
    rt = init_runtime(cfg)          # works alone, under accelerate launch, torchrun, or srun with env vars
    rt.rank, rt.world_size, rt.device, rt.is_main
    rt.setup_logging(level, log_file)   # console on rank 0 only; every rank logs to its own file
    with rt.together("loading the tokenizer"):   # an error on any rank ends every rank, promptly
        ...
    units = rt.broadcast(units if rt.is_main else None)   # rank 0's object, on every rank

Ranks never need to talk to each other once work starts (each rank takes ``units[rank::world_size]``
of one plan that rank 0 made and broadcast), so the only collectives are the few at start-up, and
each of them doubles as an error check: a rank that fails there does not leave the others waiting
on a barrier until the process-group timeout.

Tests inject faults through one environment variable, never set in real runs:
``NLA_PIPELINE_TEST_HOOK="delay_listing@1=3,fail_startup@1"`` makes rank 1 wait 3 s before it lists
its finished chunks, and fail during start-up; ``chunk_delay@0=0.5`` makes rank 0 wait 0.5 s after
each chunk it writes (see ``test_hook``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import PeerFailed, PipelineError

LOGGER = "pipeline"
TEST_HOOK = "NLA_PIPELINE_TEST_HOOK"
log = logging.getLogger(__name__)


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    _state: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def together(self, what: str):
        """Run a block on every rank, then check on every rank that it succeeded everywhere.

        If it raised anywhere, every rank raises at once instead of waiting for the others on a
        later collective: rank 0 the error (its own, or the lowest failing rank's, as the one line
        the user sees, since only rank 0 prints), every other rank a ``PeerFailed`` that it logs to
        its own file. A block must be entered by every rank, even one with nothing to do in it."""
        error: BaseException | None = None
        try:
            yield
        except Exception as e:  # noqa: BLE001 - re-raised below, once every rank has heard of it
            error = e
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        mine = None if error is None else str(error) if isinstance(error, PipelineError) else repr(error)
        messages: list = [None] * self.world_size
        dist.all_gather_object(messages, mine)
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if not failed:
            return
        if self.is_main and error is not None:
            raise error
        first, message = failed[0]
        if self.is_main:
            raise PipelineError(f"rank {first} failed while {what}: {message}") from None
        raise PeerFailed(f"rank {first} failed while {what}: {message}") from error

    def close(self) -> None:
        """Leave the process group. A process that exits with it still open can abort at shutdown
        ("terminate called without an active exception") while gloo's threads are alive."""
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (pickled; a plan of 40k chunks is a few MB)."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def test_hook(self, name: str) -> None:
        """The faults tests inject through $NLA_PIPELINE_TEST_HOOK (``name@rank[=value],...``)."""
        for item in filter(None, os.environ.get(TEST_HOOK, "").split(",")):
            spec, _, value = item.partition("=")
            hook, _, rank = spec.partition("@")
            if hook != name or int(rank or 0) != self.rank:
                continue
            if name == "delay_listing":
                log.info("test hook: rank %d waits %s s before listing its chunks", self.rank, value)
                time.sleep(float(value))
            elif name == "chunk_delay":  # a slow chunk, so a test can kill a fast stage midway
                time.sleep(float(value))
            elif name == "fail_startup":
                raise PipelineError(f"start-up failure injected by {TEST_HOOK}")

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
