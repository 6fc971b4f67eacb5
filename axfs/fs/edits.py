"""A settings file written through one open file is one change.

A shell writes a file a piece at a time: bash's ``printf 'a\\nb\\n' > f`` makes one
``write`` a line, ``cat <<EOF > f`` one for the lot. So the lines written to a task's
``config`` through one open file are gathered here: each write is checked with every
line before it (a bad line fails that write with EINVAL and the reason), and the whole
is applied when the file is closed (flush), or not at all if any write through the
open file was refused. A file opened with O_TRUNC (``>``) starts from a new task's
defaults; without it (``>>``, ``open(..., "a")``) from the settings as they are.

Only the adapter's bookkeeping is here: what the lines mean is the kernel's
(``Kernel.check_config`` and ``Kernel.configure``).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from axfs.errors import BadInput, TooLarge

MAX_EDIT_BYTES = 64 << 10  # written through one open file before it is closed
# A write this long that ends inside a line is a writer's full buffer (stdio, tee): the
# line goes on in the next write, so it is checked then. A shorter one ends the line.
BUFFER_BYTES = 4096


@dataclass(slots=True)
class Edit:
    reset: bool  # opened with O_TRUNC: the keys not named go back to their defaults
    text: str = ""  # written since the last time the edit was applied
    written: bool = False  # something was written since then
    applied: bool = False  # applied once already (a reset resets only the first time)
    size: int = 0
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")())

    def add(self, buf: bytes, file: str) -> str:
        """Take one write; the text to check now (all of it but a line a full buffer
        cut). BadInput or TooLarge (with the reason) when the write is refused."""
        self.size += len(buf)
        if self.size > MAX_EDIT_BYTES:
            raise TooLarge(f"{file}: at most {MAX_EDIT_BYTES} bytes through one open file")
        try:
            self.text += self.decoder.decode(buf)
        except UnicodeDecodeError as e:
            raise BadInput(f"{file}: not UTF-8 text ({e.reason})") from e
        self.written = True
        if len(buf) >= BUFFER_BYTES and not self.text.endswith("\n"):
            return self.text[: self.text.rfind("\n") + 1]
        return self.text

    def finish(self, file: str) -> str:
        """All the text, at close; BadInput if it ends inside a UTF-8 character."""
        try:
            self.text += self.decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise BadInput(f"{file}: not UTF-8 text (it ends inside a character)") from e
        return self.text

    def done(self) -> None:
        """Applied: what is written next through the same open file is a new change,
        on top of this one."""
        self.text = ""
        self.written = False
        self.applied = True
        self.decoder.reset()

    @property
    def resets(self) -> bool:
        return self.reset and not self.applied
