"""The ELBO's fast path (light recorders after the first traced step) against the traced path.

Each case runs the same pair, seeds and parameters through ``ELBO(fast=False)`` (every step
traced) and ``ELBO(fast=True)``, step by step, and asks for the same loss, bound and gradients
(float64: to 1e-10 relative; the two paths do the same arithmetic on the same site messages,
so in practice they agree bit for bit), and that the fast engine did use its fast path.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

import pvae
from pvae.inference import ELBO

N, B, X, Z = 40, 8, 5, 3
STEPS = 4


class Pair(nn.Module):
    """A small VAE-like pair with the branches the fast path must reproduce.

    ``options``: ``subsample`` (the data plate subsamples B of N itself), ``mask`` (the
    latent masked per datapoint by ``poutine.mask``, the observation by ``.mask``),
    ``scale`` (``poutine.scale`` on the latent), ``glob``
    (a global latent outside the data plate), ``extra`` (an extra observed site, toggled
    between steps), ``discrete`` (the latent drawn from a Poisson: no ``rsample``).
    """

    def __init__(self, **options: bool):
        super().__init__()
        self.options = dict(options)
        self.enc = nn.Linear(X, 2 * Z).double()
        self.dec = nn.Linear(Z, X).double()
        self.w_loc = nn.Parameter(torch.zeros(X, dtype=torch.float64))

    def _plate(self, x: torch.Tensor):
        if self.options.get("subsample"):
            return pyro.plate("data", N, subsample_size=B)
        return pyro.plate("data", x.shape[0])

    def _rows(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return x[indices] if self.options.get("subsample") else x

    def model(self, x: torch.Tensor) -> None:
        pyro.module("dec", self.dec)
        shift = 0.0
        if self.options.get("glob"):
            shift = pyro.sample("w", dist.Normal(torch.zeros(X, dtype=x.dtype), 1.0).to_event(1))
        with self._plate(x) as plate:
            rows = self._rows(x, plate)
            prior = dist.Normal(rows.new_zeros(rows.shape[0], Z), 1.0).to_event(1)
            if self.options.get("discrete"):
                prior = dist.Poisson(rows.new_ones(rows.shape[0], Z)).to_event(1)
            keep = rows[:, 0] > 0 if self.options.get("mask") else True
            with poutine.scale(scale=0.5 if self.options.get("scale") else 1.0):
                with poutine.mask(mask=keep):
                    z = pyro.sample("z", prior)
            likelihood = dist.Normal(self.dec(z) + shift, 1.0).to_event(1)
            if self.options.get("mask"):
                likelihood = likelihood.mask(rows[:, 0] > 0)
            pyro.sample("x", likelihood, obs=rows)
            if self.options.get("extra"):
                pyro.sample("y", dist.Normal(z.sum(-1), 1.0), obs=rows.sum(-1))

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("enc", self.enc)
        if self.options.get("glob"):
            pyro.sample("w", dist.Normal(self.w_loc, 0.5).to_event(1))
        with self._plate(x) as plate:
            rows = self._rows(x, plate)
            loc, raw = self.enc(rows).chunk(2, -1)
            scale = nn.functional.softplus(raw) + 1e-3
            q = dist.Normal(loc, scale).to_event(1)
            if self.options.get("discrete"):
                q = dist.Poisson(scale).to_event(1)
            keep = rows[:, 0] > 0 if self.options.get("mask") else True
            with poutine.scale(scale=0.5 if self.options.get("scale") else 1.0):
                with poutine.mask(mask=keep):
                    pyro.sample("z", q)


def _step(engine: ELBO, pair: Pair, model: Callable, guide: Callable, x: torch.Tensor, seed: int):
    """One training step at ``seed``: (loss, bound, gradients by parameter name)."""
    pair.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    record = engine.train_step(model, guide, x)
    grads = {n: p.grad.clone() for n, p in pair.named_parameters() if p.grad is not None}
    return record.loss, record.bound, record.extras, grads


def _compare(pair: Pair, engine_args: dict, batches: list[torch.Tensor], toggle=None) -> ELBO:
    """Step both engines through ``batches`` and check each step agrees; returns the fast one.
    ``toggle(step)`` may change the pair's options before a step (a structure change)."""
    pyro.clear_param_store()
    model = pvae.scale_to_data(pair.model, N)
    guide = pvae.scale_to_data(pair.guide, N)
    traced, fast = ELBO(fast=False, **engine_args), ELBO(**engine_args)
    for step, x in enumerate(batches):
        if toggle is not None:
            toggle(step)
        want = _step(traced, pair, model, guide, x, seed=step)
        got = _step(fast, pair, model, guide, x, seed=step)
        assert got[0] == pytest.approx(want[0], rel=1e-10, abs=1e-10), step
        assert got[1] == pytest.approx(want[1], rel=1e-10, abs=1e-10), step
        assert got[2] == want[2], step  # bound_source: scaled latents flagged alike
        assert got[3].keys() == want[3].keys() and got[3], step
        for name, grad in want[3].items():
            torch.testing.assert_close(got[3][name], grad, rtol=1e-10, atol=1e-12)
    assert traced.fast_steps == 0
    return fast


