"""``pvae sample`` on the command line: its defaults (4 chains, SGHMC's lr and friction, a
prior scale chosen from the data), the refusals that come before anything is written, Ctrl-C
(a checkpoint, one line, exit 130) and ``--resume`` (bit-identical samples)."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from pvae.app import cli
from pvae.app.registry import MODELS, PRIOR_SCALES
from pvae.app.sample import load_posterior
from pvae.inference import SGHMC

TINY = ["--dataset", "digits", "--z-dim", "2", "--hidden", "8", "--max-train", "60"]
FEW = ["--num-samples", "4", "--warmup", "3", "--batch-size", "30", "--quiet"]


def parse(*argv):
    return cli.build_parser().parse_args(["sample", *argv])


def test_defaults_four_chains_sghmc_defaults_and_an_automatic_prior():
    args = parse("--dataset", "digits", "--run-dir", "r")
    assert args.chains == 4  # R-hat is defined
    assert args.model == "bae" and args.bae_prior_scale is None  # None: the option's default
    assert MODELS["bae"].resolve_options({})["prior_scale"] == "auto"
    assert args.lr is None and args.friction is None  # resolved to SGHMC's own defaults
    assert args.checkpoint_every == cli.SAMPLE_CHECKPOINT_EVERY
    assert (
        parse("--dataset", "digits", "--run-dir", "r", "--checkpoint-every", "7").checkpoint_every
        == 7
    )
    help_text = cli._subparsers(cli.build_parser())["sample"].format_help()
    assert f"SGHMC's, {SGHMC().friction}" in help_text and "(default: 4)" in help_text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "vae"], "model 'vae' has no weights with a prior to sample"),
        (["--model", "svae"], "'pvae sample' takes bae"),
        (["--model", "mgpvae"], "has no weights with a prior to sample"),
        (["--friction", "2"], "argument --friction: expected a number in (0, 1]"),
        (["--friction", "0"], "argument --friction"),
        (["--lr", "-1"], "argument --lr"),
        (["--chains", "0"], "argument --chains"),
        (["--checkpoint-every", "0"], "argument --checkpoint-every"),
        (["--bae-prior-scale", "-1"], "expected 'auto' or a number > 0"),
        (["--resume"], "holds no checkpoint.pt to continue"),
    ],
)
def test_refused_before_anything_is_written(tmp_path, capsys, argv, message):
    run_dir = tmp_path / "run"
    assert cli.main(["sample", *TINY, *FEW, *argv, "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pvae: error: ") and message in err and "Traceback" not in err
    assert not run_dir.exists()


def test_train_refuses_a_sampled_model():
    with pytest.raises(cli.CliError, match="sampled, not trained: use 'pvae sample --model bae'"):
        cli.build_parser().parse_args(
            ["train", "--dataset", "digits", "--model", "bae", "--run-dir", "r"]
        )


def _fake_run(run_dir, command):
    """A run folder as ``pvae <command>`` leaves it (config.json and a checkpoint)."""
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"command": command, "run": {}, "args": {}}))
    (run_dir / "checkpoint.pt").write_bytes(b"not read")
    return {path.name: path.read_bytes() for path in run_dir.iterdir()}


@pytest.mark.parametrize("resume", [True, False])
def test_a_folder_of_the_other_command_is_named_and_left_alone(tmp_path, capsys, resume):
    flag = ["--resume"] if resume else []
    sample_dir, train_dir = tmp_path / "sampled", tmp_path / "trained"
    sample_files, train_files = _fake_run(sample_dir, "sample"), _fake_run(train_dir, "train")
    argv = ["train", *TINY[:6], "--epochs", "1", "--quiet", *flag, "--run-dir", str(sample_dir)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--run-dir {sample_dir} holds a 'pvae sample' run" in err
    assert ("pvae sample --resume" in err) == resume
    assert cli.main(["sample", *TINY, *FEW, *flag, "--run-dir", str(train_dir)]) == 2
    err = capsys.readouterr().err
    assert f"--run-dir {train_dir} holds a 'pvae train' run, not a 'pvae sample' run" in err
    assert ("pvae train --resume" in err) == resume
    assert {p.name: p.read_bytes() for p in sample_dir.iterdir()} == sample_files
    assert {p.name: p.read_bytes() for p in train_dir.iterdir()} == train_files


@pytest.mark.slow
def test_sigint_checkpoints_and_resume_is_bit_identical(tmp_path, capsys, monkeypatch):
    """Ctrl-C at a known step (SIGINT sent by the sampler's 11th step, inside chain 1 of 4
    chains of 7 steps): exit 130 with one line, a checkpoint; --resume finishes the run with
    the samples of an uninterrupted one, bit for bit. The prior scale is chosen by DSWD and
    recorded in config.json and the output."""
    argv = ["sample", *TINY, *FEW]
    whole_dir, run_dir = tmp_path / "whole", tmp_path / "run"
    assert cli.main([*argv, "--run-dir", str(whole_dir)]) == 0
    out = capsys.readouterr().out
    document = json.loads((whole_dir / "config.json").read_text())
    chosen = document["run"]["model_options"]["prior_scale"]
    assert chosen in PRIOR_SCALES and document["prior_selection"]["chosen"] == chosen
    assert document["prior_selection"]["metric"] == "dswd"
    assert len(document["prior_selection"]["distances"]) == len(PRIOR_SCALES)
    assert f"prior scale {chosen:g} (chosen by DSWD among" in out and "4 chain(s)" in out

    step = SGHMC.train_step
    taken = [0]

    def interrupting(self, *args, **kwargs):
        if taken[0] == 10:
            signal.raise_signal(signal.SIGINT)
        taken[0] += 1
        return step(self, *args, **kwargs)

    monkeypatch.setattr(SGHMC, "train_step", interrupting)
    assert cli.main([*argv, "--run-dir", str(run_dir)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "interrupted; checkpoint at chain 1, step 4" in err and "--resume" in err
    assert not (run_dir / "posterior.pt").exists()
    config = (run_dir / "config.json").read_bytes()
    monkeypatch.setattr(SGHMC, "train_step", step)
    assert cli.main([*argv, "--resume", "--run-dir", str(run_dir)]) == 0
    assert (run_dir / "config.json").read_bytes() == config  # the run's record is kept
    whole, resumed = load_posterior(whole_dir), load_posterior(run_dir)
    assert whole.samples.keys() == resumed.samples.keys()
    for name in whole.samples:
        assert torch.equal(whole.samples[name], resumed.samples[name]), name
    assert torch.equal(whole.log_joint, resumed.log_joint)
    # a resume with other defining arguments is refused, naming them
    assert cli.main([*argv, "--thin", "2", "--resume", "--run-dir", str(run_dir)]) == 2
    assert "--thin (was 1, now 2)" in capsys.readouterr().err
