# Hestia in a container: `docker compose up -d` (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY src ./src
RUN pip install . && rm -rf /src \
 && useradd --system --home-dir /var/lib/hestia --create-home hestia

COPY contrib/compose/hestia_config.yml /etc/hestia/hestia_config.yml
USER hestia
WORKDIR /var/lib/hestia
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v1/health', timeout=2)"
CMD ["twistd", "--nodaemon", "--pidfile=", "hestia", "--config", "/etc/hestia/hestia_config.yml"]
