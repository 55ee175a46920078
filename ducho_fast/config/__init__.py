"""Config loading: schema, Ducho compatibility, overrides, resolution."""

from __future__ import annotations

from ducho_fast.config.load import load_config
from ducho_fast.config.model import Config, Job, ModelSpec, OutputOptions, RuntimeOptions

__all__ = ["Config", "Job", "ModelSpec", "OutputOptions", "RuntimeOptions", "load_config"]
