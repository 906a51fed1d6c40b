"""Graceful stop on Ctrl-C (SIGINT) and on a scheduler's preemption notice (SIGTERM, e.g. Slurm's): the signal
only raises a flag; the step in progress finishes, every rank agrees to stop after the same step, a checkpoint is
written, and the run ends with ``TrainingInterrupted`` (train.py exits with 128 + the signal's number, the shell
convention). A second signal of the same kind acts at once, as it would without the handler."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(RuntimeError):
    def __init__(self, signal_number: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signal_number


class StopRequest:
    def __init__(self):
        self.signal_number = 0

    def _handle(self, number, frame, previous):
        self.signal_number = number
        signal.signal(number, previous)  # a second Ctrl-C interrupts immediately

    @contextmanager
    def listening(self):
        """Handlers installed for the duration (only the main thread may install them)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, lambda number, frame, p=previous[s]: self._handle(number, frame, p))
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self, accelerator) -> int:
        """The signal number any rank received (0 if none); every rank calls it after each step."""
        if accelerator.num_processes == 1:
            return self.signal_number
        flag = torch.tensor([self.signal_number], device=accelerator.device)
        return int(accelerator.gather(flag).max().item())
