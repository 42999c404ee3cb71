"""Experiment tracking: TensorBoard and MLflow loggers as :func:`pvae.fit` callbacks.

A logger is one object passed to both of ``fit``'s callback lists::

    from pvae.tracking import TensorBoardLogger

    with TensorBoardLogger("runs/digits/tensorboard", params={"lr": 1e-3}) as logger:
        run = pvae.fit(model, guide, data, callbacks=[logger.epoch],
                       step_callbacks=[logger.step])
        logger.log_artifacts(["runs/digits/learning_curve.png"])

What it logs:

- ``params`` (the hyper-parameters / configuration), once, when the logger opens; nested
  mappings are flattened with dots (``{"model": {"z_dim": 2}}`` becomes ``model.z_dim``);
- per training step (``logger.step(run, record)`` with the :class:`pvae.steps.StepRecord`):
  ``step/loss``, ``step/bound`` (nats for the full data set, as the engine reports it),
  ``step/log_joint`` for sampler engines, and the record's numeric ``extras`` as
  ``step/<name>``; the step index counts every step of the run (``len(run.steps) - 1``, so a
  resumed run continues its curves);
- per epoch (``logger.epoch(run, record)``): every numeric value of the epoch record except
  ``epoch`` and ``steps`` as ``epoch/<key>`` (``epoch/train_bound``, ``epoch/valid_bound`` in
  nats per datapoint, ``epoch/seconds``, ``epoch/encoder_steps`` ...), at step ``epoch``;
- ``log_metrics(values, step)``: any other numbers (e.g. a final test log-likelihood);
- ``log_artifacts(paths)``: files, at the end (MLflow stores the files; TensorBoard shows PNG
  images as images and text files ``.md``, ``.json``, ``.csv``, ``.txt`` as text).

``close()`` (or leaving the ``with`` block) flushes and ends the run; an exception leaving the
block marks an MLflow run ``FAILED``. In a ``torchrun`` job only the process of rank 0 logs.

The packages are optional extras, imported when a logger opens:
``pip install 'pyro-vae[tensorboard]'`` (``torch.utils.tensorboard`` needs ``tensorboard``)
and ``pip install 'pyro-vae[mlflow]'`` (``mlflow-skinny``: the tracking client with its local
file store, without the server and its database stack).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pvae.steps import StepRecord

if TYPE_CHECKING:
    import torch

__all__ = [
    "LOGGERS",
    "Logger",
    "MLflowLogger",
    "TensorBoardLogger",
    "children",
    "environment",
    "memory_kind",
    "flatten_params",
    "log_outputs",
    "open_loggers",
    "peak_memory_mb",
    "run_files",
]

TEXT_SUFFIXES = (".md", ".json", ".csv", ".txt")
"""Files that :meth:`TensorBoardLogger.log_artifacts` shows as text."""


def _require(module: str, extra: str, logger: str) -> Any:
    """Import an optional package, or an ImportError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{logger} needs the optional package {module.split('.')[0]!r} ({error}); install it "
            f"with: pip install 'pyro-vae[{extra}]'"
        ) from error


