"""Python client of the face embedding service: FaceClient, AsyncFaceClient, typed results, errors."""

__version__ = "0.1.0"  # its major must equal the server's (checked on the first call)

from .client import KEEP, SCAN_TIMEOUT_S, AsyncFaceClient, FaceClient, Keep  # noqa: E402
from .errors import (  # noqa: E402
    ERROR_CLASSES,
    AuthError,
    BadRequestError,
    ConflictError,
    FaceClientError,
    FaceConnectionError,
    FaceServiceError,
    IncompatibleServerError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    UnavailableError,
)
from .models import *  # noqa: E402, F403
from .models import __all__ as _models

__all__ = ["ERROR_CLASSES", "KEEP", "AsyncFaceClient", "Keep", "AuthError", "BadRequestError", "ConflictError", "FaceClient",
           "FaceClientError", "FaceConnectionError", "FaceServiceError", "IncompatibleServerError", "NotFoundError",
           "RateLimitedError", "SCAN_TIMEOUT_S", "ServerError", "UnavailableError", *_models]
