"""The documentation as a reader meets it: every fenced Python block in the README and on the
site runs as written, and the API reference renders without raw markup.

The code blocks are collected with Sybil. On a page that builds one example (``CONTINUED``),
each block runs in the namespace the blocks above it left, as a reader following the page
would have it; on every other page each block starts from an empty namespace, so a block that
leans on an earlier one fails. A block preceded by ``<!-- launch: torchrun ARGS -->`` runs as
a script under ``python -m torch.distributed.run --standalone ARGS`` (two gloo processes on
CPU), the way its page says to run it.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sybil import Document, Example, Region
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.markdown import ClearNamespaceParser, CodeBlockParser, SkipParser
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer

import dropgrad

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"

# Pages whose blocks continue one another; on the others every block stands alone.
CONTINUED = {"README.md", "docs/index.md", "docs/usage.md"}
# Every page with code: README.md and every page of the site.
PAGES = ["README.md"] + sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))

LAUNCH_TIMEOUT_S = 300


# ---------------------------------------------------------------- collecting the blocks


class LaunchParser:
    """``<!-- launch: torchrun ARGS -->``: the next Python block runs under torchrun."""

    def __init__(self) -> None:
        self.lexer = DirectiveInHTMLCommentLexer(directive="launch")

    def __call__(self, document: Document) -> Iterator[Region]:
        for region in self.lexer(document):
            region.parsed = str(region.lexemes["arguments"]).strip()
            region.evaluator = self.evaluate
            yield region

    @staticmethod
    def evaluate(example: Example) -> None:
        example.namespace["__launch__"] = example.parsed


class BlockEvaluator:
    """Run a block in its page's namespace, or as a script under the launcher it names."""

    def __init__(self) -> None:
        self.python = PythonEvaluator()

    def __call__(self, example: Example) -> None:
        launch = example.namespace.pop("__launch__", None)
        if launch is None:
            self.python(example)
        else:
            run_under_launcher(str(example.parsed), launch, example)


BLOCK_EVALUATOR = BlockEvaluator()


def parse(page: str) -> Document:
    return Document.parse(
        str(REPO_ROOT / page),
        CodeBlockParser(language="python", evaluator=BLOCK_EVALUATOR),
        LaunchParser(),
        SkipParser(),
        ClearNamespaceParser(),
    )


def is_code(example: Example) -> bool:
    return example.region.evaluator is BLOCK_EVALUATOR


def code_blocks(page: str) -> list[Example]:
    return [example for example in parse(page) if is_code(example)]


def block_ids() -> list[tuple[str, int]]:
    return [(page, block.line) for page in PAGES for block in code_blocks(page)]


