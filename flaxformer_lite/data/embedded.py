"""An offline text corpus every Python installation carries: the standard library's docstrings.

The default dataset of the experiment scripts, so a fresh machine trains a real language model
without network or data files. The text is English prose about Python (module, class and function
documentation), gathered in a fixed order; it varies slightly between Python versions.
"""

from __future__ import annotations

import importlib
import inspect

# Documentation-rich, always-present standard modules, in a fixed order.
MODULES = (
    "builtins", "os", "sys", "re", "json", "collections", "itertools", "functools", "math",
    "random", "string", "textwrap", "pathlib", "subprocess", "threading", "asyncio", "unittest",
    "argparse", "logging", "datetime", "decimal", "fractions", "statistics", "typing",
    "dataclasses", "enum", "io", "socket", "email.message", "http.client", "urllib.request",
    "csv", "sqlite3", "zipfile", "tarfile", "shutil", "tempfile", "heapq", "bisect", "array",
    "struct", "codecs", "contextlib", "abc", "copy", "pickle", "inspect", "ast", "tokenize",
    "difflib", "doctest", "pdb", "timeit", "calendar", "hashlib", "hmac", "secrets", "base64",
    "html", "configparser", "glob", "fnmatch", "operator", "queue", "sched", "selectors",
    "signal", "traceback", "warnings", "weakref", "locale", "gettext", "platform", "uuid",
)


def _docs(obj, depth: int = 0):
    doc = inspect.getdoc(obj) if depth else getattr(obj, "__doc__", None)
    if isinstance(doc, str) and doc.strip():
        yield inspect.cleandoc(doc)
    if depth >= 2 or not hasattr(obj, "__dict__"):
        return
    for name in sorted(vars(obj)):
        if name.startswith("_"):
            continue
        member = vars(obj)[name]
        owner = getattr(member, "__module__", None)
        if inspect.ismodule(obj) and owner not in (None, obj.__name__):
            continue  # re-exported from elsewhere
        if inspect.isclass(member) or inspect.isroutine(member):
            yield from _docs(member, depth + 1)


def python_docs_corpus(ascii_only: bool = True) -> str:
    """Concatenated docstrings of `MODULES` (about 1 MB), paragraphs separated by blank lines."""
    parts = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a stripped-down Python may lack one; the rest still make a corpus
            continue
        parts.extend(_docs(module))
    text = "\n\n".join(parts) + "\n"
    if ascii_only:
        text = text.encode("ascii", "ignore").decode("ascii")
    return text
