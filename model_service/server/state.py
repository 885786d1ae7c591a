"""What the adapters share in one process: settings, the model and engine, and the service phase."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from model_service.config import Settings
from model_service.llm.engine import Engine, EngineNotReady
from model_service.llm.metrics import EngineMetrics


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class ServiceState:
    settings: Settings
    model_name: str
    phase: Phase = Phase.LOADING
    engine: Engine | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    metrics: EngineMetrics = field(init=False)

    def __post_init__(self) -> None:
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.metrics = EngineMetrics(self.registry, self.model_name)

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY and self.engine is not None and self.engine.accepting

    def ready_engine(self) -> Engine:
        """The engine, if the service takes work now; else EngineNotReady (503 / UNAVAILABLE)."""
        if not self.ready:
            raise EngineNotReady(f"the model service is {self.phase.value}; not accepting requests")
        return self.engine
