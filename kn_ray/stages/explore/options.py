"""`kn-ray explore`'s options, declared once (defaults, help, flags): the CLI derives its flags
from them (kn_ray.interfaces.declared). Importing this module is cheap (no web stack)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from kn_ray.choices import MEMORY_LIMIT
from kn_ray.fields import option


@dataclass(frozen=True)
class ExploreOptions:
    host: str = option("127.0.0.1", "address to bind; anything beyond loopback exposes the run to the network")
    port: int = option(0, "port to bind (default: 0, a free port)")
    memory_limit: str = option(MEMORY_LIMIT, "DuckDB memory limit of the queries")
    refresh: float = option(5.0, "seconds between checks for newly committed shards and stage tables")

    def check(self) -> "ExploreOptions":
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must lie in [0, 65535], got {self.port}")
        if self.refresh < 0:
            raise ValueError(f"--refresh must be >= 0, got {self.refresh}")
        return self

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
