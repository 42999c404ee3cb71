"""pvae.tracking against the real packages: a TensorBoard log written during a tiny fit reads
back (EventAccumulator), an MLflow run in a local file store reads back (MlflowClient), and
``pvae train`` / ``pvae compare`` with ``--log``. Hermetic: no network, telemetry off."""

import json
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pvae
from pvae import tracking
from pvae.app import cli

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch):
    """No telemetry, no git probing, no tracking server from the environment."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    # MLflow 3 opens its file store only when asked to: the logger asks (the variable is
    # restored after the test).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Pair:
    def __init__(self, x_dim=4, z_dim=2):
        torch.manual_seed(0)
        self.z_dim = z_dim
        self.encoder = nn.Linear(x_dim, 2 * z_dim)
        self.decoder = nn.Linear(z_dim, x_dim)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.5).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


def tiny_fit(logger, epochs=2):
    pyro.clear_param_store()
    pair = Pair()
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(1))
    return pvae.fit(
        pair.model,
        pair.guide,
        x[:40],
        epochs=epochs,
        batch_size=20,
        lr=1e-2,
        valid=x[40:],
        progress=False,
        callbacks=[logger.epoch],
        step_callbacks=[logger.step],
    )


def figure(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1])
    fig.savefig(path)
    plt.close(fig)
    return path


def scalars(log_dir, tag):
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_scalars_params_and_artifacts_read_back(tmp_path):
    (tmp_path / "notes.md").write_text("# notes")
    with tracking.TensorBoardLogger(tmp_path / "tb", params={"lr": 0.01, "net": {"z": 2}}) as log:
        run = tiny_fit(log)
        log.log_artifacts([figure(tmp_path / "curve.png"), tmp_path / "notes.md"])
    steps = scalars(tmp_path / "tb", "step/bound")
    assert [s for s, _ in steps] == [0, 1, 2, 3]
    assert [v for _, v in steps] == pytest.approx([s["bound"] for s in run.steps], rel=1e-6)
    losses = [v for _, v in scalars(tmp_path / "tb", "step/loss")]
    assert losses == pytest.approx([s["loss"] for s in run.steps], rel=1e-6)
    for key in ("train_bound", "valid_bound", "seconds"):
        logged = scalars(tmp_path / "tb", f"epoch/{key}")
        assert logged == [(h["epoch"], pytest.approx(h[key], rel=1e-6)) for h in run.history]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "curve.png" in events.Tags()["images"]
    text = {
        tag: events.Tensors(tag)[0].tensor_proto.string_val[0] for tag in events.Tags()["tensors"]
    }
    assert json.loads(text["params/text_summary"]) == {"lr": 0.01, "net.z": 2}
    assert text["notes.md/text_summary"] == b"# notes"


def test_mlflow_run_reads_back(tmp_path):
    store = tmp_path / "mlruns"
    (tmp_path / "results.json").write_text('{"a": 1}')
    with tracking.MLflowLogger(store, experiment="tiny", params={"lr": 0.01}) as log:
        run = tiny_fit(log)
        log.log_artifacts([tmp_path / "results.json"])
    client = MlflowClient(tracking_uri=store.as_uri())
    logged = client.get_run(log.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.params == {"lr": "0.01"}
    history = client.get_metric_history(log.run_id, "step/loss")
    assert sorted((m.step, m.value) for m in history) == [
        (i, pytest.approx(s["loss"])) for i, s in enumerate(run.steps)
    ]
    valid = client.get_metric_history(log.run_id, "epoch/valid_bound")
    assert sorted((m.step, m.value) for m in valid) == [
        (h["epoch"], pytest.approx(h["valid_bound"])) for h in run.history
    ]
    assert [a.path for a in client.list_artifacts(log.run_id)] == ["results.json"]
    local = client.download_artifacts(log.run_id, "results.json", str(tmp_path / "back"))
    assert json.loads(open(local).read()) == {"a": 1}


def test_mlflow_run_failed_in_an_error_and_log_every(tmp_path):
    store = tmp_path / "mlruns"
    with pytest.raises(RuntimeError), tracking.MLflowLogger(store, log_every=3) as log:
        tiny_fit(log)
        raise RuntimeError("boom")
    client = MlflowClient(tracking_uri=store.as_uri())
    assert client.get_run(log.run_id).info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(log.run_id, "step/bound")] == [0, 3]


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ImportError, match=r"pip install 'pyro-vae\[mlflow\]'"):
        tracking.MLflowLogger(tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pyro-vae\[tensorboard\]"):
        tracking.TensorBoardLogger(tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="log_every"):
        tracking.TensorBoardLogger(tmp_path / "tb", log_every=0)
    with tracking.TensorBoardLogger(tmp_path / "tb") as log:
        with pytest.raises(ValueError, match="no such files"):
            log.log_artifacts([tmp_path / "missing.png"])
        (tmp_path / "model.pt").write_bytes(b"")
        with pytest.raises(ValueError, match="model.pt"):
            log.log_artifacts([tmp_path / "model.pt"])
    with pytest.raises(TypeError, match="params"):
        tracking.flatten_params([1, 2])
    with pytest.raises(ValueError, match="unknown loggers"):
        tracking.open_loggers(["wandb"], tmp_path)
    assert tracking.flatten_params({"a": {"b": [1, 2]}, "c": None}) == {
        "a.b": "[1, 2]",
        "c": "None",
    }


# -- the command line ---------------------------------------------------------------------------

TRAIN = ["train", "--dataset", "digits", "--epochs", "1", "--z-dim", "2", "--hidden", "8"]
TRAIN += ["--ll-samples", "2", "--quiet"]


def test_train_logs_to_tensorboard_under_the_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    assert cli.main([*TRAIN, "--run-dir", str(run_dir), "--log", "tensorboard"]) == 0
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"epoch/train_bound", "step/loss", "test_log_likelihood.mean"} <= set(
        events.Tags()["scalars"]
    )
    assert "learning_curve.png" in events.Tags()["images"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["log"] == ["tensorboard"]


def test_train_logs_to_mlflow_in_the_run_folder_or_the_tracking_uri(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    assert cli.main([*TRAIN, "--run-dir", str(run_dir), "--log", "mlflow"]) == 0
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    (logged,) = client.search_runs([client.get_experiment_by_name("pvae").experiment_id])
    assert logged.info.status == "FINISHED"
    assert logged.data.params["engine"] == "elbo"
    assert {"epoch/train_bound", "step/bound", "test_log_likelihood.mean"} <= set(
        logged.data.metrics
    )
    names = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"metrics.json", "config.json", "learning_curve.png"} <= names

    elsewhere = tmp_path / "store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere.as_uri())
    other = tmp_path / "other"
    assert cli.main([*TRAIN, "--run-dir", str(other), "--log", "mlflow"]) == 0
    assert not (other / "mlruns").exists() and (elsewhere).is_dir()


def test_train_refuses_an_unknown_logger(tmp_path, capsys):
    assert cli.main([*TRAIN, "--run-dir", str(tmp_path / "r"), "--log", "wandb"]) == 2
    assert "choose from tensorboard, mlflow" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_compare_logs_one_run_per_bound(tmp_path):
    run_dir = tmp_path / "compare"
    argv = ["compare", "--quick", "--dataset", "digits", "--bounds", "elbo,iwae", "--epochs", "1"]
    argv += ["--particles", "2", "--ll-samples", "2", "--snr-repeats", "2", "--quiet"]
    assert cli.main([*argv, "--run-dir", str(run_dir), "--log", "mlflow,tensorboard"]) == 0
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("pvae").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"compare", "elbo", "iwae"}
    parent = by_name["compare"].info.run_id
    for bound in ("elbo", "iwae"):
        child = by_name[bound]
        assert child.data.tags["mlflow.parentRunId"] == parent
        assert child.data.params["bound"] == bound
        assert {"step/loss", "epoch/train_bound", "log_likelihood"} <= set(child.data.metrics)
        assert child.info.status == "FINISHED"
    assert "results.md" in {a.path for a in client.list_artifacts(parent)}
    for bound in ("elbo", "iwae"):
        assert scalars(run_dir / "tensorboard" / bound, "epoch/train_bound")
