"""One training loop for every engine: ``pvae.fit``.

Minibatching with exact N/B scaling, a progress bar with the running bound, validation,
atomic checkpoints with exact resume, NaN detection, seeding and ``torch.distributed`` data
parallelism (gradients all-reduced, DDP-style).

``fit`` is a few small pieces: :class:`_Training` holds what one run needs and has one method
per stage (``resume``, ``run_epoch``, ``validate``, ``checkpoint``); a :class:`StepPolicy`
decides what each training step updates (:class:`AggressiveEncoder` is one), seeing the step
through a :class:`StepContext`; the settings a resume must match are the engine's own
(:func:`pvae.steps.engine_settings`); an engine takes
its step through :func:`pvae.steps.step_function`, resolved once per run, and returns a
:class:`pvae.steps.StepRecord`; its state goes into checkpoints through
:class:`pvae.steps.EngineState`; checkpoints are written by :mod:`pvae.checkpoint`.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from pvae import validation
from pvae.checkpoint import (
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    RunFolder,
    fork_rng,
    load_checkpoint,
    non_finite,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from pvae.evaluate import Data, get_batch, iter_batches, num_items, refuse_scaled_latents
from pvae.protocol import (
    SCALED_LATENTS,
    describe_scales,
    param_split,
    scale_to_data,
    scaled_latent_sites,
)
from pvae.steps import (
    ENGINE_BOUND,
    NEGATIVE_LOSS,
    StepRecord,
    engine_data_plate,
    engine_settings,
    engine_state,
    load_engine_state,
    reset_engine,
    snapshot_engine_state,
    step_function,
)

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_FORMAT",
    "EpochBound",
    "AggressiveEncoder",
    "Run",
    "StepContext",
    "StepPolicy",
    "TrainingDiverged",
    "check_fit",
    "evaluate_bound",
    "fit",
    "load_checkpoint",
]

_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}

LearningRate = float | Mapping[str, float]
StepCallback = Callable[["Run", StepRecord], Any]
EpochCallback = Callable[["Run", dict[str, Any]], "bool | None"]


class TrainingDiverged(FloatingPointError):
    """The bound, the gradients or the parameters became NaN or infinite."""


def _settings(engine: Any, batch_size: int, optimizer: Any, lr: Any, seed: int) -> dict:
    """What defines a run besides the pair: saved in its checkpoint, compared on resume (the
    engine's part declared by the engine, :func:`pvae.steps.engine_settings`)."""
    described: dict[str, Any] = {"engine": type(engine).__name__}
    for name, value in engine_settings(engine).items():
        described[f"engine.{name}"] = value
    return {
        **described,
        "batch_size": int(batch_size),
        "optimizer": optimizer.lower() if isinstance(optimizer, str) else optimizer.__name__,
        "lr": {k: float(v) for k, v in lr.items()} if isinstance(lr, Mapping) else float(lr),
        "seed": int(seed),
    }


def _check_lr(lr: Any) -> None:
    """A finite learning rate >= 0 (0 freezes), or a mapping of them."""
    if isinstance(lr, Mapping):
        for part, value in lr.items():
            validation.finite_float(value, f"lr[{part!r}]", minimum=0.0)
    else:
        validation.finite_float(lr, "lr", minimum=0.0)


@dataclass
class Run:
    """What ``fit`` returns.

    ``history``: one dict per epoch with ``epoch``, ``train_bound`` and ``valid_bound`` (nats
    per datapoint, higher is better; ``valid_bound`` is None without validation data),
    ``seconds`` (training steps of that epoch), ``steps`` and ``bound_source``. ``steps``: one
    record per step (``epoch``, ``step``, ``loss``, ``bound``, ``seconds``). ``params``: the
    final constrained parameter values by name. ``bound_source``: ``"engine"`` when the engine
    reports its bound, ``"negative loss"`` when it reports only a loss (Pyro's own ``ELBO`` classes)
    and the bounds above are its negative loss, ``"surrogate: scaled latent sites"`` when
    latent sites carry a scale of their own (``poutine.scale``: KL annealing, a per-layer beta),
    so the values are a weighted objective, not bounds.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    run_dir: str | None = None
    bound_source: str = ENGINE_BOUND

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


# -- parameters and optimiser -----------------------------------------------------------------


def _split_params(
    model: Callable, guide: Callable, batch: tuple
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run the pair once to create its parameters; return ``(model_params, guide_params)``,
    unconstrained tensors by name, as :func:`pvae.protocol.param_split` divides them."""
    model_params, guide_params = param_split(model, guide, batch)
    if not model_params and not guide_params:
        raise ValueError(
            "the model and guide declare no parameters (pyro.param or pyro.module); "
            "there is nothing to train"
        )
    return model_params, guide_params


def _discover_params(model: Callable, guide: Callable, batch: tuple) -> dict[str, torch.Tensor]:
    """Run the pair once to create its parameters; return their unconstrained tensors."""
    model_params, guide_params = _split_params(model, guide, batch)
    return {**guide_params, **model_params}


def _optimizer(
    optimizer: str | Callable[..., torch.optim.Optimizer],
    model_params: dict[str, torch.Tensor],
    guide_params: dict[str, torch.Tensor],
    lr: LearningRate,
) -> torch.optim.Optimizer:
    """The optimiser over the guide's then the model's parameters: one group at ``lr`` (a
    float), or a group each at ``lr["guide"]`` and ``lr["model"]`` (a mapping)."""
    if isinstance(optimizer, str):
        if optimizer.lower() not in _OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {optimizer!r}; choose one of {sorted(_OPTIMIZERS)} or pass "
                "a torch.optim.Optimizer class"
            )
        optimizer = _OPTIMIZERS[optimizer.lower()]
    if not isinstance(lr, Mapping):
        params = [*guide_params.values(), *model_params.values()]
        return optimizer(params, lr=lr)  # type: ignore[call-arg]
    if set(lr) != {"model", "guide"}:
        raise ValueError(
            "lr must be a float or a mapping with exactly the keys 'model' and 'guide' "
            f"(e.g. {{'model': 1e-3, 'guide': 3e-3}}), got keys {sorted(lr)}"
        )
    groups = [
        {"params": list(params.values()), "lr": float(lr[part])}
        for part, params in (("guide", guide_params), ("model", model_params))
        if params
    ]
    return optimizer(groups, lr=float(lr["model"]))  # type: ignore[call-arg]


