"""Library pieces the commands build on: where a run ran (``pvae.tracking.environment``),
trained parameters copied into a rebuilt pair (``pvae.checkpoint.load_parameters``), splits
moved to a device (``Splits.to``), a bound recorded after every epoch
(``pvae.train.EpochBound``), active units per layer (``pvae.diagnostics.latent_activity``) and
a sampler's convergence per site (``Posterior.convergence``), with the device check, the peak
memory, the exact log p(x) of the synthetic sets and the log-joint trace."""

import math
import platform

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pvae
from pvae import checkpoint, data, plots, tracking, validation
from pvae.diagnostics import count_active, latent_activity, layer_sites
from pvae.inference import ELBO, IWAE
from pvae.sampling import Posterior
from pvae.train import EpochBound


def test_environment_names_versions_threads_and_no_commit_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = tracking.environment("cpu")
    assert env["git_commit"] is None  # tmp_path is no git checkout
    assert env["versions"]["torch"] == torch.__version__
    assert env["versions"]["pyro"] == pyro.__version__
    assert env["versions"]["python"] == platform.python_version()
    assert env["torch_threads"] == torch.get_num_threads() and env["device"] == "cpu"
    assert env["gpu"] is None or torch.cuda.is_available()


class _Pair(nn.Module):
    """x ~ N(W z + b, 1), z ~ N(0, I); guide N(A x, softplus(s)); parameters under ``name``."""

    def __init__(self, name: str, x_dim: int = 3, z_dim: int = 2):
        super().__init__()
        self.name, self.x_dim, self.z_dim = name, x_dim, z_dim

    def model(self, x):
        w = pyro.param(f"{self.name}.w", torch.zeros(self.x_dim, self.z_dim))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.z_dim]).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T, 1.0).to_event(1), obs=x)

    def guide(self, x):
        a = pyro.param(f"{self.name}.a", torch.zeros(self.z_dim, self.x_dim))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ a.T, 1.0).to_event(1))


def test_load_parameters_copies_values_under_the_rebuilt_prefix(tmp_path):
    pyro.clear_param_store()
    trained = {"vae_1.w": torch.randn(3, 2), "vae_1.a": torch.randn(2, 3)}
    pair = _Pair("vae")
    checkpoint.load_parameters(pair.model, pair.guide, (torch.zeros(2, 3),), {"params": trained})
    store = pyro.get_param_store()
    assert torch.equal(store["vae.w"].detach(), trained["vae_1.w"])
    assert torch.equal(store["vae.a"].detach(), trained["vae_1.a"])
    assert checkpoint.renamed({"a.x": 1}, ["b.x"]) == {"b.x": 1}
    assert checkpoint.renamed({"a.x": 1, "c.y": 2}, ["b.x"]) == {"a.x": 1, "c.y": 2}


@pytest.mark.parametrize(
    "params,match",
    [
        ({"vae.w": torch.zeros(3, 2)}, "parameters vae.a are in one but not the other"),
        (
            {"vae.w": torch.zeros(3, 3), "vae.a": torch.zeros(2, 3)},
            r"shapes differ .* vae.w \(3, 3\) vs \(3, 2\)",
        ),
        (None, "holds no parameters"),
    ],
)
def test_load_parameters_refuses_what_does_not_match(params, match):
    pyro.clear_param_store()
    pair = _Pair("vae")
    with pytest.raises(ValueError, match=match):
        checkpoint.load_parameters(pair.model, pair.guide, (torch.zeros(2, 3),), {"params": params})


def test_splits_to_moves_every_split_and_keeps_the_rest():
    """On the meta device (no GPU needed); a DynamicBinarized set checks its values on
    construction, which a meta tensor cannot give, so it is moved only on a real device."""
    ds = data.Splits(
        "toy", torch.rand(6, 4), torch.rand(3, 4), torch.rand(2, 4), 4, None, "gaussian"
    )
    assert ds.to("cpu") is ds
    moved = ds.to("meta")
    assert type(moved) is data.Splits and moved.name == "toy" and moved.x_dim == 4
    assert moved.train.is_meta and moved.valid.is_meta and moved.test.is_meta
    assert not ds.valid.is_meta  # the original stays where it was
    pairs = data.MultimodalSplits(
        "pairs", *((torch.rand(n, 4), torch.rand(n, 2)) for n in (6, 3, 2)), 4, None, "gaussian"
    )
    moved_pairs = pairs.to("meta")
    assert type(moved_pairs) is data.MultimodalSplits
    assert all(
        t.is_meta for split in ("train", "valid", "test") for t in getattr(moved_pairs, split)
    )


