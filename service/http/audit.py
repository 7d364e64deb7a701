"""The audit trail (admin): who changed what, when, from where; newest first, filtered, paged."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from ..access.policy import Permission
from ..errors import ErrorCode, ServiceError
from ..gallery.api import AuditQuery, InvalidAuditCursor
from .deps import StateDep, allow
from .payload import StrictRoute
from .schemas import NO_NUL, AuditOut, AuditPage, ErrorResponse

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (401, 403, 422)}
router = APIRouter(route_class=StrictRoute, tags=["audit"], responses=ERRORS)


@router.get("/audit", response_model=AuditPage, summary="The audit trail", dependencies=[allow(Permission.admin)])
async def audit(
    state: StateDep,
    collection: Annotated[str | None, Query(max_length=63, pattern=NO_NUL)] = None,
    identity_id: Annotated[str | None, Query(max_length=256, pattern=NO_NUL)] = None,
    key_id: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
    since: Annotated[float | None, Query(description="Unix time: entries at or after it")] = None,
    until: Annotated[float | None, Query(description="Unix time: entries before it")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=200, pattern=NO_NUL, description="next_cursor of the previous page")] = None,
) -> AuditPage:
    """Every change (enroll, identity delete, collection create/delete, key create/revoke), recorded in
    the transaction of the change: time, key id (never the secret), client address, request id,
    collection, identity, what changed (counts; never an image or an embedding)."""
    query = AuditQuery(collection=collection, identity_id=identity_id, key_id=key_id, since=since, until=until,
                       limit=limit + 1, cursor=cursor)
    try:
        entries = await run_in_threadpool(state.galleries.audit, query)
    except InvalidAuditCursor as exc:
        raise ServiceError(ErrorCode.invalid_request, str(exc),
                           errors=[{"field": "query.cursor", "message": str(exc)}]) from None
    more = len(entries) > limit
    entries = entries[:limit]
    return AuditPage(items=[AuditOut(**e.__dict__) for e in entries],
                     next_cursor=entries[-1].entry_id if more else None)
