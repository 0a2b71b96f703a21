"""Submitting a job to a Ray cluster through the Jobs API (`factory submit`), and reading its logs.

The spec travels as `spec.yaml` in the job's working directory, beside `driver.sh`, which runs `factory
run` on the head on the interpreter Ray itself runs on. The submission id is a function of the spec, so the
same spec submitted twice names the same Ray job: a live one is never submitted again, a failed one is kept
(its logs stay readable) and the next attempt gets the next `-retryN` id and resumes the same output.

Every failure of the Jobs API ends in one `SubmitError` whose advice is about Ray (the address, the
dashboard's port, the token), never about object storage.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from factory.engine.errors import FactoryError, one_line
from factory.engine.spec import JobSpec, dump_spec, inline_credentials

# Ray's job supervisor runs the entrypoint with /bin/sh and the PATH that `ray start` had, where `python`
# may be another interpreter than Ray's (a venv used without being activated: "No module named
# 'factory'"). Ray offers the entrypoint no name for its interpreter, but the raylet starts every Python
# worker, the supervisor included, with `--python_worker_command=<interpreter> <setup_worker.py> ...`
# (ray/_private/services.py, start_raylet; list2cmdline quoting): this reads it from the nearest ancestor.
DRIVER_SH = r"""pid=$$
while [ "${pid:-0}" -gt 1 ]; do
    worker=$(tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | sed -n 's/^--python_worker_command=//p')
    if [ -n "$worker" ]; then
        case $worker in
            \"*) worker=${worker#\"}; python=${worker%%\"*} ;;
            *) python=${worker%% *} ;;
        esac
        exec "$python" -m factory.cli "$@"
    fi
    pid=$(sed -n 's/^PPid:[[:space:]]*//p' "/proc/$pid/status" 2>/dev/null)
done
echo "factory: no raylet found among this driver's parents; running the python first on PATH" >&2
exec python -m factory.cli "$@"
"""
ENTRYPOINT = "sh driver.sh run spec.yaml"

REACH = (
    "check the address (the head's dashboard, http://HEAD:8265) and that port 8265 is reachable from here "
    "(kubectl port-forward svc/factory-head-svc 8265:8265, or ray dashboard CONFIG for ray up)"
)
TOKEN = (
    "the cluster demands its Ray token: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token> (or put the token "
    "in ~/.ray/auth_token, or in a file named by RAY_AUTH_TOKEN_PATH)"
)
ANSWER = "check that the address is the head's dashboard and read its log there (/tmp/ray/session_latest/logs)"


class SubmitError(FactoryError):
    """The Ray Jobs API failed; the message names the address and the cause, and ends with what to do."""

    def __init__(self, message: str, advice: str):
        super().__init__(f"{message}; {advice}")
        self.advice = advice


@contextmanager
def _jobs_api(address: str) -> Iterator[None]:
    """Any failure of the Jobs API client inside, as a SubmitError with advice about Ray."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        raise SubmitError(f"the Ray cluster at {address} refused the request: {one_line(e)}", TOKEN) from e
    except OSError as e:  # refused, unreachable, timed out (requests' and aiohttp's errors are OSErrors)
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {one_line(e)}", REACH) from e
    except Exception as e:  # the client reports every other HTTP answer as a RuntimeError
        raise SubmitError(f"the Ray Jobs API at {address} failed: {one_line(e)}", ANSWER) from e


def submission_id(spec: JobSpec) -> str:
    """Deterministic: the same spec submitted twice names the same Ray job, so two writers never race.

    The job name keeps it readable in the dashboard; the spec hash (which covers everything that decides
    the output bytes, source path included) keeps two different jobs of one name apart, and a short hash
    of the output URL two runs of one spec writing to different places.
    """
    where = hashlib.sha256(spec.output.url.encode()).hexdigest()[:6]
    return f"{spec.name}-{spec.content_hash()}-{where}"


def _next_id(client, spec: JobSpec, again: bool) -> str | None:
    """The id to submit `spec` under, or None (said why) when a live or succeeded job already has it.

    Walks this spec's earlier submissions: a live one means no new writer; a failed one is kept (its logs
    stay readable) and the next attempt gets the next `-retryN` id and resumes its output.
    """
    from ray.job_submission import JobStatus

    base_id = submission_id(spec)
    attempt, sid = 0, base_id
    while True:
        try:
            info = client.get_job_info(sid)
        except RuntimeError as e:
            if "404" not in str(e) and "does not exist" not in str(e):
                raise  # the cluster answered something else: say so rather than submit blindly
            return sid
        if not info.status.is_terminal():
            print(f"job {sid} is already {info.status.value}; not submitting it twice")
            return None
        if info.status == JobStatus.SUCCEEDED and not again:
            print(f"job {sid} already succeeded; pass --again to run it once more (it resumes and skips done shards)")
            return None
        attempt += 1
        sid = f"{base_id}-retry{attempt}"


def submit(spec: JobSpec, address: str, again: bool = False, wait: bool = False) -> int:
    """Submit `spec` (its local paths already absolute) unless the same job is live or done; exit code.
    A spec with credentials inline is refused before the cluster is contacted: the job's package (its
    working directory, kept in the cluster's GCS and unpacked on every node) would hold them."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    inline = inline_credentials(dump_spec(spec))
    if inline:
        raise SubmitError(
            f"the spec holds credentials inline ({', '.join(inline)}), which `factory submit` would copy to the "
            "cluster in the job's package",
            "write each as env:NAME, read on every node from its own environment (the one `ray start` runs "
            "with, or a Kubernetes Secret as env), or leave them out and give the nodes AWS_* variables or an "
            "instance role",
        )

    with _jobs_api(address):
        client = JobSubmissionClient(address)
        sid = _next_id(client, spec, again)
    if sid is None:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spec.yaml").write_text(yaml.safe_dump(dump_spec(spec), sort_keys=False))
        (Path(tmp) / "driver.sh").write_text(DRIVER_SH)
        with _jobs_api(address):
            try:
                client.submit_job(
                    entrypoint=ENTRYPOINT,
                    submission_id=sid,
                    runtime_env={"working_dir": tmp},
                    metadata={"factory_job": spec.name, "spec_hash": spec.content_hash(), "output": spec.output.url},
                )
            except RuntimeError as e:
                # Two `factory submit`s racing past the check above: the cluster accepts only one of them.
                if "already exists" not in str(e):
                    raise
                print(f"job {sid} was submitted by someone else just now; not submitting it twice")
                return 0
    print(f"submitted {sid} to {address}; follow it with: factory logs {sid} --address {address} --follow")
    if not wait:
        return 0
    with _jobs_api(address):
        while not (status := client.get_job_status(sid)).is_terminal():
            time.sleep(5)
    print(f"job {sid}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def print_logs(job_id: str, address: str, follow: bool = False) -> int:
    """A submitted job's logs; following them ends with the job, and the exit code is then the job's."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    with _jobs_api(address):
        client = JobSubmissionClient(address)
        if follow:
            import asyncio

            async def tail() -> None:
                # The stream starts at the beginning of the log and ends when the job does.
                async for chunk in client.tail_job_logs(job_id):
                    print(chunk, end="", flush=True)

            asyncio.run(tail())
        else:
            print(client.get_job_logs(job_id), end="")
        status = client.get_job_status(job_id)
    print(f"[{status.value}]")
    return 1 if follow and status != JobStatus.SUCCEEDED else 0
