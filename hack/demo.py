"""`make demo`: from `helm install` to an answer, on the local cluster's real node.

1. build the images (hack/images.sh, cached by content) and give the operator's and the
   pods' (the runtime, or with DEMO_BACKEND=sglang the sglang CPU test image) to the
   node's containerd;
2. write the tiny Qwen3-VL-MoE checkpoint (once); the pods mount it from the node;
3. `helm install` the chart: the operator runs in-cluster, as the chart's ServiceAccount;
4. `kubectl apply` the minimal example and wait until it is Ready: the encode, language
   and router pods run as containers, the router finds the others by DNS;
5. send a chat request with an image to the router's Service; print the answer,
   `kubectl get dsd` and a transfer summary. Everything stays up until `make demo-down`.

    [DEMO_BACKEND=reference|sglang] python hack/demo.py up | down

DEMO_BACKEND=sglang serves with SGLang's engine on this CPU: every pod runs the sglang
backend's CPU test image (the runtime image plus SGLang and the kernel stand-ins of
devkit/sglang_cpu, which no shipped image holds), with the engine settings a CPU needs.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # devkit: the SGLang-on-CPU settings
from devkit.sglang_on_cpu import SGLANG_CPU_ARGS  # noqa: E402

# The end-to-end test runs its own copy beside a developer's, in another namespace.
KUBECONFIG = REPO / ".cluster" / "kubeconfig"
MODEL_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "deepstack-disagg"
    / "models"
    # v2: experts in the published layout (SGLang loads it); v3: a video processor
    / "tiny-qwen3-vl-moe-v3"
)
BACKEND = os.environ.get("DEMO_BACKEND", "reference")
RELEASE, SYSTEM, NAME = "deepstack-disagg", "deepstack-system", "tiny-qwen3-vl-moe"
NAMESPACE = os.environ.get("DEMO_NAMESPACE", "default")


def tool(name: str) -> str:
    return str(REPO / ".cluster" / "bin" / name)


def kubectl(*args: str, stdin: str | None = None) -> str:
    out = subprocess.run(
        [tool("kubectl"), "--kubeconfig", str(KUBECONFIG), *args],
        input=stdin, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    if out.returncode != 0:
        sys.exit(f"kubectl {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def get_json(*args: str) -> Any:
    return json.loads(kubectl(*args, "-o", "json"))


def wait(probe: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result:
            return result
        time.sleep(0.5)
    sys.exit(f"timed out after {timeout:g}s waiting for {what}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def images() -> tuple[str, str]:
    """The operator image and the pods' image (the runtime, or the sglang backend's CPU
    test image) built from this tree, given to the node."""
    built = subprocess.run(
        [str(REPO / "hack" / "images.sh"), "build"], check=True, capture_output=True, text=True
    ).stdout.split()
    operator, runtime, sglang_test = built[-3:]
    pods_image = sglang_test if BACKEND == "sglang" else runtime
    subprocess.run([str(REPO / "hack" / "node.sh"), "load", operator, pods_image], check=True)
    return operator, pods_image


def install_chart(operator_image: str) -> None:
    repository, tag = operator_image.rsplit(":", 1)
    subprocess.run(
        [tool("helm"), "--kubeconfig", str(KUBECONFIG), "upgrade", "--install", RELEASE,
         str(REPO / "charts" / "deepstack-disagg"),
         "--namespace", SYSTEM, "--create-namespace", "--wait", "--timeout", "300s",
         "--set", f"image.repository={repository}", "--set-string", f"image.tag={tag}",
         "--set", "image.pullPolicy=Never"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def resource(runtime_image: str) -> dict[str, Any]:
    cr: dict[str, Any] = yaml.safe_load(
        (REPO / "crds" / "examples" / "minimal-cpu.yaml").read_text()
    )
    spec = cr["spec"]
    if BACKEND not in ("reference", "sglang"):
        sys.exit(f"DEMO_BACKEND must be reference or sglang, not {BACKEND!r}")
    # Real pods: the image built here, the checkpoint mounted from the node.
    spec["runtime"] |= {"image": runtime_image, "imagePullPolicy": "Never", "backend": BACKEND}
    spec["model"] |= {
        "path": f"/models/{MODEL_DIR.name}",
        "volume": {"hostPath": {"path": str(MODEL_DIR.parent)}},
    }
    if BACKEND == "sglang":
        no_gpu = {"limits": {"nvidia.com/gpu": 0}}  # SGLang on this CPU
        spec["encode"] = {**spec["encode"], "resources": no_gpu}
        spec["language"] = {
            **spec["language"],
            "resources": no_gpu,
            "extraArgs": list(SGLANG_CPU_ARGS),
        }
    return cr


def router_url() -> str:
    service = get_json("-n", NAMESPACE, "get", "service", f"{NAME}-router")
    return f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"


def revision() -> str:
    """The current revision of the pod groups (their StatefulSets and ConfigMap)."""
    return str(get_json("-n", NAMESPACE, "get", "dsd", NAME)["status"]["revision"])


def metrics_urls() -> list[str]:
    """The encode and language pods' /metrics."""
    config = json.loads(
        get_json("-n", NAMESPACE, "get", "configmap", f"{NAME}-runtime-{revision()}")["data"][
            "config.json"
        ]
    )
    pods = get_json("-n", NAMESPACE, "get", "pods", "-l", f"app.kubernetes.io/instance={NAME}")
    return [
        f"http://{p['status']['podIP']}:{config['metrics_port']}/metrics"
        for p in pods["items"]
        if p["metadata"]["labels"].get("app.kubernetes.io/component") in ("encode", "language")
    ]


