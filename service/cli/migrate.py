"""``python -m service gallery migrate`` and ``gallery jobs``: migrating a collection to another model.

* ``migrate --collection A --model NEW --into B [--batch-size 64] [--shadow] [--no-wait]``:
  with ``--url`` (or FACE_URL) through the running service: ``POST /collections/A/migrate``, then
  ``GET /jobs/{id}`` every second, printing progress, then the job (with its report) as JSON; exit 0
  when it ends ``done``, 1 when ``failed`` or ``cancelled`` (``--no-wait``: print the job at once).
  Without a URL, in-process: the galleries and the named model are opened from the same settings as
  the server's (FACE_MODELS, FACE_CROP_KEY_FILE, FACE_DATABASE_URL / FACE_DATA_DIR) and the job runs
  here in the foreground, with the same code as the server's job runner (service/jobs). The embedded
  data dir is locked by a running server: then use ``--url``.
* ``jobs [JOB_ID]``: list the jobs (or show one), through ``--url`` or from the store.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from ..config import Settings
from ..gallery import DataDirLocked
from ..gallery.api import CollectionNotFound, Galleries, GalleryModelMismatch, GalleryUnavailable
from .backend import CommandError, cli_actor, model_identity, opened_backend, served_identities


def add_arguments(sub: Any) -> None:
    migrate = sub.add_parser("migrate", help="re-embed a keep_crops collection with another served model into a "
                             "new collection (a job: through --url, or here in the foreground)")
    migrate.add_argument("--collection", required=True, help="the source collection (or an alias of it)")
    migrate.add_argument("--model", dest="target_model", required=True, help="the served model's name (FACE_MODELS)")
    migrate.add_argument("--into", required=True, help="the new collection (must not exist)")
    migrate.add_argument("--batch-size", type=int, default=64, help="crops per model call (1-256, default 64)")
    migrate.add_argument("--shadow", action="store_true", help="once done, shadow /identify on the new collection")
    migrate.add_argument("--no-wait", action="store_true", help="with --url: print the job and return at once")
    jobs = sub.add_parser("jobs", help="list the jobs, or show one")
    jobs.add_argument("job_id", nargs="?")
    for command in (migrate, jobs):
        command.add_argument("--url", default=os.environ.get("FACE_URL"),
                             help="the running service (FACE_URL); unset: the store, in-process")
        command.add_argument("--api-key", default=os.environ.get("FACE_API_KEY"), help="an admin key (FACE_API_KEY)")


def _progress(job: dict[str, Any]) -> None:
    p = job.get("progress") or {}
    rate = f", {p['faces_per_s']} faces/s" if p.get("faces_per_s") else ""
    sys.stderr.write(f"\r{job['state']} {p.get('phase', '')}: identities {p.get('identities_done', 0)}/"
                     f"{p.get('identities_total', 0)}, faces {p.get('faces_done', 0)}/{p.get('faces_total', 0)}{rate}   ")
    sys.stderr.flush()


def _client(args: argparse.Namespace) -> Any:
    import httpx

    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=60)


def _answer(r: Any) -> dict[str, Any]:
    body: dict[str, Any] = r.json()
    if r.status_code >= 400:
        error = body.get("error", {})
        raise CommandError(f"{error.get('code', r.status_code)}: {error.get('message', r.text)}")
    return body


def _exit(job: dict[str, Any]) -> int:
    sys.stdout.write(json.dumps(job, indent=2) + "\n")
    return 0 if job["state"] in ("done", "queued", "running") else 1


def migrate_remote(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = _answer(c.post(f"/collections/{args.collection}/migrate", json={
            "model": args.target_model, "into": args.into, "batch_size": args.batch_size, "shadow": args.shadow}))["job"]
        while not args.no_wait and job["state"] not in ("done", "failed", "cancelled"):
            time.sleep(1.0)
            job = _answer(c.get(f"/jobs/{job['id']}"))
            _progress(job)
    sys.stderr.write("\n")
    return _exit(job)


def migrate_here(args: argparse.Namespace, settings: Settings) -> int:
    """The job in this process, in the foreground (the server's code: start_migration, run_job)."""
    from ..gallery.open import open_gallery
    from ..jobs.migrate import JobFailed, model_embed, start_migration
    from ..jobs.runner import run_job, runner_id, take
    from ..model.contract import read_contract
    from ..model.runtime import EmbeddingModel
    from ..model.serving import served_model_path

    paths = dict(settings.served_models())
    if args.target_model not in paths:
        raise CommandError(f"model_not_found: no model named {args.target_model!r} is served (FACE_MODELS: "
                           f"{', '.join(paths)})")
    path = served_model_path(settings, paths[args.target_model])
    contract = read_contract(path)
    try:
        galleries: Galleries = open_gallery(settings, *model_identity(settings), served=served_identities(settings))
    except DataDirLocked as exc:
        raise CommandError(f"{exc}: a server is running on this data dir; migrate through it with "
                           "--url URL (or FACE_URL)") from exc
    except (GalleryModelMismatch, GalleryUnavailable) as exc:
        raise CommandError(str(exc)) from exc
    try:
        model = EmbeddingModel(path, settings)
        model.initialize()
        try:
            source = galleries.resolve(args.collection)
        except CollectionNotFound:
            raise CommandError(f"collection_not_found: no collection named {args.collection!r}") from None
        try:
            job = start_migration(galleries, source, args.target_model, contract.model_id, contract.embedding_size,
                                  args.into, args.batch_size, args.shadow, cli_actor())
        except JobFailed as exc:
            raise CommandError(f"{exc.code.value}: {exc}") from None
        taken = take(galleries, job, runner_id())
        if taken is None:  # a server's runner took it first (PostgreSQL): follow it there
            raise CommandError(f"job {job.job_id} was taken by a running server; watch it with "
                               f"`python -m service gallery jobs {job.job_id} --url URL`")
        final = run_job(galleries, lambda name: model_embed(model), taken, taken.owner or "")
    finally:
        galleries.close()
    from ..http.jobs import job_out

    return _exit(job_out(final).model_dump())


def jobs_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.url:
        with _client(args) as c:
            answer = _answer(c.get(f"/jobs/{args.job_id}" if args.job_id else "/jobs"))
        sys.stdout.write(json.dumps(answer, indent=2) + "\n")
        return 0
    from ..http.jobs import job_out

    with opened_backend(settings) as galleries:
        if args.job_id:
            job = galleries.get_job(args.job_id)
            if job is None or job.state == "creating":
                raise CommandError(f"job_not_found: no job {args.job_id!r}")
            out: Any = job_out(job).model_dump()
        else:
            out = {"items": [job_out(j).model_dump() for j in galleries.list_jobs()]}
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    return 0


def main(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "jobs":
        return jobs_command(args, settings)
    if not 1 <= args.batch_size <= 256:
        raise CommandError("--batch-size is 1-256")
    return migrate_remote(args) if args.url else migrate_here(args, settings)
