"""The documentation: the MkDocs site builds in strict mode, the generated methods reference covers
the registry, and the Python examples of the tutorials and of the Python API page run."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.api import CACHE_ENV

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# pages whose ```python blocks are executed (a block opened with "```python skip" is not)
EXECUTED_PAGES = sorted(DOCS.glob("tutorials/*.md")) + [DOCS / "python-api.md"]

needs_mkdocs = pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                                  reason="MkDocs is not installed: pip install -e '.[docs]'")


@needs_mkdocs
def test_docs_build_strict(tmp_path):
    """`mkdocs build --strict`: a broken link, anchor or nav entry, or a failing hook, fails."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    for page in ("index.html", "methods/index.html", "cache/index.html"):
        assert (tmp_path / "site" / page).is_file(), page


def test_methods_reference_covers_the_registry():
    """Every registered method has its section, with its parameters and its whole docstring."""
    import methods

    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    reference = hooks.methods_reference()
    for name, cls in methods.METHODS.items():
        section = reference.split(f"### {name} {{#{name}}}\n", 1)
        assert len(section) == 2, f"no section for {name}"
        body = section[1].split("\n### ", 1)[0]
        for param in cls.defaults():
            assert f"| `{param}` |" in body, (name, param)
        assert hooks.prose(cls.__doc__) in body, name


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """The fenced ```python blocks of a Markdown page, in order, as (line number, code); blocks whose
    info string says ``python skip`` are left out."""
    blocks, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)(.*)$", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, language, rest = opening.groups()
        start, body = i + 2, []  # the 1-based line of the block's first line
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{fence[0]}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1  # the closing fence
        words = [language.lower()] + rest.lower().split()
        if words[0] in ("python", "py", "{.python}") and "skip" not in words[1:]:
            blocks.append((start, "\n".join(body) + "\n"))
    return blocks


def test_python_blocks_parser(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\nx = 1\n```\n\n```python skip\nraise SystemExit\n```\n\n"
                    "```sh\nmake test\n```\n\n- item\n\n    ```python\n    y = x + 1\n    ```\n")
    assert python_blocks(page) == [(4, "x = 1\n"), (18, "y = x + 1\n")]


@pytest.mark.slow
@pytest.mark.parametrize("page", EXECUTED_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_docs_examples_run(page, tmp_path, monkeypatch, cache_copy):
    """Each page's ```python blocks run in order in one fresh namespace, in a temporary working
    folder, with the cache in tmp_path: a copy of the session's warm digits run (a reader's first
    run trains digits-net first, in seconds)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv(CACHE_ENV, str(cache_copy))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": "__main__"}
    for line, code in python_blocks(page):
        where = f"{page.relative_to(ROOT)}:{line}"
        try:  # padded so that tracebacks give the page's own line numbers
            exec(compile("\n" * (line - 1) + code, str(page.relative_to(ROOT)), "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"the example at {where} failed: {type(err).__name__}: {err}") from err


def test_the_method_tutorial_shows_the_shipped_example():
    """The tutorial's first block is examples/cosine_scores.py, which tests/test_plugins.py runs."""
    [(_, code), *_] = python_blocks(DOCS / "tutorials/write-a-method.md")
    assert code == (ROOT / "examples/cosine_scores.py").read_text()
