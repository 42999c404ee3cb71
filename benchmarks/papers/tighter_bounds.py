"""Rainforth et al. (2018), "Tighter Variational Bounds are Not Necessarily Better".

Claims:

1. With the IWAE bound, the signal-to-noise ratio (|E g| / std g, per parameter) of the
   guide's gradient falls as the number of samples K grows, O(sqrt(M / K)), while the model's
   rises, O(sqrt(M K)) (the paper's Theorem 1; M is the number of IWAE bounds averaged).
   Going from K = 1 to K = 64 the scaling law predicts a guide-SNR ratio of 1/8 and a
   model-SNR ratio of 8: these are the "paper" numbers in the report (asymptotic orders, not
   measurements).
2. MIWAE (M = 8, K = 8), CIWAE (beta = 0.5, K = 64) and PIWAE (M = 8, K = 8: the model follows
   IWAE_64, the guide MIWAE(8, 8)) train better models than IWAE with the same 64 samples: a
   higher test log p(x) (the paper's MNIST experiments, Section 5, reported in figures; no
   table value is quoted here), and their guide's gradient SNR is above IWAE's.

Our setting (as ``pvae compare`` on MNIST-5k): 784-200-200-50 ReLU VAE, Bernoulli,
dynamically binarised, 64 samples of z per datapoint and step for every bound, Adam 1e-3;
test log p(x) by importance sampling; gradient SNR on a fixed batch of test images after
training (``pvae.diagnostics.gradient_snr``). By ``--budget``:

- ``tiny``: 100 images, 1 epoch, batch 100, log p(x) with K = 20 on 20 test images, SNR from
  3 repeats.
- ``cpu``: 4,000 images, 5 epochs at batch 20 (1,000 steps; a step costs about the same CPU
  per image at batch 20 as at 100, and 8 epochs at batch 100, 320 steps, left MIWAE and CIWAE
  below IWAE: early in training IWAE's better model gradient leads), log p(x) with K = 1000
  on 500 test images, SNR from 100 repeats on 50 test images, plus the budget curve.
- ``paper``: 4,000 images, 500 epochs, batch 100, K = 5000 on 500 test images (the paper's
  MNIST runs are far longer; this is the GPU-sized version of the same experiment).

Run: ``python benchmarks/papers/tighter_bounds.py --budget cpu``.
"""

from __future__ import annotations

import _common

import pvae
from pvae.data import DynamicBinarized
from pvae.diagnostics import gradient_snr
from pvae.inference import CIWAE, IWAE, MIWAE, PIWAE
from pvae.models import VAE

SOURCE = "Rainforth et al. 2018, Theorem 1 (SNR orders), K = 1 -> 64"
BOUNDS = {
    "IWAE(64)": lambda: IWAE(num_particles=64),
    "MIWAE(8x8)": lambda: MIWAE(num_outer=8, num_inner=8),
    "CIWAE(0.5, 64)": lambda: CIWAE(num_particles=64, beta=0.5),
    "PIWAE(8x8)": lambda: PIWAE(num_outer=8, num_inner=8),
}


def one_run(data, bound: str, seed: int, sizes: dict, device) -> dict:
    _common.seed_all(seed)
    vae = VAE(784, 50, hidden=(200, 200)).to(device)
    seconds, curve = _common.fit_with_curve(
        vae.model,
        vae.guide,
        data["train"],
        BOUNDS[bound](),
        _common.log_px_score(vae, data["probe"], sizes["curve_k"]),
        sizes,
        seed,
    )
    ll = pvae.log_likelihood(vae.model, vae.guide, data["test"], num_samples=sizes["test_k"])
    out = dict(log_px=float(ll.mean()), seconds=seconds, curve=curve)
    snr_batch, repeats = data["snr"], sizes["snr_repeats"]
    snr = gradient_snr(vae.model, vae.guide, snr_batch, BOUNDS[bound](), num_repeats=repeats)
    out.update(guide_snr=snr.guide, model_snr=snr.model)
    if bound == "IWAE(64)":  # the SNR against K, on the same trained model (K = 64: above)
        out["guide_snr_k64"], out["model_snr_k64"] = snr.guide, snr.model
        snr = gradient_snr(vae.model, vae.guide, snr_batch, IWAE(num_particles=1), repeats)
        out["guide_snr_k1"], out["model_snr_k1"] = snr.guide, snr.model
    return out


