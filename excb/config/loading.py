"""Reading a config: YAML file + ``section.key=value`` overrides, coerced to the declared types, validated; and
writing one back with credentials redacted."""

from __future__ import annotations

import types
from dataclasses import fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from excb.config.sections import SECRET_KEYS, ConfigError, ExcbConfig
from excb.config.validation import validate


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the declared field type, or raise naming the key."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):  # int | list[int]: a list takes the list form
        options = get_args(hint)
        want_list = isinstance(value, (list, tuple))
        chosen = next((h for h in options if isinstance(h, type) and type(value) is h), None)  # bool | str
        if chosen is None:
            chosen = next((h for h in options if (get_origin(h) is list) == want_list), options[0])
        return _coerce(value, chosen, key)
    if origin is dict:
        _kt, vt = get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _section_update(section: Any, values: dict[str, Any], prefix: str) -> None:
    hints = get_type_hints(type(section))
    names = {f.name for f in fields(section)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}.{key}' (known: {', '.join(sorted(names))})")
        setattr(section, key, _coerce(value, hints[key], f"{prefix}.{key}"))


def from_dict(raw: dict[str, Any] | None) -> ExcbConfig:
    """Build a config from a nested mapping (sections → keys); unknown keys raise ConfigError."""
    cfg = ExcbConfig()
    sections = {f.name for f in fields(cfg)}
    for name, values in (raw or {}).items():
        if name not in sections:
            raise ConfigError(f"unknown config section '{name}' (known: {', '.join(sorted(sections))})")
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{name}' must be a mapping, got {values!r}")
        _section_update(getattr(cfg, name), values, name)
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` → (section, key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key '{path}' must be section.key (e.g. train.epochs=5)")
    return parts[0], parts[1], yaml.safe_load(raw)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExcbConfig:
    """Read a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"config section '{section}' must be a mapping")
        raw[section][key] = value
    return validate(from_dict(raw))



def redacted_dict(cfg: ExcbConfig) -> dict[str, Any]:
    """The config as a dict with storage credentials replaced by ``***`` (safe to save or print)."""
    d = cfg.to_dict()
    for key in SECRET_KEYS:
        if d["storage"].get(key):
            d["storage"][key] = "***"
    return d


def dump_yaml(cfg: ExcbConfig) -> str:
    """YAML of the config, credentials redacted."""
    return yaml.safe_dump(redacted_dict(cfg), sort_keys=False)
