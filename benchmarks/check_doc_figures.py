"""Fail when a Markdown document references an image file that does not exist.

    python benchmarks/check_doc_figures.py            # every docs/*.md
    python benchmarks/check_doc_figures.py FILE_OR_DIR ...

Inline images (``![alt](path)``), reference-style images (``![alt][ref]`` with
``[ref]: path``) and HTML ``<img src="...">`` tags are checked. Paths are
resolved against the directory of the Markdown file; URLs are skipped. Exit
status: 0 when every image exists, 1 when one is missing, 2 when there is no
Markdown file to check (a check that looks at nothing must not pass).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from urllib.parse import unquote

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DOCS = REPO_ROOT / "docs"

_INLINE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
_REFERENCE_USE = re.compile(r"!\[([^\]]*)\]\[([^\]]*)\]")
_REFERENCE_DEF = re.compile(r"^\s{0,3}\[([^\]]+)\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HTML_IMG = re.compile(r"<img\b[^>]*\bsrc\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
_FENCE = re.compile(r"^\s*(```|~~~)")


def _is_remote(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def image_references(text: str) -> list[tuple[int, str]]:
    """``(line number, target)`` of every image referenced outside code fences."""
    lines = text.splitlines()
    in_fence = False
    visible: list[tuple[int, str]] = []
    for number, line in enumerate(lines, start=1):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            visible.append((number, line))
    definitions: dict[str, str] = {}
    for _, line in visible:
        match = _REFERENCE_DEF.match(line)
        if match:
            definitions[match.group(1).strip().lower()] = match.group(2)
    references: list[tuple[int, str]] = []
    for number, line in visible:
        references += [(number, m.group(1)) for m in _INLINE.finditer(line)]
        references += [(number, m.group(1)) for m in _HTML_IMG.finditer(line)]
        for match in _REFERENCE_USE.finditer(line):
            label = (match.group(2) or match.group(1)).strip().lower()
            if label in definitions:
                references.append((number, definitions[label]))
            else:
                references.append((number, f"[undefined reference {label!r}]"))
    return references


def missing_images(markdown: Path) -> list[str]:
    """One message per image referenced from ``markdown`` that is not a file."""
    problems: list[str] = []
    for number, target in image_references(markdown.read_text(encoding="utf-8")):
        if target.startswith("[undefined reference"):
            problems.append(f"{markdown}:{number}: image with {target[1:-1]}")
            continue
        if _is_remote(target):
            continue
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not (markdown.parent / path).is_file():
            problems.append(f"{markdown}:{number}: missing image {target}")
    return problems


def markdown_files(arguments: list[str]) -> list[Path]:
    if not arguments:
        return sorted(DEFAULT_DOCS.glob("*.md"))
    files: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        files += sorted(path.glob("*.md")) if path.is_dir() else [path]
    return files


def main(argv: list[str] | None = None) -> int:
    files = markdown_files(sys.argv[1:] if argv is None else argv)
    absent = [f for f in files if not f.is_file()]
    if not files or absent:
        what = ", ".join(map(str, absent)) if absent else "no Markdown files found"
        print(f"check_doc_figures: nothing to check ({what})", file=sys.stderr)
        return 2
    problems = [problem for f in files for problem in missing_images(f)]
    for problem in problems:
        print(problem, file=sys.stderr)
    checked = sum(len(image_references(f.read_text(encoding="utf-8"))) for f in files)
    if problems:
        print(f"{len(problems)} of {checked} image reference(s) missing", file=sys.stderr)
        return 1
    print(f"{checked} image reference(s) in {len(files)} file(s), all present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
