"""
Remote machines started and stopped by Semaphore UI tasks: the backend family.

- L{hestia.backends.semaphore.settings}: the C{semaphore:} settings (top level
  and per service, environment included);
- L{hestia.backends.semaphore.client}: the Semaphore API client;
- L{hestia.backends.semaphore.backend}: the C{semaphore} backend, which
  records what it launched before acting on it (a running VM must not be forgotten).
"""

from hestia.backends.semaphore.backend import SemaphoreBackend, SemaphoreBackendFactory

__all__ = ["SemaphoreBackend", "SemaphoreBackendFactory"]
