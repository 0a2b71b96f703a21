"""Pinned and verified weights: what a job loads is fixed when it is planned, and checked where it is loaded.

Each model a stage loads from real weights (`Stage.weight_sources()`) is pinned when the job is planned:
- a hub id to the commit `model.revision` names (a branch, by default `main`, resolved to its commit),
  with the sha256 of each LFS file (the weights) as the hub lists them;
- a local path (a file or a folder) to the sha256 of every file;
- an object-store URL to the store's ETag of every object under it.
The manifest records the pins; every shard's stats and every sample's json carry them (`record`); a resume
whose models resolve to other weights is refused (factory/engine/pinning.py). Workers load under the job's
pins (`loading_pinned`, read by factory/models/loading.py): a hub model at its commit, a local path only
while its files hash to the pin, an object-store model from a node cache entry keyed by the pin's digest,
copied from exactly the pinned objects, checked against their ETags, and re-hashed on every load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from factory.models.cache import drop_entry, file_sha256, fill_once, model_cache_dir
from factory.storage import url_to_fs

log = logging.getLogger(__name__)

# The files a record lists one by one (the digest covers every file): what holds a model's parameters.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".gguf", ".msgpack", ".h5", ".onnx")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SUMS = ".factory-sums.json"  # in an object-store cache entry: the sha256 of each file, written when filled
_MD5 = re.compile(r"^[0-9a-f]{32}$")  # an ETag that is the object's MD5 (a single-part upload)


class WeightsChanged(RuntimeError):
    """A model's files are not the ones the job pinned when it was planned."""


def plain_ref(ref: str) -> str:
    return ref[len("file://") :] if ref.startswith("file://") else ref


def is_hub_id(ref: str) -> bool:
    return "://" not in ref and not Path(ref).expanduser().exists() and bool(_HUB_ID.match(ref))


@dataclass(frozen=True)
class WeightsSource:
    """A model a stage loads from real weights: where from, how to reach it, and for hub ids which revision."""

    ref: str
    storage_options: dict = field(default_factory=dict)
    revision: str | None = None


@dataclass(frozen=True)
class WeightsPin:
    """The exact weights a job loads under one name: `files` maps each file (relative to the model's folder,
    or the file's name) to its identity, `sha256:<hex>` or `etag:<etag>`; `digest` covers them all."""

    ref: str
    digest: str
    files: dict[str, str]
    revision: str | None = None  # hub models: the commit

    @classmethod
    def of(cls, ref: str, files: dict[str, str], revision: str | None = None) -> WeightsPin:
        canonical = json.dumps({"files": files, "revision": revision}, sort_keys=True).encode()
        return cls(ref, f"sha256:{hashlib.sha256(canonical).hexdigest()}", dict(sorted(files.items())), revision)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> WeightsPin:
        return cls(**data)

    def record(self) -> dict:
        """What every shard's stats and every sample's json carry: the revision, the digest, and the identity
        of each weight file (configs and tokenizers count in the digest, not one by one)."""
        weights = {name: ident for name, ident in self.files.items() if name.endswith(WEIGHT_SUFFIXES)}
        return {"ref": self.ref, "revision": self.revision, "digest": self.digest, "files": weights}

    def difference(self, other: WeightsPin) -> str:
        """The first way `other` differs from this pin, in words."""
        if self.revision != other.revision:
            return f"revision {self.revision} is now {other.revision}"
        for name in sorted(set(self.files) | set(other.files)):
            was, now = self.files.get(name), other.files.get(name)
            if was != now:
                return f"{name}: pinned {was or 'absent'}, now {now or 'absent'}"
        return "no file differs"


def pin(source: WeightsSource) -> WeightsPin:
    """Resolve a model to the exact weights it names now (hashing local files, listing the store, asking
    the hub or its local cache)."""
    ref = plain_ref(source.ref)
    if "://" in ref:
        return WeightsPin.of(source.ref, _object_files(ref, source.storage_options))
    path = Path(ref).expanduser()
    if path.exists():
        return WeightsPin.of(source.ref, _local_files(path))
    if _HUB_ID.match(ref):
        return _pin_hub(ref, source.revision)
    raise FileNotFoundError(f"model path {ref!r} does not exist (and is not a hub id like 'org/name')")


# ---------------------------------------------------------------- what workers load


_expected: dict[str, WeightsPin] = {}


@contextmanager
def loading_pinned(pins: Iterable[WeightsPin]) -> Iterator[None]:
    """Within: every model loaded by one of these pins' refs is checked against its pin (loading.py)."""
    before = dict(_expected)
    _expected.update({plain_ref(p.ref): p for p in pins})
    try:
        yield
    finally:
        _expected.clear()
        _expected.update(before)


def expected_pin(ref: str) -> WeightsPin | None:
    return _expected.get(plain_ref(ref))


def hub_revision(ref: str) -> str | None:
    """The commit a hub model is pinned to in this worker, or None (unpinned: the hub's `main`)."""
    pinned = expected_pin(ref)
    return pinned.revision if pinned is not None else None


def check_local(pinned: WeightsPin, path: Path) -> None:
    """Raise WeightsChanged unless the files at `path` are the pinned ones."""
    now = WeightsPin.of(pinned.ref, _local_files(path))
    if now.files != pinned.files:
        raise WeightsChanged(
            f"model {pinned.ref!r} holds other files than when the job was planned ({pinned.difference(now)}); "
            "restore them, or start a new job (another output, or --overwrite)"
        )


