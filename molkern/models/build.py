"""Build a network from a plain config (YAML/JSON-friendly): strings and numbers only, unknown keys rejected."""

import inspect
from typing import Any, Mapping

from .. import groups
from .network import MolkernNet

MODEL_KEYS = tuple(p for p in inspect.signature(MolkernNet.__init__).parameters if p != "self")


def build_model(config: Mapping[str, Any]) -> MolkernNet:
    """MolkernNet from a config mapping; `group` is a name ("so2") or a mapping {"name": "cn", "n": 4, "axis": [0, 0, 1]}.

    The config is kept on the model as `model.config` (a plain dict) so checkpoints can rebuild it.

    Example:
        >>> model = build_model({"group": {"name": "so2", "axis": [0, 0, 1]}, "lmax": 2, "num_channels": 32})
    """
    unknown = sorted(set(config) - set(MODEL_KEYS))
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown}; valid keys: {list(MODEL_KEYS)}")
    kwargs = dict(config)
    group = kwargs.get("group", "o3")
    if isinstance(group, Mapping):
        params = dict(group)
        if "name" not in params:
            raise ValueError(f"model config 'group' mapping needs a 'name', got {group}")
        kwargs["group"] = groups.get(params.pop("name"), **params)
    elif not isinstance(group, str):
        raise ValueError(f"model config 'group' must be a name or a mapping, got {type(group).__name__}")
    model = MolkernNet(**kwargs)
    model.config = dict(config)
    return model
