"""Progress of a demo run: a tqdm bar on a terminal; elsewhere (CI, nohup, a pipe) a plain line every few
percent, so a log holds a few dozen lines instead of a carriage-return redraw per step."""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from typing import IO, Iterator, Optional, Union

from tqdm import tqdm


class BarProgress:
    """A tqdm bar whose position is the step of the last record, so a resumed run starts at its checkpoint's
    step and never runs past `total`; the postfix shows the last evaluation."""

    def __init__(self, total: int, initial: int, desc: str, stream: IO[str]):
        self.stream = stream
        self.bar = tqdm(total=total, initial=min(initial, total), desc=desc, unit="step", dynamic_ncols=True,
                        file=stream)

    def update(self, record: dict) -> None:
        self.bar.update(min(record["step"], self.bar.total) - self.bar.n)
        if "eval/accuracy" in record:
            self.bar.set_postfix(acc=f"{record['eval/accuracy']:.3f}", kl=f"{record.get('kl/teacher', 0):.3f}")

    def write(self, message: str) -> None:
        tqdm.write(message, file=self.stream)

    def close(self) -> None:
        self.bar.close()


class LineProgress:
    """One line every `every_percent` of `total` steps and at each evaluation: the step, the held-out accuracy
    when the step was evaluated, KL to the teacher (mean over the steps since the previous line) and the
    seconds since the start."""

    def __init__(self, total: int, initial: int, desc: str, stream: IO[str], every_percent: float = 5.0):
        self.total, self.desc, self.stream = total, desc, stream
        self.stride = max(1, math.ceil(total * every_percent / 100))
        self.next_line = self._next_multiple(initial)
        self.kl_since_line: list[float] = []
        self.started = time.monotonic()

    def _next_multiple(self, step: int) -> int:
        return (step // self.stride + 1) * self.stride

    def update(self, record: dict) -> None:
        step = record["step"]
        if "kl/teacher" in record:
            self.kl_since_line.append(record["kl/teacher"])
        evaluated = "eval/accuracy" in record
        if not (evaluated or step >= self.next_line or step == self.total):
            return
        parts = [self.desc, f"step {step}/{self.total}"]
        if evaluated:
            parts.append(f"acc {record['eval/accuracy']:.3f}")
        if self.kl_since_line:
            parts.append(f"kl {sum(self.kl_since_line) / len(self.kl_since_line):.3f}")
        parts.append(f"{time.monotonic() - self.started:.0f} s")
        self.write("  ".join(parts))
        self.next_line = self._next_multiple(step)
        self.kl_since_line = []

    def write(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def close(self) -> None:
        pass


@contextmanager
def progress(total: int, initial: int, desc: str,
             stream: Optional[IO[str]] = None) -> Iterator[Union[BarProgress, LineProgress]]:
    """The reporter for `stream` (default stdout): a bar when it is a terminal, plain lines otherwise.
    `initial` is the step the run starts from (a resumed run's checkpoint step)."""
    stream = stream or sys.stdout
    reporter = BarProgress if stream.isatty() else LineProgress
    shown = reporter(total, initial, desc, stream)
    try:
        yield shown
    finally:
        shown.close()
