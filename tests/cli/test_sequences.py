"""Sequence models on the command line: ``pvae train`` -> ``pvae diagnose`` and
``pvae compare`` -> ``pvae diagnose`` for the structured VAE on tiny ``pendulum`` and ``lds``
runs: the imputation error (the model registration's own metric) is reported and sane, the
subsets cut sequences by rows, and the diagnostics are per latent channel."""

import csv
import json
import math

import pytest
import torch

from pvae import data
from pvae.app import cli, compare, diagnose, runs
from pvae.app.registry import MODELS
from pvae.metrics import imputation_metrics
from pvae.models import StructuredVAE

TINY = ["--z-dim", "3", "--hidden", "16", "--ll-samples", "4", "--quiet"]
SUBSET = ["--max-train", "16", "--max-eval", "8"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_subset_cuts_sequence_splits_and_truth_by_rows():
    ds = data.load("pendulum", sizes=(10, 6, 6), num_steps=5, size=8, missing=0.2)
    cut = runs.subset(ds, 4, 3)
    assert isinstance(cut, data.SequenceSplits)
    assert isinstance(cut.train, data.SequenceSplit)
    assert cut.train.values.shape[0] == 4 and cut.test.mask.shape == (3, 5)
    assert torch.equal(cut.test.values, ds.test.values[:3])
    assert cut.truth["test"]["frames"].shape[0] == 3
    assert cut.truth["train"]["angles"].shape[0] == 4


def test_imputation_metric_against_the_clean_frames_and_hidden_observed_frames():
    ds = data.load("pendulum", sizes=(2, 2, 8), num_steps=10, size=8, missing=0.3)
    model = StructuredVAE(x_dim=ds.x_dim, z_dim=2, hidden=(8,))
    values, _, mask = ds.test
    out = imputation_metrics(model, ds, "test", seed=0)
    assert out["held_out_frames"] == int((~mask).sum())
    clean = ds.truth["test"]["frames"]
    baseline = (values[mask].mean(0) - clean[~mask]).pow(2).mean()
    assert out["imputation_mse_mean_frame"] == pytest.approx(float(baseline), rel=1e-5)
    assert 0.0 < out["imputation_mse"] < 1.0  # grey levels in [0, 1]
    # without clean frames: a seeded fifth of the observed frames is hidden and scored
    complete = data.load("lds", sizes=(2, 2, 8), num_steps=10)
    lds_model = StructuredVAE(x_dim=4, z_dim=2, hidden=(8,), likelihood="gaussian")
    first = imputation_metrics(lds_model, complete, "test", seed=3)
    again = imputation_metrics(lds_model, complete, "test", seed=3)
    assert first == again and 0 < first["held_out_frames"] < 80
    assert lds_model.training  # left as found


@pytest.fixture(scope="module")
def pendulum_train(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("svae-train")
    argv = ["train", "--model", "svae", "--dataset", "pendulum", "--engine", "kalman"]
    argv += ["--epochs", "1", "--batch-size", "8", "--run-dir", str(run_dir)]
    assert cli.main([*argv, *SUBSET, *TINY]) == 0
    return run_dir


def test_train_reports_the_imputation_error_on_a_subset(pendulum_train):
    metrics = json.loads((pendulum_train / "metrics.json").read_text())
    own = metrics["test_metrics"]
    assert own["held_out_frames"] == 0 or math.isfinite(own["imputation_mse"])
    assert 0.0 <= own["imputation_mse"] < 1.0 and own["imputation_mse_mean_frame"] > 0.0
    assert metrics["test_log_likelihood"]["num_datapoints"] == 8
    config, _ = runs.read_config(pendulum_train)
    assert (config.max_train, config.max_eval) == (16, 8)


def test_diagnose_a_train_run_per_latent_channel(pendulum_train):
    result = diagnose.diagnose(pendulum_train, num_points=8)
    assert result.collapse is not None
    layer = result.collapse.layers["z"]
    assert layer.dims == 3  # z_dim channels, not T * z_dim
    assert torch.isfinite(layer.kl).all() and (layer.kl >= 0).all()
    assert result.active_units[1] == 3
    assert (pendulum_train / "paths.png").is_file()
    assert (pendulum_train / "kl_per_dim.png").is_file()
    assert not (pendulum_train / "traversals.png").exists()
    text = (pendulum_train / "diagnostics.md").read_text()
    assert "per channel" in text and "| z | 2 |" in text and "| z | 3 |" not in text


@pytest.fixture(scope="module")
def lds_compare(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("svae-compare")
    argv = ["compare", "--quick", "--model", "svae", "--dataset", "lds"]
    argv += ["--bounds", "elbo,iwae,kalman", "--likelihood", "gaussian"]
    argv += ["--epochs", "1", "--particles", "2", "--snr-repeats", "2", "--threads", "1"]
    assert cli.main([*argv, *TINY, "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_compare_reports_log_px_per_sequence_and_the_imputation_error(lds_compare):
    results = json.loads((lds_compare / "results.json").read_text())
    config = results["config"]
    assert config["num_train"] == compare.QUICK_SEQUENCES["max_train"]
    assert config["num_test"] == compare.QUICK_SEQUENCES["max_eval"]
    for row in results["results"]:
        assert row["status"] == "ok"
        assert math.isfinite(row["log_likelihood"])
        assert 0.0 < row["imputation_mse"] < 10 * row["imputation_mse_mean_frame"]
        assert row["held_out_frames"] > 0
        assert row["latent_dims"] == 3  # per channel, not T * channels
    # the ELBO's registered KL is the Kalman KL: with a neural decoder the two train alike
    rows = {row["bound"]: row for row in results["results"]}
    assert rows["elbo"]["log_likelihood"] == pytest.approx(rows["kalman"]["log_likelihood"])
    text = (lds_compare / "results.md").read_text()
    assert "log p(x) per sequence" in text and "imputation_mse" in text
    with open(lds_compare / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert float(table[0]["imputation_mse"]) == pytest.approx(rows["elbo"]["imputation_mse"])


def test_diagnose_a_compare_run(lds_compare):
    result = diagnose.diagnose(lds_compare, num_points=8)
    assert set(result.bounds) == {"elbo", "iwae", "kalman"}
    for child in result.bounds.values():
        assert child is not None and child.collapse is not None
        assert child.collapse.layers["z"].dims == 3
        assert (child.out_dir / "paths.png").is_file()
    assert "kalman" in (lds_compare / "diagnostics.md").read_text()


def test_svae_registration_declares_its_metric_and_channels():
    entry = MODELS["svae"]
    assert entry.metrics is imputation_metrics
    assert entry.channels == {"z": -1}
    assert MODELS["vae"].metrics is None and MODELS["vae"].channels is None
