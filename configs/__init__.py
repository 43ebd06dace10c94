"""Typed dcrl configuration and bundled TOML presets (``tiny.toml`` runs on 2 CPU cores)."""

from configs.schema import (
    PRESET_DIR,
    ConfigError,
    DcrlConfig,
    add_config_args,
    config_from_args,
    load_config,
    resolve_preset,
)

__all__ = ["PRESET_DIR", "ConfigError", "DcrlConfig", "add_config_args", "config_from_args", "load_config", "resolve_preset"]
