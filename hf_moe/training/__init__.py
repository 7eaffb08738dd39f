"""Training helpers: router telemetry for `Trainer`."""

from .telemetry import RouterTelemetryCallback, RoutingProbe, hyperrouter_k

__all__ = ["RouterTelemetryCallback", "RoutingProbe", "hyperrouter_k"]
