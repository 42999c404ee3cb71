"""Saha et al. (2025), the ARD-VAE: automatic relevance determination of latent dimensions.

Claim: with a hierarchical prior on the latent variances (re-estimated from encoded data once
per epoch), the relevant latent set (the fewest dimensions whose decoder-Jacobian relevance
scores reach 99% of the total) has the size of the data's true number of factors, without
that number being given; on real data it reports how many dimensions the model uses.

1. Generated data with a known answer: x = W z_true + 0.1 eps, z_true in R^3 with scales
   (3, 2, 1), W with orthonormal columns, D = 20; an ARD-VAE with 8 latents and linear
   encoder and decoder (Gaussian likelihood). The expected relevant-set size is the
   generator's 3 factors (the "paper" column holds this truth, the number the paper's
   synthetic experiment is designed to recover; no table value is quoted).
2. MNIST-5k (dynamically binarised, Bernoulli, 784-200-200-50 ReLU): the relevant count beside
   the active units (variance over the data of E_q[z | x] above 0.01, Burda et al. 2016) of
   the same model. The paper's MNIST figure was not read this session; no paper number.

By ``--budget``: ``tiny`` (3 epochs on the generated set; 100 MNIST images, 1 epoch), ``cpu``
(150 epochs; 4,000 images, 150 epochs), ``paper`` (500 epochs; 4,000 images, 200 epochs).
Run: ``python benchmarks/papers/ard.py --budget cpu``.
"""

from __future__ import annotations

import _common
import torch

import pvae
from pvae.data import DynamicBinarized
from pvae.diagnostics import active_units
from pvae.models import ARDVAE

TRUE_FACTORS = 3
SOURCE = "the generator's number of factors (Saha et al. 2025's synthetic setting)"


def three_factors(seed: int, n: int = 1000, x_dim: int = 20, noise: float = 0.1):
    """``(train, valid)``: x = W z_true + noise * eps, z_true scales (3, 2, 1), split 80/20."""
    g = torch.Generator().manual_seed(seed)
    W, _ = torch.linalg.qr(torch.randn(x_dim, TRUE_FACTORS, generator=g))
    z = torch.randn(n, TRUE_FACTORS, generator=g) * torch.tensor([3.0, 2.0, 1.0])
    x = z @ W.T + noise * torch.randn(n, x_dim, generator=g)
    cut = int(0.8 * n)
    return x[:cut], x[cut:]


def run(ard: ARDVAE, train, valid, sizes: dict, seed: int) -> dict:
    """Fit with the per-epoch prior update; the budget curve is the relevant count."""

    def count() -> float:
        return float(ard.relevance(valid).count)

    seconds, curve = _common.fit_with_curve(
        ard.model,
        ard.guide,
        train,
        None,
        count,
        sizes,
        seed,
        callbacks=[ard.prior_callback(valid)],
    )
    relevance = ard.relevance(valid)
    units = active_units(ard.guide, valid).count
    return dict(count=relevance.count, units=units, seconds=seconds, curve=curve)


def main() -> None:
    args = _common.parse_args("ard", __doc__)
    synthetic = _common.pick(
        args,
        tiny=dict(epochs=3, batch_size=100, lr=1e-2),
        cpu=dict(epochs=150, batch_size=100, lr=1e-2),
        paper=dict(epochs=500, batch_size=100, lr=1e-2),
    )
    mnist = _common.pick(
        args,
        tiny=dict(train=100, valid=50, epochs=1, batch_size=100, lr=1e-3),
        cpu=dict(train=4000, valid=500, epochs=150, batch_size=100, lr=1e-3),
        paper=dict(train=4000, valid=500, epochs=200, batch_size=100, lr=1e-3),
    )
    seeds = list(range(args.seeds))
    report = _common.Report(args, "Saha et al. 2025 (ARD-VAE)", seeds)
    curves = {}

    generated = []
    for seed in seeds:
        _common.seed_all(seed)
        train, valid = _common.to_device(three_factors(seed), args.device)
        ard = ARDVAE(20, 8, hidden=(), likelihood="gaussian").to(args.device)
        generated.append(run(ard, train, valid, synthetic, seed))
        curves[f"generated, seed {seed}"] = generated[-1]["curve"]
    setting = "generated: 3 factors, D = 20, 8 latents, linear"
    row = report.add(
        setting, "relevant set size", [r["count"] for r in generated], TRUE_FACTORS, SOURCE, 1
    )
    report.add(setting, "active units", [r["units"] for r in generated], digits=1)
    report.add(setting, "training seconds", [r["seconds"] for r in generated], digits=1)
    exact = sum(r["count"] == TRUE_FACTORS for r in generated)
    verdict = "reproduced" if exact == len(seeds) else f"not reproduced ({exact}/{len(seeds)})"
    report.claim(
        "the relevant set has the data's 3 factors on every seed",
        verdict,
        f"sizes {[r['count'] for r in generated]}, mean {row['mean']:.2f}",
    )

    ds = pvae.data.load("mnist5k", seed=0, binarize="dynamic")
    train = _common.to_device(DynamicBinarized(ds.train.probs[: mnist["train"]]), args.device)
    valid = ds.valid[: mnist["valid"]].to(args.device)
    images = []
    for seed in seeds:
        _common.seed_all(seed)
        ard = ARDVAE(784, 50, hidden=(200, 200), likelihood="bernoulli").to(args.device)
        images.append(run(ard, train, valid, mnist, seed))
        curves[f"MNIST-5k, seed {seed}"] = images[-1]["curve"]
    setting = "MNIST-5k, 50 latents, 784-200-200-50"
    report.add(setting, "relevant set size", [r["count"] for r in images], digits=1)
    report.add(setting, "active units", [r["units"] for r in images], digits=1)
    report.add(setting, "training seconds", [r["seconds"] for r in images], digits=1)
    report.notes.append(
        f"generated: 800 training / 200 validation points, {synthetic['epochs']} epochs, batch "
        f"100, Adam 1e-2; MNIST-5k: {mnist['train']} training images, {mnist['valid']} "
        f"validation images (prior updates, relevance, active units), {mnist['epochs']} "
        "epochs, Adam 1e-3. Budget curve: the relevant count against training seconds."
    )
    _common.write_curves(report, curves, "relevant set size")
    report.write()


if __name__ == "__main__":
    main()