# -- data parallelism -------------------------------------------------------------------------


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


# -- step policies ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StepContext:
    """What a :class:`StepPolicy`'s hooks see of the training step under way.

    :param engine: the run's engine.
    :param model, guide: the pair as the loop steps it (its data plate scaled to the training
        set: per-datapoint terms count N/B times).
    :param batch: this process's minibatch of the step (the pair's positional arguments).
    :param epoch, step: the epoch, and the step within it, both from 0.
    :param seed: the run's seed: a policy that draws random numbers seeds its own generator
        from ``(seed, epoch, step)``, so that a resumed run draws the same ones.
    :param params, model_params, guide_params: the trained parameters (unconstrained
        tensors): all of them, the model's, the guide's (:func:`pvae.protocol.param_split`).
    :param random_batch: ``random_batch(generator)``: a fresh minibatch of the run's
        ``batch_size`` training rows drawn at random with ``generator`` (this process's share).
    :param update: ``update(params)``: an optimiser step on ``params`` alone (the other
        parameters' gradients are cleared first; gradients are averaged across processes),
        after which every gradient is zeroed.
    :param average: ``average(value)``: a float averaged across processes (itself in one).
    """

    engine: Any
    model: Callable
    guide: Callable
    batch: tuple
    epoch: int
    step: int
    seed: int
    params: Sequence[torch.Tensor]
    model_params: Sequence[torch.Tensor]
    guide_params: Sequence[torch.Tensor]
    random_batch: Callable[[torch.Generator], tuple]
    update: Callable[[Sequence[torch.Tensor]], None]
    average: Callable[[float], float]


