"""The layout the command line's node tables share, so that they fit 80 columns.

Columns are separated by two spaces and no box lines. Only the node column never
wraps: when the terminal is narrow, rich wraps the other headers and cells first
("streams from" over two lines) and fold values that still do not fit, so a
node's name stays whole and no value is cut. A node's error does
not get a column (it would squeeze the others or run past the width): it is
printed below the table, wrapped to the width.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

__all__ = ["node_table", "with_errors"]


def node_table(
    title: str | None,
    headers: Sequence[str],
    *,
    right: Collection[str] = (),
    whole: Collection[str] = (),
) -> Table:
    """An empty table. The node column (``headers[0]``) and the ``whole`` ones never
    wrap; in the others a value too wide for its column folds onto the next line
    (never cut to ``…``). ``right``: right-aligned columns (numbers)."""
    table = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column(headers[0], style="bold", no_wrap=True)
    for header in headers[1:]:
        table.add_column(
            header,
            overflow="fold",
            no_wrap=header in whole,
            justify="right" if header in right else "left",
        )
    return table


def with_errors(table: Table, errors: Iterable[tuple[str, str]]) -> RenderableType:
    """The table, then one wrapped ``name: error`` line per failing node (as plain
    text: an error message is never parsed as markup)."""
    lines = [Text.assemble((f"{name}: ", "bold"), (error, "red")) for name, error in errors]
    return Group(table, *lines) if lines else table
