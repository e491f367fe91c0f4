"""Harvest the default corpus's raw texts; run as a script in a clean interpreter (`python -I -S this_file`).

A process that has imported other libraries sees a different stdlib: IPython swaps pdb's classes, torch wraps
inspect.getfile, pytest rewrites modules. A child with no site-packages and nothing else imported sees the same
stdlib on every run of the same Python, so the corpus (and every cache fingerprint built on it) is the same in a
notebook, a script and a test. Imports only the standard library; writes a JSON list of texts to stdout.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import warnings

# Pure-Python or platform-neutral stdlib modules present in every CPython >= 3.10 build. Modules whose contents
# depend on the platform or on optional libraries (os, subprocess, shutil, socket, ssl, hashlib, zlib, ...) are
# left out so that the corpus is the same on every machine running the same Python version.
_CORPUS_MODULES: tuple[str, ...] = tuple(sorted("""
    _pydecimal _pyio abc argparse ast asyncio.base_events asyncio.events asyncio.exceptions asyncio.futures
    asyncio.locks asyncio.protocols asyncio.queues asyncio.runners asyncio.streams asyncio.tasks asyncio.transports
    base64 bdb binascii bisect builtins cProfile calendar cmd code codecs codeop collections collections.abc colorsys
    compileall concurrent.futures.thread configparser contextlib contextvars copy copyreg csv dataclasses datetime
    difflib dis doctest email email.charset email.contentmanager email.encoders email.errors email.feedparser
    email.generator email.header email.headerregistry email.iterators email.message email.mime.base
    email.mime.multipart email.mime.text email.parser email.policy email.utils enum filecmp fileinput fnmatch
    fractions ftplib functools gc getopt gettext glob graphlib heapq hmac html html.parser http http.client
    http.cookiejar http.cookies http.server imaplib importlib importlib.abc importlib.machinery importlib.metadata
    importlib.resources importlib.util inspect io ipaddress itertools json json.decoder json.encoder keyword
    linecache logging logging.config logging.handlers mailbox math mimetypes modulefinder netrc numbers operator
    optparse pathlib pdb pickle pickletools pkgutil platform plistlib poplib pprint profile pstats py_compile pyclbr
    pydoc queue quopri random re reprlib runpy sched secrets shelve shlex smtplib stat statistics string stringprep
    struct symtable tabnanny tarfile textwrap threading timeit token tokenize trace traceback tracemalloc types
    typing unicodedata unittest unittest.case unittest.loader unittest.mock unittest.result unittest.runner
    unittest.suite urllib.error urllib.parse urllib.request urllib.response urllib.robotparser uuid warnings wave
    weakref wsgiref.handlers wsgiref.headers wsgiref.simple_server wsgiref.util wsgiref.validate xml.dom.minidom
    xml.dom.pulldom xml.etree.ElementTree xml.sax xml.sax.handler xml.sax.saxutils xml.sax.xmlreader xmlrpc.client
    xmlrpc.server zipapp zipfile zipimport zoneinfo
""".split()))
def _docstrings(modname: str) -> list[str]:
    """Docstrings of a module, its public functions and classes, and their public methods and properties."""
    mod = importlib.import_module(modname)
    found = [mod.__doc__]
    for name, obj in sorted(vars(mod).items()):
        # Only objects defined in this module: re-exports would repeat, and often depend on the platform.
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isroutine(obj):
            found.append(obj.__doc__)
        elif inspect.isclass(obj):
            found.append(obj.__doc__)
            for attr, member in sorted(vars(obj).items()):
                if attr.startswith("_") and attr != "__init__":
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                # Skip methods other libraries patch onto stdlib classes (transformers adds Logger.warning_once).
                owner = getattr(getattr(member, "fget", member), "__module__", None)
                if (inspect.isroutine(member) or isinstance(member, property)) and owner in (None, mod.__name__):
                    found.append(member.__doc__)
    return [inspect.cleandoc(d) for d in found if isinstance(d, str)]



def harvest() -> list[str]:
    """The language reference's help topics (sorted by key), then the docstrings of _CORPUS_MODULES."""
    from pydoc_data.topics import topics

    raw = [topics[k] for k in sorted(topics)]
    with warnings.catch_warnings():  # importing some modules warns about deprecations; irrelevant here
        warnings.simplefilter("ignore")
        for modname in _CORPUS_MODULES:
            try:
                raw.extend(_docstrings(modname))
            except Exception:  # noqa: BLE001 - a module missing from this build is skipped, as documented
                continue
    return raw


if __name__ == "__main__":
    sys.stdout.write(json.dumps(harvest()))
