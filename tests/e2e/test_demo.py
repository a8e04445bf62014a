"""End to end on the local cluster's real node, as a new user runs it: `hack/demo.py up`
(what `make demo` runs) from `helm install` to an answer, then scaling, losing and rolling
pods under traffic, only ever through the Kubernetes API (the StatefulSets start the pods,
the router finds them by DNS)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deepstack_runtime.models.tiny import make_tiny_model
from devkit.cluster import Cluster
from devkit.metrics import sample
from devkit.runtime import post
from tests.support.demo import demo_up
from tests.support.e2e import (
    IMAGE,
    NAME,
    Traffic,
    chat,
    metrics,
    pod_named,
    pods,
    ready,
    restart_count,
    router_counts,
    scale_language,
    served,
    set_replicas,
    wait_until,
)
from tests.support.listening import listening_ports
from tests.support.node import NODE_NAME, container_pid, tag_image
from tests.support.operator import (
    StatusRecorder,
    condition,
    config_map_name,
    dsd,
    get_json,
    group_name,
    wait_for_status,
)

SYSTEM = "deepstack-system"


@pytest.fixture(scope="module")
def demo(cluster: Cluster) -> Iterator[dict[str, Any]]:
    with demo_up(cluster, "reference") as values:
        yield values


def monolithic_answer(model_dir: str, max_tokens: int) -> str:
    """The undivided transformers model's answer to the same request."""
    import io

    from PIL import Image

    from devkit.oracles import ReferencePreprocessor, monolithic_generate

    pre = ReferencePreprocessor(model_dir)
    content = [{"type": "image"}, {"type": "text", "text": "Describe the image."}]
    image = Image.open(io.BytesIO(IMAGE)).convert("RGB")
    prompt = pre.prepare([{"role": "user", "content": content}], [image])
    return pre.decode(monolithic_generate(model_dir, prompt, max_tokens))


def test_demo_answers_like_the_monolithic_model(cluster: Cluster, demo: dict[str, Any]) -> None:
    out, namespace = demo["output"], demo["namespace"]
    assert "answer:" in out
    assert re.search(rf"^{NAME}\s+Ready\s+1/1\s+1/1\s+reference", out, re.M), out
    assert re.search(r"transfer: aux \d+ B, deepstack [1-9]\d* B, embedding [1-9]\d* B", out), out
    # Every role runs as a container on the real node, from the image built here.
    runtime_image = get_json(cluster, "-n", namespace, "get", "dsd", NAME)["spec"]["runtime"][
        "image"
    ]
    assert runtime_image.startswith("localhost/deepstack-runtime:")
    for role in ("encode", "language", "router"):
        (pod,) = pods(cluster, namespace, role)
        assert pod["spec"]["nodeName"] == NODE_NAME, role
        assert ready(pod), role
        (status,) = pod["status"]["containerStatuses"]
        assert status["image"].endswith(runtime_image.removeprefix("localhost/")), status
        assert status["started"]
        assert "running" in status["state"]
    # The operator runs in-cluster, from its image, as the chart's ServiceAccount.
    (operator,) = get_json(
        cluster, "-n", SYSTEM, "get", "pods", "-l", "app.kubernetes.io/name=deepstack-disagg"
    )["items"]
    assert operator["spec"]["nodeName"] == NODE_NAME
    assert ready(operator)
    assert "deepstack-operator:" in operator["spec"]["containers"][0]["image"]
    assert operator["spec"]["serviceAccountName"] == "deepstack-disagg"
    # Through the router's Service; the router found the pods by DNS.
    status, body = post(f"{demo['ROUTER_URL']}/v1/chat/completions", chat())
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == monolithic_answer(demo["MODEL_DIR"], 16)
    assert router_counts(demo["ROUTER_URL"]) == {"encode": 1, "language": 1}
    # The language pod turned Ready only after a real transfer from the encode pod.
    dsd_status = dsd(cluster, namespace, NAME)["status"]
    assert condition(dsd_status, "TransferReady")["reason"] == "TransferVerified"
    assert dsd_status["language"]["transferVerified"] == 1
    assert dsd_status["language"]["transports"] == ["tcp"]
    (language,) = pods(cluster, namespace, "language")
    gate = condition(language["status"], "disagg.deepstack.dev/transfer-ready")
    assert gate["status"] == "True"
    assert "over tcp" in gate["message"]
    (encode,) = pods(cluster, namespace, "encode")
    assert sample(metrics(encode), "deepstack_transfer_bytes_total", payload="deepstack") > 0


