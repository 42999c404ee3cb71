"""GP-prior VAEs on the command line: ``pvae train`` -> ``pvae diagnose`` and ``pvae compare``
-> ``pvae diagnose`` for the dense GP-VAE on tiny ``hmnist-like`` runs (the per-entry mask
reaches the pair) and the Markovian GP-VAE on tiny ``rotating-digits`` runs (the Kalman engine
included): the imputation error is reported and finite, the diagnostics are per latent channel
and list the learned kernel hyper-parameters; the MM-GPVAE on ``mm-gp-sim`` reports the
identification R^2 of its latent groups."""

import json
import math

import pyro
import pytest
import torch

from pvae import data
from pvae.app import cli, diagnose
from pvae.app.registry import MODELS, data_kind
from pvae.data import gp_sets
from pvae.metrics import gp_imputation_metrics
from pvae.models import GPVAE

TINY = ["--z-dim", "2", "--hidden", "16", "--ll-samples", "4", "--quiet"]
SUBSET = ["--max-train", "16", "--max-eval", "8"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gpvae_view_of_hmnist_like_carries_the_entry_mask_to_the_pair():
    ds = data.load("hmnist-like", sizes=(4, 2, 3))
    view = MODELS["gpvae"].dataset_for(ds, {})
    assert isinstance(view, gp_sets.EntryMaskedSplits) and isinstance(view, data.SequenceSplits)
    assert len(view.test) == 4 and view.x_dim == ds.x_dim
    observed = ds.truth["test"]["observed"]
    assert torch.equal(view.test.observed, observed)
    pyro.clear_param_store()
    model = GPVAE(x_dim=ds.x_dim, z_dim=2, hidden=(8,))
    trace = pyro.poutine.trace(model.model).get_trace(*view.test)
    site = trace.nodes["x"]["fn"]
    while not hasattr(site, "_mask"):
        site = site.base_dist
    assert torch.equal(site._mask.reshape(observed.shape), observed)
    # sets without a per-entry mask stay as they are
    plain = data.load("rotating-digits", sizes=(2, 2, 2), num_steps=4)
    assert MODELS["gpvae"].dataset_for(plain, {}) is plain
    bad = gp_sets.EntryMaskedSplit(*view.train[:3], view.train.observed[..., :4])
    with pytest.raises(ValueError, match="observed"):
        gp_sets.EntryMaskedSplits(
            name="x", train=bad, valid=view.valid, test=view.test, likelihood="gaussian"
        )


def test_gp_imputation_metric_scores_the_missing_entries_against_the_clean_frames():
    ds = MODELS["gpvae"].dataset_for(data.load("hmnist-like", sizes=(4, 2, 6)), {})
    pyro.clear_param_store()
    model = GPVAE(x_dim=ds.x_dim, z_dim=2, hidden=(8,))
    out = gp_imputation_metrics(model, ds, "test", seed=0)
    assert out["held_out_entries"] == int((~ds.test.observed).sum())
    baseline = data.gp_sets.imputation_mse(data.gp_sets.mean_pixel_baseline(ds, "test"), ds)
    assert out["imputation_mse_mean_frame"] == pytest.approx(baseline, rel=0.5)
    filled = model.impute(*ds.test)
    assert out["imputation_mse"] == pytest.approx(data.gp_sets.imputation_mse(filled, ds))
    assert model.training  # left as found


def _finite_metrics(own):
    assert own["held_out_entries"] > 0
    assert math.isfinite(own["imputation_mse"]) and own["imputation_mse"] >= 0.0
    assert own["imputation_mse_mean_frame"] > 0.0


def _check_diagnosis(result, folder, names):
    layer = result.collapse.layers["z"]
    assert layer.dims == 2  # per channel, not T * channels
    assert torch.isfinite(layer.kl).all() and (layer.kl >= 0).all()
    assert (folder / "paths.png").is_file() and not (folder / "traversals.png").exists()
    text = (folder / "diagnostics.md").read_text()
    assert "## Learned hyperparameters" in text
    assert all(f"- {name}: " in text for name in names)


@pytest.fixture(scope="module")
def gpvae_train(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gpvae-train")
    argv = ["train", "--model", "gpvae", "--dataset", "hmnist-like", "--epochs", "1"]
    argv += ["--batch-size", "8", "--gpvae-learn-kernel", "yes", "--run-dir", str(run_dir)]
    assert cli.main([*argv, *SUBSET, *TINY]) == 0
    return run_dir


def test_gpvae_train_then_diagnose(gpvae_train):
    metrics = json.loads((gpvae_train / "metrics.json").read_text())
    _finite_metrics(metrics["test_metrics"])
    assert math.isfinite(metrics["test_log_likelihood"]["mean"])
    result = diagnose.diagnose(gpvae_train, num_points=8)
    _check_diagnosis(result, gpvae_train, ("length_scale", "scale"))


def test_gpvae_compare_then_diagnose(tmp_path):
    argv = ["compare", "--quick", "--model", "gpvae", "--dataset", "hmnist-like"]
    argv += ["--bounds", "elbo,iwae", "--epochs", "1", "--particles", "2"]
    argv += ["--snr-repeats", "2", "--threads", "1", "--run-dir", str(tmp_path)]
    assert cli.main([*argv, *TINY]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["unit"] == "sequence"
    for row in results["results"]:
        assert row["status"] == "ok" and math.isfinite(row["log_likelihood"])
        _finite_metrics(row)
    result = diagnose.diagnose(tmp_path, num_points=8)
    for bound, child in result.bounds.items():
        _check_diagnosis(child, tmp_path / bound, ("length_scale",))


def test_mgpvae_train_then_diagnose(tmp_path):
    argv = ["train", "--model", "mgpvae", "--dataset", "rotating-digits", "--epochs", "1"]
    argv += ["--batch-size", "8", "--engine", "kalman", "--run-dir", str(tmp_path)]
    assert cli.main([*argv, *SUBSET, *TINY]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    _finite_metrics(metrics["test_metrics"])
    result = diagnose.diagnose(tmp_path, num_points=8)
    layer = result.collapse.layers["z"]
    assert layer.dims == 4  # 2 GP values and their derivatives (Matérn-3/2)
    assert "- lengthscale: " in (tmp_path / "diagnostics.md").read_text()


def test_mgpvae_compare_with_the_kalman_engine_then_diagnose(tmp_path):
    argv = ["compare", "--quick", "--model", "mgpvae", "--dataset", "rotating-digits"]
    argv += ["--bounds", "elbo,kalman", "--epochs", "1", "--particles", "2"]
    argv += ["--snr-repeats", "2", "--threads", "1", "--run-dir", str(tmp_path)]
    assert cli.main([*argv, *TINY]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {row["bound"]: row for row in results["results"]}
    assert set(rows) == {"elbo", "kalman"}
    for row in rows.values():
        assert row["status"] == "ok" and math.isfinite(row["log_likelihood"])
        _finite_metrics(row)
    result = diagnose.diagnose(tmp_path, num_points=8)
    assert set(result.bounds) == {"elbo", "kalman"}
    assert "variance" in (tmp_path / "kalman" / "diagnostics.md").read_text()


def test_mmgpvae_train_then_diagnose_reports_identification(tmp_path):
    ds = data.load("mm-gp-sim", sizes=(8, 4, 8))
    assert data_kind(ds) == "multimodal-sequences"
    with pytest.raises(ValueError, match="mmgpvae"):
        MODELS["mmgpvae"].check_data(data.load("hmnist-like", sizes=(2, 2, 2)))
    argv = ["train", "--model", "mmgpvae", "--dataset", "mm-gp-sim", "--epochs", "1"]
    argv += ["--batch-size", "20", "--max-train", "40", "--max-eval", "20"]
    argv += ["--z-dim", "1", "--hidden", "16", "--ll-samples", "4", "--quiet"]
    assert cli.main([*argv, "--run-dir", str(tmp_path)]) == 0
    own = json.loads((tmp_path / "metrics.json").read_text())["test_metrics"]
    assert set(own) == {"r2_shared", "r2_neural", "r2_image", "r2_cross_max"}
    assert all(math.isfinite(value) and value <= 1.0 for value in own.values())
    result = diagnose.diagnose(tmp_path, num_points=8)
    assert result.collapse.layers["z"].dims == 3  # shared, neural, image channels
    assert "- lengthscale: " in (tmp_path / "diagnostics.md").read_text()
