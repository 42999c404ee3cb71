"""``pvae diagnose``: a tiny ``pvae train`` run and a quick ``pvae compare`` run are diagnosed
(every file written, the verdict in ``diagnostics.md``, one subfolder per bound); empty,
foreign and mismatched run folders exit 2 naming what is missing."""

import json
import math
import shutil

import pyro
import pytest
import torch

from pvae.app import cli, diagnose
from pvae.nets import MIN_SCALE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--z-dim", "3", "--hidden", "16", "--ll-samples", "4", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: thread hand-offs cost more than they save
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train")
    argv = ["train", "--dataset", "digits", "--epochs", "1", "--run-dir", str(run_dir)]
    assert cli.main([*argv, *TINY]) == 0
    return run_dir


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("compare")
    argv = ["compare", "--quick", "--dataset", "digits", "--bounds", "elbo,iwae"]
    argv += ["--epochs", "1", "--particles", "4", "--snr-repeats", "2", "--threads", "1"]
    assert cli.main([*argv, *TINY, "--run-dir", str(run_dir)]) == 0
    return run_dir


def error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("pvae: error: "), err
    assert "\n" not in err and "Traceback" not in err
    return err


def check_files(folder):
    for name in diagnose.FILES:
        assert (folder / name).is_file(), name
        if name.endswith(".png"):
            assert (folder / name).read_bytes()[:8] == PNG_MAGIC, name
    assert not list(folder.glob(".*.tmp")), "temporary files left behind"


def test_train_run(train_run, capsys):
    assert cli.main(["diagnose", str(train_run), "--points", "100"]) == 0
    out = capsys.readouterr().out
    assert "Verdict:" in out and "diagnostics.md" in out
    check_files(train_run)
    text = (train_run / "diagnostics.md").read_text()
    assert "Verdict: " in text
    assert "| z | 2 |" in text  # the per-dimension table
    for figure in ("kl_per_dim.png", "activity.png", "relevance.png", "traversals.png"):
        assert f"({figure})" in text


def test_api_and_out_dir(train_run, tmp_path):
    result = diagnose.diagnose(train_run, out_dir=tmp_path / "out", num_points=50)
    check_files(tmp_path / "out")
    assert result.kind == "train" and result.collapse is not None
    assert result.relevance is not None and len(result.relevance.ranking) == 3
    assert result.verdict.splitlines()[0] in (tmp_path / "out" / "diagnostics.md").read_text()
    assert set(result.collapse.layers) == {"z"}


def test_parameters_are_the_trained_ones(train_run):
    loaded = diagnose.load_run(train_run)
    state = torch.load(train_run / "checkpoint.pt", weights_only=True)
    store = pyro.get_param_store()
    # The rebuilt model may carry another name prefix (vae_1 while an earlier vae is alive).
    prefix = loaded.model._pyro_name
    stored = {name.split(".", 1)[1]: name for name in store.keys() if name.startswith(prefix + ".")}
    assert set(stored) == {name.split(".", 1)[1] for name in state["params"]}
    for name, value in state["params"].items():
        assert torch.equal(store.get_param(stored[name.split(".", 1)[1]]).unconstrained(), value)
    assert loaded.title == "vae / elbo on digits"


def test_compare_run(compare_run, capsys):
    assert cli.main(["diagnose", str(compare_run), "--points", "50"]) == 0
    out = capsys.readouterr().out
    assert "[elbo]" in out and "[iwae]" in out
    for bound in ("elbo", "iwae"):
        check_files(compare_run / bound)
        assert "Verdict: " in (compare_run / bound / "diagnostics.md").read_text()
    summary = (compare_run / "diagnostics.md").read_text()
    assert "elbo/diagnostics.md" in summary and "iwae/diagnostics.md" in summary


def test_empty_folder(tmp_path, capsys):
    assert cli.main(["diagnose", str(tmp_path)]) == 2
    err = error_line(capsys)
    assert "config.json" in err and "checkpoint.pt" in err and "results.json" in err
    assert "empty" in err


