"""Hostile inputs to ``pvae.sample``, ``SGHMC`` and ``Posterior``: each is refused with a
message naming what is wrong, before a wrong number is produced.

- observations outside ``pyro.plate("data")`` or in a plate of another name, under
  minibatches (today's posterior would be about 2x too wide in sd): refused as ``fit`` does;
- a discrete latent site; a latent site the model samples only after the chain's set-up;
- a chain that explodes while staying finite (``lr=1e6``): ``SamplingDiverged``, naming a
  checkpoint only when one was written;
- a checkpoint with NaN samples, or with an edited chain/step field; ``to_arviz`` of arrays
  whose shapes disagree.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

import pvae
from pvae.inference import SGHMC

QUICK = dict(num_samples=4, warmup=4, num_chains=2, batch_size=20, progress=False)


def regression_data(n=200):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    return x, 0.5 * x + torch.randn(n, generator=g)


def in_plate(name):
    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate(name, x.shape[0]):
            pyro.sample("y", dist.Normal(w * x, 1.0), obs=y)

    return model


def no_plate(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(w * x, 1.0).to_event(1), obs=y)


def regression(x, y):
    in_plate("data")(x, y)


@pytest.mark.parametrize(
    "model, match",
    [(no_plate, "it has none"), (in_plate("obs"), "plate 'obs' over the batch")],
    ids=["outside-any-plate", "other-plate-name"],
)
def test_observations_outside_the_data_plate_refused(model, match, tmp_path):
    with pytest.raises(ValueError, match=r"pyro.plate\('data'") as error:
        pvae.sample(model, regression_data(), run_dir=tmp_path / "run", **QUICK)
    assert match in str(error.value)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_observations_off_support_refused_as_fit_does():
    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=w * x), obs=y)

    x, y = regression_data()
    with pytest.raises(ValueError, match="support"):
        pvae.sample(model, (x, y), **QUICK)


def test_discrete_latent_refused():
    def model():
        pyro.sample("k", dist.Bernoulli(0.3))
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'k' is discrete"):
        pvae.sample(model, num_samples=2, warmup=0, progress=False)


def test_latent_site_appearing_after_setup_refused():
    calls = []

    def model():
        calls.append(None)
        pyro.sample("z", dist.Normal(0.0, 1.0))
        if len(calls) > 3:  # from the third step on
            pyro.sample("late", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"\['late'\].*did not sample when the chain was set up"):
        pvae.sample(model, num_samples=10, warmup=0, progress=False)


@pytest.mark.parametrize("adaptive", [True, False])
def test_exploding_chain_raises_sampling_diverged(adaptive):
    """lr = 1e6 makes the plain step (and the adaptive sampler's step before any warm-up)
    unstable: the state grows to |w| ~ 1e4 while every number stays finite."""
    with pytest.raises(pvae.SamplingDiverged, match="chain 0, step .*exploded") as error:
        pvae.sample(
            regression,
            regression_data(),
            sampler=SGHMC(lr=1e6, adaptive=adaptive),
            num_samples=200,
            warmup=0,
            batch_size=50,
            progress=False,
        )
    assert "checkpoint" not in str(error.value)


def test_diverged_names_the_checkpoint_only_when_written(tmp_path):
    options = dict(num_samples=200, warmup=0, batch_size=50, progress=False)
    with pytest.raises(pvae.SamplingDiverged) as error:
        pvae.sample(
            regression,
            regression_data(),
            sampler=SGHMC(lr=1e6, adaptive=False),
            run_dir=tmp_path / "late",
            checkpoint_every=1000,
            **options,
        )
    assert "checkpoint" not in str(error.value)
    with pytest.raises(pvae.SamplingDiverged) as error:
        pvae.sample(
            regression,
            regression_data(),
            sampler=SGHMC(lr=1e6, adaptive=False),
            run_dir=tmp_path / "early",
            checkpoint_every=1,
            **options,
        )
    assert str(tmp_path / "early" / "checkpoint.pt") in str(error.value)


def test_adaptive_sampler_stays_stable_at_a_huge_lr():
    """The adaptive step is capped by the minibatch noise, so lr = 1e6 does not explode."""
    post = pvae.sample(
        regression,
        regression_data(),
        sampler=SGHMC(lr=1e6),
        num_samples=100,
        warmup=200,
        batch_size=50,
        progress=False,
    )
    assert float(post.samples["w"].abs().max()) < 2.0


def finished_run(tmp_path):
    run_dir = tmp_path / "run"
    pvae.sample(regression, regression_data(), run_dir=run_dir, **QUICK)
    return run_dir, torch.load(run_dir / "checkpoint.pt", weights_only=True)


def test_resumed_checkpoint_with_nan_samples_refused(tmp_path):
    run_dir, state = finished_run(tmp_path)
    state["samples"]["w"][0, 1] = float("nan")
    torch.save(state, run_dir / "checkpoint.pt")
    with pytest.raises(ValueError, match="NaN"):
        pvae.sample(regression, regression_data(), run_dir=run_dir, resume=True, **QUICK)


# (chain 0, step 0) of a finished run is not damage: a checkpoint between chains is at step 0
@pytest.mark.parametrize("field, value", [("chain", -1), ("chain", 9), ("step", -1), ("step", "3")])
def test_tampered_chain_or_step_refused(tmp_path, field, value):
    run_dir, state = finished_run(tmp_path)
    state[field] = value
    torch.save(state, run_dir / "checkpoint.pt")
    with pytest.raises(ValueError, match="damaged|not a state of this sampler"):
        pvae.sample(regression, regression_data(), run_dir=run_dir, resume=True, **QUICK)


def test_sampler_state_without_its_keys_refused():
    sampler = SGHMC()
    sampler.setup(lambda: pyro.sample("z", dist.Normal(0.0, 1.0)), num_warmup=0)
    with pytest.raises(ValueError, match=r"lacks \['names'"):
        sampler.load_state_dict({})


def test_to_arviz_with_mismatched_shapes_refused():
    with pytest.raises(ValueError, match=r"samples\['w'\] has shape \(2, 10, 3\)"):
        pvae.Posterior(
            samples={"w": torch.zeros(2, 10, 3)},
            log_joint=torch.zeros(2, 9),
            warmup_log_joint=torch.zeros(2, 5),
        )
    post = pvae.Posterior(
        samples={"w": torch.zeros(2, 9, 3)},
        log_joint=torch.zeros(2, 9),
        warmup_log_joint=torch.zeros(2, 5),
    )
    post.samples["v"] = torch.zeros(3, 9)
    with pytest.raises(ValueError, match=r"samples\['v'\]"):
        post.to_arviz()
