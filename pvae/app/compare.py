"""``pvae compare``: variational bounds side by side on one dataset.

The same architecture is trained once per bound, with the same seed (so every bound starts
from the same weights and sees the same minibatches), the same data and the same budget:
every bound draws ``particles`` samples of z per datapoint and step (ELBO averages them, IWAE
uses all P in one log-mean-exp, MIWAE/PIWAE split them into M groups of K with M*K = P;
see :mod:`pvae.app.registry`). Each trained pair is then measured on the test set:

- ``log_likelihood``: log p(x) by importance sampling with K = ``ll_samples`` (5000 by
  default), the mean over test points and its standard error;
- ``delta_log_likelihood``: the paired difference to the first bound (same test points and
  same random numbers), with its standard error, far tighter than the two errors combined;
- ``elbo`` (the ELBO with 16 samples and the analytic KL), ``iwae_64`` (IWAE_64), and the
  ``inference_gap`` = log p(x) - ELBO (how far q is from the posterior, in nats);
- ``active_units``: latent dimensions with Var_x(E_q[z|x]) > 0.01 (Burda et al. 2016), summed
  over the latent layers, by :func:`pvae.app.runs.latent_activity` on the test points (the
  number ``pvae diagnose`` reports for the same run);
- ``snr_guide`` / ``snr_model``: the gradient signal-to-noise ratio of *that bound's own*
  estimator for the guide's and the model's parameters (Rainforth et al. 2018), the mean
  over parameter elements of ``|E g| / std g`` from ``snr_repeats`` gradients on a fixed batch of
  ``snr_points`` test points;
- ``seconds_per_epoch``: the mean time of an epoch's training steps (no validation);
  ``train_seconds`` (the whole training without the yardstick), ``eval_seconds`` (every
  number above), ``peak_memory_mb`` (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the
  process's peak resident set size, whole-process and cumulative);
- ``yardstick``: the common estimator (IWAE-64 by default) on the first 200 validation points,
  recorded after every epoch in each epoch record, so that learning curves of different bounds
  compare like with like (:func:`_yardstick_callback`: no gradients, a fixed seed in a forked
  RNG: training is unchanged);
- ``ll_vs_k``: log p(x) with K in :data:`LL_KS` up to ``ll_samples``, on the first 100 test
  points: where the estimate converges.

With several ``seeds`` every bound is trained once per seed (folders ``iwae/seed-1``; one seed
keeps ``iwae/``) and :func:`summarize` gives per bound the mean ± sd over seeds of every number
and of the per-seed paired Δ to the reference bound, flagging a difference *within seed noise*
when ``|mean Δ| < 2 sd`` of the per-seed Δ.

:func:`compare` writes into ``run_dir`` (every file atomically): ``results.md`` (the table,
the command and the configuration), ``results.json``, ``results.csv``, ``learning_curves.png``
(the yardstick for every bound on one axis, and each bound's own train/valid bound per epoch),
``log_likelihood.png`` (with error bars), ``snr.png`` (log scale), ``ll_vs_k.png``,
``results.json``'s ``environment`` (git commit, versions, CPU/GPU, threads), ``config.json``
(the :class:`pvae.app.runs.RunConfig` that ``pvae diagnose`` rebuilds the data and models
from), and one folder per bound (per bound and seed) with ``pvae.fit``'s checkpoint and
``run.json``.

Speed: Pyro's per-call argument checks cost about half of an importance-weighted step on
MNIST (every log-prob of every particle is validated), so training and evaluation run with
Pyro's validation switched off. The data are checked against the likelihood's support once,
up front, and ``pvae.fit`` still stops on a non-finite bound.

Budget: the defaults (5 bounds, 64 particles, MNIST-5k, a 784-200-200-50 ReLU MLP VAE, 10 epochs
of batches of 20, log p(x) with K = 5000 on the 500 test points) are sized to finish within
about 10 minutes on 2 CPU cores: measured 8.6 minutes with ``--threads 1`` on a 2-core machine
shared with other jobs (6.8 minutes of CPU), before the yardstick (0.23 s per bound and
epoch on MNIST-5k, about 12 s in all) and log p(x) against K (about 2 s per bound) were
added. On a busy machine use ``--threads 1``: two threads
competing for busy cores spin-wait and ran 2 to 4 times slower than one;
``quick=True`` trains a smaller net for 2 epochs on a subset with K = 100, in well under a
minute. Explicit arguments always win over either set of defaults.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.nn import PyroModule
from tqdm.auto import tqdm

import pvae
from pvae import atomic, data, plots
from pvae.app import runs
from pvae.app.registry import MODELS, BoundSpec, parse_bound
from pvae.diagnostics import gradient_snr
from pvae.evaluate import as_tensors, num_items
from pvae.inference import ELBO, IWAE
from pvae.train import Run, TrainingDiverged

__all__ = [
    "DEFAULT_BOUNDS",
    "LL_KS",
    "DEFAULTS",
    "QUICK",
    "bound_folder",
    "check_support",
    "compare",
    "format_table",
    "resolve_bounds",
    "environment",
    "format_seed_table",
    "parse_yardstick",
    "resolve_device",
    "settings",
    "summarize",
]

DEFAULT_BOUNDS = ("elbo", "iwae", "miwae", "ciwae", "piwae")
OUTPUTS = (
    "results.md",
    "results.json",
    "results.csv",
    "learning_curves.png",
    "log_likelihood.png",
    "snr.png",
    "ll_vs_k.png",
)
"""The files :func:`compare` writes into its run folder (besides one folder per bound)."""

# The budget knobs, without and with --quick (explicit arguments win over both).
DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "z_dim": 50,
    "hidden": (200, 200),
    "ll_samples": 5000,
    "snr_repeats": 20,
    "max_train": None,  # datapoints kept of each split (None: all)
    "max_eval": None,
}
QUICK: dict[str, Any] = {
    "epochs": 2,
    "z_dim": 10,
    "hidden": (64,),
    "ll_samples": 100,
    "snr_repeats": 5,
    "max_train": 500,
    "max_eval": 100,
}

# --quick on sequence data: a sequence holds T frames, so fewer rows keep the run as short.
QUICK_SEQUENCES: dict[str, Any] = {"max_train": 32, "max_eval": 16}

ELBO_SAMPLES = 16  # particles of the test ELBO (analytic KL: only the likelihood term varies)
IWAE_SAMPLES = 64  # the IWAE-64 column
SNR_POINTS = 100  # test points of the fixed SNR batch
EVAL_BATCH = 100  # test points per call of the test ELBO and IWAE-64
# log p(x): 100 test points x 100 particles per vectorised run. Larger runs are no faster on
# a CPU: past ~32 MB per activation tensor every chunk is a fresh mmap and page faults.
LL_BATCH = 100
LL_CHUNK = 100
LL_KS = (1, 10, 100, 1000, 5000)  # log p(x) against K: these K up to ll_samples
LL_K_POINTS = 100  # ... on the first 100 test points
YARDSTICK = "iwae:64"  # the common estimator evaluated after every epoch
YARDSTICK_POINTS = 200  # ... on the first 200 validation points
CPU = torch.device("cpu")
WITHIN_NOISE = 2.0  # a mean Δ within this many sd of the per-seed Δ is "within seed noise"

ProgressFn = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def settings(quick: bool = False, **given: Any) -> dict[str, Any]:
    """The budget knobs of :data:`DEFAULTS` (or :data:`QUICK`), overridden by the ``given``
    values that are not None."""
    resolved = dict(QUICK if quick else DEFAULTS)
    unknown = set(given) - set(resolved)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}; known: {sorted(resolved)}")
    resolved.update({key: value for key, value in given.items() if value is not None})
    return resolved


def resolve_bounds(
    bounds: Sequence[str | BoundSpec], particles: int, inner: int | None = None
) -> list[BoundSpec]:
    """Parse and resolve each bound for a budget of ``particles`` samples per datapoint.

    :raises ValueError: for an unknown bound (naming the valid choices), M*K not equal to
        ``particles`` (naming both), or a bound given twice.
    """
    if particles < 1:
        raise ValueError(f"particles must be >= 1, got {particles}")
    if not bounds:
        raise ValueError("no bounds to compare")
    specs: list[BoundSpec] = []
    for bound in bounds:
        spec = bound if isinstance(bound, BoundSpec) else parse_bound(bound)
        spec = spec.resolve(particles, inner)
        spec.build(particles)  # the engine's own checks, before any training
        if spec.label in [s.label for s in specs]:
            raise ValueError(f"bound {spec.label!r} is given twice")
        specs.append(spec)
    return specs


def check_support(model: PyroModule, ds: data.Splits) -> None:
    """Every split must lie in the support of ``model.likelihood`` (checked once, up front,
    without touching the global RNG).

    :raises ValueError: naming the split and the likelihood's support.
    """
    likelihood = getattr(model, "likelihood", None)
    if likelihood is None or not hasattr(likelihood, "check_support"):
        return
    for split in ("train", "valid", "test"):
        with torch.random.fork_rng(devices=[]):  # a dynamically binarised set draws pixels
            x = as_tensors(getattr(ds, split))[-1]  # a conditional model's y comes last
        if isinstance(ds, data.SequenceSplits):  # (values, times, mask): the observed frames
            values, _, mask = getattr(ds, split)[:3]
            x = values[mask].reshape(-1, ds.x_dim)
        likelihood.check_support(x, name=f"{ds.name} {split}")


def check_pairs(
    model: PyroModule, ds: data.Splits, specs: Sequence[BoundSpec], particles: int, batch_size: int
) -> None:
    """``pvae.fit``'s checks (:func:`pvae.check_fit`) of ``model`` with every bound's engine
    on ``ds``, before anything is trained or written: a model that cannot read the dataset's
    batches, or a bound whose engine does not apply to the model, is refused up front.

    :raises ValueError, TypeError: naming the bound.
    """
    for spec in specs:
        try:
            pvae.check_fit(
                model.model, model.guide, ds.train, spec.build(particles), batch_size, ds.valid
            )
        except TypeError as error:
            raise TypeError(f"bound {spec.label!r}: {error}") from error
        except (ValueError, NotImplementedError) as error:
            raise ValueError(f"bound {spec.label!r}: {error}") from error


def describe(spec: BoundSpec, particles: int) -> str:
    """What a resolved bound trains, in words, e.g. ``MIWAE(M=8, K=8)`` (the engine's
    registration says it)."""
    return spec.describe(particles)


def bound_folder(spec: BoundSpec, seed: int | None = None) -> str:
    """The subfolder of a compare run that holds one bound's checkpoint: ``miwae_8x8``, or
    ``miwae_8x8/seed-1`` for one seed of a run with several (``seed`` given)."""
    folder = spec.label.replace(":", "_")
    return folder if seed is None else f"{folder}/seed-{seed}"


def parse_yardstick(text: str | None) -> tuple[str, int] | None:
    """``"iwae:64"`` -> ``("iwae", 64)``, ``"elbo:16"`` -> ``("elbo", 16)``; ``None`` or
    ``"none"`` -> None (no yardstick).

    :raises ValueError: for anything else, naming the expected form.
    """
    if text is None or text == "none":
        return None
    match = re.fullmatch(r"(iwae|elbo):([1-9][0-9]*)", str(text))
    if match is None:
        raise ValueError(
            f"yardstick must be iwae:K or elbo:K with K >= 1 (e.g. iwae:64), or none; got {text!r}"
        )
    return match.group(1), int(match.group(2))


def resolve_device(name: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"`` (``"cuda:1"``) or ``"mps"`` as a :class:`torch.device`, checked.

    :raises ValueError: for another name, or a device this torch cannot use (no CUDA build,
        no GPU, no Apple MPS), saying which.
    """
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device must be cpu, cuda or mps, got {name!r}") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no GPU"
            raise ValueError(f"device {name!r}: CUDA is not available ({why}); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r}: Apple MPS is not available here; use cpu")
    elif device.type != "cpu":
        raise ValueError(f"device must be cpu, cuda or mps, got {name!r}")
    return device


