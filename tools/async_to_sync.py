"""Write the sync twin of each asyncio module (psycopg's way: one source, two APIs).

    python tools/async_to_sync.py            # regenerate every twin
    python tools/async_to_sync.py --check    # exit 1 if a twin is out of date (CI)

The transform is mechanical, on tokens, so comments and layout survive:

* ``async def`` / ``async with`` / ``async for`` lose ``async``; ``await`` goes;
* ``asyncio.to_thread(f, *args)`` becomes ``f(*args)`` (blocking is fine in a thread);
* names in ``NAMES`` (and ``DOTTED``: ``asyncio.Lock``) are renamed, in code and, as
  whole words, in strings and comments (``AsyncCluster`` -> ``Cluster``), except in
  the module docstring, which names the source;
* ``if True:  # ASYNC`` blocks keep only their ``else:`` branch (dedented), for
  the few places where the two APIs differ by more than a keyword;
* a line ending in ``# async-to-sync: keep`` is copied unchanged (marker dropped).

Then ruff sorts the imports and formats the result, and a header says where the
file came from.
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tokenize
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "replica_router"
# source (asyncio) -> generated (sync)
MODULES = {
    PACKAGE / "cluster_async.py": PACKAGE / "cluster.py",
    PACKAGE / "connection_async.py": PACKAGE / "connection.py",
}
# Names of the async module the sync one re-exports (``from replica_router.cluster
# import AsyncCluster`` keeps working), added after the ``__future__`` import.
REEXPORTS = {
    "cluster.py": ["AsyncCluster"],
    "connection.py": ["AsyncRoutedConnection"],
}
NAMES = {
    "AbstractAsyncContextManager": "AbstractContextManager",
    "AsyncBeginningCursor": "BeginningCursor",
    "AsyncCluster": "Cluster",
    "AsyncConnection": "Connection",
    "AsyncConnectionSource": "ConnectionSource",
    "AsyncCopy": "Copy",
    "AsyncCursor": "Cursor",
    "AsyncIterator": "Iterator",
    "AsyncRoutedConnection": "RoutedConnection",
    "AsyncRoutedCursor": "RoutedCursor",
    "AsyncRoutedPipeline": "RoutedPipeline",
    "AsyncPipeline": "Pipeline",
    "AsyncRoutedTransaction": "RoutedTransaction",
    "AsyncSourceFactory": "SourceFactory",
    "_AsyncBlock": "_Block",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "__aiter__": "__iter__",
    "__anext__": "__next__",
    "acommit_and_capture": "commit_and_capture",
    "aset_autocommit_owing": "set_autocommit_owing",
    "alearn_functions": "learn_functions",
    "asynccontextmanager": "contextmanager",
    "async_pool_sources": "pool_sources",
    "cluster_async": "cluster",
    "connection_async": "connection",
}
DOTTED = {"asyncio.Lock": "threading.Lock"}
KEEP = "# async-to-sync: keep"
_WORDS = re.compile(r"\b(" + "|".join(map(re.escape, NAMES)) + r")\b")
_TEXT_KEYWORDS = re.compile(r"\basync (with|for|def)\b")
_ASYNC_BLOCK = re.compile(r"^(\s*)if True:\s*# ASYNC\s*$")
_TEXT_TOKENS = {tokenize.STRING, tokenize.COMMENT} | (
    {tokenize.FSTRING_MIDDLE} if hasattr(tokenize, "FSTRING_MIDDLE") else set()
)


def keep_sync_branches(lines: list[str]) -> list[str]:
    """Replace each ``if True:  # ASYNC`` block by its ``else:`` branch, dedented."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _ASYNC_BLOCK.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent = len(match.group(1))
        i = _block_end(lines, i + 1, indent)
        if i < len(lines) and re.match(rf"^ {{{indent}}}else:\s*(#.*)?$", lines[i]):
            end = _block_end(lines, i + 1, indent)
            out.extend(line[4:] if line.strip() else line for line in lines[i + 1 : end])
            i = end
    return out


def _block_end(lines: list[str], i: int, indent: int) -> int:
    """The first line from ``i`` on that is not blank and not indented past ``indent``."""
    while i < len(lines):
        line = lines[i]
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        i += 1
    return i


def _rename_words(text: str) -> str:
    return _WORDS.sub(lambda m: NAMES[m.group(1)], _TEXT_KEYWORDS.sub(r"\1", text))


