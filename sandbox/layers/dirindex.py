"""The directory entries of an image being built: for each directory, name -> inode number.

In dicts while the layer is small. Past `spill_at` names everything moves to an SQLite database in a
temporary file (deleted when the index is closed) whose page cache is capped, so the converter's memory
stays flat whatever the number of entries. Both stores answer alike, ordering included (SQLite compares
BLOBs as Python compares bytes); the tests convert layers through both.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite3

SPILL_AT = 1 << 15                  # names held in dicts (about 120 bytes each) before moving to SQLite
_CACHE_KIB = 4096                   # SQLite page cache


class DirIndex:
    """name -> inode number for every directory; 0 means "no such name"."""

    def __init__(self, spill_at: int = SPILL_AT) -> None:
        self.spill_at = spill_at
        self._mem: dict[int, dict[bytes, int]] = {}     # directory -> its entries (until spilled)
        self._db: sqlite3.Connection | None = None
        self._dirs: set[int] = set()                    # the directories, once spilled
        self._names = 0

    @property
    def spilled(self) -> bool:
        return self._db is not None

    def new_dir(self, d: int) -> None:
        if self._db is None:
            self._mem[d] = {}
        else:
            self._dirs.add(d)

    def drop_dir(self, d: int) -> None:
        """Forget an (empty) directory."""
        if self._db is None:
            del self._mem[d]
        else:
            self._dirs.discard(d)

    def directories(self) -> Iterable[int]:
        return self._mem.keys() if self._db is None else self._dirs

    def get(self, d: int, name: bytes) -> int:
        if self._db is None:
            return self._mem[d].get(name, 0)
        row = self._db.execute("SELECT ino FROM dirent WHERE dir = ? AND name = ?", (d, name)).fetchone()
        return row[0] if row else 0

    def add(self, d: int, name: bytes, ino: int) -> None:
        if self._db is None:
            self._mem[d][name] = ino
            self._names += 1
            if self._names > self.spill_at:
                self._spill()
        else:
            self._db.execute("INSERT INTO dirent (dir, name, ino) VALUES (?, ?, ?)", (d, name, ino))

    def remove(self, d: int, name: bytes) -> int:
        if self._db is None:
            self._names -= 1
            return self._mem[d].pop(name)
        rows = self._db.execute("DELETE FROM dirent WHERE dir = ? AND name = ? RETURNING ino", (d, name)).fetchall()
        if not rows:
            raise KeyError(name)
        return rows[0][0]

    def children(self, d: int) -> list[tuple[bytes, int]]:
        """(name, inode) of every entry of `d`, in no particular order."""
        if self._db is None:
            return list(self._mem[d].items())
        return self._db.execute("SELECT name, ino FROM dirent WHERE dir = ?", (d,)).fetchall()

    def sorted_children(self, d: int) -> list[tuple[bytes, int]]:
        """(name, inode) of every entry of `d`, by inode number, then name (hard links share a number)."""
        if self._db is None:
            return sorted(self._mem[d].items(), key=lambda kv: (kv[1], kv[0]))
        return self._db.execute("SELECT name, ino FROM dirent WHERE dir = ? ORDER BY ino, name", (d,)).fetchall()

    def _spill(self) -> None:
        import sqlite3  # only layers with very many entries need it

        db = sqlite3.connect("", isolation_level=None)  # "": a private temporary file, deleted on close
        for pragma in ("journal_mode = OFF", "synchronous = OFF", "locking_mode = EXCLUSIVE",
                       f"cache_size = -{_CACHE_KIB}", "temp_store = FILE"):
            db.execute(f"PRAGMA {pragma}")
        db.execute("CREATE TABLE dirent (dir INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL, "
                   "PRIMARY KEY (dir, name)) WITHOUT ROWID")
        db.execute("BEGIN")                         # one transaction for the whole conversion, never committed
        db.executemany("INSERT INTO dirent (dir, name, ino) VALUES (?, ?, ?)",
                       ((d, name, ino) for d, entries in self._mem.items() for name, ino in entries.items()))
        self._dirs = set(self._mem)
        self._mem = {}
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
