"""The run-folder mechanism shared by ``pvae.fit``/``pvae.sample`` and the command line."""

import inspect

import pytest

from pvae import data
from pvae.checkpoint import CHECKPOINT, RunFolder
from pvae.train import _in_run_folder


def test_refuses_a_file(tmp_path):
    path = tmp_path / "run"
    path.write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        RunFolder(path)


def test_a_failed_run_leaves_no_created_folder(tmp_path):
    path = tmp_path / "a" / "b" / "run"
    with pytest.raises(RuntimeError), RunFolder(path):
        assert path.is_dir()
        raise RuntimeError("the run failed")
    assert list(tmp_path.iterdir()) == []


def test_keeps_what_the_run_wrote_and_folders_that_were_there(tmp_path):
    path = tmp_path / "run"
    with RunFolder(path) as folder:
        (path / CHECKPOINT).write_bytes(b"x")
    assert folder.has_checkpoint and path.is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    with RunFolder(empty):
        pass
    assert empty.is_dir()  # it was there before: not removed


def test_fit_refuses_a_file_as_run_dir(tmp_path):
    path = tmp_path / "run"
    path.write_text("")
    with pytest.raises(ValueError, match="run_dir .* exists and is not a folder"):
        _in_run_folder(path, False, lambda: None)


def test_register_options_loader_takes_the_dataclass_keywords():
    loader = data._pendulum  # registered by register_options
    names = list(inspect.signature(loader).parameters)
    assert names[:3] == ["sizes", "num_steps", "dt"] and names[-1] == "seed"
    a = loader((2, 1, 1), num_steps=4, seed=1)  # positional sizes, as before
    b = data.load("pendulum", sizes=(2, 1, 1), num_steps=4, seed=1)
    assert (a.train.values == b.train.values).all()
    with pytest.raises(ValueError, match="size must be an integer >= 4"):
        loader(sizes=(2, 1, 1), size=3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        data.load("mm-gp-sim", sizes=(2, 1, 1), colour=1)
