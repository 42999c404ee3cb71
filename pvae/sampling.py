"""The sampling loop of every sampler engine: ``pvae.sample``, and what it returns: ``Posterior``.

``sample`` is the sampler's sibling of :func:`pvae.fit`: it feeds minibatches to a model
scaled to the data (:func:`pvae.scale_to_data`: per-datapoint terms count N/B, global ones
once), runs each chain's warm-up then its sampling steps, keeps every ``thin``-th state on the
CPU (memory ``num_chains * num_samples`` values of each site, whatever the number of steps),
shows a progress bar with the running log joint, and writes atomic checkpoints from which a
run resumes bit-identically: every ``checkpoint_every`` steps, after every chain, and when the
run is interrupted (SIGINT, Ctrl-C: the step under way finishes, the checkpoint is written, then
:class:`SamplingInterrupted` is raised; a second Ctrl-C stops at once, without a checkpoint).
Chains run one after another, each with its own seed.

A sampler engine (``pvae.inference.SGHMC``) is a :class:`pvae.steps.SamplerEngine`:

- ``setup(model, args, kwargs, *, num_data, num_warmup, seed)``: start a chain on the model
  (its latent sites found on the batch ``args``);
- ``train_step(model, None, *args) -> StepRecord``: one move on a minibatch, the record
  carrying ``log_joint`` (:class:`pvae.steps.StepRecord`);
- ``values()``: the current state, site name -> constrained value; ``unconstrained()``;
- ``state_dict()``, ``load_state_dict(state)``, ``reset()`` (:class:`pvae.steps.EngineState`);
- ``settings()``: what a resumed run must share with the run it continues.

This module is core: it imports no engine (the default sampler is imported when first used).
"""

from __future__ import annotations

import inspect
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from tqdm.auto import tqdm

