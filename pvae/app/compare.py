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
- ``seconds_per_epoch``: the mean time of an epoch's training steps (no validation).

:func:`compare` writes into ``run_dir`` (every file atomically): ``results.md`` (the table,
the command and the configuration), ``results.json``, ``results.csv``, ``learning_curves.png``
(each bound's own train/valid bound per epoch), ``log_likelihood.png`` (with error bars),
``snr.png`` (log scale), ``config.json`` (the :class:`pvae.app.runs.RunConfig` that
``pvae diagnose`` rebuilds the data and models from), and one folder per bound with
``pvae.fit``'s checkpoint and ``run.json``.

Speed: Pyro's per-call argument checks cost about half of an importance-weighted step on
MNIST (every log-prob of every particle is validated), so training and evaluation run with
Pyro's validation switched off. The data are checked against the likelihood's support once,
up front, and ``pvae.fit`` still stops on a non-finite bound.

Budget: the defaults (5 bounds, 64 particles, MNIST-5k, a 784-200-200-50 ReLU MLP VAE, 10 epochs
of batches of 20, log p(x) with K = 5000 on the 500 test points) are sized to finish within
about 10 minutes on 2 CPU cores: measured 8.6 minutes with ``--threads 1`` on a 2-core machine
shared with other jobs (6.8 minutes of CPU). On a busy machine use ``--threads 1``: two threads
competing for busy cores spin-wait and ran 2 to 4 times slower than one;
``quick=True`` trains a smaller net for 2 epochs on a subset with K = 100, in well under a
minute. Explicit arguments always win over either set of defaults.
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
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
    "DEFAULTS",
    "QUICK",
    "bound_folder",
    "check_support",
    "compare",
    "format_table",
    "resolve_bounds",
    "settings",
]

DEFAULT_BOUNDS = ("elbo", "iwae", "miwae", "ciwae", "piwae")
OUTPUTS = (
    "results.md",
    "results.json",
    "results.csv",
    "learning_curves.png",
    "log_likelihood.png",
    "snr.png",
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


def describe(spec: BoundSpec, particles: int) -> str:
    """What a resolved bound trains, in words, e.g. ``MIWAE(M=8, K=8)`` (the engine's
    registration says it)."""
    return spec.describe(particles)


def bound_folder(spec: BoundSpec) -> str:
    """The subfolder of a compare run that holds one bound's checkpoint."""
    return spec.label.replace(":", "_")


# ---------------------------------------------------------------------------------------------
# One bound
# ---------------------------------------------------------------------------------------------


def _train_one(
    spec: BoundSpec,
    build_model: Callable[[], PyroModule],
    ds: data.Splits,
    config: Mapping[str, Any],
    run_dir: Path | None,
    progress: bool,
    say: ProgressFn | None,
    loggers: Sequence[Any] = (),
) -> tuple[PyroModule, Run]:
    pyro.clear_param_store()
    pyro.set_rng_seed(config["seed"])  # the same initial weights for every bound
    model = build_model()
    entry = MODELS[config["model"]]
    extra = entry.callbacks(model, ds) if entry.callbacks is not None else []
    engine = spec.build(config["particles"])
    epochs = config["epochs"]

    def report(run: Run, record: dict[str, Any]) -> None:
        if say is None:
            return
        valid = record.get("valid_bound")
        valid_text = f", valid {valid:.3f}" if valid is not None else ""
        say(
            f"[{spec.label}] epoch {record['epoch'] + 1}/{epochs}: train "
            f"{record['train_bound']:.3f}{valid_text} nats ({record['seconds']:.1f} s)"
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
        run_dir=run_dir / bound_folder(spec) if run_dir is not None else None,
        progress=progress,
        callbacks=[*extra, report, *(logger.epoch for logger in loggers)],
        step_callbacks=[logger.step for logger in loggers],
    )
    return model, run


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
) -> tuple[dict[str, Any], torch.Tensor]:
    """The table's numbers for one trained pair, and its per-point log-likelihoods (the
    model in eval mode), with the model's own metrics (its registration's ``metrics``)."""
    seed, test = config["seed"], ds.test
    entry = MODELS[config["model"]]
    model.eval()
    with torch.random.fork_rng(devices=[]):
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
        **extra,
    }, ll


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
    :returns: one dict per bound: ``bound`` (its resolved label), ``engine``, ``status``
        ("ok", or why it failed: its numbers are then NaN) and the numbers listed in this
        module's docstring, plus ``history`` (the per-epoch records of ``pvae.fit``).

    :raises ValueError: for bad bounds, M*K not equal to ``particles``, or data outside the
        likelihood's support, before anything is trained.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
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
    check_support(build_model(), ds)
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
        "ll_samples": knobs["ll_samples"],
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
    per_point: dict[str, torch.Tensor] = {}
    trained_runs: dict[str, Run] = {}
    bar = tqdm(specs, desc="bounds", unit="bound", disable=not bar_on)
    with pyro.validation_enabled(False):
        for spec in bar:
            bar.set_postfix(bound=spec.label)
            result: dict[str, Any] = {
                "bound": spec.label,
                "engine": spec.describe(particles),
                "status": "ok",
            }
            logged = loggers(spec.label, {**config, "bound": spec.label}) if loggers else []
            try:
                trained, run = _train_one(spec, build_model, ds, config, out, bar_on, say, logged)
                numbers, ll = _evaluate(spec, trained, run, ds, config, bar_on)
            except TrainingDiverged as error:
                result["status"] = f"diverged: {error}"
                result.update({key: math.nan for key in _NUMBERS})
                result["history"] = []
            else:
                result.update(numbers)
                result["history"] = run.history
                trained_runs[spec.label] = run
                per_point[spec.label] = ll
            results.append(result)
            for logger in logged:
                logger.log_metrics({k: v for k, v in result.items() if k in _NUMBERS})
                logger.close(failed=result["status"] != "ok")
            if say is not None:
                say(_summary_line(result, knobs["ll_samples"]))
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


