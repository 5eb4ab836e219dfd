"""
Hestia: a personal on-demand service gateway.

A reverse proxy that starts the service behind it on the first request, holds
requests while it starts, and stops it again when nobody has used it for a while.
"""

__version__ = "0.1.0"
