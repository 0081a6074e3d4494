"""The CPU time of every process a command starts, by what it was: `sudo python3 scripts/cpu_by_process.py --
.venv/bin/python -m pytest -q tests/test_sweep.py` (root: it uses the kernel's process accounting, `acct(2)`).

The kernel writes one record per process as it exits, with its CPU time (all threads), so the short-lived processes
Ray starts by the hundred are all counted; a sampler reading /proc misses their last moments. The records name a
process only by its last thread's name, so a thread here reads each live process's command line every 0.2 s: Ray's
processes are grouped by their title (`ray::TrainController`, `ray::RayTrainWorker`, ...). Accounting is
machine-wide (a `ray start` node leaves the command's process tree): run it on an otherwise idle machine.
docs/testing.md uses it.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time

RECORD = 64  # struct acct_v3 (linux/acct.h)
CLOCK_TICKS = 100  # AHZ: acct_v3 times are in 1/100 s


def _comp(value: int) -> int:
    """comp_t: a 13-bit mantissa and a 3-bit base-8 exponent."""
    return (value & 0x1FFF) << (3 * (value >> 13))


def _busy_seconds() -> float:
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _watch_titles(titles: dict[int, list[str]], stop: threading.Event) -> None:
    while not stop.is_set():
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    line = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            seen = titles.setdefault(int(pid), [])
            if line and line not in seen:
                seen.append(line)
        stop.wait(0.2)


def _name(pid: int, titles: dict[int, list[str]], thread_name: str) -> str:
    """A Ray actor's class (its last title but the idle one), else the command's first words, else the thread."""
    lines = titles.get(pid, [])
    ray = [t.split()[0].split(".")[0] for t in lines if t.startswith("ray::") and not t.startswith("ray::IDLE")]
    if ray:
        return ray[-1]
    if lines:
        words = [re.sub(r"^.*/(site-packages|bin)/", "", w) for w in lines[-1].split()[:3]]
        return " ".join(words)[:80]
    return thread_name


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1:]
    libc = ctypes.CDLL(None, use_errno=True)
    fd, path = tempfile.mkstemp(prefix="forgetray-acct-")
    os.close(fd)
    if libc.acct(path.encode()) != 0:
        os.unlink(path)
        print(f"acct({path}) failed: {os.strerror(ctypes.get_errno())} (root is needed)", file=sys.stderr)
        return 2
    titles: dict[int, list[str]] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_titles, args=(titles, stop), daemon=True)
    watcher.start()
    busy, started = _busy_seconds(), time.time()
    try:
        rc = subprocess.call(command)
    finally:
        libc.acct(None)
        stop.set()
        watcher.join()
    wall, busy = time.time() - started, _busy_seconds() - busy
    groups: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    with open(path, "rb") as records:
        data = records.read()
    os.unlink(path)
    for offset in range(0, len(data) - RECORD + 1, RECORD):
        record = data[offset:offset + RECORD]
        pid = struct.unpack_from("<I", record, 16)[0]
        utime, stime = struct.unpack_from("<HH", record, 32)
        thread_name = record[48:64].split(b"\0")[0].decode(errors="replace")
        group = groups[_name(pid, titles, thread_name)]
        group[0] += 1
        group[1] += (_comp(utime) + _comp(stime)) / CLOCK_TICKS
    counted = sum(cpu for _, cpu in groups.values())
    print(f"\nwall {wall:.1f} s; the machine's busy CPU {busy:.1f} s; counted per process {counted:.1f} s")
    print(f"{'CPU s':>8} {'procs':>5}  process")
    for name, (count, cpu) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        if cpu >= 0.05:
            print(f"{cpu:8.1f} {count:5d}  {name}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
