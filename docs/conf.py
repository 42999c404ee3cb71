"""Sphinx configuration for the pvae documentation.

Nothing here needs the network, and nothing is executed but the import of pvae itself: the
API pages, the CLI pages and the tutorial copies are generated into ``_generated/`` (not in
git) at the start of every build, so that a new module in ``models/`` or ``inference/`` (or any
package listed in pyproject.toml) gets its page without an edit here.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import shutil
import tomllib
from pathlib import Path

import pvae  # installed editable by `make setup`: pvae.models and pvae.inference map there

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
GENERATED = DOCS / "_generated"

project = "pvae"
author = "the pvae authors"
copyright = "the pvae authors"
release = pvae.__version__
version = pvae.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# The notebooks are rendered as committed (executed); the build never runs them.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
# Each object is documented once, in the module that defines it (a module's ``__all__`` may
# re-export names from its siblings; those pages link to the defining one instead).
autodoc_default_options = {"show-inheritance": True, "ignore-module-all": True}

html_theme = "furo"
html_title = f"pvae {release}"

# Warnings are errors in CI (``sphinx-build -W``). Type hints naming third-party classes are
# not cross-referenced (no intersphinx: the build is offline), which is not a warning.
nitpicky = False


# --- generated pages -------------------------------------------------------------------------


def _packages() -> list[str]:
    """The packages pyproject.toml installs (tests/test_packaging.py keeps that list complete)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(config["tool"]["setuptools"]["packages"])


def _modules(package: str) -> list[str]:
    """The public modules of ``package`` (files not starting with an underscore), sorted."""
    module = importlib.import_module(package)
    return sorted(
        f"{package}.{info.name}"
        for info in pkgutil.iter_modules(module.__path__)
        if not info.name.startswith("_") and not info.ispkg
    )


def _title(text: str, underline: str = "=") -> str:
    return f"{text}\n{underline * len(text)}\n"