def _add_deltas(results: list[dict[str, Any]], per_point: Mapping[str, torch.Tensor]) -> None:
    """Paired differences of log p(x) to the first bound that trained."""
    reference = next((r["bound"] for r in results if r["bound"] in per_point), None)
    for result in results:
        result["reference"] = reference
        if reference is None or result["bound"] not in per_point:
            result["delta_log_likelihood"] = result["delta_stderr"] = math.nan
            continue
        diff = (per_point[result["bound"]] - per_point[reference]).double()
        result["delta_log_likelihood"] = float(diff.mean())
        result["delta_stderr"] = _stderr(diff) if result["bound"] != reference else 0.0


def _summary_line(result: Mapping[str, Any], ll_samples: int) -> str:
    if result["status"] != "ok":
        return f"[{result['bound']}] {result['status']}"
    return (
        f"[{result['bound']}] test log p(x) {result['log_likelihood']:.2f} +- "
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


_KNOWN = {"bound", "engine", "status", "history", "reference", *_NUMBERS}


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
        *extras,
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in results:
        if r["status"] != "ok":
            cells = [r["bound"], r["engine"], r["status"].split(":")[0]]
            cells += ["n/a"] * (8 + len(extras))
        else:
            cells = [
                r["bound"],
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
                *[_metric(r.get(name)) for name in extras],
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_CSV_COLUMNS = ["bound", "engine", "status", *_NUMBERS, "reference"]


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
) -> str:
    hidden = "-".join(str(width) for width in config["hidden"])
    return f"""# pvae compare: {config["dataset"]}

{config["model"]} ({config["net"]} {hidden}, z_dim {config["z_dim"]}, {config["likelihood"]} \
likelihood) trained once per bound for {config["epochs"]} epochs on {config["num_train"]} points \
(batch {config["batch_size"]}, Adam lr {config["lr"]:g}, seed {config["seed"]}), \
{config["particles"]} samples of z per datapoint and step for every bound; measured on \
{config["num_test"]} test points.

{format_table(results, config["ll_samples"], config.get("unit"))}

- **test log p(x)**: importance-sampled with K={config["ll_samples"]}, mean ± standard error \
over test points (nats; higher is better).
- **Δ**: the paired difference of log p(x) to the first bound on the same test points and \
random numbers, ± its standard error (the errors of the column before are mostly shared).
- **ELBO**: {ELBO_SAMPLES} samples, analytic KL; **IWAE-64**: IWAE with 64 samples; \
**gap**: log p(x) - ELBO, the inference gap.
- **active units**: latent dimensions with Var_x(E_q[z|x]) > 0.01 (Burda et al. 2016), over \
all latent layers; `pvae diagnose` reports the same number.
- **SNR**: the mean over parameter elements of \\|E g\\| / std g for each bound's own gradient \
estimator, from {config["snr_repeats"]} gradients on {config["snr_points"]} test points \
(Rainforth et al. 2018).
- **s/epoch**: training steps only; total wall time {elapsed:.0f} s \
({cpu_seconds:.0f} s CPU, torch threads: {torch.get_num_threads()}).
{_extras_note(results)}
Plots: `learning_curves.png` (each bound's own objective on train and valid, per epoch), \
`log_likelihood.png`, `snr.png`.

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
    runs: Mapping[str, Run],
    config: Mapping[str, Any],
    command: Sequence[str],
    elapsed: float = math.nan,
    cpu_seconds: float = math.nan,
) -> None:
    """``results.md``, ``results.json``, ``results.csv`` and the three plots, atomically."""
    out = Path(run_dir)
    labels = [r["bound"] for r in results]
    atomic.write_text(out / "results.md", _markdown(results, config, command, elapsed, cpu_seconds))
    plots.write_json(
        out / "results.json",
        {
            "pvae_version": pvae.__version__,
            "command": list(command),
            "config": dict(config),
            "elapsed_seconds": elapsed,
            "cpu_seconds": cpu_seconds,
            "threads": torch.get_num_threads(),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "pyro": pyro.__version__,
            },
            "results": [dict(r) for r in results],
        },
    )
    atomic.write_text(out / "results.csv", _csv(results))
    plots.learning_curve(
        {label: run.history for label, run in runs.items()},
        path=out / "learning_curves.png",
        title=f"each bound's own objective on {config['dataset']}",
    )

    def column(key: str) -> list[float]:
        return [float(r[key]) if r.get(key) is not None else math.nan for r in results]

    plots.comparison(
        labels,
        {
            f"log p(x), K={config['ll_samples']}": (
                column("log_likelihood"),
                column("log_likelihood_stderr"),
            ),
            f"IWAE-{IWAE_SAMPLES}": (column("iwae_64"), None),
            "ELBO": (column("elbo"), None),
        },
        ylabel="nats per test point",
        path=out / "log_likelihood.png",
        title=f"test set of {config['dataset']} ({config['num_test']} points)",
        note="error bars: ±1 standard error over test points (shared across bounds; "
        "see the Δ column of results.md for paired differences)",
    )
    plots.comparison(
        labels,
        {"guide": (column("snr_guide"), None), "model": (column("snr_model"), None)},
        ylabel="gradient SNR, mean |E g| / std g",
        path=out / "snr.png",
        title=f"gradient signal-to-noise ratio, {config['particles']} particles",
        log_scale=True,
    )
