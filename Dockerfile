# syntax=docker/dockerfile:1
# node-health-agent: a slim, non-root image. Build: docker build -t node-health-agent .
# The base is pinned by digest (a tag can be pushed again; a digest cannot): the digest of
# python:3.11.11-slim-bookworm's multi-arch index. Python packages install from
# constraints.txt, every version pinned (README, Container image, says how to update both).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY agent agent
COPY checks checks
RUN python -m venv /opt/node-health \
 && /opt/node-health/bin/pip install --no-cache-dir --no-compile -c constraints.txt . \
 && /opt/node-health/bin/python -m compileall -q /opt/node-health/lib

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="node-health-agent" \
      org.opencontainers.image.description="Health agent for GPU (NVIDIA) and AWS Trainium nodes in Kubernetes training clusters" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.11-slim-bookworm"
COPY --from=build /opt/node-health /opt/node-health
COPY LICENSE /usr/share/doc/node-health-agent/LICENSE
# The host's /proc, /sys, /dev/kmsg and /var/log are mounted under /host (see deploy/).
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
