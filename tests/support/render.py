"""Rendering a custom resource as the operator does, for the renderer tests."""

from __future__ import annotations

from typing import Any

from deepstack_operator.desired import desired_state
from deepstack_operator.render import Capabilities, render_all
from devkit.specs import defaulted

NO_EXTRAS = Capabilities()


def render(
    cr: dict[str, Any],
    capabilities: Capabilities = NO_EXTRAS,
    replicas: dict[str, int | None] | None = None,
) -> list[dict[str, Any]]:
    """The children of a stored object (its spec defaulted again after a test's edit, as
    the API server would), through its desired state."""
    return render_all(desired_state(defaulted(cr)), capabilities, replicas)
