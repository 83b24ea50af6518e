# authsvc server image. Multi-stage: wheels are built and installed into a virtualenv in the
# first stage; the runtime stage gets only that virtualenv, runs as a non-root user, and
# writes nothing outside /data (a volume), so it runs with a read-only root filesystem.
#
#   buildah bud --build-arg BASE_IMAGE=python:3.11-slim-bookworm -t authsvc .   (or docker build)
#   scripts/check-image.sh BASE_IMAGE builds it and proves it starts healthy.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY clients/python/ clients/python/
COPY pyproject.toml ./
COPY authsvc/ authsvc/
# Both distributions as wheels, then installed from those wheels only (no editable, no sources).
RUN python -m pip wheel --no-deps --wheel-dir /wheels ./clients/python . \
 && python -m venv /opt/authsvc \
 && /opt/authsvc/bin/pip install --find-links /wheels /wheels/authsvc-*.whl \
 && /opt/authsvc/bin/python -m compileall -q /opt/authsvc/lib

FROM ${BASE_IMAGE}
# A fixed uid/gid, so volume ownership can be set from outside (e.g. fsGroup 10001). Written
# to /etc/passwd directly: slim bases need not ship useradd.
RUN echo 'authsvc:x:10001:10001:authsvc:/nonexistent:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'authsvc:x:10001:' >> /etc/group \
 && mkdir -p /data \
 && chown 10001:10001 /data \
 && chmod 0700 /data
COPY --from=build /opt/authsvc /opt/authsvc
# Outside dev mode the server still needs AUTHSVC_KEK (or AUTHSVC_KEK_FILE) and AUTHSVC_ISSUER,
# and TLS (AUTHSVC_TLS_CERT/KEY) or AUTHSVC_TLS_TERMINATED_UPSTREAM=true on 0.0.0.0. With TLS,
# the HEALTHCHECK needs AUTHSVC_HEALTH_TLS_CA and AUTHSVC_HEALTH_TLS_SERVER_NAME.
ENV PATH=/opt/authsvc/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AUTHSVC_LISTEN=0.0.0.0:50051 \
    AUTHSVC_HTTP_LISTEN=0.0.0.0:8080 \
    AUTHSVC_DATABASE_URL=sqlite:////data/authsvc.db
WORKDIR /data
VOLUME ["/data"]
USER 10001:10001
EXPOSE 50051 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["authsvc", "health", "--timeout", "3"]
ENTRYPOINT ["authsvc"]
CMD ["serve"]