def ask(url: str) -> dict[str, Any]:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 160, 220)).save(buf, "PNG")
    body = {
        "model": NAME,
        "max_tokens": 16,
        "temperature": 0,  # greedy: the answer the monolithic model gives
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                + base64.b64encode(buf.getvalue()).decode()}},
            {"type": "text", "text": "Describe the image."}]}],
    }  # fmt: skip
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), headers
    )
    with urllib.request.urlopen(request, timeout=120) as r:
        answer: dict[str, Any] = json.loads(r.read())
        return answer


def transfer_summary() -> str:
    samples = []
    for url in metrics_urls():
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        samples += [
            (s.name, s.labels, s.value)
            for f in text_string_to_metric_families(text)
            for s in f.samples
        ]
    by_payload: dict[str, int] = {}
    cumulative: dict[float, float] = {}
    for name, labels, value in samples:  # summed over both servers
        if name == "deepstack_transfer_bytes_total":
            by_payload[labels["payload"]] = by_payload.get(labels["payload"], 0) + int(value)
        elif name == "deepstack_transfer_duration_seconds_bucket":
            cumulative[float(labels["le"])] = cumulative.get(float(labels["le"]), 0) + value
    resumptions = int(sum(v for n, _, v in samples if n == "deepstack_transfer_resumptions_total"))
    buckets = sorted(cumulative.items())
    total = buckets[-1][1] if buckets else 0
    p50 = next((le for le, count in buckets if count >= total / 2), 0.0) if total else 0.0
    return (
        f"transfer: {', '.join(f'{k} {v} B' for k, v in sorted(by_payload.items()))}; "
        f"resumptions {resumptions}; p50 <= {p50 * 1000:g} ms ({int(total)} transfers)"
    )


def up() -> None:
    operator_image, runtime_image = images()
    if not (MODEL_DIR / "config.json").exists():
        from deepstack_runtime.models.tiny import make_tiny_model

        make_tiny_model(MODEL_DIR)
    for path in MODEL_DIR.iterdir():  # written by an older version, owner-only
        path.chmod(0o644)
    install_chart(operator_image)
    subprocess.run(  # the namespace may exist already
        [tool("kubectl"), "--kubeconfig", str(KUBECONFIG), "create", "namespace", NAMESPACE],
        capture_output=True,
        check=False,
    )
    kubectl("-n", NAMESPACE, "apply", "-f", "-", stdin=json.dumps(resource(runtime_image)))

    def phase() -> str:
        obj = get_json("-n", NAMESPACE, "get", "dsd", NAME)
        return str((obj.get("status") or {}).get("phase", ""))

    wait(lambda: phase() == "Ready", 600, f"{NAME} to be Ready")
    url = router_url()

    def router_sees_both() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                counts = json.loads(r.read())
        except OSError:
            return False
        return bool(counts.get("encode") and counts.get("language"))

    wait(router_sees_both, 60, "the router to see a healthy encode and language server")
    answer = ask(url)
    print()
    print("answer:", json.dumps(answer["choices"][0]["message"]["content"]), f"({answer['usage']})")
    print()
    print(kubectl("-n", NAMESPACE, "get", "dsd", "-o", "wide"))
    print(kubectl("-n", NAMESPACE, "get", "pods", "-o", "wide"))
    print(transfer_summary())
    print()
    print(f"KUBECONFIG={KUBECONFIG}")
    print(f"ROUTER_URL={url}")
    print(f"MODEL_DIR={MODEL_DIR}")


def down() -> None:
    if KUBECONFIG.exists():
        subprocess.run(
            [tool("kubectl"), "--kubeconfig", str(KUBECONFIG), "-n", NAMESPACE, "delete", "dsd",
             NAME, "--ignore-not-found", "--wait"],
            capture_output=True, check=False, timeout=120,
        )  # fmt: skip
        subprocess.run(
            [tool("helm"), "--kubeconfig", str(KUBECONFIG), "uninstall", RELEASE,
             "--namespace", SYSTEM, "--wait", "--ignore-not-found"],
            capture_output=True, check=False, timeout=300,
        )  # fmt: skip
    print("demo stopped")


if __name__ == "__main__":
    {"up": up, "down": down}[sys.argv[1] if len(sys.argv) > 1 else "up"]()
