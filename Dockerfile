# syntax=docker/dockerfile:1
# The liferaft node image (docs/deploy.md, "Docker").
#
# Stage 1 builds a virtualenv holding liferaft and its dependencies (all from wheels:
# no compiler is needed). Stage 2 copies only that virtualenv onto the same slim Python
# base, drops pip, and runs `liferaft node` as an unprivileged user. State lives in the
# /var/lib/liferaft volume; the config file and the TLS material are mounted at run
# time (never baked in: .dockerignore keeps certs/ and data/ out of the build context).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
COPY src ./src
RUN python -m venv /opt/liferaft \
 && /opt/liferaft/bin/pip install --no-cache-dir . \
 && /opt/liferaft/bin/pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
# One user and group, uid/gid 10001 (the Kubernetes manifests' runAsUser and fsGroup).
# The directories a container writes are created here, owned by that user, so that a
# fresh named volume mounted on them inherits the ownership.
RUN python -m pip uninstall --yes pip setuptools wheel \
 && groupadd --system --gid 10001 liferaft \
 && useradd --system --uid 10001 --gid liferaft --no-create-home \
      --home-dir /var/lib/liferaft --shell /usr/sbin/nologin liferaft \
 && install -d -o liferaft -g liferaft -m 0700 /var/lib/liferaft /etc/liferaft/certs
COPY --from=build /opt/liferaft /opt/liferaft
ENV PATH=/opt/liferaft/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LIFERAFT_HEALTH_URL=http://127.0.0.1:9001/livez
USER 10001:10001
WORKDIR /var/lib/liferaft
VOLUME ["/var/lib/liferaft"]
# peer (mutual TLS), client (TLS + JWT), metrics and health (plain HTTP): the ports the
# example configs use; the config file decides.
EXPOSE 7001 8001 9001
# /livez answers 200 while the node runs and its storage takes writes. The image has no
# curl: Python's urllib raises (exit 1) on a refused connection or a 503.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['LIFERAFT_HEALTH_URL'], timeout=2)"]
ENTRYPOINT ["liferaft"]
CMD ["node", "--config", "/etc/liferaft/node.toml"]
