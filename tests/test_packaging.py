"""The wheel holds every module: each folder with an ``__init__.py`` under ``pvae/``,
``models/`` and ``inference/`` is a package listed in pyproject.toml (``models/`` and
``inference/`` install as ``pvae.models`` and ``pvae.inference``, never top-level)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
    setuptools = _config()["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *parts)))
    listed = set(setuptools["packages"])
    assert found - listed == set(), f"packages missing from pyproject.toml: {found - listed}"
    assert listed - found == set(), f"listed packages without a folder: {listed - found}"


def test_distribution_name_is_not_the_poincare_vae_project():
    # "pvae" on the package index is another library (Poincare VAEs); the import name stays pvae
    assert _config()["project"]["name"] == "pyro-vae"
