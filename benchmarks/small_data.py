"""Small data: a Bayesian autoencoder (SGHMC) against a VAE of the same architecture.

Data: MNIST-5k (``pvae.data.load("mnist5k", binarize="static")``), the first 200 or 500
training images; the 500 test images. Both models: encoder 784-H-Z and decoder Z-H-784 with
ReLU, Bernoulli likelihood (H = 100, Z = 10 by default; ``--hidden``, ``--z-dim``).

- BayesianAE (``pvae.models.BayesianAE``, N(0, s^2) priors, s = ``--prior-scale`` (0.1), or
  chosen among 0.03, 0.1, 0.3, 1 by ``select_prior`` (DSWD, Tran et al.) with
  ``--select-prior``): ``pvae.sample`` with ``SGHMC``'s defaults (adaptive; initial weights
  uniform in (-0.1, 0.1)), ``--chains`` chains (4), full batches, ``--warmup`` steps then
  ``--draws`` draws every ``--thin`` steps. Convergence is judged where it means something for a
  network whose weights have symmetries (permuted hidden units): R-hat of the log joint and of
  each draw's mean test log-likelihood, across chains (rank-normalised split R-hat, ArviZ).
- VAE (``pvae.models.VAE``, the same widths): ``pvae.fit`` with the ELBO, Adam, for as many
  steps as the sampler takes, and the parameters of the epoch with the best validation ELBO
  (the 500 validation images: early stopping, what one does with a VAE on small data).

What is compared on the test images (nats per image, higher is better):

- ``recon LL``: log (1/S) sum_s p(x | decoder(encoder(x))): for the BAE over S posterior
  draws of the weights; for the VAE over S draws z_s ~ q(z | x) (its encoder's uncertainty;
  the same log-mean-exp form).
- ``E_q recon``: the VAE's ELBO reconstruction term E_q[log p(x | z)] (S draws), for reference.
- ``ECE``: expected calibration error of the per-pixel predictive probabilities p_hat (the
  mean of the Bernoulli probabilities over the S draws): pixels are put into 10 equal bins of
  p_hat, ECE = sum_b (n_b / n) |mean p_hat in b - frequency of 1s in b|.

    python benchmarks/small_data.py                       # both sizes, about 5 min on 1 core
    python benchmarks/small_data.py --sizes 200 --warmup 500
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from typing import Any

import arviz
import numpy as np
import pyro
import torch
from torch import Tensor

import pvae
from pvae.inference import ELBO, SGHMC
from pvae.models import VAE, BayesianAE


def expected_calibration_error(probs: Tensor, x: Tensor, bins: int = 10) -> float:
    """ECE of Bernoulli probabilities ``probs`` against binary ``x`` (same shape)."""
    probs, x = probs.reshape(-1), x.reshape(-1)
    index = (probs * bins).long().clamp(0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        if count:
            total += count * abs(float(probs[mask].mean()) - float(x[mask].mean()))
    return total / probs.numel()


def sample_bae(train: Tensor, args: argparse.Namespace) -> tuple[BayesianAE, Any, float, SGHMC]:
    """The BayesianAE (its prior scale chosen by DSWD with ``args.select_prior``, the choice
    kept in its ``prior_selection``) and its posterior: ``args.chains`` chains of SGHMC on
    full batches; also the sampling seconds and the sampler (its last chain's state)."""
    pyro.clear_param_store()
    bae = BayesianAE(
        784, args.z_dim, hidden=(args.hidden,), likelihood="bernoulli", prior_scale=args.prior_scale
    )
    if args.select_prior:
        selection = bae.select_prior(train, scales=(0.03, 0.1, 0.3, 1.0), metric="dswd")
        bae.prior_selection = selection
    sampler = SGHMC(**sampler_options(args))
    started = time.perf_counter()
    posterior = pvae.sample(
        bae.model,
        train,
        sampler,
        num_samples=args.draws,
        warmup=args.warmup,
        thin=args.thin,
        num_chains=args.chains,
        batch_size=len(train),
        seed=args.seed,
        progress=False,
    )
    return bae, posterior, time.perf_counter() - started, sampler


@torch.no_grad()
def bae_draw_log_likelihood(bae: BayesianAE, posterior: Any, test: Tensor) -> Tensor:
    """Each draw's mean test log-likelihood log p(x | f(x; theta_s)), ``(chains, draws)``."""
    per_draw = [
        bae.likelihood(bae.network(test, e, d)).to_event(1).log_prob(test).mean()
        for e, d in bae.draws(posterior)
    ]
    return torch.stack(per_draw).reshape(posterior.num_chains, posterior.num_samples)


def bae_scores(bae: BayesianAE, posterior: Any, test: Tensor, draws: int) -> dict[str, float]:
    """Test recon LL and ECE over ``draws`` evenly spaced posterior draws, and R-hat."""
    probs, _ = bae.reconstruct(posterior, test, num_samples=draws)
    return {
        "recon_ll": float(bae.log_likelihood(posterior, test, num_samples=draws).mean()),
        "eq_recon": math.nan,
        "ece": expected_calibration_error(probs, test),
        "scale": next(iter(bae.prior_scale.values())),
        "rhat_log_joint": _rhat(posterior.log_joint),
        "rhat_test_ll": _rhat(bae_draw_log_likelihood(bae, posterior, test)),
    }


def run_bae(train: Tensor, test: Tensor, args: argparse.Namespace) -> dict[str, float]:
    bae, posterior, seconds, _ = sample_bae(train, args)
    return {**bae_scores(bae, posterior, test, args.draws), "seconds": seconds}


def sampler_options(args: argparse.Namespace) -> dict:
    options = {"init_radius": args.init_radius}
    if args.sghmc_lr is not None:
        options["lr"] = args.sghmc_lr
    if args.friction is not None:
        options["friction"] = args.friction
    return options


def _rhat(values: Tensor) -> float:
    """Rank-normalised split R-hat of a scalar ``(chains, draws)``; NaN with one chain."""
    if values.shape[0] < 2:
        return math.nan
    return float(arviz.rhat(np.asarray(values.double().numpy())))


@torch.no_grad()
def _vae_scores(vae: VAE, test: Tensor, draws: int) -> tuple[float, float, Tensor]:
    loc, scale = vae.encoder(test)
    z = loc + scale * torch.randn(draws, *loc.shape)
    logits = vae.decoder(z)  # (S, n, 784)
    log_p = vae.likelihood(logits).to_event(1).log_prob(test)  # (S, n)
    recon_ll = float((torch.logsumexp(log_p, 0) - math.log(draws)).mean())
    return recon_ll, float(log_p.mean()), torch.sigmoid(logits).mean(0)


def build_vae(args: argparse.Namespace) -> VAE:
    """The VAE of the BayesianAE's widths (a fresh parameter store, seeded by ``args.seed``)."""
    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    return VAE(784, args.z_dim, hidden=(args.hidden,), likelihood="bernoulli")


def vae_schedule(num_data: int, args: argparse.Namespace) -> tuple[int, int]:
    """The VAE's batch size and epochs: about as many steps as one chain of the sampler."""
    batch = min(100, num_data)
    steps = args.warmup + args.draws * args.thin
    return batch, max(1, steps // math.ceil(num_data / batch))


def train_vae(
    vae: VAE, train: Tensor, valid: Tensor, args: argparse.Namespace, callbacks: Sequence = ()
) -> float:
    """Train ``vae`` with the ELBO (Adam 1e-3, batches of 100) for as many steps as one chain
    of the sampler takes and keep the parameters of its best validation epoch; returns the
    training seconds (``callbacks`` go to ``pvae.fit`` after the keeper)."""
    batch, epochs = vae_schedule(len(train), args)
    best = {"valid": -math.inf, "state": None}

    def keep_best(run, record) -> None:
        if record.get("valid_bound") is not None and record["valid_bound"] > best["valid"]:
            best["valid"] = record["valid_bound"]
            best["state"] = {k: v.detach().clone() for k, v in vae.state_dict().items()}

    started = time.perf_counter()
    pvae.fit(
        vae.model,
        vae.guide,
        train,
        engine=ELBO(),
        epochs=epochs,
        batch_size=batch,
        lr=1e-3,
        valid=valid,
        seed=args.seed,
        progress=False,
        callbacks=[keep_best, *callbacks],
    )
    seconds = time.perf_counter() - started
    if best["state"] is not None:
        vae.load_state_dict(best["state"])
    return seconds


def vae_scores(vae: VAE, test: Tensor, draws: int, seed: int) -> dict[str, float]:
    """Test recon LL, E_q recon and ECE over ``draws`` codes z ~ q(z | x)."""
    torch.manual_seed(seed)
    recon_ll, eq_recon, probs = _vae_scores(vae, test, draws)
    return {
        "recon_ll": recon_ll,
        "eq_recon": eq_recon,
        "ece": expected_calibration_error(probs, test),
        "scale": math.nan,
        "rhat_log_joint": math.nan,
        "rhat_test_ll": math.nan,
    }


def run_vae(train: Tensor, valid: Tensor, test: Tensor, args: argparse.Namespace) -> dict:
    vae = build_vae(args)
    seconds = train_vae(vae, train, valid, args)
    return {**vae_scores(vae, test, args.draws, args.seed), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,500", help="training-set sizes")
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--z-dim", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1500)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--thin", type=int, default=10)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--sghmc-lr", type=float, default=None, help="default: SGHMC's")
    parser.add_argument("--init-radius", type=float, default=0.1)
    parser.add_argument("--prior-scale", type=float, default=0.1)
    parser.add_argument("--friction", type=float, default=None, help="default: SGHMC's")
    parser.add_argument("--select-prior", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ds = pvae.data.load("mnist5k", binarize="static", seed=args.seed)
    test, valid = ds.test, ds.valid
    steps = args.warmup + args.draws * args.thin
    print(
        f"MNIST-5k (static binarisation), 784-{args.hidden}-{args.z_dim} MLPs, "
        f"{len(test)} test images, {steps} steps each, {args.threads} thread(s)"
    )
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        train = ds.train[:size]
        rows.append((size, "BayesianAE (SGHMC)", run_bae(train, test, args)))
        rows.append((size, "VAE (ELBO, early stopped)", run_vae(train, valid, test, args)))
    print()
    print(
        "prior scale chosen by DSWD:",
        {size: r["scale"] for size, _, r in rows if r["scale"] == r["scale"]},
    )
    print(
        "| train images | model | test recon LL (log-mean over S draws) | VAE E_q recon | ECE "
        "| R-hat (log joint, test LL) | seconds |"
    )
    print("|---:|---|---:|---:|---:|---|---:|")
    for size, name, r in rows:
        eq = "" if math.isnan(r["eq_recon"]) else f"{r['eq_recon']:.1f}"
        rhat = (
            ""
            if math.isnan(r["rhat_log_joint"])
            else f"{r['rhat_log_joint']:.3f}, {r['rhat_test_ll']:.3f}"
        )
        print(
            f"| {size} | {name} | {r['recon_ll']:.1f} | {eq} | {r['ece']:.4f} | {rhat} | "
            f"{r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