from pvae import atomic, validation
from pvae.checkpoint import (
    CHECKPOINT,
    load_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from pvae.evaluate import Data, get_batch, num_items
from pvae.protocol import scale_to_data
from pvae.steps import SamplerEngine, engine_data_plate, engine_settings, missing_sampler_methods
from pvae.train import _in_run_folder

__all__ = [
    "Convergence",
    "Posterior",
    "SamplingDiverged",
    "SamplingInterrupted",
    "SiteConvergence",
    "sample",
]


class SamplingDiverged(FloatingPointError):
    """A chain diverged: its log joint became NaN or infinite, or its state exploded."""


class SamplingInterrupted(KeyboardInterrupt):
    """:func:`sample` stopped on SIGINT (Ctrl-C) after a whole step.

    ``checkpoint``: the checkpoint written at that step (None without ``run_dir``), from which
    ``resume=True`` continues bit-identically; ``chain`` and ``step``: where it continues.
    """

    def __init__(self, message: str, checkpoint: str | None, chain: int, step: int) -> None:
        super().__init__(message)
        self.checkpoint, self.chain, self.step = checkpoint, chain, step

    def __str__(self) -> str:
        return str(self.args[0])


@contextmanager
def _deferred_sigint() -> Iterator[Callable[[], bool]]:
    """While the block runs, a first SIGINT only sets a flag (the returned callable reports
    it), so the loop can finish its step and write a checkpoint; a second one raises
    ``KeyboardInterrupt`` at once. Outside the main thread, or when SIGINT has a handler
    other than Python's default, nothing changes (the callable always returns False)."""
    received = [False]
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    if previous is not signal.default_int_handler:
        yield lambda: False
        return

    def handler(signum: int, frame: Any) -> None:
        if received[0]:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        received[0] = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: received[0]
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class Posterior:
    """Samples of every latent site, as :func:`sample` returns them.

    ``samples``: site name -> tensor ``(num_chains, num_samples, *site_shape)`` of values in
    the site's support, on the CPU. ``log_joint``: ``(num_chains, num_samples)``, the minibatch
    estimate of log p(x, theta) (unconstrained space, Jacobian included) of the step that
    produced each kept sample, taken at the state that step started from. ``warmup_log_joint``:
    ``(num_chains, warmup)``, the same during warm-up (to judge it).
    """

    samples: dict[str, torch.Tensor]
    log_joint: torch.Tensor
    warmup_log_joint: torch.Tensor
    run_dir: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse arrays whose shapes disagree: every sample tensor must be
        ``(num_chains, num_samples, *site_shape)`` with the log joint's ``(num_chains,
        num_samples)``, the warm-up log joint ``(num_chains, warmup)``.

        :raises ValueError: naming the first array whose shape does not fit.
        """
        lj = self.log_joint
        if not isinstance(lj, torch.Tensor) or lj.dim() != 2:
            shape = tuple(lj.shape) if isinstance(lj, torch.Tensor) else type(lj).__name__
            raise ValueError(
                f"Posterior.log_joint must be a (num_chains, num_samples) tensor, got {shape}"
            )
        if not isinstance(self.samples, Mapping):
            raise ValueError(
                f"Posterior.samples must be a dict of site -> tensor, got "
                f"{type(self.samples).__name__}"
            )
        for name, value in self.samples.items():
            if not isinstance(value, torch.Tensor) or tuple(value.shape[:2]) != tuple(lj.shape):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
                raise ValueError(
                    f"Posterior.samples[{name!r}] has shape {shape}; every site must be "
                    f"(num_chains, num_samples, *site_shape) with (num_chains, num_samples) = "
                    f"{tuple(lj.shape)}, the log joint's"
                )
        warm = self.warmup_log_joint
        if not isinstance(warm, torch.Tensor) or (
            warm.numel() > 0 and (warm.dim() != 2 or warm.shape[0] != lj.shape[0])
        ):
            shape = tuple(warm.shape) if isinstance(warm, torch.Tensor) else type(warm).__name__
            raise ValueError(
                f"Posterior.warmup_log_joint must be (num_chains, warmup) with num_chains = "
                f"{lj.shape[0]}, got {shape}"
            )

    @property
    def num_chains(self) -> int:
        return int(self.log_joint.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.log_joint.shape[1])

    def flat(self) -> dict[str, torch.Tensor]:
        """Samples with chains and draws merged: site -> ``(num_chains * num_samples, *shape)``."""
        return {name: t.reshape(-1, *t.shape[2:]) for name, t in self.samples.items()}

    def mean(self) -> dict[str, torch.Tensor]:
        """The posterior mean of every site (over chains and draws)."""
        return {name: t.mean(0) for name, t in self.flat().items()}

    def to_arviz(self) -> Any:
        """An ``arviz.InferenceData`` (arviz 0.x) or ``DataTree`` (arviz 1.x): group
        ``posterior`` with every site as ``(chain, draw, *shape)``, group ``sample_stats`` with
        ``lp`` (the log joint). Use it for R-hat, ESS, trace and rank plots."""
        import arviz

        self.check()
        posterior = {name: t.double().numpy() for name, t in self.samples.items()}
        groups = {"posterior": posterior, "sample_stats": {"lp": self.log_joint.double().numpy()}}
        from_dict: Any = arviz.from_dict
        if "posterior" in inspect.signature(from_dict).parameters:  # arviz 0.x: keyword groups
            return from_dict(**groups)
        return from_dict(groups)  # arviz 1.x: one mapping of groups

    def summary(self, **kwargs: Any) -> Any:
        """``arviz.summary`` of :meth:`to_arviz` (means, sd, HDI, R-hat, bulk/tail ESS) as a
        pandas DataFrame; ``kwargs`` go to ``arviz.summary``."""
        import arviz

        return arviz.summary(self.to_arviz(), **kwargs)

    def rhat(self) -> dict[str, torch.Tensor]:
        """Rank-normalised split R-hat (``arviz.rhat``) of every site, shaped like the site."""
        import arviz

        return _per_site(arviz.rhat(self.to_arviz()), self.samples)

    def ess(self) -> dict[str, torch.Tensor]:
        """Bulk effective sample size (``arviz.ess``) of every site, shaped like the site."""
        import arviz

        return _per_site(arviz.ess(self.to_arviz()), self.samples)

    def convergence(self, per_site: int = 50, top: int = 8) -> Convergence:
        """R-hat and bulk ESS (:meth:`rhat`, :meth:`ess`) summarised per site, over the
        coordinates checked: every coordinate of a site with at most ``per_site`` of them,
        else ``per_site`` evenly spaced ones (ArviZ takes milliseconds per coordinate, and a
        network holds tens of thousands of weights).

        :returns: a :class:`Convergence` whose ``worst`` holds the ``top`` checked coordinates
            with the largest R-hat (NaN last), each ``(num_chains, num_samples)``.
        """
        per_site = validation.positive_int(per_site, "per_site")
        top = validation.positive_int(top, "top")
        samples, index = {}, {}
        for site, values in self.samples.items():
            flat = values.reshape(self.num_chains, self.num_samples, -1)
            size = flat.shape[-1]
            index[site] = torch.linspace(0, size - 1, min(size, per_site)).round().long().unique()
            samples[site] = flat[:, :, index[site]]
        checked = Posterior(samples, self.log_joint, self.warmup_log_joint)
        rhat, ess = checked.rhat(), checked.ess()
        sites, scored = {}, []
        for site, flat_index in index.items():
            r, e = rhat[site].reshape(-1).double(), ess[site].reshape(-1).double()
            sites[site] = SiteConvergence(
                self.samples[site][0, 0].numel(), r.numel(), float(r.nanmedian()),
                _extreme(r, largest=True), float(e.nanmedian()), _extreme(e, largest=False),
            )  # fmt: skip
            ranked = torch.topk(torch.nan_to_num(r, nan=math.inf), min(top, r.numel())).indices
            scored += [(float(r[i]), site, int(flat_index[i])) for i in ranked]
        scored.sort(key=lambda item: -item[0] if not math.isnan(item[0]) else -math.inf)
        worst = {
            _coordinate(site, self.samples[site].shape[2:], i): self.samples[site].reshape(
                self.num_chains, self.num_samples, -1
            )[:, :, i]
            for _, site, i in scored[:top]
        }
        reduced = Posterior(worst, self.log_joint, self.warmup_log_joint)
        return Convergence(sites, reduced)

    def predictive(
        self,
        model: Callable,
        *args: Any,
        num_samples: int | None = None,
        return_sites: list[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Posterior predictive: ``pyro.infer.Predictive`` on ``model(*args, **kwargs)`` with
        the samples flattened over chains (``num_chains * num_samples`` draws, or
        ``num_samples`` of them evenly spaced). Returns site -> ``(draws, *site_shape)``;
        by default every site that is not a sampled latent (observations included: pass
        ``None`` for the observed data)."""
        flat = self.flat()
        total = self.num_chains * self.num_samples
        if num_samples is not None:
            num_samples = validation.positive_int(num_samples, "num_samples")
            if num_samples > total:
                raise ValueError(
                    f"num_samples must be at most the {total} samples, got {num_samples}"
                )
            index = torch.linspace(0, total - 1, num_samples).round().long()
            flat = {name: t[index] for name, t in flat.items()}
        predictive = pyro.infer.Predictive(model, posterior_samples=flat, return_sites=return_sites)
        return predictive(*args, **kwargs)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the posterior to ``path`` atomically (a temporary file, then a rename): a
        dict of its ``samples``, ``log_joint``, ``warmup_log_joint`` and ``settings``, read
        back by :meth:`load`. Returns the path."""
        return atomic.save_torch({key: getattr(self, key) for key in _SAVED}, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], run_dir: str | None = None) -> Posterior:
        """The posterior :meth:`save` wrote to ``path`` (on the CPU; tensors only, no code
        is unpickled), its arrays checked as the constructor checks them.

        :raises ValueError: the file cannot be read or holds no posterior.
        """
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
            raise ValueError(f"cannot read {path}: {error}") from error
        if not isinstance(state, dict) or not {"samples", "log_joint"} <= set(state):
            raise ValueError(f"{path} does not hold a saved Posterior (samples and log joint)")
        return cls(
            samples=dict(state["samples"]),
            log_joint=state["log_joint"],
            warmup_log_joint=state.get("warmup_log_joint", torch.zeros(0)),
            run_dir=run_dir,
            settings=dict(state.get("settings", {})),
        )


_SAVED = ("samples", "log_joint", "warmup_log_joint", "settings")  # what Posterior.save writes


@dataclass
class SiteConvergence:
    """R-hat and bulk ESS of one site's checked coordinates (:meth:`Posterior.convergence`):
    ``coordinates`` in the site, ``checked`` of them, the median and the worst (largest
    R-hat, lowest ESS; NaN only where every value is)."""

    coordinates: int
    checked: int
    median_rhat: float
    worst_rhat: float
    median_ess: float
    lowest_ess: float


@dataclass
class Convergence:
    """What :meth:`Posterior.convergence` returns: ``sites`` (site -> :class:`SiteConvergence`)
    and ``worst``, a :class:`Posterior` of the coordinates with the largest R-hat, named
    ``site[i, j]`` (``(num_chains, num_samples)`` each)."""

    sites: dict[str, SiteConvergence]
    worst: Posterior

    @property
    def worst_rhat(self) -> float:
        """The largest R-hat over every checked coordinate (NaN where none is defined)."""
        values = [site.worst_rhat for site in self.sites.values()]
        return _extreme(torch.tensor(values, dtype=torch.float64), largest=True)

    @property
    def lowest_ess(self) -> float:
        """The lowest bulk ESS over every checked coordinate (NaN where none is defined)."""
        values = [site.lowest_ess for site in self.sites.values()]
        return _extreme(torch.tensor(values, dtype=torch.float64), largest=False)

    @property
    def checked(self) -> int:
        """How many coordinates were checked, over every site."""
        return sum(s.checked for s in self.sites.values())


def _coordinate(site: str, shape: torch.Size, flat_index: int) -> str:
    """``site[i, j]``, the name of the coordinate ``flat_index`` of a site of ``shape``."""
    if not shape:
        return site
    index = [int(i) for i in torch.unravel_index(torch.tensor(flat_index), shape)]
    return f"{site}[{', '.join(map(str, index))}]"


def _extreme(t: torch.Tensor, largest: bool) -> float:
    """The largest (smallest) value of ``t`` that is not NaN; NaN where every value is."""
    kept = t[~torch.isnan(t)]
    return float(kept.max() if largest else kept.min()) if kept.numel() else math.nan


def _per_site(dataset: Any, samples: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        name: torch.as_tensor(dataset[name].values).reshape(t.shape[2:])
        for name, t in samples.items()
    }


def _check_sampler(sampler: Any) -> None:
    """``sampler`` must be a :class:`pvae.steps.SamplerEngine`."""
    if isinstance(sampler, str):
        raise TypeError(
            f"sampler must be a sampler object such as pvae.inference.SGHMC(), got {sampler!r}"
        )
    if isinstance(sampler, SamplerEngine):
        return
    missing = missing_sampler_methods(sampler)
    lacks = (
        f"it lacks {missing}"
        if missing
        else "it has every method but does not declare the contract (subclass it, or "
        "SamplerEngine.register(its class))"
    )
    raise TypeError(
        "sampler must be a sampler engine, an instance of pvae.inference.SamplerEngine such "
        f"as pvae.inference.SGHMC(); {type(sampler).__name__} is not: {lacks}"
    )


def _settings(sampler: Any, **options: Any) -> dict[str, Any]:
    """What defines a run besides the model: the sampler's own settings
    (:func:`pvae.steps.engine_settings`) and the loop's ``options``."""
    described: dict[str, Any] = {"sampler": type(sampler).__name__}
    for name, value in engine_settings(sampler).items():
        described[f"sampler.{name}"] = value
    return {**described, **options}


