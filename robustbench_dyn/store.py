"""The results store: one SQLite file per output folder, per-image records, committed in chunks.

Tables:

- ``runs``: one row per (model, weights, preprocessing): the run's identity is a hash of those, so
  the same command finds its run again and resumes it, and another model, weights file or
  preprocessing is another run in the same file. Also records the ops backend, torch version,
  device and times.
- ``cells``: where each (corruption, severity) of a run comes from (an ImageNet-C folder, a clean
  folder corrupted on the fly, ...); a run never mixes two origins in one cell.
- ``records``: one row per evaluated image: label, top-5 predictions, correct@1, correct@5.
- ``bad_images``: images that could not be decoded, with the reason.

Each batch's records and bad images are committed in one transaction, so a killed run loses at
most the batch in flight; what is done is exactly what ``records`` and ``bad_images`` hold.

The clean images are the cell (corruption ``"clean"``, severity 0).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from robustbench_dyn.errors import DynrobustError

STORE_NAME = "results.sqlite"
CLEAN = "clean"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY,
    run_key TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    weights TEXT,
    weights_sha256 TEXT NOT NULL,
    preprocessing TEXT NOT NULL,
    ops_backend TEXT,
    torch_version TEXT,
    device TEXT,
    options TEXT,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS cells (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    corruption TEXT NOT NULL,
    severity INTEGER NOT NULL,
    source TEXT NOT NULL,
    origin TEXT NOT NULL,
    PRIMARY KEY (run_id, corruption, severity)
);
CREATE TABLE IF NOT EXISTS records (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    corruption TEXT NOT NULL,
    severity INTEGER NOT NULL,
    image_id TEXT NOT NULL,
    label INTEGER NOT NULL,
    top1 INTEGER NOT NULL,
    top5 TEXT NOT NULL,
    correct1 INTEGER NOT NULL,
    correct5 INTEGER NOT NULL,
    PRIMARY KEY (run_id, corruption, severity, image_id)
);
CREATE TABLE IF NOT EXISTS bad_images (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    corruption TEXT NOT NULL,
    severity INTEGER NOT NULL,
    image_id TEXT NOT NULL,
    path TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (run_id, corruption, severity, image_id)
);
"""


def _schema_columns() -> dict:
    """{table: [column names]} of a store, read off the schema itself."""
    db = sqlite3.connect(":memory:")
    db.executescript(_SCHEMA)
    tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    columns = {table: [row[1] for row in db.execute(f"PRAGMA table_info({table})")] for table in tables}
    db.close()
    return columns


_COLUMNS = _schema_columns()
# SQLite's own messages (sqlite3ErrStr) for a file whose content is not a database, or not ours
_NOT_A_STORE = ("file is not a database", "database disk image is malformed", "no such table", "no such column")


def _some(names, shown: int = 4) -> str:
    """``names`` joined with commas, the first ``shown`` of them and how many more."""
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _not_a_store(path, why) -> DynrobustError:
    return DynrobustError(f"{path} is not a dynrobust results store ({why})")


def _sqlite_error(path, exc, doing: str) -> DynrobustError:
    """The user's view of an SQLite error on the store at ``path`` while ``doing`` (open, read,
    write): not a store, disk full, or cannot open/read/write (permissions, I/O, locks)."""
    if isinstance(exc, pd.errors.DatabaseError) and exc.__cause__ is not None:
        exc = exc.__cause__  # pandas wraps the sqlite3 error
    message = str(exc)
    if any(text in message for text in _NOT_A_STORE):
        return _not_a_store(path, message)
    if "database or disk is full" in message:
        reason = "the disk is full"
    else:
        reason = message
        if doing != "read" and not os.access(Path(path).parent, os.W_OK):
            reason += f"; {Path(path).parent} is not writable"
    kept = "; the records committed before are kept: fix that and run the same command again to resume"
    return DynrobustError(f"cannot {doing} {path}: {reason}{kept if doing == 'write' else ''}")


