"""Failures by kind, and how they are told to the user.

A data problem (`BadSample`: a corrupt input, an unknown class, a model output that fails its checks) is
recorded on its sample and committed with the shard. Everything else is infrastructure (storage down,
bad credentials, a full disk, a dead worker, a bug): retried with backoff a bounded number of times;
if it persists, the shard stays uncommitted, the job ends non-zero, and a rerun retries it.

`describe` turns any exception (also one wrapped by Ray) into one line and the advice that goes with
it, so a failure ends with one `factory:` line instead of a traceback.
"""

from __future__ import annotations

import errno
import logging
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from factory.sample import BadSample

log = logging.getLogger("factory")
T = TypeVar("T")

RERUN = "rerun the same command: it resumes from the committed shards"


class ShardFailed(Exception):
    """A step failed on a shard for a reason that is not the data, after its retries."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"{stage}: {one_line(cause)}")
        self.stage = stage
        self.cause = cause


class FactoryError(Exception):
    """A failure whose message already says what happened and what to do: told to the user as it is.

    Subclasses set `advice` (what `advice()` returns for them); the message is the whole story.
    """

    advice = RERUN


class ResumeError(FactoryError, RuntimeError):
    """The output already holds a different job: another spec, or other weights under the same spec."""


class JobIncomplete(FactoryError, RuntimeError):
    """The job ended with shards that failed (after their retries) and stay uncommitted."""


class StageSetupFailed(FactoryError, RuntimeError):
    """A stage could not start on a worker: its model, device or packages failed to load there."""

    advice = f"fix what the stage loads on that node (its model files, its device, its packages), then {RERUN}"

    def __init__(self, stage: str, where: str, cause: str):
        super().__init__(f"stage {stage} could not start on {where}: {cause}")
        self.stage, self.where, self.cause_text = stage, where, cause

    def __reduce__(self):  # rebuilt from its parts where Ray hands it to the driver
        return type(self), (self.stage, self.where, self.cause_text)


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain, through Ray's wrappers (RayTaskError.cause, the creation task's
    error an ActorDiedError carries) and __cause__; it stops at a FactoryError, whose message is the story."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = _inner(exc)
        if inner is None:
            break
        exc = inner
    return exc


def _inner(exc: BaseException) -> BaseException | None:
    inner = getattr(exc, "cause", None)  # Ray's RayTaskError (which also subclasses what it wraps)
    if isinstance(inner, BaseException):
        return inner
    if isinstance(exc, FactoryError):
        return None
    wrapped = next((a for a in exc.args if isinstance(a, BaseException)), None)
    if wrapped is not None:
        return wrapped
    # Ray Data chains an empty marker as the cause of what it raises: it tells nothing of what happened.
    if isinstance(exc.__cause__, BaseException) and not isinstance(exc.__cause__, _ray_data_markers()):
        return exc.__cause__
    return None


def _ray_data_markers() -> tuple[type, ...]:
    return _types("ray.data.exceptions", "SystemException", "UserCodeException")


def one_line(exc: BaseException, limit: int = 300) -> str:
    exc = root_cause(exc)
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:limit]


def _types(module: str, *names: str) -> tuple[type, ...]:
    """Exception classes of a library, if this process has imported it: a library never imported raised
    nothing here, and importing it just to compare types would cost seconds (torch, ray)."""
    loaded = sys.modules.get(module)
    found = (getattr(loaded, name, None) for name in names) if loaded is not None else ()
    return tuple(t for t in found if isinstance(t, type))


def is_cuda_oom(exc: BaseException) -> bool:
    return isinstance(exc, _types("torch.cuda", "OutOfMemoryError"))


# botocore's ClientError carries the service's error code as data; these mean the credentials.
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "403"}


def _storage_credentials(exc: BaseException) -> bool:
    if isinstance(exc, _types("botocore.exceptions", "NoCredentialsError", "PartialCredentialsError")):
        return True
    if isinstance(exc, _types("botocore.exceptions", "ClientError")):
        return getattr(exc, "response", {}).get("Error", {}).get("Code") in _CREDENTIAL_CODES
    return False


def _unreachable() -> tuple[type, ...]:
    return (
        ConnectionError,
        *_types("botocore.exceptions", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"),
        *_types("aiohttp", "ClientConnectorError", "ServerDisconnectedError"),
    )


def advice(exc: BaseException) -> str:
    """What the user should do about an infrastructure failure, chosen by the type of its root cause (and
    the structured codes it carries), never by its message text."""
    exc = root_cause(exc)
    code = getattr(exc, "errno", None)
    if isinstance(exc, FactoryError):
        return exc.advice
    if code == errno.ENOSPC:
        return f"no space left on the device: free space, then {RERUN}"
    if isinstance(exc, PermissionError) or code in (errno.EACCES, errno.EROFS, errno.EPERM):
        return "the location is not writable: fix its permissions or pass --output elsewhere"
    # A rerun meets the same path: what helps is another one (a bucket that does not exist is one too).
    if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        return "a path the job uses is missing or of the wrong kind: fix it, or pass --output elsewhere"
    if _storage_credentials(exc):
        return "object storage refused the credentials: check key/secret (or AWS_* variables), then " + RERUN
    if isinstance(exc, _unreachable()):
        return f"object storage is unreachable: check the endpoint is up, then {RERUN}"
    if is_cuda_oom(exc):
        return "a single sample does not fit in GPU memory: lower the stage's resolution or give it a whole GPU"
    if isinstance(exc, MemoryError):
        return f"the process ran out of memory: lower output.shard_size or give the stage more memory, then {RERUN}"
    ray_deaths = _types(
        "ray.exceptions",
        "ActorDiedError",
        "RayActorError",
        "WorkerCrashedError",
        "NodeDiedError",
        "OutOfMemoryError",
        "ObjectLostError",
        "OwnerDiedError",
    )
    if isinstance(exc, ray_deaths):
        return f"a Ray worker or node died (see the Ray logs for why); {RERUN}"
    return RERUN


def describe(exc: BaseException) -> dict:
    return {"cause": one_line(exc), "advice": advice(exc)}


def retry(fn: Callable[[], T], what: str, attempts: int, backoff: float) -> T:
    """`fn()`, tried again after `backoff`, 2 x `backoff`, ... seconds for every exception but BadSample;
    the last failure is raised."""
    for attempt in range(attempts + 1):
        try:
            return fn()
        except BadSample:
            raise
        except Exception as e:
            if attempt == attempts:
                raise
            delay = backoff * 2**attempt
            log.warning("%s failed (%s); retry %d of %d in %.1fs", what, one_line(e), attempt + 1, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