def test_a_video_through_the_real_pods_answers_like_transformers(demo: dict[str, Any]) -> None:
    """The runtime image decodes video (PyAV) and runs the checkpoint's video processor
    (torchvision): a clip through the router's Service equals transformers' own answer."""
    from transformers import PreTrainedTokenizerFast

    from devkit.oracles import monolithic_media_generate
    from devkit.videos import clip

    video = clip(20, 10.0, 64, 48)
    url = "data:video/mp4;base64," + base64.b64encode(video).decode()
    content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Go"}]
    body = {
        "model": NAME, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": content}],
    }  # fmt: skip
    status, reply = post(f"{demo['ROUTER_URL']}/v1/chat/completions", body)
    assert status == 200, reply
    plain = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Go"}]}]
    tokens = monolithic_media_generate(demo["MODEL_DIR"], plain, [("video", video)], 8)
    want = PreTrainedTokenizerFast.from_pretrained(demo["MODEL_DIR"]).decode(
        tokens, skip_special_tokens=True
    )
    assert reply["choices"][0]["message"]["content"] == want


def test_scaling_the_language_group_loses_no_request(
    cluster: Cluster, demo: dict[str, Any]
) -> None:
    namespace = demo["namespace"]
    (encode,) = pods(cluster, namespace, "encode")
    with Traffic(demo["ROUTER_URL"]) as traffic:
        status = scale_language(cluster, namespace, demo["ROUTER_URL"], 2, timeout=300)
        assert status["language"]["readyReplicas"] == 2
        new = pods(cluster, namespace, "language")[1]
        assert new["metadata"]["name"] == f"{group_name(cluster, namespace, NAME, 'language')}-1"
        wait_until(lambda: served(new) >= 2, "the new language pod to serve requests")
    assert traffic.results
    assert traffic.failures() == []
    # The encode pod was left alone.
    (encode_after,) = pods(cluster, namespace, "encode")
    assert encode_after["metadata"]["uid"] == encode["metadata"]["uid"]


def test_a_pod_that_is_not_ready_gets_no_traffic(cluster: Cluster, demo: dict[str, Any]) -> None:
    namespace = demo["namespace"]
    first, second = pods(cluster, namespace, "language")
    pid = container_pid(second)
    os.kill(pid, signal.SIGSTOP)  # its server stops answering, readiness probe included
    try:
        wait_until(
            lambda: not ready(pods(cluster, namespace, "language")[1]),
            "the frozen pod to be marked not ready",
            timeout=60,
        )
        wait_until(
            lambda: router_counts(demo["ROUTER_URL"]).get("language") == 1,
            "the router to drop the pod that is not ready",
        )
        before = served(first)
        for _ in range(6):  # any of these sent to the frozen pod would time out
            status, body = post(f"{demo['ROUTER_URL']}/v1/chat/completions", chat(4), timeout=30)
            assert status == 200, body
        assert served(first) == before + 6
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(
        lambda: router_counts(demo["ROUTER_URL"]).get("language") == 2,
        "the pod to be back in rotation once ready",
    )


