"""Run a command, then remove the ``/dev/shm`` segments its processes left there.

vLLM's engine and worker processes share memory through named segments: ``psm_*`` (the message queues
between vLLM's engine and its workers, a few hundred MB each) and ``sem.mp-*`` (named semaphores of Python's
multiprocessing). vLLM unlinks them when it shuts down; at the end of a verl run Ray kills its processes
instead, and the segments stay in ``/dev/shm`` until the machine reboots.

    python -m tip_verl.cpu.shm python -m verl.trainer.main_ppo ...

runs the command as a child. While it runs, the segments that the command's process or any of its descendants
(Ray's processes, its workers, vLLM's processes) maps or holds open are recorded by inode, from
``/proc/<pid>/maps`` and ``/proc/<pid>/fd``: every ``POLL_S`` seconds, and at once whenever a file is created in
``/dev/shm`` (inotify), as a process can create a segment and die between two polls. When the command ends, the
files of ``/dev/shm`` with a recorded inode are removed and listed on stderr. Segments no process of the command
touched, other runs' included, are left alone. SIGINT and SIGTERM are passed on to the command, which then ends
as it would alone; the exit status is the command's.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

SHM_DIR = Path("/dev/shm")
POLL_S = 2.0
WAKE_S = 0.5  # how often the command's exit is checked between polls
IN_CREATE = 0x100  # inotify's event mask for a name created in a watched directory


def _segments_of(pid: int) -> set[int]:
    """Inode numbers of the files in SHM_DIR that process ``pid`` maps or holds open (empty if it is gone or
    not readable). By inode, not name: a semaphore is created under a temporary name, mapped, then linked to its
    own name, and the mapping keeps the temporary one."""
    inodes = set()
    prefix = f"{SHM_DIR}/"
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
                if len(fields) == 6 and fields[5].startswith(prefix):
                    inodes.add(int(fields[4]))
        for fd in os.scandir(f"/proc/{pid}/fd"):
            if os.readlink(fd.path).startswith(prefix):
                inodes.add(os.stat(fd.path).st_ino)
    except OSError:  # the process ended meanwhile, or is not ours to read
        pass
    return inodes


def segments_of_tree(root: int) -> set[int]:
    """Inodes of the SHM_DIR files mapped or open in process ``root`` and all its descendants."""
    try:
        processes = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    return set().union(*(_segments_of(process.pid) for process in processes))


def remove_segments(inodes: set[int]) -> list[str]:
    """Unlink the files of SHM_DIR whose inode is one of ``inodes``; return their names, sorted."""
    removed = []
    for entry in os.scandir(SHM_DIR):
        if entry.inode() in inodes:
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except FileNotFoundError:
                pass
    return sorted(removed)


class Creations:
    """Waits for names created in SHM_DIR (Linux inotify)."""

    def __init__(self):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, str(SHM_DIR).encode(), IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {SHM_DIR}")

    def wait(self, timeout: float) -> bool:
        """Whether something was created in SHM_DIR within ``timeout`` seconds (pending events are consumed)."""
        if not select.select([self.fd], [], [], timeout)[0]:
            return False
        while True:
            try:
                os.read(self.fd, 65536)
            except BlockingIOError:
                return True

    def close(self) -> None:
        os.close(self.fd)


def run_and_clean(command: list[str], poll_s: float = POLL_S) -> int:
    """Run ``command``, recording its process tree's segments; remove them when it ends. Returns its status."""
    creations = Creations()
    process = subprocess.Popen(command)
    forward = lambda signum, frame: process.send_signal(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    seen: set[int] = set()
    try:
        next_poll = 0.0
        while process.poll() is None:
            if creations.wait(min(WAKE_S, poll_s)) or time.monotonic() >= next_poll:
                seen |= segments_of_tree(process.pid)
                next_poll = time.monotonic() + poll_s
        status = process.wait()
    finally:
        creations.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    removed = remove_segments(seen)
    if removed:
        print(
            f"tip_verl.cpu.shm: removed {len(removed)} segments the run left in {SHM_DIR}: "
            + " ".join(removed),
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