class StepPolicy:
    """What each training step updates (``pvae.fit(step_policy=...)``). This default trains
    every parameter on the engine's step; a subclass may add work before the step and narrow
    what it trains.

    The loop calls ``start_epoch(epoch)`` before an epoch's steps, ``before_step(context)``
    before each step's gradients (a :class:`StepContext`: it may take steps of its own with
    ``context.update``), ``select_grads(context)`` after them (clear the gradients of what
    the step does not train; return the parameters it trains), and ``end_epoch(record)``
    after validation (it may add keys to the epoch record). Its ``state_dict()`` goes into
    the checkpoint and ``load_state_dict(state)`` restores it on resume, so a policy with
    state (a phase, a counter) resumes exactly.
    """

    def start_epoch(self, epoch: int) -> None:
        pass

    def before_step(self, context: StepContext) -> None:
        pass

    def select_grads(self, context: StepContext) -> Sequence[torch.Tensor]:
        return context.params

    def end_epoch(self, record: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class AggressiveEncoder(StepPolicy):
    """Aggressive encoder training (He et al. 2019, against posterior collapse).

    While the aggressive phase lasts, every step first trains only the guide's parameters on
    fresh random minibatches (:func:`_encoder_steps`: at most ``max_steps``, until the mean
    loss over a window of ``window`` steps stops falling), and then updates only the model's
    parameters on its own minibatch. The phase ends, for good, after the first epoch whose
    bound (validation bound where there is one) does not improve on the previous one. Epoch
    records gain ``"encoder_steps"``.
    """

    def __init__(self, max_steps: int, window: int = 10):
        self.max_steps = validation.positive_int(max_steps, "max_steps")
        self.window = validation.positive_int(window, "window")
        self.active = True
        self.best = -float("inf")
        self.encoder_steps = 0

    def start_epoch(self, epoch: int) -> None:
        self.encoder_steps = 0

    def before_step(self, context: StepContext) -> None:
        if not self.active:
            return
        seed = (context.seed * 1_000_003 + context.epoch) * 1_000_003 + context.step
        self.encoder_steps += _encoder_steps(
            context,
            max_steps=self.max_steps,
            generator=torch.Generator().manual_seed(seed),
            window=self.window,
        )

    def select_grads(self, context: StepContext) -> Sequence[torch.Tensor]:
        if not self.active:
            return context.params
        for p in context.guide_params:  # the decoder's step: only the model's parameters
            p.grad = None
        return context.model_params

    def end_epoch(self, record: dict[str, Any]) -> None:
        record["encoder_steps"] = self.encoder_steps
        if self.active:
            valid = record["valid_bound"]
            current = valid if valid is not None else record["train_bound"]
            self.active = current > self.best
            self.best = max(current, self.best)

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.active = bool(state.get("active", self.active))
        self.best = float(state.get("best", self.best))


def _encoder_steps(
    context: StepContext, max_steps: int, generator: torch.Generator, window: int = 10
) -> int:
    """He et al. (2019)'s inner loop: guide-only steps on fresh minibatches until the mean
    loss of a window of ``window`` steps stops falling, at most ``max_steps``; returns the
    number taken. The engine's state (its step counter, which drives beta schedules) is left
    as found. A divergence's message names the training step they precede."""
    engine, model, guide = context.engine, context.model, context.guide
    saved = snapshot_engine_state(engine)
    previous, losses = float("inf"), []
    taken = 0
    while taken < max_steps:
        loss = engine.loss_and_grads(model, guide, *context.random_batch(generator))
        loss = context.average(float(loss))
        if not np.isfinite(loss):
            raise TrainingDiverged(
                f"the bound became {-loss} on aggressive encoder step {taken} before the "
                f"training step of epoch {context.epoch}, step {context.step}"
            )
        context.update(context.guide_params)
        taken += 1
        losses.append(loss)
        if len(losses) == window:
            current, losses = sum(losses) / window, []
            if current >= previous:
                break
            previous = current
    if saved:
        load_engine_state(engine, saved)
    return taken


# -- the loop ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    """``fit``'s arguments besides the pair, the data and the engine, once checked."""

    epochs: int
    batch_size: int
    optimizer: str | Callable[..., torch.optim.Optimizer]
    lr: LearningRate
    valid: Data | None
    seed: int
    run_dir: str | os.PathLike | None
    resume: bool
    progress: bool
    callbacks: tuple[EpochCallback, ...]
    policy: StepPolicy
    step_callbacks: tuple[StepCallback, ...]
    data_plate: str
    scaled_latents: str = ""


class _Training:
    """One run of :func:`fit`: the scaled pair, its parameters and optimiser, the engine's step,
    the policy, and the :class:`Run` being filled. Stages: :meth:`resume`, :meth:`run_epoch`,
    :meth:`validate`, :meth:`checkpoint`."""

    def __init__(
        self, model: Callable, guide: Callable, train: Data, engine: Any, options: _Options
    ):
        batch_size, optimizer, lr, seed = (
            options.batch_size,
            options.optimizer,
            options.lr,
            options.seed,
        )
        run_dir = options.run_dir
        self.n_train = num_items(train)
        self.ddp = _Distributed()
        if batch_size < self.ddp.world:
            raise ValueError(
                f"batch_size {batch_size} is smaller than the {self.ddp.world} processes"
            )
        self.train, self.engine, self.batch_size, self.seed = train, engine, batch_size, seed
        self.data_plate = options.data_plate
        self.settings = _settings(engine, batch_size, optimizer, lr, seed)
        self.last_checkpoint: int | None = None  # the epoch of the last checkpoint written
        self.policy, self.step_callbacks = options.policy, options.step_callbacks
        self.step_fn, bound_source = step_function(engine)
        self.model = scale_to_data(model, self.n_train, options.data_plate)
        self.guide = scale_to_data(guide, self.n_train, options.data_plate)

        model_params, guide_params = _split_params(
            self.model, self.guide, get_batch(train, torch.arange(min(batch_size, self.n_train)))
        )
        self.params = {**guide_params, **model_params}
        self.param_list = list(self.params.values())
        self.model_params = list(model_params.values())
        self.guide_params = list(guide_params.values())
        self.ddp.broadcast(self.param_list)
        self.opt = _optimizer(optimizer, model_params, guide_params, lr)

        self.run = Run(run_dir=str(run_dir) if run_dir is not None else None)
        self.run.bound_source = bound_source
        if bound_source == NEGATIVE_LOSS:
            warnings.warn(
                f"{type(engine).__name__} reports a loss but no bound; fit reports its negative "
                "loss as the bound (run.bound_source == 'negative loss')",
                stacklevel=3,
            )
        self.checkpoint_path = Path(run_dir) / CHECKPOINT if run_dir is not None else None
        self.steps_per_epoch = -(-self.n_train // batch_size)
        self.validation = pyro.infer.util.is_validation_enabled()

    # -- what a step policy sees ---------------------------------------------------------------
    def context(self, epoch: int, step: int, batch: tuple) -> StepContext:
        """The :class:`StepContext` of step ``step`` of epoch ``epoch``."""
        return StepContext(
            engine=self.engine,
            model=self.model,
            guide=self.guide,
            batch=batch,
            epoch=epoch,
            step=step,
            seed=self.seed,
            params=self.param_list,
            model_params=self.model_params,
            guide_params=self.guide_params,
            random_batch=self._random_batch,
            update=self._update,
            average=self.ddp.mean,
        )

    def _random_batch(self, generator: torch.Generator) -> tuple:
        index = torch.randperm(self.n_train, generator=generator)[: self.batch_size]
        return get_batch(self.train, index[self.ddp.rank :: self.ddp.world])

    def _update(self, params: Sequence[torch.Tensor]) -> None:
        keep = {id(p) for p in params}
        for p in self.param_list:
            if id(p) not in keep:
                p.grad = None
        self.ddp.average_grads(params)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def flag_scaled_latents(self, which: str = "") -> None:
        """Mark the run's bounds as a weighted objective (latent sites with their own scale)."""
        if self.run.bound_source == SCALED_LATENTS:
            return
        self.run.bound_source = SCALED_LATENTS
        warnings.warn(
            f"latent sites {which or 'of the pair'} carry a scale of their own "
            "(pyro.poutine.scale: KL annealing, a per-layer beta or KL weight): the bounds fit "
            "reports are a weighted objective, not bounds on log p(x) "
            f"(run.bound_source == {SCALED_LATENTS!r})",
            stacklevel=4,
        )

    # -- resume -------------------------------------------------------------------------------
    def resume(self, resume: bool) -> int:
        """Restore the checkpoint (``resume`` and one exists) and return the epoch to start
        from; otherwise seed the generators, reset the engine's state, and return 0."""
        path = self.checkpoint_path
        if not (resume and path is not None and path.exists()):
            pyro.set_rng_seed(self.seed + self.ddp.rank)
            reset_engine(self.engine)  # a reused engine's schedules start from zero
            return 0
        state = load_checkpoint(path)
        missing = set(state["params"]) ^ set(self.params)
        if missing:
            raise ValueError(
                f"checkpoint {path} does not match this model/guide: parameters "
                f"{sorted(missing)} are in one but not the other"
            )
        shapes = [
            f"{name} (checkpoint {tuple(value.shape)}, model {tuple(self.params[name].shape)})"
            for name, value in state["params"].items()
            if value.shape != self.params[name].shape
        ]
        if shapes:
            raise ValueError(
                f"checkpoint {path} does not match this model/guide: parameters of other "
                f"shapes: {'; '.join(shapes)}"
            )
        saved = state.get("settings", {})
        differ = [
            f"{key} (checkpoint {saved[key]!r}, now {value!r})"
            for key, value in self.settings.items()
            if key in saved and saved[key] != value
        ]
        if differ:
            raise ValueError(
                f"resume=True continues the run in {path.parent}, but these settings differ "
                f"from its checkpoint: {'; '.join(differ)}; resume with the same settings or "
                "start a new run in another run_dir"
            )
        with torch.no_grad():
            for name, value in state["params"].items():
                self.params[name].copy_(value)
        try:
            self.opt.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as error:
            raise ValueError(
                f"checkpoint {path} holds the state of another optimiser than "
                f"{type(self.opt).__name__}: {type(error).__name__}: {error}"
            ) from error
        load_engine_state(self.engine, state.get("engine", {}))
        set_rng_state(state["rng"])
        self.policy.load_state_dict(state.get("step_policy", state.get("aggressive_encoder", {})))
        self.run.history, self.run.steps = state["history"], state["steps"]
        self.last_checkpoint = int(state["epoch"])
        return int(state["epoch"]) + 1

    # -- one epoch ----------------------------------------------------------------------------
    def _diverged(self, epoch: int, step: int | None, what: str) -> TrainingDiverged:
        at = f"at epoch {epoch}, step {step}" if step is not None else f"during epoch {epoch}"
        return TrainingDiverged(f"{what} {at}; {self._last_good()}")

    def _non_finite_params(self) -> list[str]:
        return [name for name, p in self.params.items() if not bool(torch.isfinite(p).all())]

    def _step_diverged(self, epoch: int, step: int, what: str) -> TrainingDiverged:
        """Step ``step``'s bound is not finite: say whether the parameters it started from
        already were (a non-finite gradient in an earlier update of this epoch: the epoch
        began with finite parameters, :meth:`end_epoch_check` sees to that)."""
        bad = self._non_finite_params()
        if not bad:
            return self._diverged(epoch, step, what)
        if step == 0:
            where = "before the epoch's first step"
        elif step == 1:
            where = f"in the update of epoch {epoch}, step 0"
        else:
            where = f"in an update of epoch {epoch}, step {step - 1} or earlier"
        return TrainingDiverged(
            f"parameters {bad[:3]} became NaN or infinite (a non-finite gradient) {where}, "
            f"and then {what} at epoch {epoch}, step {step}; {self._last_good()}"
        )

    def _check_last_gradients(self, epoch: int, step: int) -> None:
        """The gradients of the epoch's last step, before its update: once per epoch, so a
        non-finite gradient there is named exactly (a non-finite gradient on an earlier step
        shows as the next step's bound)."""
        bad = [
            name
            for name, p in self.params.items()
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        if bad:
            raise TrainingDiverged(
                f"the gradient of parameters {bad[:3]} became NaN or infinite at epoch {epoch}, "
                f"step {step} (the epoch's last step; its bound was finite); {self._last_good()}"
            )

    def end_epoch_check(self, epoch: int) -> None:
        """The parameters after the epoch's last update, before validation and callbacks."""
        bad = self._non_finite_params()
        if bad:
            last = self.steps_per_epoch - 1
            raise TrainingDiverged(
                f"parameters {bad[:3]} became NaN or infinite during epoch {epoch} (in an "
                f"update before its last step, {last}, whose gradients were finite, or in that "
                f"step's update); {self._last_good()}"
            )

    def _last_good(self) -> str:
        """What is true of the run folder now (checkpoints are written only when finite)."""
        if self.checkpoint_path is None:
            return "no checkpoint is kept (no run_dir)"
        if self.last_checkpoint is None:
            return f"no checkpoint was written (none in {self.checkpoint_path.parent})"
        return (
            f"the checkpoint of epoch {self.last_checkpoint} ({self.checkpoint_path}) holds "
            "finite values: lower the learning rate, or resume from it"
        )

    def run_epoch(self, epoch: int, bar: Any) -> tuple[float, float]:
        """Train one epoch; return its bound (nats per datapoint) and the seconds its steps
        took."""
        n_train, batch_size, ddp = self.n_train, self.batch_size, self.ddp
        rank, world = ddp.rank, ddp.world
        model, guide, policy, opt, run = self.model, self.guide, self.policy, self.opt, self.run
        step_fn, callbacks, steps = self.step_fn, self.step_callbacks, run.steps
        show = not bar.disable
        no_kwargs: dict[str, Any] = {}
        store_size = len(pyro.get_param_store())
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(self.seed + epoch))
        epoch_bound = 0.0
        epoch_seconds = 0.0
        policy.start_epoch(epoch)
        for step in range(self.steps_per_epoch):
            index = order[step * batch_size : (step + 1) * batch_size]
            batch = get_batch(self.train, index[rank::world])
            t0 = time.perf_counter()
            context = self.context(epoch, step, batch)
            policy.before_step(context)
            try:
                # Pyro's argument and support checks run on the first step of every epoch;
                # after that they would re-check the same kind of batch on every step (a
                # large share of a small model's step). Non-finite bounds are still caught.
                with pyro.validation_enabled(step == 0 and self.validation):
                    record = step_fn(model, guide, batch, no_kwargs)
            except ValueError as error:  # Pyro's validation meets NaN parameters first
                if "invalid values" not in str(error):
                    raise
                raise self._step_diverged(
                    epoch, step, f"non-finite values ({str(error).splitlines()[0]})"
                ) from error
            if record.extras.get("bound_source") == SCALED_LATENTS:
                self.flag_scaled_latents()
            bound = ddp.mean(record.bound)  # type: ignore[arg-type]
            if not math.isfinite(bound):
                raise self._step_diverged(epoch, step, f"the bound became {bound}")
            if len(pyro.get_param_store()) != store_size:
                raise ValueError(
                    "the model or guide created new parameters after its first step; "
                    "pvae.fit needs every parameter to exist at the first call"
                )
            ddp.average_grads(policy.select_grads(context))
            if step == self.steps_per_epoch - 1:
                self._check_last_gradients(epoch, step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            epoch_seconds += seconds
            epoch_bound += bound / n_train * len(index)
            loss = ddp.mean(record.loss)
            if ddp.active:  # callbacks see the values averaged over processes
                record.loss, record.bound = loss, bound
            steps.append(
                {"epoch": epoch, "step": step, "loss": loss, "bound": bound, "seconds": seconds}
            )
            for callback in callbacks:
                callback(run, record)
            bar.update(1)
            if show:
                bar.set_postfix(epoch=epoch, bound=f"{bound / n_train:.3f}")
        return epoch_bound / n_train, epoch_seconds

    # -- validation ---------------------------------------------------------------------------
    def validate(
        self, model: Callable, guide: Callable, valid: Data | None, epoch: int
    ) -> float | None:
        """The engine's bound on ``valid`` in nats per datapoint (averaged over processes);
        NaN there stops the run, naming the epoch."""
        if valid is None:
            return None
        try:
            bound = _evaluate_bound(
                model, guide, valid, self.engine, self.batch_size, self.data_plate
            )
        except ValueError as error:  # Pyro's validation meets non-finite values first
            if "invalid values" not in str(error):
                raise
            bound = math.nan
        bound = self.ddp.mean(bound)
        if math.isnan(bound):
            raise TrainingDiverged(
                f"the validation bound became nan after epoch {epoch} (whose training steps "
                f"and parameters were finite); {self._last_good()}"
            )
        return bound

    # -- checkpoint ---------------------------------------------------------------------------
    def checkpoint(self, epoch: int) -> None:
        """Write ``checkpoint.pt`` and ``run.json`` atomically (rank 0, with a run_dir)."""
        bad = self._non_finite_params()
        if bad:  # finite after the last step (end_epoch_check): the epoch's callbacks did it
            raise TrainingDiverged(
                f"parameters {bad[:3]} became NaN or infinite in the callbacks of epoch {epoch} "
                f"(they were finite after its last step); {self._last_good()}"
            )
        if self.checkpoint_path is None or self.ddp.rank != 0:
            return
        state = {
            "epoch": epoch,
            "params": {name: p.detach().clone() for name, p in self.params.items()},
            "optimizer": self.opt.state_dict(),
            "engine": engine_state(self.engine),
            "step_policy": self.policy.state_dict(),
            "rng": rng_state(),
            "history": self.run.history,
            "steps": self.run.steps,
            "settings": self.settings,
        }
        if non_finite(state) is not None:
            raise self._diverged(epoch, None, f"the {non_finite(state)} became NaN or infinite")
        write_checkpoint(self.checkpoint_path, state, self.run.to_json())
        self.last_checkpoint = epoch


def fit(
    model: Callable,
    guide: Callable,
    train: Data,
    engine: Any = None,
    epochs: int = 10,
    batch_size: int = 100,
    optimizer: str | Callable[..., torch.optim.Optimizer] = "adam",
    lr: LearningRate = 1e-3,
    valid: Data | None = None,
    seed: int = 0,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[EpochCallback] = (),
    aggressive_encoder: int | None = None,
    step_callbacks: Sequence[StepCallback] = (),
    step_policy: StepPolicy | None = None,
    data_plate: str = "data",
) -> Run:
    """Train a model/guide pair with any engine.

    :param model, guide: a Pyro pair; per-datapoint sites inside ``pyro.plate("data", ...)``
        (the plate named ``data_plate``). ``fit`` feeds minibatches and scales that plate to
        the training set (per-datapoint terms count N/B times, global ones once).
    :param train, valid: a tensor ``(N, ...)``, a tuple of tensors (positional arguments of
        the pair), or a torch Dataset.
    :param engine: a ``pyro.infer.ELBO`` (``pvae.inference.ELBO()`` when None). pvae's
        engines report their bound; Pyro's own (``Trace_ELBO``, ``RenyiELBO``, ...) train
        too, their negative loss reported as the bound (``run.bound_source == "negative
        loss"``, with a warning). A fresh run resets the engine's state (``engine.reset()``:
        schedules such as KL annealing start from zero); a resumed run restores it.
    :param epochs: total epochs (with ``resume`` the run continues up to this many).
    :param batch_size: datapoints per step, over all processes together.
    :param optimizer: "adam", "adamw", "sgd", "rmsprop", or a ``torch.optim.Optimizer`` class.
    :param lr: a float for every parameter, or ``{"model": ..., "guide": ...}`` for separate
        groups (the guide's parameters read from the traces, :func:`pvae.protocol.param_split`).
    :param seed: seeds Pyro, torch, numpy and Python; the data order follows ``(seed, epoch)``.
    :param run_dir: where ``checkpoint.pt`` and ``run.json`` are written after every epoch.
    :param resume: continue from ``run_dir/checkpoint.pt``, bit-identically to an
        uninterrupted run (parameters, optimiser, engine and step-policy state, random
        generators); settings that differ from the checkpoint's (the engine's ``settings()``,
        :func:`pvae.steps.engine_settings`, batch size, optimiser, lr, seed) are refused.
    :param callbacks: ``callback(run, epoch_record)`` after every epoch, before the checkpoint
        (what they change is saved); returning True stops training after that checkpoint.
    :param aggressive_encoder: shorthand for ``step_policy=AggressiveEncoder(n)`` (He et al.
        2019, against posterior collapse: up to ``n`` guide-only steps before each step, which
        then trains the model only, until an epoch's bound stops improving; see
        :class:`AggressiveEncoder`). Epoch records gain ``"encoder_steps"``.
    :param step_callbacks: ``callback(run, record)`` after every step with its
        :class:`pvae.steps.StepRecord` (``run.steps[-1]`` holds its epoch, step and seconds).
    :param step_policy: what each step updates, a :class:`StepPolicy` (all parameters on the
        engine's step when None). Its hooks receive a :class:`StepContext` (engine, scaled
        pair, batch, epoch, step, parameters, ``update(params)`` for steps of its own); its
        ``state_dict()`` is checkpointed and restored on resume. Not with ``aggressive_encoder``.
    :param data_plate: the name of the plate holding the datapoints (Pyro's DMM example:
        ``"z_minibatch"``); given to the engine for the run (``engine.data_plate``).
    :returns: a :class:`Run`.

    Pyro's validation (when on) checks the first step of every epoch only. Under ``torchrun``
    each process takes its share of every batch; gradients are averaged across processes.
    """
    from pvae.inference import ELBO  # late import: core does not depend on engines at import

    engine = engine if engine is not None else ELBO()
    _check_arguments(engine, epochs, batch_size, optimizer, lr, seed, run_dir, resume, progress)
    policy = _step_policy(step_policy, aggressive_encoder)
    data_plate = validation.plate_name(data_plate)
    callbacks = _check_callbacks(callbacks, "callbacks")
    step_callbacks = _check_callbacks(step_callbacks, "step_callbacks")
    with engine_data_plate(engine, data_plate):
        train, valid, probe = _check_data_and_engine(
            model, guide, train, engine, int(batch_size), valid, data_plate
        )
        options = _Options(
            int(epochs), int(batch_size), optimizer, lr, valid, int(seed), run_dir, resume,
            progress, callbacks, policy, step_callbacks, data_plate,
            describe_scales(scaled_latent_sites(*probe, plate=data_plate)),
        )  # fmt: skip
        return _in_run_folder(run_dir, resume, lambda: _fit(model, guide, train, engine, options))


def _step_policy(step_policy: Any, aggressive_encoder: Any) -> StepPolicy:
    """The run's policy: ``step_policy``, or :class:`AggressiveEncoder` for
    ``aggressive_encoder``, or the default :class:`StepPolicy`; both given is refused."""
    if step_policy is not None and aggressive_encoder is not None:
        raise ValueError(
            "pass step_policy or aggressive_encoder, not both (aggressive_encoder=n is "
            "step_policy=AggressiveEncoder(n))"
        )
    if aggressive_encoder is not None:
        return AggressiveEncoder(validation.positive_int(aggressive_encoder, "aggressive_encoder"))
    if step_policy is None:
        return StepPolicy()
    if not isinstance(step_policy, StepPolicy):
        raise TypeError(
            f"step_policy must be a pvae.StepPolicy (subclass it), got {type(step_policy).__name__}"
        )
    return step_policy


def _in_run_folder(run_dir: str | os.PathLike | None, resume: bool, work: Callable[[], Any]) -> Any:
    """``work()`` in the run folder ``run_dir`` (None: no folder), a
    :class:`~pvae.checkpoint.RunFolder`: locked while it runs; a folder that already holds a
    checkpoint is refused unless ``resume``; the folders created here that are still empty
    when ``work`` ends (it failed) are removed again."""
    if run_dir is None:
        return work()
    with RunFolder(run_dir) as folder:
        if (folder.path / CHECKPOINT).exists() and not resume:
            raise ValueError(
                f"run_dir {run_dir} already holds a run ({CHECKPOINT}); pass resume=True "
                "to continue it, or choose another folder"
            )
        return work()


def check_fit(
    model: Callable,
    guide: Callable,
    train: Data,
    engine: Any = None,
    batch_size: int = 100,
    valid: Data | None = None,
    data_plate: str = "data",
) -> None:
    """Everything :func:`fit` checks before it trains or writes anything, without training:
    the data (``train``, ``valid``: as in ``fit``), the data against the pair (one run of the
    pair on a batch of ``batch_size`` rows: shapes, dtypes, devices, the data plate, the
    guide's coverage of the model's latents, the support of the observed sites), and the
    engine against the pair (its bound evaluated once on that batch, without gradients, so
    that an engine that does not apply to the pair, such as ``KalmanELBO`` on a pair without
    a smoothed state-space posterior, refuses it here). ``data_plate``: as in ``fit``.

    Pyro's parameter store, the random generators and the engine's state are left as found.
    A program that writes files before calling ``fit`` (a configuration, a log) calls this
    first; the command line does.

    :raises ValueError, TypeError: what ``fit`` would raise before its first step.
    """
    from pvae.inference import ELBO  # late import: core does not depend on engines at import

    engine = engine if engine is not None else ELBO()
    _check_engine(engine)
    batch_size = validation.positive_int(batch_size, "batch_size")
    data_plate = validation.plate_name(data_plate)
    with engine_data_plate(engine, data_plate):
        _check_data_and_engine(model, guide, train, engine, batch_size, valid, data_plate)


def _check_data_and_engine(
    model: Callable,
    guide: Callable,
    train: Data,
    engine: Any,
    batch_size: int,
    valid: Data | None,
    data_plate: str = "data",
) -> tuple[Data, Data | None, tuple[Any, Any]]:
    """:func:`check_fit`'s checks once the scalar arguments are checked; returns the data
    (NumPy arrays converted) and the probe's traces of the pair on a training batch."""
    train = validation.as_data(train, "train")
    probe = validation.check_pair_data(
        model, guide, train, "train", batch_size, get_batch, "fit", data_plate
    )
    if valid is not None:
        valid = validation.as_data(valid, "valid")
        validation.check_like(valid, train, "valid")
        validation.check_pair_data(
            model, guide, valid, "valid", batch_size, get_batch, "fit", data_plate
        )
    _probe_engine(model, guide, train, engine, batch_size, data_plate)
    return train, valid, probe


def _probe_engine(
    model: Callable, guide: Callable, train: Data, engine: Any, batch_size: int, data_plate: str
) -> None:
    """The engine's bound once on the first ``batch_size`` rows of ``train``, scaled as in
    training, without gradients; the parameter store, the random generators and the engine's
    state are restored afterwards (the run then starts exactly as without the probe)."""
    n = num_items(train)
    batch = get_batch(train, torch.arange(min(batch_size, n)))
    devices = sorted(
        {t.device.index or 0 for t in batch if isinstance(t, torch.Tensor) and t.is_cuda}
    )
    store = pyro.get_param_store()
    before = set(store.keys())
    saved = snapshot_engine_state(engine)
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), pyro.poutine.block():
            scaled = scale_to_data(model, n, data_plate), scale_to_data(guide, n, data_plate)
            engine.loss(*scaled, *batch)
    except ValueError as error:  # non-finite values: the first step reports them as divergence
        if "invalid values" not in str(error):
            raise
    finally:
        for new in set(store.keys()) - before:
            del store[new]
        load_engine_state(engine, saved)


def _check_callbacks(callbacks: Any, name: str) -> tuple[Callable, ...]:
    """A sequence of callables (checked before the first epoch, not after it)."""
    if callable(callbacks) or isinstance(callbacks, str | bytes):
        raise TypeError(f"{name} must be a list of callables, got {callbacks!r} (wrap it: [f])")
    try:
        items = tuple(callbacks)
    except TypeError:
        raise TypeError(f"{name} must be a list of callables, got {callbacks!r}") from None
    bad = [item for item in items if not callable(item)]
    if bad:
        raise TypeError(f"{name} must hold callables only, got {bad[0]!r}")
    return items


def _check_engine(engine: Any) -> None:
    if isinstance(engine, str):
        raise TypeError(
            f"engine must be an engine object such as pvae.inference.IWAE(num_particles=5), "
            f"got the string {engine!r}"
        )
    step_function(engine)  # a TypeError for an object that is no engine


def _check_arguments(
    engine: Any,
    epochs: Any,
    batch_size: Any,
    optimizer: Any,
    lr: Any,
    seed: Any,
    run_dir: Any,
    resume: Any,
    progress: Any = True,
) -> None:
    """``fit``'s scalar arguments, before anything runs."""
    _check_engine(engine)
    validation.non_negative_int(epochs, "epochs")
    validation.positive_int(batch_size, "batch_size")
    validation.seed_value(seed)
    _check_lr(lr)
    if isinstance(optimizer, str) and optimizer.lower() not in _OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {optimizer!r}; choose one of {sorted(_OPTIMIZERS)} or pass "
            "a torch.optim.Optimizer class"
        )
    for name, flag in (("resume", resume), ("progress", progress)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if run_dir is not None and Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise ValueError(f"run_dir {run_dir} exists and is not a folder")


def _fit(model: Callable, guide: Callable, train: Data, engine: Any, options: _Options) -> Run:
    """``fit`` once its arguments and data are checked (and the run folder is locked)."""
    policy, valid, epochs = options.policy, options.valid, options.epochs
    training = _Training(model, guide, train, engine, options)
    run = training.run
    if options.scaled_latents:
        training.flag_scaled_latents(options.scaled_latents)
    start_epoch = training.resume(options.resume)

    show = options.progress and sys.stderr.isatty() and training.ddp.rank == 0
    total = training.steps_per_epoch * max(0, epochs - start_epoch)
    bar = tqdm(total=total, disable=not show, unit="step")
    try:
        for epoch in range(start_epoch, epochs):
            train_bound, seconds = training.run_epoch(epoch, bar)
            training.end_epoch_check(epoch)
            epoch_record: dict[str, Any] = {
                "epoch": epoch,
                "train_bound": train_bound,
                "valid_bound": training.validate(model, guide, valid, epoch),
                "seconds": seconds,
                "steps": training.steps_per_epoch,
                "bound_source": run.bound_source,
            }
            policy.end_epoch(epoch_record)
            run.history.append(epoch_record)
            # Callbacks run before the checkpoint, so that what they change (parameters set
            # outside the gradient, e.g. ARD prior variances) and the random numbers they draw
            # are saved with it: resume stays exact.
            stop = False
            for callback in options.callbacks:
                stop = bool(callback(run, epoch_record)) or stop
            training.checkpoint(epoch)
            if stop:
                break
    finally:
        bar.close()
    run.params = {
        name: pyro.param(name).detach().clone()
        for name in training.params
        if name in pyro.get_param_store()
    }
    return run


class EpochBound:
    """An epoch callback for :func:`fit` that records ``record[key]``: ``engine``'s bound on
    ``data`` (:func:`evaluate_bound`, nats per datapoint) after every epoch, a yardstick
    common to runs trained with different engines.

    It runs without gradients, with ``torch.manual_seed(seed)`` inside a forked RNG
    (:func:`pvae.checkpoint.fork_rng` of ``device``: the training's random numbers are
    untouched) and ``module`` (the model and guide's :class:`torch.nn.Module`, if any) in eval
    mode, restored afterwards; :attr:`seconds` adds up the time it took.

    :param data: ``(N, x_dim)``, or a tuple of tensors with ``N`` rows each, e.g. the first
        200 validation points.
    :param batch_size: datapoints per evaluation batch.
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        data: Data,
        engine: Any,
        seed: int,
        *,
        key: str = "yardstick",
        batch_size: int = 100,
        module: torch.nn.Module | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        validation.positive_int(batch_size, "batch_size")
        self.model, self.guide, self.data, self.engine = model, guide, data, engine
        self.seed, self.key, self.batch_size = int(seed), key, batch_size
        self.module, self.device = module, torch.device(device)
        self.seconds = 0.0

    def __call__(self, run: Run | None, record: dict[str, Any]) -> None:
        started = time.perf_counter()
        training = self.module.training if self.module is not None else False
        if self.module is not None:
            self.module.eval()
        try:
            with fork_rng(self.device), torch.no_grad():
                torch.manual_seed(self.seed)
                bound = evaluate_bound(
                    self.model, self.guide, self.data, self.engine, self.batch_size
                )
            record[self.key] = float(bound)
        finally:
            if self.module is not None:
                self.module.train(training)
        self.seconds += time.perf_counter() - started


def evaluate_bound(
    model: Callable,
    guide: Callable,
    data: Data,
    engine: Any,
    batch_size: int = 100,
    data_plate: str = "data",
) -> float:
    """The engine's bound on ``data`` in nats per datapoint (no gradients).

    ``data`` is checked as :func:`fit` checks its ``train`` (tensors or a tuple of them,
    finite, on a real device, of the shape, dtype and support the pair takes, per-datapoint
    sites in ``pyro.plate("data")``), once, before any work. A pair whose latent sites carry a
    scale of their own (``poutine.scale``: KL annealing, a per-layer beta) is refused: the
    engine's value is then a weighted objective, not a bound on log p(x).

    ``data_plate``: the name of the plate holding the datapoints (as in :func:`fit`).

    :raises ValueError, TypeError: naming ``data``, ``engine``, ``batch_size`` or
        ``data_plate``.
    """
    _check_engine(engine)
    batch_size = validation.positive_int(batch_size, "batch_size")
    data_plate = validation.plate_name(data_plate)
    data = validation.as_data(data, "data")
    with engine_data_plate(engine, data_plate):
        traces = validation.check_pair_data(
            model, guide, data, "data", batch_size, get_batch, "evaluate_bound", data_plate
        )
        refuse_scaled_latents(traces, "evaluate_bound", data_plate)
        return _evaluate_bound(model, guide, data, engine, batch_size, data_plate)


def _evaluate_bound(
    model: Callable,
    guide: Callable,
    data: Data,
    engine: Any,
    batch_size: int,
    data_plate: str = "data",
) -> float:
    """:func:`evaluate_bound` on checked arguments (fit's validation after every epoch)."""
    n = num_items(data)
    scaled_model = scale_to_data(model, n, data_plate)
    scaled_guide = scale_to_data(guide, n, data_plate)
    total = 0.0
    for batch in iter_batches(data, batch_size):
        total += -engine.loss(scaled_model, scaled_guide, *batch) * batch[0].shape[0] / n
    return total / n
