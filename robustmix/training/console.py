"""A copy of the console in the run folder: what a run printed, as the terminal ended up showing it.

    with copy_console(run_dir / "log.txt", append=resumed):
        trainer.fit()

Everything written to ``sys.stdout`` and ``sys.stderr`` inside the block still reaches them, and its lines
are also appended to the file, in the order written: progress bar redraws collapse to the bar's last state
(the text after a line's last carriage return), terminal escape sequences are dropped, blank lines skipped.
An exception that ends the block is written to the file with its traceback (the console gets it from
Python as usual); ``SystemExit`` is not, its message is already printed.
"""

from __future__ import annotations

import contextlib
import re
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

#: CSI escape sequences (tqdm's cursor moves between bars, colours).
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Copy:
    """A text stream that writes to ``stream`` and the complete lines of it, cleaned, to ``file``."""

    def __init__(self, stream: TextIO, file: TextIO) -> None:
        self.stream, self.file, self.pending = stream, file, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self._record(line)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def close_line(self) -> None:
        """Record a last line that never got its newline."""
        if self.pending:
            self._record(self.pending)
            self.pending = ""

    def _record(self, line: str) -> None:
        line = _ESCAPES.sub("", line).rsplit("\r", 1)[-1].rstrip()
        if line:
            self.file.write(line + "\n")
            self.file.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...: the console's
        return getattr(self.stream, name)


@contextlib.contextmanager
def copy_console(path: str | Path, *, append: bool = False) -> Iterator[None]:
    """Copy ``sys.stdout`` and ``sys.stderr`` into ``path`` for the ``with`` block (call it on one process).

    Args:
        path: The log file (plain text, created without execute permission).
        append: Add to an existing file (a resumed run) instead of starting it afresh.
    """
    with open(path, "a" if append else "w", encoding="utf-8") as file:
        out, err = _Copy(sys.stdout, file), _Copy(sys.stderr, file)
        sys.stdout, sys.stderr = out, err
        try:
            yield
        except SystemExit:
            raise
        except BaseException:
            file.write(traceback.format_exc())
            raise
        finally:
            sys.stdout, sys.stderr = out.stream, err.stream
            out.close_line()
            err.close_line()
