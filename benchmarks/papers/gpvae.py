"""Fortuin et al. (2020), the GP-VAE, and Zhu et al. (2023), the Markovian GP-VAE, imputing
the missing pixels of ``hmnist-like`` sequences.

Claims.

- Fortuin et al. 2020 ("GP-VAE: Deep Probabilistic Time Series Imputation", AISTATS), Table 1,
  HMNIST rows: the GP-VAE imputes missing pixels with a lower MSE than mean imputation,
  forward imputation and a per-frame VAE (the abstract: it "outperforms several classical and
  deep learning-based data imputation methods"). Table 1's numbers could not be read this
  session (only the paper's first page and abstract came up), so the paper column is empty;
  the verdicts test the ordering GP-VAE < VAE < forward, mean imputation. Their HMNIST is
  28 x 28 MNIST digits rotated over T = 10 frames with 60% of the pixels missing; ours is
  the closest generator here (below).
- Zhu et al. 2023 ("Markovian Gaussian Process Variational Autoencoders", ICML), abstract:
  the Markovian GP-VAE "performs favourably compared to existing approaches whilst being
  computationally highly scalable" (linear-time training by Kalman filtering and smoothing,
  against the dense GP-VAE's cubic cost). Tested as: imputation MSE equal to the GP-VAE's or
  better, and CPU time per training step below the GP-VAE's, at the benchmark's T = 10 and
  at longer sequences (the same frames, T up to ``cost_steps``). No number of the paper is
  quoted (none was read).

Data: ``pvae.data.load("hmnist-like")`` (this package's generator, after HMNIST): 8 x 8
scikit-learn digits turned along smooth random angle paths (marginal sd pi/4), T = 10 frames,
each pixel hidden independently with probability 0.6, no whole frame hidden; generated with
seed 0 for every training seed. ``truth["observed"]`` is the per-entry mask and
``truth["frames"]`` the clean frames; the score is the MSE against the clean frames over the
hidden pixels of the test sequences (:func:`pvae.data.gp_sets.imputation_mse`).

Methods (every model: the same Gaussian likelihood of fixed scale ``scale`` on the observed
pixels only, the same MLP widths, Adam, ``pvae.fit`` with ``pvae.inference.ELBO``; the
imputation is the decoded posterior mean at the hidden pixels, the observed ones kept):

- **mean imputation**: each hidden pixel the mean of that pixel's observed training values
  (:func:`pvae.data.gp_sets.mean_pixel_baseline`);
- **forward imputation**: each hidden pixel its last observed value earlier in the sequence
  (the mean-imputation value before its first observation);
- **VAE**: :class:`pvae.models.VAE` applied to every frame on its own (a batch of ``batch_size
  * T`` frames a step, so every model takes the same number of steps), its likelihood masked
  to the observed pixels and its encoder shown zeros at the hidden ones (:class:`FrameVAE`);
  the paper's VAE baseline;
- **GP-VAE**: :class:`pvae.models.GPVAE` (Cauchy kernel, length scale 2 and scale 1, as in
  the authors' released HMNIST command: ``--length_scale 2 --sigma 1``), trained on the
  4-tuples of :func:`pvae.data.gp_sets.with_entry_mask`;
- **Markovian GP-VAE**: :class:`pvae.models.MarkovianGPVAE` (Matérn-3/2 channels, learned
  lengthscales, initial lengthscale 2) with its likelihood masked per entry
  (:class:`EntryMaskedMarkovianGPVAE`: the model file takes a mask per frame only).

The likelihood's fixed scale decides the GP-VAE-against-VAE gap. At a scale of 0.2 (the
recipe of ``tests/models/test_gp_vae.py``), 100 epochs, 3 seeds: VAE 0.0456 ± 0.0008, GP-VAE
0.0451 ± 0.0005, Markovian 0.0441 ± 0.0003, every validation curve flat from epoch 32 on; the
decoded posterior mean missed even the *observed* pixels by an MSE of 0.039-0.040 (seed 0,
60 epochs), about the likelihood's variance 0.2^2: the models fitted to the noise level the
likelihood allowed, and the decoder, not the inference over time, set the floor. Seed 0, 60
epochs, hidden-pixel MSE (VAE / GP-VAE): scale 0.2: 0.0469 / 0.0440; 0.1: 0.0439 / 0.0374
(Markovian 0.0331); 0.05: 0.0451 / 0.0393 (the VAE now fits the observed pixels to 0.021
and generalises worse). The GP-VAE at scale 0.1 with z_dim 4 / 8 / 16: 0.0395 / 0.0374 /
0.0430. The recipe is scale 0.1, z_dim 8.

Cost per step: the CPU clock (``time.process_time``) of one ELBO-and-gradient step (median
of ``cost_repeats`` after a warm-up step), of the GP-VAE and the Markovian GP-VAE built as
trained: on a training batch at T = 10, and on one sequence of the same kind of frames at
each T of ``cost_steps``.

Budget curve: each model's imputation MSE on the validation sequences at a few epochs of the
same run, against training seconds (``budget_curve.png``), for every model and seed.

By ``--budget``: ``tiny`` (16/8/8 sequences, 1 epoch), ``cpu`` (1,000/100/300 sequences, the
epochs of :func:`sizes`), ``paper`` (the 28 x 28 MNIST-5k source, 4,000/500/500 sequences;
the authors' README's HMNIST command: latent 256, encoder 256-256, 20 epochs; their decoder
256-256-256 and ``beta 0.8`` are not reproduced: our decoder mirrors the encoder and the
bound is the plain ELBO). Run: ``python benchmarks/papers/gpvae.py --budget cpu``.
"""

