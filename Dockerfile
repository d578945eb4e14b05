# syntax=docker/dockerfile:1
# callstream images. The builder makes two wheels, the runtime's (callstream:
# the package and the services) and the emulator's (callstream-emulator, its own
# distribution in emulator/); each runtime target installs (not editable) only
# what its process needs, as a non-root user. No service image carries the
# emulator, not even in a lower layer:
#   service   (default) one image per extras set; the command picks the service:
#             docker build --build-arg EXTRAS=offline,transcribe,sentiment -t callstream .
#   emulator  moto + KVS media endpoint for compose and local runs:
#             docker build --target emulator -t callstream-emulator .
# No Docker engine runs on the development machines: CI lints this file with
# hadolint (make lint); tests run the emulator target's command as a process.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY callstream ./callstream
COPY services ./services
COPY emulator ./emulator
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels/runtime . \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels/emulator ./emulator

FROM python:${PYTHON_VERSION}-slim AS base
ARG PYTHON_VERSION
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    SITE_PACKAGES=/opt/venv/lib/python${PYTHON_VERSION}/site-packages
RUN python -m venv /opt/venv \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin callstream
WORKDIR /home/callstream

FROM base AS service
# Extras of pyproject.toml: none for ingest, recorder and persister; offline and/or
# transcribe for the transcriber; sentiment for the sample consumer.
ARG EXTRAS=""
COPY --from=builder /wheels/runtime /wheels
SHELL ["/bin/sh", "-eu", "-c"]
# The project's own wheel: its dependencies are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN wheel="$(echo /wheels/callstream-*.whl)"; \
    pip install --no-cache-dir "${wheel}${EXTRAS:+[$EXTRAS]}"; \
    rm -rf /wheels
# callstream.contract reads schemas/ beside its package, as in the repo and the Lambda zip.
COPY schemas ${SITE_PACKAGES}/schemas
ENV CALLSTREAM_HEALTH_PORT=8081 \
    CALLSTREAM_SPOOL_DIR=/home/callstream/spool
USER 10001
RUN mkdir -p /home/callstream/spool
# /healthz is served on 127.0.0.1:$CALLSTREAM_HEALTH_PORT inside the container.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['CALLSTREAM_HEALTH_PORT'], timeout=2)"]
CMD ["python", "-m", "services.ingest.main"]

FROM base AS emulator
COPY --from=builder /wheels /wheels
SHELL ["/bin/sh", "-eu", "-c"]
# Both wheels: the emulator's requires the runtime's; their dependencies are pinned in
# pyproject.toml and emulator/pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir /wheels/runtime/callstream-*.whl \
        /wheels/emulator/callstream_emulator-*.whl; \
    rm -rf /wheels
COPY schemas ${SITE_PACKAGES}/schemas
# The one-shot caller of docker-compose.yml plays the sample call from here.
COPY samples/call ./samples/call
USER 10001
EXPOSE 4566 4567
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:4566/moto-api/', timeout=2)"]
# Loopback only (the emulator refuses other addresses): compose runs the services
# in this container's network namespace (network_mode: service:emulator).
CMD ["python", "-m", "callstream_emulator", "--port", "4566", "--media-port", "4567", "--state-file", "/tmp/callstream-local.json"]
