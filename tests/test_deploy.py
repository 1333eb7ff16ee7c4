"""The Kubernetes manifests in deploy/kubernetes/ hold together: kinds and API versions, the
selectors match the pod labels, the probes reach /healthz on the served port, the API keys come
from the Secret, resources and the security context are what docs/scale-out.md says, and the
container's arguments are valid `boxlite serve` flags. No cluster is involved: the manifests
are parsed, not applied."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "deploy" / "kubernetes"
API_VERSIONS = {"Namespace": "v1", "Secret": "v1", "Service": "v1", "DaemonSet": "apps/v1"}


def documents() -> Iterator[dict[str, Any]]:
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield doc


@pytest.fixture(scope="module")
def objects() -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for doc in documents():
        found.setdefault(doc["kind"], []).append(doc)
    return found


@pytest.fixture(scope="module")
def daemonset(objects: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (ds,) = objects["DaemonSet"]
    return ds


@pytest.fixture(scope="module")
def container(daemonset: dict[str, Any]) -> dict[str, Any]:
    (c,) = daemonset["spec"]["template"]["spec"]["containers"]
    return c


def serve_args(container: dict[str, Any]) -> argparse.Namespace:
    from boxlite.serve.config import add_flags

    args = container["args"]
    assert args[0] == "serve"
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser)
    return parser.parse_args(args[1:])


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(match)


def test_kinds_api_versions_and_namespace(objects: dict[str, list[dict[str, Any]]]) -> None:
    assert sorted(objects) == sorted(API_VERSIONS)
    assert len(objects["Service"]) == 2
    for kind, docs in objects.items():
        for doc in docs:
            assert doc["apiVersion"] == API_VERSIONS[kind]
            if kind != "Namespace":
                assert doc["metadata"]["namespace"] == objects["Namespace"][0]["metadata"]["name"]
    assert objects["Namespace"][0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_selectors_match_the_pod_labels(objects: dict[str, list[dict[str, Any]]], daemonset: dict[str, Any]) -> None:
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    selector = daemonset["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= labels.items()
    for service in objects["Service"]:
        assert service["spec"]["selector"] and service["spec"]["selector"].items() <= labels.items()
    headless = [s for s in objects["Service"] if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1
    (sticky,) = [s for s in objects["Service"] if s not in headless]
    assert sticky["spec"]["sessionAffinity"] == "ClientIP"  # a box lives in one pod


def test_services_and_probes_reach_the_served_port(
    objects: dict[str, list[dict[str, Any]]], container: dict[str, Any]
) -> None:
    served = serve_args(container)
    assert served.host == "0.0.0.0"
    assert port_number(container, "http") == served.port
    for service in objects["Service"]:
        for port in service["spec"]["ports"]:
            assert port_number(container, port["targetPort"]) == served.port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz"
        assert port_number(container, get["port"]) == served.port


def test_api_keys_come_from_the_secret(
    objects: dict[str, list[dict[str, Any]]], daemonset: dict[str, Any], container: dict[str, Any]
) -> None:
    (secret,) = objects["Secret"]
    served = serve_args(container)
    assert served.api_key == []  # never a key on the command line
    keys_file = Path(served.api_keys_file)
    (mount,) = [m for m in container["volumeMounts"] if keys_file.parent == Path(m["mountPath"])]
    assert mount["readOnly"] is True
    (volume,) = [v for v in daemonset["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    (item,) = [i for i in volume["secret"]["items"] if i["path"] == keys_file.name]
    assert item["key"] in secret["stringData"]
    assert volume["secret"]["defaultMode"] & 0o077 & ~0o040 == 0  # readable by the pod's group only


def test_home_is_a_volume(daemonset: dict[str, Any], container: dict[str, Any]) -> None:
    home = serve_args(container).home
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == home]
    (volume,) = [v for v in daemonset["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume or "hostPath" in volume


def test_resources_and_node_placement(daemonset: dict[str, Any], container: dict[str, Any]) -> None:
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["nodeSelector"]  # only nodes labelled as having /dev/kvm
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]
    kvm = [name for name in resources["limits"] if name.endswith("/kvm")]
    assert kvm and resources["requests"][kvm[0]] == resources["limits"][kvm[0]]
    assert pod["terminationGracePeriodSeconds"] >= 30  # boxes stop cleanly


def test_not_privileged(daemonset: dict[str, Any], container: dict[str, Any]) -> None:
    pod = daemonset["spec"]["template"]["spec"]
    context = container["securityContext"]
    assert context.get("privileged") is False
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    assert all("hostPath" not in v for v in pod["volumes"])