class _Batches:
    """The minibatch of each step: rows of a permutation per epoch, a function of
    ``(seed, chain, epoch)``; every row in order when the batch covers the data."""

    def __init__(self, data: Data | None, batch_size: int, seed: int, chain: int):
        self.data, self.seed, self.chain = data, seed, chain
        self.n = num_items(data) if data is not None else 1
        self.batch_size = min(batch_size, self.n)
        self.per_epoch = -(-self.n // self.batch_size)
        self._epoch, self._order = -1, torch.arange(self.n)

    def __call__(self, step: int) -> tuple:
        if self.data is None:
            return ()
        epoch, j = divmod(step, self.per_epoch)
        if self.batch_size < self.n and epoch != self._epoch:
            seed = ((self.seed * 1_000_003 + self.chain) * 1_000_003 + epoch) % 2**63
            self._order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))
            self._epoch = epoch
        return get_batch(self.data, self._order[j * self.batch_size : (j + 1) * self.batch_size])


def sample(
    model: Callable,
    data: Data | None = None,
    sampler: Any = None,
    num_samples: int = 1000,
    warmup: int = 1000,
    thin: int = 1,
    num_chains: int = 1,
    batch_size: int = 100,
    seed: int = 0,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    checkpoint_every: int = 1000,
    data_plate: str = "data",
) -> Posterior:
    """Sample every latent site of ``model`` with a stochastic-gradient MCMC sampler.

    :param model: a Pyro model called as ``model(*batch)``; per-datapoint sites inside
        ``pyro.plate("data", ...)``, global latents (weights, ``PyroSample`` attributes of
        ``PyroModule`` instances) outside it. It is scaled to the data (per-datapoint terms
        count N/B, global ones once).
    :param data: a tensor ``(N, ...)``, a tuple of tensors (the model's positional arguments)
        or a torch Dataset; None for a model without data (called with no arguments).
    :param sampler: a sampler engine, ``pvae.inference.SGHMC()`` (adaptive) when None.
    :param num_samples: samples kept per chain.
    :param warmup: steps per chain before the first kept sample (the adaptive sampler
        estimates its preconditioner during them); none is kept.
    :param thin: keep every ``thin``-th state: a chain takes ``warmup + num_samples * thin``
        steps.
    :param num_chains: chains, run one after another; chain c is seeded by ``(seed, c)``.
    :param batch_size: datapoints per step (every datapoint when >= N).
    :param seed: seeds Pyro's generators, the data order and every chain.
    :param run_dir: where ``checkpoint.pt`` and ``run.json`` are written atomically every
        ``checkpoint_every`` steps, after every chain, on SIGINT and at the end.
    :param resume: continue from ``run_dir/checkpoint.pt``; the samples are bit-identical to
        those of an uninterrupted run.
    :param progress: a progress bar (on a terminal) with the chain and the running log joint.
    :param checkpoint_every: steps between checkpoints within a chain.
    :param data_plate: the name of the plate holding the datapoints (``"data"``); given to
        the sampler for the run (``sampler.data_plate``).
    :returns: a :class:`Posterior`.
    :raises SamplingDiverged: a chain diverged: its log joint became NaN or infinite, or
        collapsed as its state exploded (lower ``lr``); the message names the checkpoint
        only when one was written.
    :raises SamplingInterrupted: SIGINT (Ctrl-C) during sampling, after the checkpoint of the
        last whole step was written (a ``KeyboardInterrupt``).
    """
    if sampler is None:
        from pvae.inference import SGHMC  # late import: core does not import engines

        sampler = SGHMC()
    _check_sampler(sampler)
    data, settings = _check_loop(
        model, data, num_samples, warmup, thin, num_chains, batch_size, seed, resume, data_plate
    )
    checkpoint_every = validation.positive_int(checkpoint_every, "checkpoint_every")
    with engine_data_plate(sampler, data_plate):
        settings = _settings(sampler, **settings)
        run = _Sampling(model, data, sampler, settings, run_dir, checkpoint_every, data_plate)
        return _in_run_folder(run_dir, resume, lambda: run.run(resume, progress))


