# syntax=docker/dockerfile:1
# node-health-agent: a slim, non-root image. Build: docker build -t node-health-agent .
# The base is pinned by digest (a tag can be pushed again; a digest cannot): the digest of
# python:3.11.11-slim-bookworm's multi-arch index. Python packages install from
# constraints.txt, every version pinned (README, Container image, says how to update both).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5

# The deep-check image's bases (`--target deep-check`, below): NVIDIA's CUDA images, the
# devel one to build nccl-tests, the runtime one (with NCCL's libnccl2) to run it. Digests as
# pinned in public build files for these tags; `docker buildx imagetools inspect <tag>`
# shows the current ones.
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu24.04@sha256:520292dbb4f755fd360766059e62956e9379485d9e073bbd2f6e3c20c270ed66
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04@sha256:ebef3c171eeef0298e4eb2e4be843105edf3b8b0ac45e0b43acee358e8046867

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY agent agent
COPY checks checks
RUN python -m venv /opt/node-health \
 && /opt/node-health/bin/pip install --no-cache-dir --no-compile -c constraints.txt . \
 && /opt/node-health/bin/python -m compileall -q -o 0 -o 2 /opt/node-health/lib

# --- The deep check's image: docker build --target deep-check -t node-health-agent-deep-check .
# What `node-health deep-check` runs (agent/deepcheck.py), each from its vendor's packages. The
# controller runs it as a Job on the node (deep_check.runner: job); it is never the DaemonSet's.

# nccl-tests from its source release, built against the CUDA image's NCCL (libnccl-dev), as its
# README says (github.com/NVIDIA/nccl-tests: make CUDA_HOME=... NCCL_HOME=...). One process
# drives the node's GPUs (-g), so no MPI. Tag-pinned: a release tarball has no stable digest.
FROM ${CUDA_DEVEL_IMAGE} AS nccl-tests
ARG NCCL_TESTS_VERSION=v2.17.6
# sm_80 A100 (p4d, and the sm_86/89 A10G, L4, L40S of g5, g6, g6e), sm_90 H100/H200 (p5),
# sm_100 B200 (p6)
ARG NVCC_GENCODE="-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_100,code=sm_100"
ADD https://github.com/NVIDIA/nccl-tests/archive/refs/tags/${NCCL_TESTS_VERSION}.tar.gz /tmp/nccl-tests.tar.gz
RUN mkdir /tmp/nccl-tests \
 && tar -xzf /tmp/nccl-tests.tar.gz -C /tmp/nccl-tests --strip-components=1 \
 && make -C /tmp/nccl-tests -j"$(nproc)" MPI=0 CUDA_HOME=/usr/local/cuda NCCL_HOME=/usr \
      NVCC_GENCODE="${NVCC_GENCODE}" \
 && install -D -m 0755 /tmp/nccl-tests/build/all_reduce_perf /opt/nccl-tests/bin/all_reduce_perf

