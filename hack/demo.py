"""`make demo`: from `helm install` to an answer, on the local control plane.

1. install the chart (operator, RBAC, CRDs) into the kwok control plane;
2. write the tiny Qwen3-VL-MoE checkpoint (once);
3. run the operator locally as the chart's ServiceAccount (kwok runs no containers);
4. apply the minimal example, pointed at the checkpoint, and wait for Ready;
5. run the encode, language and router pods locally from the pod templates the operator
   rendered (deepstack_operator.localpods);
6. send a chat request with an image through the router; print the answer,
   `kubectl get dsd` and a transfer summary. Everything stays up until `make demo-down`.

    [DEMO_BACKEND=reference|sglang] python hack/demo.py up | down

DEMO_BACKEND=sglang serves with SGLang's engine in the language pod, on this CPU (SGLang's
virtualenv from `make sglang-env`, the kernel-package stand-in of the tests).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from deepstack_operator.localpods import local_pod, start, token_kubeconfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' SGLang-on-CPU settings
from tests.support.sglang_on_cpu import SGLANG_CPU_ARGS, SGLANG_ENV  # noqa: E402

# The end-to-end test runs its own copy beside a developer's: state, namespace and ports
# can be moved.
STATE = Path(os.environ.get("DEMO_STATE", REPO / ".cluster" / "demo"))
KUBECONFIG = REPO / ".cluster" / "kubeconfig"
MODEL_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "deepstack-disagg"
    / "models"
    / "tiny-qwen3-vl-moe-v2"  # v2: experts in the published layout (SGLang loads it)
)
BACKEND = os.environ.get("DEMO_BACKEND", "reference")
RELEASE, SYSTEM, NAME = "deepstack-disagg", "deepstack-system", "tiny-qwen3-vl-moe"
NAMESPACE = os.environ.get("DEMO_NAMESPACE", "default")
BASE = int(os.environ.get("DEMO_PORT_BASE", "18000"))
PORTS = {"router": BASE, "encode": BASE + 1, "language": BASE + 2, "operator": BASE + 80}
ROUTER_URL = f"http://127.0.0.1:{PORTS['router']}"


def tool(name: str) -> str:
    return str(REPO / ".cluster" / "bin" / name)


def kubectl(*args: str, stdin: str | None = None, kubeconfig: Path = KUBECONFIG) -> str:
    out = subprocess.run(
        [tool("kubectl"), "--kubeconfig", str(kubeconfig), *args],
        input=stdin, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    if out.returncode != 0:
        sys.exit(f"kubectl {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def wait(probe: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result:
            return result
        time.sleep(0.5)
    sys.exit(f"timed out after {timeout:g}s waiting for {what}")


def alive(name: str) -> bool:
    pid_file = STATE / f"{name}.pid"
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def service_account_kubeconfig() -> Path:
    sa = RELEASE  # the chart names the ServiceAccount after the release
    token = kubectl("-n", SYSTEM, "create", "token", sa, "--duration=24h").strip()
    config = token_kubeconfig(yaml.safe_load(KUBECONFIG.read_text()), token, sa)
    path = STATE / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def start_operator() -> None:
    if alive("operator"):
        return
    deployment = json.loads(kubectl("-n", SYSTEM, "get", "deployment", RELEASE, "-o", "json"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {
        **os.environ,
        "KUBECONFIG": str(service_account_kubeconfig()),
        "DEEPSTACK_OPERATOR_METRICS_PORT": str(PORTS["operator"]),
        "DEEPSTACK_OPERATOR_METRICS_HOST": "127.0.0.1",
    }
    with (STATE / "operator.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "deepstack_operator", *container.get("args", [])],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    (STATE / "operator.pid").write_text(str(process.pid))


def start_runtime() -> None:
    config_map = json.loads(
        kubectl("-n", NAMESPACE, "get", "configmap", f"{NAME}-runtime", "-o", "json")
    )
    config_file = STATE / "etc-deepstack" / "config.json"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(config_map["data"]["config.json"])
    instances = STATE / "instances.json"
    instances.write_text(json.dumps({
        "encode": [f"http://127.0.0.1:{PORTS['encode']}"],
        "language": [f"http://127.0.0.1:{PORTS['language']}"],
    }))  # fmt: skip
    local = ["--host", "127.0.0.1", "--advertise-host", "127.0.0.1", "--metrics-port", "0"]
    plans = {
        "encode": ("statefulset", f"{NAME}-encode", f"{NAME}-encode-0",
                   [*local, "--port", str(PORTS["encode"]), "--bootstrap-port", str(BASE + 998)]),
        "language": ("statefulset", f"{NAME}-language", f"{NAME}-language-0",
                     [*local, "--port", str(PORTS["language"])]),
        "router": ("deployment", f"{NAME}-router", f"{NAME}-router-local",
                   [*local, "--port", str(PORTS["router"]), "--instances-file", str(instances)]),
    }  # fmt: skip
    for role, (kind, workload, pod_name, overrides) in plans.items():
        if alive(role):
            continue
        template = json.loads(kubectl("-n", NAMESPACE, "get", kind, workload, "-o", "json"))[
            "spec"
        ]["template"]
        pod = local_pod(template, pod_name=pod_name, namespace=NAMESPACE, pod_ip="127.0.0.1",
                        config_file=str(config_file), overrides=overrides)  # fmt: skip
        if BACKEND == "sglang" and role == "language":  # SGLang's own virtualenv
            sglang_cli = str(REPO / ".venv-sglang" / "bin" / "deepstack-runtime")
            pod = dataclasses.replace(pod, argv=[sglang_cli, *pod.argv[1:]])
        process = start(pod, STATE / f"{role}.log", detach=True)
        (STATE / f"{role}.pid").write_text(str(process.pid))
        print(f"started {pod_name}: {' '.join(pod.argv)}")
    for role in plans:
        wait(lambda r=role: healthy(f"http://127.0.0.1:{PORTS[r]}"), 300, f"the {role} server")

    def router_sees_both() -> bool:
        counts = json.loads(urllib.request.urlopen(f"{ROUTER_URL}/health").read())
        return bool(counts.get("encode") and counts.get("language"))

    wait(router_sees_both, 30, "the router to see a healthy encode and language server")


def ask() -> dict[str, Any]:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 160, 220)).save(buf, "PNG")
    body = {
        "model": NAME,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                + base64.b64encode(buf.getvalue()).decode()}},
            {"type": "text", "text": "Describe the image."}]}],
    }  # fmt: skip
    request = urllib.request.Request(
        f"{ROUTER_URL}/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as r:
        answer: dict[str, Any] = json.loads(r.read())
        return answer


def transfer_summary() -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{PORTS['encode']}/metrics") as r:
        encode = r.read().decode()
    with urllib.request.urlopen(f"http://127.0.0.1:{PORTS['language']}/metrics") as r:
        language = r.read().decode()
    samples = [
        (s.name, s.labels, s.value)
        for text in (encode, language)
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
    STATE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [tool("helm"), "--kubeconfig", str(KUBECONFIG), "upgrade", "--install", RELEASE,
         str(REPO / "charts" / "deepstack-disagg"),
         "--namespace", SYSTEM, "--create-namespace", "--wait", "--timeout", "180s"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    if not (MODEL_DIR / "config.json").exists():
        from deepstack_runtime.models.tiny import make_tiny_model

        make_tiny_model(MODEL_DIR)
    start_operator()
    cr = yaml.safe_load((REPO / "crds" / "examples" / "minimal-cpu.yaml").read_text())
    cr["spec"]["model"]["path"] = str(MODEL_DIR)  # where the local "pods" find the weights
    if BACKEND == "sglang":
        spec = cr["spec"]
        spec["runtime"]["backend"] = "sglang"
        no_gpu = {"limits": {"nvidia.com/gpu": 0}}  # SGLang on this CPU
        spec["encode"]["resources"] = no_gpu
        spec["language"] |= {
            "resources": no_gpu,
            "extraArgs": list(SGLANG_CPU_ARGS),
            "env": [{"name": k, "value": v} for k, v in SGLANG_ENV.items()],
        }
    elif BACKEND != "reference":
        sys.exit(f"DEMO_BACKEND must be reference or sglang, not {BACKEND!r}")
    subprocess.run(  # the namespace may exist already
        [tool("kubectl"), "--kubeconfig", str(KUBECONFIG), "create", "namespace", NAMESPACE],
        capture_output=True,
        check=False,
    )
    kubectl("-n", NAMESPACE, "apply", "-f", "-", stdin=json.dumps(cr))

    def phase() -> str:
        obj = json.loads(kubectl("-n", NAMESPACE, "get", "dsd", NAME, "-o", "json"))
        return str((obj.get("status") or {}).get("phase", ""))

    wait(lambda: phase() == "Ready", 120, f"{NAME} to be Ready")
    start_runtime()
    answer = ask()
    print()
    print("answer:", json.dumps(answer["choices"][0]["message"]["content"]), f"({answer['usage']})")
    print()
    print(kubectl("-n", NAMESPACE, "get", "dsd", "-o", "wide"))
    print(transfer_summary())
    print()
    print(f"KUBECONFIG={KUBECONFIG}")
    print(f"ROUTER_URL={ROUTER_URL}")
    print(f"MODEL_DIR={MODEL_DIR}")


def down() -> None:
    for pid_file in sorted(STATE.glob("*.pid")):
        with contextlib.suppress(OSError, ValueError):  # already gone
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        pid_file.unlink()
    print("demo processes stopped")


if __name__ == "__main__":
    {"up": up, "down": down}[sys.argv[1] if len(sys.argv) > 1 else "up"]()