def _data() -> torch.Tensor:
    """The N datapoints, ``(N, X)``."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(N, X, generator=generator, dtype=torch.float64)


def _batches(rows: int = B) -> list[torch.Tensor]:
    """``STEPS`` minibatches of ``rows`` rows."""
    data = _data()
    return [data[i * rows : (i + 1) * rows] for i in range(STEPS)]


@pytest.mark.parametrize(
    "engine_args",
    [
        {},  # reparameterised, analytic KL
        {"analytic_kl": False},  # Monte-Carlo KL
        {"estimator": "stl"},
        {"estimator": "stl", "analytic_kl": False},
        {"num_particles": 3},  # vectorised particles
        {"num_particles": 3, "vectorize_particles": False},
        {"beta": 0.5, "free_bits": 0.1},
    ],
    ids=["reparam", "mc-kl", "stl", "stl-mc", "particles", "loop", "beta-free-bits"],
)
def test_fast_path_matches_traced_path(engine_args: dict) -> None:
    fast = _compare(Pair(glob=True), engine_args, _batches())
    loops = 1 if engine_args.get("vectorize_particles", True) else 3
    assert fast.fast_steps == STEPS * loops - 1 and fast.fast_learns == 1


@pytest.mark.parametrize("option", ["subsample", "mask", "scale"])
def test_fast_path_plate_mask_and_scale(option: str) -> None:
    for args in ({}, {"analytic_kl": False, "num_particles": 2}):
        # a subsampling plate takes the whole data set and draws its own B rows
        batches = [_data()] * STEPS if option == "subsample" else _batches()
        fast = _compare(Pair(**{option: True}), args, batches)
        assert fast.fast_steps == STEPS - 1 and fast.fast_learns == 1


def test_structure_change_falls_back_and_relearns() -> None:
    """A site added and removed, and the batch size changed, mid-training: each new structure
    is checked afresh (``fast_learns`` counts the traced first step and each change)."""
    pair = Pair()
    batches = _batches() + _batches(rows=B // 2)  # steps 4..7 with another batch size

    def toggle(step: int) -> None:
        pair.options["extra"] = step in (2, 3)

    fast = _compare(pair, {}, batches, toggle)
    # structures: steps 0-1 (traced first), 2-3 (extra site), 4-7 (smaller batch): 3 learns
    assert fast.fast_learns == 3 and fast.fast_steps == len(batches) - 1


def test_non_reparameterised_site_is_refused_on_both_paths() -> None:
    """A guide latent without rsample mid-training (after fast steps) is refused as on the
    traced path, and never learned as a fast structure."""
    pair = Pair()
    pyro.clear_param_store()
    model, guide = pvae.scale_to_data(pair.model, N), pvae.scale_to_data(pair.guide, N)
    for engine in (ELBO(fast=False), ELBO()):
        pair.options["discrete"] = False
        for x in _batches()[:2]:
            engine.train_step(model, guide, x)
        pair.options["discrete"] = True
        with pytest.raises(ValueError, match="reparameterised guide samples.*'z'"):
            engine.train_step(model, guide, _batches()[2])


def test_fast_option_is_checked_and_not_a_setting() -> None:
    with pytest.raises(TypeError, match="fast must be True or False"):
        ELBO(fast=1)  # type: ignore[arg-type]
    assert ELBO(fast=False).settings() == ELBO().settings()