def test_deleting_a_language_pod_under_traffic(cluster: Cluster, demo: dict[str, Any]) -> None:
    namespace = demo["namespace"]
    victim = pods(cluster, namespace, "language")[0]
    with Traffic(demo["ROUTER_URL"]) as traffic:
        wait_until(lambda: traffic.results, "the first request of the traffic")
        cluster.kubectl("-n", namespace, "delete", "pod", victim["metadata"]["name"])

        def recreated() -> bool:
            current = pods(cluster, namespace, "language")
            return (
                len(current) == 2
                and all(ready(p) for p in current)
                and (current[0]["metadata"]["uid"] != victim["metadata"]["uid"])
            )

        wait_until(recreated, "the StatefulSet to recreate the deleted pod")
        wait_until(
            lambda: router_counts(demo["ROUTER_URL"]).get("language") == 2,
            "the router to use the recreated pod",
        )
        replacement = pods(cluster, namespace, "language")[0]
        wait_until(lambda: served(replacement) >= 1, "the recreated pod to serve a request")
    # The pod drained before it stopped: at most a request in flight on it may fail, and
    # then with a reason.
    failures = traffic.failures()
    assert len(failures) <= 1, failures
    for status, body in failures:
        assert status in (502, 503), (status, body)
        assert body["error"]["message"], body


def blocks_held(pod: dict[str, Any]) -> float:
    text = metrics(pod)
    return sum(sample(text, "deepstack_buffer_blocks", state=s) for s in ("used", "fenced"))


