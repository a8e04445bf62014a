"""A kubeconfig that authenticates as a ServiceAccount."""

from __future__ import annotations

from typing import Any


def token_kubeconfig(admin: dict[str, Any], token: str, user: str) -> dict[str, Any]:
    """A kubeconfig for the first cluster of `admin` that authenticates with a bearer
    `token` (of a ServiceAccount): the operator run locally gets exactly the permissions
    its pod would."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "local", "user": user}}],
        "current-context": user,
    }
