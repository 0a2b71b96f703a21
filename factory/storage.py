"""A folder on any fsspec filesystem (local, s3://, memory://...), and where one is named in a spec.

`Location` is the spec section every output names (`url`, `endpoint_url`, `storage_options`);
`Folder` is what the code writes through: paths under a root, JSON files, files that appear under their
final name only once complete, folder uploads and downloads. The job output (`factory.output.layout`),
SegGen checkpoints and `factory eval` results are all `Folder`s.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import fsspec
from pydantic import Field

from factory.schema import SpecError, StrictModel

TMP_DIR = "_tmp"  # local atomic writes go through here, then are renamed into place
UPLOAD_BLOCK = 8 * 2**20  # above S3's 5 MiB minimum multipart part size; bounds each upload buffer


# A spec names a credential as `env:NAME`: read from the environment of the process that uses it (each
# node's own: `ray start`'s environment, a Kubernetes Secret mounted as env), never written into the spec.
ENV_PREFIX = "env:"


class SecretNotSet(SpecError):
    """A spec's `env:NAME` credential names a variable this process's environment lacks."""


def resolve_secrets(options: Any) -> Any:
    """A copy of (fsspec) options with each `env:NAME` string replaced by that environment variable's value.
    Called where a filesystem is opened, on the node that opens it: what travels (specs, task arguments,
    the job's package) holds only the names."""
    if isinstance(options, dict):
        return {k: resolve_secrets(v) for k, v in options.items()}
    if isinstance(options, list):
        return [resolve_secrets(v) for v in options]
    if isinstance(options, str) and options.startswith(ENV_PREFIX):
        name = options[len(ENV_PREFIX) :]
        if name not in os.environ:
            raise SecretNotSet(
                f"{options!r}: the environment variable {name} is not set on {socket.gethostname()}; set it in "
                "every node's environment (the one `ray start` runs with, or a Kubernetes Secret as env)"
            )
        return os.environ[name]
    return options


def url_to_fs(url: str, options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """fsspec's filesystem and path for `url`, its options' `env:` credentials read here."""
    return fsspec.core.url_to_fs(url, **resolve_secrets(options or {}))


def open_url(url: str, mode: str = "rb", options: dict[str, Any] | None = None):
    """fsspec.open, its options' `env:` credentials read here."""
    return fsspec.open(url, mode, **resolve_secrets(options or {}))


def fsspec_options(storage_options: dict[str, Any] | None, endpoint_url: str | None = None) -> dict[str, Any]:
    """fsspec options, with an S3 `endpoint_url` turned into s3fs's form."""
    options = dict(storage_options or {})
    if endpoint_url:
        options.setdefault("client_kwargs", {})["endpoint_url"] = endpoint_url
    return options


class Location(StrictModel):
    """Where something is stored: a path or fsspec URL, with the options to reach it."""

    url: str = Field(min_length=1, description="local path or fsspec URL (s3://bucket/prefix)")
    endpoint_url: str | None = Field(None, description="S3 endpoint (SeaweedFS, MinIO, ...)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="passed to fsspec")

    def options(self) -> dict[str, Any]:
        return fsspec_options(self.storage_options, self.endpoint_url)


class Folder:
    """A root on a filesystem: paths under it, JSON files, atomic writes, folder copies."""

    def __init__(self, url: str, options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.options = options or {}
        self.fs, root = url_to_fs(self.url, self.options)
        self.root = root.rstrip("/")

    @classmethod
    def at(cls, location: Location) -> Self:
        """The folder a spec's `Location` section names."""
        return cls(location.url, location.options())

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def is_local(self) -> bool:
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return protocol in ("file", "local")

    def public_url(self, *parts: str) -> str:
        """The URL a reader uses (s3://..., or a local path)."""
        if self.is_local():
            return self.path(*parts)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{self.path(*parts)}" if "/".join(parts) else f"{protocol}://{self.root}"

    def check_writable(self) -> None:
        """Raise what writing here would raise, before anything is started or written: a local root whose
        nearest existing folder is no folder or cannot be written (a read-only mount included). Object
        stores answer only when written to; their errors come from the first write."""
        if not self.is_local():
            return
        path = Path(self.root)
        while not path.exists() and path != path.parent:
            path = path.parent
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(path))
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "the output's folder is not writable", str(path))

    def ensure_root(self) -> None:
        """Create the folder (locally) or the bucket (object stores), if missing."""
        self.fs.makedirs(self.root, exist_ok=True)

    def exists(self, *parts: str) -> bool:
        self.fs.invalidate_cache()  # object-store listings are cached per process; another may have written
        return self.fs.exists(self.path(*parts))

    def read_json(self, *parts: str) -> Any | None:
        """The JSON file at `parts`, or None when there is none."""
        if not self.exists(*parts):
            return None
        with self.fs.open(self.path(*parts), "rb") as f:
            return json.load(f)

    def write_json(self, data: Any, *parts: str) -> None:
        self.put_bytes(json.dumps(data, indent=2, sort_keys=True).encode(), *parts)

    def put_bytes(self, body: bytes, *parts: str) -> None:
        with self.open_atomic(*parts) as f:
            f.write(body)

    def write_bytes(self, body: bytes, *parts: str) -> None:
        """A plain write, for files a rerun rewrites whole and whose readers wait for the run to end."""
        path = self.path(*parts)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, body)

    @contextmanager
    def open_atomic(self, *parts: str, mode: str = "wb"):
        """A file that appears under its final name only once it is complete.

        Locally it is written under `_tmp/`, flushed to disk and renamed into place. On object stores
        an upload becomes visible only when it completes, so it goes to its final name directly, and
        an error inside the block discards the upload instead of completing it with partial data.
        """
        final = self.path(*parts)
        if not self.is_local():
            f = self.fs.open(final, mode, block_size=UPLOAD_BLOCK)
            try:
                yield f
            except BaseException:
                if hasattr(f, "discard"):
                    f.discard()
                raise
            f.close()
            return
        tmp = self.path(TMP_DIR, f"{uuid.uuid4().hex[:12]}.{final.rsplit('/', 1)[-1]}")
        self.fs.makedirs(self.path(TMP_DIR), exist_ok=True)
        with self.fs.open(tmp, mode) as f:
            yield f
            # After a power loss a commit marker must never stand beside a file the disk had not written.
            f.flush()
            os.fsync(f.fileno())
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        self.fs.mv(tmp, final)

    def remove(self, *parts: str, recursive: bool = False) -> None:
        path = self.path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=recursive)

    def upload_dir(self, local: Path, *parts: str, marker: str | None = None) -> None:
        """A local folder copied to `parts`: what stood there first removed, files next, `marker` last."""
        target = self.path(*parts)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            dest = f"{target}/{file.relative_to(local).as_posix()}"
            self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(file), dest)
        if marker:
            self.fs.pipe_file(f"{target}/{marker}", b"ok\n")

    def download_dir(self, local: Path, *parts: str) -> Path:
        source = self.path(*parts)
        for remote in self.fs.find(source):
            rel = remote[len(source) :].lstrip("/")
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(remote, str(local / rel))
        return local
