"""Dashboards and alerts against real Prometheus tooling: every query parses, every alert
passes promtool's unit tests, and a real Prometheus scraping the runtime servers and the
operator answers every panel's query with at least one series."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deepstack_runtime.models.tiny import make_tiny_model
from devkit.cluster import REPO, Cluster, wait_for
from devkit.crd import install_crd, minimal
from devkit.runtime import (
    data_url,
    free_port,
    get,
    png,
    post,
    runtime_config,
    serving_stack,
)
from tests.support.operator import OperatorProcess, wait_for_status

CHART = REPO / "charts" / "deepstack-disagg"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL) of every panel target."""
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                out.append((path.stem, panel["title"], target["expr"]))
    return out


def concrete(expr: str, window: str = "1m") -> str:
    """The query as Grafana would send it with every variable on "All"."""
    return (
        expr.replace("$__rate_interval", window)
        .replace('"$namespace"', '".*"')
        .replace('"$pod"', '".*"')
    )


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboard_is_templated_and_documented(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert {"namespace", "pod"} <= set(variables)
    assert dashboard["uid"].startswith("deepstack-")
    for panel in dashboard["panels"]:
        assert panel["description"], panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            # Range selectors: "}[window]" (a "[45]" inside a label regex is not one).
            for window in re.findall(r"\}\[([^\]]+)\]", target["expr"]):
                assert window == "$__rate_interval", (panel["title"], target["expr"])


def test_every_query_parses(tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": f"panel:{i}", "expr": concrete(expr)}
                    for i, (_, _, expr) in enumerate(queries())
                ],
            }
        ]
    }
    path = tmp_path / "panels.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries())} rules found" in result.stdout


def test_alert_rules_pass_promtool_unit_tests() -> None:
    check = subprocess.run(
        [PROMTOOL, "check", "rules", "rules.yaml"],
        cwd=CHART / "alerts",
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 6 rules found" in check.stdout
    result = subprocess.run(
        [PROMTOOL, "test", "rules", "rules_test.yaml"],
        cwd=CHART / "alerts",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# --- a real Prometheus ------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus_with_traffic(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    root = tmp_path_factory.mktemp("prom")
    model = make_tiny_model(root / "model", seed=3)
    config_file = root / "config.json"
    config_file.write_text(
        runtime_config(model, blockTokens=4, defaultAllocationTokens=8, poolBlocks=256).to_json()
    )
    install_crd(cluster)
    namespace = f"prom-{free_port()}"
    cluster.kubectl("create", "namespace", namespace)
    with (
        OperatorProcess(
            cluster, "--standalone", "--namespace", namespace, log=root / "operator.log"
        ) as operator,
        serving_stack(config_file, root) as (encode, language, router),
    ):
        port = free_port()
        targets = {
            "operator": f"127.0.0.1:{operator.port}",
            "encode": f"127.0.0.1:{encode.port}",
            "language": f"127.0.0.1:{language.port}",
            "router": f"127.0.0.1:{router.port}",
        }
        (root / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": job, "static_configs": [{"targets": [target]}]}
                        for job, target in targets.items()
                    ],
                }
            )
        )
        data = Path(tempfile.mkdtemp(dir=root))
        with (root / "prometheus.log").open("w") as log:
            args = [
                PROMETHEUS,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{port}",
            ]
            prometheus = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{port}"
            try:
                wait_for(
                    lambda: _up(url) == 4, timeout=60, what="Prometheus scraping all 4 targets"
                )
                # Traffic: a resource for the operator, requests (one resumes, one is refused).
                cluster.kubectl("-n", namespace, "apply", "-f", "-", stdin=json.dumps(minimal()))
                wait_for_status(
                    cluster, namespace, "tiny-qwen3-vl-moe", phase="Ready", observedGeneration=1
                )
                image = {"url": data_url(png(64, 48, (9, 99, 199)))}
                content = [
                    {"type": "image_url", "image_url": image},
                    {"type": "text", "text": "Describe the image."},
                ]
                body = {
                    "model": "tiny-qwen3-vl-moe",
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": content}],
                }
                for _ in range(3):
                    status, answer = post(f"{router.url}/v1/chat/completions", body)
                    assert status == 200, answer
                assert post(f"{router.url}/v1/chat/completions", {"messages": []})[0] == 400
                # Enough samples after the traffic for rate() over the window.
                wait_for(
                    lambda: (
                        _value(url, "sum(deepstack_transfer_resumptions_total)") >= 3
                        and _value(url, "count_over_time(up[1m])") >= 10
                    ),
                    timeout=60,
                    what="Prometheus to have scraped the traffic",
                )
                yield url
            finally:
                prometheus.terminate()
                prometheus.wait(30)
                cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    status, body = get(f"{url}/api/v1/query?query={urllib.parse.quote(expr)}")
    assert status == 200, body
    result: list[dict[str, Any]] = json.loads(body)["data"]["result"]
    return result


def _up(url: str) -> int:
    try:
        return sum(int(float(r["value"][1])) for r in _query(url, "up"))
    except (OSError, AssertionError):
        return 0


def _value(url: str, expr: str) -> float:
    result = _query(url, expr)
    return max((float(r["value"][1]) for r in result), default=0.0)


@pytest.mark.parametrize(
    ("dashboard", "title", "expr"), queries(), ids=[f"{d}:{t}" for d, t, _ in queries()]
)
def test_every_panel_query_returns_series(
    prometheus_with_traffic: str, dashboard: str, title: str, expr: str
) -> None:
    result = _query(prometheus_with_traffic, concrete(expr))
    assert result, f"{dashboard} / {title}: no series for {concrete(expr)}"


def test_chart_readme_lists_every_panel() -> None:
    readme = (CHART / "README.md").read_text()
    for dashboard, title, _ in queries():
        assert f"| {title} |" in readme, (dashboard, title)
