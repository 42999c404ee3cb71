"""``pvae sample --model bae`` and ``pvae diagnose`` on its run folder (tiny sizes)."""

from __future__ import annotations

import json

import pytest
import torch

from pvae.app import cli, diagnose, runs
from pvae.app.sample import load_posterior
from pvae.models import BayesianAE

TINY = ["--dataset", "digits", "--z-dim", "2", "--hidden", "8", "--max-train", "100"]
SAMPLING = ["--num-samples", "20", "--warmup", "30", "--chains", "2", "--batch-size", "50"]


@pytest.mark.slow
def test_sample_then_diagnose(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["sample", *TINY, *SAMPLING, "--bae-prior-scale", "0.5", "--run-dir", str(run_dir)]
    assert cli.main([*argv, "--quiet"]) == 0
    assert "2 chain(s) x 20 draws" in capsys.readouterr().out
    config, document = runs.read_config(run_dir)
    assert config.command == "sample" and config.model == "bae" and config.engine == "sghmc"
    assert config.model_options["prior_scale"] == 0.5 and config.max_train == 100
    assert json.loads((run_dir / "run.json").read_text())["kind"] == "sample"
    posterior = load_posterior(run_dir)
    site = "bae.encoder.0.weight"
    assert posterior.samples[site].shape == (2, 20, 8, 64)  # digits: 8x8 images
    for name in ("reconstructions.png", "reconstruction_sd.png", "checkpoint.pt"):
        assert (run_dir / name).is_file()
    # the saved posterior drives the model rebuilt from the config
    ds = config.load_data()
    model = config.build_model(ds)
    assert isinstance(model, BayesianAE) and model.prior_scale["decoder.0"] == 0.5
    mean, sd = model.reconstruct(posterior, ds.test[:5])
    assert mean.shape == sd.shape == (5, 64) and torch.isfinite(sd).all()

    result = diagnose.diagnose(run_dir)
    assert result.kind == "sample" and result.report.is_file()
    report = result.report.read_text()
    assert "worst R-hat" in report and "ArviZ summary" in report and "r_hat" in report
    assert (run_dir / "trace.png").is_file() and (run_dir / "trace_sites.png").is_file()
    assert cli.main(["diagnose", str(run_dir)]) == 0
    assert "worst R-hat" in capsys.readouterr().out


def test_sample_refuses_an_existing_run_and_a_model_without_global_latents(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["sample", *TINY, "--num-samples", "2", "--warmup", "2", "--run-dir", str(run_dir)]
    assert cli.main([*argv, "--quiet"]) == 0
    assert cli.main([*argv, "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    vae_dir = tmp_path / "vae"
    argv = ["sample", *TINY, "--model", "vae", "--num-samples", "2", "--warmup", "2"]
    argv += ["--batch-size", "50"]  # per-datapoint latents under minibatching: refused
    assert cli.main([*argv, "--run-dir", str(vae_dir), "--quiet"]) == 1
    assert "sampling failed" in capsys.readouterr().err