def test_killing_pods_at_random_under_load_fails_only_requests_in_flight(
    cluster: Cluster, demo: dict[str, Any]
) -> None:
    """8 clients for 60 s while the runtime process of an encode or language pod, chosen
    at random, is killed (SIGKILL) again and again and the kubelet restarts it: a request
    that was not in flight when a pod died succeeds (the router retries a leg that failed
    before any byte reached the client), every failure is a 5xx with a reason, and no
    block is left used."""
    namespace = demo["namespace"]
    set_replicas(cluster, namespace, "encode", 2)
    set_replicas(cluster, namespace, "language", 2)  # as the tests before leave it
    try:
        wait_until(
            lambda: router_counts(demo["ROUTER_URL"]) == {"encode": 2, "language": 2},
            "two encode and two language pods in the router's rotation",
            timeout=300,
        )
        seed = int(time.time())
        chooser = random.Random(seed)
        kills: list[tuple[float, str]] = []
        turns: list[str] = []
        clients = [Traffic(demo["ROUTER_URL"], max_tokens=8) for _ in range(8)]
        with contextlib.ExitStack() as running:
            for client in clients:
                running.enter_context(client)
            end = time.monotonic() + 60
            while time.monotonic() < end:
                # One pod down at a time: the other of its role serves meanwhile.
                wait_until(
                    lambda: router_counts(demo["ROUTER_URL"]) == {"encode": 2, "language": 2},
                    "every pod back in rotation",
                )
                time.sleep(chooser.uniform(1, 4))
                running_pods = [
                    p for r in ("encode", "language") for p in pods(cluster, namespace, r)
                ]
                # Each pod once, in a random order, then again: the kubelet's restart
                # backoff grows with every restart of one container.
                if not turns:
                    turns = [p["metadata"]["name"] for p in running_pods]
                    chooser.shuffle(turns)
                name = turns.pop()
                victim = next(p for p in running_pods if p["metadata"]["name"] == name)
                restarts = restart_count(victim)
                os.kill(container_pid(victim), signal.SIGKILL)
                kills.append((time.monotonic(), victim["metadata"]["name"]))
                # Its restart first: right after the kill the router may not have noticed
                # yet, and "every pod in rotation" would be true of the dead one. (Waiting
                # only for that let the next kill take the other pod of the same role
                # while this one was still down: both gone at once, so requests that were
                # in flight at no kill got a 503. That was this test's old flakiness.)
                wait_until(
                    lambda n=name, r=restarts: restart_count(pod_named(cluster, namespace, n)) > r,  # type: ignore[misc]
                    f"{name} to restart",
                )
        results = [(r, span) for c in clients for r, span in zip(c.results, c.spans, strict=True)]
        failed = [(r, span) for r, span in results if r[0] != 200]
        latencies = sorted(end - start for r, (start, end) in results if r[0] == 200)
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(json.dumps({
            "seed": seed, "kills": [name for _, name in kills], "requests": len(results),
            "failed": len(failed), "p50_s": round(latencies[len(latencies) // 2], 3),
            "p99_s": round(p99, 3),
        }))  # fmt: skip
        if failed:  # what the router saw, for whoever reads a failure
            print(
                cluster.kubectl(
                    "-n", namespace, "logs", "-l", "app.kubernetes.io/component=router", "--tail=60"
                ).stdout
            )
        assert len(kills) >= 3, kills
        assert len(latencies) >= 50, len(latencies)
        for (status, body), (start, end) in failed:
            assert 500 <= status < 600, (status, body)
            assert body["error"]["message"], body
            # It was in flight when a pod was killed.
            assert any(start <= killed <= end for killed, _ in kills), (status, body, start)
        assert len(failed) <= 8 * len(kills), failed
        wait_until(
            lambda: router_counts(demo["ROUTER_URL"]) == {"encode": 2, "language": 2},
            "every pod back in rotation",
        )
        for role in ("encode", "language"):
            for pod in pods(cluster, namespace, role):
                wait_until(
                    lambda p=pod: blocks_held(p) == 0,  # type: ignore[misc]
                    f"{pod['metadata']['name']}: no block left used or fenced",
                    timeout=60,
                )
    finally:
        set_replicas(cluster, namespace, "encode", 1)
        wait_until(
            lambda: len(pods(cluster, namespace, "encode")) == 1,
            "the encode group back to one pod",
            timeout=120,
        )


def test_scaling_down_loses_no_request(cluster: Cluster, demo: dict[str, Any]) -> None:
    namespace = demo["namespace"]
    with Traffic(demo["ROUTER_URL"]) as traffic:
        wait_until(lambda: traffic.results, "the first request of the traffic")
        cluster.kubectl(
            "-n", namespace, "patch", "dsd", NAME, "--type=merge",
            "-p", '{"spec":{"language":{"replicas":1}}}',
        )  # fmt: skip
        wait_until(lambda: len(pods(cluster, namespace, "language")) == 1, "the scale down")
        wait_until(
            lambda: router_counts(demo["ROUTER_URL"]).get("language") == 1,
            "the router to forget the removed pod",
        )
        count = len(traffic.results)
        wait_until(lambda: len(traffic.results) >= count + 3, "requests after the scale down")
    assert traffic.failures() == []


def test_a_contract_and_image_change_rolls_out_without_a_failed_request(
    cluster: Cluster, demo: dict[str, Any]
) -> None:
    """A paired rollout on real pods under continuous traffic: a checkpoint with fewer
    DeepStack layers (a new contract) and a new image tag at once. The new encode and
    language groups come up beside the old, the routers move over, the old go: not one
    request fails, and the answers then come from the new checkpoint."""
    namespace = demo["namespace"]
    spec = get_json(cluster, "-n", namespace, "get", "dsd", NAME)["spec"]
    old_image, old_contract = (
        spec["runtime"]["image"],
        dsd(cluster, namespace, NAME)["status"]["contract"],
    )
    new_image = f"{old_image}-retag"
    tag_image(old_image, new_image)  # the same image under a second tag, as a push would add
    # Beside the demo's checkpoint, in the directory the pods mount.
    model = Path(demo["MODEL_DIR"]).parent / "tiny-qwen3-vl-moe-2-deepstack-layers"
    if not (model / "deepstack.json").exists():
        make_tiny_model(model, seed=1, num_deepstack=2)
    for path in (model, *model.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    change = {
        "model": {"path": f"/models/{model.name}"},
        "deepstack": {"numLayers": 2},
        "runtime": {"image": new_image},
    }
    old_pods = {
        p["metadata"]["uid"] for r in ("encode", "language") for p in pods(cluster, namespace, r)
    }
    with (
        StatusRecorder(cluster, namespace, NAME) as recorder,
        Traffic(demo["ROUTER_URL"]) as traffic,
    ):
        wait_until(lambda: traffic.results, "the first request of the traffic")
        cluster.kubectl(
            "-n", namespace, "patch", "dsd", NAME, "--type=merge",
            "-p", json.dumps({"spec": change}),
        )  # fmt: skip
        generation = dsd(cluster, namespace, NAME)["metadata"]["generation"]
        status = wait_for_status(
            cluster, namespace, NAME, timeout=300, phase="Ready", observedGeneration=generation
        )
        wait_until(
            lambda: (
                not (
                    old_pods
                    & {
                        p["metadata"]["uid"]
                        for r in ("encode", "language")
                        for p in pods(cluster, namespace, r)
                    }
                )
            ),
            "the old revision's pods to be gone",
        )
        count = len(traffic.results)
        wait_until(lambda: len(traffic.results) >= count + 3, "requests after the rollout")
    assert traffic.failures() == [], (old_contract, status["contract"], traffic.failures()[:3])
    assert len(traffic.results) >= 10
    assert status["contract"] != old_contract
    assert condition(status, "Compatible")["status"] == "True"
    phases = [s.get("phase") for s in recorder.statuses]
    assert "Progressing" in phases, phases
    assert ("True", "PairedRollout") in recorder.seen("Progressing")
    assert ("False", "MixedContracts") in recorder.seen("Compatible")
    for role in ("encode", "language", "router"):
        for pod in pods(cluster, namespace, role):
            assert pod["metadata"]["labels"]["disagg.deepstack.dev/contract"] == status["contract"]
            assert pod["spec"]["containers"][0]["image"] == new_image, role
    status_code, body = post(f"{demo['ROUTER_URL']}/v1/chat/completions", chat())
    assert status_code == 200, body
    assert body["choices"][0]["message"]["content"] == monolithic_answer(str(model), 16)


def connects(cluster: Cluster, namespace: str, pod: str, ip: str, port: int) -> bool:
    """Whether a TCP connection from inside `pod` to ip:port is accepted."""
    probe = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)"
    result = cluster.kubectl(
        "-n", namespace, "exec", pod, "--", "python3", "-c", probe, ip, str(port), check=False
    )  # fmt: skip
    return result.returncode == 0


def pod_config(cluster: Cluster, namespace: str) -> dict[str, Any]:
    """The runtime configuration the operator rendered for the pods."""
    config_map = get_json(
        cluster, "-n", namespace, "get", "configmap", config_map_name(cluster, namespace, NAME)
    )
    config: dict[str, Any] = json.loads(config_map["data"]["config.json"])
    return config


def test_network_policies_let_only_the_needed_flows_through(
    cluster: Cluster, demo: dict[str, Any]
) -> None:
    """The rendered NetworkPolicies, enforced on the real node (kube-router's firewall):
    every test above passed through them; here, what they refuse."""
    namespace = demo["namespace"]
    config = pod_config(cluster, namespace)
    http, metrics_port = config["http_port"], config["metrics_port"]
    bootstrap = config["transfer"]["bootstrap_port"]
    image = get_json(cluster, "-n", namespace, "get", "dsd", NAME)["spec"]["runtime"]["image"]
    outsider = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "outsider", "labels": {"app": "outsider"}},
        "spec": {
            "containers": [{"name": "shell", "image": image, "imagePullPolicy": "Never",
                            "command": ["sleep", "infinity"]}],
            "terminationGracePeriodSeconds": 0,
        },
    }  # fmt: skip
    cluster.kubectl("-n", namespace, "apply", "-f", "-", stdin=json.dumps(outsider))
    cluster.kubectl("-n", namespace, "wait", "pod/outsider", "--for=condition=Ready",
                    "--timeout=120s")  # fmt: skip
    (encode,) = pods(cluster, namespace, "encode")
    language = pods(cluster, namespace, "language")[0]
    (router,) = pods(cluster, namespace, "router")
    encode_ip, language_ip = encode["status"]["podIP"], language["status"]["podIP"]
    flows = {
        # (from, to, port): allowed
        ("router", "encode", http): True,
        ("router", "language", http): True,
        ("language", "encode", bootstrap): True,
        ("language", "encode", http): False,
        ("outsider", "encode", http): False,
        ("outsider", "encode", bootstrap): False,
        ("outsider", "language", http): False,
        ("outsider", "encode", metrics_port): True,  # Prometheus scrapes from anywhere
        ("outsider", "language", metrics_port): True,
    }
    names = {
        "router": router["metadata"]["name"],
        "language": language["metadata"]["name"],
        "outsider": "outsider",
    }
    ips = {"encode": encode_ip, "language": language_ip}
    seen = {
        (src, dst, port): connects(cluster, namespace, names[src], ips[dst], port)
        for src, dst, port in flows
    }
    assert seen == flows


