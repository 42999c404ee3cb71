"""Checkpoints of ``pvae.fit``: what is saved, written atomically, and loaded safely.

A checkpoint is one ``torch.save`` of plain tensors and containers (format
``pvae-checkpoint-1``): the epoch, the parameters by name, the optimiser's state, the engine's
state (step counter, schedules; see :class:`pvae.steps.EngineState`), the step policy's state,
every random number generator's state, and the run's history. Loading uses
``weights_only=True``, so a checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import torch

from pvae.atomic import save_torch, write_text

CHECKPOINT = "checkpoint.pt"
RUN_JSON = "run.json"
CHECKPOINT_FORMAT = "pvae-checkpoint-1"
LOCK = ".pvae.lock"


class RunDirInUse(ValueError):
    """Another process holds the run folder's lock."""


_HELD: dict[str, tuple[int, Any]] = {}  # resolved run folder -> (depth, open lock file)


@contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the run folder's lock (``.pvae.lock``, an exclusive ``flock``) while the block
    runs; the folder is created if needed. Re-entrant within a process (the CLI holds it
    around ``pvae.fit``, which takes it too).

    :raises RunDirInUse: another process holds it (two runs into one folder).
    """
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _HELD:
        depth, stream = _HELD[key]
        _HELD[key] = (depth + 1, stream)
    else:
        stream = _acquire(path / LOCK)
        _HELD[key] = (1, stream)
    try:
        yield path
    finally:
        depth, stream = _HELD[key]
        if depth > 1:
            _HELD[key] = (depth - 1, stream)
        else:
            del _HELD[key]
            if stream is not None:  # unlink while held, then release: no file is left
                (path / LOCK).unlink(missing_ok=True)
                stream.close()


class RunFolder:
    """A run folder, checked before any work and locked while a run writes into it.

    ``RunFolder(path)`` refuses (``error``, a :class:`ValueError`) a path that exists and is
    not a folder. ``with folder:`` creates the folder, holds its lock (:func:`run_lock`:
    :class:`RunDirInUse` when another process holds it) and, on leaving, removes the folders
    it created that are still empty, so a refused or failed run leaves the disk as found.
    ``flag`` names the folder in messages (``run_dir``; the command line's ``--run-dir``).
    """

    error: type[ValueError] = ValueError

    def __init__(self, path: str | os.PathLike[str], flag: str = "run_dir") -> None:
        self.path, self.flag = Path(path), flag
        if self.path.exists() and not self.path.is_dir():
            raise self.error(f"{flag} {self.path} exists and is not a folder")
        existing = self.path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        self.existing = existing  # the nearest folder above that exists now
        self._lock: contextlib.ExitStack | None = None

    @property
    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).is_file()

    def __enter__(self) -> Self:
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(run_lock(self.path))
        except BaseException:
            self._remove_created()
            raise
        self._lock = stack
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if self._lock is not None:
                self._lock.close()
        finally:
            self._lock = None
            self._remove_created()

    def _remove_created(self) -> None:
        folder = self.path
        while folder != self.existing and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent


def _acquire(lock: Path) -> Any:
    """An open lock file holding an exclusive ``flock`` on ``lock`` (None where there is no
    ``fcntl``). The holder unlinks the file before releasing it, so after locking, the file
    at ``lock`` must still be the one locked; else try again."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    while True:
        stream = open(lock, "a")  # noqa: SIM115 - held until the block ends
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            stream.close()
            raise RunDirInUse(
                f"run_dir {lock.parent} is in use by another pvae run (its lock {LOCK} is "
                "held); wait for it to finish or choose another folder"
            ) from error
        try:
            same = os.stat(lock).st_ino == os.fstat(stream.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return stream
        stream.close()


def non_finite(state: dict[str, Any]) -> str | None:
    """The name of the first parameter or optimiser-state tensor of a checkpoint state that
    holds NaN or infinity, or None when every one is finite."""
    for name, value in state.get("params", {}).items():
        if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value).all()):
            return f"parameter {name!r}"
    for key, slot in (state.get("optimizer") or {}).get("state", {}).items():
        for field, value in slot.items():
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and not bool(torch.isfinite(value).all())
            ):
                return f"optimiser state {field!r} of parameter {key}"
    return None


