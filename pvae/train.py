"""One training loop for every engine: ``pvae.fit``.

Minibatching with exact N/B scaling, a progress bar with the running bound, validation,
atomic checkpoints with exact resume, NaN detection, seeding and ``torch.distributed`` data
parallelism (gradients all-reduced, DDP-style).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from pvae.evaluate import Data, get_batch, iter_batches, num_items
from pvae.protocol import param_split, scale_to_data

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "pvae-checkpoint-1"

_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}


class TrainingDiverged(FloatingPointError):
    """The bound became NaN or infinite."""


@dataclass
class Run:
    """What ``fit`` returns.

    ``history``: one dict per epoch with ``epoch``, ``train_bound`` and ``valid_bound`` (nats
    per datapoint, higher is better; ``valid_bound`` is None without validation data),
    ``seconds`` (training steps of that epoch) and ``steps``. ``steps``: one record per step
    (``epoch``, ``step``, ``loss``, ``bound``, ``seconds``). ``params``: the final constrained
    parameter values by name.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    run_dir: str | None = None

    @property
    def train_bound(self) -> list[float]:
        return [h["train_bound"] for h in self.history]

    @property
    def valid_bound(self) -> list[float | None]:
        return [h["valid_bound"] for h in self.history]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("params")
        return out


def _optimizer(
    optimizer: str | Callable[..., torch.optim.Optimizer], params: list[torch.Tensor], lr: float
) -> torch.optim.Optimizer:
    if isinstance(optimizer, str):
        if optimizer.lower() not in _OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {optimizer!r}; choose one of {sorted(_OPTIMIZERS)} or pass "
                "a torch.optim.Optimizer class"
            )
        optimizer = _OPTIMIZERS[optimizer.lower()]
    return optimizer(params, lr=lr)  # type: ignore[call-arg]


def _discover_params(model: Callable, guide: Callable, batch: tuple) -> dict[str, torch.Tensor]:
    """Run the pair once to create its parameters; return their unconstrained tensors."""
    model_params, guide_params = param_split(model, guide, batch)
    if not model_params and not guide_params:
        raise ValueError(
            "the model and guide declare no parameters (pyro.param or pyro.module); "
            "there is nothing to train"
        )
    return {**guide_params, **model_params}


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, cached = state["numpy_pos"]
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), float(cached)))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(obj, str):
        tmp.write_text(obj)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


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
    return state


class _Distributed:
    """Rank bookkeeping and gradient all-reduce; a no-op in a single process."""

    def __init__(self) -> None:
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.active = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    def broadcast(self, params: Sequence[torch.Tensor]) -> None:
        if self.active:
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=0)

    def average_grads(self, params: Sequence[torch.Tensor]) -> None:
        if not self.active:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world


