"""Read an experiment file: YAML + dotted overrides → a checked Config; write one back.

``load_config("configs/tiny.yaml", ["train.lr=1e-4", "data.truncation.lsp=0.5"])`` reads
the file, applies the overrides (values parsed as YAML scalars), builds the Config (unknown
keys refused with the closest valid name, each value checked against its field) and runs the
cross-field checks (essence.config.checks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from essence.config.checks import validate
from essence.config.schema import Config, _build, to_dict
from essence.errors import EssenceError
from essence.io import write_text_atomic
from essence.paths import resolve


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' → ('a.b', value parsed as a YAML scalar or list)."""
    if "=" not in text:
        raise EssenceError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML experiment file (or defaults when None) and apply dotted overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(resolve(str(path)))
        if not path.is_file():
            raise EssenceError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise EssenceError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise EssenceError(f"config file {path} must hold a mapping at the top level")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    config = _build(Config, tree, "")
    validate(config)
    return config



def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))
