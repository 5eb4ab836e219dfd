"""
Hestia's configuration: the model of C{hestia_config.yml} and the tools to read it.

The file is validated strictly and completely before anything runs, because a
gateway that silently ignores a misspelt ``idle_timout`` keeps an expensive
machine running for ever.  Every problem is reported as one line naming the
file, the service and the key (L{ConfigError}), and a reload that fails leaves
the running configuration in place (the caller keeps the old L{Config}).

Environment variables follow the seed README's style: C{HESTIA_CONFIG},
C{HESTIA_LISTEN}, and per service C{<NAME>_URL}, C{<NAME>_IDLE_TIMEOUT},
C{<NAME>_KEEP_WARM}, ... where C{<NAME>} is the service name upper-cased with
C{-} written as C{_}.

This package is a leaf of the import graph: it imports no Hestia module
outside it.  A feature parses its own section with L{Reader}, next to its
code; L{hestia.loader} reads the file and calls every section's parser, so a
reload validates everything in one place.
"""

from hestia.config.document import read_document, yaml_document
from hestia.config.model import (
    BACKEND_SECTIONS,
    DEFAULT_CONFIG_FILE,
    HEALTH_KEYS,
    MAX_BODY_SIZE,
    MAX_COUNT,
    MAX_DURATION,
    MAX_HEADER_SIZE,
    MAX_ID,
    ROUTING_KEYS,
    SERVER_KEYS,
    SERVICE_KEYS,
    SERVICE_NAME,
    TOP_LEVEL_KEYS,
    TUNABLE_KEYS,
    Config,
    ConfigError,
    HealthCheck,
    ServerConfig,
    ServiceConfig,
    Tunables,
    describe_command,
    env_prefix,
)
from hestia.config.parse import CoreDocument, ServiceParser, parse_core, parse_service, zero_config_services
from hestia.config.reader import BOOLEAN_WORDS, Reader, describe

__all__ = [
    "BACKEND_SECTIONS",
    "BOOLEAN_WORDS",
    "DEFAULT_CONFIG_FILE",
    "HEALTH_KEYS", "MAX_BODY_SIZE",
    "MAX_COUNT",
    "MAX_DURATION",
    "MAX_HEADER_SIZE",
    "MAX_ID",
    "ROUTING_KEYS", "SERVER_KEYS",
    "SERVICE_KEYS",
    "SERVICE_NAME",
    "TOP_LEVEL_KEYS",
    "TUNABLE_KEYS",
    "Config",
    "ConfigError",
    "CoreDocument",
    "HealthCheck",
    "Reader",
    "ServerConfig",
    "ServiceConfig",
    "ServiceParser",
    "Tunables",
    "describe",
    "describe_command",
    "env_prefix",
    "parse_core",
    "parse_service",
    "read_document",
    "yaml_document",
    "zero_config_services",
]