FROM ${CUDA_RUNTIME_IMAGE} AS deep-check
ARG DEBIAN_FRONTEND=noninteractive
# A failed download in `curl | gpg`, `echo | sha256sum` fails the build, not just the pipe's end.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# stress-ng and Python (3.12) from Ubuntu; DCGM 4 from NVIDIA's CUDA repository, which the
# CUDA image has configured (docs.nvidia.com/datacenter/dcgm/latest/installation.html:
# datacenter-gpu-manager-4-cuda<major>, the diagnostic's plugins in -proprietary-cuda<major>):
# dcgmi, nv-hostengine, and the Python bindings the dcgm_health check loads.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates curl gnupg python3 python3-venv stress-ng \
      datacenter-gpu-manager-4-cuda12 datacenter-gpu-manager-4-proprietary-cuda12 \
 && rm -rf /var/lib/apt/lists/*
# libfabric with its EFA provider, fi_info and fi_pingpong (/opt/amazon/efa/bin) from AWS's EFA
# installer, as in containers (docs.aws.amazon.com/AWSEC2/latest/UserGuide/efa-start.html;
# aws-samples/awsome-distributed-training's nccl-tests image): no kernel module, no limits file
# (the host's), no device check at build time. Its checksum as aws-parallelcluster-cookbook
# pins it.
ARG EFA_INSTALLER_VERSION=1.41.0
ARG EFA_INSTALLER_SHA256=3506354cdfbe31ff552fe75f5d0d9bb7efd29cf79bd99457347d29c751c38f9f
RUN cd /tmp \
 && curl -fsSLO "https://efa-installer.amazonaws.com/aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" \
 && echo "${EFA_INSTALLER_SHA256}  aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" | sha256sum -c - \
 && tar -xzf "aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" \
 && cd aws-efa-installer \
 && apt-get update \
 && ./efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify \
 && cd / && rm -rf /tmp/aws-efa-installer* /var/lib/apt/lists/*
# The Neuron tools (neuron-ls, neuron-monitor, nccom-test; /opt/aws/neuron/bin) with the runtime
# and collectives nccom-test runs on, from AWS's Neuron apt repository
# (awsdocs-neuron.readthedocs-hosted.com, setup: apt.repos.neuron.amazonaws.com, its GPG key);
# the driver (aws-neuronx-dkms) is the host's.
RUN . /etc/os-release \
 && install -m 0755 -d /etc/apt/keyrings \
 && curl -fsSL https://apt.repos.neuron.amazonaws.com/GPG-PUB-KEY-AMAZON-AWS-NEURON.PUB \
      | gpg --batch --yes --dearmor -o /etc/apt/keyrings/neuron.gpg \
 && echo "deb [signed-by=/etc/apt/keyrings/neuron.gpg] https://apt.repos.neuron.amazonaws.com ${VERSION_CODENAME} main" \
      > /etc/apt/sources.list.d/neuron.list \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      aws-neuronx-tools aws-neuronx-runtime-lib aws-neuronx-collectives \
 && rm -rf /var/lib/apt/lists/*
COPY --from=nccl-tests /opt/nccl-tests/bin/all_reduce_perf /usr/local/bin/all_reduce_perf
WORKDIR /src
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY agent agent
COPY checks checks
RUN python3 -m venv /opt/node-health \
 && /opt/node-health/bin/pip install --no-cache-dir --no-compile -c constraints.txt . \
 && /opt/node-health/bin/python -m compileall -q /opt/node-health/lib \
 && rm -rf /src
WORKDIR /
# Root: the Job runs it as root (DCGM's host engine, EFA's pinned memory; see
# agent/controller/deepjob.py). The host's /proc and /sys under /host, as for the agent.
ENV PATH=/opt/node-health/bin:/opt/amazon/efa/bin:/opt/aws/neuron/bin:$PATH \
    LD_LIBRARY_PATH=/opt/amazon/efa/lib:$LD_LIBRARY_PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NODE_HEALTH_HOST_ROOT=/host \
    NODE_HEALTH_STATE_DIR=/var/lib/node-health
ENTRYPOINT ["node-health"]
CMD ["deep-check", "--json"]

# --- The agent's image (the default target)
# Of the passive checks' tools only journalctl (below): in the DaemonSet's pod, without the
# devices, a host engine or the sockets they need, fi_info, neuron-ls, neuron-monitor, DCGM's
# bindings and crictl could not tell the truth (README, Where the deep check runs).
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="node-health-agent" \
      org.opencontainers.image.description="Health agent for GPU (NVIDIA) and AWS Trainium nodes in Kubernetes training clusters" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.11-slim-bookworm"
# journalctl (Debian's systemd package; nothing of it runs here): the kernel log's source in
# the pod. A container that is not privileged may not open the host's /dev/kmsg (its device
# rules admit only the standard devices, whatever the mount), and a host that logs to the
# journal alone (Amazon Linux 2023: no rsyslog, no kern.log) has no other record of it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends systemd \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/node-health /opt/node-health
COPY LICENSE /usr/share/doc/node-health-agent/LICENSE
# Bytecode for both ways the agent runs (the build stage's compileall does the same for its
# packages): the CLI plainly, the daemon with -OO (deploy/daemonset.yaml). With
# PYTHONDONTWRITEBYTECODE and a read-only root, a module without it is compiled at each start.
RUN python -m compileall -q -o 0 -o 2 "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')"
# The host's /proc, /sys, /dev/kmsg, /var/log and /run/log/journal are mounted under /host
# (see deploy/).
ENV PATH=/opt/node-health/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NODE_HEALTH_HOST_ROOT=/host \
    NODE_HEALTH_STATE_DIR=/var/lib/node-health \
    NODE_HEALTH_HTTP_LISTEN=0.0.0.0:9870
# Non-root (uid 1000, as HyperPod's agent); checks that need more get it from the pod spec.
RUN useradd --uid 1000 --no-create-home --shell /usr/sbin/nologin node-health \
 && mkdir -p /var/lib/node-health && chown 1000:1000 /var/lib/node-health
USER 1000:1000
EXPOSE 9870
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9870/healthz', timeout=2)"]
ENTRYPOINT ["node-health"]
CMD ["run"]
