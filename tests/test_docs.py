"""The docs run: every ```` ```python ```` block of README.md and docs/*.md is executed.

How to write a doc so that it passes (the convention every doc follows):

- Each ```` ```python ```` block runs. The blocks of one file run in order, in one
  namespace shared by that file only: a later block may use what an earlier one
  defined. Each file is one test, named after it:
  ``pytest tests/test_docs.py -k observability``.
- A block that needs servers starts them itself, as a user would:
  ``lc = LocalCluster(replicas=2).open()`` in an early block (later blocks of the
  file reuse it; one sandbox per file keeps the run fast) or
  ``with LocalCluster(replicas=2) as lc: ...``. Whatever ``Cluster``,
  ``LocalCluster``, metrics or dashboard server is still open in the namespace
  after the file's last block (or a failure) is closed by the runner, so a doc
  need not end in clean-up code. An ``AsyncCluster`` is used inside
  ``asyncio.run(...)`` with ``async with``.
- A block that cannot run on its own -- it needs a Django project, a running web
  server, placeholder DSNs, or is an excerpt -- is fenced ```` ```python fragment ````:
  shown, not run. Prefer runnable. Any other word after ``python`` is an error, so
  a typo cannot silently turn a block off.
- Each file runs in a temporary working directory; environment variables a doc
  sets are restored afterwards.
- A failure's traceback names the doc and the line in it.
"""

from __future__ import annotations

import os
import re
import textwrap
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from replica_router import Cluster
from replica_router.dashboard import DashboardServer
from replica_router.metrics import MetricsServer
from replica_router.sandbox import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_FRAGMENT = "fragment"


@dataclass(frozen=True)
class Block:
    """One ```` ```python ```` block: its code and the doc line it starts on."""

    code: str
    line: int  # 1-based line of the block's first code line in the doc
    fragment: bool


def python_blocks(text: str, where: str) -> list[Block]:
    """The doc's Python blocks in order; ``ValueError`` for an unknown fence word."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, words = opening["fence"], opening["info"].split()
        start = i + 1
        i = start
        while i < len(lines):
            closing = _FENCE.match(lines[i])
            if closing and closing["fence"].startswith(fence) and not closing["info"].strip():
                break
            i += 1
        i += 1
        if not words or words[0] != "python":
            continue
        if words[1:] not in ([], [_FRAGMENT]):
            raise ValueError(
                f"{where}:{start}: unknown fence ```{' '.join(words)}: "
                f"expected ```python or ```python {_FRAGMENT}"
            )
        code = textwrap.dedent("\n".join(lines[start : i - 1]))
        blocks.append(Block(code, start + 1, fragment=bool(words[1:])))
    return blocks


def run_doc(path: Path, name: str) -> dict[str, Any]:
    """Run ``path``'s blocks in one namespace; close what they left open."""
    namespace: dict[str, Any] = {"__name__": f"doc:{name}"}
    try:
        for block in python_blocks(path.read_text(), name):
            if not block.fragment:
                # Padded so that a traceback's line numbers are the doc's own.
                code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
                exec(code, namespace)
    finally:
        _close_leftovers(namespace)
    return namespace


def _close_leftovers(namespace: dict[str, Any]) -> None:
    """Servers and clusters first, then the sandboxes they were connected to."""
    values = list(namespace.values())
    for kinds in ((Cluster, MetricsServer, DashboardServer), (LocalCluster,)):
        for value in reversed(values):
            if isinstance(value, kinds):
                value.close()


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_doc_runs(path: Path, isolated: None) -> None:
    run_doc(path, str(path.relative_to(ROOT)))


# -- the runner itself --------------------------------------------------------------

SAMPLE = """\
# A doc

```python
x = 1
```

Some prose, and an excerpt:

```python fragment
app.add_middleware(...)
```

````markdown
```python
not = a block of this doc
```
````

  ```python
  y = x + 1
  ```
"""


def test_blocks_are_found_in_order_with_their_lines_and_fragments() -> None:
    blocks = python_blocks(SAMPLE, "sample.md")
    assert [(b.code, b.line, b.fragment) for b in blocks] == [
        ("x = 1", 4, False),
        ("app.add_middleware(...)", 10, True),
        ("y = x + 1", 20, False),
    ]


def test_a_misspelt_fence_word_is_an_error_not_a_skipped_block() -> None:
    with pytest.raises(ValueError, match=r"sample\.md:1: unknown fence ```python fragement"):
        python_blocks("```python fragement\nx = 1\n```\n", "sample.md")


def test_blocks_share_one_namespace_and_a_failure_names_the_doc_line(tmp_path: Path) -> None:
    doc = tmp_path / "guide.md"
    doc.write_text(SAMPLE + "\n```python\nassert y == 2\nraise RuntimeError('boom')\n```\n")
    with pytest.raises(RuntimeError, match="boom") as info:
        run_doc(doc, "guide.md")
    frame = traceback.extract_tb(info.value.__traceback__)[-1]
    assert (frame.filename, frame.lineno, frame.line) == (
        str(doc),
        25,
        "raise RuntimeError('boom')",
    )


def test_what_a_doc_left_open_is_closed(tmp_path: Path) -> None:
    doc = tmp_path / "guide.md"
    doc.write_text(
        "```python\nfrom replica_router.sandbox import LocalCluster\n"
        "lc = LocalCluster(replicas=0).open()\nassert 'closed' not in repr(lc)\n```\n"
    )
    namespace = run_doc(doc, "guide.md")
    assert "closed" in repr(namespace["lc"])
