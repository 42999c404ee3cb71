"""Time of one IWAE training step: pvae's machinery against a hand-written PyTorch IWAE.

The rows train the same VAE (Burda et al. 2016's one-stochastic-layer architecture) with the
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

Pyro side: ``RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True)`` on the same pair,
wrapped the same way, training the same modules with its own Adam. It is not the same bound
(it takes the log-mean-exp of each particle's weight summed over the whole batch, after the
N/B scaling), only the same work; its arithmetic is checked against the reference on a batch
of one datapoint, where the two coincide. Only its speed is compared.

Reference side: plain ``nn.Linear`` layers holding copies of the same initial weights, the
weights and the log-mean-exp written out by hand, ``loss.backward()``, the same Adam.

The two are measured in one process, interleaved (blocks of ``--steps`` steps, alternating
which row goes first), after a warm-up; the figure is the median over ``--repeats`` blocks.
Blocks are short (5 steps, a fraction of a second) so that a burst of load from another
process on a shared machine lands on all rows of a repeat, not on one.
Before timing, one step of each on the same batch with the same seed checks that the losses
and gradients agree (both draw the same ``eps`` of shape ``(K, B, 50)``).

    python benchmarks/iwae_overhead.py                        # K = 50, tanh, 2 threads
    python benchmarks/iwae_overhead.py --particles 5 --activation relu
    python benchmarks/iwae_overhead.py --threads 1 --clock cpu --repeats 31
    python benchmarks/iwae_overhead.py --profile 30           # cProfile of 30 pvae steps
"""

from __future__ import annotations

import argparse
import math

import harness
import pyro
import torch
import torch.nn.functional as F
from torch import nn

import pvae
from pvae.inference import IWAE
from pvae.models import VAE

X_DIM, HIDDEN, Z_DIM = 784, (200, 200), 50
MIN_SCALE = pvae.nets.MIN_SCALE
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}
HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_timing_args(parser, repeats=21, steps=5, warmup=10)
    parser.add_argument("--particles", type=int, default=50, help="K, samples per datapoint")
    parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default="tanh")
    harness.add_data_args(parser)
    harness.add_clock_arg(parser)
    harness.add_validation_arg(parser)
    harness.add_profile_arg(parser)
    args = parser.parse_args(argv)

    num_data, batches = harness.prepare(args)
    batch_size, num_particles = args.batch_size, args.particles

    activation = ACTIVATIONS[args.activation]
    vae = VAE(
        x_dim=X_DIM, z_dim=Z_DIM, hidden=HIDDEN, likelihood="bernoulli", activation=activation
    )
    reference = Reference(vae.encoder, vae.decoder, activation)
    modules = (vae.encoder, vae.decoder)

    pvae_grads, pvae_params, pvae_opt = harness.pvae_side(
        IWAE(num_particles=num_particles),
        vae.model,
        vae.guide,
        modules,
        num_data,
        batches[0],
        args.lr,
    )
    renyi = pyro.infer.RenyiELBO(
        alpha=0, num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1
    )
    pyro_grads, pyro_opt = harness.pyro_side(
        renyi, vae.model, vae.guide, modules, num_data, args.lr
    )
    reference_opt = torch.optim.Adam(reference.parameters(), lr=args.lr)

    def reference_grads(x: torch.Tensor) -> float:
        loss = reference.loss(x, num_data, num_particles)
        loss.backward()
        return loss.item()

    harness.check_agreement(
        pvae_grads, reference_grads, pvae_params, list(reference.parameters()), batches[0]
    )
    # RenyiELBO takes the log-mean-exp of each particle's weight summed over the whole batch
    # (and scaled by N/B first), not per datapoint: it is IWAE only on a batch of one
    # datapoint standing for itself, where its arithmetic is checked.
    one, one_grads = (
        batches[0][:1],
        harness.pyro_side(renyi, vae.model, vae.guide, modules, 1, args.lr)[0],
    )

    def reference_one(x: torch.Tensor) -> float:
        loss = reference.loss(x, 1, num_particles)
        loss.backward()
        return loss.item()

    harness.check_agreement(
        one_grads, reference_one, pvae_params, list(reference.parameters()), one, "Pyro RenyiELBO"
    )

    steps = {
        "pvae IWAE": harness.with_optimizer(pvae_grads, pvae_opt),
        "Pyro RenyiELBO(alpha=0)": harness.with_optimizer(pyro_grads, pyro_opt),
        "hand-written": harness.with_optimizer(reference_grads, reference_opt),
    }
    ms = harness.interleave(steps, batches, args.repeats, args.warmup, args.clock)

    print(
        f"IWAE K={num_particles} activation={args.activation} data={args.data} N={num_data} "
        f"B={batch_size} repeats={args.repeats} steps={args.steps} {harness.machine_line(args)}"
    )
    harness.report(ms, reference="hand-written", warn_busy=False)
    harness.profile(steps["pvae IWAE"], batches, args.profile)


if __name__ == "__main__":
    main()
