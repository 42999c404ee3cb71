"""Gondur et al. (ICLR 2024), the MM-GPVAE: shared and modality-private GP latents identified.

Claim (the paper's abstract, on its simulated data: Poisson spike counts and MNIST digits that
rotate and scale smoothly over time): the MM-GPVAE "is able to ... identify the shared and
independent latent structure across modalities accurately". The paper shows this as
true-against-inferred latent paths on held-out trials (its simulated-data figure); its R^2
values were not read this session (only the abstract could be opened here), so the paper
column is left empty and the goal is the one this project set: held-out R^2 >= 0.9 for each of
the three groups (shared, neural-private, image-private) and a small cross-group R^2 (below
0.1: no group explains another's latent).

Data: ``mm-gp-sim`` (``pvae.data``), the closest generator here to the paper's set: one
shared, one neural-private and one image-private RBF-GP latent (lengthscale 6 bins, T = 50);
20 Poisson neurons driven by ``[z_s, z_n]``; one 8x8 scikit-learn digit turned by
``pi/4 z_s`` and scaled by ``exp(0.2 z_i)`` (the paper: 36x36 MNIST digits, 100 neurons,
T = 60). Metric: :func:`pvae.diagnostics.identification_r2` (affine least squares from the
inferred posterior-mean paths of a group to the true ones, fitted on half of the test
trials and scored on the other half, over every time bin).

Model: ``MultimodalGPVAE`` with the Fourier-domain RBF prior and the recipe of
:func:`recipe` (tutorial 06's), trained with ``pvae.fit`` and ``pvae.inference.ELBO``. The
budget curve is the smallest of the three diagonal R^2 against training seconds.

The image likelihood is the one setting that decides the image-private group. Measured with
seed 0 (200 trials, batch 50, Adam 5e-3, Pyro's ``Trace_ELBO``), the image group's held-out
R^2 after 225 / 450 / 675 / 900 steps: continuous Bernoulli 0.50 / 0.46 / 0.43 / 0.44 (falling:
not the budget; a cubic map of the inferred path reaches only 0.55-0.59, so not the linear
metric either); Gaussian of scale 1 0.94 / 0.97 / 0.97; Gaussian of scale 0.1 -0.02 after 225
(the shared group falls to 0.15: the pixels outweigh the spikes). The frames themselves carry
the size: a linear map of the 64 clean pixels predicts it with R^2 0.998. The paper's model
has a normal likelihood for images (so its OpenReview reviews summarise it; not read in the
paper's text here); a fixed scale of 1 is the recipe here.

Open: the recovery depends on the seed. At the cpu budget seed 0 identifies every group, seeds
1 and 2 do not, from the first checkpoint to the last (the budget curve): with seed 1 after 36
epochs the inferred image-private channel carries the rotation (R^2 0.40 on the true shared
latent), the shared and neural channels share a rotated mix of the two neural-side latents
(the Poisson loading is invariant to rotations of that 2-D subspace), and the size is lost.
Twelve warm-up epochs with the private channels cut from the decoders did not escape it.

By ``--budget``: ``tiny`` (24 training trials, 2 epochs), ``cpu`` (200 trials, the recipe's
epochs), ``paper`` (400 trials, T = 60, 100 neurons, 700 epochs of batch 20 as in the
authors' released ``hyperparams.py``, with our learning rate). Run:
``python benchmarks/papers/mmgpvae.py --budget cpu``.
"""

from __future__ import annotations

import _common
import torch

import pvae
from pvae.inference import ELBO
from pvae.models import MultimodalGPVAE
from pvae.models.multimodal_gp import identification_metrics

GROUPS = ("shared", "neural", "image")
TARGET = 0.9  # this project's goal for each group's held-out R^2
CROSS = 0.1  # the largest cross-group R^2 counted as "small"


def recipe() -> dict:
    """The model and optimiser settings every budget shares (tutorial 06 uses the same)."""
    return dict(
        hidden=(128,),
        lengthscale=5.0,
        image_likelihood="gaussian",
        image_likelihood_kw={"scale": 1.0},
        lr=5e-3,
        batch_size=50,
    )