def _check_loop(
    model: Any,
    data: Data | None,
    num_samples: Any,
    warmup: Any,
    thin: Any,
    num_chains: Any,
    batch_size: Any,
    seed: Any,
    resume: Any,
    data_plate: Any,
) -> tuple[Data | None, dict[str, Any]]:
    """:func:`sample`'s arguments checked (the data against the model with fit's checks);
    returns the data (NumPy arrays converted) and the loop's settings."""
    settings = {
        "num_samples": validation.positive_int(num_samples, "num_samples"),
        "warmup": validation.non_negative_int(warmup, "warmup"),
        "thin": validation.positive_int(thin, "thin"),
        "num_chains": validation.positive_int(num_chains, "num_chains"),
        "batch_size": validation.positive_int(batch_size, "batch_size"),
        "seed": validation.seed_value(seed),
    }
    plate = validation.plate_name(data_plate)
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    if not callable(model):
        raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
    if data is not None:
        data = validation.as_data(data, "data")
        # fit's data checks (finite values, per-datapoint sites in the data plate, the
        # observed sites' supports), on the model alone
        validation.check_pair_data(
            model, None, data, "data", settings["batch_size"], get_batch, "sample", plate
        )
    n = num_items(data) if data is not None else 1
    settings["batch_size"] = min(settings["batch_size"], n)
    return data, settings


