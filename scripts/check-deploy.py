"""Checks deploy/ with the tools this machine has (run by tests/deploy.rs, inside the virtualenv
that scripts/install-tools.sh makes with kubernetes-validate and PyYAML).

- the kustomize base renders (`kubectl kustomize` when kubectl is installed; otherwise the base's
  resources are read directly) and every built-in kind validates strictly against the Kubernetes
  schemas (kubernetes-validate); the CRD kinds validate against deploy/k8s/schemas/crds.json;
- the pieces agree: probes on /healthz and /readyz, the termination grace exceeds
  STRATA_SHUTDOWN_GRACE, the KEDA trigger watches the Deployment's consumer group and topic, the
  PDB and PodMonitor select the Deployment's pods;
- the compose file parses and has the services the stack promises.
Prints one line per check and exits non-zero on the first failure.
"""
import json
import pathlib
import shutil
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "k8s" / "base"


def fail(message):
    print(f"FAIL {message}")
    sys.exit(1)


def ok(message):
    print(f"ok   {message}")


def rendered_documents():
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(BASE)], check=True, capture_output=True, text=True).stdout
        ok("kubectl kustomize renders the base")
        return list(yaml.safe_load_all(out))
    print("skip kubectl kustomize (kubectl not installed): reading the base's resources directly")
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        docs.extend(yaml.safe_load_all((BASE / resource).read_text()))
    return docs


def seconds(text):
    text = str(text)
    for suffix, factor in (("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)):
        if text.endswith(suffix) and text[: -len(suffix)].isdigit():
            return int(text[: -len(suffix)]) * factor
    return float(text)


def main():
    docs = [d for d in rendered_documents() if d]
    by_kind = {d["kind"]: d for d in docs}
    crds = json.loads((ROOT / "deploy" / "k8s" / "schemas" / "crds.json").read_text())
    for doc in docs:
        name = f'{doc["kind"]}/{doc["metadata"]["name"]}'
        if doc["kind"] in crds:
            try:
                jsonschema.validate(doc, crds[doc["kind"]])
            except jsonschema.ValidationError as e:
                fail(f"{name}: {e.message}")
            ok(f"{name} validates against its CRD schema")
            continue
        try:
            kubernetes_validate.validate(doc, "1.32.0", strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(f"{name}: {e.message} at {list(e.path)}")
        ok(f"{name} validates (Kubernetes 1.32, strict)")

    for kind in ("Deployment", "ConfigMap", "Secret", "Service", "PodDisruptionBudget", "PodMonitor", "ScaledObject"):
        if kind not in by_kind:
            fail(f"the base has no {kind}")
    deployment = by_kind["Deployment"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    config = by_kind["ConfigMap"]["data"]
    if container["livenessProbe"]["httpGet"]["path"] != "/healthz" or container["readinessProbe"]["httpGet"]["path"] != "/readyz":
        fail("probes must be /healthz (liveness) and /readyz (readiness)")
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    if grace <= seconds(config["STRATA_SHUTDOWN_GRACE"]):
        fail(f"terminationGracePeriodSeconds {grace} must exceed STRATA_SHUTDOWN_GRACE {config['STRATA_SHUTDOWN_GRACE']}")
    refs = {r.get("configMapRef", {}).get("name") or r.get("secretRef", {}).get("name") for r in container["envFrom"]}
    if refs != {by_kind["ConfigMap"]["metadata"]["name"], by_kind["Secret"]["metadata"]["name"]}:
        fail(f"envFrom must reference the ConfigMap and the Secret, got {refs}")
    if not all(k in container["resources"].get(part, {}) for part in ("requests", "limits") for k in ("cpu", "memory")):
        fail("cpu and memory requests and limits are required")
    labels = pod["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "PodMonitor", "Service"):
        spec = by_kind[kind]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        if any(labels.get(k) != v for k, v in selector.items()):
            fail(f"{kind} selector {selector} does not select the Deployment's pods {labels}")
    trigger = by_kind["ScaledObject"]["spec"]["triggers"][0]
    if trigger["type"] != "kafka" or trigger["metadata"]["consumerGroup"] != config["STRATA_GROUP_ID"] \
            or trigger["metadata"]["topic"] not in config["STRATA_TOPICS"].split(","):
        fail("the KEDA trigger must watch the pipeline's consumer group and topic")
    if by_kind["ScaledObject"]["spec"]["scaleTargetRef"]["name"] != deployment["metadata"]["name"]:
        fail("the ScaledObject must scale the Deployment")
    ok("probes, grace period, env references, resources, selectors and the KEDA trigger agree")

    compose = yaml.safe_load((ROOT / "deploy" / "compose" / "docker-compose.yaml").read_text())
    services = compose["services"]
    for needed in ("kafka", "schema-registry", "minio", "prometheus", "grafana", "strata-1", "strata-2"):
        if needed not in services:
            fail(f"compose has no service {needed}")
    if services["kafka"]["environment"].get("KAFKA_PROCESS_ROLES") != "broker,controller":
        fail("compose Kafka must run in KRaft mode")
    for replica in ("strata-1", "strata-2"):
        env = services[replica]["environment"]
        if env["STRATA_GROUP_ID"] != services["strata-1"]["environment"]["STRATA_GROUP_ID"]:
            fail("both replicas must share one consumer group")
    for mount in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        source = mount.split(":")[0]
        if not (ROOT / "deploy" / "compose" / source).resolve().exists():
            fail(f"compose mounts {source}, which does not exist")
    ok("compose parses: Kafka (KRaft), registry, S3, Prometheus, Grafana, two replicas in one group")


if __name__ == "__main__":
    main()
