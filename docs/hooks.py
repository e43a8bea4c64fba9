"""MkDocs hooks (``hooks:`` in mkdocs.yml): pages generated from the code when the site is built.

- ``index.md`` is the README, with its ``docs/`` links made relative to the site, so the front
  page exists once.
- ``methods.md``: the marker line ``<!-- methods-reference ... -->`` is replaced by the reference
  of every class in ``methods.METHODS`` (sorted by name): what it reads, its parameters with their
  defaults, its sweep grid and its docstring (formula and paper), after the module docstrings of
  the method families.

Docstrings are plain text with inline math; they are rendered as prose: ````code```` spans
become code, Markdown's special characters are escaped, and indented lines (display formulas)
keep their line breaks.
"""
from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MARKER = re.compile(r"^<!-- methods-reference\b.*-->$", re.MULTILINE)

# tests/ file that checks each family of methods against its reference (see the page's intro)
TESTS = {
    "methods.logit_scores": "tests/test_methods.py",
    "methods.gradient_scores": "tests/test_gradient_scores.py",
    "methods.distance_scores": "tests/test_distance_scores.py",
    "methods.shaping_scores": "tests/test_shaping_scores.py",
    "methods.network_scores": "tests/test_network_methods.py",
}


# --- the front page -------------------------------------------------------------------------

def readme_as_index(text: str) -> str:
    """The README with links into ``docs/`` made relative to the docs folder."""
    return re.sub(r"\]\((?:\./)?docs/", "](", text)


def on_files(files, config):
    from mkdocs.structure.files import File

    if files.get_file_from_path("index.md") is None:
        readme = Path(config["config_file_path"]).parent / "README.md"
        files.append(File.generated(config, "index.md", content=readme_as_index(readme.read_text())))
    return files


# --- the methods reference --------------------------------------------------------------------

_ESCAPE = re.compile(r"([\\`*_\[\]{}])")
_CODE = re.compile(r"(?::[a-z]+:)?``(.+?)``|(?::[a-z]+:)?`([^`]+)`")
_UNDERLINE = re.compile(r"^\s*([-=~^])\1{2,}\s*$")


def _escape(text: str) -> str:
    text = _ESCAPE.sub(r"\\\1", text)
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def inline(text: str) -> str:
    """One line of docstring text as Markdown: code spans kept, everything else escaped."""
    out, last = [], 0
    for match in _CODE.finditer(text):
        out.append(_escape(text[last:match.start()]))
        out.append(_code(match.group(1) or match.group(2)))
        last = match.end()
    out.append(_escape(text[last:]))
    line = "".join(out)
    # what would start a list or a heading at the start of a line
    start = re.match(r"\s*([-+#]|\d+\.)\s", line)
    if start:
        line = line[:start.end(1) - 1] + "\\" + line[start.end(1) - 1:]
    return line


def prose(doc: str | None) -> str:
    """A docstring as Markdown prose (no code blocks): paragraphs reflowed, indented lines (display
    formulas) kept line by line, reST section underlines turned into bold headings."""
    if not doc:
        return "*(no docstring)*"
    lines = inspect.cleandoc(doc).splitlines()
    blocks: list[str] = []
    paragraph: list[str] = []
    display: list[str] = []

    def flush():
        if paragraph:
            blocks.append(" ".join(inline(line.strip()) for line in paragraph))
            paragraph.clear()
        if display:
            blocks.append("  \n".join("> " + inline(line.strip()) for line in display))
            display.clear()

    for _i, line in enumerate(lines):
        if not line.strip():
            flush()
        elif _UNDERLINE.match(line) and (paragraph or display):
            heading = (paragraph or display).pop()
            flush()
            blocks.append(f"**{inline(heading.strip())}**")
        elif line.startswith((" ", "\t")):
            if paragraph:
                blocks.append(" ".join(inline(x.strip()) for x in paragraph))
                paragraph.clear()
            display.append(line)
        else:
            if display:
                flush()
            paragraph.append(line)
    flush()
    return "\n\n".join(blocks)


def _value(value) -> str:
    return _code(value if isinstance(value, str) else repr(value))


def method_section(name: str, cls) -> str:
    """The reference of one registered method."""
    module = cls.__module__
    lines = [f"### {name} {{#{name}}}", ""]
    facts = [f"**Reads:** {', '.join(_code(r) for r in cls.reads) or 'nothing'}",
             f"**Class:** {_code(module + '.' + cls.__qualname__)}"]
    test = TESTS.get(module)
    if test is None:
        candidate = f"tests/test_{module.rsplit('.', 1)[-1]}.py"
        test = candidate if (ROOT / candidate).exists() else None
    if test:
        facts.append(f"**Reference check:** {_code(test)}")
    lines += ["  \n".join(facts), ""]
    defaults, grid = cls.defaults(), dict(cls.grid)
    if defaults or grid:
        lines += ["| parameter | default | sweep grid |", "|---|---|---|"]
        for param in list(defaults) + [p for p in grid if p not in defaults]:
            default = _value(defaults[param]) if param in defaults else "-"
            values = ", ".join(_value(v) for v in grid[param]) if param in grid else "-"
            lines.append(f"| {_code(param)} | {default} | {values} |")
    else:
        lines.append("No parameters.")
    lines += ["", prose(cls.__doc__), ""]
    return "\n".join(lines)


def methods_reference() -> str:
    """The generated part of the methods page: families (module docstrings), then every method."""
    import methods
    from methods import base

    registry = methods.METHODS
    modules = sorted({cls.__module__ for cls in registry.values()})
    out = ["## The interface, from its docstring {#methods-base}", "",
           f"The module docstring of {_code(base.__name__)}:", "", prose(base.__doc__), "",
           f"The contract of every method, the docstring of {_code('methods.Method')}:", "",
           prose(base.Method.__doc__), "",
           "## Method families", "",
           "One module per family, with the math in small pure functions; their module docstrings:", ""]
    for module in modules:
        mod = sys.modules[module]
        names = sorted(n for n, c in registry.items() if c.__module__ == module)
        out += [f"### {module} {{#{module.replace('.', '-').replace('_', '-')}}}", "",
                "Methods: " + ", ".join(f"[{_code(n)}](#{n})" for n in names) + ".", "",
                prose(mod.__doc__), ""]
    out += ["## Every method, by name", "",
            "For each registered method: what it reads, its parameters with their defaults and sweep "
            "grid, and its docstring (the formula and the paper).", ""]
    out += [method_section(name, registry[name]) for name in sorted(registry)]
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != "methods.md":
        return markdown
    if not MARKER.search(markdown):
        raise ValueError("docs/methods.md lost its '<!-- methods-reference -->' marker line")
    reference = methods_reference()
    return MARKER.sub(lambda _: reference, markdown, count=1)
