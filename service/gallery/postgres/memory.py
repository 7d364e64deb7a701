"""Does the HNSW index fit in PostgreSQL's shared buffers? Checked (and logged) each time a replica opens
the gallery and each time it connects to a standby (a standby has its own shared_buffers), and shown at
every scrape of /metrics (``face_database_hnsw_index_bytes``, ``face_database_shared_buffers_bytes``).

A pgvector search is random reads of index pages: ~33 per unit of ef (12,600 at 1M faces and ef 384).
Measured at 1M faces (bench/README.md, "pgvector at 1M: tuning"): with the index larger than
``shared_buffers`` (PostgreSQL's default is 128MB; the index is ~0.83 GB per million 128-d faces at m 16)
three quarters of those reads miss the buffers and a search takes 2.3-2.6x as long, even when the OS
page cache holds the index. Nothing fails, so nothing else would tell the operator: the replica logs it.

``huge_pages_status`` (PostgreSQL 17 and later; None before) says whether the shared memory, buffers
included, is on the kernel's 2 MB pages, which the same benchmark measured faster (``huge_pages``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg

log = logging.getLogger(__name__)

# the service's HNSW indexes, in the gallery's schema: one per dimension (this prefix + the dimension:
# backend.hnsw_index_name) and one per collection that has one of its own (this prefix + its id:
# backend.collection_index_name); named here, where the fit's query finds them by name
HNSW_INDEX_PREFIX = "faces_embedding_hnsw_"
COLLECTION_INDEX_PREFIX = "faces_hnsw_c"
_SQL = ("SELECT coalesce(sum(pg_relation_size(c.oid)), 0), pg_size_bytes(current_setting('shared_buffers')), "
        "current_setting('huge_pages_status', true) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %(schema)s AND c.relkind = 'i' AND (c.relname LIKE %(shared)s OR c.relname ~ %(own)s)")
_INDEX_NAMES = {"shared": HNSW_INDEX_PREFIX.replace("_", "\\_") + "%", "own": f"^{COLLECTION_INDEX_PREFIX}[0-9]+$"}


@dataclass(frozen=True)
class BufferFit:
    index_bytes: int  # the gallery's HNSW indexes, all dimensions and collections
    shared_buffers_bytes: int
    huge_pages: str | None  # "on" | "off"; None: the server does not say (before PostgreSQL 17)

    @property
    def fits(self) -> bool:
        return self.index_bytes <= self.shared_buffers_bytes

    def fields(self) -> dict:
        return {"hnsw_index_bytes": self.index_bytes, "shared_buffers_bytes": self.shared_buffers_bytes,
                "huge_pages": self.huge_pages}

    def counters(self) -> dict[str, int]:
        """As numbers (the gallery's ``stats().extra``: /readyz and /metrics); ``huge_pages`` 1 or 0, left
        out when the server does not say."""
        numbers = {"hnsw_index_bytes": self.index_bytes, "shared_buffers_bytes": self.shared_buffers_bytes}
        if self.huge_pages in ("on", "off"):
            numbers["huge_pages"] = int(self.huge_pages == "on")
        return numbers


def buffer_fit(conn: psycopg.Connection, schema: str) -> BufferFit:
    row = conn.execute(_SQL, {"schema": schema, **_INDEX_NAMES}).fetchone()
    assert row is not None  # an aggregate: always one row
    return BufferFit(int(row[0]), int(row[1]), row[2])


def check_buffer_fit(conn: psycopg.Connection, schema: str, where: str) -> BufferFit | None:
    """The fit, logged as a warning when the index does not fit; None when the server would not say
    (a diagnostic: it never keeps a replica from starting, nor a standby from taking reads)."""
    try:
        fit = buffer_fit(conn, schema)
    except psycopg.Error as exc:
        log.warning("could not check whether the HNSW index fits in shared_buffers",
                    extra={"where": where, "error": f"{type(exc).__name__}: {str(exc).strip()[:200]}"})
        return None
    if not fit.fits:
        log.warning("the pgvector HNSW index is larger than shared_buffers: searches read its pages from outside "
                    "PostgreSQL's buffers (2.3-2.6x as slow at 1M faces); set shared_buffers above the index size "
                    "(README, 'PostgreSQL settings for a large gallery')",
                    extra={"where": where, **fit.fields()})
    return fit
