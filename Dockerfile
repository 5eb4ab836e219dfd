# Hestia in a container: `docker compose up -d` (see docker-compose.yml), or
#   docker build -t hestia . && docker run -p 127.0.0.1:8080:8080 -v hestia-state:/var/lib/hestia hestia
#
# Online, `pip install /src` fetches Hestia's dependencies from the package index. Offline
# (the container test suite), HESTIA_WHEELHOUSE names a directory of the build context that
# holds Hestia's wheel and every dependency's: pip then reaches no index at all.
FROM python:3.11-slim

ARG HESTIA_WHEELHOUSE=
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/hestia/bin:$PATH

WORKDIR /src
# What is copied is decided by .dockerignore (the package sources, the compose config, a
# wheelhouse): never a .venv, a .git or a state database of the checkout.
COPY . /src
# A virtualenv, so the same lines work on python:3.11-slim and on Debian's python3.
# The plugin cache (twisted/plugins/dropin.cache) is written now, by root, from a
# directory that stays: at run time the non-root user could not write it, and Twisted
# would rescan every plugin at each start.
RUN python3 -m venv /opt/hestia \
 && if [ -n "$HESTIA_WHEELHOUSE" ]; then \
        pip install --no-index --find-links "/src/$HESTIA_WHEELHOUSE" hestia; \
    else \
        pip install /src; \
    fi \
 && install -D -m 0644 /src/contrib/compose/hestia_config.yml /etc/hestia/hestia_config.yml \
 && cd / && rm -rf /src \
 && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && python -c "import sys; from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker; sys.exit(0 if any(p.tapname == 'hestia' for p in getPlugins(IServiceMaker)) else 'no twistd hestia plugin')" \
 && test -f /opt/hestia/lib/python3*/site-packages/twisted/plugins/dropin.cache \
 && useradd --system --home-dir /var/lib/hestia --create-home --shell /usr/sbin/nologin hestia

USER hestia
WORKDIR /var/lib/hestia
# The state database (state_path in the compose config).
VOLUME /var/lib/hestia
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v1/health', timeout=2)"
CMD ["twistd", "--nodaemon", "--pidfile=", "hestia", "--config", "/etc/hestia/hestia_config.yml"]
