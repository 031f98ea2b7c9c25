"""Dead letters: one contract for both places, and what the folder keeps on disk."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from leanrec.events.bus import RequestOpened
from leanrec.join.deadletter import (
    FOLDER,
    DeadKind,
    DeadLetter,
    DeadLetterFolder,
    DeadLetters,
    MemoryDeadLetters,
)

T0 = 1_793_606_400_000  # 2026-11-02 08:00:00 UTC

Factory = Callable[[], DeadLetters]


def letters() -> list[DeadLetter]:
    opened = RequestOpened("r-1", 7, T0, 100, 3)
    return [
        DeadLetter(
            DeadKind.FEATURESET,
            "blob written with FeatureSet fingerprint 0badf00d v4, reader has world 12345678 v3",
            T0 + 5,
            "r-1",
            "1700000000000-0",
            opened,
            (
                ("lr:{r-1}:u", b"LR\x01\x01" + bytes(range(256))),
                ("lr:{r-1}:ev", b"\x00"),
                ("lr:{r-1}:ev", b""),
            ),
        ),
        DeadLetter(
            DeadKind.BUS_MESSAGE,
            "bus entry 1-0 is not a RequestOpened record: missing fields",
            T0 + 6,
            message_id="1-0",
            raw=(("payload", b"\xff\xfe"), ("k\udcff", b"x")),  # a field name that is not UTF-8
        ),
    ]


@pytest.fixture(params=["memory", "folder"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """Builds dead-letter places that share one backing (the folder's survives its writer)."""
    if request.param == "memory":
        shared = MemoryDeadLetters()
        return lambda: shared
    return lambda: DeadLetterFolder(str(tmp_path / "wh" / FOLDER))


def test_every_place_is_dead_letters(place: Factory) -> None:
    assert isinstance(place(), DeadLetters)


def test_committed_letters_read_back_exactly(place: Factory) -> None:
    dl = place()
    dl.append(letters()[:1])
    dl.append(letters()[1:])
    assert dl.read() == []  # buffered, not committed
    assert dl.flush() == 2
    assert place().read() == letters()  # another reader of the same place sees them, bytes and all
    assert dl.flush() == 0


def test_commits_keep_their_order(place: Factory) -> None:
    dl = place()
    first, second = letters()
    dl.append([second])
    dl.flush()
    dl.append([first])
    dl.flush()
    assert place().read() == [second, first]


def test_entries_group_the_chunks_of_a_key_in_order() -> None:
    assert letters()[0].entries() == {
        "lr:{r-1}:u": [b"LR\x01\x01" + bytes(range(256))],
        "lr:{r-1}:ev": [b"\x00", b""],
    }


def test_a_line_is_json_a_person_can_read(tmp_path: Path) -> None:
    dl = DeadLetterFolder(str(tmp_path / FOLDER))
    dl.append(letters())
    dl.flush()
    [path] = dl.files
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["featureset", "bus_message"]
    assert rows[0]["time"] == "2026-11-02T08:00:00.005+00:00"
    assert rows[0]["request_id"] == "r-1"
    assert rows[0]["opened"] == {
        "request_id": "r-1",
        "user_id": 7,
        "ts_ms": T0,
        "n_items": 100,
        "fs_version": 3,
    }
    assert rows[0]["raw"][1] == {"key": "lr:{r-1}:ev", "base64": "AA=="}
    assert "fingerprint 0badf00d" in rows[0]["reason"]


def test_the_folder_is_made_at_the_first_letter_and_holds_one_whole_file_per_commit(tmp_path: Path) -> None:
    root = tmp_path / "wh" / FOLDER
    dl = DeadLetterFolder.of_warehouse(str(tmp_path / "wh"))
    assert dl.uri == str(root)
    assert dl.flush() == 0
    assert not root.exists()  # a joiner that never met a bad record leaves no folder
    assert dl.read() == []
    for letter in letters():
        dl.append([letter])
        dl.flush()
    assert sorted(p.name for p in root.iterdir()) == sorted(Path(f).name for f in dl.files)
    assert len(dl.files) == 2
    assert all(name.endswith(".jsonl") and not name.startswith(".") for name in map(str, root.iterdir()))


def test_a_failed_commit_keeps_the_buffer(tmp_path: Path) -> None:
    blocker = tmp_path / "wh"
    blocker.write_text("a file where the folder should be")
    dl = DeadLetterFolder.of_warehouse(str(blocker))
    dl.append(letters())
    with pytest.raises(OSError):
        dl.flush()
    blocker.unlink()
    assert dl.flush() == 2
    assert dl.read() == letters()


def test_lines_that_are_not_dead_letters_are_refused() -> None:
    with pytest.raises(ValueError, match="not a dead-letter record"):
        DeadLetter.from_json('{"kind": "featureset"}')
    good = json.loads(letters()[0].to_json())
    good["raw"][0]["base64"] = "not base64!"
    with pytest.raises(ValueError, match="not a dead-letter record"):
        DeadLetter.from_json(json.dumps(good))


def test_dataset_readers_skip_the_folder_inside_a_warehouse(tmp_path: Path) -> None:
    dl = DeadLetterFolder.of_warehouse(str(tmp_path))
    dl.append(letters())
    dl.flush()
    assert ds.dataset(str(tmp_path), format="parquet").files == []  # the underscore hides it
