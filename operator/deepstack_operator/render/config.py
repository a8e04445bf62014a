"""The runtime ConfigMap: the shared RuntimeConfig, as JSON, mounted into every pod; and
the revision it belongs to."""

from __future__ import annotations

from deepstack_operator import names
from deepstack_operator.render.common import (
    Manifest,
    content_hash,
    cr_name,
    cr_namespace,
    metadata,
    spec,
)
from deepstack_runtime.config import CONFIG_FILE, RuntimeConfig

REVISION_LENGTH = 6  # hex digits: <name (<= 36)>-language-<6> fits a StatefulSet's 52


def runtime_config(cr: Manifest) -> RuntimeConfig:
    return RuntimeConfig.from_spec(cr_name(cr), cr_namespace(cr), spec(cr))


def revision(cr: Manifest, config: RuntimeConfig) -> str:
    """What encode and language pods must share (deepstack_operator.rollout): the
    embedding contract and the image."""
    image = spec(cr)["runtime"]["image"]
    return content_hash({"contract": config.contract(), "image": image})[:REVISION_LENGTH]


def render_config_map(cr: Manifest, config: RuntimeConfig) -> Manifest:
    """One per revision: an old revision's pods keep theirs while a rollout runs."""
    meta = metadata(cr, names.config_map_name(cr_name(cr), revision(cr, config)))
    meta["labels"][names.REVISION_LABEL] = revision(cr, config)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {CONFIG_FILE: config.to_json()},
    }