def _write(path: Path, text: str) -> None:
    """Write only when the text changed, so incremental builds stay incremental."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _generate_api() -> None:
    api = GENERATED / "api"
    packages = _packages()
    for package in packages:
        children = [p for p in packages if p.rpartition(".")[0] == package]
        modules = _modules(package)
        entries = [f"{child}" for child in children] + modules
        lines = [
            _title(f"``{package}``"),
            f".. automodule:: {package}\n",
            ".. toctree::\n   :maxdepth: 1\n",
            *[f"   {entry}" for entry in entries],
            "",
        ]
        _write(api / f"{package}.rst", "\n".join(lines))
        for module in modules:
            text = _title(f"``{module}``") + (
                f"\n.. automodule:: {module}\n   :members:\n   :undoc-members:\n"
            )
            _write(api / f"{module}.rst", text)
    top = [p for p in packages if "." not in p or p.rpartition(".")[0] not in packages]
    _write(
        api / "index.rst",
        _title("API reference")
        + "\nOne page per module, generated from the docstrings; each engine's and each model's\n"
        "module docstring states its math.\n\n"
        + ".. toctree::\n   :maxdepth: 2\n\n"
        + "".join(f"   {p}\n" for p in top),
    )


def _generate_cli() -> None:
    import argparse

    from pvae.app.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse reads the width from here; keep the pages stable
    parser = build_parser()
    (subparsers,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cli = GENERATED / "cli"
    names = list(subparsers.choices)
    for name, subparser in subparsers.choices.items():
        help_text = subparser.format_help().rstrip()
        body = "\n".join(f"   {line}" if line else "" for line in help_text.splitlines())
        _write(
            cli / f"{name}.rst",
            _title(f"``{parser.prog} {name}``")
            + f"\n``{parser.prog} {name} --help``, generated from the command's parser:\n\n"
            + f".. code-block:: text\n\n{body}\n",
        )
    top_help = "\n".join(
        f"   {line}" if line else "" for line in parser.format_help().rstrip().splitlines()
    )
    _write(
        cli / "index.rst",
        _title("Command line")
        + "\nOne page per command, generated from the real parser at build time.\n\n"
        + f".. code-block:: text\n\n{top_help}\n\n"
        + ".. toctree::\n   :maxdepth: 1\n\n"
        + "".join(f"   {n}\n" for n in names),
    )


def _copy_tutorials() -> None:
    target = GENERATED / "tutorials"
    target.mkdir(parents=True, exist_ok=True)
    notebooks = sorted((ROOT / "tutorials").glob("*.ipynb"))
    for stale in target.glob("*.ipynb"):
        if not (ROOT / "tutorials" / stale.name).exists():
            stale.unlink()
    for notebook in notebooks:
        copy = target / notebook.name
        if not copy.exists() or copy.read_bytes() != notebook.read_bytes():
            shutil.copyfile(notebook, copy)
    _write(
        target / "index.rst",
        _title("Tutorials")
        + "\nThe executed notebooks of ``tutorials/``, rendered as committed (not re-run).\n\n"
        + ".. toctree::\n   :maxdepth: 1\n\n"
        + "".join(f"   {n.stem}\n" for n in notebooks),
    )


def _copy_readme_images() -> None:
    """The README's figures (``benchmarks/*.png``), where the guide pages that include README
    sections look for them (``guide/benchmarks/``; git-ignored)."""
    target = DOCS / "guide" / "benchmarks"
    target.mkdir(parents=True, exist_ok=True)
    for image in sorted((ROOT / "benchmarks").glob("*.png")):
        copy = target / image.name
        if not copy.exists() or copy.read_bytes() != image.read_bytes():
            shutil.copyfile(image, copy)


# --- one docstring style -----------------------------------------------------------------------

# The house style is reST field lists (``:param x:``, ``:returns:``, ``:raises ValueError:``).
# A Google- or NumPy-style section header in a docstring is reported, and -W makes it an error.
_FOREIGN_SECTION = re.compile(
    r"^\s*(Args|Arguments|Parameters|Returns|Return|Yields|Raises|Attributes|Keyword Args):\s*$"
)


def _check_docstring_style(app, what, name, obj, options, lines) -> None:  # noqa: ANN001
    from sphinx.util import logging

    module = obj.__name__ if what == "module" else getattr(obj, "__module__", None) or ""
    own = getattr(obj, "__doc__", None) is not None  # not inherited from a base class
    if not (module.startswith("pvae") and name.startswith(module) and own):
        return
    for line in lines:
        match = _FOREIGN_SECTION.match(line)
        if match:
            logging.getLogger("pvae.docs").warning(
                "%s: Google-style %r section; write reST fields (:param x:, :returns:, "
                ":raises E:) as the rest of pvae does",
                name,
                match.group(1),
                type="pvae",
                subtype="docstring",
            )
            return


# pvae groups parameters that share a description (``:param model, guide: ...``, also ``:ivar``);
# Sphinx would read ``model,`` as a type. Join the names without a space: one field, all names.
_GROUPED_PARAM = re.compile(r"^(\s*:(?:param|ivar) )([A-Za-z_][\w]*(?:, [A-Za-z_]\w*)+):")


def _join_grouped_params(app, what, name, obj, options, lines) -> None:  # noqa: ANN001
    for i, line in enumerate(lines):
        match = _GROUPED_PARAM.match(line)
        if match:
            names = match.group(2).replace(", ", ",\u200b")  # a zero-width space: not whitespace
            lines[i] = match.group(1) + names + ":" + line[match.end() :]


def setup(app) -> None:  # noqa: ANN001
    app.connect("autodoc-process-docstring", _check_docstring_style)
    app.connect("autodoc-process-docstring", _join_grouped_params)


_generate_api()
_generate_cli()
_copy_tutorials()
_copy_readme_images()
