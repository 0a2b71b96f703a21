"""Submitting a job to a Ray cluster through the Jobs API (`factory submit`), and reading its logs.

The spec travels as `spec.yaml` in the job's working directory and the driver runs `factory run` on the
head node. The submission id is a function of the spec, so the same spec submitted twice names the same
Ray job: a live one is never submitted again, a failed one is kept (its logs stay readable) and the next
attempt gets the next `-retryN` id and resumes the same output.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import yaml

from factory.engine.spec import JobSpec, dump_spec


def submission_id(spec: JobSpec) -> str:
    """Deterministic: the same spec submitted twice names the same Ray job, so two writers never race.

    The job name keeps it readable in the dashboard; the spec hash (which covers everything that decides
    the output bytes, source path included) keeps two different jobs of one name apart, and a short hash
    of the output URL two runs of one spec writing to different places.
    """
    where = hashlib.sha256(spec.output.url.encode()).hexdigest()[:6]
    return f"{spec.name}-{spec.content_hash()}-{where}"


def submit(spec: JobSpec, address: str, again: bool = False, wait: bool = False) -> int:
    """Submit `spec` (its local paths already absolute) unless the same job is live or done; exit code."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    base_id = submission_id(spec)
    attempt, sid = 0, base_id
    # Walk this spec's earlier submissions: a live one means no new writer; a failed one is kept
    # (its logs stay readable) and the next attempt gets the next `-retryN` id and resumes its output.
    while True:
        try:
            info = client.get_job_info(sid)
        except RuntimeError as e:
            if "404" not in str(e) and "does not exist" not in str(e):
                raise  # the cluster answered something else: say so rather than submit blindly
            break
        if not info.status.is_terminal():
            print(f"job {sid} is already {info.status.value}; not submitting it twice")
            return 0
        if info.status == JobStatus.SUCCEEDED and not again:
            print(f"job {sid} already succeeded; pass --again to run it once more (it resumes and skips done shards)")
            return 0
        attempt += 1
        sid = f"{base_id}-retry{attempt}"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spec.yaml").write_text(yaml.safe_dump(dump_spec(spec), sort_keys=False))
        try:
            client.submit_job(
                # `python` is the cluster's interpreter (the one Ray runs on), so this needs no `factory`
                # script on the driver's PATH, only the package importable where Ray is.
                entrypoint="python -m factory.cli run spec.yaml",
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
    if wait:
        while not client.get_job_status(sid).is_terminal():
            time.sleep(5)
        status = client.get_job_status(sid)
        print(f"job {sid}: {status.value}")
        return 0 if status == JobStatus.SUCCEEDED else 1
    return 0


def print_logs(job_id: str, address: str, follow: bool = False) -> int:
    """A submitted job's logs; following them ends with the job, and the exit code is then the job's."""
    from ray.job_submission import JobStatus, JobSubmissionClient

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
