# The platform on CPU: the Ray head of a KubeRay cluster (deploy/kuberay/), CPU workers, CI-like runs, and the
# shared MLflow server (deploy/kuberay/mlflow.yaml; the mlflow-server extra puts its PostgreSQL driver and
# basic-auth app in the lock).
# NOT BUILT HERE: the machine these files were written on runs no Docker engine. They are linted
# (hadolint) and checked against the lock by tests/deploy/test_images.py; build and smoke-test before use:
#   docker build -f docker/cpu.Dockerfile -t mobile-vla:cpu .
#   docker run --rm mobile-vla:cpu python -c "import mobile_vla, ray, mlflow, torch"
# Every Python package comes from requirements/cpu.lock.txt (scripts/lock.sh makes it); the repository's two
# packages (the platform and the robot client in ./client) install on top without resolving anything else.
# torch is the PyPI build (CUDA 13, runs on CPU; the CPU-only torch breaks torchvision): a large image.
FROM python:3.11-slim-bookworm

# Mesa EGL for headless MiniWorld rendering (as scripts/setup.sh); wget for KubeRay's health probes
# Debian's versions are not pinned (DL3008): a point release removes the old ones and the build breaks
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libegl1 libegl-mesa0 libgl1-mesa-dri libglu1-mesa wget \
    && rm -rf /var/lib/apt/lists/*

# uid 1000 named ray, as in Ray's own images: KubeRay manifests and volume permissions work the same for both
RUN useradd --create-home --uid 1000 --shell /bin/bash ray

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYOPENGL_PLATFORM=egl \
    MLFLOW_DISABLE_TELEMETRY=true \
    RAY_USAGE_STATS_ENABLED=0 \
    MOBILE_VLA_HOME=/home/ray/mobile_vla

WORKDIR /opt/mobile-vla
# the lock alone first: this layer is rebuilt only when the lock changes, not on every code change
COPY requirements/cpu.lock.txt requirements/cpu.lock.txt
RUN pip install --no-cache-dir -r requirements/cpu.lock.txt

COPY client/ client/
COPY pyproject.toml README.md ./
COPY platform/ platform/
# --no-deps: every dependency is already there at its locked version; pip check proves nothing is missing
RUN pip install --no-cache-dir --no-deps ./client . && pip check
COPY jobs/ jobs/
COPY serve_configs/ serve_configs/
COPY clusters/runtime_env.yaml clusters/runtime_env.yaml

USER 1000
WORKDIR /home/ray
