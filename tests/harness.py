"""Run a function in N local gloo ranks, forked from the pytest process (which already imported
torch + megatron and selected the cpu backend), so a 2-rank case costs well under a second.

``run_distributed(fn, world_size, args=(), timeout=60)`` returns the list of per-rank return values
(they must be picklable). An exception on any rank is re-raised in the parent with every failing
rank's traceback; a rank that hangs is killed at ``timeout`` and reported, so tests never hang.
``fn(rank, world_size, *args)`` must be a module-level function. Each child has torch.distributed
initialised (gloo, WORLD) but not megatron's groups: call ``mm.distributed.init.init_parallel``.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import traceback

from mm.distributed.init import free_port


class DistributedTestError(AssertionError):
    """One or more ranks raised or timed out; the message holds every failing rank's traceback."""


def _child(fn, rank, world_size, port, args, conn):
    try:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
        )
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
        result = fn(rank, world_size, *args)
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.barrier()
        dist.destroy_process_group()
        # plain pickle: conn.send() would use torch's ForkingPickler, which passes tensors as shared-memory
        # fds that the parent can only fetch while this (about to _exit) process is alive
        conn.send_bytes(pickle.dumps(("ok", result)))
    except BaseException:  # noqa: BLE001  (report everything to the parent)
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
    finally:
        conn.close()
        os._exit(0)


def run_distributed(fn, world_size: int = 2, args: tuple = (), timeout: float = 60.0) -> list:
    ctx = mp.get_context("fork")
    port = free_port()
    procs, conns = [], []
    for rank in range(world_size):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(fn, rank, world_size, port, args, child), daemon=True)
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    results: list = [None] * world_size
    errors = []
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    for rank, (p, c) in enumerate(zip(procs, conns)):
        remaining = max(0.1, (deadline - datetime.datetime.now()).total_seconds())
        if c.poll(remaining):
            try:
                status, payload = pickle.loads(c.recv_bytes())
            except EOFError:
                status, payload = "error", f"rank {rank} exited without a result (exit code {p.exitcode})"
        else:
            status, payload = "error", f"rank {rank} timed out after {timeout:.0f} s"
        if status == "ok":
            results[rank] = payload
        else:
            errors.append(f"--- rank {rank} ---\n{payload}")
    for p in procs:
        p.join(timeout=0.1 if errors else 5)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        raise DistributedTestError(f"{len(errors)} of {world_size} ranks failed:\n" + "\n".join(errors))
    return results
