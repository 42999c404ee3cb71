"""The ``pvae`` commands: :mod:`pvae.app.arguments` parses the command line (without importing
torch) and runs one of the commands here (``pvae compare``: :mod:`pvae.app.compare`,
``pvae diagnose``: :mod:`pvae.app.diagnose`, ``pvae sample``: :mod:`pvae.app.sample`).

``pvae train`` checks the data against the likelihood's support, trains with :func:`pvae.fit`,
estimates the test log-likelihood with :func:`pvae.log_likelihood` and writes into the run
folder, each file atomically: ``config.json`` (the :class:`~pvae.app.runs.RunConfig`, every
argument, the canonical command line, versions, facts about the data), ``pvae.fit``'s
``checkpoint.pt`` and ``run.json``, ``metrics.json``/``metrics.csv`` and the figures.

Every command checks its run folder (:func:`_folder`), data, model and engine before it writes
anything. An invocation error prints one line ``pvae: error: ...`` and exits with 2; a failed
run exits with 1, an interrupted one with 130 (saying what its folder keeps);
``PVAE_DEBUG=1`` gives the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.nn import PyroModule
from tqdm.auto import tqdm

import pvae
from pvae import atomic, data, plots, tracking
from pvae.app import compare, diagnose, runs
from pvae.app import sample as sample_app
from pvae.app.arguments import (  # the parser (no torch): `pvae` parses there, runs here
    EXIT_FAILURE,
    EXIT_OK,
    PROG,
    SAMPLE_CHECKPOINT_EVERY,
    CliError,
    _subparsers,  # noqa: F401 - the name the CLI tests read
    build_parser,
    main,
)
from pvae.app.registry import MODELS, parse_bound
from pvae.app.report import HISTORY, metrics_csv
from pvae.app.runs import canonical_argv, json_args
from pvae.checkpoint import RUN_JSON, RunDirInUse, load_checkpoint
from pvae.evaluate import as_tensors
from pvae.inference import SGHMC
from pvae.train import CHECKPOINT, Run

__all__ = [  # the parser's names too, as this module has always offered them
    "SAMPLE_CHECKPOINT_EVERY",
    "CliError",
    "build_parser",
    "canonical_argv",
    "json_args",
    "main",
]

_json_args = json_args  # the name the CLI tests read

# What a command (and ``pvae diagnose`` on its run) writes into its run folder: --overwrite
# removes these and a comparison's bound folders, nothing else (the folder may hold the user's
# own files).
_FIGURES = ("learning_curve.png", "reconstructions.png", "samples.png")  # of pvae train
_OUTPUTS = {
    "train": (CHECKPOINT, RUN_JSON, "metrics.json", "metrics.csv", *_FIGURES),
    "compare": compare.OUTPUTS,
}
# What a --resume may change, by command, and the entry of config.json it is checked against:
# the arguments, or (a comparison's config.json records none) the RunConfig.
_CONTINUING = {"resume", "quiet", "run_dir", "data_path"}  # how and where a run continues
RESUMABLE: dict[str, tuple[str, set[str]]] = {
    "train": ("args", {*_CONTINUING, "epochs", "ll_samples", "overwrite", "log"}),
    "sample": ("args", {*_CONTINUING, "checkpoint_every"}),
    "compare": ("run", {"data_path"}),
}
_FAILED = {"train": "training", "compare": "compare", "sample": "sampling"}  # "... failed: "


# -- Building blocks of a command ----------------------------------------------------------


@contextlib.contextmanager
def _refused(
    prefix: str = "", errors: tuple[type[Exception], ...] = (ValueError,)
) -> Iterator[None]:
    """A refusal (one of ``errors``) inside becomes :class:`CliError` ``prefix + message``."""
    try:
        yield
    except errors as error:
        raise CliError(f"{prefix}{error}") from error


def _folder(command: str, args: argparse.Namespace) -> tuple[runs.RunFolder, list[Path]]:
    """The run folder of ``--run-dir``, checked before any work, and what an earlier run left in
    it (removed by --overwrite). Refused: a path that is no folder, a folder holding another
    command's run, an earlier run (a checkpoint; a comparison's outputs) without --resume or
    --overwrite, and a --resume without a run and its ``config.json`` to continue."""
    with _refused(errors=(runs.RunFolderError,)):
        folder = runs.RunFolder(args.run_dir)
    path, other, overwrite = folder.path, folder.command, getattr(args, "overwrite", None)
    if other not in (None, command):
        hint = f"continue it with 'pvae {other} --resume', or " if args.resume else ""
        raise CliError(
            f"--run-dir {path} holds a 'pvae {other}' run, not a 'pvae {command}' run; "
            f"'pvae {command}' neither continues nor overwrites it: {hint}choose another --run-dir"
        )
    names = (*_OUTPUTS.get(command, ()), runs.CONFIG, *diagnose.FILES, diagnose.RESULTS)
    earlier = [path / name for name in dict.fromkeys(names) if (path / name).is_file()]
    if command == "compare" and path.is_dir():  # the bound folders, with their seed folders

        def holds_run(child: Path) -> bool:
            return (child / CHECKPOINT).is_file() or (child / RUN_JSON).is_file()

        earlier += sorted(
            child
            for child in path.iterdir()
            if child.is_dir() and (holds_run(child) or any(map(holds_run, child.glob("seed-*"))))
        )
    if command == "compare":
        what, found = "comparison", earlier
    else:
        what, found = "run", [path / CHECKPOINT] if folder.has_checkpoint else []
    if found and not (args.resume or overwrite):
        shown = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        replace = ", or --overwrite to replace it" if overwrite is not None else ""
        raise CliError(
            f"{path} already holds a {what} ({shown}); use another --run-dir, --resume to "
            f"continue it{replace}"
        )
    if args.resume and not found:
        missing = CHECKPOINT if what == "run" else f"comparison ({runs.CONFIG})"
        raise CliError(
            f"--resume: {path} holds no {missing} to continue; drop --resume to start a new run"
        )
    if args.resume and not (path / runs.CONFIG).is_file():
        raise CliError(
            f"--resume: {path / runs.CONFIG} is missing, so the settings of the {what} in {path} "
            f"are unknown; start a new {what} in another --run-dir"
        )
    return folder, earlier if overwrite else []


def _check_resume(
    command: str, folder: runs.RunFolder, args: argparse.Namespace, config: runs.RunConfig
) -> dict[str, Any]:
    """With --resume (arguments resolved): the ``config.json`` of the run continued, whose
    arguments (a comparison: its RunConfig) must be these but those of :data:`RESUMABLE`;
    each that differs is named."""
    entry, may_change = RESUMABLE[command]
    with _refused("--resume: ", (runs.RunFolderError,)):
        recorded, document = runs.read_config(folder.path)
    previous = recorded.to_json() if entry == "run" else document.get(entry)
    current = config.to_json() if entry == "run" else json_args(args)
    if not isinstance(previous, dict):
        raise CliError(f"--resume: {folder.path / runs.CONFIG} records no {entry}")
    changed = [
        f"--{key.replace('_', '-')} (was {previous.get(key)!r}, now {current.get(key)!r})"
        for key in sorted(set(previous) | set(current))
        if key not in may_change and previous.get(key) != current.get(key)
    ]
    if changed:
        raise CliError(
            f"--resume continues the run in {folder.path}, but these arguments differ from its "
            f"config.json: {'; '.join(changed)}; use another --run-dir to start a new run"
        )
    return document


def _config_and_data(command: str, args: argparse.Namespace) -> tuple[runs.RunConfig, data.Splits]:
    """The command line as a :class:`~pvae.app.runs.RunConfig` (once, arguments resolved) and
    ``config.load_data()``, failures as :class:`CliError`; ``args.likelihood`` is resolved to
    the dataset's default when it was None."""
    config = runs.RunConfig.from_args(command, args)
    try:
        ds = config.load_data()
    except runs.ModelDataError as error:
        raise CliError(str(error)) from error
    except (ValueError, TypeError, OSError, ImportError) as error:
        if isinstance(error, TypeError) and "unexpected keyword" not in str(error):
            raise
        raise CliError(f"dataset {config.dataset!r}: {error}") from error
    args.likelihood = config.likelihood
    return config, ds


