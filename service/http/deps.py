"""FastAPI dependencies, as ``Annotated`` aliases the routers declare in their signatures.

They are ``async def`` although they never await: FastAPI runs a plain ``def`` dependency in the
thread pool, a thread round trip per dependency per request for a few attribute reads.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from ..config import Settings
from ..errors import ErrorCode, ServiceError
from ..state import ServiceState


async def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "service", None)
    if state is None:
        raise ServiceError(ErrorCode.model_not_ready, "the service is starting or stopping")
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


def has_api_key(request: Request, settings: Settings) -> bool:
    """The request may do what the key guards: it carries the key, or the service has none."""
    if settings.api_key is None:
        return True
    given = request.headers.get(settings.api_key_header, "")
    return hmac.compare_digest(given.encode(), settings.api_key.get_secret_value().encode())


async def require_api_key(request: Request) -> None:
    # the state read directly, not as a sub-dependency (StateDep): every route runs this one, and
    # each dependency FastAPI resolves costs event-loop time on every request
    settings = (await get_state(request)).settings
    if not has_api_key(request, settings):
        raise ServiceError(ErrorCode.unauthorized, f"missing or wrong API key in header {settings.api_key_header}")


ApiKey = Depends(require_api_key)
