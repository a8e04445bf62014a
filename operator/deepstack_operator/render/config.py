"""The runtime ConfigMap: the shared RuntimeConfig, as JSON, mounted into every pod."""

from __future__ import annotations

from deepstack_operator import names
from deepstack_operator.desired import DesiredState
from deepstack_operator.render.common import Manifest, metadata
from deepstack_runtime.config import CONFIG_FILE


def render_config_map(state: DesiredState) -> Manifest:
    """One per revision: an old revision's pods keep theirs while a rollout runs."""
    meta = metadata(state, names.config_map_name(state.name, state.revision))
    meta["labels"][names.REVISION_LABEL] = state.revision
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {CONFIG_FILE: state.config.to_json()},
    }
