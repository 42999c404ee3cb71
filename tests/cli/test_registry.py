"""Every zoo model through ``pvae train``, ``pvae compare`` and ``pvae diagnose`` (tiny
budgets); ``diagnose`` and ``compare`` report the same active-unit count; engines that need
particles get a default or are refused; a model and an engine added by one registration each
appear in the parser and train."""

import inspect
import json
import re
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch

from pvae.app import cli, diagnose, index, registry, runs
from pvae.app.registry import ENGINES, MODELS, Option, parse_bound
from pvae.inference import ELBO

TINY = ["--z-dim", "4", "--hidden", "16", "--ll-samples", "4", "--quiet"]
ZOO = {  # model[-variant] -> (dataset, its own options)
    "vae": ("digits", []),
    "cvae": ("digits", ["--cvae-given", "2"]),
    "hvae": ("digits", ["--hvae-layers", "2"]),
    "multimodal": ("digits-labels", ["--multimodal-fusion", "poe"]),
    "multimodal-moe": ("digits-labels", ["--multimodal-fusion", "moe"]),
    "ard": ("linear-gaussian", ["--ard-min-variance", "1e-4"]),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: thread hand-offs cost more than they save
    yield
    torch.set_num_threads(threads)


def error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("pvae: error: "), err
    assert "\n" not in err
    return err


@pytest.mark.parametrize("model", list(ZOO))
def test_train_then_diagnose(model, tmp_path):
    dataset, options = ZOO[model]
    model = model.split("-")[0]
    run_dir = tmp_path / "run"
    argv = ["train", "--model", model, "--dataset", dataset, "--engine", "iwae"]
    argv += ["--particles", "2", "--epochs", "1", "--run-dir", str(run_dir), *TINY, *options]
    assert cli.main(argv) == 0
    config, _ = runs.read_config(run_dir)
    assert config.model == model and config.engine == "iwae" and config.particles == 2
    assert config.model_options == MODELS[model].resolve_options(
        {o.name: o.type(v) for o, v in zip(MODELS[model].options, options[1::2], strict=False)}
    )
    result = diagnose.diagnose(run_dir)
    assert result.kind == "train" and result.report.is_file()
    active, dims = result.active_units
    assert 0 <= active <= dims
    if result.relevance is not None:  # no dimension both collapsed and relevant
        layer = result.collapse.layers["z1" if model == "hvae" else "z"]
        assert not set(layer.collapsed_dims) & set(result.relevant)


@pytest.mark.parametrize("model", list(ZOO))
def test_compare_then_diagnose_agree_on_active_units(model, tmp_path):
    """One definition, one number: the "active units" of results.json equal those diagnose
    counts for every bound of the same run."""
    dataset, options = ZOO[model]
    model = model.split("-")[0]
    run_dir = tmp_path / "compare"
    argv = ["compare", "--quick", "--model", model, "--dataset", dataset]
    argv += ["--bounds", "elbo,iwae", "--particles", "4", "--epochs", "1", "--snr-repeats", "2"]
    assert cli.main([*argv, *TINY, *options, "--run-dir", str(run_dir)]) == 0
    results = json.loads((run_dir / "results.json").read_text())["results"]
    result = diagnose.diagnose(run_dir)
    assert result.kind == "compare" and set(result.bounds) == {"elbo", "iwae"}
    for row in results:
        child = result.bounds[row["bound"]]
        assert child is not None
        assert child.active_units == (row["active_units"], row["latent_dims"])


def test_a_collapsed_dimension_is_never_relevant():
    scores = torch.tensor([5.0, 3.0, 1.0, 0.5])
    relevance = type("R", (), {"ranking": [0, 1, 2, 3], "scores": scores, "threshold": 0.9})()
    assert diagnose.relevant_in_use(relevance, collapsed=[0]) == [1, 2, 3]  # 3/4.5 + 1/4.5 < 0.9
    assert diagnose.relevant_in_use(relevance, collapsed=[]) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# Particles
# ---------------------------------------------------------------------------------------------


def test_engines_that_need_particles_get_a_default():
    assert parse_bound("elbo").default_particles() == 1
    assert parse_bound("iwae").default_particles() == 64
    assert parse_bound("miwae:4x8").default_particles() == 32
    engine = parse_bound("iwae").build(parse_bound("iwae").default_particles())
    assert engine.num_particles == 64
    with pytest.raises(ValueError, match="iwae needs --particles >= 2"):
        parse_bound("iwae").build(1)


def test_train_iwae_defaults_to_64_particles_and_refuses_one(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "--dataset", "linear-gaussian", "--engine", "iwae", "--epochs", "1"]
    assert cli.main([*argv, "--run-dir", str(run_dir), *TINY]) == 0
    assert runs.read_config(run_dir)[0].particles == 64
    refused = tmp_path / "refused"
    assert cli.main([*argv, "--particles", "1", "--run-dir", str(refused), *TINY]) == 2
    assert "iwae needs --particles >= 2" in error_line(capsys)
    assert not refused.exists()


def test_an_option_of_another_model_is_refused(tmp_path, capsys):
    argv = ["train", "--dataset", "digits", "--hvae-layers", "3", "--run-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "--hvae-layers is an option of --model hvae" in error_line(capsys)


def test_a_model_takes_only_its_kind_of_data(tmp_path, capsys):
    argv = ["train", "--dataset", "linear-gaussian", "--model", "cvae", "--run-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "takes images" in error_line(capsys)


# ---------------------------------------------------------------------------------------------
# One registration each
# ---------------------------------------------------------------------------------------------


class _Toy(pyro.nn.PyroModule):
    """A linear-Gaussian VAE whose decoder weight starts at ``scale``."""

    def __init__(self, x_dim, z_dim, scale):
        super().__init__("toy")
        self.z_dim = z_dim
        self.decoder = torch.nn.Linear(z_dim, x_dim)
        torch.nn.init.constant_(self.decoder.weight, scale)
        self.encoder = torch.nn.Linear(x_dim, 2 * z_dim)

    def model(self, x):
        pyro.module("toy.decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("toy.encoder", self.encoder)
        loc, log_scale = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


@pytest.fixture
def toys():
    def factory(ds, z_dim, hidden, net, likelihood, scale=0.5):
        return _Toy(ds.x_dim, z_dim, scale)

    model = registry.register_model(
        "toy",
        factory,
        "a toy linear-Gaussian VAE",
        accepts=("vectors",),
        options=(Option("scale", float, 0.5, "initial decoder weight"),),
    )

    def engine(particles, estimator="reparam", weight=1.0):
        return ELBO(num_particles=particles)

    parameter = registry.Parameter(
        "W",
        "a weight",
        lambda text: {"weight": float(text)},
        lambda name, particles, values, inner: {"weight": values.get("weight", 1.0)},
        lambda values: f"{values['weight']:g}",
    )
    registry.register_engine(
        "toyelbo",
        engine,
        "the ELBO under another name",
        describe=lambda spec, particles: f"TOY({spec.options['weight']:g})",
        parameter=parameter,
        estimators=("reparam",),
        min_particles=3,
        default_particles=3,
    )
    yield model
    MODELS.remove("toy")
    ENGINES.remove("toyelbo")


def test_one_registration_reaches_every_command(toys, tmp_path, capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "toy" in out and "--toy-scale" in out and "toyelbo" in out and "W (a weight)" in out
    assert parse_bound("toyelbo:0.5").label == "toyelbo:0.5"
    assert parse_bound("toyelbo").default_particles() == 3

    run_dir = tmp_path / "train"
    argv = ["train", "--model", "toy", "--toy-scale", "0.25", "--engine", "toyelbo:2"]
    argv += ["--dataset", "linear-gaussian", "--epochs", "1", "--run-dir", str(run_dir), *TINY]
    assert cli.main(argv) == 0
    config = runs.read_config(run_dir)[0]
    assert config.model_options == {"scale": 0.25} and config.particles == 3
    assert diagnose.diagnose(run_dir).active_units[1] == 4

    compare_dir = tmp_path / "compare"
    argv = ["compare", "--quick", "--model", "toy", "--dataset", "linear-gaussian"]
    argv += ["--bounds", "elbo,toyelbo:2", "--particles", "4", "--epochs", "1"]
    argv += ["--snr-repeats", "2", "--run-dir", str(compare_dir), *TINY]
    assert cli.main(argv) == 0
    results = json.loads((compare_dir / "results.json").read_text())["results"]
    assert [r["engine"] for r in results] == ["ELBO, 4 samples averaged", "TOY(2)"]
    assert diagnose.diagnose(compare_dir).bounds["toyelbo:2"] is not None


def test_multimodal_compare_reports_cross_coherence(tmp_path):
    """The multimodal family's own metric: cross coherence for each ordered pair of
    modalities, a fraction in [0, 1], next to the bounds."""
    run_dir = tmp_path / "compare"
    argv = ["compare", "--quick", "--model", "multimodal", "--dataset", "digits-labels"]
    argv += ["--bounds", "elbo", "--particles", "2", "--epochs", "1", "--snr-repeats", "2"]
    assert cli.main([*argv, *TINY, "--run-dir", str(run_dir)]) == 0
    (row,) = json.loads((run_dir / "results.json").read_text())["results"]
    for key in ("coherence_image_to_label", "coherence_label_to_image"):
        assert 0.0 <= row[key] <= 1.0


# ---------------------------------------------------------------------------------------------
# Cards, the generated index, and a parser that imports no torch
# ---------------------------------------------------------------------------------------------

_NO_TORCH = """
import sys
from pvae.app.arguments import main
code = main(sys.argv[1:])
heavy = sorted(name for name in ("torch", "pyro") if name in sys.modules)
print("EXIT", code, "IMPORTED", ",".join(heavy) or "none", file=sys.stderr)
"""


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--help"], 0),
        (["compare", "--help"], 0),
        (["train", "--help"], 0),
        (["sample", "--help"], 0),
        (["datasets"], 0),
        (["train", "--epochs", "x"], 2),
        (["train", "--dataset", "digits", "--engine", "kalman", "--run-dir", "r"], 2),
    ],
)
def test_help_and_argument_errors_import_neither_torch_nor_pyro(argv, code):
    result = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, *argv], capture_output=True, text=True, timeout=60
    )
    assert f"EXIT {code} IMPORTED none" in result.stderr, result.stderr


def test_the_index_of_the_cards_is_current():
    stale = index.stale()
    assert not stale, (
        f"pvae/app/_index.py is stale in {', '.join(stale)}: regenerate it with "
        "`python -m pvae.app.index`"
    )


def _help(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    return cli._subparsers(cli.build_parser())[command].format_help()


def test_option_defaults_are_the_constructors(monkeypatch):
    """The help shows the constructor's default, read from its signature (never copied)."""
    from pvae.models import GPVAE, KoopmanVAE, MarkovianGPVAE

    help_text = _help("train", monkeypatch)
    for owner, flag, name in (
        (GPVAE, "--gpvae-length-scale", "length_scale"),
        (MarkovianGPVAE, "--mgpvae-lengthscale", "lengthscale"),
        (KoopmanVAE, "--kvae-horizon", "horizon"),
    ):
        default = inspect.signature(owner).parameters[name].default
        entries = [" ".join(e.split("\n\n")[0].split()) for e in re.split(r"\n  (?=-)", help_text)]
        (entry,) = [e for e in entries if e.startswith(flag + " ")]
        assert entry.endswith(f"(default: {default})"), entry
    assert MODELS["gpvae"].resolve_options({})["learn_kernel"] == "no"  # GPVAE's False
    assert "learn l and s by the bound" in help_text  # the docstring's :param learn_kernel:


def test_option_help_lists_choices_and_bae_only_where_it_samples(monkeypatch):
    train, sample = _help("train", monkeypatch), _help("sample", monkeypatch)
    assert "--hvae-inference {ladder,bottom-up}" in train
    assert "--mgpvae-nu {0.5,1.5,2.5}" in train
    flat = " ".join(train.split())
    trained = re.search(r"--model NAME one of: (.*?) \(default: vae\)", flat).group(1)
    assert "bae" not in trained.split(", ") and "--bae-" not in train
    assert "--bae-prior-scale" in sample and "--hvae-layers" not in sample


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--dataset", "digits", "--engine", "kalman"],
        ["compare", "--bounds", "elbo,kalman", "--model", "hvae"],
    ],
)
def test_an_engine_the_model_cannot_take_is_refused_at_parse_time(argv, tmp_path, capsys):
    assert cli.main([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    err = error_line(capsys)
    assert "kalman engine applies to models" in err and "(svae, mgpvae)" in err
    assert not (tmp_path / "run").exists()


def test_datasets_fit_100_columns(capsys):
    assert cli.main(["datasets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 100
    assert all(line.strip() for line in lines)  # no blank line between rows


def test_install_hints_name_the_distribution():
    from pvae import data

    sources = " ".join(info.source for info in data.available())
    assert 'pip install "pyro-vae[data]"' in sources and "pvae[data]" not in sources


def test_one_estimator_list():
    from pvae.inference import importance

    assert registry.ESTIMATORS == importance.ESTIMATORS


def test_a_card_declares_what_it_can_do():
    assert {"impute", "forecast", "state-space"} <= set(MODELS["svae"].capabilities)
    assert MODELS["bae"].sampled and "state-space" not in MODELS["vae"].capabilities
    with pytest.raises(ValueError, match="capabilities must name"):
        registry.ModelCard(name="x", description="", factory=None, capabilities=("fly",))
    with pytest.raises(ValueError, match="'per-channel' goes with channels"):
        registry.ModelCard(name="x", description="", factory=None, channels={"z": -1})
    with pytest.raises(ValueError, match="documents no parameter"):
        registry.Option.of(lambda flag=1.0: None, "flag", registry.Real())


def test_the_cards_net_checks_refuse_a_net_the_model_cannot_build():
    """``pvae.nets.conv_image_shape`` and ``require_mlp`` (what the model cards call, also
    reachable under their former names in the registry): a conv net needs a (C, H, W)
    dataset, an MLP-only model refuses any other net, each naming what to use instead."""
    from types import SimpleNamespace

    from pvae import nets

    images = SimpleNamespace(name="digits", image_shape=(1, 8, 8))
    vectors = SimpleNamespace(name="linear-gaussian", image_shape=None)
    assert nets.conv_image_shape(images, "conv") == (1, 8, 8)
    assert nets.conv_image_shape(vectors, "mlp") is None
    with pytest.raises(ValueError, match="'linear-gaussian' has no .* use net 'mlp'"):
        nets.conv_image_shape(vectors, "conv")
    with pytest.raises(ValueError, match="model 'hvae' has MLP networks only: use --net mlp"):
        nets.require_mlp("hvae", "conv")
    nets.require_mlp("hvae", "mlp")
    assert registry.conv_image_shape is nets.conv_image_shape