def _build(config: runs.RunConfig, ds: data.Splits) -> PyroModule:
    """``config.build_model(ds)`` (a fresh parameter store, seeded with ``config.seed``), its
    data checked against the likelihood's support."""
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    with _refused(f"model {config.model!r}: "):
        model = config.build_model(ds)
    with _refused():
        compare.check_support(model, ds)
    return model


def _open_loggers(args: argparse.Namespace, run_dir: Path, **options: Any) -> Any:
    """The loggers of ``--log`` (a context manager); a missing package is a usage error."""
    with _refused("--log: ", (ImportError,)):
        return tracking.open_loggers(args.log, run_dir, params=json_args(args), **options)


def _run(
    command: str, folder: runs.RunFolder, earlier: Sequence[Path], work: Callable[[Path], int]
) -> int:
    """``work(run_dir)`` in the locked ``folder`` once ``earlier`` (--overwrite) is removed; the
    folders it created are removed again if they stay empty. Ctrl-C ends it with one line
    saying what the folder keeps (exit 130); a failure (ValueError, a divergence) or an
    output that cannot be written, with exit 1."""
    path = folder.path
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(folder)
        except RunDirInUse as error:
            raise CliError(f"--run-dir: {error}") from error
        except OSError as error:  # creating or locking the folder
            raise CliError(f"cannot write to --run-dir {path}: {error}") from error
        try:
            for old in earlier:
                shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
            return work(path)
        except KeyboardInterrupt as stop:
            print(f"{PROG}: interrupted; {_kept(command, path, stop)}", file=sys.stderr)
            return 130
        except OSError as error:
            raise CliError(
                f"cannot write the outputs into {path}: {error}", EXIT_FAILURE
            ) from error
        except FloatingPointError as error:  # TrainingDiverged, SamplingDiverged
            what = f"{_FAILED[command]} diverged: {error} (lower --lr)"
            raise CliError(what, EXIT_FAILURE) from error
        except ValueError as error:
            raise CliError(f"{_FAILED[command]} failed: {error}", EXIT_FAILURE) from error


