"""The domain errors of the image engine.

Each one carries a message a user can act on. The service maps them to HTTP status codes in one place
(`status_code` is the suggested code); the CLI prints the message on one line.
"""


class DiffusionAPIError(Exception):
    """Base class of the errors a caller is told about: its message says what went wrong and what to do. Most
    are about the request (4xx); a few are the service's own failures (5xx: a model that does not load, an
    out-of-memory run, an unreachable storage), reported with their message all the same."""

    status_code = 400

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def __reduce__(self):
        # Keep the field when the error crosses a process boundary (Ray pickles exceptions).
        return (_rebuild_error, (type(self), self.message, self.field))


def _rebuild_error(cls: type[DiffusionAPIError], message: str, field: str | None) -> DiffusionAPIError:
    return cls(message, field=field)


class InvalidRequestError(DiffusionAPIError):
    """A request field has a value the engine cannot use."""

    status_code = 422


class InvalidNameError(DiffusionAPIError):
    """A name that could escape its folder (`..`, absolute path, NUL byte). No installed file has such a name,
    so it is a 404 like any other unknown name, with a message that says why."""

    status_code = 404


class UnknownModelError(DiffusionAPIError):
    """No checkpoint with that name or label."""

    status_code = 404


class UnknownSamplerError(DiffusionAPIError):
    """A sampler or schedule type name that does not exist."""

    status_code = 422


class BadImageError(DiffusionAPIError):
    """An input image that cannot be decoded."""

    status_code = 422


class ModelLoadError(DiffusionAPIError):
    """A checkpoint that was found but could not be loaded."""

    status_code = 500


class ServiceBusyError(DiffusionAPIError):
    """Too many jobs are already waiting for this kind of model; the caller should retry later (429 with
    Retry-After: the service is healthy, its callers have queued all the work it accepts for now)."""

    status_code = 429
    retry_after_s = 5


class ForbiddenError(DiffusionAPIError):
    """The caller's key may not do this (service-wide settings, other keys' jobs: admin keys only)."""

    status_code = 403


class LimitReachedError(ServiceBusyError):
    """A limit on queued work or submissions is reached (the caller key's own, or its model family's); the
    answer names it (`limit`) and when a retry may pass (429 with Retry-After)."""

    def __init__(self, message: str, *, limit: str, retry_after_s: int, field: str | None = None):
        super().__init__(message, field=field)
        self.limit = limit
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (_rebuild_limit, (self.message, self.limit, self.retry_after_s))


def _rebuild_limit(message: str, limit: str, retry_after_s: int) -> "LimitReachedError":
    return LimitReachedError(message, limit=limit, retry_after_s=retry_after_s)


class TemporarilyUnavailableError(ServiceBusyError):
    """Something the request depends on cannot answer now (a webhook host's name lookup timed out); the same
    request may succeed in a moment (503 with Retry-After)."""

    status_code = 503
    retry_after_s = 5


class UnknownJobError(DiffusionAPIError):
    """No such job, or one of another API key (the same answer, so its existence is not confirmed)."""

    status_code = 404


class IdempotencyKeyReusedError(DiffusionAPIError):
    """An Idempotency-Key the caller already used for another request (a retry must send the same request)."""

    status_code = 422


class JobEndedError(DiffusionAPIError):
    """The job has already ended: there is nothing to cancel."""

    status_code = 409


class JobNotFinishedError(DiffusionAPIError):
    """The job has no image: it has not finished, or it ended without one."""

    status_code = 409


class JobCancelledError(DiffusionAPIError):
    """The job was cancelled (DELETE /queue/{id}); raised at the next step boundary."""

    status_code = 409


class OutOfMemoryError(DiffusionAPIError):
    """The accelerator ran out of memory for this job; the replica frees what it can and keeps serving."""

    status_code = 507
