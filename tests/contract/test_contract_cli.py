"""The command-line part of the contract: every registered model trains from the command line
(``pvae train``; ``pvae sample`` for a sampler pair, one with global latents only) on a small
dataset of the first kind it accepts, and ``pvae diagnose`` reads the run folder, each exiting 0
with a report on disk. Tiny budgets; a family gets this test by registering."""

from __future__ import annotations

import functools

import pytest
import torch
from contract_cases import CASES, DATA_FOR_KIND, HIDDEN, Z_DIM, is_sampler_pair

from pvae import metrics
from pvae.app import cli, runs
from pvae.app.registry import MODELS

ZOO = [case for case in CASES if case.registered is not None]
TINY = ["--z-dim", str(Z_DIM), "--hidden", ",".join(map(str, HIDDEN)), "--quiet", "--seed", "0"]
SUBSET = ["--max-train", "8"]
EVAL_SUBSET = ["--max-eval", "4"]  # pvae sample has no evaluation splits


@pytest.fixture(autouse=True)
def _cheap_generation_scores(monkeypatch):
    """The Koopman VAE's own metrics train post-hoc GRU classifiers for 300 steps, 6 times:
    5 steps each here (the command's path is under test, not the scores)."""
    for name in ("discriminative_score", "predictive_score"):
        monkeypatch.setattr(metrics, name, functools.partial(getattr(metrics, name), num_steps=5))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("case", ZOO, ids=[case.name for case in ZOO])
def test_the_cli_trains_and_diagnoses_it(case, tmp_path, capsys):
    entry = MODELS[case.registered]
    dataset = DATA_FOR_KIND[entry.accepts[0]][0]
    train, _ = case.data()
    run_dir = tmp_path / "run"
    common = [
        "--model",
        entry.name,
        "--dataset",
        dataset,
        *TINY,
        *SUBSET,
        "--run-dir",
        str(run_dir),
    ]
    if is_sampler_pair(case.build(), train):
        argv = ["sample", *common, "--num-samples", "3", "--warmup", "3", "--chains", "1"]
        kind = "sample"
    else:
        argv = ["train", *common, *EVAL_SUBSET, "--engine", "iwae", "--particles", "2"]
        argv += ["--epochs", "1"]
        argv += ["--ll-samples", "4", "--batch-size", "4"]
        kind = "train"
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert (run_dir / "config.json").is_file() and (run_dir / "checkpoint.pt").is_file()
    assert runs.read_config(run_dir)[0].command == kind
    assert cli.main(["diagnose", str(run_dir)]) == 0, capsys.readouterr().err
    assert (run_dir / "diagnostics.md").is_file()
