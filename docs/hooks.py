"""MkDocs hooks: links from the site to files of the repository.

The pages link to repository files outside ``docs/`` (benchmark scripts, results, tests) with
relative paths such as ``../benchmarks/mask_quality.py``, which work where the Markdown is read
in the repository. On the site those paths would 404, so this hook points them at the
repository host (``repo_url`` in ``mkdocs.yml``): ``<repo_url>/blob/main/<path>`` for a file,
``<repo_url>/tree/main/<path>`` for a folder, including folders inside ``docs/``. A link to a
path that does not exist in the repository is logged as a warning, which fails
``mkdocs build --strict``. ``REPO_URL`` in a page is replaced by the address itself.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import Any

LOG = logging.getLogger("mkdocs.hooks.repository_links")
BRANCH = "main"

# An inline link or image target: ](target) or ](target "title"), not inside code.
_LINK = re.compile(r"\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _repository_url(target: str, page_dir: str, root: Path, docs: Path, base: str) -> str | None:
    """The host address of a relative link to a repository file, or None to leave it."""
    path, _, anchor = target.partition("#")
    if not path or _SCHEME.match(path) or path.startswith("/"):
        return None
    relative = posixpath.normpath(posixpath.join(page_dir, path))
    resolved = (docs / relative).resolve()
    inside_docs = resolved == docs or docs in resolved.parents
    if inside_docs and not resolved.is_dir():
        return None  # a page or an asset of the site: MkDocs checks those itself
    if root not in resolved.parents and resolved != root:
        raise ValueError(f"{target} points outside the repository")
    if not resolved.exists():
        raise FileNotFoundError(f"{target} does not exist in the repository")
    kind = "tree" if resolved.is_dir() else "blob"
    url = f"{base}/{kind}/{BRANCH}/{resolved.relative_to(root).as_posix()}"
    return f"{url}#{anchor}" if anchor else url


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    base = str(config["repo_url"]).rstrip("/")
    docs = Path(config["docs_dir"]).resolve()
    root = Path(config["config_file_path"]).resolve().parent
    page_dir = posixpath.dirname(page.file.src_uri)
    lines, in_fence = [], False
    for line in markdown.replace("REPO_URL", base).split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            line = _rewrite_line(line, page, page_dir, root, docs, base)
        lines.append(line)
    return "\n".join(lines)


def _rewrite_line(line: str, page: Any, page_dir: str, root: Path, docs: Path, base: str) -> str:
    # Inline code spans are left alone: split on backticks and rewrite the even parts.
    parts = line.split("`")
    for index in range(0, len(parts), 2):

        def replace(match: re.Match[str]) -> str:
            try:
                url = _repository_url(match.group("target"), page_dir, root, docs, base)
            except (ValueError, FileNotFoundError) as error:
                LOG.warning("Doc file '%s': %s", page.file.src_uri, error)
                return match.group(0)
            if url is None:
                return match.group(0)
            return f"]({url}{match.group('title') or ''})"

        parts[index] = _LINK.sub(replace, parts[index])
    return "`".join(parts)