def _is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` job, or a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings flattened to ``{"a.b": value}``; lists and tuples become text
    (``"[200, 200]"``), None becomes ``"None"``; bools, ints, floats and strings are kept."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of names to values, got {type(params).__name__}")
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(list(value), default=str)
        else:
            flat[name] = str(value)
    return flat


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None for what is no number (None, strings, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _step_values(record: StepRecord) -> dict[str, float]:
    values = {"step/loss": record.loss, "step/bound": record.bound}
    values["step/log_joint"] = record.log_joint
    values.update({f"step/{key}": value for key, value in record.extras.items()})
    return {key: v for key, value in values.items() if (v := _number(value)) is not None}


def _epoch_values(record: Mapping[str, Any]) -> dict[str, float]:
    return {
        f"epoch/{key}": v
        for key, value in record.items()
        if key not in ("epoch", "steps") and (v := _number(value)) is not None
    }


class Logger:
    """What every logger does; a subclass writes with :meth:`_write_params`,
    :meth:`_write_scalars`, :meth:`_write_artifact` and :meth:`_finish`.

    :param params: hyper-parameters / configuration, logged once when the logger opens.
    :param log_every: log step scalars every this many steps (1: every step).
    """

    def __init__(self, params: Mapping[str, Any] | None = None, log_every: int = 1) -> None:
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be an integer >= 1, got {log_every!r}")
        self.log_every = log_every
        self.active = _is_main_process()
        self.closed = False
        self._children: list[Logger] = []
        if params is not None:
            self.log_params(params)

    # -- fit's callbacks ------------------------------------------------------------------------
    def step(self, run: Any, record: StepRecord) -> None:
        """A step callback of :func:`pvae.fit`: ``step_callbacks=[logger.step]``."""
        index = len(run.steps) - 1
        if self.active and index % self.log_every == 0:
            self._write_scalars(_step_values(record), index)

    def epoch(self, run: Any, record: Mapping[str, Any]) -> None:
        """An epoch callback of :func:`pvae.fit`: ``callbacks=[logger.epoch]``; returns None
        (it never stops training)."""
        if self.active:
            self._write_scalars(_epoch_values(record), int(record["epoch"]))

    # -- anything else ----------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Hyper-parameters / configuration (nested mappings flattened with dots)."""
        flat = flatten_params(params)
        if self.active and flat:
            self._write_params(flat)

    def log_metrics(self, values: Mapping[str, Any], step: int = 0) -> None:
        """Named numbers at ``step``; values that are no finite number are skipped."""
        numbers = {key: v for key, value in values.items() if (v := _number(value)) is not None}
        if self.active and numbers:
            self._write_scalars(numbers, int(step))

    def log_artifacts(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        """Files to keep with the run (checked to exist first)."""
        files = [Path(path) for path in paths]
        missing = [str(path) for path in files if not path.is_file()]
        if missing:
            raise ValueError(f"log_artifacts: no such files: {', '.join(missing)}")
        if self.active:
            for path in files:
                self._write_artifact(path)

    def child(self, name: str, params: Mapping[str, Any] | None = None) -> Logger:
        """A logger for one part of this run (e.g. one bound of ``pvae compare``), closed at the
        latest with this one."""
        raise NotImplementedError

    def close(self, failed: bool = False) -> None:
        """Flush and end the run (``failed``: it ended in an error); a second call does
        nothing."""
        if self.closed:
            return
        self.closed = True
        for child in self._children:
            child.close(failed)
        if self.active:
            self._finish(failed)

    def __enter__(self) -> Logger:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(failed=kind is not None)

    # -- what a subclass writes -------------------------------------------------------------------
    def _write_params(self, params: dict[str, Any]) -> None:
        raise NotImplementedError

    def _write_scalars(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _write_artifact(self, path: Path) -> None:
        raise NotImplementedError

    def _finish(self, failed: bool) -> None:
        raise NotImplementedError


class TensorBoardLogger(Logger):
    """Logs into a TensorBoard folder with ``torch.utils.tensorboard.SummaryWriter``
    (``tensorboard --logdir LOG_DIR``).

    Scalars are TensorBoard scalars under their names (``step/loss``, ``epoch/valid_bound``);
    ``params`` are written both as the hyper-parameters of the HParams dashboard and as one
    text ``params`` (a JSON object); artifacts as images (PNG) or text.

    :param log_dir: the folder of the event files (created).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        params: Mapping[str, Any] | None = None,
        log_every: int = 1,
    ) -> None:
        tensorboard = _require("torch.utils.tensorboard", "tensorboard", "TensorBoardLogger")
        self.log_dir = Path(log_dir)
        if self.log_dir.exists() and not self.log_dir.is_dir():
            raise ValueError(f"log_dir {self.log_dir} exists and is not a folder")
        self.writer = tensorboard.SummaryWriter(str(self.log_dir)) if _is_main_process() else None
        super().__init__(params, log_every)

    def child(self, name: str, params: Mapping[str, Any] | None = None) -> TensorBoardLogger:
        """A logger in the subfolder ``name`` (TensorBoard shows it as a run of its own)."""
        logger = TensorBoardLogger(self.log_dir / name, params, self.log_every)
        self._children.append(logger)
        return logger

    def _write_params(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        assert self.writer is not None
        writer = self.writer.file_writer
        assert writer is not None
        for summary in hparams(params, {}):
            writer.add_summary(summary)
        self.writer.add_text("params", json.dumps(params, indent=1))

    def _write_scalars(self, values: dict[str, float], step: int) -> None:
        assert self.writer is not None
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def _write_artifact(self, path: Path) -> None:
        assert self.writer is not None
        if path.suffix.lower() == ".png":
            import matplotlib.image

            image = matplotlib.image.imread(path)  # (H, W, C) floats in [0, 1]
            self.writer.add_image(path.name, image, dataformats="HWC" if image.ndim == 3 else "HW")
        elif path.suffix.lower() in TEXT_SUFFIXES:
            text = path.read_text()
            # TensorBoard renders text as Markdown: show data files verbatim.
            shown = text if path.suffix.lower() == ".md" else "    " + text.replace("\n", "\n    ")
            self.writer.add_text(path.name, shown)
        else:
            raise ValueError(
                f"TensorBoardLogger keeps PNG images and text files ({', '.join(TEXT_SUFFIXES)}), "
                f"not {path.name}"
            )

    def _finish(self, failed: bool) -> None:
        assert self.writer is not None
        self.writer.close()


class MLflowLogger(Logger):
    """Logs one MLflow run through ``mlflow.MlflowClient``.

    Step scalars are buffered and sent with ``log_batch`` after each epoch (and at
    :meth:`close`): one write per epoch rather than one per step and metric.

    :param tracking_uri: where runs are stored: a local folder (``"runs/x/mlruns"``) or a
        ``file:`` URI (MLflow's file store, which MLflow 3 opens only with
        ``MLFLOW_ALLOW_FILE_STORE=true``: set here unless already set), or a server or database
        URI; None takes MLflow's own (``MLFLOW_TRACKING_URI``).
    :param experiment: the experiment's name (created when missing).
    :param run_name: the run's name (None: MLflow picks one).
    :param parent_run_id: makes this a nested run of that run (``mlflow.parentRunId``).
    """

    BATCH = 1000  # MLflow's limit of metrics per log_batch

    def __init__(
        self,
        tracking_uri: str | os.PathLike[str] | None = None,
        experiment: str = "pvae",
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        log_every: int = 1,
        parent_run_id: str | None = None,
    ) -> None:
        mlflow = _require("mlflow", "mlflow", "MLflowLogger")
        if not isinstance(experiment, str) or not experiment:
            raise ValueError(f"experiment must be a non-empty name, got {experiment!r}")
        uri = tracking_uri
        if uri is not None and "://" not in str(uri) and not str(uri).startswith("file:"):
            uri = Path(uri).resolve().as_uri()  # a folder: the local file store
        self.tracking_uri = str(uri) if uri is not None else None
        if self.tracking_uri is not None and self.tracking_uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked for it: a local folder asks for it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.experiment = experiment
        self.client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        self._pending: list[Any] = []
        self.run_id = ""
        if _is_main_process():
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(experiment)
            )
            tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
            self.run_id = self.client.create_run(
                experiment_id, run_name=run_name, tags=tags
            ).info.run_id
        super().__init__(params, log_every)

    def child(self, name: str, params: Mapping[str, Any] | None = None) -> MLflowLogger:
        """A nested run named ``name`` in the same experiment."""
        logger = MLflowLogger(
            self.tracking_uri,
            self.experiment,
            run_name=name,
            params=params,
            log_every=self.log_every,
            parent_run_id=self.run_id or None,
        )
        self._children.append(logger)
        return logger

    def step(self, run: Any, record: StepRecord) -> None:
        index = len(run.steps) - 1
        if self.active and index % self.log_every == 0:
            self._pending += self._metrics(_step_values(record), index)

    def epoch(self, run: Any, record: Mapping[str, Any]) -> None:
        super().epoch(run, record)
        self._flush()

    def _metrics(self, values: dict[str, float], step: int) -> list[Any]:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        return [Metric(key, value, now, step) for key, value in values.items()]

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), self.BATCH):
            self.client.log_batch(self.run_id, metrics=pending[start : start + self.BATCH])

    def _write_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow's limit of params per log_batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def _write_scalars(self, values: dict[str, float], step: int) -> None:
        self._pending += self._metrics(values, step)
        self._flush()

    def _write_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def _finish(self, failed: bool) -> None:
        self._flush()
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


# -- the command line ---------------------------------------------------------------------------

LOGGERS = ("tensorboard", "mlflow")
"""The names ``pvae train --log`` and ``pvae compare --log`` accept."""

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"


class _Loggers(list[Logger]):
    """The loggers a command opened, closed together (a context manager)."""

    def close(self, failed: bool = False) -> None:
        for logger in self:
            logger.close(failed)

    def __enter__(self) -> _Loggers:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(failed=kind is not None)


def open_loggers(
    names: Sequence[str] | None,
    run_dir: str | os.PathLike[str],
    params: Mapping[str, Any] | None = None,
    experiment: str = "pvae",
    run_name: str | None = None,
    fresh: bool = False,
) -> _Loggers:
    """The loggers of a command run into ``run_dir``, as a context manager that closes them.

    ``"tensorboard"`` writes into ``run_dir/tensorboard`` (``fresh``: its earlier event files are
    removed first, as ``--overwrite`` starts a run afresh); ``"mlflow"`` into the file store
    ``run_dir/mlruns``, unless ``MLFLOW_TRACKING_URI`` is set.
    """
    unknown = [name for name in names or () if name not in LOGGERS]
    if unknown:
        raise ValueError(f"unknown loggers {unknown}; choose from {', '.join(LOGGERS)}")
    opened = _Loggers()
    try:
        for name in dict.fromkeys(names or ()):
            if name == "tensorboard":
                folder = Path(run_dir) / TENSORBOARD_DIR
                if fresh and folder.is_dir():
                    shutil.rmtree(folder)
                opened.append(TensorBoardLogger(folder, params))
            else:
                uri = os.environ.get("MLFLOW_TRACKING_URI") or Path(run_dir) / MLFLOW_DIR
                opened.append(MLflowLogger(uri, experiment, run_name=run_name, params=params))
    except BaseException:
        opened.close(failed=True)
        raise
    return opened


def run_files(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The files of a run folder worth keeping with a logged run: its PNG figures and its
    ``metrics.*``/``results.*``/``config.json`` files."""
    folder = Path(run_dir)
    names = ("*.png", "metrics.json", "metrics.csv", "results.*", "config.json")
    found = {path for pattern in names for path in folder.glob(pattern) if path.is_file()}
    return sorted(path for path in found if path.suffix.lower() in (".png", *TEXT_SUFFIXES))


def log_outputs(
    loggers: Sequence[Logger],
    run_dir: str | os.PathLike[str],
    metrics: Mapping[str, Any] | None = None,
) -> None:
    """A command's last words to its loggers: ``metrics`` (nested mappings flattened with
    dots) and the files of :func:`run_files`."""
    files = run_files(run_dir)
    for logger in loggers:
        if metrics:
            logger.log_metrics(flatten_params(metrics))
        logger.log_artifacts(files)


def children(
    loggers: Sequence[Logger],
) -> Callable[[str, Mapping[str, Any] | None], list[Logger]]:
    """``make(name, params)``: one child of each logger (e.g. a run per bound of
    ``pvae compare``, nested in the command's run)."""

    def make(name: str, params: Mapping[str, Any] | None = None) -> list[Logger]:
        return [logger.child(name, params) for logger in loggers]

    return make


# ---------------------------------------------------------------------------------------------
# Where a run ran
# ---------------------------------------------------------------------------------------------


def _git_commit() -> str | None:
    """``git rev-parse HEAD`` of the repository holding the working directory, or None."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return str(__import__(module).__version__)
    except Exception:  # not installed, or no __version__
        return None


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Where a run ran, as a JSON-ready dict: ``git_commit`` (``git rev-parse HEAD`` of the
    working directory's checkout, None outside one), ``versions`` (python, torch, pyro,
    gpytorch, numpy, pvae; None where not installed), ``platform``, ``cpu`` (the CPU model),
    ``cpu_count``, ``gpu`` (the CUDA device's name, None without CUDA), ``torch_threads`` and
    ``device`` (``str(device)``)."""
    import torch

    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device) if str(device) != "cpu" else 0)
    modules = ("torch", "pyro", "gpytorch", "numpy", "pvae")
    return {
        "git_commit": _git_commit(),
        "versions": {"python": platform.python_version(), **{m: _version(m) for m in modules}},
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }


def peak_memory_mb(device: str | torch.device = "cpu") -> float:
    """CUDA: the largest memory torch allocated on the device since the peak was reset (at the
    start of each cell); otherwise the process's peak resident set size so far (whole
    process, never decreasing)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # not on Windows
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes / KiB


def memory_kind(device: str | torch.device = "cpu") -> str:
    """What :func:`peak_memory_mb` measures on ``device``, in words."""
    import torch

    if torch.device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated during the bound's training and evaluation"
    return (
        "the process's peak resident set size so far (ru_maxrss: whole process, cumulative, "
        "so it never decreases from one bound to the next)"
    )