def fit(
    model: Callable,
    guide: Callable,
    train: Data,
    engine: Any = None,
    epochs: int = 10,
    batch_size: int = 100,
    optimizer: str | Callable[..., torch.optim.Optimizer] = "adam",
    lr: float = 1e-3,
    valid: Data | None = None,
    seed: int = 0,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callable[[Run, dict[str, Any]], bool | None]] = (),
    aggressive_encoder: int | None = None,
) -> Run:
    """Train a model/guide pair with any engine.

    :param model, guide: a Pyro pair; per-datapoint sites inside ``pyro.plate("data", ...)``.
        ``fit`` feeds minibatches and scales the data plate to the full training set (per
        datapoint terms count N/B times, global ones once).
    :param train, valid: a tensor ``(N, ...)``, a tuple of tensors (positional arguments of
        the pair), or a torch Dataset.
    :param engine: a ``pyro.infer.ELBO`` (``pvae.inference.ELBO()`` when None).
    :param epochs: total epochs (with ``resume`` the run continues up to this many).
    :param batch_size: datapoints per step, over all processes together.
    :param optimizer: "adam", "adamw", "sgd", "rmsprop", or a ``torch.optim.Optimizer`` class.
    :param seed: seeds Pyro, torch, numpy and Python; the data order is a function of
        ``(seed, epoch)``.
    :param run_dir: where ``checkpoint.pt`` and ``run.json`` are written (atomically) after
        every epoch.
    :param resume: continue from ``run_dir/checkpoint.pt`` when it exists; the result is
        bit-identical to an uninterrupted run.
    :param callbacks: called as ``callback(run, epoch_record)`` after every epoch, before the
        checkpoint is written (what they change is saved); returning True stops training.
    :param aggressive_encoder: aggressive encoder training (He et al. 2019, against posterior
        collapse) with at most this many encoder-only steps per training step. While the
        aggressive phase lasts, every step first trains only the guide's parameters (read
        from the traces) on fresh random minibatches, until the mean loss over a window of
        10 such steps stops falling or the limit is reached, and then updates only the
        model's parameters on its own minibatch. The phase ends, for good, after the first
        epoch whose bound (validation bound when ``valid`` is given) does not improve on the
        previous one; training then goes on normally. Epoch records gain
        ``"encoder_steps"``. ``None`` (the default) trains normally throughout.
    :returns: a :class:`Run`.

    Pyro's validation (when enabled, as by default) checks the first step of every epoch; the
    other steps run without it, which makes small models' steps markedly cheaper.

    Under ``torchrun`` (``WORLD_SIZE > 1``) each process takes its share of every batch and
    gradients are averaged across processes (gloo on CPU, nccl on GPU).
    """
    from pvae.inference import ELBO  # late import: core does not depend on engines at import

    engine = engine if engine is not None else ELBO()
    n_train = num_items(train)
    if n_train == 0:
        raise ValueError("the training data is empty")
    if batch_size < 1 or epochs < 0:
        raise ValueError(f"batch_size must be >= 1 and epochs >= 0, got {batch_size}, {epochs}")
    if aggressive_encoder is not None and aggressive_encoder < 1:
        raise ValueError(f"aggressive_encoder must be None or >= 1, got {aggressive_encoder}")
    validation = pyro.infer.util.is_validation_enabled()
    ddp = _Distributed()
    if batch_size < ddp.world:
        raise ValueError(f"batch_size {batch_size} is smaller than the {ddp.world} processes")
    train_model, train_guide = scale_to_data(model, n_train), scale_to_data(guide, n_train)

    params = _discover_params(train_model, train_guide, get_batch(train, torch.arange(2)))
    ddp.broadcast(list(params.values()))
    opt = _optimizer(optimizer, list(params.values()), lr)
    aggressive = {"active": aggressive_encoder is not None, "best": -float("inf")}
    if aggressive_encoder is not None:
        split = param_split(train_model, train_guide, get_batch(train, torch.arange(2)))
        model_params, guide_params = list(split[0].values()), list(split[1].values())

    run = Run(run_dir=str(run_dir) if run_dir is not None else None)
    start_epoch = 0
    checkpoint_path = Path(run_dir) / CHECKPOINT if run_dir is not None else None
    if checkpoint_path is not None:
        checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        missing = set(state["params"]) ^ set(params)
        if missing:
            raise ValueError(
                f"checkpoint {checkpoint_path} does not match this model/guide: parameters "
                f"{sorted(missing)} are in one but not the other"
            )
        with torch.no_grad():
            for name, value in state["params"].items():
                params[name].copy_(value)
        opt.load_state_dict(state["optimizer"])
        if hasattr(engine, "load_state_dict"):
            engine.load_state_dict(state["engine"])
        _set_rng_state(state["rng"])
        aggressive.update(state.get("aggressive_encoder", {}))
        run.history, run.steps = state["history"], state["steps"]
        start_epoch = int(state["epoch"]) + 1
    else:
        pyro.set_rng_seed(seed + ddp.rank)

    steps_per_epoch = -(-n_train // batch_size)
    show = progress and sys.stderr.isatty() and ddp.rank == 0
    bar = tqdm(total=steps_per_epoch * max(0, epochs - start_epoch), disable=not show, unit="step")
    param_list = list(params.values())
    store_size = len(pyro.get_param_store())
    try:
        for epoch in range(start_epoch, epochs):
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + epoch))
            epoch_bound = 0.0
            epoch_seconds = 0.0
            encoder_steps = 0
            for step in range(steps_per_epoch):
                index = order[step * batch_size : (step + 1) * batch_size]
                batch = get_batch(train, index[ddp.rank :: ddp.world])
                t0 = time.perf_counter()
                if aggressive["active"]:
                    encoder_steps += _encoder_steps(
                        engine,
                        train_model,
                        train_guide,
                        train,
                        opt,
                        guide_params,
                        model_params,
                        max_steps=int(aggressive_encoder),  # type: ignore[arg-type]
                        batch_size=batch_size,
                        generator=torch.Generator().manual_seed(
                            (seed * 1_000_003 + epoch) * 1_000_003 + step
                        ),
                        ddp=ddp,
                    )
                try:
                    # Pyro's argument and support checks run on the first step of every
                    # epoch; after that they would re-check the same kind of batch on every
                    # step (a large share of a small model's step). Non-finite bounds are
                    # still caught below.
                    with pyro.validation_enabled(step == 0 and validation):
                        engine.loss_and_grads(train_model, train_guide, *batch)
                except ValueError as error:  # Pyro's validation meets NaN parameters first
                    if "invalid values" not in str(error):
                        raise
                    raise TrainingDiverged(
                        f"non-finite values at epoch {epoch}, step {step}; the last good "
                        f"checkpoint ({checkpoint_path or 'none: no run_dir'}) is intact. "
                        f"{str(error).splitlines()[0]}"
                    ) from error
                record = getattr(engine, "last_record", {})
                bound = ddp.mean(record.get("bound", float("nan")))
                if not np.isfinite(bound):
                    raise TrainingDiverged(
                        f"the bound became {bound} at epoch {epoch}, step {step}; the last good "
                        f"checkpoint ({checkpoint_path or 'none: no run_dir'}) is intact"
                    )
                if len(pyro.get_param_store()) != store_size:
                    raise ValueError(
                        "the model or guide created new parameters after its first step; "
                        "pvae.fit needs every parameter to exist at the first call"
                    )
                if aggressive["active"]:  # the decoder's step: only the model's parameters
                    for p in guide_params:
                        p.grad = None
                    ddp.average_grads(model_params)
                else:
                    ddp.average_grads(param_list)
                opt.step()
                opt.zero_grad(set_to_none=True)
                seconds = time.perf_counter() - t0
                epoch_seconds += seconds
                epoch_bound += bound / n_train * len(index)
                run.steps.append(
                    {
                        "epoch": epoch,
                        "step": step,
                        "loss": ddp.mean(record.get("loss", float("nan"))),
                        "bound": bound,
                        "seconds": seconds,
                    }
                )
                bar.update(1)
                bar.set_postfix(epoch=epoch, bound=f"{bound / n_train:.3f}")
            valid_bound = None
            if valid is not None:
                valid_bound = ddp.mean(evaluate_bound(model, guide, valid, engine, batch_size))
            epoch_record = {
                "epoch": epoch,
                "train_bound": epoch_bound / n_train,
                "valid_bound": valid_bound,
                "seconds": epoch_seconds,
                "steps": steps_per_epoch,
            }
            if aggressive_encoder is not None:
                epoch_record["encoder_steps"] = encoder_steps
                if aggressive["active"]:
                    current = valid_bound if valid_bound is not None else epoch_bound / n_train
                    aggressive["active"] = current > aggressive["best"]
                    aggressive["best"] = max(current, aggressive["best"])
            run.history.append(epoch_record)
            # Callbacks run before the checkpoint, so that what they change (parameters set
            # outside the gradient, e.g. ARD prior variances) and the random numbers they draw
            # are saved with it: resume stays exact.
            stop = any(callback(run, epoch_record) for callback in callbacks)
            if checkpoint_path is not None and ddp.rank == 0:
                _write_checkpoint(checkpoint_path, run, params, opt, engine, epoch, aggressive)
            if stop:
                break
    finally:
        bar.close()
    run.params = {
        name: pyro.param(name).detach().clone() for name in params if name in pyro.get_param_store()
    }
    return run


