"""Time of one SGHMC step: ``pvae.inference.SGHMC`` on a Pyro model against a hand-written torch
SGHMC step with the same networks and the same arithmetic.

The model: the zoo's ``pvae.models.BayesianAE`` (every weight and bias a ``PyroSample`` site
with an N(0, 1) prior, read outside the data plate): encoder 784-200-20 and decoder 20-200-784
with ReLU, Bernoulli likelihood with logits, x in the data plate scaled N/B (B = 100 of
N = 5000).

pvae side: what ``pvae.sample`` does per step after warm-up: ``sampler.train_step(model, None,
x)`` on the model wrapped with ``pvae.scale_to_data`` (the adaptive sampler, its preconditioner
frozen), with its fast potential (the default) and, as ``pvae fast=False``, the plain handler.
Reference side: the same weights as plain tensors, the log joint written out by hand
(log priors with torch's ``Normal`` density of a scalar loc and scale broadcast over each
weight tensor, as the model's priors compute it, + N/B *
Bernoulli log-likelihood), ``torch.autograd.grad``, and the same update
``v <- (1 - alpha) v + eta * grad + noise * eps; theta <- theta + v`` with the same frozen
per-coordinate ``eta`` and ``noise`` tensors. Both are timed in one process, interleaved,
after a warm-up; the figure is the median over ``--repeats`` blocks. A third row,
``hand-prior``, writes the prior as ``-t^2 / 2``, what a hand-written loop would do: its gap to
``reference`` is the cost of the Normal log-density on every weight, not of pvae.

    python benchmarks/sghmc_overhead.py
    python benchmarks/sghmc_overhead.py --threads 1 --clock cpu --repeats 15
    python benchmarks/sghmc_overhead.py --threads 1 --profile 200
"""

from __future__ import annotations

import argparse

import harness
import torch
import torch.nn.functional as F

import pvae
from pvae.inference import SGHMC
from pvae.models import BayesianAE

X_DIM, HIDDEN, Z_DIM = 784, 200, 20


def _network(x: torch.Tensor, weights: list) -> torch.Tensor:
    (w1, b1), (w2, b2), (w3, b3), (w4, b4) = weights
    code = F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)
    return F.linear(F.relu(F.linear(code, w3, b3)), w4, b4)


def reference_step(
    sampler: SGHMC, num_data: int, site_names: list[tuple[str, str]], prior_as_pyro: bool = True
):
    """A hand-written SGHMC step on copies of the sampler's state (the same frozen eta and
    noise), with the same site order (the sampler's).

    ``prior_as_pyro``: the N(0, 1) log prior as the model computes it (torch's ``Normal``
    log-density of a scalar loc and scale broadcast over the weights, the same arithmetic);
    False: the ``-t^2 / 2`` sum a hand-written loop would use (the model's arithmetic differs).
    """
    theta = [t.detach().clone().requires_grad_(True) for t in sampler.theta]
    velocity = [v.clone() for v in sampler.velocity]
    eta, noise = sampler._eta, sampler._noise
    alpha = sampler.alpha
    generator = torch.Generator().manual_seed(0)
    zero, one = torch.zeros(()), torch.ones(())
    order = {name: i for i, name in enumerate(sampler.names)}

    def step(x: torch.Tensor) -> float:
        weights = [(theta[order[w]], theta[order[b]]) for w, b in site_names]
        logits = _network(x, weights)
        log_lik = -F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        if prior_as_pyro:
            log_prior = sum(torch.distributions.Normal(zero, one).log_prob(t).sum() for t in theta)
        else:
            log_prior = sum(-0.5 * (t * t).sum() for t in theta) - 0.5 * sum(
                t.numel() for t in theta
            ) * torch.log(torch.tensor(2 * torch.pi))
        log_joint = log_prior + log_lik * (num_data / x.shape[0])
        grads = torch.autograd.grad(log_joint, theta)
        with torch.no_grad():
            for t, v, g, e, s in zip(theta, velocity, grads, eta, noise, strict=True):
                draw = torch.randn(v.shape, generator=generator)
                v.mul_(1 - alpha).add_(g * e).add_(draw * s)
                t.add_(v)
        return float(log_joint.detach())

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_timing_args(parser, repeats=7, steps=30, warmup=20)
    harness.add_data_args(parser)
    harness.add_clock_arg(parser)
    harness.add_validation_arg(parser)
    harness.add_profile_arg(parser)
    args = parser.parse_args()
    num_data, batches = harness.prepare(args)
    print(harness.machine_line(args))

    bae = BayesianAE(x_dim=X_DIM, z_dim=Z_DIM, hidden=(HIDDEN,), likelihood="bernoulli")
    model = pvae.scale_to_data(bae.model, num_data)
    sampler = SGHMC()
    sampler.setup(model, (batches[0],), num_data=num_data, num_warmup=10, seed=0)
    for x in batches[:10]:  # warm-up: the preconditioner is estimated, then frozen
        sampler.train_step(model, None, x)

    # agreement: the same log joint at the same state
    reference = reference_step(sampler, num_data, bae.site_names)
    ours = float(sampler.log_joint(model, batches[0]).detach())
    theirs = reference(batches[0])
    print(f"log joint: pvae {ours:.4f}, reference {theirs:.4f}")
    assert abs(ours - theirs) <= 1e-4 * abs(theirs), (ours, theirs)

    def pvae_step(x: torch.Tensor) -> float:
        return sampler.train_step(model, None, x).loss

    plain = SGHMC(fast=False)
    plain.setup(model, (batches[0],), num_data=num_data, num_warmup=10, seed=0)
    plain.load_state_dict(sampler.state_dict())

    def plain_step(x: torch.Tensor) -> float:
        return plain.train_step(model, None, x).loss

    hand_prior = reference_step(sampler, num_data, bae.site_names, prior_as_pyro=False)
    steps = {"pvae": pvae_step, "pvae fast=False": plain_step}
    ms = harness.interleave(
        {**steps, "reference": reference, "hand-prior": hand_prior},
        batches,
        args.repeats,
        args.warmup,
        args.clock,
    )
    harness.report(ms)
    print(
        "reference: the model's own arithmetic (torch Normal log-prior) written by hand; "
        "hand-prior: the cheaper -t^2/2 prior (the gap to it is the prior's arithmetic, "
        "not pvae's machinery)"
    )
    harness.profile(pvae_step, batches, args.profile)


if __name__ == "__main__":
    main()
