"""ServerConfig: the HTTP side's settings (the engine's are EngineConfig). Light to import, so the
CLI can build its flags from these defaults without loading the web stack."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import checked
from lmforge.errors import ConfigError


@checked
@dataclass
class ServerConfig:
    """HTTP-side settings; the engine's are in EngineConfig."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None  # default: the model directory's name or the Hub name
    max_body_bytes: int = 1_000_000
    shutdown_timeout: float = 10.0  # on SIGTERM, seconds running requests get to finish before they end with an error
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535 (0: any free port), got {self.port!r}")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes must be an integer >= 1, got {self.max_body_bytes!r}")
        if self.api_key is not None:
            _check_api_key(self.api_key)
        if not self.shutdown_timeout >= 0:
            raise ConfigError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout!r}")


def _check_api_key(key: str) -> None:
    """Refuse a key that is empty (an unset variable expanded into --api-key "$KEY" would otherwise turn
    authentication off without a word) or that no client can send in a header."""
    if not isinstance(key, str) or not key:
        raise ConfigError("the API key is empty (--api-key \"\" or an empty $LMFORGE_API_KEY, often an unset "
                          "variable): give a key, or leave both out to serve without authentication")
    if key != key.strip() or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ConfigError("the API key (--api-key / $LMFORGE_API_KEY) starts or ends with white space or holds "
                          "control characters, which an HTTP header cannot carry: choose another key")
