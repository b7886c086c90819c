"""Every fenced ```python block in README.md and docs/*.md runs, so the docs cannot drift
from the code.

A page's blocks run in order, sharing one namespace, in a temporary directory, in a process
of their own (``tests/support/docs_runner.py``): the OpenAI clients are the real ones,
pointed at the loopback server; Anthropic's classes are fake models; the names a snippet
takes as the reader's own (``prompt``, ``parser``, ``messages``, ...) are defined first, per
page, in ``PRELUDES`` below. A block is left out only when the line just before it is
``<!-- docs-test: skip (reason) -->``, the reason saying what it needs that a test here
cannot give (a real provider key, a Redis server at a fixed address, ...).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.openai_server import OpenAICompatServer

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

OPEN_FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*$")
SKIP_MARKER = re.compile(r"^<!-- docs-test: skip \((?P<reason>.*\S.*)\) -->$")

_LANGCHAIN_NAMES = """
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

prompt = ChatPromptTemplate.from_template("{question}")
parser = StrOutputParser()
"""

PRELUDES: dict[str, str] = {
    "README.md": _LANGCHAIN_NAMES
    + """
def call_primary():
    return "an answer from the primary"


def call_backup():
    return "an answer from the backup"


async def call_primary_async():
    return "an answer from the primary"


async def call_backup_async():
    return "an answer from the backup"
""",
    "docs/budget-and-cache.md": """
import openai

prompt = "What does a circuit breaker do?"
client_stream = openai.OpenAI().chat.completions.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": prompt}],
    stream=True,
    stream_options={"include_usage": True},
)
""",
    "docs/how-it-works.md": """
from callpolicy import Budget, CallPolicy

policy = CallPolicy()
budget = Budget(max_calls=1000)
""",
    "docs/langchain.md": _LANGCHAIN_NAMES,
    "docs/llamaindex.md": """
from llama_index.core.llms import ChatMessage

messages = [ChatMessage(role="user", content="hello")]
""",
    "docs/recipes.md": _LANGCHAIN_NAMES,
}


@dataclass(frozen=True)
class Block:
    page: str
    fence_line: int
    """The line of the opening fence (1-based)."""
    code: str
    skip: str | None
    """The reason given by a skip marker on the line before the fence, else None."""

    @property
    def label(self) -> str:
        return f"{self.page}:{self.fence_line}"


def python_blocks(text: str, page: str) -> list[Block]:
    """The ```python blocks of a Markdown text, dedented by their fence's indent (a block
    inside a list item is indented)."""
    lines = text.splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        opened = OPEN_FENCE.match(lines[index])
        if opened is None:
            index += 1
            continue
        indent = opened["indent"]
        close = index + 1
        while close < len(lines) and lines[close].rstrip() != indent + "```":
            close += 1
        if close == len(lines):
            raise ValueError(f"{page}:{index + 1}: a ```python block is never closed")
        before = lines[index - 1].strip() if index else ""
        marker = SKIP_MARKER.match(before)
        code = textwrap.dedent("\n".join(lines[index + 1 : close])) + "\n"
        blocks.append(Block(page, index + 1, code, marker["reason"] if marker else None))
        index = close + 1
    return blocks


def _page_name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _blocks(path: Path) -> list[Block]:
    return python_blocks(path.read_text(encoding="utf-8"), _page_name(path))


RUNNABLE_PAGES = [path for path in PAGES if any(b.skip is None for b in _blocks(path))]


def test_the_parser_finds_blocks_indented_blocks_and_skip_markers() -> None:
    text = textwrap.dedent(
        """\
        # A page

        ```python
        a = 1
        ```

        <!-- docs-test: skip (needs a real provider key) -->
        ```python
        raise RuntimeError
        ```

        - a list item:

          ```python
          if a:
              b = a + 1
          ```

        ```bash
        echo not python
        ```
        """
    )
    blocks = python_blocks(text, "page.md")
    assert [(b.fence_line, b.code, b.skip) for b in blocks] == [
        (3, "a = 1\n", None),
        (8, "raise RuntimeError\n", "needs a real provider key"),
        (14, "if a:\n    b = a + 1\n", None),
    ]
    with pytest.raises(ValueError, match=r"page\.md:1: a ```python block is never closed"):
        python_blocks("```python\nx = 1\n", "page.md")