def fetch_object(ref: str, storage_options: dict | None = None) -> str:
    """A local copy of an object-store model, from the node's cache entry of its pinned content: the pin
    the job recorded, or what the store holds now for a load outside a job. Returns the file for a file
    URL, the folder for a prefix."""
    fs, root = url_to_fs(plain_ref(ref), storage_options)
    root = root.rstrip("/")
    pinned = expected_pin(ref) or WeightsPin.of(ref, _object_files(ref, storage_options))
    name = re.sub(r"[^\w.-]", "_", root.rsplit("/", 1)[-1])[:64]
    dest = model_cache_dir() / f"{pinned.digest.removeprefix('sha256:')[:16]}-{name}"

    def copy(target: Path) -> None:
        single = fs.isfile(root)
        log.info("copying model %s to %s", ref, target)
        sums = {}
        for rel, ident in pinned.files.items():
            src, local = (root, name) if single else (f"{root}/{rel}", rel)
            (target / local).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(src, str(target / local))
            _check_copy(fs, src, target / local, ident, f"{ref}: {rel}")
            sums[local] = file_sha256(target / local)
        (target / _SUMS).write_text(json.dumps({"entry": name if single else "", "sha256": sums}))

    for _ in range(2):
        found = _verified(fill_once(dest, copy))
        if found is not None:
            return str(found)
        log.warning("model cache entry %s fails its checksums; fetching %s again", dest, ref)
        drop_entry(dest)
    raise WeightsChanged(f"the copy of {ref} in {dest} fails its checksums right after it was fetched")


def _verified(dest: Path) -> Path | None:
    """The entry's model path if every file still hashes to what was copied, else None."""
    try:
        sums = json.loads((dest / _SUMS).read_text())
    except (OSError, ValueError):
        return None
    for rel, sha in sums["sha256"].items():
        if not (dest / rel).is_file() or file_sha256(dest / rel) != sha:
            return None
    return dest / sums["entry"] if sums["entry"] else dest


def _check_copy(fs, src: str, local: Path, ident: str, what: str) -> None:
    """The copied file is the pinned object: by its MD5 where the ETag is one, else by the ETag unchanged."""
    kind, _, value = ident.partition(":")
    if kind == "sha256":
        now = f"sha256:{file_sha256(local)}"
    elif _MD5.match(value) and _md5(local) == value:
        return
    else:  # a multi-part or KMS-encrypted object's ETag is no MD5 of its bytes: it must still be the pinned one
        now = _object_identity(fs, fs.info(src))
    if now != ident:
        raise WeightsChanged(
            f"{what} changed since the job was planned (pinned {ident}, now {now}); restore it, or start a "
            "new job (another output, or --overwrite)"
        )


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- listing what a model holds


def _hidden(rel: str) -> bool:
    """Dot-files are no part of a model: the cache's own markers, the hub's download metadata."""
    return any(part.startswith(".") for part in rel.split("/"))


def _local_files(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: f"sha256:{file_sha256(path)}"}
    files = {}
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).as_posix()
        if f.is_file() and not _hidden(rel):
            files[rel] = f"sha256:{file_sha256(f)}"
    return files


def _object_files(ref: str, storage_options: dict | None) -> dict[str, str]:
    fs, root = url_to_fs(plain_ref(ref), storage_options)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise FileNotFoundError(f"model URL {ref!r} does not exist")
    if fs.isfile(root):
        return {root.rsplit("/", 1)[-1]: _object_identity(fs, fs.info(root))}
    listing = fs.find(root, withdirs=False, detail=True)
    return {
        rel: _object_identity(fs, info)
        for path, info in listing.items()
        if not _hidden(rel := path[len(root) :].lstrip("/"))
    }


def _object_identity(fs, info: dict) -> str:
    """The store's ETag (or MD5); for a filesystem that has neither, the sha256 of the bytes."""
    for key in ("ETag", "etag", "md5Hash"):
        if info.get(key):
            return f"etag:{str(info[key]).strip(chr(34))}"
    digest = hashlib.sha256()
    with fs.open(info["name"], "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _pin_hub(repo: str, revision: str | None) -> WeightsPin:
    """The commit a hub revision names now, from the hub, or where it cannot be reached from the local cache."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    wanted = revision or "main"
    reason = "offline mode is on"
    if not constants.HF_HUB_OFFLINE:
        try:
            info = HfApi().model_info(repo, revision=wanted, files_metadata=True)
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
            raise FileNotFoundError(f"hub model {repo!r} at revision {wanted!r}: {type(e).__name__}: {e}") from e
        except Exception as e:  # the hub cannot be reached: what the local cache holds may still do
            reason = f"{type(e).__name__}: {e}"
        else:
            files = {s.rfilename: f"sha256:{s.lfs.sha256}" for s in info.siblings or [] if s.lfs is not None}
            return WeightsPin.of(repo, files, info.sha)
    return _pin_hub_cached(repo, wanted, reason)


def _pin_hub_cached(repo: str, wanted: str, reason: str) -> WeightsPin:
    """The local Hugging Face cache's snapshot of the revision; LFS files there are blobs named by sha256."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, revision=wanted, local_files_only=True))
    except Exception as e:
        raise OSError(
            f"cannot pin hub model {repo!r} at revision {wanted!r}: the hub cannot be reached ({reason}) and the "
            f"local Hugging Face cache has no snapshot of it ({type(e).__name__}). Give a local directory or an "
            "object-store URL (s3://bucket/prefix, with storage_options) holding the model's files instead"
        ) from e
    files = {}
    for f in sorted(folder.rglob("*")):
        blob = f.resolve().name
        if f.is_file() and re.fullmatch(r"[0-9a-f]{64}", blob):
            files[f.relative_to(folder).as_posix()] = f"sha256:{blob}"
    return WeightsPin.of(repo, files, folder.name)
