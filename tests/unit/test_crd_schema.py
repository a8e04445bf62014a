"""Offline checks of the CRD file: the schema is documented, bounded and structural."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml

from devkit.crd import CRD_FILE, EXAMPLES, load

Schema = dict[str, Any]


def walk(schema: Schema, path: str) -> Iterator[tuple[str, Schema]]:
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def root_schema() -> Schema:
    crd = load(CRD_FILE)
    (version,) = crd["spec"]["versions"]
    schema: Schema = version["schema"]["openAPIV3Schema"]
    return schema


def test_every_spec_and_status_field_has_a_description() -> None:
    root = root_schema()
    missing = [
        path
        for top in ("spec", "status")
        for path, node in walk(root["properties"][top], top)
        # An array's items and a map's values are described by the array or map itself.
        if not path.endswith(("{}", "[]")) and not node.get("description")
    ]
    assert missing == []


def test_every_string_and_list_is_bounded() -> None:
    """CEL cost estimation needs bounds; unbounded input is also a DoS risk."""
    unbounded = []
    for path, node in walk(root_schema()["properties"]["spec"], "spec"):
        if node.get("type") == "string" and "enum" not in node and "maxLength" not in node:
            unbounded.append(path)
        if node.get("type") == "array" and "maxItems" not in node:
            unbounded.append(path)
    assert unbounded == []


def test_spec_rejects_unknown_fields_except_documented_passthroughs() -> None:
    passthrough = sorted(
        path
        for path, node in walk(root_schema()["properties"]["spec"], "spec")
        if node.get("x-kubernetes-preserve-unknown-fields")
    )
    assert passthrough == [
        "spec.encode.affinity",
        "spec.encode.env[].valueFrom",
        "spec.language.affinity",
        "spec.language.env[].valueFrom",
        "spec.router.affinity",
    ]


def test_every_cel_rule_has_a_message() -> None:
    rules = [
        (path, rule)
        for path, node in walk(root_schema(), "")
        for rule in node.get("x-kubernetes-validations", [])
    ]
    assert len(rules) >= 15
    assert all(rule.get("message") for _, rule in rules), rules


def test_examples_are_single_documents_of_the_kind() -> None:
    assert len(EXAMPLES) >= 2
    for path in EXAMPLES:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert len(docs) == 1, path
        assert docs[0]["apiVersion"] == "disagg.deepstack.dev/v1alpha1"
        assert docs[0]["kind"] == "DeepStackDisaggregation"
