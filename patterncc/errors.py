"""Errors raised for bad pattern sources, always pointing at the spot in the source."""
from __future__ import annotations

from dataclasses import dataclass


CONTEXT = 60  # characters shown either side of the spot on a long line


@dataclass(frozen=True)
class Span:
    """Where a piece of pattern source came from: file name, 1-based line and columns.

    ``end_column`` is exclusive. ``text`` is the whole source line, kept so an error
    raised long after parsing (say, a global index past the end of a sequence, found
    once the sequence length is known) can still show the line with a caret.
    """

    source: str
    line: int
    column: int
    end_column: int
    text: str

    def caret(self) -> str:
        width = max(1, self.end_column - self.column)
        return " " * (self.column - 1) + "^" * width


class PatternError(ValueError):
    """A malformed or unsatisfiable pattern source.

    The message names the source, the line and the column, shows the line with a caret
    under the offending spot and says what was expected::

        <string>:1:1: unknown primitive 'windw'; did you mean 'window'?
          windw(256) | global([0])
          ^^^^^

    Attributes ``source``, ``line``, ``column`` and ``reason`` are available for tools.
    """

    def __init__(self, reason: str, span: Span | None = None, *, source: str | None = None):
        self.reason = reason
        self.span = span
        self.source = span.source if span else (source or "<string>")
        self.line = span.line if span else None
        self.column = span.column if span else None
        super().__init__(self._format())

    def _format(self) -> str:
        if self.span is None:
            return f"{self.source}: {self.reason}"
        s = self.span
        text, caret = s.text.rstrip(), s.caret()
        if len(text) > 2 * CONTEXT:  # show a window of a very long line around the spot
            start = max(0, s.column - 1 - CONTEXT)
            text = ("..." if start else "") + text[start:start + 2 * CONTEXT] + "..."
            caret = (" " * 3 if start else "") + caret[start:start + 2 * CONTEXT]
        return f"{s.source}:{s.line}:{s.column}: {self.reason}\n  {text}\n  {caret}"
