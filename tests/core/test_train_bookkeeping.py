"""What the training loop did, recorded and compared with what it should have done, on cases
small enough to check by hand (N=10, B=4): which datapoints each step saw, how a short last
batch weighs in an epoch's bound, and which parameters each phase of aggressive encoder
training moves."""

from __future__ import annotations

from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pytest
import torch

import pvae
from pvae.inference import ELBO, LinearAnnealing
from pvae.train import AggressiveEncoder, StepContext, _encoder_steps


class RecordingPair:
    """x_i ~ N(b, 1) with a latent z_i that the guide draws from its prior: the ELBO of each
    datapoint is exactly log N(x_i; b, 1) (log p(z) - log q(z) = 0 at every draw). The guide
    records the batches it sees; a step callback marks where each step ended."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []
        self.batches: list[torch.Tensor] = []

    def model(self, x: torch.Tensor) -> None:
        b = pyro.param("b", torch.zeros(()))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(b, 1.0), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        self.seen.append(x.detach().clone())
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    def step_done(self, run, record) -> None:
        self.batches.append(self.seen[-1])  # the batch of the step that just ended

    def fit(self, data, **kwargs):
        pyro.clear_param_store()
        return pvae.fit(
            self.model,
            self.guide,
            data,
            engine=ELBO(),
            batch_size=4,
            lr=0.0,
            progress=False,
            step_callbacks=[self.step_done],
            **kwargs,
        )


def test_each_epoch_sees_every_datapoint_once_in_a_new_order():
    pair = RecordingPair()
    x = torch.arange(10.0)
    pair.fit(x, epochs=3, seed=5)
    assert [len(b) for b in pair.batches] == [4, 4, 2] * 3
    epochs = [torch.cat(pair.batches[3 * e : 3 * e + 3]) for e in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(10))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    # the order is a function of (seed, epoch): the same seed repeats it, another changes it
    again = RecordingPair()
    again.fit(x, epochs=3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(pair.batches, again.batches, strict=True))
    other = RecordingPair()
    other.fit(x, epochs=1, seed=6)
    assert not torch.equal(torch.cat(other.batches), epochs[0])


def test_a_short_last_batch_counts_by_its_size_in_the_epoch_bound():
    # N=10, B=4: batches of 4, 4 and 2. The epoch's bound is the mean over datapoints of the
    # per-datapoint bound (exact here), not the mean of the three batch means.
    pair = RecordingPair()
    x = torch.tensor([0.0, 0.5, -1.0, 2.0, 1.5, -0.5, 3.0, -2.5, 0.25, 4.0])
    valid = torch.tensor([1.0, -1.0, 2.0])
    run = pair.fit(x, epochs=2, seed=1, valid=valid)
    exact = torch.distributions.Normal(0.0, 1.0).log_prob(x)
    for record in run.history:
        assert record["train_bound"] == pytest.approx(float(exact.mean()), abs=1e-5)
        assert record["valid_bound"] == pytest.approx(
            float(torch.distributions.Normal(0.0, 1.0).log_prob(valid).mean()), abs=1e-5
        )
    batch_means = [
        float(torch.distributions.Normal(0.0, 1.0).log_prob(b).mean()) for b in pair.batches[:3]
    ]
    assert abs(sum(batch_means) / 3 - float(exact.mean())) > 1e-2  # the wrong rule differs
    # each step's record is the N/B-scaled bound of its own batch
    for step, batch in zip(run.steps, pair.batches, strict=True):
        scaled = float(torch.distributions.Normal(0.0, 1.0).log_prob(batch).sum()) * 10 / len(batch)
        assert step["bound"] == pytest.approx(scaled, abs=1e-4)


class TwoSidedPair:
    """A linear-Gaussian VAE with a model parameter (the decoder weight) and guide parameters
    (the encoder's weight and scale)."""

    def model(self, x: torch.Tensor) -> None:
        w = pyro.param("decoder_w", torch.tensor(0.3))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(w * z, 0.5), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        v = pyro.param("encoder_v", torch.tensor(0.1))
        s = pyro.param("encoder_s", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(v * x, s))


def _params(names):
    store = pyro.get_param_store()
    return {n: store[n].detach().clone() for n in names}


def test_aggressive_encoder_steps_move_only_the_guide_and_leave_the_engine_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pair, x = TwoSidedPair(), torch.randn(10)
    engine = ELBO(beta=LinearAnnealing(5))  # a schedule: its step counter is engine state
    engine.loss_and_grads(pair.model, pair.guide, x[:4])  # creates the parameters
    store = pyro.get_param_store()
    guide_params = [store.get_param(n).unconstrained() for n in ("encoder_v", "encoder_s")]
    model_params = [store.get_param("decoder_w").unconstrained()]
    opt = torch.optim.SGD(guide_params + model_params, lr=0.05)
    opt.zero_grad(set_to_none=True)
    before = _params(["encoder_v", "encoder_s", "decoder_w"])
    state = pvae.steps.snapshot_engine_state(engine)
    assert state == {"step": 1}

    def update(params):  # what fit's StepContext.update does in one process
        keep = {id(p) for p in params}
        for p in guide_params + model_params:
            if id(p) not in keep:
                p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)

    context = StepContext(
        engine=engine,
        model=pair.model,
        guide=pair.guide,
        batch=(x[:4],),
        epoch=0,
        step=0,
        seed=0,
        params=guide_params + model_params,
        model_params=model_params,
        guide_params=guide_params,
        random_batch=lambda generator: (x[torch.randperm(10, generator=generator)[:4]],),
        update=update,
        average=float,
    )
    taken = _encoder_steps(
        context, max_steps=6, generator=torch.Generator().manual_seed(0), window=2
    )
    after = _params(["encoder_v", "encoder_s", "decoder_w"])
    assert 1 <= taken <= 6
    assert torch.equal(after["decoder_w"], before["decoder_w"])
    assert not torch.equal(after["encoder_v"], before["encoder_v"])
    assert pvae.steps.snapshot_engine_state(engine) == state


def test_aggressive_phase_trains_the_model_only_and_ends_after_the_first_flat_epoch():
    guide_p = torch.zeros(2, requires_grad=True)
    model_p = torch.zeros(3, requires_grad=True)
    guide_p.grad, model_p.grad = torch.ones(2), torch.ones(3)
    training = SimpleNamespace(
        guide_params=[guide_p], model_params=[model_p], params=[guide_p, model_p]
    )
    policy = AggressiveEncoder(max_steps=5)
    assert policy.select_grads(training) == [model_p]
    assert guide_p.grad is None and model_p.grad is not None  # the decoder's step only
    for bound, active in [(-10.0, True), (-9.0, True), (-9.5, False), (-1.0, False)]:
        policy.end_epoch({"valid_bound": None, "train_bound": bound})
        assert policy.active is active  # ends at the first epoch that does not improve, for good
    assert policy.select_grads(training) == [guide_p, model_p]
    # the validation bound, when there is one, decides
    policy = AggressiveEncoder(max_steps=5)
    policy.end_epoch({"valid_bound": -5.0, "train_bound": -100.0})
    policy.end_epoch({"valid_bound": -6.0, "train_bound": 0.0})
    assert not policy.active
