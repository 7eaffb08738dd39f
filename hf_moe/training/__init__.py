"""Training helpers: router telemetry for `Trainer`."""

from .telemetry import RouterTelemetryCallback, hyperrouter_k

__all__ = ["RouterTelemetryCallback", "hyperrouter_k"]
