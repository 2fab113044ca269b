"""Stopping training before the job is killed: on a scheduler's signal or at the job's own deadline.

SIGTERM or SIGUSR1 (what a scheduler sends before a time limit) and SIGALRM (the deadline
:func:`set_deadline` records and :func:`arm_deadline` schedules) only set a :class:`StopFlag`
(:func:`stop_on_signals`); the training loop (:mod:`conv2dlstm.training.loop`) acts on it at the next batch
boundary by raising :class:`TrainingInterrupted`, a ``SystemExit`` with status 128 + signal, once
the train step has saved its state.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after saving its state; exit status 128 + signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def reason(self) -> str:
        """Why training stopped: the job's time limit (SIGALRM of :func:`set_deadline`) or the signal's name."""
        if self.signum == signal.SIGALRM:
            return "the job's time limit (--time-limit-minutes)"
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


@dataclass
class StopFlag:
    """Set by the signal handler; the training loop acts on it at the next batch boundary."""

    signum: int | None = None


# SIGTERM / SIGUSR1: what a scheduler sends before a time limit; SIGALRM: the step's own deadline.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGALRM)
DEADLINE_ENV = "CONV2DLSTM_TRAIN_DEADLINE"


def set_deadline(
    minutes: float, *, margin_s: float | None = None, environ: MutableMapping[str, str] | None = None
) -> float:
    """Record in the environment the time at which training must checkpoint and stop.

    ``minutes`` is the job's time limit (the train rule passes its ``runtime`` resource); the stop
    comes ``margin_s`` earlier (default: 5% of the limit, at most 10 minutes) so the checkpoint is
    written before the scheduler kills the job. Cluster schedulers do not always deliver their
    warning signal to the training process (see docs/slurm.md); this deadline does not depend on
    them. Under torchrun each worker sets its own from the same limit (they start within seconds of
    each other, and the ranks agree on a stop at every batch boundary). Returns the deadline as a
    Unix time.
    """
    environ = os.environ if environ is None else environ
    limit_s = minutes * 60.0
    margin = min(0.05 * limit_s, 600.0) if margin_s is None else margin_s
    deadline = time.time() + max(limit_s - margin, 1.0)
    environ[DEADLINE_ENV] = f"{deadline:.3f}"
    return deadline


def arm_deadline(environ: Mapping[str, str] | None = None) -> float | None:
    """Schedule SIGALRM at the deadline recorded by :func:`set_deadline`; returns seconds left."""
    environ = os.environ if environ is None else environ
    value = environ.get(DEADLINE_ENV)
    if not value or threading.current_thread() is not threading.main_thread():
        return None
    left = max(float(value) - time.time(), 0.001)
    signal.setitimer(signal.ITIMER_REAL, left)
    return left


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = STOP_SIGNALS) -> Iterator[StopFlag]:
    """Replace the handlers of ``signums`` by one that only records the signal (main thread only)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield flag
    finally:
        if signal.SIGALRM in previous:
            signal.setitimer(signal.ITIMER_REAL, 0)  # disarm the deadline before restoring SIGALRM
        for s, h in previous.items():
            signal.signal(s, h)


def ignore_stop_signals(signums: tuple[int, ...] = STOP_SIGNALS) -> None:
    """Ignore ``signums`` from now on (main thread only): a process already stopping stays on its way out."""
    if threading.current_thread() is threading.main_thread():
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
