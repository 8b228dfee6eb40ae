"""Ray Serve deployment of diffmoe models: OpenAI-compatible API, continuous batching through
``diffmoe.generation.Engine``, autoscaling, and expert-parallel replicas."""

from .config import AutoscalingSettings, ServeConfig

__all__ = ["AutoscalingSettings", "ServeConfig"]
