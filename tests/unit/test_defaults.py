"""The CRD schema is the one source of defaults: the runtime's tables of the transfer knobs
and the router's limits must match it, and everything that has a default of its own (the
configuration's dataclasses, the transfer's settings, the router's options and flags, the
operator's rendering) must equal those tables."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from deepstack_operator.render.workloads import ROUTER_LIMIT_FLAGS
from deepstack_runtime.cli import build_parser
from deepstack_runtime.config import (
    CONTRACT_HASH_LENGTH,
    HTTP_PORT,
    ROUTER_LIMIT_TABLE,
    TRANSFER_KNOBS,
    ModelConfig,
    RuntimeConfig,
    TransferConfig,
    stable_digest,
)
from deepstack_runtime.servers.instances import Pool
from deepstack_runtime.servers.router import RouterOptions
from deepstack_runtime.transfer.settings import TransferSettings
from devkit.specs import apply_defaults

REPO = Path(__file__).resolve().parents[2]
CRD_FILES = [
    REPO / "crds" / "deepstackdisaggregations.yaml",
    REPO / "charts" / "deepstack-disagg" / "crds" / "deepstackdisaggregations.yaml",
]
# spec.transfer's fields that are the operator's alone (no runtime knob).
OPERATOR_ONLY_TRANSFER = {"backend", "rdmaResourceName"}
Schema = dict[str, Any]


def spec_schema(path: Path) -> Schema:
    crd = yaml.safe_load(path.read_text())
    (version,) = crd["spec"]["versions"]
    schema: Schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


@pytest.fixture(params=CRD_FILES, ids=["crds", "chart"])
def spec(request: pytest.FixtureRequest) -> Schema:
    return spec_schema(request.param)


def lookup(schema: Schema, path: str) -> tuple[Schema, list[tuple[Schema, list[str]]]]:
    """The node at dotted `path` under `schema`, and each object on the way (`schema`
    included) with the rest of the path below it, for checking their own `default`s."""
    keys = path.split(".")
    node, ancestors = schema, []
    for i, key in enumerate(keys):
        ancestors.append((node, keys[i:]))
        properties = node.get("properties", {})
        assert key in properties, f"{path}: no {key!r} in the CRD schema"
        node = properties[key]
    return node, ancestors


def check_default(schema: Schema, path: str, default: Any) -> Schema:
    """The CRD's default at `path` (and any default of an object above it that names the
    field) equals `default`; None: the CRD has no default there."""
    node, ancestors = lookup(schema, path)
    expected = list(default) if isinstance(default, tuple) else default
    if default is None:
        assert "default" not in node, f"{path}: the CRD has a default the runtime does not"
    else:
        assert "default" in node, f"{path}: the CRD has no default (the runtime's: {default!r})"
        assert node["default"] == expected, f"{path}: CRD {node['default']!r} != {default!r}"
        assert type(node["default"]) is type(expected) or {
            type(node["default"]),
            type(expected),
        } <= {int, float}, f"{path}: CRD default {node['default']!r} is not a {type(expected)}"
    for ancestor, rest in ancestors:
        value = ancestor.get("default")
        for key in rest:
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            assert value == expected, f"{path}: an object default above it says {value!r}"
    if default is not None:
        low, high = node.get("minimum", default), node.get("maximum", default)
        assert low <= default <= high, f"{path}: {default!r} outside {low}-{high}"
    return node


def leaves(schema: Schema, prefix: str = "") -> set[str]:
    out = set()
    for key, node in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        out |= leaves(node, f"{path}.") if node.get("properties") else {path}
    return out


# --- the transfer knobs ------------------------------------------------------------------


def test_every_transfer_knob_has_the_crd_default(spec: Schema) -> None:
    for knob in TRANSFER_KNOBS:
        check_default(spec, f"transfer.{knob.crd_path}", knob.default)


def test_every_runtime_field_of_spec_transfer_is_a_knob(spec: Schema) -> None:
    crd = leaves(spec["properties"]["transfer"]) - OPERATOR_ONLY_TRANSFER
    assert crd == {knob.crd_path for knob in TRANSFER_KNOBS}


def test_transfer_config_defaults_are_the_table() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(TransferConfig)}
    assert fields == {knob.field: knob.default for knob in TRANSFER_KNOBS}
    config = TransferConfig()
    for knob in TRANSFER_KNOBS:
        assert getattr(config, knob.field) == knob.default, knob.field


def test_from_spec_reads_each_knob_at_its_crd_path(spec: Schema) -> None:
    base = {"model": {"path": "/models/m", "servedModelName": "m"}, "runtime": {}}
    assert RuntimeConfig.from_spec("x", "y", base).transfer == TransferConfig()
    stored = apply_defaults(
        spec["properties"]["transfer"], spec["properties"]["transfer"].get("default", {})
    )
    assert (
        RuntimeConfig.from_spec("x", "y", {**base, "transfer": stored}).transfer == TransferConfig()
    )
    # Each knob from its own path: a value unlike any default.
    given: dict[str, Any] = {}
    for i, knob in enumerate(TRANSFER_KNOBS):
        *parents, key = knob.crd_path.split(".")
        node = given
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = f"value-{i}"
    transfer = TransferConfig.from_spec(given)
    for i, knob in enumerate(TRANSFER_KNOBS):
        assert getattr(transfer, knob.field) == f"value-{i}", knob.field


def test_transfer_settings_defaults_are_the_table() -> None:
    mapped = {knob.settings: knob.default for knob in TRANSFER_KNOBS if knob.settings}
    assert mapped.keys() == {f.name for f in dataclasses.fields(TransferSettings)}
    defaults = TransferSettings()
    for name, default in mapped.items():
        assert getattr(defaults, name) == default, name
    assert TransferSettings.from_config(TransferConfig()) == defaults
    config = dataclasses.replace(TransferConfig(), handshake_timeout_seconds=3, checksum=False)
    settings = TransferSettings.from_config(config)
    assert (settings.handshake_timeout, settings.checksum) == (3, False)


# --- the router's limits -----------------------------------------------------------------

CRD_TYPES = {"integer": int, "number": float}


def test_every_router_limit_has_the_crd_default(spec: Schema) -> None:
    exposed = [limit for limit in ROUTER_LIMIT_TABLE if limit.crd_key]
    assert exposed, "no router limit in the CRD"
    for limit in exposed:
        node = check_default(spec, f"router.limits.{limit.crd_key}", limit.default)
        assert CRD_TYPES[node["type"]] is limit.type, limit.crd_key
        assert isinstance(limit.default, limit.type), limit.option
    crd = set(spec["properties"]["router"]["properties"]["limits"]["properties"])
    assert crd == {limit.crd_key for limit in exposed}


def test_router_options_defaults_are_the_table() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(RouterOptions)}
    for limit in ROUTER_LIMIT_TABLE:
        assert fields[limit.option] == limit.default, limit.option


def test_router_flags_are_the_table() -> None:
    args = build_parser().parse_args(["router", "--config", "c.json"])
    for limit in ROUTER_LIMIT_TABLE:
        assert limit.flag == "--" + limit.option.replace("_", "-")
        assert getattr(args, limit.option) == limit.default, limit.flag
        given = build_parser().parse_args(["router", "--config", "c.json", limit.flag, "3"])
        assert getattr(given, limit.option) == limit.type("3"), limit.flag


def test_the_operator_renders_router_limits_from_the_table() -> None:
    rendered = {key: (row.flag, row.default) for key, row in ROUTER_LIMIT_FLAGS.items()}
    assert rendered == {
        limit.crd_key: (limit.flag, limit.default) for limit in ROUTER_LIMIT_TABLE if limit.crd_key
    }


# --- the HTTP port, the digest -----------------------------------------------------------


def test_the_router_port_default_is_the_http_port(spec: Schema) -> None:
    check_default(spec, "router.port", HTTP_PORT)
    fields = {f.name: f.default for f in dataclasses.fields(RuntimeConfig)}
    assert fields["http_port"] == HTTP_PORT
    assert Pool("encode", []).port == HTTP_PORT
    base = {"model": {"path": "/models/m", "servedModelName": "m"}, "runtime": {}}
    url = RuntimeConfig.from_spec("x", "y", base).endpoints.router_url
    assert url == f"http://x-router.y.svc:{HTTP_PORT}"


def test_stable_digest_is_the_sha256_of_sorted_compact_json() -> None:
    value = {"b": [1, {"d": 2, "c": 3}], "a": "x"}
    expected = hashlib.sha256(b'{"a":"x","b":[1,{"c":3,"d":2}]}').hexdigest()
    assert stable_digest(value) == expected
    assert stable_digest(json.loads(json.dumps(value))) == expected
    config = RuntimeConfig("x", "y", "reference", ModelConfig("/models/m", "m"))
    assert config.contract_hash() == stable_digest(config.contract())[:CONTRACT_HASH_LENGTH]
