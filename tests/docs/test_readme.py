"""The README and the documentation's guide pages run as tests.

Every fenced code block of ``README.md`` and of ``docs/**/*.md`` / ``docs/**/*.rst`` (MyST
``{include}`` and ``{eval-rst}`` directives are not code; ``.. code-block::`` directives in
reStructuredText are) is collected:

- a ``python`` block runs as written, on its own (a fresh namespace), in an empty temporary
  folder: a block that needs names from elsewhere fails, so every block is complete;
- a ``bash``/``sh``/``shell``/``console`` block, and an untagged block whose first word is
  ``pvae`` or ``make``, runs command by command in an empty temporary folder (``pvae ...``
  in-process through :func:`pvae.app.cli.main`), each exiting 0. A command runs as written
  unless :data:`SMALL_BUDGET` maps it to a small-budget form (documented flags only: ``--quick``,
  ``--epochs 1``, ``--max-train``, ...) or :data:`SKIP` names why it cannot run here.

Slow: the blocks train real models on real (small) data.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md"] + sorted(
    path
    for suffix in ("*.md", "*.rst")
    for path in (ROOT / "docs").rglob(suffix)
    if not {"_build", "_generated"} & set(path.relative_to(ROOT / "docs").parts)
)
PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell", "console"}
COMMANDS = {"pvae", "make"}  # an untagged block starting with one of these is shell

# Small-budget flags of `pvae compare` (all in `pvae compare --help`): --quick (500 training
# and 100 valid/test points, small networks), then one epoch, few particles, samples and
# gradient repeats, no per-epoch yardstick, one thread.
_COMPARE_SMALL = (
    "--quick --epochs 1 --particles 4 --ll-samples 10 --snr-repeats 2 --yardstick none "
    "--threads 1 --quiet"
)

SMALL_BUDGET: dict[str, str] = {
    # `make compare` runs `pvae compare $(ARGS)` once .venv is set up (which CI's own `make`
    # does): the command behind it, at the small budget.
    "make compare": f"pvae compare {_COMPARE_SMALL}",
    "pvae compare": f"pvae compare {_COMPARE_SMALL}",
    "pvae compare --quick --dataset digits": f"pvae compare --dataset digits {_COMPARE_SMALL}",
    "pvae train --model vae --dataset digits --engine elbo --epochs 20 --run-dir runs/digits": (
        "pvae train --model vae --dataset digits --engine elbo --epochs 1 --run-dir runs/digits "
        "--max-train 100 --max-eval 50 --ll-samples 10 --quiet"
    ),
    "pvae sample --model bae --dataset mnist5k --max-train 500 --run-dir runs/bae": (
        "pvae sample --model bae --dataset mnist5k --max-train 500 --run-dir runs/bae "
        "--num-samples 5 --warmup 5 --chains 1 --quiet"
    ),
}

SKIP: dict[str, str] = {
    "make test": "the test suite itself (CI runs it through .ci/run)",
    "pvae compare --dataset mnist --data-path DIR --binarize dynamic --bounds elbo,iwae "
    "--particles 50 --epochs 3280 --hidden 200,200 --z-dim 50 --batch-size 20 --lr 1e-3 "
    "--ll-samples 5000 --seeds 0,1,2 --yardstick iwae:64 --device cuda "
    "--run-dir runs/iwae-paper-k50": "needs the user's MNIST IDX files (DIR) and a GPU",
}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*(\S*)")
_RST_CODE = re.compile(r"^(\s*)\.\. (?:code-block|code|sourcecode)::\s*(\S*)\s*$")


def _rst_blocks(path: Path, lines: list[str], offset: int) -> list[Block]:
    """``.. code-block:: LANGUAGE`` directives with their indented bodies."""
    blocks = []
    for i, line in enumerate(lines):
        match = _RST_CODE.match(line)
        if not match:
            continue
        indent, body = len(match.group(1)), []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        while body and body[0].strip().startswith(":"):  # directive options
            body.pop(0)
        text = textwrap.dedent("\n".join(body)).strip("\n") + "\n"
        blocks.append(Block(path, offset + i + 1, match.group(2).lower(), text))
    return blocks


def blocks_of(path: Path) -> list[Block]:
    """The code blocks of one page (Markdown fences; reStructuredText code directives, also
    inside MyST ``{eval-rst}`` fences)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".rst":
        return _rst_blocks(path, lines, 0)
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, info, start = match.group(2), match.group(3).lower(), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        if info == "{eval-rst}":
            blocks += _rst_blocks(path, body, start + 1)
        elif not info.startswith("{"):  # other MyST directives ({include}, {toctree}) are not code
            blocks.append(Block(path, start + 1, info, "\n".join(body) + "\n"))
    return blocks


def _is_shell(block: Block) -> bool:
    if block.language in SHELL:
        return True
    words = block.text.split()
    return block.language == "" and bool(words) and words[0] in COMMANDS


def commands_of(block: Block) -> list[str]:
    """The block's commands: continuation lines joined, comments and ``$`` prompts dropped,
    whitespace normalised."""
    joined = re.sub(r"\\\n\s*", " ", block.text)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if block.language == "console":
            if not line.startswith("$"):
                continue  # output
            line = line[1:].strip()
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words))
    return commands


ALL_BLOCKS = [block for page in PAGES for block in blocks_of(page)]
PYTHON_BLOCKS = [block for block in ALL_BLOCKS if block.language in PYTHON]
SHELL_BLOCKS = [block for block in ALL_BLOCKS if _is_shell(block)]


@pytest.fixture(autouse=True)
def _in_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_blocks_are_found_and_every_mapping_is_used():
    assert PYTHON_BLOCKS and SHELL_BLOCKS
    written = {command for block in SHELL_BLOCKS for command in commands_of(block)}
    assert set(SMALL_BUDGET) <= written, sorted(set(SMALL_BUDGET) - written)
    assert set(SKIP) <= written, sorted(set(SKIP) - written)
    # an untagged command block counts as shell; other untagged blocks (trees) are not code
    assert any(block.language == "" for block in SHELL_BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[block.id for block in PYTHON_BLOCKS])
def test_python_block_runs_as_written(block):
    code = compile(block.text, block.id, "exec")
    exec(code, {"__name__": "__readme__"})


def _run(command: str) -> int:
    from pvae.app import cli

    words = shlex.split(command)
    assert words[0] == "pvae", f"no way to run {command!r} here: map it in SMALL_BUDGET or SKIP"
    return cli.main(words[1:])


@pytest.mark.slow
@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[block.id for block in SHELL_BLOCKS])
def test_shell_block_runs(block, capsys):
    ran = 0
    for command in commands_of(block):
        if command in SKIP:
            continue
        status = _run(SMALL_BUDGET.get(command, command))
        assert status == 0, (command, capsys.readouterr().err[-2000:])
        ran += 1
    if not ran:
        pytest.skip(f"every command is in SKIP: {commands_of(block)}")
