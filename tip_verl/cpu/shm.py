"""Run a command, then remove the ``/dev/shm`` segments its processes left there.

vLLM's engine and worker processes share memory through named segments: ``psm_*`` (the message queues
between vLLM's engine and its workers, a few hundred MB each) and ``sem.mp-*`` (named semaphores of Python's
multiprocessing). vLLM unlinks them when it shuts down; at the end of a verl run Ray kills its processes
instead, and the segments stay in ``/dev/shm`` until the machine reboots.

    python -m tip_verl.cpu.shm python -m verl.trainer.main_ppo ...

runs the command as a child. While it runs, every ``POLL_S`` seconds, the segments that the command's process
or any of its descendants (Ray's processes, its workers, vLLM's processes) maps or holds open are recorded, from
``/proc/<pid>/maps`` and ``/proc/<pid>/fd``. When it ends, those still in ``/dev/shm`` are removed and listed
on stderr. Segments no process of the command touched, other runs' included, are left alone. SIGINT and
SIGTERM are passed on to the command, which then ends as it would alone; the exit status is the command's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

SHM_DIR = Path("/dev/shm")
POLL_S = 2.0


def _segments_of(pid: int) -> set[Path]:
    """Segments in SHM_DIR that process ``pid`` maps or holds open (empty if it is gone or not readable)."""
    segments = set()
    prefix = f"{SHM_DIR}/"
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if path.startswith(prefix) and not path.endswith(" (deleted)"):
                    segments.add(Path(path))
        for fd in os.scandir(f"/proc/{pid}/fd"):
            target = os.readlink(fd.path)
            if target.startswith(prefix) and not target.endswith(" (deleted)"):
                segments.add(Path(target))
    except OSError:  # the process ended meanwhile, or is not ours to read
        pass
    return segments


def segments_of_tree(root: int) -> set[Path]:
    """Segments mapped or open in process ``root`` and all its descendants."""
    try:
        processes = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    return set().union(*(_segments_of(process.pid) for process in processes))


def remove_segments(segments: set[Path]) -> list[Path]:
    """Unlink those of ``segments`` still present; return them, sorted."""
    removed = []
    for segment in sorted(segments):
        try:
            segment.unlink()
            removed.append(segment)
        except FileNotFoundError:
            pass
    return removed


def run_and_clean(command: list[str], poll_s: float = POLL_S) -> int:
    """Run ``command``, recording its process tree's segments; remove them when it ends. Returns its status."""
    process = subprocess.Popen(command)
    forward = lambda signum, frame: process.send_signal(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    seen: set[Path] = set()
    try:
        while True:
            seen |= segments_of_tree(process.pid)
            try:
                status = process.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    removed = remove_segments(seen)
    if removed:
        print(
            f"tip_verl.cpu.shm: removed {len(removed)} segments the run left in {SHM_DIR}: "
            + " ".join(segment.name for segment in removed),
            file=sys.stderr,
        )
    return status


def main() -> None:
    command = sys.argv[1:]
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise SystemExit(f"usage: python -m {__spec__.name} COMMAND [ARG...]")
    raise SystemExit(run_and_clean(command))


if __name__ == "__main__":
    main()
