"""The runtime ConfigMap: the shared RuntimeConfig, as JSON, mounted into every pod."""

from __future__ import annotations

from deepstack_operator import names
from deepstack_operator.render.common import Manifest, cr_name, cr_namespace, metadata, spec
from deepstack_runtime.config import CONFIG_FILE, RuntimeConfig


def runtime_config(cr: Manifest) -> RuntimeConfig:
    return RuntimeConfig.from_spec(cr_name(cr), cr_namespace(cr), spec(cr))


def render_config_map(cr: Manifest, config: RuntimeConfig) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(cr, names.config_map_name(cr_name(cr))),
        "data": {CONFIG_FILE: config.to_json()},
    }
