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
:func:`recipe`, trained with ``pvae.fit`` and ``pvae.inference.ELBO``. The
budget curve is the smallest of the three diagonal R^2 against training seconds.

The image likelihood is the one setting that decides the image-private group. Measured with
seed 0 (200 trials, batch 50, Adam 5e-3, Pyro's ``Trace_ELBO``), the image group's held-out
R^2 after 225 / 450 / 675 / 900 steps: continuous Bernoulli 0.50 / 0.46 / 0.43 / 0.44 (falling:
not the budget; a cubic map of the inferred path reaches only 0.55-0.59, so not the linear
metric either); Gaussian of scale 1 0.94 / 0.97 / 0.97; Gaussian of scale 0.1 -0.02 after 225
(the shared group falls to 0.15: the pixels outweigh the spikes). The frames themselves carry
the size: a linear map of the 64 clean pixels predicts it with R^2 0.998. The paper's model
has a normal likelihood for images (so its OpenReview reviews summarise it; not read in the
paper's text here); a fixed scale is the recipe here (0.3 with the staged start below).

A staged start decides which channel carries what. With a Gaussian of scale 1 from the first
step, seeds 1, 2 and 3 (of 0-3, 120 epochs) let the image-private channel take the rotation that
the shared one should carry, and the size is lost (image R^2 0.00; the final training ELBO
ranks the runs: -4731 for seed 0, which identifies every group, against -4781 to -4836). Cutting
the image-private channel from the image decoder for the first epochs
(:meth:`MultimodalGPVAE.private_off`), with the pixels weighted up (Gaussian scale 0.3), makes
the shared channel follow the rotation before the private one may speak: shared R^2 >= 0.99
and image R^2 >= 0.96 for each of seeds 0, 1, 2, 3, 6 (60 of 200 epochs). Weighting the
pixels alone (scale 0.5), the closed-form Poisson term alone, or cutting both private channels
did not. The neural-private channel is the weak group: the spikes see ``[z_s, z_n]`` through a
linear map, so a path ``z_n + b z_s`` (renormalised) explains them as well, and only the
prior's independence of the groups (a KL of about ``T log sqrt(1 + b^2)`` per trial) pulls ``b``
to zero, slowly: neural R^2 0.65-0.83 after 200 epochs for seeds 1, 3, 6, 0.90 and 0.88 after
400 for seeds 1 and 3. The cpu budget therefore trains 600 epochs, the first 60 with the cut:
shared 0.999, neural 0.968 +- 0.013, image 0.990 +- 0.003, largest cross-group R^2 0.024, over
seeds 0, 1, 2 (276 s of CPU).

By ``--budget``: ``tiny`` (24 training trials, 2 epochs), ``cpu`` (200 trials, 600
epochs), ``paper`` (400 trials, T = 60, 100 neurons, 700 epochs of batch 20 as in the
authors' released ``hyperparams.py``, with our learning rate). Run:
``python benchmarks/papers/mmgpvae.py --budget cpu``.
"""

from __future__ import annotations

import contextlib

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
    """The model and optimiser settings every budget shares (tutorial 06 trains one seed
    with a Gaussian of scale 1 and no staged start, which identifies every group for that seed)."""
    return dict(
        hidden=(128,),
        lengthscale=5.0,
        image_likelihood="gaussian",
        image_likelihood_kw={"scale": 0.3},
        lr=5e-3,
        batch_size=50,
        staged_fraction=0.1,  # of the epochs with the image-private channel cut
    )


class StagedStart:
    """A ``pvae.fit`` callback: ``model``'s image decoder reads only the shared channels
    until ``epochs`` epochs are done (:meth:`MultimodalGPVAE.private_off`)."""

    def __init__(self, model: MultimodalGPVAE, epochs: int):
        self.epochs, self.stage = epochs, contextlib.ExitStack()
        if epochs > 0:
            self.stage.enter_context(model.private_off("image"))

    def __call__(self, run, record: dict) -> None:
        if record["epoch"] + 1 >= self.epochs:
            self.stage.close()


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
    staged = StagedStart(model, round(settings["staged_fraction"] * sizes["epochs"]))
    with staged.stage:  # closed after its epochs, or here if training stops early
        seconds, curve = _common.fit_with_curve(
            model.model, model.guide, train, ELBO(), worst, fit_sizes, seed, callbacks=[staged]
        )
    model.cpu()
    metrics = identification_metrics(model, ds)
    return dict(metrics=metrics, seconds=seconds, curve=curve)


def main() -> None:
    args = _common.parse_args("mmgpvae", __doc__)
    sizes = _common.pick(
        args,
        tiny=dict(data=dict(sizes=(24, 0, 16), num_steps=20), epochs=2),
        cpu=dict(data=dict(sizes=(200, 0, 100)), epochs=600),
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
        f"scale {settings['image_likelihood_kw']['scale']}), {sizes['epochs']} epochs, the first "
        f"{settings['staged_fraction']:.0%} with the image-private channel cut, "
        f"batch {sizes.get('batch_size', settings['batch_size'])}, Adam {settings['lr']}, "
        "pvae.inference.ELBO; R^2 held out (fitted on half the test trials, scored on the "
        "other half)."
    )
    curves = {f"seed {s}": r["curve"] for s, r in zip(seeds, runs, strict=True)}
    _common.write_curves(report, curves, "smallest per-group held-out R^2")
    report.write()


if __name__ == "__main__":
    main()