def run(ds, sizes: dict, seed: int, device: torch.device) -> dict:
    """One seed: fit, then the held-out identification R^2 per group and across groups."""
    _common.seed_all(seed)
    settings = recipe()
    model = MultimodalGPVAE(
        ds.num_neurons,
        hidden=settings["hidden"],
        lengthscale=settings["lengthscale"],
        image_likelihood=settings["image_likelihood"],
        image_likelihood_kw=settings["image_likelihood_kw"],
        name=f"mmgpvae_{seed}",
    ).to(device)
    train = _common.to_device(tuple(ds.train), device)

    def worst() -> float:
        metrics = identification_metrics(model, ds)
        return min(metrics[f"r2_{g}"] for g in GROUPS)

    fit_sizes = dict(
        epochs=sizes["epochs"],
        batch_size=sizes.get("batch_size", settings["batch_size"]),
        lr=settings["lr"],
    )
    seconds, curve = _common.fit_with_curve(
        model.model, model.guide, train, ELBO(), worst, fit_sizes, seed
    )
    model.cpu()
    metrics = identification_metrics(model, ds)
    return dict(metrics=metrics, seconds=seconds, curve=curve)


def main() -> None:
    args = _common.parse_args("mmgpvae", __doc__)
    sizes = _common.pick(
        args,
        tiny=dict(data=dict(sizes=(24, 0, 16), num_steps=20), epochs=2),
        cpu=dict(data=dict(sizes=(200, 0, 100)), epochs=120),
        paper=dict(
            data=dict(sizes=(400, 0, 100), num_steps=60, num_neurons=100),
            epochs=700,
            batch_size=20,
        ),
    )
    seeds = list(range(args.seeds))
    report = _common.Report(args, "Gondur et al. 2024 (MM-GPVAE)", seeds)
    ds = pvae.data.load("mm-gp-sim", seed=0, **sizes["data"])
    runs = [run(ds, sizes, s, args.device) for s in seeds]
    for g in GROUPS:
        values = [r["metrics"][f"r2_{g}"] for r in runs]
        row = report.add(f"{g} latent", "held-out R^2 (true from inferred)", values, digits=3)
        mean, se = row["mean"], row["se"] or 0.0
        verdict = (
            "reproduced" if mean >= TARGET else f"not reproduced, short by {TARGET - mean:.3f}"
        )
        detail = f"R^2 {_common.fmt(mean, se, 3)} over {len(values)} seeds; goal >= {TARGET}"
        report.claim(f"the {g} latent group is identified (R^2 >= {TARGET})", verdict, detail)
    cross = [r["metrics"]["r2_cross_max"] for r in runs]
    row = report.add("across groups", "largest cross-group R^2", cross, digits=3)
    verdict = "reproduced" if max(cross) < CROSS else "not reproduced"
    report.claim(
        f"no group explains another's latent (cross-group R^2 < {CROSS} in every seed)",
        verdict,
        f"largest over seeds {max(cross):.3f}",
    )
    report.add("training", "seconds per seed", [r["seconds"] for r in runs], digits=1)
    settings = recipe()
    report.notes.append(
        f"mm-gp-sim {sizes['data']}, seed 0; MultimodalGPVAE(hidden={settings['hidden']}, "
        f"lengthscale={settings['lengthscale']}, Fourier prior, Gaussian image likelihood of "
        f"scale 1), {sizes['epochs']} epochs, "
        f"batch {sizes.get('batch_size', settings['batch_size'])}, Adam {settings['lr']}, "
        "pvae.inference.ELBO; R^2 held out (fitted on half the test trials, scored on the "
        "other half)."
    )
    curves = {f"seed {s}": r["curve"] for s, r in zip(seeds, runs, strict=True)}
    _common.write_curves(report, curves, "smallest per-group held-out R^2")
    report.write()


if __name__ == "__main__":
    main()
