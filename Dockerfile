# loraplex server image, CPU or CUDA from this one file (docs/deploy.md):
#
#   docker build -t loraplex:cpu .
#   docker build -t loraplex:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# torch's CUDA wheels carry the CUDA libraries they need; the host gives the driver (NVIDIA Container
# Toolkit, `docker run --gpus all`). The install steps are README.md's (torch pinned first, then loraplex).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# Where torch comes from: the CPU build by default, a CUDA build's index for a GPU image.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# 1: the demo model is fetched at build time, so the image serves it offline; 0: fetched on first start.
ARG BAKE_DEMO=1

# A C compiler for the CPU LoRA kernel loraplex builds on first use (README.md, Setup); curl-free image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 --user-group loraplex \
    && mkdir -p /opt/loraplex /data /adapters \
    && chown loraplex:loraplex /opt/loraplex /data

WORKDIR /src
COPY pyproject.toml README.md ./
COPY loraplex ./loraplex
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" torch==2.13.0 \
    && pip install --no-cache-dir . \
    && rm -rf /src

USER 1000:1000
WORKDIR /home/loraplex
# LORAPLEX_HOME holds the demo model and the compiled kernel; /data (a volume: the disk tier of adapters
# and the Hub cache) and /adapters (mount adapters here, read-only) are meant to be mounted.
ENV LORAPLEX_HOME=/opt/loraplex \
    LORAPLEX_HOSTNAME=0.0.0.0 \
    LORAPLEX_PORT=3000 \
    LORAPLEX_DISK_CACHE_DIR=/data/adapter-cache \
    LORAPLEX_HUB_CACHE_DIR=/data/hub \
    PYTHONUNBUFFERED=1
RUN if [ "${BAKE_DEMO}" = "1" ]; then loraplex download demo; fi
VOLUME ["/data"]
EXPOSE 3000

HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LORAPLEX_PORT', '3000'), timeout=4)"]

# SIGTERM drains (in-flight requests finish for --shutdown-timeout-s, /ready answers 503 meanwhile);
# loraplex runs as PID 1 in exec form, so it gets the signal itself. Every flag is also an environment
# variable (LORAPLEX_<FLAG>); arguments after the image name are `loraplex serve` flags, e.g.
#   docker run -p 3000:3000 -v $PWD/adapters:/adapters:ro loraplex:cpu --adapter-root /adapters
STOPSIGNAL SIGTERM
ENTRYPOINT ["loraplex", "serve"]
CMD []
