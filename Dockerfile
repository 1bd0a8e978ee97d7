# syntax=docker/dockerfile:1
# sfox-relay: `relay run` by default; see the README and config/docker-compose.yml.

# -- builder: the project and its dependencies, installed into a virtualenv ------------------
FROM python:3.11-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH"

# Dependencies first, so that a change to the code alone reuses this layer. The otel extra
# (OpenTelemetry's SDK and OTLP exporter, ~10 MB) is loaded only when OTEL_EXPORTER_OTLP_*
# asks for traces, so the image can trace without a rebuild.
COPY pyproject.toml README.md ./
COPY relay/__init__.py relay/__init__.py
RUN pip install --no-cache-dir "./[otel]" && pip uninstall --yes sfox-relay

COPY relay/ relay/
RUN pip install --no-cache-dir --no-deps . \
    && python -m compileall -q /opt/venv/lib

# -- final: the virtualenv on a slim base, run as an unprivileged user ------------------------
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="sfox-relay" \
      org.opencontainers.image.description="Relays the sFOX enterprise users feed as signed, ordered webhooks" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin relay \
    && mkdir -p /data \
    && chown relay:relay /data

COPY --from=builder /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAY_STORE=sqlite:////data/relay.db \
    RELAY_ADMIN_ADDR=0.0.0.0:8080

# Numeric, so that orchestrators can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /data
VOLUME /data
EXPOSE 8080

# python -m relay.healthcheck: GET /healthz on the admin port RELAY_ADMIN_ADDR names
# (0.0.0.0 probed on 127.0.0.1), exit 0 on 200.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-m", "relay.healthcheck"]

ENTRYPOINT ["relay"]
CMD ["run"]