def main() -> None:
    args = _common.parse_args("tighter_bounds", __doc__)
    sizes = _common.pick(
        args,
        tiny=dict(
            train=100,
            test=20,
            probe=10,
            snr=10,
            epochs=1,
            batch_size=100,
            test_k=20,
            curve_k=5,
            snr_repeats=3,
        ),
        cpu=dict(
            train=4000,
            test=500,
            probe=200,
            snr=50,
            epochs=5,
            batch_size=20,
            test_k=1000,
            curve_k=100,
            snr_repeats=100,
        ),
        paper=dict(
            train=4000,
            test=500,
            probe=500,
            snr=100,
            epochs=500,
            batch_size=100,
            test_k=5000,
            curve_k=1000,
            snr_repeats=1000,
        ),
    )
    ds = pvae.data.load("mnist5k", seed=0, binarize="dynamic")
    data = dict(
        train=DynamicBinarized(ds.train.probs[: sizes["train"]]),
        test=ds.test[: sizes["test"]],
        probe=ds.test[: sizes["probe"]],
        snr=ds.test[: sizes["snr"]],
    )
    data = {key: _common.to_device(value, args.device) for key, value in data.items()}
    seeds = list(range(args.seeds))
    report = _common.Report(args, "Rainforth et al. 2018 (tighter bounds)", seeds)
    report.notes.append(
        f"data mnist5k: {sizes['train']} training images, {sizes['test']} test images; "
        f"{sizes['epochs']} epochs, batch {sizes['batch_size']}; test log p(x) with "
        f"K = {sizes['test_k']}; SNR: {sizes['snr_repeats']} repeats on {sizes['snr']} images."
    )
    results = {
        bound: [one_run(data, bound, s, sizes, args.device) for s in seeds] for bound in BOUNDS
    }
    curves = {}
    for bound, runs in results.items():
        report.add(bound, "test log p(x)", [r["log_px"] for r in runs])
        report.add(bound, "guide SNR", [r["guide_snr"] for r in runs], digits=3)
        report.add(bound, "model SNR", [r["model_snr"] for r in runs], digits=3)
        report.add(bound, "training seconds", [r["seconds"] for r in runs], digits=0)
        curves.update({f"{bound}, seed {s}": r["curve"] for s, r in zip(seeds, runs, strict=True)})
    iwae = results["IWAE(64)"]
    for side, law in (("guide", 1 / 8), ("model", 8.0)):
        ratios = [r[f"{side}_snr_k64"] / r[f"{side}_snr_k1"] for r in iwae]
        report.add(
            "IWAE, trained model, K = 1 -> 64", f"{side} SNR ratio", ratios, law, SOURCE, digits=3
        )
    guide = [r["guide_snr_k1"] - r["guide_snr_k64"] for r in iwae]
    verdict, detail = _common.paired_verdict(guide, [0.0] * len(guide), None)
    report.claim("IWAE's guide SNR falls from K = 1 to K = 64", verdict, detail)
    model = [r["model_snr_k64"] - r["model_snr_k1"] for r in iwae]
    verdict, detail = _common.paired_verdict(model, [0.0] * len(model), None)
    report.claim("IWAE's model SNR rises from K = 1 to K = 64", verdict, detail)
    for bound in ("MIWAE(8x8)", "CIWAE(0.5, 64)", "PIWAE(8x8)"):
        runs = results[bound]
        for what, key in (("test log p(x)", "log_px"), ("guide SNR", "guide_snr")):
            verdict, detail = _common.paired_verdict(
                [r[key] for r in runs], [r[key] for r in iwae], None
            )
            report.claim(f"{bound} above IWAE(64) in {what}", verdict, detail)
    _common.write_curves(report, curves, "test log p(x) (budget-curve yardstick)")
    report.write()


if __name__ == "__main__":
    main()
