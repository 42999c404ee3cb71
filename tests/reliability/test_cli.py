"""The CLI refuses what it cannot do with one line and a non-zero exit (issue 10)."""

import pytest

from pvae.app import cli

TINY = ["--dataset", "digits", "--z-dim", "2", "--hidden", "8", "--ll-samples", "2", "--quiet"]


def error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("pvae: error: "), err
    assert "\n" not in err and "Traceback" not in err
    return err


def test_a_seed_beyond_numpy_is_one_line(tmp_path, capsys):
    argv = ["train", *TINY, "--run-dir", str(tmp_path / "r"), "--seed", "99999999999"]
    assert cli.main(argv) == 2
    assert "--seed" in error_line(capsys)
    assert not (tmp_path / "r").exists()


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    argv = ["train", *TINY, "--run-dir", str(tmp_path), "--resume"]
    assert cli.main(argv) == 2
    assert "holds no checkpoint.pt" in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_resume_after_config_json_was_deleted_is_refused(tmp_path, capsys):
    assert cli.main(["train", *TINY, "--epochs", "1", "--run-dir", str(tmp_path)]) == 0
    (tmp_path / "config.json").unlink()
    capsys.readouterr()
    argv = ["train", *TINY, "--epochs", "2", "--run-dir", str(tmp_path), "--resume"]
    assert cli.main([*argv, "--hidden", "12"]) == 2
    assert "config.json is missing" in error_line(capsys)