def rng_state() -> dict[str, Any]:
    """The state of torch's, numpy's and Python's generators (and CUDA's), as tensors/lists."""
    np_state: Any = np.random.get_state()
    python_state: Any = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": list(python_state[1]),
        "python_gauss": python_state[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def fork_rng(device: str | torch.device = "cpu") -> contextlib.AbstractContextManager[Any]:
    """Fork the random generators that sampling on ``device`` draws from (the CPU's, and the
    device's own: the current or given CUDA device, or Apple MPS), so that what runs inside
    leaves the caller's random stream untouched."""
    device = torch.device(device)
    devices: list[int] | None = [] if device.type == "cpu" else None  # mps: its one generator
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    return torch.random.fork_rng(devices=devices, device_type=device.type)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    pos, has_gauss, cached = state["numpy_pos"]
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), float(cached)))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(path: str | os.PathLike, state: dict[str, Any], run_json: Any) -> None:
    """Write ``state`` to ``path`` and ``run_json`` (JSON-serialisable) to ``run.json`` next to
    it, each atomically (a unique temporary name, fsync, rename): a reader never sees half a
    file and two writers never clash."""
    path = Path(path)
    bad = non_finite(state)
    if bad is not None:
        raise ValueError(f"refusing to write {path}: the {bad} holds NaN or infinite values")
    save_torch({"format": CHECKPOINT_FORMAT, **state}, path)
    write_text(path.with_name(RUN_JSON), json.dumps(run_json, indent=1))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a pvae checkpoint without unpickling arbitrary objects (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types here
        raise ValueError(
            f"refusing to load {path}: it is not a pvae checkpoint of plain tensors and "
            f"containers (loaded with weights_only=True): {type(error).__name__}: {error}"
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a pvae checkpoint (format {CHECKPOINT_FORMAT} expected)")
    bad = non_finite(state)
    if bad is not None:
        raise ValueError(f"refusing to load {path}: its {bad} holds NaN or infinite values")
    return state


def load_parameters(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    batch: tuple[Any, ...],
    state: Mapping[str, Any],
    path: str | os.PathLike = "the checkpoint",
) -> None:
    """Create the parameters of ``model`` and ``guide`` in Pyro's parameter store (one run of
    each on ``batch``, as :func:`pvae.fit` does before training) and copy the trained values
    of ``state`` (a checkpoint from :func:`load_checkpoint`, read from ``path``) into them.

    :param batch: a few datapoints, e.g. ``(x[:2],)`` with ``x`` of shape ``(N, x_dim)``.
    :param state: its ``"params"`` maps each parameter's name to a tensor of the parameter's
        shape; a zoo model's names may carry another prefix (``vae_1.decoder...``, see
        :func:`renamed`).
    :raises ValueError: the model and guide cannot run on ``batch``; ``state`` holds no
        parameters; names or shapes that do not match, naming each.
    """
    from pvae.protocol import param_split

    try:
        model_params, guide_params = param_split(model, guide, batch)
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"cannot create the parameters of the rebuilt model: {error}") from error
    params = {**guide_params, **model_params}
    saved = state.get("params")
    if not isinstance(saved, Mapping):
        raise ValueError(f"{path} holds no parameters")
    saved = renamed(saved, params)
    mismatch = f"{path} does not match the model rebuilt from its configuration"
    missing = sorted(set(saved) ^ set(params))
    if missing:
        raise ValueError(
            f"{mismatch}: parameters {', '.join(missing)} are in one but not the other"
        )
    wrong = [
        f"{name} {tuple(saved[name].shape)} vs {tuple(params[name].shape)}"
        for name in sorted(params)
        if not isinstance(saved[name], torch.Tensor) or saved[name].shape != params[name].shape
    ]
    if wrong:
        raise ValueError(f"{mismatch}: shapes differ (checkpoint vs model) for {'; '.join(wrong)}")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def renamed(saved: Mapping[str, Any], params: Iterable[str]) -> Mapping[str, Any]:
    """The saved parameters ``{name: tensor}`` under the prefix of the names ``params``.

    A zoo model names its parameters ``<prefix>.<part>`` with a prefix of its own (``vae``,
    ``vae_1``, ... when several live in one process, as in ``pvae compare``). When every saved
    name shares one prefix and every name of ``params`` another, the prefix is replaced;
    otherwise ``saved`` is returned as it is.
    """

    def prefix(names: Iterable[str]) -> str | None:
        names = list(names)
        found = {name.split(".", 1)[0] for name in names}
        return found.pop() if len(found) == 1 and all("." in name for name in names) else None

    old, new = prefix(saved), prefix(params)
    if old is None or new is None:
        return saved
    return {new + name[len(old) :]: value for name, value in saved.items()}
