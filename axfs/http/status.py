"""The edge of the HTTP adapter: the kernel's errors as HTTP statuses, with the kernel's
reason as the message, in OpenAI's error shape (``{"error": {"message", "type",
"code"}}``), as axfs.fs.boundary makes them errnos.

The statuses follow the errnos: EINVAL 400, ENOENT 404, EBUSY and EEXIST 409, EFBIG 413,
ENOSPC 400 (the prompt can never fit: OpenAI's context-length answer), EDQUOT 429 (over
a per-user limit on tasks or tokens an hour: it passes), E2BIG 400 (a parameter over
the user's limit: it does not pass), EIO 503 (the model cannot be loaded or reached);
a journal that cannot record is 507 (its disk is full) or 503.
"""

from __future__ import annotations

import errno

from starlette.responses import JSONResponse

from axfs.errors import (
    AxfsError,
    BadInput,
    Busy,
    Exists,
    NoSpace,
    NotFound,
    NotRecorded,
    ParameterTooLarge,
    QuotaExceeded,
    TooLarge,
    Unavailable,
)

STATUS: dict[type[AxfsError], int] = {
    BadInput: 400,
    NotFound: 404,
    Busy: 409,
    Exists: 409,
    TooLarge: 413,
    NoSpace: 400,
    QuotaExceeded: 429,
    ParameterTooLarge: 400,
    Unavailable: 503,
}
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         409: "conflict_error", 410: "killed", 413: "invalid_request_error",
         429: "rate_limit_error"}
KILLED = 410  # the task was killed in the tree: the request is over, not to be retried
FAILED = 500  # the task failed after it was accepted (its error says why)


def status_of(e: AxfsError) -> int:
    if isinstance(e, NotRecorded):
        return 507 if e.errno == errno.ENOSPC else 503
    return STATUS.get(type(e), 400)


def error_body(status: int, message: str) -> dict[str, object]:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "code": status}}


def error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)