@pytest.mark.parametrize("path", PAGES, ids=_page_name)
def test_every_skip_marker_is_well_formed_and_stands_just_before_a_python_block(
    path: Path,
) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if "docs-test" not in line:
            continue
        where = f"{_page_name(path)}:{number}"
        assert SKIP_MARKER.match(line.strip()), (
            f"{where}: write the marker exactly as <!-- docs-test: skip (reason) -->"
        )
        following = lines[number] if number < len(lines) else ""
        assert OPEN_FENCE.match(following), f"{where}: the marker must be just before ```python"


def test_every_page_with_a_python_block_has_a_prelude_entry_or_needs_none() -> None:
    # A prelude names what a page's snippets take as the reader's own; a stale entry (a
    # page renamed) would silently stop defining them.
    assert set(PRELUDES) <= {_page_name(path) for path in PAGES}


def _run_page(blocks: list[Block], prelude: str, cwd: Path, base_url: str) -> str:
    job = {
        "prelude": prelude,
        "blocks": [
            {"page": b.page, "line": b.fence_line + 1, "code": b.code}
            for b in blocks
            if b.skip is None
        ],
    }
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OPENAI_API_KEY": "sk-docs-test-not-a-key",
        "OPENAI_BASE_URL": base_url,
        "OPENAI_API_BASE": base_url,  # llama-index-llms-openai reads this one
        "NO_PROXY": "127.0.0.1,localhost",
        "LANGSMITH_TRACING": "false",
        "LANGCHAIN_TRACING_V2": "false",
        "MPLBACKEND": "Agg",
    }
    env.pop("ANTHROPIC_API_KEY", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.docs_runner"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,  # generous: the README page runs every demo, slow on a loaded machine
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize("path", RUNNABLE_PAGES, ids=_page_name)
def test_the_pages_python_blocks_run(
    path: Path, tmp_path: Path, openai_server: OpenAICompatServer
) -> None:
    blocks = _blocks(path)
    out = _run_page(blocks, PRELUDES.get(_page_name(path), ""), tmp_path, openai_server.base_url)
    ran = [line.removeprefix("ran ") for line in out.splitlines() if line.startswith("ran ")]
    assert ran == [f"{b.page}:{b.fence_line + 1}" for b in blocks if b.skip is None]


def test_a_failing_block_fails_the_run_naming_its_page_and_line(
    tmp_path: Path, openai_server: OpenAICompatServer
) -> None:
    page = "# p\n\n```python\nx = 1\n```\n\n```python\ny = x\nraise ValueError(y)\n```\n"
    with pytest.raises(AssertionError) as failed:
        _run_page(python_blocks(page, "p.md"), "", tmp_path, openai_server.base_url)
    report = str(failed.value)
    assert "ran p.md:4" in report
    assert "FAILED p.md:8" in report
    assert 'File "p.md", line 9' in report
    assert "ValueError: 1" in report


# -- links and file names -------------------------------------------------------------

LINK = re.compile(r"\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")
NAMED_FILE = re.compile(r"`(?P<path>(?:docs|examples|tests|benchmarks|scripts)/[\w./-]+)`")


@pytest.mark.parametrize("path", PAGES, ids=_page_name)
def test_every_relative_link_and_named_file_exists(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for found in LINK.finditer(text):
        target = found["target"]
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        file = (path.parent / target.split("#", 1)[0]).resolve()
        assert file.exists(), f"{_page_name(path)}: the link to {target} leads nowhere"
    for found in NAMED_FILE.finditer(text):
        named = found["path"].rstrip(".,;:")
        assert (ROOT / named).exists(), f"{_page_name(path)} names {named}, which is not there"


def test_the_readmes_relative_links_name_their_file_in_the_text() -> None:
    # The README is the package's page on the index, where a relative link leads nowhere:
    # the sentence must stand without the link, so its text names the file.
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    relative = [
        found
        for found in LINK.finditer(text)
        if not found["target"].startswith(("http://", "https://", "#"))
    ]
    assert relative, "the README links to the docs"
    for found in relative:
        target = found["target"].split("#", 1)[0]
        assert target in found["text"], f"[{found['text']}]({found['target']})"


# -- the option tables of docs/how-it-works.md ----------------------------------------


def _option_tables() -> dict[str, list[tuple[str, str]]]:
    """Each ``### `Name` ...`` section's table rows: (option cell, default cell)."""
    tables: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in (ROOT / "docs" / "how-it-works.md").read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^### `(?P<name>[\w.]+)`", line)
        if heading:
            current = heading["name"]
            tables[current] = []
        elif line.startswith("## "):
            current = None
        elif current and line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            tables[current].append((cells[0], cells[1]))
    return tables


_NO_DEFAULT = object()


def _defaults(name: str) -> dict[str, object]:
    import inspect

    from callpolicy import BreakerConfig, Budget, CallPolicy, ResponseCache, RetryPolicy
    from callpolicy.otel import instrument
    from callpolicy.redis import RedisStore

    models = {"BreakerConfig": BreakerConfig, "RetryPolicy": RetryPolicy}
    if name in models:
        return {field: info.default for field, info in models[name].model_fields.items()}
    callables: dict[str, list[object]] = {
        "CallPolicy": [CallPolicy],
        "Budget": [Budget],
        "ResponseCache": [ResponseCache],
        "RedisStore": [RedisStore, RedisStore.from_url],
        "callpolicy.otel.instrument": [instrument],
    }
    found: dict[str, object] = {}
    for target in callables[name]:
        for parameter in inspect.signature(target).parameters.values():  # type: ignore[arg-type]
            empty = parameter.default is inspect.Parameter.empty
            found[parameter.name] = _NO_DEFAULT if empty else parameter.default
    return found


def _documented(cell: str) -> object:
    """A default cell's value when it is plain (a number, seconds, none/off, a bool, a
    quoted string, one day), else ``_NO_DEFAULT`` (prose: not compared)."""
    cell = cell.strip()
    if cell in {"none", "off"}:
        return None
    if cell in {"true", "false"}:
        return cell == "true"
    if cell == "one day":
        return 86_400.0
    if re.fullmatch(r'`"[^"`]*"`', cell):
        return cell[2:-2]
    number = re.fullmatch(r"(?P<value>\d+(?:\.\d+)?)(?: s)?", cell)
    if number:
        return float(number["value"])
    return _NO_DEFAULT


def test_the_option_tables_name_real_options_with_their_real_defaults() -> None:
    tables = _option_tables()
    assert {"BreakerConfig", "RetryPolicy", "CallPolicy", "Budget", "ResponseCache"} <= set(tables)
    compared = 0
    for name, rows in tables.items():
        defaults = _defaults(name)
        for option_cell, default_cell in rows:
            options = re.findall(r"`(\w+)`", option_cell.split("(", 1)[0])
            values = [v.strip() for v in default_cell.split(",")]
            for index, option in enumerate(options):
                assert option in defaults, f"how-it-works.md: {name} has no option {option}"
                documented = _documented(values[index] if len(values) == len(options) else "")
                if documented is _NO_DEFAULT:
                    continue
                actual = defaults[option]
                if documented is None and actual in ((), frozenset()):
                    actual = None  # "none" listeners: an empty tuple
                assert actual == documented, (
                    f"how-it-works.md: {name}.{option} defaults to {defaults[option]!r}, "
                    f"the table says {default_cell}"
                )
                compared += 1
    assert compared >= 30, f"only {compared} defaults compared: has the table format changed?"


def test_a_snippet_that_tries_a_host_other_than_the_loopback_one_fails_its_page(
    tmp_path: Path, openai_server: OpenAICompatServer
) -> None:
    # As a client not pointed at the loopback server would, then swallowing the error (a
    # fallback answering in its place): the page still fails.
    page = (
        "```python\nimport socket\ntry:\n"
        '    socket.getaddrinfo("api.openai.com", 443)\n'
        "except OSError:\n    pass\n```\n"
    )
    with pytest.raises(AssertionError) as failed:
        _run_page(python_blocks(page, "p.md"), "", tmp_path, openai_server.base_url)
    assert "FAILED network: the snippets tried to reach ['api.openai.com']" in str(failed.value)
