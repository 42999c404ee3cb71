"""Posterior.save and Posterior.load: a sampler's posterior written to a file and read back
exactly; a file that holds no posterior is refused, naming it."""

import pytest
import torch

import pvae


def posterior():
    generator = torch.Generator().manual_seed(0)
    return pvae.Posterior(
        samples={"w": torch.randn(2, 5, 3, generator=generator), "s": torch.rand(2, 5)},
        log_joint=torch.randn(2, 5, generator=generator),
        warmup_log_joint=torch.randn(2, 4, generator=generator),
        settings={"lr": 0.1, "num_chains": 2},
    )


def test_save_then_load_gives_the_same_posterior(tmp_path):
    saved = posterior()
    path = saved.save(tmp_path / "posterior.pt")
    assert path == tmp_path / "posterior.pt" and not list(tmp_path.glob("*.tmp"))
    loaded = pvae.Posterior.load(path, run_dir="run")
    assert loaded.samples.keys() == saved.samples.keys()
    for name, value in saved.samples.items():
        assert torch.equal(loaded.samples[name], value), name
    assert torch.equal(loaded.log_joint, saved.log_joint)
    assert torch.equal(loaded.warmup_log_joint, saved.warmup_log_joint)
    assert loaded.settings == saved.settings and loaded.run_dir == "run"


def test_a_file_without_a_posterior_is_refused(tmp_path):
    torch.save({"samples": {}}, tmp_path / "no-log-joint.pt")
    with pytest.raises(ValueError, match="no-log-joint.pt does not hold a saved Posterior"):
        pvae.Posterior.load(tmp_path / "no-log-joint.pt")
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(ValueError, match="cannot read .*text.pt"):
        pvae.Posterior.load(tmp_path / "text.pt")
    torch.save(
        {"samples": {"w": torch.zeros(2, 3)}, "log_joint": torch.zeros(2, 4)}, tmp_path / "bad.pt"
    )
    with pytest.raises(ValueError, match=r"samples\['w'\] has shape \(2, 3\)"):
        pvae.Posterior.load(tmp_path / "bad.pt")  # the constructor's checks
