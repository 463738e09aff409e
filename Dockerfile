# syntax=docker/dockerfile:1
# One image for every toolmesh service; the argument picks the service:
#   docker run IMAGE                   -> python -m gateway
#   docker run IMAGE services.auth     -> python -m services.auth
#   docker run --entrypoint toolmesh IMAGE migrate --service auth
#
# Both stages use the same exact Python tag. Release pipelines should additionally pin the
# digest (python:3.11.14-slim-bookworm@sha256:...) once it is resolved against the registry;
# no registry is reachable from the build machines that wrote this file.

############################ builder ############################
FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

# Compilers only here, for any dependency that has no wheel for this platform.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Build tools (the code generator, the build backend) in a virtualenv of their own, which never
# reaches the final stage. Every package is pinned with its hash (locks/, `make lock`).
COPY locks/build.txt locks/runtime.txt /tmp/locks/
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --require-hashes --requirement /tmp/locks/build.txt

# The runtime virtualenv gets the runtime lock only, installed by the build venv's pip (so it
# has no pip of its own); this layer is reused until the lock changes.
RUN python -m venv --without-pip /opt/venv \
    && /opt/build/bin/pip --python /opt/venv/bin/python install --require-hashes \
        --requirement /tmp/locks/runtime.txt
ENV PATH=/opt/venv/bin:$PATH

COPY pyproject.toml README.md ./
COPY protos ./protos
COPY services ./services
COPY gateway ./gateway
COPY cli ./cli
COPY mcpface ./mcpface

# Generated contract code goes into the app directory (./toolmesh), exactly as `make gen` does,
# so that the wheel below packages it with the services.
RUN /opt/build/bin/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. \
        --grpc_python_out=. $(find protos -name '*.proto') \
    && test -f toolmesh/gateway/v1/gateway_pb2_grpc.py

# The project itself, with no dependency resolution: everything it needs is already locked in.
# pip compiles the bytecode here, because the final root filesystem is read-only.
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/dist . \
    && /opt/build/bin/pip --python /opt/venv/bin/python install --no-deps /tmp/dist/*.whl \
    && /opt/venv/bin/python -c "import services.kit.server, gateway, toolmesh.gateway.v1.gateway_pb2_grpc" \
    && ! /opt/venv/bin/python -c "import grpc_tools" 2>/dev/null

############################ final ############################
FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="toolmesh" \
      org.opencontainers.image.description="toolmesh gRPC services (gateway, auth, router, memory, telemetry)" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed uid/gid so Kubernetes can state runAsUser/runAsGroup/fsGroup 10001 and check it.
RUN groupadd --system --gid 10001 toolmesh \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin toolmesh \
    && mkdir -p /var/lib/toolmesh \
    && chown 10001:10001 /var/lib/toolmesh \
    && chmod 0700 /var/lib/toolmesh \
    && python -m pip uninstall --yes pip setuptools wheel 2>/dev/null || true

# The virtualenv carries the services and the generated code; nothing else comes across
# (no compilers, no pip cache, no build context, no secrets).
COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    TOOLMESH_DATA_DIR=/var/lib/toolmesh \
    TOOLMESH_HOST=0.0.0.0

# The only place a service writes (SQLite in development, auth key files, queues).
# Everything else can be mounted read-only (readOnlyRootFilesystem in Kubernetes).
VOLUME ["/var/lib/toolmesh"]

# Code lives in the virtualenv; /app is a root-owned working directory that holds only the
# mTLS health probe, which Kubernetes runs as an exec probe when the gRPC port speaks mTLS
# (kubelet's native gRPC probe has no TLS).
WORKDIR /app
COPY deploy/docker/grpc_health_tls.py /app/grpc_health_tls.py

USER 10001:10001

# gRPC service ports and their Prometheus metrics ports.
EXPOSE 50051 50052 50053 50054 50055 9451 9452 9453 9454 9455

# checkov:skip=CKV_DOCKER_2: no HEALTHCHECK on purpose, Kubernetes runs native gRPC probes (below)
# No HEALTHCHECK: Kubernetes probes the standard grpc.health.v1 service natively (grpc probes),
# which also reports NOT_SERVING while a pod drains; a Docker HEALTHCHECK would need an extra
# client binary or a Python process per check, and Kubernetes ignores it anyway.

# python is PID 1 and handles SIGTERM itself (health -> NOT_SERVING, drain, clean-up).
ENTRYPOINT ["python", "-m"]
CMD ["gateway"]
