"""The gloo process harness of the distributed tests (a helper module, like patterns.py and memory.py): ``spawn``
runs ``fn(rank, world, *args)`` in ``world`` fresh processes joined in a gloo group on a free local port, with a
process-group timeout so that a failing rank makes the others fail promptly instead of hanging CI."""
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world, fn, *args, timeout_s=20):
    mp.spawn(_entry, args=(world, free_port(), timeout_s, fn, args), nprocs=world, join=True)


def _entry(rank, world, port, timeout_s, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