@pytest.mark.parametrize("engine", [IWAE(5), ELBO(3)], ids=["iwae", "elbo"])
def test_epoch_bound_records_the_seeded_bound_and_leaves_the_training_rng(engine):
    pyro.clear_param_store()
    pair = _Pair("p")
    pyro.param("p.w", torch.randn(3, 2))
    pyro.param("p.a", torch.randn(2, 3))
    valid = torch.randn(12, 3)
    callback = EpochBound(pair.model, pair.guide, valid, engine, 123, module=pair)
    pair.train()
    torch.manual_seed(99)
    before = torch.get_rng_state()
    record: dict = {}
    callback(None, record)
    assert torch.equal(torch.get_rng_state(), before)  # the training's stream is untouched
    assert pair.training and callback.seconds > 0
    torch.manual_seed(123)
    with torch.no_grad():
        expected = pvae.evaluate_bound(pair.model, pair.guide, valid, engine, 100)
    assert record["yardstick"] == pytest.approx(float(expected), abs=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        EpochBound(pair.model, pair.guide, valid, engine, 0, batch_size=0)


class _Encoder(nn.Module):
    """A guide whose posterior mean is ``x[:, :2]`` on the first two of three dimensions and
    0 on the third: two active units (Burda et al.'s Var_x E_q[z_d] > 0.01)."""

    layer_sites = ("z",)

    def guide(self, x):
        loc = torch.cat([x[:, :2], torch.zeros(x.shape[0], 1)], dim=-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 0.1).to_event(1))


def test_latent_activity_counts_the_dimensions_the_data_move():
    x = torch.randn(50, 4)
    activity = latent_activity(_Encoder(), x, seed=0, num_points=40)
    assert set(activity) == {"z"} and count_active(activity) == (2, 3)
    assert activity["z"].active.tolist() == [True, True, False]
    assert layer_sites(object()) == ("z",)
    state = torch.get_rng_state()
    latent_activity(_Encoder(), x, seed=0)
    assert torch.equal(torch.get_rng_state(), state)


def test_convergence_finds_the_coordinate_whose_chains_disagree():
    torch.manual_seed(0)
    chains, draws = 4, 200
    a = torch.randn(chains, draws, 5)
    a[:, :, 3] += torch.arange(chains).reshape(chains, 1) * 3.0  # chains at different means
    samples = {"a": a, "b": torch.randn(chains, draws)}
    posterior = Posterior(samples, torch.zeros(chains, draws), torch.zeros(0))
    found = posterior.convergence(per_site=5, top=2)
    assert found.sites["a"].coordinates == 5 and found.sites["a"].checked == 5
    assert found.sites["b"].coordinates == 1 and found.checked == 6
    rhat = posterior.rhat()
    assert found.worst_rhat == pytest.approx(float(rhat["a"].max()))
    assert found.worst_rhat > 1.5 and found.sites["b"].worst_rhat < 1.1
    assert list(found.worst.samples)[0] == "a[3]"
    assert torch.equal(found.worst.samples["a[3]"], a[:, :, 3])
    assert posterior.convergence(per_site=2).sites["a"].checked == 2  # coordinates 0 and 4
    assert found.lowest_ess == pytest.approx(min(float(e.min()) for e in posterior.ess().values()))
    assert not math.isnan(found.sites["b"].median_ess)


def test_device_accepts_cpu_and_refuses_other_names_and_missing_devices():
    assert validation.device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be cpu, cuda or mps, got 'tpu'"):
        validation.device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            validation.device("cuda")


def test_peak_memory_is_the_resident_set_on_the_cpu():
    peak = tracking.peak_memory_mb("cpu")
    assert math.isnan(peak) or peak > 1.0  # a Python process with torch holds > 1 MB
    assert "ru_maxrss" in tracking.memory_kind("cpu")
    assert "max_memory_allocated" in tracking.memory_kind("cuda")


def test_exact_log_likelihood_is_the_dense_gaussian_density():
    ds = data.load("linear-gaussian")
    W, b, noise = ds.info["W"].double(), ds.info["b"].double(), float(ds.info["noise"])
    covariance = W @ W.T + noise**2 * torch.eye(W.shape[0], dtype=torch.float64)
    dense = dist.MultivariateNormal(b, covariance).log_prob(ds.test.double())
    exact = data.exact_log_likelihood(ds)
    assert exact.shape == (ds.test.shape[0],)
    assert torch.allclose(exact.double(), dense, rtol=1e-5, atol=1e-5)  # float32 rounding
    valid = data.exact_log_likelihood(ds, "valid")
    assert valid.shape == (ds.valid.shape[0],)
    assert data.exact_log_likelihood(data.load("digits")) is None


def test_log_joint_trace_writes_a_png(tmp_path):
    posterior = Posterior({"a": torch.randn(2, 5)}, torch.randn(2, 5), torch.randn(2, 3))
    path = plots.log_joint_trace(posterior, tmp_path / "trace.png")
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