class _Sampling:
    """One run of :func:`sample`: the chains' loop, the kept samples, the checkpoints."""

    def __init__(
        self,
        model: Callable,
        data: Data | None,
        sampler: Any,
        settings: dict[str, Any],
        run_dir: str | os.PathLike | None,
        checkpoint_every: int,
        data_plate: str = "data",
    ):
        self.data, self.sampler, self.settings = data, sampler, settings
        self.n = num_items(data) if data is not None else 1
        self.model = scale_to_data(model, self.n, data_plate) if data is not None else model
        self.run_dir = str(run_dir) if run_dir is not None else None
        self.path = Path(run_dir) / CHECKPOINT if run_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.written = False  # whether this run has a checkpoint on disk
        self.num_samples, self.warmup = settings["num_samples"], settings["warmup"]
        self.thin, self.num_chains = settings["thin"], settings["num_chains"]
        self.steps = self.warmup + self.num_samples * self.thin
        self.samples: dict[str, torch.Tensor] = {}
        self.log_joint = torch.zeros(self.num_chains, self.num_samples, dtype=torch.float64)
        self.warmup_log_joint = torch.zeros(self.num_chains, self.warmup, dtype=torch.float64)
        self._interrupted: Callable[[], bool] = lambda: False

    def _chain_seed(self, chain: int) -> int:
        return (self.settings["seed"] * 1_000_003 + chain) % 2**32

    def _start_chain(self, chain: int, batches: _Batches) -> None:
        self.sampler.setup(
            self.model,
            batches(0),
            num_data=self.n,
            num_warmup=self.warmup,
            seed=self._chain_seed(chain),
        )
        if not self.samples:
            for name, value in self.sampler.values().items():
                shape = (self.num_chains, self.num_samples, *value.shape)
                self.samples[name] = torch.zeros(shape, dtype=value.dtype)

    def _resume(self) -> tuple[int, int]:
        assert self.path is not None
        state = load_checkpoint(self.path)
        if state.get("kind") != "sample":
            raise ValueError(f"{self.path} is a checkpoint of pvae.fit, not of pvae.sample")
        saved = state["settings"]
        differ = [
            f"{key} (checkpoint {saved.get(key)!r}, now {value!r})"
            for key, value in self.settings.items()
            if saved.get(key) != value
        ]
        if differ:
            raise ValueError(
                f"resume=True continues the run in {self.path.parent}, but these settings "
                f"differ from its checkpoint: {'; '.join(differ)}; resume with the same "
                "settings or start a new run in another run_dir"
            )
        chain, step = self._position(state)
        self.samples = dict(state["samples"])
        self.log_joint = state["log_joint"]
        self.warmup_log_joint = state["warmup_log_joint"]
        self.written = True
        if chain < self.num_chains and step > 0:  # mid-chain; at step 0 run() starts the chain
            batches = _Batches(self.data, self.settings["batch_size"], self.settings["seed"], chain)
            self._start_chain(chain, batches)
            self.sampler.load_state_dict(state["engine"])
        set_rng_state(state["rng"])
        return chain, step

    def _position(self, state: Mapping[str, Any]) -> tuple[int, int]:
        """The checkpoint's (chain, step), checked against this run, and its arrays' shapes
        (a damaged or edited checkpoint is refused, not half-loaded)."""
        chain, step = state.get("chain"), state.get("step")
        valid = (
            type(chain) is int
            and type(step) is int
            and 0 <= chain <= self.num_chains
            and 0 <= step < self.steps
            and (chain < self.num_chains or step == 0)
        )
        if not valid:
            raise ValueError(
                f"{self.path} is damaged: its position (chain {chain!r}, step {step!r}) is not "
                f"one of this run (chains 0-{self.num_chains - 1}, steps 0-{self.steps - 1}, or "
                f"chain {self.num_chains} step 0 when finished); start a new run"
            )
        expected = (self.num_chains, self.num_samples)
        arrays = {"log_joint": state.get("log_joint"), **dict(state.get("samples") or {})}
        bad = [
            name
            for name, value in arrays.items()
            if not isinstance(value, torch.Tensor) or tuple(value.shape[:2]) != expected
        ]
        warm = state.get("warmup_log_joint")
        if not isinstance(warm, torch.Tensor) or tuple(warm.shape) != (
            self.num_chains,
            self.warmup,
        ):
            bad.append("warmup_log_joint")
        if bad or not state.get("samples"):
            raise ValueError(
                f"{self.path} is damaged: {bad or ['samples']} are not arrays of "
                f"(chains, draws) = {expected}; start a new run"
            )
        for name, value in {**arrays, "warmup_log_joint": warm}.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"refusing to resume from {self.path}: its {name!r} holds NaN or infinite "
                    "values (a damaged checkpoint); start a new run"
                )
        if chain < self.num_chains and not isinstance(state.get("engine"), Mapping):
            raise ValueError(f"{self.path} is damaged: it holds no sampler state; start a new run")
        return int(chain), int(step)  # type: ignore[arg-type]  # checked above

    def _checkpoint(self, chain: int, step: int) -> None:
        if self.path is None:
            return
        mid_chain = chain < self.num_chains and step > 0  # else no chain's state is needed
        state = {
            "kind": "sample",
            "chain": chain,
            "step": step,
            "params": self.sampler.unconstrained() if mid_chain else {},
            "engine": self.sampler.state_dict() if mid_chain else {},
            "samples": self.samples,
            "log_joint": self.log_joint,
            "warmup_log_joint": self.warmup_log_joint,
            "rng": rng_state(),
            "settings": self.settings,
        }
        run_json = {"kind": "sample", "chain": chain, "step": step, "settings": self.settings}
        write_checkpoint(self.path, state, run_json)
        self.written = True

    def _interruption(self, chain: int, step: int) -> SamplingInterrupted:
        """What SIGINT raises once the checkpoint at ``(chain, step)`` is written."""
        where = f"chain {chain}, step {step} of {self.steps}"
        if self.path is None:
            message = f"sampling interrupted at {where}; nothing was saved (no run_dir)"
        else:
            message = (
                f"sampling interrupted at {where}; checkpoint in {self.path}: continue with "
                "resume=True"
            )
        return SamplingInterrupted(
            message, str(self.path) if self.path is not None else None, chain, step
        )

    def run(self, resume: bool, progress: bool) -> Posterior:
        chain, step = 0, 0
        if resume and self.path is not None and self.path.exists():
            chain, step = self._resume()
        else:
            pyro.set_rng_seed(self.settings["seed"])
        show = progress and sys.stderr.isatty()
        remaining = (self.num_chains - chain) * self.steps - step
        bar = tqdm(total=max(0, remaining), disable=not show, unit="step")
        validate = pyro.infer.util.is_validation_enabled()
        try:
            with _deferred_sigint() as interrupted:
                self._interrupted = interrupted
                while chain < self.num_chains:
                    batches = _Batches(
                        self.data, self.settings["batch_size"], self.settings["seed"], chain
                    )
                    if step == 0:
                        self._start_chain(chain, batches)
                    self._run_chain(chain, step, batches, bar, show, validate)
                    chain, step = chain + 1, 0
                    self._checkpoint(chain, step)  # between chains, and at the end
                    if chain < self.num_chains and interrupted():
                        raise self._interruption(chain, step)
        finally:
            bar.close()
        return Posterior(
            samples=self.samples,
            log_joint=self.log_joint,
            warmup_log_joint=self.warmup_log_joint,
            run_dir=self.run_dir,
            settings=self.settings,
        )

    def _run_chain(
        self, chain: int, start: int, batches: _Batches, bar: Any, show: bool, validate: bool
    ) -> None:
        sampler, model, warmup, thin = self.sampler, self.model, self.warmup, self.thin
        running: float | None = None
        for step in range(start, self.steps):
            # Pyro's argument checks on a chain's first step only (as fit does per epoch).
            try:
                with pyro.validation_enabled(step == start and validate):
                    record = sampler.train_step(model, None, *batches(step))
                log_joint = record.log_joint
                if log_joint is None or not math.isfinite(log_joint):
                    raise SamplingDiverged(
                        f"the log joint became {log_joint}; lower the sampler's lr"
                    )
            except SamplingDiverged as error:
                where = f" (the last checkpoint: {self.path})" if self.written else ""
                raise SamplingDiverged(f"chain {chain}, step {step}: {error}{where}") from error
            if step < warmup:
                self.warmup_log_joint[chain, step] = log_joint
            elif (step - warmup + 1) % thin == 0:
                k = (step - warmup) // thin
                self.log_joint[chain, k] = log_joint
                for name, value in sampler.values().items():
                    self.samples[name][chain, k] = value.cpu()
            if step + 1 < self.steps:  # the last step's checkpoint: run() writes it
                stop = self._interrupted()
                if stop or (step + 1) % self.checkpoint_every == 0:
                    self._checkpoint(chain, step + 1)
                if stop:
                    raise self._interruption(chain, step + 1)
            bar.update(1)
            if show:
                running = log_joint if running is None else 0.95 * running + 0.05 * log_joint
                bar.set_postfix(chain=chain, log_joint=f"{running:.3f}")