from __future__ import annotations

import math
import statistics
import time

import _common
import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

import pvae
from pvae.data.gp_sets import imputation_mse, mean_pixel_baseline, with_entry_mask
from pvae.inference import ELBO
from pvae.models import GPVAE, VAE, MarkovianGPVAE

MODELS = ("VAE", "GP-VAE", "Markovian GP-VAE")
BASELINES = ("mean imputation", "forward imputation")
MILLI = 1000.0  # verdict details quote MSE differences in units of 1e-3


class FrameVAE(VAE):
    """The VAE on single frames ``x (batch, x_dim)`` with a per-entry mask ``observed`` (same
    shape, bool): the likelihood scores the observed entries only and the encoder sees zeros
    at the others."""

    def model(self, x: Tensor, observed: Tensor) -> None:  # type: ignore[override]
        pyro.module(f"{self._pyro_name}.decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self._prior(x.shape[:1], x))
            frames = self.likelihood(self.decoder(z)).mask(observed)
            pyro.sample("x", frames.to_event(1), obs=x)

    def guide(self, x: Tensor, observed: Tensor) -> None:  # type: ignore[override]
        pyro.module(f"{self._pyro_name}.encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(torch.where(observed, x, 0.0))
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def impute(self, values: Tensor, times: Tensor, mask: Tensor, observed: Tensor) -> Tensor:
        """Sequences ``(B, T, *event)`` imputed frame by frame (``times``, ``mask`` unused)."""
        x, seen = values.flatten(2).flatten(0, 1), observed.flatten(2).flatten(0, 1)
        decoded = self.decode(self.encoder(torch.where(seen, x, 0.0))[0])
        return torch.where(seen, x, decoded).reshape(values.shape)


class EntryMaskedMarkovianGPVAE(MarkovianGPVAE):
    """:class:`pvae.models.MarkovianGPVAE` taking ``(values, times, mask, observed)``: the
    likelihood scores the entries where ``observed`` is True (the encoder sees the zeros that
    ``hmnist-like`` holds at hidden pixels, as the GP-VAE's does)."""

    def model(self, values, times=None, mask=None, observed=None):  # type: ignore[override]
        x, grid, mask = self._prepare(values, times, mask)
        entries = mask[..., None] & observed.reshape(x.shape)
        self._register("decoder")
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self._trajectory_prior(x.shape[1], grid))
            frames = self.likelihood(self.decoder(z[..., : self.z_dim]))
            pyro.sample("x", frames.mask(entries).to_event(2), obs=x)

    def guide(self, values, times=None, mask=None, observed=None):  # type: ignore[override]
        super().guide(values, times, mask)

    @torch.no_grad()
    def impute(self, values, times=None, mask=None, observed=None):  # type: ignore[override]
        x, grid, mask = self._prepare(values, times, mask)
        mean = self.decode(self._posterior(x, grid, mask).mean[..., : self.z_dim])
        seen = mask[..., None] & observed.reshape(x.shape)
        return torch.where(seen, x, mean).reshape(values.shape)


def sizes(args) -> dict:
    """Everything a budget sets: data, training and the cost measurement."""
    recipe = dict(z_dim=8, hidden=(128, 128), scale=0.1, lr=3e-3, batch_size=64)
    return _common.pick(
        args,
        tiny=recipe
        | dict(data=(16, 8, 8), source="digits", epochs=1, batch_size=8)
        | dict(cost_steps=(10, 20), cost_repeats=1),
        cpu=recipe
        | dict(data=(1000, 100, 300), source="digits", epochs=60)
        | dict(cost_steps=(10, 100, 1000), cost_repeats=3),
        paper=recipe
        | dict(z_dim=256, hidden=(256, 256), data=(4000, 500, 500), source="mnist5k")
        | dict(epochs=20, cost_steps=(10, 100, 1000, 3000), cost_repeats=5),
    )


def build(name: str, x_dim: int, size: dict):
    likelihood = dict(likelihood="gaussian", likelihood_kw={"scale": size["scale"]})
    common = dict(x_dim=x_dim, z_dim=size["z_dim"], hidden=size["hidden"], **likelihood)
    if name == "VAE":
        return FrameVAE(**common, name="frame_vae")
    if name == "GP-VAE":
        return GPVAE(**common, kernel="cauchy", length_scale=2.0, scale=1.0, name="gpvae_bench")
    return EntryMaskedMarkovianGPVAE(**common, nu=1.5, lengthscale=2.0, name="mgpvae_bench")


def frames_of(split: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """A 4-tuple split as the per-frame VAE's data: ``(B T, x_dim)`` values and mask."""
    values, _, _, observed = split
    return values.flatten(2).flatten(0, 1), observed.flatten(2).flatten(0, 1)


def forward_imputation(split: tuple[Tensor, ...], fallback: Tensor) -> Tensor:
    """Each hidden entry its last observed value earlier in its sequence; ``fallback``
    (shaped like the values) before the first observation."""
    values, _, _, observed = split
    last, seen, out = torch.zeros_like(values[:, 0]), torch.zeros_like(observed[:, 0]), []
    for t in range(values.shape[1]):
        fill = torch.where(seen, last, fallback[:, t])
        out.append(torch.where(observed[:, t], values[:, t], fill))
        last = torch.where(observed[:, t], values[:, t], last)
        seen = seen | observed[:, t]
    return torch.stack(out, 1)


def train(name: str, ds, size: dict, seed: int, device: torch.device) -> dict:
    """One model trained on the training sequences; its test imputation MSE, training
    seconds and budget curve (validation imputation MSE)."""
    _common.seed_all(seed)
    model = build(name, ds.x_dim, size).to(device)
    splits = {s: _common.to_device(with_entry_mask(ds, s), device) for s in ("train", "valid")}
    test = _common.to_device(with_entry_mask(ds, "test"), device)
    clean = {s: ds.truth[s]["frames"].to(device) for s in ("valid", "test")}

    def mse(split: tuple[Tensor, ...], truth: Tensor) -> float:
        was = model.training
        model.eval()
        imputed = model.impute(*split)
        model.train(was)
        hidden = ~split[3]
        return float((imputed - truth.to(imputed.dtype))[hidden].pow(2).mean())

    data = frames_of(splits["train"]) if name == "VAE" else splits["train"]
    steps = dict(epochs=size["epochs"], lr=size["lr"])
    steps["batch_size"] = size["batch_size"] * (ds.train.values.shape[1] if name == "VAE" else 1)
    seconds, curve = _common.fit_with_curve(
        model.model,
        model.guide,
        data,
        ELBO(),
        lambda: mse(splits["valid"], clean["valid"]),
        steps,
        seed,
    )
    model.eval()
    return dict(model=model, mse=mse(test, clean["test"]), seconds=seconds, curve=curve)


def step_cpu_ms(model, batch: tuple[Tensor, ...], repeats: int) -> float:
    """Median CPU milliseconds (process clock) of one ELBO-and-gradient step on ``batch``."""
    engine = ELBO()
    model.train()
    engine.loss_and_grads(model.model, model.guide, *batch)  # warm-up
    spent = []
    for _ in range(repeats):
        start = time.process_time()
        engine.loss_and_grads(model.model, model.guide, *batch)
        spent.append(1e3 * (time.process_time() - start))
    for param in pyro.get_param_store().values():
        param.grad = None
    return statistics.median(spent)


def step_costs(ds, size: dict, seed: int, device: torch.device) -> dict[str, dict[int, float]]:
    """CPU ms per step of the two GP models: ``"batch"`` (a training batch, T = 10) and
    one sequence at each T of ``size["cost_steps"]`` (``hmnist-like`` frames, same nets)."""
    costs: dict[str, dict[int, float]] = {}
    batch = tuple(t[: size["batch_size"]] for t in with_entry_mask(ds, "train"))
    for name in MODELS[1:]:
        _common.seed_all(seed)
        model = build(name, ds.x_dim, size).to(device)
        per = {0: step_cpu_ms(model, _common.to_device(batch, device), size["cost_repeats"])}
        for T in size["cost_steps"]:
            long = pvae.data.load(
                "hmnist-like", sizes=(1, 1, 1), num_steps=T, source=size["source"], seed=0
            )
            one = _common.to_device(with_entry_mask(long, "train"), device)
            per[T] = step_cpu_ms(model, one, size["cost_repeats"])
        costs[name] = per
    return costs


def ordering_claims(report, mse: dict[str, list[float]]) -> None:
    """Lower MSE is better: each pair (better, worse) of Table 1's ordering, paired by seed."""
    for better, worse in (
        ("GP-VAE", "VAE"),
        ("GP-VAE", "forward imputation"),
        ("GP-VAE", "mean imputation"),
        ("VAE", "forward imputation"),
        ("VAE", "mean imputation"),
    ):
        verdict, detail = _common.paired_verdict(
            [-MILLI * v for v in mse[better]], [-MILLI * v for v in mse[worse]], None
        )
        report.claim(
            f"{better} imputation MSE below {worse}'s",
            verdict,
            detail + " (MSE, theirs minus ours, in 1e-3)",
        )


def equal_quality_claim(report, mse: dict[str, list[float]]) -> None:
    """The Markovian GP-VAE's MSE equal to the GP-VAE's (within twice the paired standard
    error) or lower."""
    diffs = [MILLI * (m - g) for m, g in zip(mse["Markovian GP-VAE"], mse["GP-VAE"], strict=True)]
    mean, se = _common.mean_se(diffs)
    band = 2 * (se or 0.0)
    if mean <= -band and band > 0:
        verdict = "reproduced (lower MSE)"
    elif abs(mean) <= band:
        verdict = "reproduced (equal within seed noise)"
    elif mean < 0:
        verdict = "direction reproduced, within seed noise"
    else:
        verdict = "not reproduced"
    detail = f"Markovian minus dense MSE {_common.fmt(mean, se)} (1e-3) over {len(diffs)} seeds"
    report.claim("Markovian GP-VAE imputes as well as the GP-VAE", verdict, detail)


def cost_claims(report, costs: list[dict[str, dict[int, float]]], size: dict) -> None:
    """The Markovian step cheaper than the dense one: at the training batch (T = 10) and at
    each longer T (seed-paired ratios)."""
    for T in (0, *size["cost_steps"]):
        ratio = [c["Markovian GP-VAE"][T] / c["GP-VAE"][T] for c in costs]
        mean, se = _common.mean_se(ratio)
        where = f"a training batch of {size['batch_size']} at T = 10" if T == 0 else f"T = {T}"
        if mean < 1 and (se is None or mean + 2 * se < 1):
            verdict = "reproduced"
        elif mean < 1:
            verdict = "direction reproduced, within seed noise"
        else:
            verdict = f"not reproduced (x{mean:.2f} the dense step)"
        report.claim(
            f"Markovian GP-VAE step cheaper than the GP-VAE's ({where})",
            verdict,
            f"CPU time ratio Markovian / dense {_common.fmt(mean, se)} over {len(ratio)} seeds",
        )


def main() -> None:
    args = _common.parse_args("gpvae", __doc__)
    size = sizes(args)
    ds = pvae.data.load("hmnist-like", sizes=size["data"], source=size["source"], seed=0)
    seeds = list(range(args.seeds))
    report = _common.Report(args, "Fortuin et al. 2020 (GP-VAE), Zhu et al. 2023 (MGPVAE)", seeds)
    test = with_entry_mask(ds, "test")
    mean_fill = mean_pixel_baseline(ds, "test")
    baseline = {
        "mean imputation": imputation_mse(mean_fill, ds, "test"),
        "forward imputation": imputation_mse(forward_imputation(test, mean_fill), ds, "test"),
    }
    mse: dict[str, list[float]] = {name: [baseline[name]] * len(seeds) for name in BASELINES}
    seconds: dict[str, list[float]] = {name: [] for name in MODELS}
    curves: dict[str, list[dict]] = {}
    costs = []
    for seed in seeds:
        for name in MODELS:
            run = train(name, ds, size, seed, args.device)
            mse.setdefault(name, []).append(run["mse"])
            seconds[name].append(run["seconds"])
            curves[f"{name}, seed {seed}"] = run["curve"]
        costs.append(step_costs(ds, size, seed, args.device))

    side = int(math.isqrt(ds.x_dim))
    setting = f"hmnist-like {side}x{side}, T=10, 60% pixels missing"
    source = "Fortuin et al. 2020, Table 1, HMNIST, MSE (not read: left empty)"
    for name in (*BASELINES, *MODELS):
        cited = None if name == "Markovian GP-VAE" else source  # not in Fortuin et al.'s table
        report.add(setting, f"{name}: imputation MSE", mse[name], None, cited, digits=4)
    for name in MODELS:
        report.add(setting, f"{name}: training seconds", seconds[name], digits=1)
    for T in (0, *size["cost_steps"]):
        where = f"batch {size['batch_size']}, T = 10" if T == 0 else f"1 sequence, T = {T}"
        for name in MODELS[1:]:
            values = [c[name][T] for c in costs]
            report.add(f"step cost, {where}", f"{name}: CPU ms per step", values, digits=1)

    ordering_claims(report, mse)
    equal_quality_claim(report, mse)
    cost_claims(report, costs, size)
    report.notes.append(
        f"data: hmnist-like sizes {size['data']} (train/valid/test sequences, source "
        f"{size['source']}), generated with seed 0 for every training seed; z_dim "
        f"{size['z_dim']}, hidden {size['hidden']}, Gaussian likelihood of scale "
        f"{size['scale']} on the observed pixels; {size['epochs']} epochs, batch "
        f"{size['batch_size']} sequences (the VAE: their frames), Adam {size['lr']}, ELBO. "
        "MSE over the hidden pixels of the test sequences against the clean frames; the "
        "baselines are deterministic (one value repeated per seed)."
    )
    report.notes.append(
        "The paper column is empty: Fortuin et al.'s Table 1 could not be read this session, "
        "and their HMNIST is 28x28 MNIST; the verdicts test the paper's ordering. Step costs "
        "are CPU-clock medians (time.process_time) of one ELBO-and-gradient step, 1 thread."
    )
    report.notes.append(
        "budget curve: each model's imputation MSE on the validation sequences at a few epochs "
        "against training seconds (the wall clock of the run, without the scoring)."
    )
    _common.write_curves(report, curves, "validation imputation MSE (hidden pixels)")
    report.write()


if __name__ == "__main__":
    main()
