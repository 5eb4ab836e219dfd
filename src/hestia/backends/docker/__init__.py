"""
Containers through the Docker Engine API (Podman's too): the backend family.

- L{hestia.backends.docker.engine}: the Engine API client (one unix or TCP
  socket, its errors, the event stream);
- L{hestia.backends.docker.settings}: a service's C{docker:} section, validated;
- L{hestia.backends.docker.backend}: the C{docker} backend and the engine each
  host shares.

Container label discovery builds services for the gateway, so it sits above
the gateway, in L{hestia.discovery}, and uses both.
"""

from hestia.backends.docker.backend import DockerBackend, DockerBackendFactory
from hestia.backends.docker.settings import DockerSettings, parse_docker_section

__all__ = ["DockerBackend", "DockerBackendFactory", "DockerSettings", "parse_docker_section"]
