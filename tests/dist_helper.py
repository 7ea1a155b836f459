"""Persistent gloo worlds for tests: processes start once, then run many checks.

Starting a process that imports torch costs seconds, so each world size gets one set of
worker processes for the whole pytest session. ``world.run(fn, *args)`` runs a picklable
module-level ``fn`` on every rank and returns the per-rank results. Rendezvous goes through
a TCPStore that the parent holds (port chosen by the OS: no port races); the process-group
timeout is short so a hang fails a test instead of eating CI.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from datetime import timedelta

PG_TIMEOUT_S = 90


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore(
        "127.0.0.1", port, world_size + 1, is_master=False, timeout=timedelta(seconds=60)
    )
    dist.init_process_group(
        "gloo",
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=PG_TIMEOUT_S),
    )
    from megatron.core import parallel_state

    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args, kwargs = item
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
            results.put((rank, False, traceback.format_exc()))
        finally:
            parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


class DistWorld:
    """A set of ``world_size`` gloo ranks waiting for work."""

    def __init__(self, world_size: int) -> None:
        import torch.distributed as dist

        self.world_size = world_size
        self._store = dist.TCPStore(
            "127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False
        )
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, self._store.port, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self.alive = True

    def run(self, fn, *args, timeout: float = 240, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order."""
        assert self.alive, "this world was shut down after an earlier failure"
        for q in self._tasks:
            q.put((fn, args, kwargs))
        results, errors = {}, {}
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.shutdown(force=True)
                    why = f"rank(s) {dead} died" if dead else f"did not finish in {timeout}s"
                    raise TimeoutError(f"{fn.__name__} on {self.world_size} ranks: {why}") from None
                continue
            (results if ok else errors)[rank] = value
        if errors:
            # A failed call can leave ranks out of step in their collectives: start afresh.
            self.shutdown(force=True)
            rank = min(errors)
            raise AssertionError(
                f"{fn.__name__} failed on rank {rank} (of {sorted(errors)}):\n{errors[rank]}"
            )
        return [results[r] for r in range(self.world_size)]

    def shutdown(self, force: bool = False) -> None:
        if not self.alive:
            return
        self.alive = False
        if not force:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()


_WORLDS: dict[int, DistWorld] = {}


def get_world(world_size: int) -> DistWorld:
    """The session's world of this size, started on first use (again after a failure)."""
    world = _WORLDS.get(world_size)
    if world is None or not world.alive:
        world = _WORLDS[world_size] = DistWorld(world_size)
    return world


def shutdown_all() -> None:
    for world in _WORLDS.values():
        world.shutdown()
    _WORLDS.clear()
