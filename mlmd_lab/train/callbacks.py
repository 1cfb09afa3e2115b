"""Live metrics of training: the :class:`Metrics` report and the callbacks that receive it.

The trainer calls, on every callback, ``on_train_begin(info)`` once, ``on_epoch_end(metrics)`` after
each epoch (a callback returns True to ask training to stop) and ``on_train_end(summary)`` once.

Units everywhere: energies eV/atom, forces eV/Å, stress eV/Å³ (the stress tensor's error, virial error / V),
time s. Displays and figures convert errors to meV/atom, meV/Å and GPa.

``info`` (begin) has keys like ``n_train``, ``n_validation``, ``n_parameters``, ``epochs``, ``elements``,
``member``, ``patience``, ``n_test``, ``time_budget_s`` (seconds the epochs may take under the time limit, or
None); ``summary`` (end) has ``reason`` (``"max_epochs"``, ``"early_stopping"``, ``"time_limit"``,
``"stopped"``, ``"diverged"``), ``best_epoch``, ``final`` (a metrics dict, see :meth:`Metrics.to_dict`),
``elapsed`` (s) and, from the trainer, ``errors``, ``budget`` (see :class:`~mlmd_lab.train.budget.TrainingBudget`)
and ``text`` (:meth:`~mlmd_lab.train.trainer.Trainer.summary`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import numpy as np
from ase import units

from mlmd_lab.errors import InputFileError, MLMDError

#: Display factor and unit of an error quantity, by the prefix of its key (values are stored in eV units).
DISPLAY_UNITS: dict[str, tuple[float, str]] = {
    "energy": (1e3, "meV/atom"),
    "force": (1e3, "meV/Å"),
    "stress": (1.0 / units.GPa, "GPa"),  # eV/Å³ -> GPa (x 160.2)
}


def display_unit(quantity: str) -> tuple[float, str]:
    """Factor from stored (eV) units to display units, and the display unit, for a metric key.

    ``"force_rmse"`` -> ``(1000.0, "meV/Å")``; keys without a known prefix (``"loss"``) -> ``(1.0, "")``.
    """
    for prefix, unit in DISPLAY_UNITS.items():
        if quantity.startswith(prefix):
            return unit
    return 1.0, ""


def format_value(value: float) -> str:
    """Three significant digits without exponent (``1.00``, ``38.1``, ``0.420``, ``1234``); ``nan`` as is."""
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


class CallbackError(MLMDError):
    """A callback raised during training; the message names the callback and its error."""


@dataclass
class Metrics:
    """One report of training progress. Units: energies eV/atom, forces eV/Å, stress eV/Å³, time s.

    Attributes:
        epoch: 1-based epoch just finished.
        step: optimiser steps so far.
        learning_rate: learning rate of the last step.
        elapsed: seconds since training began (wall clock).
        train: errors on the training split, e.g. ``loss``, ``energy_rmse`` (eV/atom), ``force_rmse`` (eV/Å),
            ``stress_rmse`` (eV/Å³, error of the stress tensor's components; displayed in GPa); keys may be
            missing.
        validation: the same keys on the validation split (may be empty).
        best: this epoch improved the monitored validation metric (the smoothed validation loss,
            ``validation["loss_smoothed"]``).
        member: ensemble member index, None for a single model.
    """

    epoch: int
    step: int
    learning_rate: float
    elapsed: float
    train: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    best: bool = False
    member: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: scalars as Python numbers, ``train``/``validation`` as nested dicts of floats."""
        return {
            "epoch": int(self.epoch),
            "step": int(self.step),
            "learning_rate": float(self.learning_rate),
            "elapsed": float(self.elapsed),
            "train": {str(k): float(v) for k, v in self.train.items()},
            "validation": {str(k): float(v) for k, v in self.validation.items()},
            "best": bool(self.best),
            "member": None if self.member is None else int(self.member),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Metrics:
        """Inverse of :meth:`to_dict`; extra keys (``event``, ``time``) are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["train"] = {k: float(v) for k, v in (kwargs.get("train") or {}).items()}
        kwargs["validation"] = {k: float(v) for k, v in (kwargs.get("validation") or {}).items()}
        return cls(**kwargs)

    def value(self, quantity: str, split: str | None = None) -> float | None:
        """Value of ``quantity`` (e.g. ``"force_rmse"``, eV units) on ``split``; by default validation when
        present, else train. None when missing."""
        splits = [split] if split else ["validation", "train"]
        for name in splits:
            value = getattr(self, name).get(quantity)
            if value is not None:
                return float(value)
        return None


class Callback:
    """Base class of training callbacks; every method is a no-op, override what you need."""

    def on_features(self, progress: dict[str, Any]) -> None:
        """The feature stage (symmetry functions and derivatives, before training) advanced; ``progress``: done and
        total frames, elapsed_s since it began, eta_s (estimated seconds left, None before two frames)."""

    def on_train_begin(self, info: dict[str, Any]) -> None:
        """Training starts; ``info``: n_train, n_validation, n_parameters, epochs, elements, member, ..."""

    def on_epoch_end(self, metrics: Metrics) -> bool | None:
        """An epoch finished; return True to ask the trainer to stop."""
        return None

    def on_train_end(self, summary: dict[str, Any]) -> None:
        """Training ended; ``summary``: reason, best_epoch, final (metrics dict), elapsed (s)."""


class CallbackList(Callback):
    """Dispatches every event to many callbacks, in order.

    ``on_epoch_end`` calls all callbacks (every logger sees every epoch) and returns True if any asked to
    stop. An exception in a callback is raised as :class:`CallbackError` (an ``MLMDError``) naming it.
    """

    def __init__(self, callbacks: Callback | Iterable[Callback] | None = None) -> None:
        if callbacks is None:
            callbacks = []
        elif isinstance(callbacks, Callback):
            callbacks = [callbacks]
        self.callbacks: list[Callback] = list(callbacks)

    def __iter__(self) -> Iterator[Callback]:
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def append(self, callback: Callback) -> None:
        """Add a callback at the end."""
        self.callbacks.append(callback)

    def on_features(self, progress: dict[str, Any]) -> None:
        for callback in self.callbacks:
            if hasattr(callback, "on_features"):  # callbacks written before this event need not have it
                _call(callback, "on_features", progress)

    def on_train_begin(self, info: dict[str, Any]) -> None:
        for callback in self.callbacks:
            _call(callback, "on_train_begin", info)

    def on_epoch_end(self, metrics: Metrics) -> bool:
        answers = [_call(callback, "on_epoch_end", metrics) for callback in self.callbacks]
        return any(bool(a) for a in answers)

    def on_train_end(self, summary: dict[str, Any]) -> None:
        for callback in self.callbacks:
            _call(callback, "on_train_end", summary)


def _call(callback: Callback, method: str, argument: Any) -> Any:
    try:
        return getattr(callback, method)(argument)
    except CallbackError:
        raise
    except Exception as exc:
        name = type(callback).__name__
        raise CallbackError(f"callback {name} failed in {method}: {type(exc).__name__}: {exc}") from exc


class Stopper(Callback):
    """Stops training from anywhere (another thread, a notebook button): call :meth:`stop`.

    The flag stays set (so every member of an ensemble run stops) until :meth:`reset`.
    """

    def __init__(self) -> None:
        self.event = threading.Event()

    def stop(self) -> None:
        """Ask training to stop after the current epoch; thread-safe."""
        self.event.set()

    def reset(self) -> None:
        """Clear the flag so the next training runs."""
        self.event.clear()

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` was called (and not reset)."""
        return self.event.is_set()

    def on_epoch_end(self, metrics: Metrics) -> bool:
        return self.event.is_set()


#: Alias of :class:`Stopper`.
StopFlag = Stopper


class History(Callback):
    """Keeps every :class:`Metrics` in memory (``.metrics``), plus the last ``info`` and ``summary``."""

    def __init__(self, metrics: Iterable[Metrics] = ()) -> None:
        self.metrics: list[Metrics] = list(metrics)
        self.info: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}

    @classmethod
    def from_log(cls, path: str | os.PathLike) -> History:
        """A History of the epochs in a JSON-lines log (see :class:`JSONLinesLog`)."""
        return cls(read_log(path))

    def __len__(self) -> int:
        return len(self.metrics)

    def on_train_begin(self, info: dict[str, Any]) -> None:
        self.info = dict(info)

    def on_epoch_end(self, metrics: Metrics) -> None:
        self.metrics.append(metrics)

    def on_train_end(self, summary: dict[str, Any]) -> None:
        self.summary = dict(summary)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """One array per key, one entry per epoch report (eV units, s).

        Keys: ``epoch``, ``step``, ``learning_rate``, ``elapsed``, ``best``, ``member`` (-1 for a single model),
        and ``train_<key>`` / ``validation_<key>`` for every error key seen (NaN where an epoch lacks it).
        """
        m = self.metrics
        arrays: dict[str, np.ndarray] = {
            "epoch": np.array([x.epoch for x in m], dtype=int),
            "step": np.array([x.step for x in m], dtype=int),
            "learning_rate": np.array([x.learning_rate for x in m], dtype=float),
            "elapsed": np.array([x.elapsed for x in m], dtype=float),
            "best": np.array([x.best for x in m], dtype=bool),
            "member": np.array([-1 if x.member is None else x.member for x in m], dtype=int),
        }
        for split in ("train", "validation"):
            keys = sorted({k for x in m for k in getattr(x, split)})
            for key in keys:
                arrays[f"{split}_{key}"] = np.array([getattr(x, split).get(key, np.nan) for x in m], dtype=float)
        return arrays


class JSONLinesLog(Callback):
    """Writes one JSON line per event to ``path``, synced to disk at once, so a killed run keeps its log.

    Lines: ``{"event": "begin", "time": ..., **info}``, ``{"event": "epoch", "time": ..., **metrics}``
    (see :meth:`Metrics.to_dict`), ``{"event": "end", "time": ..., **summary}``; ``time`` is Unix time (s).
    Read the epochs back with :func:`read_log`, all events with :func:`read_events`.

    Args:
        path: the log file (parent folders are created).
        append: keep an existing file and add to it (e.g. one log for all ensemble members); otherwise the
            file is truncated on the first event.
    """

    def __init__(self, path: str | os.PathLike, append: bool = False) -> None:
        self.path = Path(path)
        self.append = append
        self._file: IO[str] | None = None
        self._opened_once = False

    def on_train_begin(self, info: dict[str, Any]) -> None:
        self.write({"event": "begin", **info})

    def on_epoch_end(self, metrics: Metrics) -> None:
        self.write({"event": "epoch", **metrics.to_dict()})

    def on_train_end(self, summary: dict[str, Any]) -> None:
        final = summary.get("final")
        if isinstance(final, Metrics):
            summary = {**summary, "final": final.to_dict()}
        self.write({"event": "end", **summary})
        self.close()

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as a JSON line, then flush and fsync."""
        record = {"event": record.get("event"), "time": time.time(), **record}
        line = json.dumps(record, default=_json_default, ensure_ascii=False)
        f = self._open()
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())

    def close(self) -> None:
        """Close the file (the next event reopens it in append mode)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JSONLinesLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> IO[str]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            keep = self.append or self._opened_once
            self._file = open(self.path, "a" if keep else "w", encoding="utf-8")
            self._opened_once = True
            if keep and _ends_without_newline(self.path):
                self._file.write("\n")  # end a line cut short by a killed writer
        return self._file


def _ends_without_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Metrics):
        return obj.to_dict()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return repr(obj)


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSON-lines log, in order.

    A line cut short by a killed writer is skipped: the last line, or a line followed by a new ``begin``
    (a run appended after the kill). Any other unreadable line raises :class:`InputFileError`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise InputFileError(path, "training log not found", "check the path, or wait until training starts") from None
    lines = [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    records: list[dict[str, Any]] = []
    broken: int | None = None
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if broken is not None:
                break
            broken = n
            continue
        if broken is not None and record.get("event") != "begin":
            break
        broken = None
        records.append(record)
    else:
        return records
    raise InputFileError(path, f"line {broken} is not a JSON record", "the log is corrupt; was it edited?")


def read_log(path: str | os.PathLike) -> list[Metrics]:
    """The epoch reports of a JSON-lines log written by :class:`JSONLinesLog` (a truncated last line is skipped)."""
    return [Metrics.from_dict(r) for r in read_events(path) if r.get("event") == "epoch"]


class ConsoleProgress(Callback):
    """A tqdm progress bar over epochs with the latest errors, e.g. ``E 0.420 meV/atom F 38.1 meV/Å (val)``.

    Works in terminals, notebooks (as text) and without a tty (log files, ``io.StringIO``).

    Args:
        every: refresh the displayed errors every this many epochs (the bar advances every epoch).
        file: where to write; default ``sys.stderr`` at the time training starts.
    """

    def __init__(self, every: int = 1, file: IO[str] | None = None) -> None:
        self.every = max(1, int(every))
        self.file = file
        self._bar: Any = None
        self._done = 0
        self._units_ascii = False

    def _stream(self) -> IO[str]:
        return self.file if self.file is not None else sys.stderr

    def on_features(self, progress: dict[str, Any]) -> None:
        """A bar over the frames of the feature stage (tqdm shows its rate and the time left)."""
        from tqdm.std import tqdm

        if self._bar is None or getattr(self._bar, "desc", "") != "features":
            self.close()
            stream = self._stream()
            self._units_ascii = not _can_encode(stream, "Å³")
            self._bar = tqdm(total=progress["total"], file=stream, desc="features", unit="frame",
                             dynamic_ncols=True, ascii=self._units_ascii or None, mininterval=0.5, leave=True)
            self._done = 0
        self._bar.update(max(0, progress["done"] - self._done))
        self._done = progress["done"]
        if progress["done"] >= progress["total"]:
            self.close()

    def on_train_begin(self, info: dict[str, Any]) -> None:
        from tqdm.std import tqdm

        self.close()
        stream = self._stream()
        self._units_ascii = not _can_encode(stream, "Å³")
        member = info.get("member")
        desc = "training" if member is None else f"member {member}"
        self._bar = tqdm(total=info.get("epochs"), file=stream, desc=desc, unit="epoch", dynamic_ncols=True,
                         ascii=self._units_ascii or None, mininterval=0.5, leave=True)
        self._done = 0

    def on_epoch_end(self, metrics: Metrics) -> None:
        if self._bar is None:
            self.on_train_begin({"member": metrics.member})
        self._bar.update(max(0, metrics.epoch - self._done))
        self._done = max(self._done, metrics.epoch)
        if metrics.epoch % self.every == 0 or metrics.best:
            self._bar.set_postfix_str(self.describe(metrics), refresh=True)

    def on_train_end(self, summary: dict[str, Any]) -> None:
        self.close()
        print(self._final_line(summary), file=self._stream(), flush=True)
        if summary.get("text"):  # the trainer's summary: held-out test frames, time budget, test errors
            print(summary["text"], file=self._stream(), flush=True)

    def close(self) -> None:
        """Close the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def describe(self, metrics: Metrics, mark_best: bool = True) -> str:
        """``E 0.420 meV/atom F 38.1 meV/Å (val)``: validation errors when present, else training ones;
        `` *`` marks an epoch that improved the monitored validation metric."""
        split = "validation" if metrics.validation else "train"
        values = getattr(metrics, split)
        parts = []
        for key, short in (("energy_rmse", "E"), ("force_rmse", "F"), ("stress_rmse", "S")):
            if key in values:
                factor, unit = display_unit(key)
                parts.append(f"{short} {format_value(values[key] * factor)} {self._unit(unit)}")
        if not parts and "loss" in values:
            parts.append(f"loss {format_value(values['loss'])}")
        text = " ".join(parts) + (" (val)" if split == "validation" else " (train)")
        return text + (" *" if metrics.best and mark_best else "")

    def _unit(self, unit: str) -> str:
        return unit.replace("Å³", "A^3").replace("Å", "A") if self._units_ascii else unit

    def _final_line(self, summary: dict[str, Any]) -> str:
        reason = summary.get("reason", "finished")
        text = f"training ended ({reason})"
        final = summary.get("final")
        if isinstance(final, dict) and "epoch" in final:
            final = Metrics.from_dict(final)
        if isinstance(final, Metrics):
            text += f" after epoch {final.epoch}: {self.describe(final, mark_best=False)}"
        if summary.get("best_epoch") is not None:
            text += f"; best epoch {summary['best_epoch']}"
        if summary.get("elapsed") is not None:
            text += f"; {float(summary['elapsed']):.1f} s"
        return text


def _can_encode(stream: IO[str], text: str) -> bool:
    encoding = getattr(stream, "encoding", None)
    if not encoding:
        return True  # io.StringIO and the like hold str
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True