def _fork_rng(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Fork the random generators that sampling on ``device`` draws from (the CPU's, and the
    device's own), so that what runs inside leaves the training RNG untouched."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index], device_type="cuda")
    return torch.random.fork_rng(device_type=device.type)


def _on_device(values: Any, device: torch.device) -> Any:
    """Tensors, tuples of them, sequence splits and dynamically binarised sets on ``device``."""
    if values is None:
        return None
    if isinstance(values, data.SequenceSplit):
        return data.SequenceSplit(*(item.to(device) for item in values))
    if isinstance(values, tuple):
        return tuple(_on_device(item, device) for item in values)
    if isinstance(values, data.DynamicBinarized):
        return data.DynamicBinarized(values.probs.to(device))
    if isinstance(values, torch.Tensor):
        return values.to(device)
    return values


def _dataset_on(ds: data.Splits, device: torch.device) -> data.Splits:
    if device.type == "cpu":
        return ds
    splits = {name: _on_device(getattr(ds, name), device) for name in ("train", "valid", "test")}
    return dataclasses.replace(ds, **splits)


def _memory_start(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mb(device: torch.device) -> float:
    """CUDA: the largest memory torch allocated on the device since :func:`_memory_start`;
    otherwise the process's peak resident set size so far (whole process, never decreasing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # not on Windows
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes / KiB


def _memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during the bound's training and evaluation"
    return (
        "the process's peak resident set size so far (ru_maxrss: whole process, cumulative, "
        "so it never decreases from one bound to the next)"
    )


def _git_commit() -> str | None:
    """``git rev-parse HEAD`` of the repository holding the working directory, or None."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
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
    """Where a comparison ran: the git commit of the working directory's checkout (None
    outside one), library versions, the platform, CPU model, GPU name (if any), torch's
    threads and ``device``."""
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device) if str(device) != "cpu" else 0)
    return {
        "git_commit": _git_commit(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pyro": pyro.__version__,
            "gpytorch": _version("gpytorch"),
            "numpy": _version("numpy"),
            "pvae": pvae.__version__,
        },
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }


# ---------------------------------------------------------------------------------------------
# One bound
# ---------------------------------------------------------------------------------------------


def _yardstick_callback(
    model: PyroModule,
    valid: Any,
    yardstick: tuple[str, int],
    seed: int,
    device: torch.device,
    spent: list[float],
) -> Callable[[Run, dict[str, Any]], None]:
    """An epoch callback that records ``record["yardstick"]``: the common estimator (IWAE-K or
    ELBO-K) on ``valid``, without gradients, with the fixed ``seed`` inside a forked RNG (the
    training's random numbers are untouched), the model in eval mode; the seconds it took are
    added to ``spent[0]``."""
    name, samples = yardstick
    engine = IWAE(samples) if name == "iwae" else ELBO(samples)

    def callback(run: Run, record: dict[str, Any]) -> None:
        started = time.perf_counter()
        training = model.training
        model.eval()
        try:
            with _fork_rng(device), torch.no_grad():
                torch.manual_seed(seed)
                record["yardstick"] = float(
                    pvae.evaluate_bound(model.model, model.guide, valid, engine, EVAL_BATCH)
                )
        finally:
            model.train(training)
        spent[0] += time.perf_counter() - started

    return callback


def _train_one(
    spec: BoundSpec,
    build_model: Callable[[], PyroModule],
    ds: data.Splits,
    config: Mapping[str, Any],
    run_dir: Path | None,
    progress: bool,
    say: ProgressFn | None,
    loggers: Sequence[Any] = (),
    folder: str | None = None,
    device: torch.device = CPU,
) -> tuple[PyroModule, Run, float]:
    """Train one bound with ``config["seed"]``; returns the model, its run and the seconds
    the yardstick took (not training)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(config["seed"])  # the same initial weights for every bound
    model = build_model()
    if device.type != "cpu":
        model.to(device)
    entry = MODELS[config["model"]]
    extra = entry.callbacks(model, ds) if entry.callbacks is not None else []
    engine = spec.build(config["particles"])
    epochs = config["epochs"]
    tag = spec.label if len(config.get("seeds", ())) <= 1 else f"{spec.label} seed {config['seed']}"
    spent = [0.0]
    yardstick = parse_yardstick(config.get("yardstick"))
    if yardstick is not None and ds.valid is not None:
        points = config.get("yardstick_points", YARDSTICK_POINTS)
        with _fork_rng(device):  # a dynamically binarised set draws its pixels once, here
            torch.manual_seed(config["seed"])
            valid = tuple(t[:points] for t in as_tensors(ds.valid))
        extra = [
            *extra,
            _yardstick_callback(model, valid, yardstick, config["seed"], device, spent),
        ]
    label = str(config.get("yardstick") or "").upper().replace(":", "-")

    def report(run: Run, record: dict[str, Any]) -> None:
        if say is None:
            return
        valid = record.get("valid_bound")
        valid_text = f", valid {valid:.3f}" if valid is not None else ""
        common = record.get("yardstick")
        common_text = f", {label} {common:.3f}" if common is not None else ""
        say(
            f"[{tag}] epoch {record['epoch'] + 1}/{epochs}: train "
            f"{record['train_bound']:.3f}{valid_text}{common_text} nats ({record['seconds']:.1f} s)"
        )

    run = pvae.fit(
        model.model,
        model.guide,
        ds.train,
        engine=engine,
        epochs=epochs,
        batch_size=config["batch_size"],
        lr=config["lr"],
        valid=ds.valid,
        seed=config["seed"],
        run_dir=run_dir / (folder or bound_folder(spec)) if run_dir is not None else None,
        progress=progress,
        callbacks=[*extra, report, *(logger.epoch for logger in loggers)],
        step_callbacks=[logger.step for logger in loggers],
    )
    return model, run, spent[0]


def _stderr(values: torch.Tensor) -> float:
    n = values.numel()
    return float(values.double().std() / math.sqrt(n)) if n > 1 else math.nan


def _evaluate(
    spec: BoundSpec,
    model: PyroModule,
    run: Run,
    ds: data.Splits,
    config: Mapping[str, Any],
    progress: bool,
    device: torch.device = CPU,
) -> tuple[dict[str, Any], torch.Tensor]:
    """The table's numbers for one trained pair, and its per-point log-likelihoods (the
    model in eval mode), with the model's own metrics (its registration's ``metrics``) and
    log p(x) against K (:func:`_ll_vs_k`)."""
    seed, test = config["seed"], ds.test
    entry = MODELS[config["model"]]
    model.eval()
    with _fork_rng(device):
        torch.manual_seed(seed)  # the same random numbers for every bound
        ll = pvae.log_likelihood(
            model.model,
            model.guide,
            test,
            num_samples=config["ll_samples"],
            batch_size=LL_BATCH,
            chunk_size=LL_CHUNK,
            progress=progress,
        )
        torch.manual_seed(seed)
        batch = EVAL_BATCH
        elbo = pvae.evaluate_bound(model.model, model.guide, test, ELBO(ELBO_SAMPLES), batch)
        iwae = pvae.evaluate_bound(model.model, model.guide, test, IWAE(IWAE_SAMPLES), batch)
        units = runs.count_active(runs.latent_activity(model, test, seed, channels=entry.channels))
        torch.manual_seed(seed)
        extra = entry.metrics(model, ds, "test", seed) if entry.metrics is not None else {}
        torch.manual_seed(seed)
        snr_batch = tuple(t[: config["snr_points"]] for t in as_tensors(test))
        snr = gradient_snr(
            model.model,
            model.guide,
            snr_batch,
            spec.build(config["particles"]),
            num_repeats=config["snr_repeats"],
        )
        curve = _ll_vs_k(model, test, config, ll, seed)
    seconds = [float(record["seconds"]) for record in run.history]
    last = run.history[-1] if run.history else {}
    mean = float(ll.mean())
    return {
        "log_likelihood": mean,
        "log_likelihood_stderr": _stderr(ll),
        "elbo": float(elbo),
        "iwae_64": float(iwae),
        "inference_gap": mean - float(elbo),
        "active_units": units[0],
        "latent_dims": units[1],
        "snr_guide": snr.guide,
        "snr_model": snr.model,
        "seconds_per_epoch": sum(seconds) / len(seconds) if seconds else math.nan,
        "train_bound": last.get("train_bound"),
        "valid_bound": last.get("valid_bound"),
        "yardstick": last.get("yardstick"),
        "ll_vs_k": curve,
        **extra,
    }, ll


def ll_ks(ll_samples: int) -> list[int]:
    """The K of the log p(x)-against-K curve: :data:`LL_KS` up to ``ll_samples``, and
    ``ll_samples`` itself (the table's estimate)."""
    return sorted({k for k in LL_KS if k < ll_samples} | {ll_samples})


def _ll_vs_k(
    model: PyroModule, test: Any, config: Mapping[str, Any], ll: torch.Tensor, seed: int
) -> dict[str, float]:
    """log p(x) by importance sampling with each K of :func:`ll_ks`, the mean over the first
    :data:`LL_K_POINTS` test points, ``{str(K): nats}``. The largest K reuses the table's
    per-point estimates ``ll`` (the same estimator on the same points); every other K is
    drawn with the fixed ``seed``."""
    points = min(config.get("ll_k_points", LL_K_POINTS), ll.shape[0])
    subset = tuple(t[:points] for t in as_tensors(test))
    if isinstance(test, data.SequenceSplit):
        subset = data.SequenceSplit(*subset)
    largest = config["ll_samples"]
    curve: dict[str, float] = {}
    for k in ll_ks(largest):
        if k == largest:
            curve[str(k)] = float(ll[:points].double().mean())
            continue
        torch.manual_seed(seed)
        values = pvae.log_likelihood(
            model.model,
            model.guide,
            subset if len(subset) > 1 else subset[0],
            num_samples=k,
            batch_size=LL_BATCH,
            chunk_size=min(k, LL_CHUNK),
            progress=False,
        )
        curve[str(k)] = float(values.double().mean())
    return curve


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------

_NUMBERS = (
    "log_likelihood",
    "log_likelihood_stderr",
    "delta_log_likelihood",
    "delta_stderr",
    "elbo",
    "iwae_64",
    "inference_gap",
    "active_units",
    "latent_dims",
    "snr_guide",
    "snr_model",
    "seconds_per_epoch",
    "train_bound",
    "valid_bound",
    "yardstick",
    "train_seconds",
    "yardstick_seconds",
    "eval_seconds",
    "peak_memory_mb",
)


def compare(
    dataset: str | data.Splits = "mnist5k",
    bounds: Sequence[str | BoundSpec] = DEFAULT_BOUNDS,
    particles: int = 64,
    epochs: int | None = None,
    model: str = "vae",
    model_options: Mapping[str, Any] | None = None,
    z_dim: int | None = None,
    hidden: Sequence[int] | None = None,
    net: str = "mlp",
    likelihood: str | None = None,
    batch_size: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
    ll_samples: int | None = None,
    snr_repeats: int | None = None,
    snr_points: int = SNR_POINTS,
    inner: int | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    quick: bool = False,
    progress: bool = True,
    argv: Sequence[str] | None = None,
    binarize: str | None = None,
    data_path: str | None = None,
    loggers: Callable[[str, Mapping[str, Any]], Sequence[Any]] | None = None,
    seeds: Sequence[int] | None = None,
    yardstick: str | None = YARDSTICK,
    yardstick_points: int = YARDSTICK_POINTS,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """Train ``model`` once per bound with the same seed, data and budget, and measure each.

    :param dataset: a name from ``pvae datasets`` (loaded with ``seed``) or loaded
        :class:`pvae.data.Splits`.
    :param bounds: bound specifications (``"iwae"``, ``"miwae:8x8"``, ``"ciwae:0.5"``,
        ``"iwae-dreg"``; see :func:`pvae.app.registry.bound_grammar`) or :class:`BoundSpec`.
    :param particles: samples of z per datapoint per step, the same for every bound.
    :param inner: K for miwae/piwae given without MxK (default: sqrt(particles)).
    :param epochs, z_dim, hidden, ll_samples, snr_repeats: None takes :data:`DEFAULTS`, or
        :data:`QUICK` when ``quick`` (which also keeps 500 training and 100 valid/test points).
    :param model, model_options, net, likelihood: the model from
        :data:`pvae.app.registry.MODELS` and its own options (None: its defaults; likelihood
        None: the dataset's).
    :param binarize, data_path: passed to :func:`pvae.data.load` with a dataset name.
    :param batch_size, lr: minibatch size and Adam's learning rate. Burda et al. trained with
        batches of 20 at lr 1e-3. At the same cost per epoch, small batches reach a far better
        model in a short budget (MNIST-5k, 5 epochs, 64 particles: valid ELBO -145 nats with
        batches of 25, -189 with batches of 100).
    :param run_dir: where the results, plots and per-bound checkpoints are written (None:
        nothing is written).
    :param progress: progress bars (on a terminal) and one line per epoch and per bound.
    :param argv: the command line to record in ``results.md`` (default: the ``pvae compare``
        command equivalent to these arguments).
    :param loggers: experiment tracking: ``loggers(label, params)`` returns the
        :class:`pvae.tracking.Logger` objects of one bound (e.g.
        :func:`pvae.tracking.children`), which see its steps and epochs, get its numbers as
        metrics and are closed after it (``FAILED`` when it diverged).
    :param seeds: train every bound once per seed (``seed`` is ignored; the data are loaded
        and subset with the first seed, so every run sees the same test points): one run
        folder per (bound, seed), ``iwae/seed-1``; :func:`summarize` gives mean ± sd over
        seeds and the paired Δ per seed. None: ``[seed]``, one folder per bound (``iwae/``).
    :param yardstick: the estimator every bound's model is evaluated with on the first
        ``yardstick_points`` validation points after every epoch (``"iwae:64"``,
        ``"elbo:16"``; None or ``"none"``: no yardstick), recorded as ``"yardstick"`` in each
        epoch record: the learning curves compare like with like.
    :param device: ``"cpu"``, ``"cuda"`` or ``"mps"``: the model and the data are moved there
        up front (:func:`resolve_device` raises when it is not available).
    :returns: one dict per (bound, seed), bounds in order and seeds within each:
        ``bound`` (its resolved label), ``seed``, ``folder`` (its run folder), ``engine``,
        ``status`` ("ok", or why it failed: its numbers are then NaN), the numbers listed in
        this module's docstring, ``ll_vs_k``, ``train_seconds``, ``eval_seconds``,
        ``peak_memory_mb``, plus ``history`` (the per-epoch records of ``pvae.fit``).

    :raises ValueError: for bad bounds, M*K not equal to ``particles``, or data outside the
        likelihood's support, before anything is trained.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    target = resolve_device(device)
    seed_list = [int(item) for item in seeds] if seeds is not None else [int(seed)]
    if not seed_list or len(set(seed_list)) != len(seed_list) or min(seed_list) < 0:
        raise ValueError(f"seeds must be distinct non-negative integers, got {seed_list}")
    seed = seed_list[0]
    parse_yardstick(yardstick)
    yardstick = None if yardstick == "none" else yardstick
    if yardstick_points < 1:
        raise ValueError(f"yardstick_points must be >= 1, got {yardstick_points}")
    knobs = settings(
        quick,
        epochs=epochs,
        z_dim=z_dim,
        hidden=tuple(hidden) if hidden is not None else None,
        ll_samples=ll_samples,
        snr_repeats=snr_repeats,
    )
    specs = resolve_bounds(bounds, particles, inner)
    for name, value in (("batch_size", batch_size), ("snr_points", snr_points)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if knobs["snr_repeats"] < 2:
        raise ValueError(f"snr_repeats must be >= 2, got {knobs['snr_repeats']}")
    entry = MODELS[model]
    options = entry.resolve_options(model_options)
    if isinstance(dataset, str):
        loader: dict[str, Any] = {"seed": seed}
        if binarize is not None:
            loader["binarize"] = runs.BINARIZE.get(binarize, binarize)
        if data_path is not None:
            loader["path"] = data_path
        ds = data.load(dataset, **loader)
    else:
        ds = dataset
    if quick and isinstance(ds, data.SequenceSplits):
        knobs.update(QUICK_SEQUENCES)
    ds = entry.dataset_for(runs.subset(ds, knobs["max_train"], knobs["max_eval"]), options)
    likelihood = likelihood or ds.likelihood

    def build_model() -> PyroModule:
        return entry.build(ds, knobs["z_dim"], knobs["hidden"], net, likelihood, options)

    pyro.clear_param_store()
    probe = build_model()
    check_support(probe, ds)
    check_pairs(probe, ds, specs, particles, batch_size)
    del probe
    config: dict[str, Any] = {
        "dataset": ds.name,
        "bounds": [spec.label for spec in specs],
        "particles": particles,
        "inner": inner,
        "model": model,
        "model_options": options,
        "z_dim": knobs["z_dim"],
        "hidden": list(knobs["hidden"]),
        "net": net,
        "likelihood": likelihood,
        "epochs": knobs["epochs"],
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "seeds": seed_list,
        "yardstick": yardstick,
        "yardstick_points": yardstick_points,
        "device": str(target),
        "ll_samples": knobs["ll_samples"],
        "ll_ks": ll_ks(knobs["ll_samples"]),
        "ll_k_points": LL_K_POINTS,
        "snr_repeats": knobs["snr_repeats"],
        "snr_points": snr_points,
        "quick": quick,
        "num_train": num_items(ds.train),
        "num_valid": num_items(ds.valid),
        "num_test": num_items(ds.test),
    }
    if isinstance(ds, data.SequenceSplits):
        config["unit"] = "sequence"  # log p(x) per sequence
    run_config = runs.RunConfig(
        command="compare",
        dataset=ds.name,
        seed=seed,
        binarize=binarize,
        data_path=data_path,
        max_train=knobs["max_train"],
        max_eval=knobs["max_eval"],
        model=model,
        model_options=options,
        z_dim=knobs["z_dim"],
        hidden=tuple(knobs["hidden"]),
        net=net,
        likelihood=likelihood,
        bounds=config["bounds"],
        particles=particles,
        inner=inner,
        epochs=knobs["epochs"],
        batch_size=batch_size,
        lr=lr,
        ll_samples=knobs["ll_samples"],
        quick=quick,
    )
    command = list(argv) if argv is not None else _command(config)
    out = Path(run_dir) if run_dir is not None else None
    if out is not None:
        runs.write_config(out, run_config, ds, argv=command)
    say: ProgressFn | None = (lambda line: tqdm.write(line, file=sys.stdout)) if progress else None
    bar_on = progress and sys.stderr.isatty()

    results: list[dict[str, Any]] = []
    per_point: dict[tuple[str, int], torch.Tensor] = {}
    trained_runs: dict[str, list[Run]] = {}
    several = len(seed_list) > 1
    on_device = _dataset_on(ds, target)
    scope = torch.device(target) if target.type != "cpu" else contextlib.nullcontext()
    bar = tqdm(
        [(spec, s) for spec in specs for s in seed_list],
        desc="runs",
        unit="run",
        disable=not bar_on,
    )
    with pyro.validation_enabled(False), scope:
        for spec, run_seed in bar:
            bar.set_postfix(bound=spec.label, seed=run_seed)
            folder = bound_folder(spec, run_seed if several else None)
            result: dict[str, Any] = {
                "bound": spec.label,
                "seed": run_seed,
                "folder": folder,
                "engine": spec.describe(particles),
                "status": "ok",
            }
            if several:
                result["run"] = folder
            seed_config = {**config, "seed": run_seed}
            name = f"{spec.label}/seed-{run_seed}" if several else spec.label
            logged = loggers(name, {**seed_config, "bound": spec.label}) if loggers else []
            _memory_start(target)
            try:
                began = time.perf_counter()
                trained, run, spent = _train_one(
                    spec, build_model, on_device, seed_config, out, bar_on, say, logged,
                    folder, target,
                )  # fmt: skip
                train_seconds = time.perf_counter() - began - spent
                began = time.perf_counter()
                numbers, ll = _evaluate(spec, trained, run, on_device, seed_config, bar_on, target)
                eval_seconds = time.perf_counter() - began
            except TrainingDiverged as error:
                result["status"] = f"diverged: {error}"
                result.update({key: math.nan for key in _NUMBERS})
                result["history"] = []
            else:
                result.update(numbers)
                result.update(
                    train_seconds=train_seconds,
                    yardstick_seconds=spent,
                    eval_seconds=eval_seconds,
                    peak_memory_mb=_peak_memory_mb(target),
                )
                result["history"] = run.history
                trained_runs.setdefault(spec.label, []).append(run)
                per_point[spec.label, run_seed] = ll.cpu()
            results.append(result)
            for logger in logged:
                logger.log_metrics({k: v for k, v in result.items() if k in _NUMBERS})
                logger.close(failed=result["status"] != "ok")
            if say is not None:
                say(_summary_line(result, knobs["ll_samples"], several))
    bar.close()
    _add_deltas(results, per_point)
    elapsed = time.perf_counter() - started
    if out is not None:
        write_outputs(
            out,
            results,
            trained_runs,
            config,
            command,
            elapsed=elapsed,
            cpu_seconds=time.process_time() - cpu_started,
        )
    return results


def _add_deltas(
    results: list[dict[str, Any]], per_point: Mapping[tuple[str, int], torch.Tensor]
) -> None:
    """Paired differences of log p(x) to the first bound that trained, seed by seed (the
    same test points and random numbers)."""
    reference: str | None = next(
        (r["bound"] for r in results if (r["bound"], r["seed"]) in per_point), None
    )
    for result in results:
        result["reference"] = reference
        key: tuple[str, int] = (result["bound"], result["seed"])
        paired: tuple[str, int] = (str(reference), result["seed"])
        if reference is None or key not in per_point or paired not in per_point:
            result["delta_log_likelihood"] = result["delta_stderr"] = math.nan
            continue
        diff = (per_point[key] - per_point[paired]).double()
        result["delta_log_likelihood"] = float(diff.mean())
        result["delta_stderr"] = _stderr(diff) if result["bound"] != reference else 0.0


def _summary_line(result: Mapping[str, Any], ll_samples: int, several: bool = False) -> str:
    tag = f"{result['bound']} seed {result['seed']}" if several else result["bound"]
    if result["status"] != "ok":
        return f"[{tag}] {result['status']}"
    return (
        f"[{tag}] test log p(x) {result['log_likelihood']:.2f} +- "
        f"{result['log_likelihood_stderr']:.2f} (K={ll_samples}), ELBO {result['elbo']:.2f}, "
        f"gap {result['inference_gap']:.2f}, active units {result['active_units']}/"
        f"{result['latent_dims']}, SNR guide {result['snr_guide']:.3g} model "
        f"{result['snr_model']:.3g}, {result['seconds_per_epoch']:.1f} s/epoch"
        + "".join(f", {name} {_metric(result.get(name))}" for name in extra_metrics([result]))
    )


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def _command(config: Mapping[str, Any]) -> list[str]:
    """The ``pvae compare`` command line equivalent to ``config``."""
    argv = ["pvae", "compare", "--dataset", str(config["dataset"])]
    argv += ["--bounds", ",".join(config["bounds"]), "--particles", str(config["particles"])]
    for key in ("epochs", "model", "z_dim", "net", "likelihood", "batch_size", "lr", "seed"):
        argv += [f"--{key.replace('_', '-')}", str(config[key])]
    argv += ["--hidden", ",".join(str(width) for width in config["hidden"])]
    argv += ["--ll-samples", str(config["ll_samples"])]
    argv += ["--snr-repeats", str(config["snr_repeats"])]
    entry = MODELS[config["model"]]
    for option in entry.options:
        value = config.get("model_options", {}).get(option.name)
        if value is not None:
            argv += [entry.flag(option), str(value)]
    if config.get("inner") is not None:
        argv += ["--inner", str(config["inner"])]
    if len(config.get("seeds") or ()) > 1:
        argv += ["--seeds", ",".join(str(seed) for seed in config["seeds"])]
    argv += ["--yardstick", str(config.get("yardstick") or "none")]
    if config.get("device", "cpu") != "cpu":
        argv += ["--device", str(config["device"])]
    if config.get("quick"):
        argv.append("--quick")
    return argv


def _number(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _metric(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a"
    return str(value) if isinstance(value, int) else _snr(value)


def _snr(value: Any) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3g}"


_KNOWN = {"bound", "engine", "status", "history", "reference", "seed", "folder", "run", "ll_vs_k"}
_KNOWN |= set(_NUMBERS)


def extra_metrics(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """The names of the model's own metrics (its registration's ``metrics``) in ``results``,
    in order of first appearance: the table's and the CSV's last columns."""
    names: list[str] = []
    for result in results:
        names += [key for key in result if key not in _KNOWN and key not in names]
    return names


def format_table(
    results: Sequence[Mapping[str, Any]], ll_samples: int | None = None, unit: str | None = None
) -> str:
    """The results as a markdown table (one row per bound); ``unit``: what one datapoint is
    (``"sequence"``: log p(x) is per sequence). The model's own metrics come last."""
    reference = next((r.get("reference") for r in results if r.get("reference")), None)
    extras = extra_metrics(results)
    k = f" (K={ll_samples})" if ll_samples else ""
    per = f" per {unit}" if unit else ""
    header = [
        "bound",
        "trains",
        f"test log p(x){per}{k}",
        f"Δ vs {reference}" if reference else "Δ",
        "ELBO",
        "IWAE-64",
        "gap",
        "active units",
        "SNR guide",
        "SNR model",
        "s/epoch",
        "train s",
        "eval s",
        "peak MB",
        *extras,
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in results:
        if r["status"] != "ok":
            cells = [r.get("run") or r["bound"], r["engine"], r["status"].split(":")[0]]
            cells += ["n/a"] * (len(header) - 3)
        else:
            cells = [
                r.get("run") or r["bound"],
                r["engine"],
                f"{_number(r['log_likelihood'])} ± {_number(r['log_likelihood_stderr'])}",
                "reference"
                if r["bound"] == r.get("reference")
                else f"{r['delta_log_likelihood']:+.2f} ± {_number(r['delta_stderr'])}",
                _number(r["elbo"]),
                _number(r["iwae_64"]),
                _number(r["inference_gap"]),
                f"{r['active_units']}/{r['latent_dims']}",
                _snr(r["snr_guide"]),
                _snr(r["snr_model"]),
                _number(r["seconds_per_epoch"], 1),
                _number(r.get("train_seconds"), 1),
                _number(r.get("eval_seconds"), 1),
                _number(r.get("peak_memory_mb"), 0),
                *[_metric(r.get(name)) for name in extras],
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_sd(values: Sequence[Any]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for one value) of the finite values."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not kept:
        return math.nan, math.nan
    mean = sum(kept) / len(kept)
    if len(kept) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in kept) / (len(kept) - 1))


def summarize(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per bound from :func:`compare`'s rows (one per bound and seed): every number
    as its mean over the seeds that trained (``key``) and their sample standard deviation
    (``key_sd``); ``delta_log_likelihood`` is the mean of the per-seed paired Δ to the
    reference bound and ``delta_sd`` their sd; ``within_seed_noise`` is True when
    ``|mean Δ|`` < :data:`WITHIN_NOISE` x ``delta_sd`` (None for the reference, or with fewer
    than two seeds); ``ll_vs_k`` holds the mean over seeds at each K; ``seeds`` the seeds
    that trained and ``status`` "ok" or how many failed."""
    order = list(dict.fromkeys(r["bound"] for r in results))
    extras = extra_metrics(results)
    numeric = [key for key in (*_NUMBERS, *extras) if key not in ("delta_stderr",)]
    summary: list[dict[str, Any]] = []
    for bound in order:
        rows = [r for r in results if r["bound"] == bound]
        good = [r for r in rows if r["status"] == "ok"]
        failed = len(rows) - len(good)
        row: dict[str, Any] = {
            "bound": bound,
            "engine": rows[0]["engine"],
            "status": "ok" if not failed else f"failed: {failed}/{len(rows)} seeds",
            "seeds": [r["seed"] for r in good],
            "reference": rows[0].get("reference"),
        }
        if not good:
            row["status"] = f"failed: {rows[0]['status'].split(':')[0]} ({len(rows)} seeds)"
        for key in numeric:
            values = [r.get(key) for r in good]
            if not any(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                continue
            row[key], row[f"{key}_sd"] = _mean_sd(values)
        row["delta_sd"] = row.pop("delta_log_likelihood_sd", math.nan)
        if bound == row["reference"] or not math.isfinite(row["delta_sd"]):
            row["within_seed_noise"] = None
        else:
            row["within_seed_noise"] = abs(row["delta_log_likelihood"]) < (
                WITHIN_NOISE * row["delta_sd"]
            )
        curves = [r.get("ll_vs_k") or {} for r in good]
        ks = list(dict.fromkeys(k for curve in curves for k in curve))
        row["ll_vs_k"] = {k: _mean_sd([c.get(k, math.nan) for c in curves])[0] for k in ks}
        summary.append(row)
    return summary


def _pm(row: Mapping[str, Any], key: str, digits: int = 2) -> str:
    mean, sd = row.get(key), row.get(f"{key}_sd")
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {_number(sd, digits)}"


def format_seed_table(
    summary: Sequence[Mapping[str, Any]], ll_samples: int | None = None, unit: str | None = None
) -> str:
    """:func:`summarize`'s rows as a markdown table: mean ± sd over seeds of every number,
    the per-seed paired Δ to the reference (mean ± sd over seeds) and whether that
    difference is within seed noise."""
    reference = next((r.get("reference") for r in summary if r.get("reference")), None)
    extras = [key for key in extra_metrics(summary) if not key.endswith("_sd")]
    extras = [key for key in extras if key not in ("seeds", "within_seed_noise", "delta_sd")]
    k = f" (K={ll_samples})" if ll_samples else ""
    per = f" per {unit}" if unit else ""
    header = [
        "bound",
        "trains",
        "seeds",
        f"test log p(x){per}{k}",
        f"paired Δ vs {reference}" if reference else "paired Δ",
        "within seed noise",
        "ELBO",
        "IWAE-64",
        "gap",
        "active units",
        "SNR guide",
        "SNR model",
        "s/epoch",
        "train s",
        "eval s",
        *extras,
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in summary:
        if not r["seeds"]:
            cells = [r["bound"], r["engine"], "0", r["status"]]
            cells += ["n/a"] * (len(header) - 4)
        else:
            noise = r.get("within_seed_noise")
            cells = [
                r["bound"],
                r["engine"],
                ",".join(str(seed) for seed in r["seeds"]),
                _pm(r, "log_likelihood"),
                "reference"
                if r["bound"] == r.get("reference")
                else f"{r['delta_log_likelihood']:+.2f} ± {_number(r.get('delta_sd'))}",
                "n/a" if noise is None else ("yes" if noise else "no"),
                _pm(r, "elbo"),
                _pm(r, "iwae_64"),
                _pm(r, "inference_gap"),
                f"{_pm(r, 'active_units', 1)}/{r['latent_dims']:.0f}",
                _snr(r.get("snr_guide")),
                _snr(r.get("snr_model")),
                _number(r.get("seconds_per_epoch"), 1),
                _number(r.get("train_seconds"), 1),
                _number(r.get("eval_seconds"), 1),
                *[_pm(r, name, 3) for name in extras],
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_CSV_COLUMNS = ["bound", "seed", "folder", "engine", "status", *_NUMBERS, "reference"]


def _csv(results: Sequence[Mapping[str, Any]]) -> str:
    columns = [*_CSV_COLUMNS, *extra_metrics(results)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for result in results:
        row = {}
        for key in columns:
            value = result.get(key)
            missing = value is None or (isinstance(value, float) and not math.isfinite(value))
            row[key] = "" if missing else value
        writer.writerow(row)
    return buffer.getvalue()


def _markdown(
    results: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any],
    command: Sequence[str],
    elapsed: float,
    cpu_seconds: float,
    env: Mapping[str, Any] | None = None,
) -> str:
    hidden = "-".join(str(width) for width in config["hidden"])
    seeds = list(config.get("seeds") or [config["seed"]])
    several = len(seeds) > 1
    unit = config.get("unit")
    if several:
        table = (
            f"{format_seed_table(summarize(results), config['ll_samples'], unit)}\n\n"
            f"Per seed:\n\n{format_table(results, config['ll_samples'], unit)}"
        )
        trained = f"once per bound and seed ({', '.join(str(s) for s in seeds)})"
        seed_text = f"seeds {', '.join(str(s) for s in seeds)}"
    else:
        table = format_table(results, config["ll_samples"], unit)
        trained, seed_text = "once per bound", f"seed {config['seed']}"
    seed_notes = (
        "- **seeds**: every number of the first table is the mean ± sample sd (n-1) over the "
        "seeds; a seed sets the initial weights, the minibatch order and the evaluation's "
        "random numbers (the data and test points are the same for every seed).\n"
        "- **paired Δ**: for each seed, the mean over the same test points of log p(x) minus "
        "the reference bound's log p(x) with that seed; then the mean ± sd of these per-seed "
        "Δ over the seeds. **within seed noise**: yes when |mean Δ| < "
        f"{WITHIN_NOISE:g} × sd of the per-seed Δ (the rule used here; with "
        f"{len(seeds)} seeds it is a rough screen, not a test).\n"
        if several
        else ""
    )
    yardstick = config.get("yardstick")
    yardstick_note = (
        f"- **yardstick**: after every epoch each bound's model is evaluated with the same "
        f"estimator, {str(yardstick).upper().replace(':', '-')}, on the first "
        f"{config.get('yardstick_points')} "
        "validation points (no gradients, a fixed seed in a forked RNG: training is "
        "untouched); `learning_curves.png` plots it for every bound on one axis (left) next "
        "to each bound's own objective (right).\n"
        if yardstick
        else "- no yardstick (`--yardstick none`): the learning curves are each bound's own "
        "objective.\n"
    )
    env = env or {}
    versions = env.get("versions", {})
    return f"""# pvae compare: {config["dataset"]}

{config["model"]} ({config["net"]} {hidden}, z_dim {config["z_dim"]}, {config["likelihood"]} \
likelihood) trained {trained} for {config["epochs"]} epochs on {config["num_train"]} points \
(batch {config["batch_size"]}, Adam lr {config["lr"]:g}, {seed_text}), \
{config["particles"]} samples of z per datapoint and step for every bound; measured on \
{config["num_test"]} test points; device {config.get("device", "cpu")}.

{table}

- **test log p(x)**: importance-sampled with K={config["ll_samples"]}, mean ± standard error \
over test points (nats; higher is better).
- **Δ**: the paired difference of log p(x) to the first bound on the same test points and \
random numbers, ± its standard error (the errors of the column before are mostly shared).
{seed_notes}\
- **ELBO**: {ELBO_SAMPLES} samples, analytic KL; **IWAE-64**: IWAE with 64 samples; \
**gap**: log p(x) - ELBO, the inference gap.
- **active units**: latent dimensions with Var_x(E_q[z|x]) > 0.01 (Burda et al. 2016), over \
all latent layers; `pvae diagnose` reports the same number.
- **SNR**: the mean over parameter elements of \\|E g\\| / std g for each bound's own gradient \
estimator, from {config["snr_repeats"]} gradients on {config["snr_points"]} test points \
(Rainforth et al. 2018).
- **s/epoch**: training steps only; **train s**: the whole training (steps, validation, \
checkpoints; the yardstick's time is left out); **eval s**: every test-set number of the row \
(log p(x), ELBO, IWAE-64, active units, the model's metrics, SNR, log p(x) against K); \
**peak MB**: {_memory_kind(torch.device(config.get("device", "cpu")))}. Total wall time \
{elapsed:.0f} s ({cpu_seconds:.0f} s CPU, torch threads: {torch.get_num_threads()}).
{yardstick_note}\
- **log p(x) against K** (`ll_vs_k.png`, `ll_vs_k` in results.json): K in \
{", ".join(str(k) for k in config.get("ll_ks", []))} on the first \
{min(config.get("ll_k_points", LL_K_POINTS), config["num_test"])} test points (the largest K \
is the table's estimate on those points): where the estimate stops rising, K is large enough.
{_extras_note(results)}
Plots: `learning_curves.png`, `log_likelihood.png`, `snr.png`, `ll_vs_k.png`.

## Command

```
{" ".join(command)}
```

## Configuration

```
{chr(10).join(f"{key}: {value}" for key, value in config.items())}
pvae {pvae.__version__}, torch {torch.__version__}, pyro {pyro.__version__}, \
python {platform.python_version()}
```

## Environment

```
git commit: {env.get("git_commit")}
versions: {", ".join(f"{name} {version}" for name, version in versions.items())}
platform: {env.get("platform")}
CPU: {env.get("cpu")} ({env.get("cpu_count")} cores), GPU: {env.get("gpu")}, \
torch threads: {env.get("torch_threads")}, device: {env.get("device")}
```
"""


_EXTRA_NOTES = {
    "imputation_mse": "**imputation_mse**: mean squared error per element of the model's "
    "imputation at held-out frames (the missing test frames against the clean truth where the "
    "dataset has it, else randomly hidden observed frames); **imputation_mse_mean_frame**: "
    "the same for the mean observed frame (a baseline without dynamics); "
    "**held_out_frames**: how many frames were scored.",
}


def _extras_note(results: Sequence[Mapping[str, Any]]) -> str:
    names = extra_metrics(results)
    if not names:
        return ""
    notes = [note for key, note in _EXTRA_NOTES.items() if key in names]
    notes = notes or [f"the model's own metrics: {', '.join(names)}."]
    return "".join(f"- {note}\n" for note in notes)


def write_outputs(
    run_dir: str | os.PathLike[str],
    results: Sequence[Mapping[str, Any]],
    runs: Mapping[str, Run | Sequence[Run]],
    config: Mapping[str, Any],
    command: Sequence[str],
    elapsed: float = math.nan,
    cpu_seconds: float = math.nan,
) -> None:
    """``results.md``, ``results.json`` (with the :func:`environment` block and, per bound,
    the :func:`summarize` rows), ``results.csv`` and the four plots, atomically. ``runs``:
    each bound's trained run, or its runs (one per seed)."""
    out = Path(run_dir)
    env = environment(config.get("device", "cpu"))
    summary = summarize(results)
    several = len(config.get("seeds") or [config["seed"]]) > 1
    atomic.write_text(
        out / "results.md", _markdown(results, config, command, elapsed, cpu_seconds, env)
    )
    plots.write_json(
        out / "results.json",
        {
            "pvae_version": pvae.__version__,
            "command": list(command),
            "config": dict(config),
            "elapsed_seconds": elapsed,
            "cpu_seconds": cpu_seconds,
            "threads": torch.get_num_threads(),
            "versions": env["versions"],
            "environment": env,
            "memory": _memory_kind(torch.device(config.get("device", "cpu"))),
            "within_seed_noise_rule": f"|mean paired delta| < {WITHIN_NOISE:g} sd of the "
            "per-seed paired deltas",
            "results": [dict(r) for r in results],
            "summary": summary,
        },
    )
    atomic.write_text(out / "results.csv", _csv(results))
    histories = {
        label: [run.history for run in (value if isinstance(value, Sequence) else [value])]
        for label, value in runs.items()
    }
    yardstick = config.get("yardstick")
    plots.compared_learning_curves(
        histories,
        yardstick=str(yardstick).upper().replace(":", "-") if yardstick else None,
        path=out / "learning_curves.png",
        title=f"{config['dataset']}" + (f", mean over seeds {config['seeds']}" if several else ""),
    )
    plots.ll_vs_k(
        {
            row["bound"]: {int(k): v for k, v in row["ll_vs_k"].items()}
            for row in summary
            if row.get("ll_vs_k")
        },
        path=out / "ll_vs_k.png",
        title=f"log p(x) against K, first {min(LL_K_POINTS, config['num_test'])} test points"
        + (" (mean over seeds)" if several else ""),
    )

    rows = summary if several else results

    def column(key: str) -> list[float]:
        return [float(r[key]) if r.get(key) is not None else math.nan for r in rows]

    spread = "sd over seeds" if several else "standard error over test points"
    plots.comparison(
        [r["bound"] for r in rows],
        {
            f"log p(x), K={config['ll_samples']}": (
                column("log_likelihood"),
                column("log_likelihood_sd" if several else "log_likelihood_stderr"),
            ),
            f"IWAE-{IWAE_SAMPLES}": (column("iwae_64"), None),
            "ELBO": (column("elbo"), None),
        },
        ylabel="nats per test point",
        path=out / "log_likelihood.png",
        title=f"test set of {config['dataset']} ({config['num_test']} points)",
        note=f"error bars: ±1 {spread} (see the Δ column of results.md for paired differences)",
    )
    plots.comparison(
        [r["bound"] for r in rows],
        {"guide": (column("snr_guide"), None), "model": (column("snr_model"), None)},
        ylabel="gradient SNR, mean |E g| / std g",
        path=out / "snr.png",
        title=f"gradient signal-to-noise ratio, {config['particles']} particles",
        log_scale=True,
    )