def test_every_port_a_runtime_pod_listens_on_is_admitted_from_its_peer_group(
    cluster: Cluster, demo: dict[str, Any]
) -> None:
    """What the runtime (Mooncake included) really listens on, read in each pod's own
    network namespace from the node (/proc/<container pid>/net/tcp{,6}): every listening
    port of an encode pod is its HTTP or metrics port or one the rendered NetworkPolicy
    admits from language pods (the bootstrap port, Mooncake's handshake port: over RDMA
    the receiving side may fetch the sender's segment there), and likewise for a language
    pod from encode pods; through the enforced policy a language pod does reach each of
    the encode pod's Mooncake ports."""
    namespace = demo["namespace"]
    config = pod_config(cluster, namespace)
    http, metrics_port = config["http_port"], config["metrics_port"]
    transfer = config["transfer"]
    mooncake = set(range(transfer["mooncake_min_port"], transfer["mooncake_max_port"] + 1))
    policies = {
        p["metadata"]["labels"]["disagg.deepstack.dev/role"]: p["spec"]
        for p in get_json(cluster, "-n", namespace, "get", "networkpolicy")["items"]
        if p["metadata"]["labels"].get("app.kubernetes.io/instance") == NAME
    }

    def admitted(role: str, peer: str) -> set[int]:
        ports: set[int] = set()
        for rule in policies[role]["ingress"]:
            sources = [f["podSelector"]["matchLabels"] for f in rule.get("from", [])]
            if any(labels.get("disagg.deepstack.dev/role") == peer for labels in sources):
                for p in rule["ports"]:
                    ports.update(range(p["port"], p.get("endPort", p["port"]) + 1))
        return ports

    listening = {}
    for role, peer in (("encode", "language"), ("language", "encode")):
        pod = pods(cluster, namespace, role)[0]
        listening[role] = listening_ports(container_pid(pod), own_sockets_only=False)
        assert listening[role] & mooncake, (role, listening[role])  # Mooncake keeps to it
        unadmitted = listening[role] - {http, metrics_port} - admitted(role, peer)
        assert not unadmitted, f"{role} listens on {sorted(unadmitted)}, closed to {peer} pods"
    (encode,) = pods(cluster, namespace, "encode")
    language = pods(cluster, namespace, "language")[0]
    for port in sorted(listening["encode"] & mooncake):
        assert connects(cluster, namespace, language["metadata"]["name"],
                        encode["status"]["podIP"], port), port  # fmt: skip