def transform_tokens(source: str) -> str:
    """Drop ``async``/``await``, unwrap ``asyncio.to_thread``, rename (see module doc)."""
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(pos: tuple[int, int]) -> int:
        return starts[pos[0] - 1] + pos[1]

    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement), non-overlapping
    # The module docstring says which file is the source: it is copied as it is.
    docstring = next(i for i, t in enumerate(tokens) if t.type == tokenize.STRING)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.start[0] <= len(lines) and KEEP in lines[tok.start[0] - 1]:
            i += 1
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if _is_async_keyword(tok, nxt):
            edits.append((offset(tok.start), offset(nxt.start), ""))  # type: ignore[union-attr]
        elif tok.type == tokenize.NAME and tok.string == "asyncio" and _is_to_thread(tokens, i):
            i = _unwrap_to_thread(tokens, i, offset, edits)
            continue
        elif tok.type == tokenize.NAME and _dotted(tokens, i) in DOTTED:
            end = tokens[i + 2].end
            edits.append((offset(tok.start), offset(end), DOTTED[_dotted(tokens, i)]))
            i += 3
            continue
        elif tok.type == tokenize.NAME and tok.string in NAMES:
            edits.append((offset(tok.start), offset(tok.end), NAMES[tok.string]))
        elif tok.type in _TEXT_TOKENS and i > docstring:
            renamed = _rename_words(tok.string)
            if renamed != tok.string:
                edits.append((offset(tok.start), offset(tok.end), renamed))
        i += 1
    out = source
    for start, end, text in sorted(edits, reverse=True):
        out = out[:start] + text + out[end:]
    return out.replace("  " + KEEP, "").replace(KEEP, "")


def _is_async_keyword(tok: tokenize.TokenInfo, nxt: tokenize.TokenInfo | None) -> bool:
    """``await``, or the ``async`` of ``async def/with/for``: dropped with its space."""
    if tok.type != tokenize.NAME or nxt is None:
        return False
    return tok.string == "await" or (tok.string == "async" and nxt.string in ("def", "with", "for"))


def _dotted(tokens: list[tokenize.TokenInfo], i: int) -> str:
    if i + 2 < len(tokens) and tokens[i + 1].string == ".":
        return f"{tokens[i].string}.{tokens[i + 2].string}"
    return ""


def _is_to_thread(tokens: list[tokenize.TokenInfo], i: int) -> bool:
    return [t.string for t in tokens[i + 1 : i + 4]] == [".", "to_thread", "("]


def _unwrap_to_thread(
    tokens: list[tokenize.TokenInfo],
    i: int,
    offset: Callable[[tuple[int, int]], int],
    edits: list[tuple[int, int, str]],
) -> int:
    """``asyncio.to_thread(f, a, b)`` -> ``f(a, b)``; returns the index after the call."""
    open_paren = tokens[i + 3]
    edits.append((offset(tokens[i].start), offset(open_paren.end), ""))
    depth, j = 1, i + 4
    first_comma = None
    while depth:
        tok = tokens[j]
        if tok.string in "([{" and tok.type == tokenize.OP:
            depth += 1
        elif tok.string in ")]}" and tok.type == tokenize.OP:
            depth -= 1
        elif tok.string == "," and depth == 1 and first_comma is None:
            first_comma = j
        j += 1
    close = tokens[j - 1]
    if first_comma is None:  # no arguments: f()
        edits.append((offset(close.start), offset(close.end), "()"))
    else:
        comma = tokens[first_comma]
        edits.append((offset(comma.start), offset(tokens[first_comma + 1].start), "("))
    # Names inside the call still need renaming: hand them back to the main loop.
    return i + 4


def generate(source_path: Path, target_path: Path) -> str:
    """The sync twin of ``source_path``, formatted, with its header."""
    source = source_path.read_text()
    text = transform_tokens("".join(keep_sync_branches(source.splitlines(keepends=True))))
    names = REEXPORTS.get(target_path.name)
    if names:
        future = "from __future__ import annotations\n"
        aliases = ", ".join(f"{n} as {n}" for n in names)  # the explicit re-export form
        imports = f"from .{source_path.stem} import {aliases}  # noqa: PLC0414\n"
        text = text.replace(future, future + imports, 1)
    rel = source_path.relative_to(ROOT / "src").as_posix()
    header = (
        f"# Generated from {rel} by tools/async_to_sync.py; do not edit.\n"
        "# Edit the async source and run: python tools/async_to_sync.py\n"
    )
    name = str(target_path)
    ruff = [sys.executable, "-m", "ruff"]
    config = ["--config", str(ROOT / "pyproject.toml")]
    fixed = _run([*ruff, "check", *config, "--fix-only", "--select", "I,F401",
                  "--stdin-filename", name, "-"], header + text)  # fmt: skip
    return _run([*ruff, "format", *config, "--stdin-filename", name, "-"], fixed)


def _run(command: list[str], stdin: str) -> str:
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)
    if result.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{result.stderr}")
    return result.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a twin is out of date")
    args = parser.parse_args(argv)
    stale = []
    for source, target in MODULES.items():
        text = generate(source, target)
        current = target.read_text() if target.exists() else None
        if text == current:
            continue
        if args.check:
            stale.append(target.relative_to(ROOT).as_posix())
        else:
            target.write_text(text)
            print(f"wrote {target.relative_to(ROOT)}")
    if stale:
        print(f"out of date (run python tools/async_to_sync.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
