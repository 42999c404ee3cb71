"""``pvae compare``: one quick run on digits with all five bounds writes every file with
finite numbers; bad bounds, M*K not matching --particles and unknown datasets exit 2 with the
valid choices, before anything is trained or written."""

import csv
import json
import math

import pytest
import torch

from pvae.app import cli, compare
from pvae.app.registry import parse_bound

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BOUNDS = ["elbo", "iwae", "miwae:8x8", "ciwae:0.5", "piwae:8x8"]
FILES = ["results.md", "results.json", "results.csv"]
PLOTS = ["learning_curves.png", "log_likelihood.png", "snr.png", "ll_vs_k.png"]
NUMBERS = [
    "log_likelihood",
    "log_likelihood_stderr",
    "elbo",
    "iwae_64",
    "inference_gap",
    "snr_guide",
    "snr_model",
    "seconds_per_epoch",
    "delta_log_likelihood",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: thread hand-offs cost more than they save
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``pvae compare --quick --dataset digits`` (every bound, default particles)."""
    run_dir = tmp_path_factory.mktemp("compare")
    code = cli.main(["compare", "--quick", "--dataset", "digits", "--run-dir", str(run_dir)])
    assert code == 0
    return run_dir


def error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("pvae: error: "), err
    assert "\n" not in err and "Traceback" not in err
    return err


def test_writes_every_file(quick_run):
    for name in FILES + PLOTS:
        assert (quick_run / name).is_file(), name
    for name in PLOTS:
        assert (quick_run / name).read_bytes()[:8] == PNG_MAGIC, name
    for bound in BOUNDS:  # pvae.fit's checkpoint and history, one folder per bound
        folder = quick_run / bound.replace(":", "_")
        assert (folder / "checkpoint.pt").is_file() and (folder / "run.json").is_file()
    assert not [p.name for p in quick_run.rglob("*.tmp")]


def test_json_has_all_bounds_with_finite_numbers(quick_run):
    report = json.loads((quick_run / "results.json").read_text())
    results = report["results"]
    assert [r["bound"] for r in results] == BOUNDS
    assert report["config"]["particles"] == 64 and report["config"]["quick"] is True
    assert report["config"]["ll_samples"] == compare.QUICK["ll_samples"]
    assert report["command"][:2] == ["pvae", "compare"] and "--quick" in report["command"]
    for r in results:
        assert r["status"] == "ok"
        for key in NUMBERS:
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["bound"], key)
        assert 0 <= r["active_units"] <= r["latent_dims"] == compare.QUICK["z_dim"]
        assert r["snr_guide"] > 0 and r["snr_model"] > 0
        assert r["log_likelihood"] < 0 and r["log_likelihood_stderr"] > 0
        # ELBO <= IWAE-64 <= log p(x) (K=100) up to Monte-Carlo noise
        assert r["elbo"] <= r["iwae_64"] + 0.5 and r["iwae_64"] <= r["log_likelihood"] + 0.5
        assert r["inference_gap"] == pytest.approx(r["log_likelihood"] - r["elbo"])
        assert len(r["history"]) == compare.QUICK["epochs"]
        # one seed keeps one folder per bound (the layout pvae diagnose has always read)
        assert r["folder"] == r["bound"].replace(":", "_") and "run" not in r
        assert all(math.isfinite(record["yardstick"]) for record in r["history"])
    assert results[0]["delta_log_likelihood"] == 0.0


def test_csv_and_markdown_match_the_json(quick_run):
    results = json.loads((quick_run / "results.json").read_text())["results"]
    rows = list(csv.DictReader((quick_run / "results.csv").open()))
    assert [row["bound"] for row in rows] == BOUNDS
    for row, r in zip(rows, results, strict=True):
        assert float(row["log_likelihood"]) == pytest.approx(r["log_likelihood"])
        assert int(row["active_units"]) == r["active_units"]
    markdown = (quick_run / "results.md").read_text()
    assert "| bound |" in markdown and "pvae compare" in markdown
    for bound in BOUNDS:
        assert f"| {bound} |" in markdown


def test_every_bound_starts_from_the_same_weights_and_samples(quick_run):
    """IWAE_64 and PIWAE(8, 8) report the same bound (IWAE_64, the model's objective) on
    their first step: same initial weights, same batch, same particles."""

    def first_step(bound):
        run = json.loads((quick_run / bound.replace(":", "_") / "run.json").read_text())
        return run["steps"][0]["bound"]

    assert first_step("iwae") == pytest.approx(first_step("piwae:8x8"), rel=1e-6)
    assert first_step("elbo") != pytest.approx(first_step("iwae"), rel=1e-6)


def test_library_call_without_files():
    config = compare.run_config(
        "digits",
        quick=True,
        bounds=["elbo", "iwae-dreg"],
        particles=4,
        epochs=1,
        ll_samples=8,
        snr_repeats=2,
    )
    results = compare.compare(config, progress=False)
    assert [r.bound for r in results] == ["elbo", "iwae-dreg"]
    assert results[1].engine == "IWAE_4, DREG"
    assert all(math.isfinite(r.log_likelihood) for r in results)


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit status 2, the valid choices named, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--bounds", "elbo,nope"], ["'nope'", "valid choices: elbo, iwae, miwae, ciwae, piwae"]),
        (["--bounds", "iwae-foo"], ["estimator", "stl, dreg"]),
        (["--bounds", "miwae:4x8"], ["M*K = 32", "--particles is 64", "M*K must equal"]),
        (["--bounds", "piwae", "--particles", "48"], ["48 is not a square", "piwae:MxK"]),
        (["--bounds", "miwae", "--inner", "5"], ["M*K must equal --particles", "5", "64"]),
        (["--bounds", "elbo,elbo"], ["given twice"]),
        (["--dataset", "nope"], ["valid choices", "digits", "mnist5k"]),
        (["--epochs", "0"], ["positive integer"]),
        (["--snr-repeats", "1"], ["integer >= 2"]),
    ],
)
def test_bad_arguments_exit_2(tmp_path, capsys, extra, expected):
    run_dir = tmp_path / "run"
    argv = ["compare", "--quick", "--dataset", "digits", "--run-dir", str(run_dir), *extra]
    assert cli.main(argv) == 2
    message = error_line(capsys)
    for text in expected:
        assert text in message, message
    assert not run_dir.exists()


def test_missing_dataset_files(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PVAE_MNIST_DIR", raising=False)
    argv = ["compare", "--quick", "--dataset", "mnist", "--run-dir", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    assert "PVAE_MNIST_DIR" in error_line(capsys)


def test_help_documents_the_grammar(capsys):
    assert cli.main(["compare", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("--bounds", "MxK", "-dreg", "--particles", "--quick", "--ll-samples"):
        assert text in out


def test_bound_labels_round_trip():
    for text in ("elbo", "iwae-dreg", "miwae:8x8", "ciwae:0.25", "piwae-stl:4x16", "elbo-stl"):
        assert parse_bound(text).label == text
        assert parse_bound(parse_bound(text).label) == parse_bound(text)


def test_an_earlier_comparison_is_refused_or_replaced(tmp_path, capsys):
    """compare into a folder that holds a comparison refuses (nothing changes) unless
    --overwrite, which replaces pvae's own outputs and keeps the user's files."""
    run_dir = tmp_path / "run"
    argv = ["compare", "--quick", "--dataset", "digits", "--bounds", "elbo", "--epochs", "1"]
    argv += ["--ll-samples", "4", "--snr-repeats", "2", "--run-dir", str(run_dir), "--quiet"]
    assert cli.main(argv) == 0
    (run_dir / "notes.txt").write_text("mine")
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert cli.main([*argv[:5], "iwae", *argv[6:]]) == 2
    assert "already holds a comparison" in error_line(capsys)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before
    assert cli.main([*argv[:5], "iwae", *argv[6:], "--overwrite"]) == 0
    assert not (run_dir / "elbo").exists() and (run_dir / "iwae").is_dir()
    assert (run_dir / "notes.txt").read_text() == "mine"
    results = json.loads((run_dir / "results.json").read_text())["results"]
    assert [r["bound"] for r in results] == ["iwae"]
