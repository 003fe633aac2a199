"""
The code shown to users runs and shows what it says: the README's Python blocks, the
``.. testcode::`` blocks of the pages and docstrings (their ``>>>`` examples are pytest's doctests,
``--doctest-glob='*.rst'`` and ``--doctest-modules``), and the Sphinx site builds.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from golden_pendulum import golden_nash_backward

import torchjd_golden

from ._asserts import relative_error

ROOT = Path(__file__).resolve().parents[1]


def _readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)


def _directive_body(lines: list[str], start: int) -> tuple[str, int]:
    """The indented body of the directive whose header is ``lines[start]``, without options."""

    indent = len(lines[start]) - len(lines[start].lstrip())
    body = []
    index = start + 1
    while index < len(lines) and (
        not lines[index].strip() or len(lines[index]) - len(lines[index].lstrip()) > indent
    ):
        body.append(lines[index])
        index += 1
    text = textwrap.dedent("\n".join(body)).strip("\n").splitlines()
    while text and re.match(r":[\w-]+:", text[0]):  # the directive's options (:hide: ...)
        text.pop(0)
    return "\n".join(text).strip("\n") + "\n", index


def _testcode_blocks(text: str) -> list[tuple[str, str | None]]:
    """The ``.. testcode::`` blocks of ``text``, each with its ``.. testoutput::`` or None."""

    lines = text.splitlines()
    blocks: list[tuple[str, str | None]] = []
    for index, line in enumerate(lines):
        if line.strip() != ".. testcode::":
            continue
        code, after = _directive_body(lines, index)
        while after < len(lines) and not lines[after].strip():
            after += 1
        output = None
        if after < len(lines) and lines[after].strip() == ".. testoutput::":
            output, _ = _directive_body(lines, after)
        blocks.append((code, output))
    return blocks


def _documented_texts() -> Iterator[tuple[str, str]]:
    """
    Every text the documentation can show, by name: the ``.rst`` pages, and the docstrings of
    the package's modules, of what they define, and of the members of its classes.
    """

    for page in sorted((ROOT / "docs").rglob("*.rst")):
        yield str(page.relative_to(ROOT)), page.read_text()
    seen: set[int] = set()
    modules = pkgutil.walk_packages(torchjd_golden.__path__, "torchjd_golden.")
    names = ["torchjd_golden", *(info.name for info in modules if "__main__" not in info.name)]
    for module_name in names:
        module = importlib.import_module(module_name)
        yield module_name, module.__doc__ or ""
        for name, value in vars(module).items():
            if getattr(value, "__module__", None) != module_name or id(value) in seen:
                continue
            seen.add(id(value))
            yield f"{module_name}.{name}", value.__doc__ or ""
            if inspect.isclass(value):
                for member, attribute in vars(value).items():
                    doc = getattr(attribute, "__doc__", None)
                    if isinstance(doc, str) and doc is not getattr(
                        type(attribute), "__doc__", None
                    ):
                        yield f"{module_name}.{name}.{member}", doc


def _testcode_examples() -> list[tuple[str, list[tuple[str, str | None]]]]:
    """
    For each page or docstring with ``.. testcode::`` blocks: its name and the blocks, each with
    its expected output or None. The blocks of one text share a namespace, as in Sphinx's
    default doctest group. (The ``>>>`` examples are pytest's doctests: ``--doctest-glob`` for the
    pages, ``--doctest-modules`` for the docstrings.)
    """

    examples = []
    for name, text in _documented_texts():
        blocks = _testcode_blocks(inspect.cleandoc(text))
        if blocks:
            examples.append((name, blocks))
    return examples


def _printed_numbers(printed: str) -> list[float]:
    return [float(number) for number in re.findall(r"-?\d+\.\d*(?:e[-+]?\d+)?", printed)]


def _check_the_quick_start(code: str, namespace: dict[str, Any], printed: str) -> None:
    """
    The gradient the quick start writes and the alpha and balance it prints are those of
    golden-pendulum-mtl's ``golden_nash_backward`` on the same model and batch (rebuilt by
    running the block up to its backward pass from the same seed).
    """

    torch.manual_seed(0)
    again: dict[str, Any] = {}
    exec(compile(code[: code.index("backward(losses)")], "README.md", "exec"), again)
    losses = again["losses"]
    alpha = golden_nash_backward(
        {f"task_{k}": loss for k, loss in enumerate(losses)}, again["model"]
    )
    m = len(alpha)
    expected = [*alpha.values(), min(alpha.values()) / max(alpha.values())]
    # torch prints 4 decimals: half a unit of the last one, and float32's rounding.
    assert _printed_numbers(printed) == pytest.approx(expected, abs=5e-5 + 1e-6)
    tolerance = 8 * m * torch.finfo(torch.float32).eps
    for ours, theirs in zip(
        namespace["model"].parameters(), again["model"].parameters(), strict=True
    ):
        assert ours.grad is not None
        assert theirs.grad is not None
        assert relative_error(ours.grad, theirs.grad) <= tolerance


# What each README block computes is checked against a recomputation; a block is matched to its
# check by a line it holds, and a block without one fails.
README_CHECKS: dict[str, Callable[[str, dict[str, Any], str], None]] = {
    "aggregator = GoldenPendulum()": _check_the_quick_start,
}


@pytest.mark.parametrize("code", _readme_blocks())
def test_readme_python_blocks_compute_what_they_print(
    code: str, capsys: pytest.CaptureFixture[str]
) -> None:
    checks = [check for line, check in README_CHECKS.items() if line in code]
    assert len(checks) == 1, "each README block needs one check in README_CHECKS"
    torch.manual_seed(0)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    checks[0](code, namespace, capsys.readouterr().out)


# Pages whose code runs a trainer, whose own notices (Lightning's hints, Transformers'
# deprecations, pin_memory without an accelerator) are not about this package.
_TRAINER_PAGES = ("docs/guides/lightning.rst", "docs/guides/huggingface.rst")


@pytest.mark.parametrize(("name", "blocks"), _testcode_examples())
def test_testcode_blocks_run_and_print_their_output(
    name: str,
    blocks: list[tuple[str, str | None]],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # what the code writes (logs, checkpoints) goes to a scratch folder
    namespace: dict[str, object] = {}
    checker = doctest.OutputChecker()
    with warnings.catch_warnings():
        if name in _TRAINER_PAGES:
            for category in (UserWarning, DeprecationWarning, FutureWarning):
                warnings.simplefilter("ignore", category)
        for code, expected in blocks:
            capsys.readouterr()
            exec(compile(code, f"<docstring of {name}>", "exec"), namespace)
            if expected is not None:
                printed = capsys.readouterr().out
                assert checker.check_output(expected, printed, doctest.ELLIPSIS), printed


def test_there_are_examples_to_run() -> None:
    assert _readme_blocks()
    assert _testcode_examples()


def test_no_example_is_left_to_a_sphinx_doctest_build() -> None:
    """
    The runners here know plain ``.. testcode::`` and ``.. testoutput::`` blocks and ``>>>``
    lines (also in ``.. doctest::`` blocks); setup blocks or named groups would go unrun.
    """

    directive = re.compile(r"^\s*\.\. (test\w+|doctest)::(.*)$", flags=re.MULTILINE)
    for name, text in _documented_texts():
        for kind, argument in directive.findall(text):
            assert kind in ("testcode", "testoutput", "doctest"), (name, kind)
            assert not argument.strip(), (name, kind, argument)


def test_the_sphinx_site_builds_without_warnings(tmp_path: Path) -> None:
    """
    The documentation builds with warnings as errors. Its examples run once each, not in a
    Sphinx doctest build: the pages' and the docstrings' ``>>>`` lines as pytest's doctests,
    their ``.. testcode::`` blocks in :func:`test_testcode_blocks_run_and_print_their_output`.
    """

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            str(ROOT / "docs"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _assert_renders_offline(tmp_path)


def _assert_renders_offline(site: Path) -> None:
    """The maths comes from the site's own MathJax, no page loads a CDN, the footer names us."""

    pages = {path: path.read_text() for path in site.rglob("*.html")}
    for path, page in pages.items():
        assert not re.search(r"<script[^>]*src=\"https?://", page), path
        assert "cdn.jsdelivr.net" not in page, path
    maths = pages[site / "api" / "golden_pendulum.html"]
    assert '<script defer="defer" src="../_static/mathjax/tex-chtml.js">' in maths
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert (site / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()
    assert "Copyright &#169; torchjd-golden developers" in pages[site / "index.html"]
