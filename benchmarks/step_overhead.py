"""Time of one ELBO training step: pvae's machinery against a hand-written PyTorch loop.

Three rows train the same VAE with the same arithmetic:

- encoder 784-400-(20 loc, 20 scale) with ReLU, ``scale = softplus(raw) + 1e-6``;
- decoder 20-400-784 with ReLU, Bernoulli likelihood with logits;
- prior N(0, I), analytic KL, one reparameterised sample ``z = loc + scale * eps``;
- loss ``-(sum log p(x | z) - KL) * N / B`` (batch B = 100 of N = 5000), Adam.

pvae side: what ``pvae.fit`` does per step, with its own helpers: the pair is wrapped with
``pvae.scale_to_data``, its parameters are found with ``pvae.train._discover_params`` and handed
to a ``torch.optim.Adam``; each step is ``engine.loss_and_grads(model, guide, x)``,
``opt.step()``, ``opt.zero_grad(set_to_none=True)``.

Pyro side: Pyro's ``TraceMeanField_ELBO`` (the same analytic-KL ELBO) on the same pair, wrapped
the same way, training the same modules with its own Adam (``elbo.loss_and_grads``, then the
optimiser: ``SVI.step`` without its param-store bookkeeping).

Reference side: plain ``nn.Linear`` layers holding copies of the same initial weights, the loss
written out by hand, ``loss.backward()``, the same Adam.

pvae's ELBO runs with its fast path (``ELBO(fast=True)``, the default: after the first
step, the guide and the model run under one light recorder each instead of Pyro's trace and
replay); with ``--breakdown`` a row ``pvae ELBO, traced`` times ``ELBO(fast=False)`` too.

With ``--breakdown``, a fourth row splits pvae's overhead in two: the pair's arithmetic as
pvae computes it (the same ``torch.distributions`` objects, the same analytic KL from
``kl_divergence`` and the same likelihood class, on the same modules) but without Pyro (no
handlers, plates, parameter sites or traces). Its distance to the hand-written row is the cost
of computing the bound through distribution objects; pvae's distance to it is the cost of
running the pair through Pyro and the engine.

The three are measured in one process, interleaved (blocks of ``--steps`` steps, rotating
which row goes first), after a warm-up; the figure is the median over ``--repeats`` blocks.
Before timing, one step of pvae and of Pyro on the same batch with the same seed checks that
each agrees with the reference in loss and gradients (all draw the same ``eps``).

    python benchmarks/step_overhead.py                     # zoo VAE, 2 threads
    python benchmarks/step_overhead.py --pair plain        # a plain pyro.module pair
    python benchmarks/step_overhead.py --validation        # Pyro's argument checks on every step
    python benchmarks/step_overhead.py --threads 1 --clock cpu --repeats 15   # on a busy machine
    python benchmarks/step_overhead.py --threads 1 --profile 200   # cProfile of 200 pvae steps
    python benchmarks/step_overhead.py --threads 1 --clock cpu --breakdown   # + the no-Pyro row

Timings taken while other jobs load the CPU are meaningless with two threads (blocks slow down
by orders of magnitude); the script warns when its blocks vary more than 1.5-fold.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import harness
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

import pvae
from pvae.inference import ELBO
from pvae.kl import kl_elements

X_DIM, HIDDEN, Z_DIM = 784, 400, 20
MIN_SCALE = pvae.nets.MIN_SCALE


# --------------------------------------------------------------------------------------------
# The pvae side


def zoo_pair() -> tuple[Callable, Callable, nn.Module, nn.Module]:
    """``pvae.models.VAE`` with one hidden layer of 400."""
    from pvae.models import VAE

    vae = VAE(x_dim=X_DIM, z_dim=Z_DIM, hidden=(HIDDEN,), likelihood="bernoulli")
    return vae.model, vae.guide, vae.encoder, vae.decoder


def plain_pair() -> tuple[Callable, Callable, nn.Module, nn.Module]:
    """A user's pair: plain ``nn.Module``s registered with ``pyro.module``."""
    encoder = pvae.nets.MLPEncoder(X_DIM, Z_DIM, hidden=(HIDDEN,))
    decoder = pvae.nets.MLPDecoder(Z_DIM, X_DIM, hidden=(HIDDEN,))

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide, encoder, decoder


LIKELIHOODS: dict[str, Callable[[torch.Tensor], dist.TorchDistribution]] = {
    "zoo": pvae.likelihoods.get("bernoulli", X_DIM),  # the zoo VAE's likelihood class
    "plain": lambda logits: dist.Bernoulli(logits=logits),
}
"""The likelihood of each pair, for the ``--breakdown`` row (no parameters of its own)."""


def distributions_loss(
    encoder: nn.Module,
    decoder: nn.Module,
    likelihood: Callable[[torch.Tensor], dist.TorchDistribution],
    x: torch.Tensor,
    num_data: int,
) -> torch.Tensor:
    """The pair's negative full-data ELBO estimate as pvae computes it, without Pyro: the
    guide's and the prior's ``Normal(...).to_event(1)``, ``rsample``, the analytic KL of
    :func:`pvae.kl.kl_elements` and the likelihood's ``log_prob``, each summed and scaled by
    N/B. ``x``: ``(B, 784)``."""
    loc, scale = encoder(x)
    q = dist.Normal(loc, scale).to_event(1)
    z = q.rsample()
    prior = dist.Normal(x.new_zeros(loc.shape), 1.0).to_event(1)
    kl = kl_elements(q, prior, z)[0].sum(-1).sum()
    log_lik = likelihood(decoder(z)).to_event(1).log_prob(x).sum()
    return -(log_lik - kl) * (num_data / x.shape[0])


