"""The ``pvae`` command line, run in-process through ``main(argv)`` (and once through the
installed console script): datasets table, a tiny training run and every file it writes,
resume, and one-line errors with exit status 2."""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pvae.app import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_FILES = [
    "config.json",
    "metrics.csv",
    "metrics.json",
    "checkpoint.pt",
    "learning_curve.png",
    "reconstructions.png",
    "samples.png",
]
TINY = ["--z-dim", "2", "--hidden", "16", "--ll-samples", "8", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The nets here are tiny: with several intra-op threads on a busy machine each step
    waits on thread hand-offs (tens of ms per op), so train on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(run_dir, *extra, dataset="digits", epochs=1):
    argv = ["train", "--dataset", dataset, "--epochs", str(epochs), "--run-dir", str(run_dir)]
    return cli.main([*argv, *TINY, *extra])


def error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("pvae: error: "), err
    assert "\n" not in err and "Traceback" not in err
    return err


# ---------------------------------------------------------------------------------------------
# pvae datasets
# ---------------------------------------------------------------------------------------------


def test_datasets_lists_the_registry(capsys):
    assert cli.main(["datasets"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()[1:]]
    assert {"digits", "mnist5k", "linear-gaussian"} <= set(names)
    assert "scikit-learn" in out  # the source column


def test_console_script():
    script = Path(sys.executable).parent / "pvae"
    assert script.exists(), f"no console script at {script}: reinstall with pip install -e ."
    result = subprocess.run(
        [str(script), "datasets"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "digits" in result.stdout and "linear-gaussian" in result.stdout


@pytest.mark.parametrize("reader", ["head -1", "head -c 0"])  # leaves mid-table, at once
def test_datasets_into_a_closed_pipe_is_quiet(reader):
    script = Path(sys.executable).parent / "pvae"
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"'{script}' datasets | {reader}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.stderr == ""  # no BrokenPipeError traceback
    assert result.returncode in (0, 141)  # head may read all before leaving; else 128 + SIGPIPE


def test_help_exits_zero(capsys):
    assert cli.main(["train", "--help"]) == 0
    assert "--run-dir" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# pvae train
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch on digits with a tiny net (shared by the tests that only read the outputs)."""
    run_dir = tmp_path_factory.mktemp("run")
    assert train(run_dir) == 0
    return run_dir


def test_train_writes_every_file(trained):
    for name in RUN_FILES:
        assert (trained / name).is_file(), name
    for name in ("learning_curve.png", "reconstructions.png", "samples.png"):
        assert (trained / name).read_bytes()[:8] == PNG_MAGIC
    assert not [p.name for p in trained.iterdir() if p.name.endswith(".tmp")]


def test_metrics_are_finite(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert len(metrics["history"]) == 1
    record = metrics["history"][0]
    for key in ("train_bound", "valid_bound", "seconds"):
        assert math.isfinite(record[key]), key
    test = metrics["test_log_likelihood"]
    assert math.isfinite(test["mean"]) and test["mean"] < 0
    assert math.isfinite(test["stderr"]) and test["stderr"] > 0
    assert test["num_samples"] == 8 and test["num_datapoints"] == 360
    rows = list(csv.DictReader((trained / "metrics.csv").open()))
    assert len(rows) == 1
    assert float(rows[0]["train_bound"]) == pytest.approx(record["train_bound"])
    assert float(rows[0]["test_log_likelihood"]) == pytest.approx(test["mean"])


def test_config_round_trips(trained):
    config = json.loads((trained / "config.json").read_text())
    args = config["args"]
    assert config["pvae_version"] == cli.pvae.__version__
    assert args["dataset"] == "digits" and args["engine"] == "elbo" and args["model"] == "vae"
    assert args["epochs"] == 1 and args["z_dim"] == 2 and args["hidden"] == [16]
    assert args["likelihood"] == "bernoulli"  # resolved from the dataset
    assert config["data"]["image_shape"] == [1, 8, 8]
    reparsed = cli.build_parser().parse_args(config["argv"])
    assert cli._json_args(reparsed) == args


def _without_seconds(value):
    """metrics.json without the wall-clock fields (everything else is deterministic)."""
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


def _same_run(a, b):
    """Two run folders hold bit-identical metrics (but the timings) and checkpoints."""
    metrics_a = json.loads((a / "metrics.json").read_text())
    metrics_b = json.loads((b / "metrics.json").read_text())
    assert _without_seconds(metrics_a) == _without_seconds(metrics_b)
    state_a = torch.load(a / "checkpoint.pt", weights_only=False)
    state_b = torch.load(b / "checkpoint.pt", weights_only=False)
    assert state_a["epoch"] == state_b["epoch"]
    assert state_a.get("engine") == state_b.get("engine")
    assert set(state_a["params"]) == set(state_b["params"])
    for name, value in state_a["params"].items():
        assert torch.equal(value, state_b["params"][name]), name


@pytest.mark.parametrize("schedule", [None, "linear:24", "cyclical:10:0.5"])
def test_resume_continues_the_run(tmp_path, schedule):
    """One epoch (16 steps), then --resume to two, is bit for bit the uninterrupted two-epoch
    run: with a beta schedule still annealing at step 16 (and not in phase there) this needs
    the engine's step counter restored, as well as the RNG and the optimiser."""
    extra = ["--beta-schedule", schedule] if schedule else []
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train(whole, *extra, dataset="linear-gaussian", epochs=2) == 0
    assert train(resumed, *extra, dataset="linear-gaussian", epochs=1) == 0
    first = json.loads((resumed / "metrics.json").read_text())["history"]
    assert train(resumed, *extra, "--resume", dataset="linear-gaussian", epochs=2) == 0
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert [record["epoch"] for record in metrics["history"]] == [0, 1]
    assert metrics["history"][:1] == first  # the first epoch came from the checkpoint
    assert json.loads((resumed / "config.json").read_text())["args"]["epochs"] == 2
    _same_run(whole, resumed)
    if schedule:  # the schedule took effect: the run differs from one at constant beta
        plain = tmp_path / "plain"
        assert train(plain, dataset="linear-gaussian", epochs=2) == 0
        bounds = [r["train_bound"] for r in metrics["history"]]
        plain_bounds = [
            r["train_bound"] for r in json.loads((plain / "metrics.json").read_text())["history"]
        ]
        assert bounds != plain_bounds


def test_beta_schedule_is_checked(tmp_path, capsys):
    for value in ("linear", "linear:0", "cyclical:4:2", "exp:3"):
        assert train(tmp_path / "run", "--beta-schedule", value) == 2
        assert "--beta-schedule" in error_line(capsys)
    assert train(tmp_path / "run", "--engine", "iwae", "--beta-schedule", "linear:5") == 2
    assert "--beta-schedule" in error_line(capsys)


def test_resume_refuses_a_different_model(trained, tmp_path, capsys):
    run_dir = tmp_path / "resumed"
    shutil.copytree(trained, run_dir)
    assert cli.main(["train", "--dataset", "digits", "--run-dir", str(run_dir), "--resume"]) == 2
    assert "--z-dim (was 2, now 20)" in error_line(capsys)


def test_existing_run_needs_resume_or_overwrite(trained, capsys):
    assert train(trained) == 2
    assert "--resume" in error_line(capsys)


def test_non_image_dataset(tmp_path, capsys):
    assert train(tmp_path, dataset="linear-gaussian") == 0
    for name in RUN_FILES:
        assert (tmp_path / name).is_file(), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["args"]["likelihood"] == "gaussian"
    assert "test log-likelihood" in capsys.readouterr().out


def test_progress_lines_unless_quiet(tmp_path, capsys):
    argv = ["train", "--dataset", "linear-gaussian", "--epochs", "1", "--run-dir", str(tmp_path)]
    assert cli.main([*argv, "--z-dim", "2", "--hidden", "8", "--ll-samples", "2"]) == 0
    assert "epoch 1/1: train bound" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit status 2, the valid choices named
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--engine", "nope", "valid choices: elbo"),
        ("--dataset", "nope", "digits"),
        ("--model", "nope", "valid choices: vae"),
        ("--likelihood", "nope", "continuous_bernoulli"),
        ("--net", "nope", "mlp"),
        ("--epochs", "-1", "positive integer"),
        ("--batch-size", "zero", "positive integer"),
        ("--lr", "nan", "positive number"),
        ("--hidden", "200,x", "layer widths"),
    ],
)
def test_bad_arguments(tmp_path, capsys, flag, value, expected):
    argv = ["train", "--dataset", "digits", "--run-dir", str(tmp_path / "run"), flag, value]
    assert cli.main(argv) == 2
    message = error_line(capsys)
    assert flag in message and expected in message
    assert not (tmp_path / "run").exists()


def test_unknown_command(capsys):
    assert cli.main(["nope"]) == 2
    assert "train" in error_line(capsys)


def test_grey_data_with_bernoulli_fails_before_training(tmp_path, capsys):
    assert train(tmp_path, "--binarize", "none", "--likelihood", "bernoulli") == 2
    message = error_line(capsys)
    assert "not binary" in message and "continuous_bernoulli" in message
    assert not (tmp_path / "checkpoint.pt").exists()


def test_conv_needs_images(tmp_path, capsys):
    assert train(tmp_path, "--net", "conv", dataset="linear-gaussian") == 2
    assert "image" in error_line(capsys)


def test_missing_dataset_files(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PVAE_MNIST_DIR", raising=False)
    assert train(tmp_path / "run", dataset="mnist") == 2
    assert "PVAE_MNIST_DIR" in error_line(capsys)
    assert train(tmp_path / "run", "--data-path", str(tmp_path / "absent"), dataset="mnist") == 2
    assert "absent" in error_line(capsys)


def test_loader_arguments_it_does_not_take(tmp_path, capsys):
    assert train(tmp_path, "--binarize", "static", dataset="linear-gaussian") == 2
    assert "binarize" in error_line(capsys)


def test_multimodal_dataset_with_the_vae_is_refused(tmp_path, capsys):
    code = cli.main(
        ["train", "--dataset", "digits-labels", "--epochs", "1", "--run-dir", str(tmp_path)]
    )
    assert code == 2
    assert "several modalities" in capsys.readouterr().err
