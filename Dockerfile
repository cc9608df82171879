# convgrad on an NVIDIA GPU: CuPy (cuda13 extra), Numba and PyTorch, installed with the same
# steps as CI (.ci/run), plus the GPU extras.
#
#   docker build -t convgrad .
#   docker run --rm --gpus all convgrad                      # convgrad bench (quick suite)
#   docker run --rm --gpus all -v "$PWD/out:/out" convgrad bash bench/gpu_check.sh /out
#
# The devel image is used for compute-sanitizer (the GPU check's memcheck stage) and g++
# (the cupy-host emulator of the test suite).
FROM nvidia/cuda:13.0.2-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# Ubuntu's own python3 and toolchain track the base image's release; pinning them would
# break the build on every security update of the image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/convgrad
COPY . .

# As .ci/run: a virtual environment, pip, PyTorch first (here its CUDA build from PyPI), then
# the package; the extras add CuPy for CUDA 13, Numba, the benchmark and the test tools.
# DL3013 flags the last install: it is this checkout, whose extras pyproject.toml bounds.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3013
RUN python -m pip install --upgrade "pip==25.3" \
    && python -m pip install "torch==2.13.0" \
    && python -m pip install ".[cuda13,numba,bench,test]"

CMD ["convgrad", "bench"]
