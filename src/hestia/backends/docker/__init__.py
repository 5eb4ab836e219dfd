"""
Containers through the Docker Engine API (Podman's too): the backend family.

- L{hestia.backends.docker.engine}: the Engine API client (one unix or TCP
  socket, its errors, the event stream);
- L{hestia.backends.docker.settings}: a service's C{docker:} section, validated;
- L{hestia.backends.docker.backend}: the C{docker} backend and the engine each
  host shares;
- L{hestia.backends.docker.discovery}: container label discovery, services
  with no YAML (it changes the gateway's services through the small
  C{ServiceRegistry} shape, so it needs nothing above the backends);
- L{hestia.backends.docker.reconnect}: the one retry rule after a lost event
  stream, for the backend and discovery alike.
"""

from hestia.backends.docker.backend import DockerBackend, DockerBackendFactory
from hestia.backends.docker.settings import DockerSettings, parse_docker_section

__all__ = ["DockerBackend", "DockerBackendFactory", "DockerSettings", "parse_docker_section"]