def _kept(command: str, run_dir: Path, stop: BaseException) -> str:
    """What an interrupted command leaves in ``run_dir`` for its ``--resume``."""
    again = "continue with the same command and --resume"
    if command == "compare":
        if not run_dir.is_dir() or not any(run_dir.iterdir()):
            return f"nothing was written in {run_dir}"
        cells = f"the finished cells (bound folders with {compare.CELL}) and tasks"
        return f"{cells} are kept in {run_dir}: {again}"
    if isinstance(stop, pvae.SamplingInterrupted):
        return f"checkpoint at chain {stop.chain}, step {stop.step} in {run_dir}: {again}"
    train = command == "train"
    if (run_dir / CHECKPOINT).is_file():
        which = "the checkpoint of the last full epoch" if train else "the last checkpoint"
        return f"{which} is in {run_dir}: {again}"
    return f"no checkpoint was written in {run_dir}" + (" (in the first epoch)" if train else "")


def _threads(jobs: int = 1) -> str:
    threads = max(1, torch.get_num_threads() // jobs)
    text = f"{threads} thread{'s' if threads != 1 else ''}"
    return f"{jobs} processes x {text}" if jobs > 1 else text


# -- pvae train ----------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> int:
    folder, earlier = _folder("train", args)
    if args.particles is None:
        args.particles = parse_bound(args.engine).default_particles()
    config, ds = _config_and_data("train", args)
    _check_memory(args, ds)
    model = _build(config, ds)
    with _refused(f"engine {config.engine!r}: "):
        engine = config.build_engine()
    if args.resume:
        _check_resume("train", folder, args, config)
        checkpoint = folder.path / CHECKPOINT
        reading = (OSError, ValueError, KeyError, TypeError)
        with _refused(f"--resume: cannot read {checkpoint}: ", reading):
            done = int(load_checkpoint(checkpoint)["epoch"]) + 1
        if args.epochs < done:
            raise CliError(
                f"--resume: the run in {folder.path} has done {done} epochs; --epochs "
                f"{args.epochs} is fewer (pass --epochs >= {done})"
            )
    pair = f"--model {args.model} with --engine {args.engine} on --dataset {args.dataset}: "
    with _refused(pair, (ValueError, TypeError, NotImplementedError)):  # pvae.fit's checks
        pvae.check_fit(model.model, model.guide, ds.train, engine, args.batch_size, ds.valid)
    return _run(
        "train", folder, earlier, lambda out: _train_in(out, args, (config, ds), (model, engine))
    )


def _check_memory(args: argparse.Namespace, ds: data.Splits, limit: float = 0.5) -> None:
    """Refuse, before building it, an MLP model whose parameters (weights, gradients and
    Adam's two moments: four float32 copies) would take more than ``limit`` of the machine's
    memory. The estimate counts an encoder ``x -> hidden -> 2 z`` and a decoder
    ``z -> hidden -> x``."""
    x_dim, z_dim = int(getattr(ds, "x_dim", 0) or 0), args.z_dim
    widths = [int(h) for h in (args.hidden or ())]
    if not x_dim or z_dim is None:
        return
    encoder, decoder = [x_dim, *widths, 2 * int(z_dim)], [int(z_dim), *widths[::-1], x_dim]
    total = 4 * 4 * sum((a + 1) * b for net in (encoder, decoder) for a, b in pairwise(net))
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if total > limit * available:
        raise CliError(
            f"the model needs about {total / 2**30:.1f} GiB for training (weights, gradients "
            f"and Adam's moments), more than half of this machine's {available / 2**30:.1f} "
            "GiB; reduce --z-dim or --hidden"
        )


def _train_in(
    run_dir: Path,
    args: argparse.Namespace,
    run: tuple[runs.RunConfig, data.Splits],
    pair: tuple[PyroModule, pyro.infer.ELBO],
) -> int:
    """``pvae train`` of ``run`` (config, data) and ``pair`` (model, engine) in its locked run
    folder: ``config.json``, the training and the test log-likelihood, the outputs (logged to
    ``--log``'s loggers)."""
    config, ds = run
    with _open_loggers(args, run_dir, fresh=args.overwrite) as loggers:
        argv = canonical_argv("train", args)
        runs.write_config(run_dir, config, ds, args=json_args(args), argv=argv)
        history, metrics = _train_and_evaluate(args, ds, pair, run_dir, loggers)
        runs.write_json(run_dir / "metrics.json", metrics)
        atomic.write_text(run_dir / "metrics.csv", metrics_csv(metrics))
        title = f"{args.model} / {args.engine} on {args.dataset}"
        plots.learning_curve(history, path=run_dir / "learning_curve.png", title=title)
        _figures(pair[0], args.model, ds, args.seed, run_dir)
        tracking.log_outputs(
            loggers, run_dir, {"test_log_likelihood": metrics["test_log_likelihood"]}
        )
    test = metrics["test_log_likelihood"]
    print(
        f"test log-likelihood {test['mean']:.3f} +- {test['stderr']:.3f} nats "
        f"(K={test['num_samples']}, {test['num_datapoints']} test points)"
        + "".join(f", {name} {value:.4g}" for name, value in metrics["test_metrics"].items())
        + f"; outputs in {run_dir}"
    )
    return EXIT_OK


def _train_and_evaluate(
    args: argparse.Namespace,
    ds: data.Splits,
    pair: tuple[PyroModule, pyro.infer.ELBO],
    run_dir: Path,
    loggers: Sequence[tracking.Logger] = (),
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``pvae.fit`` of ``pair`` (model, engine) into ``run_dir`` (``loggers`` see every step
    and epoch), then the test log-likelihood (seeded, K=ll_samples) and the model's own test
    metrics: the run's history and ``metrics.json``."""
    model, engine = pair
    card = MODELS[args.model]

    def report(run: Run, record: dict[str, Any]) -> None:
        if args.quiet:
            return
        valid = record.get("valid_bound")
        valid_text = f", valid bound {valid:.3f}" if valid is not None else ""
        tqdm.write(
            f"epoch {record['epoch'] + 1}/{args.epochs}: train bound "
            f"{record['train_bound']:.3f}{valid_text} nats ({record['seconds']:.1f} s)",
            file=sys.stdout,
        )

    extra = card.callbacks(model, ds) if card.callbacks is not None else []
    run = pvae.fit(
        model.model,
        model.guide,
        ds.train,
        engine=engine,
        **{key: getattr(args, key) for key in ("epochs", "batch_size", "lr", "seed")},
        valid=ds.valid,
        run_dir=run_dir,
        resume=args.resume,
        progress=not args.quiet,
        callbacks=[*extra, report, *(logger.epoch for logger in loggers)],
        step_callbacks=[logger.step for logger in loggers],
    )
    model.eval()  # e.g. no self-supervised masking while measuring
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        log_likelihood = compare.log_likelihood(
            model,
            ds.test,
            args.ll_samples,
            batch_size=args.batch_size,
            chunk_size=max(1, 10_000 // args.batch_size),
            progress=not args.quiet,
        )
        torch.manual_seed(args.seed)
        own = card.metrics(model, ds, "test", args.seed) if card.metrics is not None else {}
    history = [{key: record.get(key) for key in HISTORY} for record in run.history]
    last, n = (history[-1] if history else {}), log_likelihood.numel()
    return run.history, {
        "history": history,
        "final": {
            "epochs": len(history),
            "train_bound": last.get("train_bound"),
            "valid_bound": last.get("valid_bound"),
        },
        "test_log_likelihood": {
            "mean": float(log_likelihood.mean()),
            "stderr": float(log_likelihood.std() / math.sqrt(n)) if n > 1 else math.nan,
            "num_samples": args.ll_samples,
            "num_datapoints": int(n),
            "units": "nats per datapoint",
        },
        "train_seconds": sum(float(record.get("seconds") or 0.0) for record in history),
        "test_metrics": dict(own),  # the model's registration's metrics
    }


def _figures(model: PyroModule, name: str, ds: data.Splits, seed: int, run_dir: Path) -> None:
    """``reconstructions.png`` and ``samples.png`` where the model has ``reconstruct`` and
    draws data unconditionally (``sample(num_samples)``: a card with the ``sample``
    capability, neither over sequences, whose ``sample`` draws paths, nor a conditional task
    with its own view of the data). A model over several tensors shows the first modality (its
    outputs a dict) or the last argument (a conditional model's y)."""
    card = MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batch = tuple(t[: min(10, t.shape[0])] for t in as_tensors(ds.test))
        if hasattr(model, "reconstruct"):
            shown, target = model.reconstruct(*batch), batch[-1]
            if isinstance(shown, dict):
                shown, target = next(iter(shown.values())), batch[0]
            shape = ds.image_shape if target.shape[1] == ds.x_dim else None
            plots.reconstructions(target, shown, shape, path=run_dir / "reconstructions.png")
        sequences = {"sequences", "multimodal-sequences"} & set(card.accepts)
        if "sample" in card.capabilities and card.prepare is None and not sequences:
            drawn = model.sample(64 if ds.image_shape is not None else 500)
            if isinstance(drawn, dict):
                drawn = next(iter(drawn.values()))
            test = as_tensors(ds.test)[0] if ds.image_shape is None else None
            plots.samples(drawn, ds.image_shape, path=run_dir / "samples.png", data=test)


# -- pvae compare, pvae diagnose -----------------------------------------------------------


def _compare(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    vars(args).update(
        compare.settings(args.quick, **{key: getattr(args, key) for key in compare.DEFAULTS})
    )
    with _refused("--device: "):
        compare.resolve_device(args.device)
    if args.seeds is not None:
        args.seed = args.seeds[0]  # the data are loaded (split, subset) with the first seed
    with _refused("--bounds: "):
        specs = compare.resolve_bounds(args.bounds, args.particles, args.inner)
    args.bounds = [spec.label for spec in specs]
    args.run_dir = args.run_dir if args.run_dir is not None else f"runs/compare-{args.dataset}"
    folder, earlier = _folder("compare", args)
    config, ds = _config_and_data("compare", args)
    config.yardstick = None if args.yardstick == "none" else args.yardstick
    if args.resume:
        _check_resume("compare", folder, args, config)
    plan = compare.Plan.of(config, args.jobs, args.executor)
    with compare.workers(config, plan) as pool:  # started while the checks below run
        mismatch = f"--model {args.model} on --dataset {args.dataset}: "
        with _refused(mismatch, (ValueError, TypeError, NotImplementedError)):
            compare.check(config, plan, ds)  # every bound's engine on the model, on the data
        unit = "sequence" if isinstance(ds, data.SequenceSplits) else None

        def work(run_dir: Path) -> int:
            with _open_loggers(args, run_dir, run_name="compare") as loggers:
                results = compare.compare(
                    config,
                    plan,
                    run_dir=run_dir,
                    progress=not args.quiet,
                    argv=[PROG, *canonical_argv("compare", args)],
                    loggers=tracking.children(loggers) if args.log else None,
                    ds=ds,
                    pool=pool,
                    checked=True,
                )
                tracking.log_outputs(loggers, run_dir)
            return _compare_summary(args, plan, results, (run_dir, unit), started)

        return _run("compare", folder, earlier, work)


def _compare_summary(
    args: argparse.Namespace,
    plan: compare.Plan,
    results: Sequence[compare.BoundResult],
    where: tuple[Path, str | None],
    started: float,
) -> int:
    """The table of a finished comparison (``where``: its run folder and the data's unit), where
    its files are, and its exit status."""
    run_dir, unit = where
    rows = [result.to_json() for result in results]
    if plan.several:
        print(compare.format_seed_table(compare.summarize(rows), args.ll_samples, unit))
    else:
        print(compare.format_table(rows, args.ll_samples, unit))
    seeds = f" x {len(plan.seeds)} seeds" if plan.several else ""
    print(
        f"{len(plan.bounds)} bounds{seeds} compared in {time.perf_counter() - started:.0f} s "
        f"({_threads(plan.jobs if plan.executor == 'local' else 1)}, {args.device}); "
        "results.md, results.json, results.csv, "
        f"learning_curves.png, log_likelihood.png, snr.png and ll_vs_k.png in {run_dir}"
    )
    failed = [result.run or result.bound for result in results if not result.ok]
    if failed:
        print(f"{PROG}: error: training failed for {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _diagnose(args: argparse.Namespace) -> int:
    say = None if args.quiet else (lambda line: print(line, flush=True))
    try:
        result = diagnose.diagnose(args.run_dir, out_dir=args.out, num_points=args.points, say=say)
    except diagnose.DiagnoseError as error:
        raise CliError(str(error)) from error
    except OSError as error:
        raise CliError(f"cannot write the diagnostics: {error}", EXIT_FAILURE) from error
    if not args.quiet and result.kind in ("train", "sample"):
        print(result.verdict)
    figures = sum(1 for path in result.files if path.suffix == ".png")
    where = f"{len(result.bounds)} bounds, " if result.kind == "compare" else ""
    print(f"{result.report} and {figures} plots written ({where}{_threads()})")
    return EXIT_OK


# -- pvae sample ---------------------------------------------------------------------------


def _sample(args: argparse.Namespace) -> int:
    """``pvae sample``: :func:`pvae.app.sample.run_sampler` into ``--run-dir``. Every refusal
    (run folder, model, sampler options, data) comes before anything is written."""
    defaults = inspect.signature(SGHMC).parameters  # the CLI follows the API's defaults
    for name in ("lr", "friction", "init_radius"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name].default)
    with _refused("sampler: ", (ValueError, TypeError)):
        sampler = SGHMC(lr=args.lr, friction=args.friction, init_radius=args.init_radius)
    folder, _ = _folder("sample", args)
    config, ds = _config_and_data("sample", args)
    recorded = _check_resume("sample", folder, args, config) if args.resume else None
    if recorded is not None:  # the recorded model options and prior scale
        config.model_options = MODELS[args.model].resolve_options(recorded["run"]["model_options"])
    model = _build(config, ds)
    if recorded is not None:
        selection = recorded.get("prior_selection")
    else:
        selection = sample_app.prior_selection(model)
    if selection is not None:
        config.model_options["prior_scale"] = selection["chosen"]
    prior = sample_app.describe_prior(config.model_options, selection)
    prior_text = f", {prior}" if prior else ""
    if not args.quiet:
        print(
            f"{'continuing' if args.resume else 'sampling'} {args.chains} chain(s) of "
            f"--model {args.model} in {folder.path}{prior_text}",
            flush=True,
        )
    started = time.perf_counter()

    def work(run_dir: Path) -> int:
        if not args.resume:
            runs.write_config(
                run_dir,
                config,
                ds,
                args=json_args(args),
                argv=[PROG, *canonical_argv("sample", args)],
                extra={"prior_selection": selection} if selection is not None else None,
            )
        settings = ("num_samples", "warmup", "thin", "batch_size", "seed", "checkpoint_every")
        posterior = sample_app.run_sampler(
            model,
            ds,
            run_dir,
            sampler,
            progress=not args.quiet and sys.stderr.isatty(),
            num_chains=args.chains,
            resume=args.resume,
            **{key: getattr(args, key) for key in settings},
        )
        print(
            f"{posterior.num_chains} chain(s) x {posterior.num_samples} draws of "
            f"{len(posterior.samples)} sites in {time.perf_counter() - started:.0f} s"
            + (f" ({prior})" if prior else "")
            + f"; {sample_app.POSTERIOR}, config.json and figures in {run_dir} "
            f"(pvae diagnose {run_dir}: R-hat, ESS, traces)"
        )
        return EXIT_OK

    return _run("sample", folder, [], work)