def _sqlite_errors(doing: str):
    """Turn SQLite errors (and pandas' wrapping of them) in a store method into DynrobustError."""

    def decorate(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except (sqlite3.OperationalError, pd.errors.DatabaseError) as exc:
                raise _sqlite_error(self.path, exc, doing) from None
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
                    raise  # a bug, not the file
                raise _sqlite_error(self.path, exc, doing) from None

        return run

    return decorate


def _check_store(db, path, *, new_ok: bool) -> bool:
    """Check that ``db`` is a dynrobust store of this schema; True if it is, False if it is empty
    (or its creation was cut short) and ``new_ok``. Raises DynrobustError otherwise."""
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables and new_ok:
        return False
    if "meta" not in tables:
        raise _not_a_store(path, f"it has no dynrobust meta table; tables: {_some(sorted(tables)) or 'none'}")
    found = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    if found is None:
        if new_ok and tables <= set(_COLUMNS):
            return False  # a creation cut short: only our tables, no schema row yet
        raise _not_a_store(path, "its meta table names no dynrobust schema")
    try:
        schema = int(found[0])
    except (TypeError, ValueError):
        raise _not_a_store(path, f"its schema {found[0]!r} is not a dynrobust schema version") from None
    if schema != SCHEMA_VERSION:
        raise DynrobustError(f"{path} was written by another dynrobust version (schema {found[0]})")
    for table, wanted in _COLUMNS.items():
        if table not in tables:
            if new_ok or table == "cells":
                continue  # created below (eval), or not needed to read runs and records (report)
            raise _not_a_store(path, f"it has no {table} table")
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        missing = [c for c in wanted if c not in have]
        if missing:
            raise _not_a_store(path, f"its {table} table lacks the columns {_some(missing)}")
    return True


@dataclass(frozen=True)
class RunIdentity:
    """What makes two evaluations the same run: model, weights (by content) and preprocessing."""

    model: str
    weights_sha256: str
    preprocessing: dict

    @property
    def key(self) -> str:
        """A hash of the identity, stable across processes (sorted JSON, SHA-256)."""
        blob = json.dumps([self.model, self.weights_sha256, self.preprocessing], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


class ResultsStore:
    """An open results store (``<folder>/results.sqlite``). Use as a context manager."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise DynrobustError(f"output {self.folder} exists and is not a folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DynrobustError(f"cannot create output folder {self.folder}: {exc.strerror or exc}") from None
        self.path = self.folder / STORE_NAME
        self.db = None
        try:
            self._open()
        except DynrobustError:
            self.close()
            raise

    @_sqlite_errors("open")
    def _open(self):
        self.db = sqlite3.connect(self.path, timeout=60)
        # before anything is written: another program's database must not get our tables
        existing = _check_store(self.db, self.path, new_ok=True)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        if not existing:
            with self.db:
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    @classmethod
    def open_existing(cls, path) -> "ResultsStore":
        """Open an existing store read-only (for reports): a ``.sqlite`` file, or a folder holding
        ``results.sqlite``. Nothing is created or written. Raises DynrobustError when the path is
        missing, is not a results store, or was written by another schema version.
        """
        path = Path(path)
        if path.is_dir():
            path = path / STORE_NAME
        if not path.is_file():
            raise DynrobustError(f"no results store at {path}")
        store = cls.__new__(cls)
        store.folder, store.path, store.db = path.parent, path, None
        try:
            store._open_read_only()
        except DynrobustError:
            store.close()
            raise
        return store

    @_sqlite_errors("read")
    def _open_read_only(self):
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        if not os.access(self.folder, os.W_OK) and not self.path.with_name(self.path.name + "-wal").exists():
            # a store in WAL mode cannot be opened read-only where SQLite cannot create its -shm file;
            # with no -wal file and a folder nobody can write, the main file holds everything
            uri += "&immutable=1"
        self.db = sqlite3.connect(uri, uri=True, timeout=60)
        _check_store(self.db, self.path, new_ok=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.db is not None:
            self.db.close()

    # -- runs -------------------------------------------------------------------------------

    @_sqlite_errors("write")
    def open_run(self, identity: RunIdentity, weights: str | None, context: dict) -> int:
        """Return the run id of ``identity``, creating the run if it is new; ``context`` updates
        the descriptive columns (ops_backend, torch_version, device, options)."""
        now = time.time()
        row = self.db.execute("SELECT run_id FROM runs WHERE run_key=?", (identity.key,)).fetchone()
        with self.db:
            if row is None:
                cursor = self.db.execute(
                    "INSERT INTO runs (run_key, model, weights, weights_sha256, preprocessing,"
                    " ops_backend, torch_version, device, options, started_at, updated_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        identity.key,
                        identity.model,
                        weights,
                        identity.weights_sha256,
                        json.dumps(identity.preprocessing, sort_keys=True),
                        context.get("ops_backend"),
                        context.get("torch_version"),
                        context.get("device"),
                        json.dumps(context.get("options", {}), sort_keys=True),
                        now,
                        now,
                    ),
                )
                return int(cursor.lastrowid)
            self.db.execute(
                "UPDATE runs SET ops_backend=?, torch_version=?, device=?, options=?, updated_at=? WHERE run_id=?",
                (
                    context.get("ops_backend"),
                    context.get("torch_version"),
                    context.get("device"),
                    json.dumps(context.get("options", {}), sort_keys=True),
                    now,
                    row[0],
                ),
            )
            return int(row[0])

    @_sqlite_errors("read")
    def find_run(self, identity: RunIdentity) -> int | None:
        """The run id of ``identity`` in this store, or None."""
        row = self.db.execute("SELECT run_id FROM runs WHERE run_key=?", (identity.key,)).fetchone()
        return None if row is None else int(row[0])

    @_sqlite_errors("write")
    def mark_finished(self, run_id: int) -> None:
        """Record that every requested image of the run is done."""
        with self.db:
            self.db.execute("UPDATE runs SET finished_at=? WHERE run_id=?", (time.time(), run_id))

    @_sqlite_errors("read")
    def runs(self) -> pd.DataFrame:
        """All runs of the store, one row each."""
        return pd.read_sql_query("SELECT * FROM runs ORDER BY run_id", self.db)

    @_sqlite_errors("read")
    def record_counts(self) -> dict:
        """{run id: number of records} of the runs that have records."""
        return dict(self.db.execute("SELECT run_id, COUNT(*) FROM records GROUP BY run_id").fetchall())

    # -- cells and records ----------------------------------------------------------------

    @_sqlite_errors("write")
    def claim_cells(self, run_id: int, cells) -> None:
        """Record the origin of each (corruption, severity, source, origin) cell of the run.

        Raises DynrobustError if the store already holds that cell of that run from another origin
        (e.g. another ImageNet-C folder): results of different data must not be mixed.
        """
        clashes = []
        with self.db:
            for corruption, severity, source, origin in cells:
                row = self.db.execute(
                    "SELECT source, origin FROM cells WHERE run_id=? AND corruption=? AND severity=?",
                    (run_id, corruption, severity),
                ).fetchone()
                if row is None:
                    self.db.execute("INSERT INTO cells VALUES (?,?,?,?,?)", (run_id, corruption, severity, source, origin))
                elif tuple(row) != (source, origin):
                    clashes.append(f"{corruption}/{severity} from {row[1]}")
        if clashes:
            raise DynrobustError(
                f"{self.path} already holds results of this model for {', '.join(clashes[:3])}"
                f"{' and more' if len(clashes) > 3 else ''}, not from this data; use another --out"
            )

    @_sqlite_errors("read")
    def done_images(self, run_id: int) -> set:
        """The (corruption, severity, image_id) already evaluated or recorded as bad for ``run_id``."""
        rows = self.db.execute(
            "SELECT corruption, severity, image_id FROM records WHERE run_id=?"
            " UNION SELECT corruption, severity, image_id FROM bad_images WHERE run_id=?",
            (run_id, run_id),
        )
        return {(c, int(s), i) for c, s, i in rows}

    @_sqlite_errors("write")
    def commit_batch(self, run_id, corruption, severity, records, bad) -> None:
        """Write one batch's records and bad images, in one transaction.

        ``records``: iterable of (image_id, label, top5 list); ``bad``: (image_id, path, reason).
        """
        rows = []
        for image_id, label, top5 in records:
            top5 = [int(p) for p in top5]
            rows.append(
                (run_id, corruption, severity, image_id, int(label), top5[0], json.dumps(top5),
                 int(top5[0] == label), int(label in top5))
            )
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO records VALUES (?,?,?,?,?,?,?,?,?)", rows)
            self.db.executemany(
                "INSERT OR REPLACE INTO bad_images VALUES (?,?,?,?,?,?)",
                [(run_id, corruption, severity, i, p, r) for i, p, r in bad],
            )
            self.db.execute("UPDATE runs SET updated_at=? WHERE run_id=?", (time.time(), run_id))

    @_sqlite_errors("write")
    def merge_store(self, other) -> int:
        """Add the runs, cells, records and bad images of the store file ``other`` to this store, in
        one transaction (runs matched by run key; a record or bad image already here is replaced);
        return the number of records added or replaced. ``other`` is left as it was.

        Raises DynrobustError if ``other`` is not a results store of this schema, or holds a cell of
        a run from another origin than this store does (as :meth:`claim_cells`).
        """
        other = Path(other)
        with ResultsStore.open_existing(other):
            pass  # checks that it is a store of this schema, with one clear error if not
        self.db.execute("ATTACH DATABASE ? AS part", (str(other),))
        try:
            clashes = self.db.execute(
                "SELECT c.corruption, c.severity, c.origin, mc.origin FROM part.cells c"
                " JOIN part.runs pr USING (run_id) JOIN main.runs mr ON mr.run_key = pr.run_key"
                " JOIN main.cells mc ON mc.run_id = mr.run_id AND mc.corruption = c.corruption"
                " AND mc.severity = c.severity WHERE mc.source != c.source OR mc.origin != c.origin").fetchall()
            if clashes:
                corruption, severity, theirs, ours = clashes[0]
                raise DynrobustError(f"{other} holds {corruption}/{severity} from {theirs}, but {self.path} holds it "
                                     f"from {ours}: results of different data are not merged")
            identity = "run_key, model, weights, weights_sha256, preprocessing"
            context = "ops_backend, torch_version, device, options, started_at, updated_at, finished_at"
            mapped = "JOIN part.runs pr ON pr.run_id = x.run_id JOIN main.runs mr ON mr.run_key = pr.run_key"
            with self.db:
                self.db.execute(f"INSERT OR IGNORE INTO main.runs ({identity}, {context})"
                                f" SELECT {identity}, {context} FROM part.runs")
                self.db.execute("INSERT OR IGNORE INTO main.cells SELECT mr.run_id, x.corruption, x.severity,"
                                f" x.source, x.origin FROM part.cells x {mapped}")
                before = self.db.total_changes
                self.db.execute("INSERT OR REPLACE INTO main.records SELECT mr.run_id, x.corruption, x.severity,"
                                f" x.image_id, x.label, x.top1, x.top5, x.correct1, x.correct5 FROM part.records x {mapped}")
                added = self.db.total_changes - before
                self.db.execute("INSERT OR REPLACE INTO main.bad_images SELECT mr.run_id, x.corruption, x.severity,"
                                f" x.image_id, x.path, x.reason FROM part.bad_images x {mapped}")
                self.db.execute("UPDATE main.runs SET updated_at=? WHERE run_key IN (SELECT run_key FROM part.runs)",
                                (time.time(),))
        finally:
            self.db.execute("DETACH DATABASE part")
        return added

    @_sqlite_errors("read")
    def records(self, run_id: int | None = None) -> pd.DataFrame:
        """Per-image records (all runs, or one), with the run's model name."""
        query = (
            "SELECT r.run_id, runs.model, r.corruption, r.severity, r.image_id, r.label, r.top1, r.top5,"
            " r.correct1, r.correct5 FROM records r JOIN runs USING (run_id)"
        )
        params = ()
        if run_id is not None:
            query += " WHERE r.run_id=?"
            params = (run_id,)
        return pd.read_sql_query(query + " ORDER BY r.run_id, r.corruption, r.severity, r.image_id", self.db, params=params)

    @_sqlite_errors("read")
    def outcomes(self, run_id: int) -> pd.DataFrame:
        """Per-image outcomes of one run, without the predictions: corruption, severity, image_id,
        label, correct1, correct5 (0/1); a lighter :meth:`records` for statistics over many images."""
        return pd.read_sql_query(
            "SELECT corruption, severity, image_id, label, correct1, correct5 FROM records WHERE run_id=?"
            " ORDER BY corruption, severity, image_id",
            self.db,
            params=(run_id,),
        )

    @_sqlite_errors("read")
    def bad_images(self, run_id: int | None = None) -> pd.DataFrame:
        """Images that could not be decoded, with the reason."""
        query = "SELECT * FROM bad_images"
        params = ()
        if run_id is not None:
            query += " WHERE run_id=?"
            params = (run_id,)
        return pd.read_sql_query(query + " ORDER BY corruption, severity, image_id", self.db, params=params)

    @_sqlite_errors("read")
    def cell_errors(self, run_id: int) -> pd.DataFrame:
        """Top-1 and top-5 error (fractions) and image count per (corruption, severity) of a run."""
        return pd.read_sql_query(
            "SELECT corruption, severity, COUNT(*) AS images, 1.0 - AVG(correct1) AS top1_err,"
            " 1.0 - AVG(correct5) AS top5_err FROM records WHERE run_id=?"
            " GROUP BY corruption, severity ORDER BY corruption, severity",
            self.db,
            params=(run_id,),
        )
