"""``pvae sample --model bae`` and ``pvae diagnose`` on its run folder (tiny sizes)."""

from __future__ import annotations

import json

import pytest
import torch

from pvae.app import cli, diagnose, runs
from pvae.app.sample import diagnose_sample, load_posterior
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
    argv = ["sample", *TINY, "--num-samples", "2", "--warmup", "2", "--chains", "1"]
    argv += ["--bae-prior-scale", "0.5", "--run-dir", str(run_dir)]
    assert cli.main([*argv, "--quiet"]) == 0
    assert cli.main([*argv, "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    vae_dir = tmp_path / "vae"
    argv = ["sample", *TINY, "--model", "vae", "--num-samples", "2", "--warmup", "2"]
    assert cli.main([*argv, "--run-dir", str(vae_dir), "--quiet"]) == 2  # refused up front
    assert "model 'vae' has no weights with a prior to sample" in capsys.readouterr().err
    assert not vae_dir.exists()


def _posterior_folder(run_dir, samples):
    run_dir.mkdir()
    chains, draws = samples.shape[:2]
    torch.save(
        {"samples": {"w": samples}, "log_joint": torch.zeros(chains, draws)},
        run_dir / "posterior.pt",
    )
    return run_dir


def test_diagnose_does_not_call_one_chain_unconverged(tmp_path):
    """R-hat compares chains: with one chain it is undefined, and the verdict says so instead
    of 'not converged'; with two it judges them (the same draws: converged; chains 10 sd apart:
    not)."""
    g = torch.Generator().manual_seed(0)
    one = _posterior_folder(tmp_path / "one", torch.randn(1, 200, 2, generator=g))
    found = diagnose_sample(one, one)
    assert "R-hat undefined (one chain)" in found.verdict
    assert "undefined with one chain" in found.verdict and "not converged" not in found.verdict
    assert "no sign" not in found.verdict
    two = _posterior_folder(tmp_path / "two", torch.randn(2, 200, 2, generator=g))
    assert "no sign of non-convergence" in diagnose_sample(two, two).verdict
    apart = torch.randn(2, 200, 2, generator=g) + torch.tensor([0.0, 10.0]).view(2, 1, 1)
    apart_dir = _posterior_folder(tmp_path / "apart", apart)
    assert "not converged (R-hat >= 1.1)" in diagnose_sample(apart_dir, apart_dir).verdict