def run_under_launcher(source: str, launch: str, example: Example) -> None:
    command = shlex.split(launch)
    assert command[0] == "torchrun", f"{example.path}:{example.line}: unknown launcher {launch!r}"
    script = Path.cwd() / f"block_{example.line}.py"
    script.write_text(source)
    env = dict(os.environ)
    # The processes import the dropgrad under test, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", *command[1:]]
    for attempt in range(2):
        result = subprocess.run(
            [*launcher, str(script)],
            capture_output=True,
            text=True,
            env=env,
            timeout=LAUNCH_TIMEOUT_S,
        )
        # A rank killed by a signal as gloo tears down ("terminate called without an
        # active exception", exit code -6) on a loaded machine is torch's, not the
        # block's: run it once more. A block that fails (an exception, an assertion)
        # exits with a positive code and is not retried.
        if result.returncode == 0 or "exitcode: -" not in result.stderr or attempt:
            break
    assert result.returncode == 0, (
        f"{example.path}:{example.line} under {launch!r} exited {result.returncode}\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )


# ---------------------------------------------------------------- running the blocks


class PageRun:
    """One page's blocks, run in order in one namespace, each at most once."""

    def __init__(self, page: str) -> None:
        self.page = page
        self.document = parse(page)
        self.examples = list(self.document)
        self.done = 0
        self.failed: str | None = None

    def run_through(self, line: int) -> None:
        if self.failed is not None:
            pytest.fail(f"an earlier block of {self.page} failed: {self.failed}")
        for example in self.examples[self.done :]:
            if example.line > line:
                break
            self.done += 1
            if is_code(example) and self.page not in CONTINUED:
                launch = self.document.namespace.get("__launch__")
                self.document.namespace.clear()
                if launch is not None:
                    self.document.namespace["__launch__"] = launch
            self.document.namespace.setdefault("__name__", "__main__")
            try:
                example.evaluate()
            except BaseException:
                # Only a page that builds one example depends on its earlier blocks.
                if self.page in CONTINUED:
                    self.failed = f"line {example.line}"
                raise


_RUNS: dict[str, PageRun] = {}


@pytest.mark.parametrize(("page", "line"), block_ids(), ids=[f"{p}:{n}" for p, n in block_ids()])
def test_code_block_runs(
    page: str, line: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Files a block writes (checkpoints, trainer output) go to a fresh folder.
    monkeypatch.chdir(tmp_path)
    if page not in _RUNS:
        torch.manual_seed(0)
        _RUNS[page] = PageRun(page)
    _RUNS[page].run_through(line)


def test_every_page_with_python_is_collected() -> None:
    for page in PAGES:
        text = (REPO_ROOT / page).read_text(encoding="utf-8")
        fences = re.findall(r"^```python\s*$", text, flags=re.MULTILINE)
        assert len(fences) == len(code_blocks(page)), page
    assert len(code_blocks("docs/integrations.md")) >= 10
    assert len(code_blocks("README.md")) >= 5


def test_distributed_blocks_run_under_a_launcher() -> None:
    # A block that starts a process group must say how it is launched; a launch directive
    # must sit right before a Python block.
    for page in PAGES:
        document = parse(page)
        examples = list(document)
        for index, example in enumerate(examples):
            if example.region.evaluator is LaunchParser.evaluate:
                following = examples[index + 1] if index + 1 < len(examples) else None
                assert following is not None and is_code(following), f"{page}:{example.line}"
                assert str(example.parsed).startswith("torchrun --nproc-per-node=2")
            elif is_code(example) and "init_process_group" in str(example.parsed):
                previous = examples[index - 1] if index else None
                assert previous is not None, f"{page}:{example.line}"
                assert previous.region.evaluator is LaunchParser.evaluate, f"{page}:{example.line}"


def test_skipped_blocks_give_a_reason() -> None:
    for page in PAGES:
        text = (REPO_ROOT / page).read_text(encoding="utf-8")
        for directive in re.findall(r"<!--\s*skip:([^>]*)-->", text):
            assert re.search(r'"[^"]{10,}"', directive), f"{page}: skip without a reason"


def test_code_lines_fit_the_page_column() -> None:
    # The site's code column shows about 78 characters, the repository host's README view
    # about 90; wider lines scroll sideways and hide their ends, comments included.
    for page in PAGES:
        width = 88 if page == "README.md" else 76
        for block in code_blocks(page):
            for number, text in enumerate(str(block.parsed).splitlines(), start=block.line + 1):
                assert len(text) <= width, f"{page}:{number} is {len(text)} characters wide"


def test_no_sketches() -> None:
    # Every block is complete code: no elided parts.
    for page in PAGES:
        for block in code_blocks(page):
            tree = ast.parse(str(block.parsed))
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and node.value is Ellipsis:
                    pytest.fail(f"{page}:{block.line} contains a literal ...")


# ---------------------------------------------------------------- the README as a front page


def test_readme_is_a_front_page() -> None:
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200
    assert lines.index("## Quick start") < 40
    quick_start = lines[lines.index("## Quick start") :]
    commands = quick_start[quick_start.index("```bash") + 1 : quick_start.index("```", 1)]
    assert len(commands) == 2 and all(c.startswith("pip install torch==") for c in commands)
    for heading in ("## Does it help?", "## Documentation"):
        assert heading in lines


def test_moved_sections_are_pages_of_the_site() -> None:
    import yaml

    config = yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text())
    nav = {page for entry in config["nav"] for page in entry.values()}
    assert {p.name for p in DOCS.glob("*.md")} == nav
    for page, heading in [
        ("semantics.md", "## What a step does"),
        ("semantics.md", "## Randomness"),
        ("semantics.md", "## Checkpoints"),
        ("semantics.md", "## Where the mask goes"),
        ("performance.md", "## Step overhead on CPU"),
        ("development.md", "## Tests"),
        ("development.md", "## Mask kernels and backends"),
        ("installation.md", "## Tested versions"),
    ]:
        assert heading in (DOCS / page).read_text(encoding="utf-8"), (page, heading)
    installation = (DOCS / "installation.md").read_text(encoding="utf-8")
    assert "pip install dropgrad` installs a different package" in installation
    assert config["repo_url"].startswith("https://") and config["repo_name"]


# ---------------------------------------------------------------- the API reference

# Sphinx roles and reST directives, which mkdocstrings shows as raw text.
RAW_MARKUP = re.compile(r":(?:func|class|meth|attr|math|mod|data|exc|obj):`|^\s*\.\. \w+::", re.M)


def public_docstrings() -> Iterator[tuple[str, str]]:
    for name in dropgrad.__all__:
        obj: Any = getattr(dropgrad, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        yield name, inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            for member_name, member in vars(obj).items():
                if member_name.startswith("_") and member_name != "__init__":
                    continue
                target = member.fget if isinstance(member, property) else member
                doc = getattr(target, "__doc__", None)
                if callable(target) and doc:
                    yield f"{name}.{member_name}", inspect.cleandoc(doc)


def test_public_docstrings_have_no_sphinx_markup() -> None:
    checked = dict(public_docstrings())
    assert {"DropGrad", "DropGrad.step", "drop_grad", "CosineAnnealingDropRateScheduler"} <= set(
        checked
    )
    raw = {name: RAW_MARKUP.findall(doc) for name, doc in checked.items()}
    assert {name: found for name, found in raw.items() if found} == {}


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs toolchain is in requirements.txt")
    site = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return site


def test_api_page_renders_cleanly(built_site: Path) -> None:
    html = (built_site / "api" / "index.html").read_text(encoding="utf-8")
    text = re.sub(r"<[^>]+>", "", html)
    assert not RAW_MARKUP.search(text)
    # Private base classes are not shown as bases.
    for bases in re.findall(r'class="doc doc-class-bases">(.*?)</p>', html, flags=re.S):
        assert not re.search(r">\s*_\w", bases), re.sub(r"<[^>]+>", "", bases)
    assert "_TwoEndScheduler" not in text
    names = [name for name in dropgrad.__all__ if name != "__version__"]
    starts = sorted((html.index(f'id="dropgrad.{name}"'), name) for name in names)
    ends = [start for start, _ in starts[1:]] + [len(html)]
    for (start, name), end in zip(starts, ends):
        section = re.sub(r"<[^>]+>", "", html[start:end])
        obj = getattr(dropgrad, name)
        if inspect.isclass(obj) and inspect.signature(obj).parameters:
            # The constructor's signature, a Parameters table, attribute types.
            assert re.search(rf"{name}\(\s*\w", section), name
            assert "Parameters:" in section, name
    signature = re.sub(r"<[^>]+>", "", html[html.index('id="dropgrad.DropGrad"') :])
    assert re.search(r"DropGrad\(\s*optimizer[^)]*\*,", signature)
    # A Returns description that wraps stays one row of its table.
    cells = re.findall(r"<td[^>]*>(.*?)</td>", html, flags=re.S)
    assert any("connected to" in cell and "autograd graph" in cell for cell in cells)


def test_site_links_to_repository_files_point_at_the_host(built_site: Path) -> None:
    import yaml

    repo_url = yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text())["repo_url"].rstrip("/")
    for page in built_site.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        for target in re.findall(r'href="([^"]+)"', html):
            assert "../benchmarks" not in target and "../tests" not in target, (page, target)
    analysis = (built_site / "analysis" / "index.html").read_text(encoding="utf-8")
    assert f'href="{repo_url}/blob/main/benchmarks/' in analysis


def test_api_attributes_show_their_types(built_site: Path) -> None:
    html = (built_site / "api" / "index.html").read_text(encoding="utf-8")
    tables = re.findall(r"Attributes:</span></p>\s*<table>(.*?)</table>", html, flags=re.S)
    assert tables
    for table in tables:
        for row in re.findall(r"<tr class=\"doc-section-item\">(.*?)</tr>", table, flags=re.S):
            name, kind = (
                re.sub(r"<[^>]+>", "", cell).strip()
                for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)[:2]
            )
            assert kind, f"attribute {name} has no type in the API reference"
