# The platform on GPU nodes: Ray's GPU image (the Ray version the lock pins, Python 3.11), for KubeRay GPU
# workers (deploy/kuberay/): training, TensorRT / ONNX Runtime serving replicas.
# NOT BUILT HERE: the machine these files were written on runs no Docker engine and cannot reach NVIDIA's
# package index. They are linted (hadolint) and checked against the lock by tests/deploy/test_images.py;
# build and smoke-test on a GPU host before use (docs/gpu.md has the GPU checks):
#   docker build -f docker/gpu.Dockerfile -t mobile-vla:gpu .
#   docker run --rm --gpus all mobile-vla:gpu python -c "import mobile_vla, torch; assert torch.cuda.is_available()"
# Every Python package comes from requirements/gpu.lock.txt, which pins ray to the base image's version (so pip
# keeps the image's Ray), except TensorRT: its libraries come from NVIDIA's index, pinned here to a version in
# pyproject.toml's gpu extra range (a test checks). torch is the CUDA 13 build: nodes need driver 580 or later.
FROM rayproject/ray:2.60.0-py311-gpu

ARG TENSORRT_VERSION=10.16.1.11

# Ray's image runs as the non-root user ray (uid 1000, group users, gid 100); system packages need root.
USER 0
# Mesa EGL for headless MiniWorld rendering (closed-loop evaluation on GPU nodes), as scripts/setup.sh
# Debian's versions are not pinned (DL3008): a point release removes the old ones and the build breaks
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libegl1 libegl-mesa0 libgl1-mesa-dri libglu1-mesa \
    && rm -rf /var/lib/apt/lists/*
USER 1000

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYOPENGL_PLATFORM=egl \
    MLFLOW_DISABLE_TELEMETRY=true \
    RAY_USAGE_STATS_ENABLED=0 \
    MOBILE_VLA_HOME=/home/ray/mobile_vla

WORKDIR /home/ray/mobile-vla
COPY --chown=1000:100 requirements/gpu.lock.txt requirements/gpu.lock.txt
RUN pip install --no-cache-dir -r requirements/gpu.lock.txt \
    && pip install --no-cache-dir --extra-index-url https://pypi.nvidia.com "tensorrt-cu13==${TENSORRT_VERSION}"

COPY --chown=1000:100 client/ client/
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 platform/ platform/
# --no-deps: every dependency is already there at its locked version; pip check proves nothing is missing
RUN pip install --no-cache-dir --no-deps ./client . && pip check
COPY --chown=1000:100 jobs/ jobs/
COPY --chown=1000:100 serve_configs/ serve_configs/
COPY --chown=1000:100 clusters/runtime_env.yaml clusters/runtime_env.yaml

WORKDIR /home/ray
