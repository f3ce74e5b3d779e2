"""What a tunnelwatch process says about itself, the same on the agent and the mesh: the
process and platform collectors of the Prometheus client (CPU, memory, open files, start time,
Python version; as every exporter has them), ``tunnelwatch_build_info`` and whether the config
in use came from the last load or reload (blackbox_exporter's and Prometheus's
``config_last_reload_successful``)."""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from probes import __version__

__all__ = ["ConfigReloads", "SelfCollector", "self_registry"]


@dataclass
class ConfigReloads:
    """The outcome of the last config load or reload, and when one last succeeded."""

    successful: bool = False
    last_success: float = 0.0  # Unix seconds; 0 = never

    def succeeded(self, now: float | None = None) -> None:
        self.successful = True
        self.last_success = time.time() if now is None else now

    def failed(self) -> None:
        self.successful = False


class SelfCollector(Collector):
    def __init__(self, role: str, reloads: ConfigReloads) -> None:
        self.role = role
        self.reloads = reloads

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("tunnelwatch_build_info",
                                 "Always 1; the labels say which build runs.",
                                 labels=["version", "python", "role"])
        info.add_metric([__version__, platform.python_version(), self.role], 1)
        yield info
        yield GaugeMetricFamily(
            "tunnelwatch_config_last_reload_successful",
            "1 when the last config load or reload succeeded, 0 when it was refused (the "
            "process runs on the config it had).", value=1 if self.reloads.successful else 0)
        yield GaugeMetricFamily(
            "tunnelwatch_config_last_reload_success_timestamp_seconds",
            "Unix time of the last config load or reload that succeeded.",
            value=self.reloads.last_success)


def self_registry(role: str, reloads: ConfigReloads,
                  registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """``registry`` (a new one by default) with the process, platform and GC collectors and
    :class:`SelfCollector`. The default registry's copies are left alone: a process may run
    both an agent and a mesh (tests, the demo) and each exposes its own registry."""
    registry = registry or CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(SelfCollector(role, reloads))
    return registry

