"""Run folders: no non-finite checkpoint, no claim that is not true, one run per folder, no
silent overwrite, no resume with other settings (issue 10)."""

import fcntl

import pyro
import pytest
import torch

import pvae
from pvae.checkpoint import LOCK, RunDirInUse, write_checkpoint


def fit(pair, data, run_dir, **kwargs):
    kwargs = {"epochs": 1, "batch_size": 32, "progress": False, **kwargs}
    pyro.clear_param_store()  # each call builds a new pair under the same names
    return pvae.fit(pair.model, pair.guide, data, run_dir=run_dir, **kwargs)


def nan_gradient_at(pair, call):
    """A NaN gradient (the bound stays finite) on the decoder at backward pass ``call``."""
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == call else grad

    pair.decoder.weight.register_hook(hook)


def test_a_nan_gradient_on_the_last_step_of_the_first_epoch_writes_no_checkpoint(
    x, make_pair, tmp_path
):
    pair = make_pair()
    nan_gradient_at(pair, 2)  # 64 rows / 32: step 2 is the last of epoch 0
    with pytest.raises(pvae.TrainingDiverged) as error:
        fit(pair, x, tmp_path, epochs=3)
    message = str(error.value)
    assert "no checkpoint was written" in message and "intact" not in message
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_nan_gradient_later_keeps_the_finite_checkpoint(x, make_pair, tmp_path):
    pair = make_pair()
    nan_gradient_at(pair, 4)  # the last step of epoch 1
    with pytest.raises(pvae.TrainingDiverged, match="checkpoint of epoch 0"):
        fit(pair, x, tmp_path, epochs=3)
    state = pvae.load_checkpoint(tmp_path / "checkpoint.pt")  # loads: it is finite
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["params"].values())


def test_a_non_finite_checkpoint_is_neither_written_nor_loaded(tmp_path):
    state = {"epoch": 0, "params": {"w": torch.tensor([float("nan")])}}
    with pytest.raises(ValueError, match="'w'.*NaN"):
        write_checkpoint(tmp_path / "checkpoint.pt", state, {})
    assert not (tmp_path / "checkpoint.pt").exists()
    torch.save({"format": "pvae-checkpoint-1", **state}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="refusing to load.*NaN"):
        pvae.load_checkpoint(tmp_path / "checkpoint.pt")


def test_a_locked_run_folder_is_refused(x, make_pair, tmp_path):
    with open(tmp_path / LOCK, "a") as other:  # another process's lock
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunDirInUse, match="in use by another pvae run"):
            fit(make_pair(), x, tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()
    fit(make_pair(), x, tmp_path)  # released: trains, and leaves no lock file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "run.json"]


def test_a_folder_that_holds_a_run_is_not_overwritten(x, make_pair, tmp_path):
    fit(make_pair(), x, tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="already holds a run.*resume=True"):
        fit(make_pair(), x, tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize(
    "change, name",
    [
        ({"lr": 0.1}, "lr"),
        ({"batch_size": 16}, "batch_size"),
        ({"seed": 1}, "seed"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"engine": pvae.inference.IWAE(4)}, "engine"),
    ],
)
def test_resume_with_other_settings_is_refused(change, name, x, make_pair, tmp_path):
    fit(make_pair(), x, tmp_path)
    with pytest.raises(ValueError, match=rf"settings differ.*{name} \(checkpoint"):
        fit(make_pair(), x, tmp_path, resume=True, epochs=2, **change)


def test_resume_with_a_differently_sized_model_is_refused(x, make_pair, tmp_path):
    fit(make_pair(), x, tmp_path)
    with pytest.raises(ValueError, match=r"other shapes: .*checkpoint \(4, 6\), model \(6, 6\)"):
        fit(make_pair(z_dim=3), x, tmp_path, resume=True, epochs=2)