def _write_checkpoint(
    path: Path, run: Run, params, opt, engine, epoch: int, aggressive: dict[str, Any]
) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "params": {name: p.detach().clone() for name, p in params.items()},
        "optimizer": opt.state_dict(),
        "engine": engine.state_dict() if hasattr(engine, "state_dict") else {},
        "rng": _rng_state(),
        "history": run.history,
        "steps": run.steps,
        "aggressive_encoder": aggressive,
    }
    _atomic_save(state, path)
    _atomic_save(json.dumps(run.to_json(), indent=1), path.with_name("run.json"))


def _encoder_steps(
    engine: Any,
    model: Callable,
    guide: Callable,
    train: Data,
    opt: torch.optim.Optimizer,
    guide_params: list[torch.Tensor],
    model_params: list[torch.Tensor],
    max_steps: int,
    batch_size: int,
    generator: torch.Generator,
    ddp: _Distributed,
    window: int = 10,
) -> int:
    """He et al. (2019)'s inner loop: guide-only steps on fresh minibatches until the mean
    loss of a window of ``window`` steps stops falling, at most ``max_steps``; returns the
    number taken. The engine's step counter (which drives beta schedules) is left as found."""
    n_train = num_items(train)
    engine_step = getattr(engine, "step", None)
    previous, losses = float("inf"), []
    taken = 0
    while taken < max_steps:
        index = torch.randperm(n_train, generator=generator)[:batch_size]
        loss = engine.loss_and_grads(model, guide, *get_batch(train, index[ddp.rank :: ddp.world]))
        loss = ddp.mean(float(loss))
        if not np.isfinite(loss):
            raise TrainingDiverged(f"the bound became {-loss} during aggressive encoder steps")
        for p in model_params:
            p.grad = None
        ddp.average_grads(guide_params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        taken += 1
        losses.append(loss)
        if len(losses) == window:
            current, losses = sum(losses) / window, []
            if current >= previous:
                break
            previous = current
    if engine_step is not None:
        engine.step = engine_step
    return taken


def evaluate_bound(
    model: Callable, guide: Callable, data: Data, engine: Any, batch_size: int = 100
) -> float:
    """The engine's bound on ``data`` in nats per datapoint (no gradients)."""
    n = num_items(data)
    scaled_model, scaled_guide = scale_to_data(model, n), scale_to_data(guide, n)
    total = 0.0
    for batch in iter_batches(data, batch_size):
        total += -engine.loss(scaled_model, scaled_guide, *batch) * batch[0].shape[0] / n
    return total / n
