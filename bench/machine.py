"""The machine a benchmark runs on, shared by the scripts in bench/: what to print about it in a header, and the
one-process gloo group that DeepSpeed's engine expects (set up as a launcher would)."""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def usable_cores() -> int:
    """CPUs this process may run on (its affinity), else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def init_single_process_group() -> None:
    """A gloo group of one, set up the way a launcher would (DeepSpeed's engine expects torch.distributed)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:  # a free port, so two benches (or a test run) on one machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