# --------------------------------------------------------------------------------------------
# The hand-written reference


class Reference(nn.Module):
    """The same networks as plain ``nn.Linear`` layers and the ELBO written out."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.enc_hidden = nn.Linear(X_DIM, HIDDEN)
        self.enc_out = nn.Linear(HIDDEN, 2 * Z_DIM)
        self.dec_hidden = nn.Linear(Z_DIM, HIDDEN)
        self.dec_out = nn.Linear(HIDDEN, X_DIM)
        enc = [m for m in encoder.modules() if isinstance(m, nn.Linear)]
        dec = [m for m in decoder.modules() if isinstance(m, nn.Linear)]
        assert len(enc) == 2 and len(dec) == 2, "expected one hidden layer on each side"
        with torch.no_grad():
            for mine, theirs in zip(
                (self.enc_hidden, self.enc_out, self.dec_hidden, self.dec_out),
                enc + dec,
                strict=True,
            ):
                mine.load_state_dict(theirs.state_dict())

    def loss(self, x: torch.Tensor, num_data: int) -> torch.Tensor:
        """Negative full-data ELBO estimate of the batch ``x`` ``(B, 784)``."""
        loc, raw = self.enc_out(F.relu(self.enc_hidden(x))).chunk(2, dim=-1)
        scale = F.softplus(raw) + MIN_SCALE
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        logits = self.dec_out(F.relu(self.dec_hidden(z)))
        log_lik = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        kl = (0.5 * (scale.pow(2) + loc.pow(2) - 1.0) - scale.log()).sum(-1)
        return -(log_lik - kl).sum() * (num_data / x.shape[0])


def _ordered(reference: Reference) -> list[torch.Tensor]:
    """Reference parameters in the order encoder then decoder, weight then bias."""
    layers = (reference.enc_hidden, reference.enc_out, reference.dec_hidden, reference.dec_out)
    return [p for layer in layers for p in layer.parameters()]


# --------------------------------------------------------------------------------------------
# Measurement


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_timing_args(parser, repeats=7, steps=50, warmup=20)
    parser.add_argument("--pair", choices=("zoo", "plain"), default="zoo")
    harness.add_data_args(parser)
    harness.add_clock_arg(parser)
    harness.add_validation_arg(parser)
    harness.add_profile_arg(parser)
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="add a row computing the same distributions and KL without Pyro (see above)",
    )
    args = parser.parse_args(argv)

    num_data, batches = harness.prepare(args)
    batch_size = args.batch_size

    model, guide, encoder, decoder = (zoo_pair if args.pair == "zoo" else plain_pair)()
    reference = Reference(encoder, decoder)
    modules = (encoder, decoder)

    pvae_grads, pvae_params, pvae_opt = harness.pvae_side(
        ELBO(), model, guide, modules, num_data, batches[0], args.lr
    )
    pyro_grads, pyro_opt = harness.pyro_side(
        pyro.infer.TraceMeanField_ELBO(), model, guide, modules, num_data, args.lr
    )
    reference_opt = torch.optim.Adam(reference.parameters(), lr=args.lr)

    def reference_grads(x: torch.Tensor) -> float:
        loss = reference.loss(x, num_data)
        loss.backward()
        return loss.item()

    likelihood = LIKELIHOODS[args.pair]
    no_pyro_opt = torch.optim.Adam(pvae_params, lr=args.lr)

    def no_pyro_grads(x: torch.Tensor) -> float:
        loss = distributions_loss(encoder, decoder, likelihood, x, num_data)
        loss.backward()
        return loss.item()

    sides = [("pvae ELBO", pvae_grads), ("Pyro TraceMeanField_ELBO", pyro_grads)]
    if args.breakdown:
        sides.append(("distributions, no Pyro", no_pyro_grads))
        traced_grads, _, traced_opt = harness.pvae_side(
            ELBO(fast=False), model, guide, modules, num_data, batches[0], args.lr
        )
        sides.append(("pvae ELBO, traced", traced_grads))
    for name, grads in sides:
        harness.check_agreement(
            grads, reference_grads, pvae_params, _ordered(reference), batches[0], name
        )

    steps = {
        "pvae ELBO": harness.with_optimizer(pvae_grads, pvae_opt),
        "Pyro TraceMeanField_ELBO": harness.with_optimizer(pyro_grads, pyro_opt),
        "hand-written": harness.with_optimizer(reference_grads, reference_opt),
    }
    if args.breakdown:
        steps["distributions, no Pyro"] = harness.with_optimizer(no_pyro_grads, no_pyro_opt)
        steps["pvae ELBO, traced"] = harness.with_optimizer(traced_grads, traced_opt)
    ms = harness.interleave(steps, batches, args.repeats, args.warmup, args.clock)

    print(
        f"pair={args.pair} data={args.data} N={num_data} B={batch_size} repeats={args.repeats} "
        f"steps={args.steps} {harness.machine_line(args)}"
    )
    harness.report(ms, reference="hand-written")
    harness.profile(steps["pvae ELBO"], batches, args.profile)


if __name__ == "__main__":
    main()