def test_foreign_folder(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    assert cli.main(["diagnose", str(tmp_path)]) == 2
    err = error_line(capsys)
    assert "config.json" in err and "results.json" in err and "notes.txt" in err


def test_missing_folder(tmp_path, capsys):
    assert cli.main(["diagnose", str(tmp_path / "nope")]) == 2
    assert "does not exist" in error_line(capsys)


@pytest.mark.parametrize("missing", ["checkpoint.pt", "config.json"])
def test_train_run_missing_a_file(train_run, tmp_path, capsys, missing):
    copy = tmp_path / "run"
    shutil.copytree(train_run, copy)
    (copy / missing).unlink()
    assert cli.main(["diagnose", str(copy)]) == 2
    err = error_line(capsys)
    assert f"{missing} is missing" in err and "metrics.json" in err


def test_compare_without_results(compare_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(compare_run, copy)
    (copy / "results.json").unlink()
    assert cli.main(["diagnose", str(copy)]) == 2
    assert "results.json is missing" in error_line(capsys)


def test_checkpoint_not_matching_the_config(train_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(train_run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["run"]["hidden"] = [8]
    (copy / "config.json").write_text(json.dumps(config))
    assert cli.main(["diagnose", str(copy)]) == 2
    assert "does not match" in error_line(capsys)


def test_unreadable_checkpoint(train_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(train_run, copy)
    (copy / "checkpoint.pt").write_bytes(b"garbage")
    assert cli.main(["diagnose", str(copy)]) == 2
    assert "checkpoint.pt" in error_line(capsys)


def test_non_image_run(tmp_path, capsys):
    argv = ["train", "--dataset", "linear-gaussian", "--epochs", "1", "--run-dir", str(tmp_path)]
    assert cli.main([*argv, "--z-dim", "2", "--hidden", "8", "--ll-samples", "2", "--quiet"]) == 0
    assert cli.main(["diagnose", str(tmp_path), "--points", "50", "--quiet"]) == 0
    check_files(tmp_path)
    assert "Verdict:" not in capsys.readouterr().out  # --quiet: the final line only


def _set_encoder_head(run_dir, collapsed, active):
    """Rewrite the checkpoint's encoder head: dimensions in ``collapsed`` output the prior
    N(0, 1) for every x (KL exactly 0), those in ``active`` a mean that moves strongly with x
    and a small scale (a large KL): a run whose collapse is known."""
    path = run_dir / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    (weight_name,) = [n for n in state["params"] if "encoder" in n and n.endswith(".weight")][-1:]
    bias_name = weight_name.removesuffix("weight") + "bias"
    weight, bias = state["params"][weight_name].clone(), state["params"][bias_name].clone()
    z_dim = weight.shape[0] // 2
    unit_raw = math.log(math.expm1(1.0 - MIN_SCALE))  # softplus(raw) + MIN_SCALE = 1
    gen = torch.Generator().manual_seed(0)
    for d in collapsed:
        weight[d], bias[d] = 0.0, 0.0
        weight[z_dim + d], bias[z_dim + d] = 0.0, unit_raw
    for d in active:
        weight[d] = 3.0 * torch.randn(weight.shape[1], generator=gen, dtype=weight.dtype)
        weight[z_dim + d], bias[z_dim + d] = 0.0, -4.0
    state["params"][weight_name], state["params"][bias_name] = weight, bias
    torch.save(state, path)


@pytest.mark.parametrize(
    "collapsed, active, verdict",
    [
        ((0, 1, 2), (), "Verdict: total posterior collapse"),
        ((1,), (0, 2), "Verdict: partial posterior collapse"),
        ((), (0, 1, 2), "Verdict: no posterior collapse"),
    ],
)
def test_verdict_on_a_run_whose_collapse_is_known(train_run, tmp_path, collapsed, active, verdict):
    copy = tmp_path / "run"
    shutil.copytree(train_run, copy)
    _set_encoder_head(copy, collapsed, active)
    result = diagnose.diagnose(copy, num_points=100)
    assert result.verdict.splitlines()[0].startswith(verdict), result.verdict
    assert result.collapse is not None
    assert result.collapse.layers["z"].collapsed_dims == list(collapsed)
    text = (copy / "diagnostics.md").read_text()
    assert verdict in text
    if collapsed and active:
        assert "Partial collapse: " in text and f"{len(active)} of 3 dimensions in use" in text


def test_posterior_paths_grid_per_channel():
    """A (C, T) site (channels first) of 20 channels: one panel per channel in a grid with
    shared axes, each panel the channel's path; no drawn labels overlap."""
    from tests.core.test_plots import overlapping_text

    mean = torch.randn(1, 20, 30, generator=torch.Generator().manual_seed(0)).cumsum(-1)

    def guide(x):
        with pyro.plate("data", 1):
            pyro.sample("z", pyro.distributions.Normal(mean, 0.5).to_event(2))

    fig = diagnose.posterior_paths(guide, (torch.zeros(1, 3),), "z", channels_first=True)
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == 20 and len({ax.get_ylim() for ax in panels}) == 1
    for c, ax in enumerate(panels):
        assert ax.get_title() == f"channel {c}"
        assert torch.allclose(torch.as_tensor(ax.get_lines()[0].get_ydata()), mean[0, c].double())
    assert overlapping_text(fig) == []


def test_sample_run_draws_its_prior_selection(tmp_path, monkeypatch):
    """A sampler run that chose its prior scale by DSWD: prior_selection.png and a section
    naming the choice (the minimum of the recorded distances). R-hat and the trace plots
    (ArviZ, tens of seconds) are stubbed: tests/cli/test_bae.py checks them."""
    from pvae.app import sample

    stub = sample.SampleDiagnosis(lines=["# Diagnostics of a sampler run"], verdict="stub")
    monkeypatch.setattr(sample, "diagnose_sample", lambda run_dir, out: stub)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    selection = {"metric": "dswd", "chosen": 0.3, "candidates": [0.1, 0.3, 1, 3]}
    selection["distances"] = [10.2, 9.9, 10.25, 10.3]
    config = {"command": "sample", "prior_selection": selection}
    (run_dir / "config.json").write_text(json.dumps(config))
    result = diagnose.diagnose(run_dir)
    assert result.kind == "sample" and run_dir / "prior_selection.png" in result.files
    assert (run_dir / "prior_selection.png").read_bytes()[:8] == PNG_MAGIC
    text = result.report.read_text()
    assert text.startswith("# Diagnostics of a sampler run\n")
    assert "Chosen by DSWD among 0.1, 0.3, 1, 3: 0.3" in text
    assert "![prior selection](prior_selection.png)" in text
    selection["distances"] = [1.0]  # one distance for four candidates
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(diagnose.DiagnoseError, match="prior_selection: each selection must"):
        diagnose.diagnose(run_dir)
