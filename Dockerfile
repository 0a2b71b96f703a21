# The factory's cluster image: every Ray node (head and GPU workers) runs it.
#
#   make image REGISTRY=registry.example.com/team    (docker build -t REGISTRY/factory:<version> .)
#
# No model weights are baked in: stages fetch them at run time, once per node, into $FACTORY_MODEL_CACHE
# (hub ids into $HF_HOME). The manifests in cluster/ mount a node-local volume at /cache for both.
#
# CUDA: the locked torch (2.14.1)'s wheel on PyPI is built for CUDA 13.0 and brings its own CUDA libraries as wheels
# (cuda-toolkit, cudnn-cu13, nccl-cu13); the base image supplies the matching CUDA 13.0 runtime and the
# NVIDIA container settings. Change the two together: tests/cluster/test_cluster_manifests.py checks they
# match. The hosts need an NVIDIA driver >= 580 for CUDA 13 (cluster/ray-up-aws.yaml names such an AMI).
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

ARG DEBIAN_FRONTEND=noninteractive

# python3 is Ubuntu 24.04's Python 3.12 (pyproject: requires-python >= 3.11). wget: KubeRay's health
# probes call it. rsync: `ray up` copies its bootstrap config into the container with
# `rsync -e 'docker exec -i'` (ray-project/ray#40566). Ubuntu's package versions move with security
# updates, so they are left unpinned; the Python packages, which decide the output, are all pinned by
# requirements.lock.
# Ubuntu's image has a user `ubuntu` at uid 1000, the uid Ray images and the manifests run as: it goes.
# Every directory the user works in is made and handed to it here, as root: a WORKDIR that does not exist
# yet is created root-owned after USER by the classic builder and older kaniko, and the next step fails.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates wget rsync \
    && rm -rf /var/lib/apt/lists/* \
    && userdel --remove ubuntu \
    && useradd --uid 1000 --gid 100 --create-home --shell /bin/bash factory \
    && mkdir -p /opt/factory/src /cache \
    && chown factory:users /opt/factory /opt/factory/src /cache

ENV VIRTUAL_ENV=/opt/factory/venv \
    PATH=/opt/factory/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    FACTORY_MODEL_CACHE=/cache/models \
    HF_HOME=/cache/hf

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 1000:100
WORKDIR /opt/factory/src

# Dependencies first, in their own layer, so a code change does not reinstall torch: every extra
# (`all`: the engine, the model stages, training, reports and Ray's dashboard and Jobs API), each at the
# version requirements.lock pins. pip builds the package's metadata from pyproject.toml alone here.
COPY --chown=factory:users pyproject.toml requirements.lock README.md ./
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install -c requirements.lock ".[all]"

# The project itself; its dependencies are already there, exactly as locked.
COPY --chown=factory:users factory ./factory
RUN pip install --no-deps --force-reinstall . \
    && factory --version

WORKDIR /home/factory
CMD ["factory", "--help"]
