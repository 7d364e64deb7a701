"""Job rows: what a job is, as both gallery backends store it (the embedded catalog's ``jobs`` table,
PostgreSQL's ``face_jobs``, migration 7), and what the store guarantees.

* At most one job per source collection is ``queued`` or ``running`` (or ``creating``: the row of a
  POST that is still creating its target collection): a UNIQUE partial index on the source collection
  over those states, so two concurrent POSTs cannot both win (:class:`JobRunning` for the loser).
* ``update_job`` is a conditional write: with ``expect_state`` / ``expect_heartbeat`` it changes the
  row only when it still holds those values (a claim of a job whose runner died, a cancel racing the
  runner's next batch); it answers whether it changed the row. ``audit`` writes the audit record in
  the same transaction.
* Rows hold names and counts only (no image, no embedding); ``cursor`` is the last identity id synced.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

# states: "creating" is internal (a POST between its job row and its target collection): never listed
ACTIVE_STATES = ("creating", "queued", "running")
STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED_STATES = ("done", "failed", "cancelled")
PHASES = ("copy", "catch_up", "compare", "done")

# the columns, in the order both backends store and read them
COLUMNS = ("job_id", "kind", "state", "collection", "into", "model", "model_id", "source_model_id", "shadow",
           "batch_size", "progress", "cursor", "created_at", "updated_at", "finished_at", "started_by", "error",
           "report", "heartbeat", "owner")
JSON_COLUMNS = ("progress", "error", "report")
SQL_COLUMNS = ", ".join(f'"{name}"' for name in COLUMNS)  # quoted: "into" is an SQL keyword
UPDATABLE = ("state", "progress", "cursor", "updated_at", "finished_at", "error", "report", "heartbeat", "owner")


class JobRunning(ValueError):
    """A job of this source collection is queued or running already (one at a time)."""

    def __init__(self, collection: str) -> None:
        super().__init__(f"a job of collection {collection!r} is queued or running")
        self.collection = collection


def new_job_id() -> str:
    return f"job_{secrets.token_hex(6)}"


MIGRATE = "migrate"  # the kind of a migration job (migrate.py)

# the newest migration job into a collection (job_id, state): both backends' set_alias read it in the
# alias's own write, after finding the target (a job row is stored before the collection it creates)
NEWEST_MIGRATION_INTO = (f"SELECT job_id, state FROM {{table}} WHERE kind = '{MIGRATE}' AND \"into\" = {{param}} "
                         "ORDER BY created_at DESC, job_id DESC LIMIT 1")


class MigrationUnfinished(Exception):
    """No alias may point at ``collection``: it is the new collection of migration ``job_id``, which is
    not done (``state``). Raised by ``set_alias`` inside its write: a check before it would let a POST
    that creates the collection meanwhile through."""

    def __init__(self, collection: str, job_id: str, state: str) -> None:
        super().__init__(f"collection {collection!r} is the new collection of migration {job_id} ({state}): an "
                         "alias may point at it once the job is done (resume a failed or cancelled one, or delete "
                         "the collection); before, its clients would be served a half-copied gallery whose writes "
                         "the job overwrites")
        self.collection, self.job_id, self.state = collection, job_id, state


@dataclass(frozen=True)
class Progress:
    phase: str = "copy"
    identities_done: int = 0
    identities_total: int = 0
    faces_done: int = 0
    faces_total: int = 0
    faces_per_s: float | None = None


@dataclass(frozen=True)
class JobRecord:
    """One job as stored (the API's ``Job`` schema, plus the runner's cursor, heartbeat and owner)."""

    job_id: str
    collection: str  # the source (A), resolved from an alias at start
    into: str  # the target (B)
    model: str  # the served name of B's model
    model_id: str
    source_model_id: str
    kind: str = MIGRATE  # or a scan's kind (scan.py)
    state: str = "queued"
    shadow: bool = False
    batch_size: int = 64
    progress: dict[str, Any] = field(default_factory=lambda: asdict(Progress()))
    cursor: str | None = None  # the last identity id of A synced by the copy phase
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    started_by: str | None = None  # the key id of who started it
    error: dict[str, Any] | None = None  # {"code", "message"}
    report: dict[str, Any] | None = None  # the comparison report (compare.py's as_dict())
    heartbeat: float | None = None  # when the runner last wrote it (time.time()); None: never run
    owner: str | None = None  # the runner (process) that holds it while running

    def row(self) -> tuple[Any, ...]:
        """Values in COLUMNS order, JSON columns as text."""
        return tuple(_to_db(name, getattr(self, name)) for name in COLUMNS)

    @classmethod
    def from_row(cls, row: tuple[Any, ...] | list[Any]) -> JobRecord:
        values = dict(zip(COLUMNS, row))
        for name in JSON_COLUMNS:
            if values[name] is not None and not isinstance(values[name], dict):
                values[name] = json.loads(values[name])
        values["shadow"] = bool(values["shadow"])
        values["batch_size"] = int(values["batch_size"])
        return cls(**values)

    def with_(self, **changes: Any) -> JobRecord:
        return replace(self, **changes)


def schema(json_type: str, float_type: str, bool_type: str, table: str) -> tuple[str, ...]:
    """The table and its indexes (SQLite: TEXT/REAL/INTEGER; PostgreSQL: jsonb-free text, double, boolean)."""
    f, j, b = float_type, json_type, bool_type
    return (
        f"""CREATE TABLE IF NOT EXISTS {table} (
               "job_id" text PRIMARY KEY, "kind" text NOT NULL, "state" text NOT NULL,
               "collection" text NOT NULL, "into" text NOT NULL, "model" text NOT NULL,
               "model_id" text NOT NULL, "source_model_id" text NOT NULL, "shadow" {b} NOT NULL,
               "batch_size" integer NOT NULL, "progress" {j} NOT NULL, "cursor" text,
               "created_at" {f} NOT NULL, "updated_at" {f} NOT NULL, "finished_at" {f},
               "started_by" text, "error" {j}, "report" {j}, "heartbeat" {f}, "owner" text)""",
        # one queued-or-running job per source collection: the store, not a check in Python, decides
        f"""CREATE UNIQUE INDEX IF NOT EXISTS {table}_one_active ON {table}("collection")
               WHERE "state" IN ('creating', 'queued', 'running')""",
        f'CREATE INDEX IF NOT EXISTS {table}_by_created ON {table}("created_at")',
    )


def to_db(changes: dict[str, Any]) -> dict[str, Any]:
    """Changes for update_job, JSON columns as text; KeyError-free: unknown names are refused."""
    unknown = set(changes) - set(UPDATABLE)
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    return {name: _to_db(name, value) for name, value in changes.items()}


def _to_db(name: str, value: Any) -> Any:
    if name in JSON_COLUMNS and value is not None:
        return json.dumps(value)
    if name == "shadow":
        return bool(value)
    return value
