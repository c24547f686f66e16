"""Plain text for people: the one table printer of the CLI, the report and `sparsec bench`, and
the escaping that keeps names from models and specs from driving the terminal."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TextIO


def escaped(text: str) -> str:
    """`text` with every control or format character except newline and tab written as its escape
    (`\\x1b`, `\\u202e`): a module named with an ANSI code prints as text, not as a colour."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


class EscapingStream:
    """A text stream that writes through `escaped` (sparsec's stdout while a command runs)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(escaped(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int] = frozenset()  # type: ignore[assignment]
                 ) -> list[str]:
    """Lines of a table: the header, a rule, one line per row; columns in `right` right-aligned."""
    cells = [[escaped(str(c)) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return [line(cells[0]), line(["-" * w for w in widths]), *(line(r) for r in cells[1:])]


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
