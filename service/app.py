"""create_app(): the FastAPI application and its lifecycle.

Start-up (``initialize``): resolve and load the model (preparing the default one if needed), choose
providers, warm up, start the batcher, open the gallery. Shutdown (``finalize``): stop the batcher,
snapshot the index, close the store. Any failure at start-up stops the process with a clear log line
instead of serving half a service.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sqlite3
import threading
import time
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import __version__
from .access.keys import PepperFileError
from .access.policy import scoped_admin_keys
from .config import ModelConfigError, Settings, get_settings
from .errors import ErrorCode, ServiceError
from .faces.detection import AlignmentTemplate, FaceDetector, YuNetConfig, YuNetDetector, template_for
from .gallery import GalleryLoading, retention
from .gallery.api import (
    CatalogDamaged,
    CollectionDamaged,
    Galleries,
    GalleryBusy,
    GalleryUnavailable,
    StorageFull,
    WriteOutcomeUnknown,
)
from .gallery.crops import CropKeyError
from .gallery.embedded.lock import DataDirLocked, DataDirUnusable
from .gallery.embedded.sqlite import is_damaged
from .gallery.embedded.store import StoreDamaged, damage_in
from .gallery.open import open_gallery
from .gallery.search import GalleryModelMismatch
from .http import aliases, audit, collections, faces, hygiene, identities, jobs, keys, ops, recognition
from .http.cluster import router as cluster_router
from .http.connections import REFUSED_ON_THE_WIRE
from .http.console import mount_console
from .http.deps import collection_path
from .http.docs import install_docs
from .http.middleware import (
    AccessMiddleware,
    BodyLimitMiddleware,
    ConsistencyMiddleware,
    DisconnectMiddleware,
    ForwardedMiddleware,
    HeadMiddleware,
    OriginMiddleware,
    StartupRefusalMiddleware,
    record_error,
)
from .http.payload import validation_error as invalid
from .jobs.runner import JobRunner, shadow_pairs
from .jobs.scan import DUPLICATES, OUTLIERS
from .jobs.store import JobRecord
from .model.batcher import DynamicBatcher
from .model.calibration import CalibrationError
from .model.contract import ContractError
from .model.files import others_may_read
from .model.fp16 import Fp16Error
from .model.registry import ModelRegistry, ServedModel
from .model.runtime import EmbeddingModel, ProviderError
from .model.serving import check_model_files, served_model_path
from .ops.logging import Throttle
from .ops.memory import limit_malloc_arenas
from .ops.metrics import Metrics
from .state import ServiceState

log = logging.getLogger(__name__)

# start-up failures the operator can fix from what they say (a missing GPU, a data dir in use or not
# writable, a store file that is no database, a damaged catalog, a model file or its metadata, a
# gallery of another model, a database not reachable, a pepper or crop key file): logged as one line,
# ``could not start: ...``, without the stack a bug needs
STARTUP_REFUSALS: tuple[type[BaseException], ...] = (
    ModelConfigError, ProviderError, ContractError, CalibrationError, Fp16Error, PepperFileError, DataDirLocked,
    DataDirUnusable, StoreDamaged, CatalogDamaged, GalleryModelMismatch, GalleryUnavailable, CropKeyError,
)
# ... and a damaged page of the data dir read at start-up outside a store's own checks (the catalog
# and the collections' stores name their own file): named by damage_in
REFUSED_OR_DAMAGED: tuple[type[BaseException], ...] = (*STARTUP_REFUSALS, sqlite3.DatabaseError)

DESCRIPTION = """
Face embeddings, 1:1 verification and 1:N open-set identification, on aligned 112x112 faces or on
whole photos (faces detected with YuNet and aligned to the model's template; `POST /detect` shows them).

* Images go in as base64 strings in JSON, or as files in a `multipart/form-data` upload.
* `image_type`: `aligned` (default), `photo` or `auto`; for photos `multi_face` picks the `largest`
  face, the one nearest the `center`, or (embed, identify) `all` of them. A photo with no face: `no_face`.
* Errors are JSON: `{"error": {"code": "...", "message": "...", "details": {...}}}`; `code` is stable.
* With an API key configured, send it in the `X-API-Key` header (health routes excepted).
"""


def _warmup_sizes(max_batch: int) -> list[int]:
    sizes, n = [1], 1
    while n < max_batch:
        n = min(n * 2, max_batch)
        sizes.append(n)
    return sizes


async def initialize(settings: Settings, metrics: Metrics) -> ServiceState:
    models = ModelRegistry([await _serve_model(settings, metrics, name, path, default=index == 0)
                            for index, (name, path) in enumerate(settings.served_models())])
    default = models.default
    # FACE_DATABASE_URL chooses the backend: PostgreSQL + pgvector, else the embedded gallery, whose
    # index loads in the background (/readyz says "loading" meanwhile; the data dir is locked first)
    # it refuses (GalleryModelMismatch) a stored collection pinned to a model that is not served
    galleries = await run_in_threadpool(open_gallery, settings, default.model_id, default.dim, True,
                                        models.model_ids())
    metrics.read_targets.source = galleries.read_targets  # standbys' lag and reads on /metrics
    if settings.database_url is None:  # the embedded gallery's disk on /metrics (face_data_dir_free_bytes)
        metrics.data_dir_disk.path = settings.data_dir
        if (mode := others_may_read(settings.data_dir)) is not None:  # the operator's choice, said once
            log.warning("data dir readable by other users", extra={
                "data_dir": str(settings.data_dir), "mode": mode,
                "hint": "it holds faces' embeddings, key hashes and the audit trail: chmod 700 it (the service "
                        "makes a new data dir so)"})
    detector = await run_in_threadpool(_detector, settings) if any(m.template for m in models) else None
    state = ServiceState(settings=settings, model=default.model, batcher=default.batcher, galleries=galleries,
                         metrics=metrics, detector=detector, template=default.template, models=models)
    for setting, secret in (("FACE_CROP_KEY_FILE", settings.crop_key_file),
                            ("FACE_KEY_PEPPER_FILE", settings.key_pepper_file)):
        if secret is not None and (mode := others_may_read(secret)) is not None:  # both read by now: they exist
            log.warning("secret file readable by other users", extra={
                "setting": setting, "file": str(secret), "mode": mode, "hint": "chmod 600 it"})
    # migrations: queued ones, and those a stopped runner left; a finished shadow one starts its shadow traffic
    for source, target, pointing in await run_in_threadpool(shadow_pairs, galleries):
        state.shadow.start(source, target, pointing)
    state.shadow.follow(lambda: shadow_pairs(galleries), settings.shadow_refresh_s)  # those other replicas ran
    state.jobs = JobRunner(galleries, models, stale_s=settings.job_stale_s, on_done=lambda job: _shadow_done(state, job),
                           scans={DUPLICATES: hygiene.duplicates_scan(state), OUTLIERS: hygiene.outliers_scan(state)})
    state.jobs.start()
    await run_in_threadpool(_warn_of_scoped_admin_keys, galleries)
    if await run_in_threadpool(state.keyring.open_mode):
        log.warning("no API key configured (FACE_API_KEY unset, none stored): the service is open to anyone who "
                    "reaches it; make the first admin key with `python -m service keys create --role admin`")
    return state


def _warn_of_scoped_admin_keys(galleries: Galleries) -> None:
    """Names the stored scoped admin keys (refused whenever used: access/policy.py). Keys that cannot be
    read now (a damaged catalog, the database away) are no reason not to start: their reads answer 503."""
    try:
        keys = galleries.list_keys()
    except (CatalogDamaged, GalleryUnavailable) as exc:
        log.warning("the stored keys could not be read at start-up to look for scoped admin keys",
                    extra={"reason": str(exc)[:200]})
        return
    if scoped_admins := scoped_admin_keys(keys, time.time()):
        log.warning("scoped admin keys are refused", extra={
            "keys": scoped_admins, "hint": "an admin key cannot be scoped (its routes reach every collection): "
                                           "revoke these and make write keys scoped to their collections"})


def _shadow_done(state: ServiceState, job: JobRecord) -> None:
    """A migrate job with ``shadow`` that ended ``done``: its source's /identify is shadowed on the copy."""
    if job.shadow and job.state == "done":
        pointing = [a.name for a in state.galleries.list_aliases() if a.collection == job.collection]
        state.shadow.start(job.collection, job.into, pointing)


async def _serve_model(settings: Settings, metrics: Metrics, name: str, configured: Path | None,
                       default: bool) -> ServedModel:
    """One configured model loaded, warmed up, with its batcher started and its photo template."""
    model_path = await run_in_threadpool(served_model_path, settings, configured)
    model = EmbeddingModel(model_path, settings)
    await run_in_threadpool(model.initialize)
    if settings.warmup:
        await run_in_threadpool(model.warmup, _warmup_sizes(settings.batch_max_size))
    batcher = DynamicBatcher(model.execute_prepared, settings.batch_max_size, settings.batch_max_wait_ms,
                             workers=settings.batch_workers, on_batch=metrics.observe_batch, prepare=model.prepare,
                             timeout_s=settings.inference_timeout_ms / 1000,
                             max_queued_faces=settings.batch_max_queued_faces)
    await batcher.start()
    log.info("model served", extra={"model": name, "model_id": model.contract.model_id, "default": default})
    return ServedModel(name, model, batcher, settings, _template(model.contract.alignment), default=default)


def _photo_support(settings: Settings, alignment: str) -> tuple[FaceDetector | None, AlignmentTemplate | None]:
    """The detector and the crop template for photos; a model aligned some other way serves crops only."""
    template = _template(alignment)
    return (_detector(settings), template) if template is not None else (None, None)


def _template(alignment: str) -> AlignmentTemplate | None:
    """The crop template of a model's alignment; None: that model serves aligned crops only."""
    try:
        return template_for(alignment)
    except ValueError:
        log.warning("photos disabled: no template for the model's alignment", extra={"alignment": alignment})
        return None


def _detector(settings: Settings) -> FaceDetector:
    detector = YuNetDetector(YuNetConfig(score_threshold=settings.detector_score_threshold,
                                         max_side=settings.detector_max_side))
    log.info("face detector loaded", extra={"detector": detector.name})
    return detector


async def finalize(state: ServiceState) -> None:
    if state.jobs is not None:
        await run_in_threadpool(state.jobs.stop)
    await state.shadow.close()
    for served in state.models:
        await served.batcher.stop()
    await run_in_threadpool(state.keyring.flush)
    await run_in_threadpool(state.galleries.close)
    for served in state.models:
        served.model.finalize()


KEY_FLUSH_S = 5.0  # last-use times of keys are written at most this often
RETENTION_CHECK_S = 3600.0


async def _housekeeping(state: ServiceState, storage_full_log: Throttle) -> None:
    """Write keys' last use every few seconds; delete audit entries past FACE_AUDIT_RETENTION_DAYS hourly."""
    last_prune = 0.0
    while True:
        await asyncio.sleep(KEY_FLUSH_S)
        try:
            await run_in_threadpool(state.keyring.flush)
            days = state.settings.audit_retention_days
            if days > 0 and time.monotonic() - last_prune >= RETENTION_CHECK_S:
                last_prune = time.monotonic()
                pruned = await run_in_threadpool(state.galleries.prune_audit, time.time() - days * 86400)
                if pruned:
                    log.info("audit entries past retention deleted", extra={"entries": pruned, "days": days})
        except StorageFull as exc:  # keys' last use waits for space (a line a minute, not one each flush)
            if (left_out := storage_full_log.due()) is not None:
                log.error("gallery storage full", extra={"reason": str(exc), "during": "housekeeping",
                                                         "left_out": left_out})
        except CatalogDamaged as exc:  # what it found: the keys' last use is not recorded meanwhile
            log.warning("housekeeping failed: catalog damaged", extra={"reason": str(exc)})
        except Exception:  # noqa: BLE001 - housekeeping retries; the database may be away for a while
            log.warning("housekeeping failed", exc_info=True)


async def _retention_sweeps(state: ServiceState, stop: threading.Event, woken: asyncio.Event) -> None:
    """Erase the faces past their collection's retention, in the rounds of a retention.Schedule: each
    timed for the soonest expiry, sweeping the collections due, and every FACE_RETENTION_SWEEP_S all.
    Stopping: ``stop`` set (the sweep in flight returns after its current erasure) and ``woken`` (the wait
    between sweeps ends): not cancelled, which would leave its thread erasing while the galleries close."""
    schedule = retention.Schedule(every_s=state.settings.retention_sweep_s)
    state.metrics.retention_overdue.source = lambda: schedule.overdue_s(time.time())
    while not stop.is_set():
        wait = state.settings.retention_sweep_s
        try:
            swept = await run_in_threadpool(schedule.round, state.galleries, None, stop)
        except Exception:  # noqa: BLE001 - the list of collections could not be read: tried again next time
            log.warning("retention sweep failed", exc_info=True)
        else:
            for name, erased in swept.erased.items():
                state.metrics.retention_erased.labels(name).inc(erased)
                log.info("faces past retention erased", extra={"collection": name, "faces": erased,
                                                               "identities_deleted": swept.identities_deleted[name]})
            for name, reason in swept.failed.items():
                log.warning("retention sweep of a collection failed", extra={"collection": name, "reason": reason})
            wait = schedule.wait_s(time.time())
        with suppress(TimeoutError):
            await asyncio.wait_for(woken.wait(), wait)


def _error_response(error: ServiceError, request: Request) -> JSONResponse:
    record_error(request.scope, error.code)  # counted and logged by the access middleware
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost (or 0.0.0.0 / ::, every interface)


SHORT_API_KEY = 16  # FACE_API_KEY shorter than this is warned of (the keys made here have 43 random characters)


def warn_if_exposed(settings: Settings) -> None:
    """Anyone who can reach a non-loopback interface can use (and empty) the gallery without a key, and
    one short enough to guess is little better."""
    if settings.api_key is None and not _is_loopback(settings.host):
        log.warning("serving without an API key on a non-loopback address: anyone who reaches it can read, "
                    "enroll and delete identities; set FACE_API_KEY", extra={"host": settings.host})
    length = len(settings.api_key.get_secret_value()) if settings.api_key is not None else SHORT_API_KEY
    if length < SHORT_API_KEY:
        log.warning(f"FACE_API_KEY has {length} characters: a key that short can be guessed; use 32 or more random "
                    "characters, or keys made by `python -m service keys create` (43 random characters)")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    check_model_files(settings)  # a configured model file that is not there: refuse now (ModelConfigError)
    limit_malloc_arenas(settings.malloc_arena_max)  # before the server's worker threads allocate
    warn_if_exposed(settings)
    metrics = Metrics()
    storage_full_log = Throttle(60.0)  # a full disk refuses every write: one log line a minute says so

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            state = await initialize(settings, metrics)
        except REFUSED_OR_DAMAGED as exc:  # the operator's to fix: one line says what (no stack)
            refusal = exc
            if isinstance(exc, sqlite3.DatabaseError):  # a damaged page of the data dir, read at start-up
                if settings.database_url is not None or not is_damaged(exc):
                    raise
                refusal = await run_in_threadpool(damage_in, settings.data_dir, exc)
            log.error("could not start: %s", refusal, extra={"reason": type(refusal).__name__})
            app.state.startup_refused = str(refusal)
            if refusal is exc:
                raise
            raise refusal from exc
        app.state.service = state
        housekeeping = asyncio.create_task(_housekeeping(state, storage_full_log))
        stop_sweeps, wake_sweeps = threading.Event(), asyncio.Event()
        sweeps = asyncio.create_task(_retention_sweeps(state, stop_sweeps, wake_sweeps))
        log.info("service ready", extra={"model_id": state.contract.model_id, "providers": state.model.providers,
                                         "models": state.models.names(),
                                         "data_dir": str(settings.data_dir)})
        try:
            yield
        finally:
            app.state.service = None
            housekeeping.cancel()
            stop_sweeps.set()  # a sweep in flight ends after its current erasure, before the galleries close
            wake_sweeps.set()
            await asyncio.gather(sweeps, return_exceptions=True)  # whatever it raised, the galleries still close
            await finalize(state)
            log.info("service stopped")

    app = FastAPI(title="Face embedding service", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None,  # install_docs: behind the key if set
                  # operation ids are the routes' names (`enroll`, `list_identities`): what generated clients
                  # name their functions and body models by (FastAPI's default is `enroll_enroll_post`)
                  generate_unique_id_function=lambda route: route.name)
    app.state.metrics = metrics
    app.state.service = None

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        return _error_response(exc, request)

    @app.exception_handler(GalleryLoading)
    async def gallery_loading(request: Request, exc: GalleryLoading):
        code = ErrorCode.gallery_unavailable if exc.failed else ErrorCode.gallery_loading
        return _error_response(ServiceError(code, str(exc)), request)

    @app.exception_handler(GalleryUnavailable)
    async def gallery_unavailable(request: Request, exc: GalleryUnavailable):
        # the database is down or unreachable: retryable, and /embed and face-vs-face /verify still work
        log.warning("gallery unavailable", extra={"path": request.url.path, "reason": str(exc)})
        return _error_response(ServiceError(ErrorCode.database_unavailable, "the gallery database is unavailable; "
                                            "retry later"), request)

    @app.exception_handler(WriteOutcomeUnknown)
    async def write_outcome_unknown(request: Request, exc: WriteOutcomeUnknown):
        # the connection failed while the write's COMMIT was in flight: stored or not, nobody here knows; no
        # Retry-After (a blind retry of an enroll, a merge or a move could apply it twice)
        log.warning("write outcome unknown", extra={"path": request.url.path, "reason": str(exc)})
        return _error_response(ServiceError(ErrorCode.write_outcome_unknown, "the database connection failed "
                                            "while the write was being committed: it may or may not have been "
                                            "stored. Read it back (GET the identity, collection or key) before "
                                            "sending it again"), request)

    @app.exception_handler(StorageFull)
    async def storage_full(request: Request, exc: StorageFull):
        # the data dir's disk (or the database's) is full: nothing of this write was stored; reads go on
        if (left_out := storage_full_log.due()) is not None:  # each refusal is counted on /metrics anyway
            log.error("gallery storage full", extra={"path": request.url.path, "reason": str(exc),
                                                     "left_out": left_out})
        return _error_response(ServiceError(ErrorCode.storage_full, "the gallery's storage is full: nothing was "
                                            "stored; retry once the operator has freed space"), request)

    @app.exception_handler(CollectionDamaged)
    async def collection_damaged(request: Request, exc: CollectionDamaged):
        # its store cannot be read (the backend logged which file when it found it): the others serve on
        return _error_response(ServiceError(ErrorCode.collection_damaged, f"the stored data of collection "
                                            f"{exc.collection!r} is damaged (a disk fault, a bad restore): the "
                                            "operator restores it from a backup, or deletes the collection",
                                            collection=exc.collection), request)

    catalog_damage_logged = threading.Event()

    @app.exception_handler(CatalogDamaged)
    async def catalog_damaged(request: Request, exc: CatalogDamaged):
        # the collections' and keys' records cannot be read: where, logged the first time (the access
        # log counts each refusal); what needs no catalog read serves on
        if not catalog_damage_logged.is_set():
            catalog_damage_logged.set()
            log.error("catalog damaged: the requests that read the damaged records are refused until it is "
                      "restored from a backup (python -m service backup makes one)",
                      extra={"path": request.url.path, "reason": str(exc)})
        return _error_response(ServiceError(ErrorCode.catalog_damaged, "the service's catalog (collections, keys) "
                                            "is damaged (a disk fault, a bad restore): the operator restores it "
                                            "from a backup"), request)

    @app.exception_handler(GalleryBusy)
    async def gallery_busy(request: Request, exc: GalleryBusy):
        # the database answers but this replica's connections to it are all in use (slow writes, a burst)
        log.warning("gallery database connections all in use", extra={"path": request.url.path, "reason": str(exc)})
        return _error_response(ServiceError(ErrorCode.overloaded, "every database connection is in use; retry "
                                            "shortly"), request)

    @app.exception_handler(ClientDisconnect)
    async def client_disconnect(request: Request, exc: ClientDisconnect):
        # the client went away (or was cut at the body deadline) before its body came: no fault of the
        # service's, and nobody reads the answer; 499 "client closed request", as nginx logs it
        refused = request.scope.get(REFUSED_ON_THE_WIRE)
        if refused is not None:  # its body was refused by the HTTP parser, answered by the connection itself
            return _error_response(refused, request)  # (counted and logged as that refusal; nobody reads it)
        log.info("client went away before its request's body came", extra={"path": request.url.path})
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error_response(invalid(exc.errors()), request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: ErrorCode.not_found, 405: ErrorCode.method_not_allowed}.get(exc.status_code, ErrorCode.invalid_request)
        error = ServiceError(code, str(exc.detail))
        response = _error_response(error, request)
        response.status_code = exc.status_code
        if exc.headers:  # e.g. Allow on a 405
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        log.exception("unhandled error", extra={"path": request.url.path,
                                                "request_id": request.scope.get("state", {}).get("request_id")})
        return _error_response(ServiceError(ErrorCode.internal_error, "internal error; see the server log"), request)

    app.include_router(ops.router)
    app.include_router(faces.router)
    app.include_router(cluster_router)  # POST /cluster: no gallery, so unprefixed only
    app.include_router(keys.router)
    app.include_router(audit.router)
    app.include_router(collections.router)
    app.include_router(aliases.router)
    app.include_router(jobs.router)
    # the gallery routes: unprefixed for the `default` collection (every client of before keeps working),
    # and the same routes under /collections/{collection}
    for router in (recognition.router, identities.router, hygiene.router):
        app.include_router(router)
        app.include_router(router, prefix="/collections/{collection}", dependencies=[Depends(collection_path)],
                           generate_unique_id_function=lambda route: f"collection_{route.name}")
    mount_console(app, settings)  # the web console at /console (static pages; their API calls carry the key)
    install_docs(app, settings)
    app.add_middleware(HeadMiddleware)  # innermost: the access log and the origin check see HEAD
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(DisconnectMiddleware)
    if settings.read_urls():  # read-your-writes on standbys (the Face-Consistency-Token header)
        app.add_middleware(ConsistencyMiddleware)
    # Host, Origin and CORS: before anything else reads the request (inside the access log, which counts refusals)
    app.add_middleware(OriginMiddleware, allowed_hosts=settings.allowed_hosts, cors_origins=settings.cors_origins,
                       open_mode=settings.api_key is None, api_key_header=settings.api_key_header)
    app.add_middleware(AccessMiddleware, metrics=metrics, hsts=settings.tls_cert_file is not None)
    app.add_middleware(StartupRefusalMiddleware)
    if settings.trusted_proxies:  # outermost: whoever reads request.client reads the forwarded client
        app.add_middleware(ForwardedMiddleware, trusted_proxies=settings.trusted_proxies)
    return app
