"""The Dockerfile and the cluster manifests, checked against what the project relies on.

None of these files can run here (no Docker engine, no Kubernetes, no cloud), so they would drift
silently: these tests parse every one of them and hold them to pyproject.toml and to each other
(image, Ray version, entrypoint, GPU limits, secrets, pre-stop, object-store sizing, the model cache).
"""

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from helpers import REPO, locked
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from factory.cli import build_parser
from factory.engine.spec import parse_spec

pytestmark = pytest.mark.timeout(120)

CLUSTER = REPO / "cluster"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
LOCKED = locked()
VERSION = PYPROJECT["version"]
IMAGE = f"REGISTRY/factory:{VERSION}"

# The CUDA build of each torch release's default wheel on PyPI (its nvidia-*-cuXX dependencies), and
# the Python of each Ubuntu base. A torch bump fails here until someone checks the new wheel's CUDA.
TORCH_CUDA = {"2.14": "13.0"}
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12"}


def pin(name: str) -> str:
    return LOCKED[name]


# ---------------------------------------------------------------- the Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#") and not current:
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        current = ""
    return out


def instructions(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def image_env() -> dict[str, str]:
    env = {}
    for args in instructions("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def test_base_image_is_the_cuda_runtime_that_torch_was_built_for():
    (base,) = instructions("FROM")
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu(\d+\.\d+)", base)
    assert m, f"expected an nvidia/cuda runtime image, got {base}"
    cuda, ubuntu = f"{m[1]}.{m[2]}", m[3]
    torch_minor = ".".join(pin("torch").split(".")[:2])
    assert TORCH_CUDA[torch_minor] == cuda, f"torch {pin('torch')} wheels are CUDA {TORCH_CUDA[torch_minor]}"
    # No other torch index (a wheel built for another CUDA) may sneak in.
    assert "download.pytorch.org" not in (REPO / "Dockerfile").read_text()
    python = UBUNTU_PYTHON[ubuntu]
    assert SpecifierSet(PYPROJECT["requires-python"]).contains(python)

    import torch

    # This machine's torch is the same PyPI wheel: when it is the pinned release, its CUDA must agree.
    if torch.__version__.split("+")[0] == pin("torch") and torch.version.cuda:
        assert torch.version.cuda == cuda


def test_the_image_installs_every_extra_at_the_locked_versions():
    copies = [shlex.split(c) for c in instructions("COPY")]
    sources = sorted(src for c in copies for src in c[:-1] if not src.startswith("--"))
    assert sources == ["README.md", "factory", "pyproject.toml", "requirements.lock"]  # no weights, no data
    assert not instructions("ADD")
    # Two pip installs: every extra constrained by the lock (`all` brings Ray's dashboard and Jobs API,
    # which the cluster needs), then the code alone. No version is written here.
    installs = [i.strip() for run in instructions("RUN") for i in re.findall(r"pip install ([^&;|]+)", run)]
    assert installs == ['-c requirements.lock ".[all]"', "--no-deps --force-reinstall ."]
    extras = PYPROJECT["optional-dependencies"]
    assert "factory[engine,models,train,report,cluster]" in extras["all"]
    assert any(Requirement(d).name == "ray" and "default" in Requirement(d).extras for d in extras["cluster"])


def test_the_image_runs_as_a_non_root_user_with_factory_on_path():
    user = instructions("USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric, so Kubernetes' runAsNonRoot can check it"
    assert "factory" in PYPROJECT["scripts"]
    env = image_env()
    venv_bin = f"{env['VIRTUAL_ENV']}/bin"
    assert env["PATH"].split(":")[0] == venv_bin
    assert "factory --version" in " ".join(instructions("RUN"))  # the build fails if the script is missing
    assert env["FACTORY_MODEL_CACHE"].startswith("/cache/") and env["HF_HOME"].startswith("/cache/")


def test_the_image_has_rsync_for_ray_up():
    # `ray up` copies its bootstrap config into the container with `rsync -e 'docker exec -i'`.
    packages = [p for run in instructions("RUN") for p in re.findall(r"apt-get install ([^&;|]+)", run)]
    assert "rsync" in " ".join(packages).split()


def test_every_workdir_after_user_exists_and_belongs_to_the_user():
    """A WORKDIR made after USER is root-owned with the classic builder and older kaniko: each one must be
    made and handed to the user (mkdir -p + chown) by a RUN before USER, or be the user's home."""
    steps = dockerfile()
    first_user = next(i for i, (word, _) in enumerate(steps) if word == "USER")
    uid = instructions("USER")[-1].partition(":")[0]
    made, owned, homes = set(), set(), set()
    for word, args in steps[:first_user]:
        if word != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            words = shlex.split(command)
            if words[:2] == ["mkdir", "-p"]:
                made.update(words[2:])
            elif words[:1] == ["chown"]:
                owned.update(words[2:])
            elif words[:1] == ["useradd"] and "--create-home" in words and words[words.index("--uid") + 1] == uid:
                homes.add(f"/home/{words[-1]}")
    workdirs = [args for word, args in steps[first_user:] if word == "WORKDIR"]
    assert workdirs
    for path in workdirs:
        assert path in homes or path in made & owned, f"WORKDIR {path} is not made and chowned before USER"


def test_dockerignore_sends_only_what_the_image_copies():
    text = (REPO / ".dockerignore").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!factory/"} <= set(lines)


@pytest.mark.e2e
def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------- KubeRay manifests


def manifests() -> dict[str, list[dict]]:
    return {
        p.name: [d for d in yaml.safe_load_all(p.read_text()) if d is not None] for p in sorted(CLUSTER.glob("*.yaml"))
    }


def ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for name, docs in manifests().items():
        for doc in docs:
            if doc.get("kind") == "RayCluster":
                specs.append((f"{name}:RayCluster", doc["spec"]))
            elif doc.get("kind") == "RayJob":
                specs.append((f"{name}:RayJob", doc["spec"]["rayClusterSpec"]))
    return specs


def test_every_manifest_parses_and_is_known():
    found = manifests()
    assert {"raycluster.yaml", "rayjob.yaml", "ray-up-aws.yaml"} <= set(found)
    kinds = []
    for name, docs in found.items():
        assert docs, f"{name} is empty"
        for doc in docs:
            if "cluster_name" in doc:
                kinds.append("ray-up")
                continue
            assert doc["apiVersion"] in ("ray.io/v1", "v1"), name
            kinds.append(doc["kind"])
    assert {"RayCluster", "RayJob", "ConfigMap", "ray-up"} <= set(kinds)
    assert len(ray_cluster_specs()) == 2


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(quantity))
    return int(m[1]) * units.get(m[2], 1)


def _check_ray_pod(group: dict, where: str) -> dict:
    """Checks every Ray pod shares; returns the Ray container."""
    pod = group["template"]["spec"]
    for c in _containers(pod):
        assert c["image"] == IMAGE, f"{where}: {c['name']} runs {c['image']}"
    ray, *others = pod["containers"]
    assert not others, f"{where}: one container per Ray pod"
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert str(sc["runAsUser"]) == instructions("USER")[-1].partition(":")[0]
    # Drain the node's Ray processes before the pod goes, so the cluster sees the node leave.
    assert "ray stop" in " ".join(ray["lifecycle"]["preStop"]["exec"]["command"])
    # Object-store credentials only ever come from the Secret.
    env = {e["name"]: e for e in ray.get("env", [])}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "factory-s3", "key": key}, where
    assert not any("value" in e and "SECRET" in e["name"] for e in env.values())
    # The object store fits in /dev/shm and leaves the pod most of its memory.
    store = int(group["rayStartParams"]["object-store-memory"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in ray["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and store <= _bytes(shm["sizeLimit"])
    assert store <= _bytes(ray["resources"]["limits"]["memory"]) // 2
    return ray


@pytest.mark.parametrize("where,spec", ray_cluster_specs(), ids=[w for w, _ in ray_cluster_specs()])
def test_ray_cluster_shape(where, spec):
    assert spec["rayVersion"] == pin("ray")
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    head_ray = _check_ray_pod(head, f"{where} head")
    # A CPU head: no GPU, and no stage work scheduled on it.
    assert head["rayStartParams"]["num-cpus"] == "0"
    for section in ("requests", "limits"):
        assert "nvidia.com/gpu" not in head_ray["resources"].get(section, {})
    assert {p["containerPort"] for p in head_ray["ports"]} >= {6379, 8265}

    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    ]
    assert gpu_groups, f"{where}: no GPU worker group"
    for g in gpu_groups:
        ray = _check_ray_pod(g, f"{where} {g['groupName']}")
        res = ray["resources"]
        # Kubernetes requires extended resources' requests to equal their limits.
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["minReplicas"] < g["maxReplicas"]
        # Weights land in a node-local cache that outlives the actors loading them.
        env = {e["name"]: e.get("value") for e in ray["env"]}
        assert env["FACTORY_MODEL_CACHE"] == image_env()["FACTORY_MODEL_CACHE"]
        volumes = {v["name"]: v for v in g["template"]["spec"]["volumes"]}
        (cache_mount,) = [m for m in ray["volumeMounts"] if env["FACTORY_MODEL_CACHE"].startswith(m["mountPath"] + "/")]
        assert {"hostPath", "emptyDir"} & set(volumes[cache_mount["name"]])


def test_rayjob_runs_a_valid_spec_that_fits_its_gpus():
    docs = manifests()["rayjob.yaml"]
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1

    # The entrypoint is the CLI's `run` on a spec file mounted from the ConfigMap into the head.
    words = shlex.split(spec["entrypoint"])
    assert words[:4] == ["python", "-m", "factory.cli", "run"]
    args = build_parser().parse_args(words[3:])
    spec_path = Path(args.spec)
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == str(spec_path.parent)]
    configmap = configmaps[volumes[mount["name"]]["configMap"]["name"]]
    job_spec = parse_spec(yaml.safe_load(configmap["data"][spec_path.name]), origin="rayjob.yaml")

    # Every GPU stage's pool fits the GPUs the worker group can scale to, and its CPUs fit a worker.
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(
        g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in workers
    )
    cpus = min(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) for g in workers)
    gpu_stages = [s for s in job_spec.stages if s.resources.num_gpus > 0]
    assert gpu_stages
    for s in gpu_stages:
        pool = s.resources.concurrency
        largest = pool[1] if isinstance(pool, tuple) else pool
        assert largest * s.resources.num_gpus <= gpus, s.label
        assert s.resources.num_cpus <= cpus, s.label
    # On a cluster everything the job reads or writes is in the object store, never a local path.
    assert job_spec.source.path.startswith("s3://") and job_spec.output.url.startswith("s3://")


# ---------------------------------------------------------------- ray up (AWS)


def test_ray_up_config_is_valid_for_ray_and_matches_the_image():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((CLUSTER / "ray-up-aws.yaml").read_text())
    validate_config(fillout_defaults(config))  # Ray's own schema for cluster launcher configs
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == IMAGE
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t["min_workers"] < t["max_workers"] for t in gpu_types)
    # The node-local model cache: a host directory mounted where the image looks for it.
    cache_root = image_env()["FACTORY_MODEL_CACHE"].rsplit("/", 1)[0]
    assert any(o.endswith(f":{cache_root}") for o in config["docker"]["run_options"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = " ".join(config[key])
        assert "ray stop" in commands and "--object-store-memory=" in commands


def test_ray_up_config_validates_against_rays_schema_as_written():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load((CLUSTER / "ray-up-aws.yaml").read_text()), schema)


def test_ray_up_installs_nothing_and_names_a_cuda_13_ami():
    from ray.autoscaler._private.util import fillout_defaults

    text = (CLUSTER / "ray-up-aws.yaml").read_text()
    config = yaml.safe_load(text)
    # Ray's AWS defaults `pip install boto3` on the head, which moves botocore past aiobotocore's pin.
    filled = fillout_defaults(config)
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config[key] == [] and filled[key] == [], key
    # One explicit AMI for every node: the Deep Learning Base OSS Nvidia Driver AMI (driver >= 580 for
    # CUDA 13), looked up per region through its public SSM parameter, never Ray's CUDA 11 `latest_dlami`.
    images = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    assert len(images) == 1 and re.fullmatch(r"AMI_ID|ami-[0-9a-f]{8,17}", images.pop())
    assert "aws ssm get-parameter --region " + config["provider"]["region"] in text
    assert "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id" in text
    assert "latest_dlami" not in re.sub(r"#.*", "", text)
    assert "--gpus all" not in text  # Ray adds --runtime=nvidia on GPU hosts, not --gpus
