"""Prometheus metrics, on a registry of our own (no global state shared between app instances)."""

from __future__ import annotations

import datetime
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..gallery.api import ReadTarget
from ..gallery.embedded.index import FALLBACKS

# the *_created series double the output and no dashboard uses them
disable_created_metrics()

MAX_KEPT_CHILDREN = 1024  # (route, method, status) children kept by observe_request
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SCORE_SHIFT_BUCKETS = (-0.5, -0.3, -0.2, -0.1, -0.05, -0.02, 0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


class SearchFallbacks(Collector):
    """Searches the vector index answered by a fallback, by kind: counted by the gallery (its
    ``stats()``, ``index_search_<kind>``), copied here at each scrape (0 on backends that never fall back)."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(FALLBACKS, 0)

    def update(self, stats: dict[str, int]) -> None:
        self.counts = {kind: stats.get(f"index_search_{kind}", 0) for kind in FALLBACKS}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "face_index_search_fallbacks", "Index searches answered by a fallback: capped (asked for more faces "
            "than live) or exact (the HNSW graph could not return k faces; the live faces were scanned)",
            labels=["kind"])
        for kind, count in self.counts.items():
            family.add_metric([kind], count)
        yield family


class SnapshotWriters(Collector):
    """Forked index snapshot writers killed after FACE_SNAPSHOT_TIMEOUT_S (embedded backend; counted by the
    galleries, ``stats()`` ``snapshot_writers_killed``, copied here at each scrape; 0 on postgres)."""

    def __init__(self) -> None:
        self.killed = 0

    def update(self, stats: dict[str, int]) -> None:
        self.killed = stats.get("snapshot_writers_killed", 0)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "face_index_snapshot_writers_killed", "Index snapshot writers (forked children) killed for running past "
            "FACE_SNAPSHOT_TIMEOUT_S; the next snapshot of that collection is written in-process")
        family.add_metric([], self.killed)
        yield family


class DataDirDisk(Collector):
    """The embedded gallery's disk, read at each scrape: its free and total bytes, to alert on before
    writes are refused (507 ``storage_full``). ``path`` is set by the service on the embedded backend;
    nothing on PostgreSQL (its disk is the database host's)."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def collect(self) -> Iterator[Metric]:
        if self.path is None:
            return
        try:
            usage = shutil.disk_usage(self.path)
        except OSError:
            return
        free = GaugeMetricFamily("face_data_dir_free_bytes", "Bytes free on the data dir's file system (for this "
                                 "process; below what writes need, they are answered 507 storage_full)")
        free.add_metric([], usage.free)
        yield free
        size = GaugeMetricFamily("face_data_dir_size_bytes", "Size of the data dir's file system")
        size.add_metric([], usage.total)
        yield size


class RetentionOverdue(Collector):
    """Each collection with a retention: how long the oldest face it still holds past its retention has
    waited since it expired, as the sweeper's schedule knows (``retention.Schedule.overdue_s``), read at
    each scrape. About a second at most while erasure keeps up; growing while a collection's erasure
    fails (its database away, its disk full) or the sweeper stalls: what to alert on, as the count of
    erased faces cannot say. ``source`` is set by the service's sweeper; nothing before."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, float]] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.source is None:
            return
        family = GaugeMetricFamily(
            "face_retention_overdue_seconds", "Seconds since the oldest face a collection still holds past its "
            "retention_days expired (0: none; about a second while the sweeps keep up)", labels=["collection"])
        for name, seconds in sorted(self.source().items()):
            family.add_metric([name], round(seconds, 3))
        yield family


class DatabaseMemory(Collector):
    """PostgreSQL's shared buffers against the gallery's HNSW indexes (gallery/postgres/memory.py): the
    indexes' size and each database's ``shared_buffers`` (the primary's from the gallery's ``stats()``,
    copied here at each scrape; each standby's as its read target last read it) and whether its shared
    memory is on huge pages. A search whose index does not fit reads most pages from outside the buffers
    (2.3-2.6x as slow at 1M faces): alert on ``face_database_hnsw_index_bytes`` above a
    ``face_database_shared_buffers_bytes``. Nothing on the embedded backend."""

    KEYS = ("hnsw_index_bytes", "shared_buffers_bytes", "huge_pages")

    def __init__(self, read_targets: ReadTargetsCollector) -> None:
        self.read_targets = read_targets
        self.primary: dict[str, int] = {}

    def update(self, stats: dict[str, int]) -> None:
        self.primary = {key: stats[key] for key in self.KEYS if key in stats}

    def collect(self) -> Iterator[Metric]:
        if "hnsw_index_bytes" not in self.primary:
            return
        index = GaugeMetricFamily("face_database_hnsw_index_bytes", "Size of the gallery's pgvector HNSW indexes "
                                  "(every dimension's), as the primary has them")
        index.add_metric([], self.primary["hnsw_index_bytes"])
        buffers = GaugeMetricFamily("face_database_shared_buffers_bytes", "PostgreSQL's shared_buffers, by database "
                                    "(searches are 2.3-2.6x as slow when the HNSW index is larger)",
                                    labels=["target", "role"])
        huge = GaugeMetricFamily("face_database_huge_pages", "1 while the database's shared memory is on huge "
                                 "pages (huge_pages_status, PostgreSQL 17+)", labels=["target", "role"])
        memories = [("primary", "primary", self.primary)] + [
            (t.name, t.role, t.memory) for t in self.read_targets.source() if t.role == "standby" and t.memory]
        for name, role, memory in memories:
            if "shared_buffers_bytes" in memory:
                buffers.add_metric([name, role], memory["shared_buffers_bytes"])
            if "huge_pages" in memory:
                huge.add_metric([name, role], memory["huge_pages"])
        yield from (index, buffers, huge)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "face_http_requests_total", "HTTP requests by route, method and status",
            ["route", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "face_http_request_duration_seconds", "HTTP request latency by route",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.embeddings = Counter(
            "face_embeddings_computed_total", "Face embeddings computed by the model", registry=self.registry
        )
        self.batch_size = Histogram(
            "face_inference_batch_size", "Faces per session run (dynamic batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "face_inference_seconds", "Seconds per session run", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.detect_seconds = Histogram(
            "face_detect_seconds", "Seconds per photo for face detection", buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.faces_detected = Counter("face_faces_detected_total", "Faces found in photos", registry=self.registry)
        self.errors = Counter(
            "face_errors_total", "Error responses by code", ["code"], registry=self.registry
        )
        self.connections_closed = Counter(
            "face_http_connections_closed", "Connections the server closed on a client, by reason: idle (no byte of a "
            "request in FACE_HTTP_HEADER_TIMEOUT_S), headers (not all of them in it), body (a stalled body, "
            "FACE_HTTP_BODY_TIMEOUT_S), headers_too_large (over FACE_HTTP_MAX_HEADER_BYTES: answered 431; or a "
            "chunked body's trailer), invalid (a request the HTTP parser refused: answered 422 invalid_request)",
            ["reason"], registry=self.registry,
        )
        self.retention_erased = Counter(
            "face_retention_erased_faces", "Faces erased by their collection's retention (retention_days), by "
            "collection", ["collection"], registry=self.registry,
        )
        self.gallery_identities = Gauge("face_gallery_identities", "Enrolled identities", registry=self.registry)
        self.gallery_faces = Gauge("face_gallery_faces", "Enrolled faces", registry=self.registry)
        self.collections_damaged = Gauge(
            "face_collections_damaged", "Collections whose stored data was found damaged (their requests are "
            "answered 503 collection_damaged): embedded, until their files are read whole again; PostgreSQL, whose "
            "reads met damaged data since this replica started", registry=self.registry)
        self.read_targets = ReadTargetsCollector()
        self.registry.register(self.read_targets)
        self.database_memory = DatabaseMemory(self.read_targets)
        self.registry.register(self.database_memory)
        self.search_fallbacks = SearchFallbacks()
        self.registry.register(self.search_fallbacks)
        self.snapshot_writers = SnapshotWriters()
        self.registry.register(self.snapshot_writers)
        self.data_dir_disk = DataDirDisk()
        self.registry.register(self.data_dir_disk)
        self.retention_overdue = RetentionOverdue()
        self.registry.register(self.retention_overdue)
        # shadow traffic after a migration (service/jobs/shadow.py)
        self.shadow_identify = Counter(
            "face_shadow_identify", "Identify probe faces on a migrated collection run again on its new collection",
            ["source", "target"], registry=self.registry,
        )
        self.shadow_agreement = Counter(
            "face_shadow_top1_agreement", "Shadowed probe faces by whether the new collection's top-1 identity is "
            "the old one's", ["source", "target", "agree"], registry=self.registry,
        )
        self.shadow_score_shift = Histogram(
            "face_shadow_score_shift", "Shadowed probe faces: the new collection's top score minus the old one's",
            ["source", "target"], buckets=SCORE_SHIFT_BUCKETS, registry=self.registry,
        )
        self.shadow_dropped = Counter(
            "face_shadow_dropped", "Identify requests not shadowed: the shadow queue was full (FACE_SHADOW_QUEUE) "
            "or the shadow run failed", registry=self.registry,
        )
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self.tls_expiry: Gauge | None = None  # made when the service serves HTTPS (absent, not 0, without)

    def observe_detection(self, faces: int, seconds: float) -> None:
        self.faces_detected.inc(faces)
        self.detect_seconds.observe(seconds)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request: counted by route, method and status, timed by route and method. The
        labelled children are kept (``labels()`` validates, joins and locks on every call)."""
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(route, method, str(status)), self.latency.labels(route, method))
            if len(self._request_children) < MAX_KEPT_CHILDREN:  # methods are the client's to spell
                self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_connection_closed(self, reason: str) -> None:
        """A connection the server closed on its client (http/connections.py): ``reason`` idle, headers, body,
        headers_too_large or invalid."""
        self.connections_closed.labels(reason).inc()

    def observe_tls_certificate(self, not_after: datetime.datetime) -> None:
        """The served certificate's expiry (http/tls.py), at start and at each reload: alert on it."""
        if self.tls_expiry is None:
            self.tls_expiry = Gauge("face_tls_certificate_expiry_timestamp_seconds", "When the certificate the "
                                    "service serves HTTPS with expires (Unix time; FACE_TLS_CERT_FILE)",
                                    registry=self.registry)
        self.tls_expiry.set(not_after.timestamp())

    def observe_batch(self, size: int, seconds: float) -> None:
        self.embeddings.inc(size)
        self.batch_size.observe(size)
        self.inference_seconds.observe(seconds)


class ReadTargetsCollector(Collector):
    """Per database that gallery reads go to (the PostgreSQL primary and each standby): reads served,
    and for standbys their replay lag, whether they are in rotation, reads they were too far behind
    for, and failures. Read from the gallery at each scrape; nothing when there are no standbys."""

    def __init__(self) -> None:
        self.source: Callable[[], list[ReadTarget]] = list

    def collect(self) -> Iterator[Metric]:
        targets = self.source()
        if not targets:
            return
        reads = CounterMetricFamily("face_database_reads", "Gallery reads served, by database", labels=["target", "role"])
        lag = GaugeMetricFamily("face_database_standby_lag_seconds", "Standby replay lag behind the primary "
                                "(NaN: not reached)", labels=["standby"])
        rotation = GaugeMetricFamily("face_database_standby_in_rotation", "1 while a standby takes reads",
                                     labels=["standby"])
        behind = CounterMetricFamily("face_database_standby_behind", "Reads with a consistency token the standby "
                                     "had not replayed in time (read on the primary)", labels=["standby"])
        failures = CounterMetricFamily("face_database_standby_failures", "Reads and checks that could not reach "
                                       "a standby", labels=["standby"])
        for t in targets:
            reads.add_metric([t.name, t.role], t.reads)
            if t.role == "standby":
                lag.add_metric([t.name], float("nan") if t.lag_s is None else t.lag_s)
                rotation.add_metric([t.name], 1.0 if t.in_rotation else 0.0)
                behind.add_metric([t.name], t.behind)
                failures.add_metric([t.name], t.failures)
        yield from (reads, lag, rotation, behind, failures)
