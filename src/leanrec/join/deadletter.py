"""Dead letters: records a joiner cannot read, set aside with the reason so that joining goes on.

A joiner that raised on a record it cannot read would stop on it, and again after every restart. So
such a record is set aside whole instead, with why and when, and counted:

- ``featureset``: the request was logged under another FeatureSet (its RequestOpened names another
  version, or a blob carries another fingerprint or version): another reader's record.
- ``corrupt_blob``: a frozen-feature blob that is not a whole blob of its kind (truncated, another
  length than its layout, a damaged header).
- ``event_blob``: a stored event batch that does not decode (the rest of the request joins).
- ``bus_message``: a bus entry that is not a RequestOpened record.

A request is set aside with the raw bytes of every transient entry it has (request side, pages or
impressions, and its event batches), so a joiner of the right FeatureSet, or a fixed one, can replay
it: put the entries back and append its RequestOpened. The joiner acknowledges the bus record and
deletes the entries only once the dead letter is committed, as it does for the warehouse, so nothing
is lost; a crash in between sets the record aside again (at least once, as the warehouse is written).

Two implementations of :class:`DeadLetters`: :class:`MemoryDeadLetters` in the process (the embedded
default, as durable as the in-process bus and store) and :class:`DeadLetterFolder`, JSON lines on any
path ``pyarrow.fs`` opens, one file per commit, written under a hidden name and renamed into place. A
joiner process keeps it in its warehouse's ``_dead_letter/`` folder: it needs no server, lives as long
as the warehouse, and readers of the warehouse (leanrec, pyarrow datasets, Spark, Hive) skip folders
whose name starts with an underscore.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.fs as pafs

from leanrec.events.bus import RequestOpened

FOLDER = "_dead_letter"
"""Name of the dead-letter folder inside a warehouse."""


class DeadKind(StrEnum):
    """Why a record was set aside (see the module's docstring)."""

    FEATURESET = "featureset"
    CORRUPT_BLOB = "corrupt_blob"
    EVENT_BLOB = "event_blob"
    BUS_MESSAGE = "bus_message"


@dataclass(frozen=True)
class DeadLetter:
    """One record set aside.

    Attributes:
        kind: A :class:`DeadKind` value.
        reason: What could not be read, as the reader said it.
        set_aside_ms: When it was set aside (the joiner's clock).
        request_id: The request, when known.
        message_id: Id of the bus record it came with, when there is one.
        opened: The RequestOpened record (to replay the request), when there is one.
        raw: ``(key, bytes)`` pairs: the request's transient entries, the chunks of a list entry
            (event batches) each under its key in order; for a bus entry, its fields and values.

    """

    kind: str
    reason: str
    set_aside_ms: int
    request_id: str | None = None
    message_id: str | None = None
    opened: RequestOpened | None = None
    raw: tuple[tuple[str, bytes], ...] = ()

    def to_json(self) -> str:
        """One JSON line (ASCII): raw bytes in base64, the time also as ISO 8601 (UTC) for a reader."""
        when = datetime.fromtimestamp(self.set_aside_ms / 1000, UTC)
        return json.dumps(
            {
                "kind": self.kind,
                "reason": self.reason,
                "set_aside_ms": self.set_aside_ms,
                "time": when.isoformat(timespec="milliseconds"),
                "request_id": self.request_id,
                "message_id": self.message_id,
                "opened": None if self.opened is None else asdict(self.opened),
                "raw": [{"key": k, "base64": base64.b64encode(v).decode()} for k, v in self.raw],
            }
        )  # ASCII: a key that is not UTF-8 (a foreign bus field) travels as a \udcXX escape

    @classmethod
    def from_json(cls, line: str) -> DeadLetter:
        """Parse a line :meth:`to_json` wrote.

        Raises:
            ValueError: The line is not such a record.

        """
        try:
            d: dict[str, Any] = json.loads(line)
            opened = None if d["opened"] is None else RequestOpened(**d["opened"])
            raw = tuple((e["key"], base64.b64decode(e["base64"], validate=True)) for e in d["raw"])
            return cls(
                d["kind"], d["reason"], d["set_aside_ms"], d["request_id"], d["message_id"], opened, raw
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a dead-letter record: {exc}") from None

    def entries(self) -> dict[str, list[bytes]]:
        """The raw bytes by key, chunks of one key in order (what a replay puts back)."""
        out: dict[str, list[bytes]] = {}
        for k, v in self.raw:
            out.setdefault(k, []).append(v)
        return out


@runtime_checkable
class DeadLetters(Protocol):
    """Where a joiner sets aside what it cannot read."""

    def append(self, letters: Sequence[DeadLetter]) -> None:
        """Buffer dead letters; they are committed by ``flush``."""
        ...

    def flush(self) -> int:
        """Commit buffered dead letters durably; returns how many."""
        ...

    def read(self) -> list[DeadLetter]:
        """Every committed dead letter, oldest commit first."""
        ...


class MemoryDeadLetters:
    """DeadLetters in the process: as durable as the in-process bus and store it goes with."""

    def __init__(self) -> None:
        self._buffer: list[DeadLetter] = []
        self._committed: list[DeadLetter] = []

    def append(self, letters: Sequence[DeadLetter]) -> None:
        """Buffer."""
        self._buffer.extend(letters)

    def flush(self) -> int:
        """Move the buffer to the committed list."""
        n = len(self._buffer)
        self._committed.extend(self._buffer)
        self._buffer = []
        return n

    def read(self) -> list[DeadLetter]:
        """The committed dead letters."""
        return list(self._committed)


def _open_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        return pafs.LocalFileSystem(), str(uri)


class DeadLetterFolder:
    """DeadLetters as JSON-lines files in a folder: one file per commit, renamed into place whole.

    The folder is made at the first commit that has something to write, so a warehouse whose joiner
    never met a bad record has none.

    Args:
        uri: Local folder or a URI ``pyarrow.fs`` opens.

    """

    def __init__(self, uri: str) -> None:
        self.uri = str(uri)
        self.filesystem, self.root = _open_fs(self.uri)
        self._buffer: list[DeadLetter] = []
        self._files: list[str] = []
        self._commits = 0

    @classmethod
    def of_warehouse(cls, warehouse_uri: str) -> DeadLetterFolder:
        """The dead-letter folder kept inside a warehouse (``<warehouse>/_dead_letter``)."""
        return cls(f"{str(warehouse_uri).rstrip('/')}/{FOLDER}")

    def append(self, letters: Sequence[DeadLetter]) -> None:
        """Buffer."""
        self._buffer.extend(letters)

    def flush(self) -> int:
        """Write the buffer as one file, under a hidden name first.

        Raises:
            OSError: The file could not be written; the buffer is kept for the next flush.

        """
        if not self._buffer:
            return 0
        now = datetime.now(UTC)
        self._commits += 1  # orders this writer's files within one millisecond
        stamp = f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{self._commits:06d}"
        name = f"dead-{stamp}-{uuid.uuid4().hex[:12]}.jsonl"
        tmp, final = f"{self.root}/.{name}.tmp", f"{self.root}/{name}"
        body = "".join(letter.to_json() + "\n" for letter in self._buffer).encode()
        self.filesystem.create_dir(self.root, recursive=True)
        with self.filesystem.open_output_stream(tmp) as out:
            out.write(body)
        self.filesystem.move(tmp, final)
        n = len(self._buffer)
        self._buffer = []
        self._files.append(final)
        return n

    @property
    def files(self) -> list[str]:
        """Paths of the files this writer committed."""
        return list(self._files)

    def read(self) -> list[DeadLetter]:
        """Every dead letter committed in the folder (by any writer), oldest file first."""
        if self.filesystem.get_file_info(self.root).type != pafs.FileType.Directory:
            return []
        found = self.filesystem.get_file_info(pafs.FileSelector(self.root))
        paths = sorted(
            f.path
            for f in found
            if f.type == pafs.FileType.File
            and f.base_name.endswith(".jsonl")
            and not f.base_name.startswith(".")
        )
        out = []
        for path in paths:
            with self.filesystem.open_input_stream(path) as src:
                text = src.read().decode()
            out.extend(DeadLetter.from_json(line) for line in text.splitlines() if line.strip())
        return out
