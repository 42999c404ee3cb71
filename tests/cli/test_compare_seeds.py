"""``pvae compare`` for a paper: several seeds (mean ± sd, paired Δ per seed, the
within-seed-noise rule), a common yardstick per epoch, log p(x) against K, timings, peak
memory and the environment block, ``--device``, and a sequence family with its own metric."""

import json
import math
import statistics

import pytest
import torch

from pvae.app import cli, compare, diagnose

SEEDS = [0, 3]
BOUNDS = ["elbo", "iwae"]
LL_SAMPLES = 20
EPOCHS = 2
SMALL = ["--particles", "4", "--snr-repeats", "2", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("compare-seeds")
    argv = ["compare", "--quick", "--dataset", "digits", "--bounds", ",".join(BOUNDS)]
    argv += ["--seeds", ",".join(map(str, SEEDS)), "--epochs", str(EPOCHS), "--device", "cpu"]
    argv += ["--ll-samples", str(LL_SAMPLES), *SMALL, "--run-dir", str(run_dir)]
    assert cli.main(argv) == 0
    return run_dir, json.loads((run_dir / "results.json").read_text())


def test_one_folder_per_bound_and_seed(seeds_run):
    run_dir, report = seeds_run
    rows = report["results"]
    assert [(r["bound"], r["seed"]) for r in rows] == [(b, s) for b in BOUNDS for s in SEEDS]
    for row in rows:
        assert row["status"] == "ok"
        assert row["folder"] == row["run"] == f"{row['bound']}/seed-{row['seed']}"
        assert (run_dir / row["folder"] / "checkpoint.pt").is_file()
    # different seeds train differently; the same seed starts every bound alike
    elbo = {r["seed"]: r for r in rows if r["bound"] == "elbo"}
    assert elbo[0]["log_likelihood"] != elbo[3]["log_likelihood"]


def test_summary_is_mean_and_sd_over_seeds_with_paired_deltas(seeds_run):
    run_dir, report = seeds_run
    rows, summary = report["results"], {r["bound"]: r for r in report["summary"]}
    assert list(summary) == BOUNDS
    for bound in BOUNDS:
        per_seed = [r for r in rows if r["bound"] == bound]
        row = summary[bound]
        assert row["seeds"] == SEEDS
        for key in ("log_likelihood", "elbo", "iwae_64", "train_seconds"):
            values = [r[key] for r in per_seed]
            assert row[key] == pytest.approx(statistics.mean(values))
            assert row[f"{key}_sd"] == pytest.approx(statistics.stdev(values))
    deltas = [r["delta_log_likelihood"] for r in rows if r["bound"] == "iwae"]
    assert summary["iwae"]["delta_log_likelihood"] == pytest.approx(statistics.mean(deltas))
    assert summary["iwae"]["delta_sd"] == pytest.approx(statistics.stdev(deltas))
    noise = abs(statistics.mean(deltas)) < 2 * statistics.stdev(deltas)
    assert summary["iwae"]["within_seed_noise"] is noise
    assert summary["elbo"]["within_seed_noise"] is None  # the reference
    # the per-seed Δ is paired: the reference's own Δ is exactly zero with every seed
    assert [r["delta_log_likelihood"] for r in rows if r["bound"] == "elbo"] == [0.0, 0.0]
    markdown = (run_dir / "results.md").read_text()
    assert "within seed noise" in markdown and "2 × sd of the per-seed Δ" in markdown
    assert "| iwae/seed-3 |" in markdown and "paired Δ vs elbo" in markdown


def test_summarize_flags_a_difference_within_noise():
    def row(bound, seed, delta):
        return {
            "bound": bound,
            "seed": seed,
            "engine": bound,
            "status": "ok",
            "reference": "a",
            "log_likelihood": -90.0 + delta,
            "delta_log_likelihood": delta,
        }

    rows = [row("a", s, 0.0) for s in (0, 1, 2)]
    noisy = compare.summarize([*rows, *(row("b", s, d) for s, d in enumerate((1, -1, 0.5)))])
    clear = compare.summarize([*rows, *(row("b", s, d) for s, d in enumerate((1, 1.2, 0.9)))])
    assert noisy[1]["within_seed_noise"] is True and clear[1]["within_seed_noise"] is False
    assert clear[1]["delta_sd"] == pytest.approx(statistics.stdev([1, 1.2, 0.9]))


def test_yardstick_recorded_every_epoch_for_every_run(seeds_run):
    run_dir, report = seeds_run
    assert report["config"]["yardstick"] == compare.YARDSTICK
    for row in report["results"]:
        assert len(row["history"]) == EPOCHS
        values = [record["yardstick"] for record in row["history"]]
        assert all(isinstance(v, float) and math.isfinite(v) for v in values)
        saved = json.loads((run_dir / row["folder"] / "run.json").read_text())
        assert [record["yardstick"] for record in saved["history"]] == values
    assert (run_dir / "learning_curves.png").is_file()


def test_yardstick_leaves_training_untouched():
    """The same run with and without the yardstick trains bit for bit alike."""
    common = dict(bounds=["iwae"], particles=4, quick=True, epochs=2, ll_samples=4)
    common.update(snr_repeats=2)
    config = compare.run_config("digits", yardstick=None, **common)
    plain = compare.compare(config, progress=False)[0]
    config = compare.run_config("digits", yardstick="elbo:8", **common)
    measured = compare.compare(config, progress=False)[0]
    assert "yardstick" not in plain.history[0]
    assert [r["train_bound"] for r in plain.history] == [r["train_bound"] for r in measured.history]
    assert plain.log_likelihood == measured.log_likelihood
    assert measured.yardstick == measured.history[-1]["yardstick"]


def test_log_likelihood_against_k(seeds_run):
    run_dir, report = seeds_run
    assert report["config"]["ll_ks"] == [1, 10, LL_SAMPLES]
    for row in report["results"]:
        curve = {int(k): v for k, v in row["ll_vs_k"].items()}
        assert sorted(curve) == [1, 10, LL_SAMPLES]
        assert all(math.isfinite(v) for v in curve.values())
        # non-decreasing in expectation: K=20 above K=1 by far more than the noise here
        assert curve[LL_SAMPLES] > curve[1]
    assert compare.ll_ks(5000) == list(compare.LL_KS)
    assert compare.ll_ks(100) == [1, 10, 100] and compare.ll_ks(50) == [1, 10, 50]
    assert (run_dir / "ll_vs_k.png").read_bytes()[:4] == b"\x89PNG"


def test_timings_memory_and_environment(seeds_run):
    _, report = seeds_run
    for row in report["results"]:
        for key in ("train_seconds", "eval_seconds", "peak_memory_mb", "yardstick_seconds"):
            assert row[key] > 0, key
    env = report["environment"]
    assert set(env) >= {"git_commit", "versions", "cpu", "gpu", "torch_threads", "device"}
    assert set(env["versions"]) == {"python", "torch", "pyro", "gpytorch", "numpy", "pvae"}
    assert env["device"] == "cpu" and env["torch_threads"] == 1
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
    assert "resident set size" in report["memory"]


def test_environment_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert compare.environment()["git_commit"] is None


def test_diagnose_reads_a_run_with_seeds(seeds_run):
    run_dir, _ = seeds_run
    result = diagnose.diagnose(run_dir, num_points=20)
    assert set(result.bounds) == {f"{b}/seed-{s}" for b in BOUNDS for s in SEEDS}
    assert (run_dir / "iwae" / "seed-3" / "diagnostics.md").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["compare", "--quick", "--dataset", "digits", "--device", "cuda"]
    assert cli.main([*argv, "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "CUDA is not available" in err
    assert not run_dir.exists()
    with pytest.raises(ValueError, match="CUDA is not available"):
        compare.resolve_device("cuda")
    with pytest.raises(ValueError, match="cpu, cuda or mps"):
        compare.resolve_device("tpu")


@pytest.mark.parametrize("value", ["iwae", "iwae:0", "dreg:4"])
def test_bad_yardstick_exits_2(tmp_path, capsys, value):
    argv = ["compare", "--quick", "--dataset", "digits", "--yardstick", value]
    assert cli.main([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    assert "iwae:K or elbo:K" in capsys.readouterr().err


def test_sequence_family_with_seeds_keeps_its_own_metric(tmp_path):
    run_dir = tmp_path / "lds"
    argv = ["compare", "--quick", "--model", "svae", "--dataset", "lds", "--bounds", "elbo,kalman"]
    argv += ["--likelihood", "gaussian", "--epochs", "1", "--seeds", "0,1", "--z-dim", "3"]
    argv += ["--hidden", "16", "--ll-samples", "4", "--particles", "2", "--snr-repeats", "2"]
    argv += ["--threads", "1", "--quiet", "--run-dir", str(run_dir)]
    assert cli.main(argv) == 0
    report = json.loads((run_dir / "results.json").read_text())
    for row in report["results"]:
        assert math.isfinite(row["imputation_mse"]) and math.isfinite(row["yardstick"])
        assert sorted(int(k) for k in row["ll_vs_k"]) == [1, 4]
    for row in report["summary"]:
        assert math.isfinite(row["imputation_mse"]) and math.isfinite(row["imputation_mse_sd"])
    assert "imputation_mse" in (run_dir / "results.md").read_text()