def scaled_on_load(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    events = get_json(cluster, "-n", namespace, "get", "events.events.k8s.io")["items"]
    found = [e for e in events if e.get("reason") == "ScaledOnLoad"]
    return sorted(found, key=lambda e: e.get("eventTime") or "")


def group_replicas(cluster: Cluster, namespace: str) -> dict[str, int]:
    return {
        role: get_json(
            cluster, "-n", namespace, "get", "statefulset",
            group_name(cluster, namespace, NAME, role),
        )["spec"]["replicas"]
        for role in ("encode", "language")
    }  # fmt: skip


def test_load_autoscaling_scales_encode_on_image_load_within_the_ratio(
    cluster: Cluster, demo: dict[str, Any]
) -> None:
    """autoscaling.policy Load on real pods: image requests load the encoders, which grow
    first; the encode:language ratio brings a language pod with them; once the load is
    gone both shrink, but only after the stabilization window."""
    namespace = demo["namespace"]
    window = 20
    autoscaling = {
        "policy": "Load",
        "encode": {"minReplicas": 1, "maxReplicas": 2, "targetRequestsPerPod": 0.5},
        "language": {"minReplicas": 1, "maxReplicas": 2, "targetRequestsPerPod": 64},
        "ratio": {"min": 0.5, "max": 1},
        "scaleDownStabilizationSeconds": window,
    }
    cluster.kubectl(
        "-n", namespace, "patch", "dsd", NAME, "--type=merge",
        "-p", json.dumps({"spec": {"autoscaling": autoscaling}}),
    )  # fmt: skip
    assert group_replicas(cluster, namespace) == {"encode": 1, "language": 1}
    clients = [Traffic(demo["ROUTER_URL"], max_tokens=1, image_size=(448, 448)) for _ in range(8)]
    with contextlib.ExitStack() as running:
        for client in clients:
            running.enter_context(client)
        wait_until(
            lambda: group_replicas(cluster, namespace) == {"encode": 2, "language": 2},
            "the operator to scale on the image load",
            timeout=120,
        )

        def both_ready() -> bool:
            status = dsd(cluster, namespace, NAME).get("status") or {}
            return status.get("phase") == "Ready" and all(
                status.get(role, {}).get("readyReplicas") == 2 for role in ("encode", "language")
            )

        wait_until(both_ready, "the new pods to be ready", timeout=300)
    stopped = time.monotonic()
    assert all(c.failures() == [] for c in clients), [c.failures()[:1] for c in clients]
    (up,) = scaled_on_load(cluster, namespace)
    # The encoders grew on their own load; the language pod came with them for the ratio
    # (its own load, at 64 per pod, asked for one).
    change, _, seen = up["note"].partition(" (requests in flight: ")
    assert change == "encode 1 -> 2, language 1 -> 2", up["note"]
    loads = dict(part.split(" ") for part in seen.rstrip(")").split(", "))
    assert float(loads["encode"]) > 0.5
    assert float(loads["language"]) <= 64
    # Load gone: nothing shrinks within the window (less one reading's interval)...
    while time.monotonic() - stopped < window - 6:
        assert group_replicas(cluster, namespace) == {"encode": 2, "language": 2}
        time.sleep(1)
    # ...and then both do.
    wait_until(
        lambda: group_replicas(cluster, namespace) == {"encode": 1, "language": 1},
        "the scale down after the window",
        timeout=90,
    )
    down = scaled_on_load(cluster, namespace)[-1]
    assert down["note"].startswith("encode 2 -> 1, language 2 -> 1"), down["note"]
    cluster.kubectl(
        "-n", namespace, "patch", "dsd", NAME, "--type=merge",
        "-p", json.dumps({"spec": {"autoscaling": None}}),
    )  # fmt: skip


def test_uninstall_removes_the_operator_and_its_workloads(
    cluster: Cluster, demo: dict[str, Any]
) -> None:
    """Last: the resource is deleted (its children go with it), then the chart."""
    namespace = demo["namespace"]
    cluster.kubectl("-n", namespace, "delete", "dsd", NAME, "--wait", "--timeout=120s")
    wait_until(
        lambda: all(not pods(cluster, namespace, r) for r in ("encode", "language", "router")),
        "the runtime pods to be deleted with their resource",
    )
    result = subprocess.run(
        [str(cluster.bin / "helm"), "--kubeconfig", str(cluster.kubeconfig), "uninstall",
         "deepstack-disagg", "--namespace", SYSTEM, "--wait", "--timeout", "120s"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    wait_until(
        lambda: get_json(cluster, "-n", SYSTEM, "get", "pods")["items"] == [],
        "the operator's pod to be gone",
    )
    left = cluster.kubectl(
        "get", "all,serviceaccounts,roles,rolebindings,clusterroles,clusterrolebindings",
        "-A", "-l", "app.kubernetes.io/instance=deepstack-disagg", "-o", "name",
    ).stdout.split()  # fmt: skip
    assert left == []
    # The CRD stays (Helm never deletes CRDs): users' other resources keep their data.
    assert cluster.kubectl("get", "crd", "deepstackdisaggregations.disagg.deepstack.dev")
