"""Chart tests for charts/worker-pool.

The chart is rendered by the real Helm engine (helm-python-sdk, no helm binary),
linted, every core-kind object is validated against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields fail), and the wiring between the
objects is asserted: the grace period covers the drain, the autoscaler's target is
the workers' concurrency, the exporter's URL names its Service, the env follows the
values.

Run: scripts/chart-test (it installs the two packages into a virtualenv).
"""

import copy
import re
import unittest
from pathlib import Path
from urllib.parse import urlparse

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parent.parent
EXAMPLES = CHART / "examples"
NAMESPACE = "pools"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest
# the validator knows.
KUBE_VERSIONS = ["1.25.0", kubernetes_validate.utils.latest_version()]
CORE_API_GROUPS = ("v1", "apps/", "policy/", "autoscaling/", "rbac.authorization.k8s.io/")


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a mapping with a key twice (the API server would
    keep one silently)."""


def _no_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates
)

# The fields of KEDA's ScaledObject (keda.sh/v1alpha1) this chart may write; an
# unknown or misspelt field fails, as it would be dropped by the API server.
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["failureThreshold", "replicas"],
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 0},
                        "behavior": {
                            "enum": [
                                "static",
                                "currentReplicas",
                                "currentReplicasIfHigher",
                                "currentReplicasIfLower",
                            ]
                        },
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                # The HPA's own behavior type, checked below
                                # against the Kubernetes schema.
                                "behavior": {"type": "object"},
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"enum": ["metrics-api", "redis", "rabbitmq"]},
                            "name": {"type": "string", "pattern": "^[a-z0-9-]+$"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            # KEDA reads every metadata value as a string.
                            "metadata": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                            "authenticationRef": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"enum": ["ServiceMonitor", "PodMonitor"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "namespaceSelector": {"type": "object"},
                "endpoints": {"type": "array", "minItems": 1},
                "podMetricsEndpoints": {"type": "array", "minItems": 1},
            },
        },
    },
}


def example(name):
    with open(EXAMPLES / f"{name}.yaml") as f:
        return yaml.safe_load(f)


def merge(base, override):
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# Every scenario the wiring tests run on: the defaults, the three pools, and the
# variants a release can choose.
SCENARIOS = {
    "defaults": {},
    "gpu-inference": example("gpu-inference"),
    "doc-processing": example("doc-processing"),
    "batch": example("batch"),
    "amqp-management-url": {
        "broker": {
            "type": "amqp",
            "amqp": {"managementUrl": "http://guest:guest@rabbitmq:15672"},
        }
    },
    "hpa": {"autoscaling": {"engine": "hpa"}, "replicas": {"min": 0, "max": 6}},
    "keda-redis-trigger": {
        "autoscaling": {"keda": {"trigger": "redis"}},
        "worker": {"queues": [{"name": "a", "weight": 2}, {"name": "b"}]},
    },
    "keda-rabbitmq-trigger": {
        "broker": {"type": "amqp"},
        "autoscaling": {"keda": {"trigger": "rabbitmq"}},
    },
    "autoscaling-off": {"autoscaling": {"enabled": False}, "replicas": {"min": 3}},
    "pod-deletion-cost": {"podDeletionCost": {"enabled": True}},
    "monitoring": {"serviceMonitor": {"enabled": True}},
    "no-fallback": {"autoscaling": {"keda": {"fallback": {"enabled": False}}}},
}


class Rendered:
    """One rendering: objects by (kind, name), and the NOTES text."""

    def __init__(self, values, release="pool"):
        self.values_in = values
        with helm.Chart.load(CHART) as chart:
            chart.validate_schema(values)
            self.values = chart.merge_values(values)
            manifests = chart.render(values, name=release, namespace=NAMESPACE)
        self.notes = ""
        self.objects = []
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            for doc in yaml.load_all(text, Loader=UniqueKeyLoader):
                if doc:
                    self.objects.append(doc)

    def all(self, kind):
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind, component=None):
        found = [
            o
            for o in self.all(kind)
            if component is None
            or o["metadata"]["labels"].get("app.kubernetes.io/component") == component
        ]
        if len(found) != 1:
            raise AssertionError(f"expected one {kind} {component or ''}, found {len(found)}")
        return found[0]

    def workers(self):
        return self.one("Deployment", "worker")

    def exporter(self):
        return self.one("Deployment", "exporter")


def container(deployment):
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env_of(deployment):
    """Plain env values by name; valueFrom entries map to their source."""
    out = {}
    for e in container(deployment).get("env", []):
        out[e["name"]] = e.get("value", e.get("valueFrom"))
    return out


def args_of(deployment):
    out = {}
    for a in container(deployment).get("args", []):
        key, _, value = a.partition("=")
        out[key] = value
    return out


def seconds(duration):
    m = re.fullmatch(r"(\d+)s", duration)
    if not m:
        raise AssertionError(f"not a duration in seconds: {duration!r}")
    return int(m.group(1))


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


class RenderEveryScenario(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.rendered = {name: Rendered(values) for name, values in SCENARIOS.items()}

    def scenarios(self):
        for name, r in self.rendered.items():
            with self.subTest(scenario=name):
                yield name, r

    def test_lint_is_clean(self):
        for name, values in SCENARIOS.items():
            with self.subTest(scenario=name):
                report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
                self.assertEqual(report["errors"], [])
                self.assertEqual(report["messages"], [])

    def test_core_objects_validate_against_kubernetes(self):
        for _, r in self.scenarios():
            core = [o for o in r.objects if o["apiVersion"].startswith(CORE_API_GROUPS)]
            self.assertGreaterEqual(len(core), 3)
            for obj in core:
                for version in KUBE_VERSIONS:
                    try:
                        kubernetes_validate.validate(obj, version, strict=True)
                    except kubernetes_validate.ValidationError as e:
                        self.fail(
                            f"{obj['kind']}/{obj['metadata']['name']} on {version}: "
                            f"{'.'.join(map(str, e.path))}: {e.message}"
                        )

    def test_other_objects_are_keda_or_prometheus_operator(self):
        for _, r in self.scenarios():
            for obj in r.objects:
                if obj["apiVersion"].startswith(CORE_API_GROUPS):
                    continue
                if obj["kind"] == "ScaledObject":
                    jsonschema.validate(obj, SCALED_OBJECT_SCHEMA)
                    behavior = obj["spec"]["advanced"]["horizontalPodAutoscalerConfig"][
                        "behavior"
                    ]
                    # KEDA hands this to the HPA as is: validate it as an HPA's.
                    hpa = {
                        "apiVersion": "autoscaling/v2",
                        "kind": "HorizontalPodAutoscaler",
                        "metadata": {"name": "keda-hpa"},
                        "spec": {
                            "scaleTargetRef": {"kind": "Deployment", "name": "x"},
                            "maxReplicas": 1,
                            "behavior": behavior,
                        },
                    }
                    for version in KUBE_VERSIONS:
                        kubernetes_validate.validate(hpa, version, strict=True)
                elif obj["kind"] in ("ServiceMonitor", "PodMonitor"):
                    jsonschema.validate(obj, MONITOR_SCHEMA)
                else:
                    self.fail(f"unexpected object {obj['apiVersion']} {obj['kind']}")

    def test_every_object_in_the_release_namespace_with_pool_labels(self):
        for _, r in self.scenarios():
            pool = r.values["pool"] or "pool"
            for obj in r.objects:
                self.assertEqual(obj["metadata"]["namespace"], NAMESPACE)
                self.assertEqual(obj["metadata"]["labels"]["worker-pools.io/pool"], pool)

    def test_grace_period_covers_the_drain(self):
        for _, r in self.scenarios():
            spec = r.workers()["spec"]["template"]["spec"]
            drain = seconds(env_of(r.workers())["WORKER_DRAIN_TIMEOUT"])
            self.assertEqual(drain, r.values["worker"]["drainTimeoutSeconds"])
            self.assertGreater(spec["terminationGracePeriodSeconds"], drain)

    def test_worker_env_follows_values(self):
        for name, r in self.scenarios():
            v = r.values
            env = env_of(r.workers())
            queues = ",".join(f"{q['name']}:{q.get('weight', 1)}" for q in v["worker"]["queues"])
            self.assertEqual(env["WORKER_QUEUES"], queues)
            self.assertEqual(env["WORKER_POOL"], v["pool"] or "pool")
            self.assertEqual(env["WORKER_CONCURRENCY"], str(v["worker"]["concurrency"]))
            self.assertEqual(seconds(env["WORKER_LEASE"]), v["worker"]["leaseSeconds"])
            self.assertEqual(seconds(env["WORKER_HEARTBEAT"]), v["worker"]["heartbeatSeconds"])
            self.assertEqual(env["WORKER_MAX_ATTEMPTS"], str(v["worker"]["maxAttempts"]))
            port = v["worker"]["port"]
            self.assertEqual(env["WORKER_HTTP_ADDR"], f"0.0.0.0:{port}")
            ports = container(r.workers())["ports"]
            self.assertEqual(ports, [{"name": "http", "containerPort": port, "protocol": "TCP"}])
            broker = v["broker"]
            if broker["type"] == "redis":
                self.assertNotIn("AMQP_URL", env)
                self.assertEqual(env["REDIS_PREFIX"], broker["redis"]["prefix"])
                if broker["redis"]["existingSecret"]:
                    self.assertEqual(
                        env["REDIS_URL"],
                        {
                            "secretKeyRef": {
                                "name": broker["redis"]["existingSecret"],
                                "key": broker["redis"]["existingSecretKey"],
                            }
                        },
                    )
                else:
                    self.assertEqual(env["REDIS_URL"], broker["redis"]["url"])
            else:
                self.assertNotIn("REDIS_URL", env)
                self.assertEqual(env["AMQP_QUEUE_TYPE"], broker["amqp"]["queueType"])
                if broker["amqp"]["existingSecret"]:
                    self.assertEqual(
                        env["AMQP_URL"]["secretKeyRef"]["name"], broker["amqp"]["existingSecret"]
                    )
                else:
                    self.assertEqual(env["AMQP_URL"], broker["amqp"]["url"])
                if broker["amqp"]["consumerTimeout"]:
                    self.assertEqual(env["AMQP_CONSUMER_TIMEOUT"], broker["amqp"]["consumerTimeout"])

    def test_exporter_reads_the_same_broker_and_pool(self):
        for _, r in self.scenarios():
            if not r.values["exporter"]["enabled"]:
                continue
            workers, exporter = env_of(r.workers()), env_of(r.exporter())
            for key in ("REDIS_URL", "REDIS_PREFIX", "AMQP_URL", "AMQP_MANAGEMENT_URL", "AMQP_QUEUE_TYPE"):
                self.assertEqual(exporter.get(key), workers.get(key), key)
            args = args_of(r.exporter())
            self.assertEqual(container(r.exporter())["command"], ["workerctl", "exporter"])
            self.assertEqual(args["--pool"], workers["WORKER_POOL"])
            names = [q.split(":")[0] for q in workers["WORKER_QUEUES"].split(",")]
            self.assertEqual(args["--queues"], ",".join(names))
            self.assertEqual(args["--capacity"], workers["WORKER_CONCURRENCY"])
            self.assertEqual(args["--min-replicas"], str(r.values["replicas"]["min"]))
            self.assertEqual(args["--max-replicas"], str(r.values["replicas"]["max"]))

    def test_scaled_object_targets_concurrency_per_replica(self):
        for name, r in self.scenarios():
            so = r.all("ScaledObject")
            keda = r.values["autoscaling"]["enabled"] and r.values["autoscaling"]["engine"] == "keda"
            self.assertEqual(len(so), 1 if keda else 0)
            if not keda:
                continue
            so = so[0]
            concurrency = env_of(r.workers())["WORKER_CONCURRENCY"]
            self.assertEqual(so["spec"]["scaleTargetRef"]["name"], r.workers()["metadata"]["name"])
            self.assertEqual(so["spec"]["minReplicaCount"], r.values["replicas"]["min"])
            self.assertEqual(so["spec"]["maxReplicaCount"], r.values["replicas"]["max"])
            for trigger in so["spec"]["triggers"]:
                # AverageValue: the HPA divides the metric by the target per replica.
                self.assertEqual(trigger["metricType"], "AverageValue")
                meta = trigger["metadata"]
                target = {"metrics-api": "targetValue", "redis": "listLength", "rabbitmq": "value"}
                self.assertEqual(meta[target[trigger["type"]]], concurrency)
            # The workers' replica count belongs to the autoscaler, not to each upgrade.
            self.assertNotIn("replicas", r.workers()["spec"])
            scale_down = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"][
                "scaleDown"
            ]
            self.assertEqual(
                scale_down["stabilizationWindowSeconds"],
                r.values["autoscaling"]["keda"]["scaleDownStabilizationSeconds"],
            )

    def test_exporter_url_reaches_the_exporter_by_name(self):
        for name, r in self.scenarios():
            triggers = [
                t
                for so in r.all("ScaledObject")
                for t in so["spec"]["triggers"]
                if t["type"] == "metrics-api"
            ]
            if not triggers:
                continue
            (trigger,) = triggers
            url = urlparse(trigger["metadata"]["url"])
            self.assertEqual(url.scheme, "http")
            self.assertEqual(url.path, "/scaling")
            self.assertEqual(trigger["metadata"]["valueLocation"], "backlog")
            service_name, ns, svc, cluster, local = url.hostname.split(".")
            self.assertEqual((ns, svc, cluster, local), (NAMESPACE, "svc", "cluster", "local"))
            (service,) = [s for s in r.all("Service") if s["metadata"]["name"] == service_name]
            (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
            exporter = r.exporter()
            pod_labels = exporter["spec"]["template"]["metadata"]["labels"]
            self.assertTrue(matches(service["spec"]["selector"], pod_labels))
            self.assertTrue(matches(exporter["spec"]["selector"]["matchLabels"], pod_labels))
            # The selector must not also pick the workers.
            worker_labels = r.workers()["spec"]["template"]["metadata"]["labels"]
            self.assertFalse(matches(service["spec"]["selector"], worker_labels))
            (cport,) = [
                p for p in container(exporter)["ports"] if p["name"] == port["targetPort"]
            ]
            listen = args_of(exporter)["--listen"]
            self.assertEqual(listen, f"0.0.0.0:{cport['containerPort']}")

    def test_scale_from_zero_on_one_job_and_fallback_holds_the_pool(self):
        for name, r in self.scenarios():
            for so in r.all("ScaledObject"):
                k = r.values["autoscaling"]["keda"]
                for t in so["spec"]["triggers"]:
                    activation = {
                        "metrics-api": "activationTargetValue",
                        "redis": "activationListLength",
                        "rabbitmq": "activationValue",
                    }[t["type"]]
                    self.assertEqual(t["metadata"][activation], str(k["activationBacklog"]))
                if k["fallback"]["enabled"]:
                    self.assertEqual(
                        so["spec"]["fallback"],
                        {
                            "failureThreshold": k["fallback"]["failureThreshold"],
                            "replicas": k["fallback"]["replicas"],
                            "behavior": "currentReplicasIfHigher",
                        },
                    )
                else:
                    self.assertNotIn("fallback", so["spec"])
        self.assertEqual(
            self.rendered["defaults"].one("ScaledObject")["spec"]["triggers"][0]["metadata"][
                "activationTargetValue"
            ],
            "0",
        )

    def test_security_context_non_root_read_only_no_capabilities(self):
        for _, r in self.scenarios():
            for d in r.all("Deployment"):
                pod = d["spec"]["template"]["spec"]
                self.assertTrue(pod["securityContext"]["runAsNonRoot"])
                self.assertNotEqual(pod["securityContext"]["runAsUser"], 0)
                sc = container(d)["securityContext"]
                self.assertTrue(sc["readOnlyRootFilesystem"])
                self.assertFalse(sc["allowPrivilegeEscalation"])
                self.assertEqual(sc["capabilities"]["drop"], ["ALL"])

    def test_probes_on_livez_and_readyz(self):
        for _, r in self.scenarios():
            c = container(r.workers())
            self.assertEqual(c["livenessProbe"]["httpGet"], {"path": "/livez", "port": "http"})
            self.assertEqual(c["readinessProbe"]["httpGet"], {"path": "/readyz", "port": "http"})

    def test_pod_disruption_budget_selects_the_workers_only(self):
        for _, r in self.scenarios():
            pdb = r.one("PodDisruptionBudget")
            selector = pdb["spec"]["selector"]["matchLabels"]
            self.assertTrue(matches(selector, r.workers()["spec"]["template"]["metadata"]["labels"]))
            if r.values["exporter"]["enabled"]:
                self.assertFalse(
                    matches(selector, r.exporter()["spec"]["template"]["metadata"]["labels"])
                )


class Variants(unittest.TestCase):
    def test_plain_hpa_when_keda_is_off(self):
        r = Rendered(SCENARIOS["hpa"])
        self.assertEqual(r.all("ScaledObject"), [])
        hpa = r.one("HorizontalPodAutoscaler")
        # A plain HPA cannot go to zero.
        self.assertEqual(hpa["spec"]["minReplicas"], 1)
        self.assertEqual(hpa["spec"]["maxReplicas"], 6)
        self.assertEqual(hpa["spec"]["metrics"][0]["resource"]["name"], "cpu")
        self.assertEqual(hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"], 70)
        self.assertEqual(hpa["spec"]["scaleTargetRef"]["name"], r.workers()["metadata"]["name"])
        self.assertIn("does not see the queue", r.notes)

    def test_autoscaling_off_runs_fixed_replicas(self):
        r = Rendered(SCENARIOS["autoscaling-off"])
        self.assertEqual(r.workers()["spec"]["replicas"], 3)
        self.assertEqual(r.all("ScaledObject") + r.all("HorizontalPodAutoscaler"), [])

    def test_native_redis_trigger_one_per_queue_on_the_pending_list(self):
        r = Rendered(SCENARIOS["keda-redis-trigger"])
        triggers = r.one("ScaledObject")["spec"]["triggers"]
        self.assertEqual([t["type"] for t in triggers], ["redis", "redis"])
        self.assertEqual(
            [t["metadata"]["listName"] for t in triggers], ["{wp:a}:pending", "{wp:b}:pending"]
        )
        self.assertEqual(len({t["name"] for t in triggers}), 2)
        self.assertIn("counts waiting jobs only", r.notes)

    def test_native_rabbitmq_trigger_reads_the_worker_env(self):
        r = Rendered(SCENARIOS["keda-rabbitmq-trigger"])
        (t,) = r.one("ScaledObject")["spec"]["triggers"]
        self.assertEqual(t["metadata"]["queueName"], "default")
        self.assertEqual(t["metadata"]["mode"], "QueueLength")
        # KEDA resolves hostFromEnv in the scale target's first container.
        self.assertIn(t["metadata"]["hostFromEnv"], env_of(r.workers()))
        self.assertIn("managementUrl is empty", r.notes)

    def test_pod_deletion_cost_env_and_rbac_only_when_enabled(self):
        off = Rendered({})
        self.assertEqual(off.all("Role") + off.all("RoleBinding"), [])
        self.assertFalse(off.workers()["spec"]["template"]["spec"]["automountServiceAccountToken"])
        self.assertNotIn("WORKER_POD_DELETION_COST", env_of(off.workers()))

        on = Rendered(SCENARIOS["pod-deletion-cost"])
        pod = on.workers()["spec"]["template"]["spec"]
        self.assertTrue(pod["automountServiceAccountToken"])
        env = env_of(on.workers())
        self.assertEqual(env["WORKER_POD_DELETION_COST"], "true")
        self.assertEqual(env["POD_NAME"], {"fieldRef": {"fieldPath": "metadata.name"}})
        self.assertEqual(env["POD_NAMESPACE"], {"fieldRef": {"fieldPath": "metadata.namespace"}})
        role = on.one("Role")
        self.assertEqual(
            role["rules"],
            [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}],
        )
        binding = on.one("RoleBinding")
        self.assertEqual(binding["roleRef"]["name"], role["metadata"]["name"])
        self.assertEqual(
            binding["subjects"],
            [
                {
                    "kind": "ServiceAccount",
                    "name": pod["serviceAccountName"],
                    "namespace": NAMESPACE,
                }
            ],
        )
        self.assertEqual(on.one("ServiceAccount")["metadata"]["name"], pod["serviceAccountName"])
        # The exporter never needs the API.
        self.assertFalse(on.exporter()["spec"]["template"]["spec"]["automountServiceAccountToken"])

    def test_monitors_select_the_exporter_service_and_the_worker_pods(self):
        r = Rendered(SCENARIOS["monitoring"])
        sm = r.one("ServiceMonitor")
        service = r.one("Service")
        self.assertTrue(matches(sm["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]))
        self.assertEqual(sm["spec"]["endpoints"][0]["port"], service["spec"]["ports"][0]["name"])
        pm = r.one("PodMonitor")
        self.assertTrue(
            matches(
                pm["spec"]["selector"]["matchLabels"],
                r.workers()["spec"]["template"]["metadata"]["labels"],
            )
        )
        self.assertEqual(pm["spec"]["podMetricsEndpoints"][0]["port"], "http")
        self.assertEqual(Rendered({}).all("ServiceMonitor") + Rendered({}).all("PodMonitor"), [])

    def test_gpu_pool_requests_gpus_and_tolerates_gpu_nodes(self):
        r = Rendered(SCENARIOS["gpu-inference"])
        c = container(r.workers())
        self.assertEqual(c["resources"]["limits"]["nvidia.com/gpu"], 1)
        self.assertEqual(c["resources"]["limits"]["memory"], "16Gi")
        pod = r.workers()["spec"]["template"]["spec"]
        self.assertEqual(pod["tolerations"][0]["key"], "nvidia.com/gpu")
        self.assertEqual(pod["terminationGracePeriodSeconds"], 615)
        # The exporter is tiny and runs anywhere: no GPU, no GPU node.
        self.assertNotIn("nodeSelector", r.exporter()["spec"]["template"]["spec"])
        self.assertNotIn("nvidia.com/gpu", container(r.exporter())["resources"].get("limits", {}))

    def test_document_pool_mounts_its_documents_and_sets_its_memory_budget(self):
        r = Rendered(SCENARIOS["doc-processing"])
        c = container(r.workers())
        self.assertEqual(env_of(r.workers())["WORKER_MEMORY_BUDGET"], "6GiB")
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        self.assertEqual(mounts["documents"]["mountPath"], "/data")
        self.assertTrue(mounts["documents"]["readOnly"])
        self.assertIn("tmp", mounts)
        volumes = {v["name"]: v for v in r.workers()["spec"]["template"]["spec"]["volumes"]}
        self.assertEqual(volumes["documents"]["persistentVolumeClaim"]["claimName"], "documents")
        # Every mount names a volume of the pod.
        self.assertLessEqual(set(mounts), set(volumes))

    def test_release_name_is_the_default_pool(self):
        r = Rendered({}, release="thumbnails")
        self.assertEqual(env_of(r.workers())["WORKER_POOL"], "thumbnails")
        self.assertEqual(args_of(r.exporter())["--pool"], "thumbnails")


class BadValues(unittest.TestCase):
    def schema_error(self, values):
        with helm.Chart.load(CHART) as chart:
            with self.assertRaises(helm.HelmValuesError) as caught:
                chart.validate_schema(values)
        return str(caught.exception)

    def render_error(self, values):
        with helm.Chart.load(CHART) as chart:
            with self.assertRaises(helm.HelmError) as caught:
                chart.render(values, name="pool", namespace=NAMESPACE)
        return str(caught.exception)

    def test_schema_names_the_bad_value(self):
        cases = [
            ({"worker": {"concurrency": 0}}, "concurrency"),
            ({"worker": {"queues": []}}, "queues"),
            ({"worker": {"queues": [{"name": "a b"}]}}, "name"),
            ({"worker": {"queues": [{"name": "a", "weight": 0}]}}, "weight"),
            ({"broker": {"type": "kafka"}}, "type"),
            ({"broker": {"redis": {"url": "http://redis:6379"}}}, "url"),
            ({"autoscaling": {"keda": {"trigger": "sqs"}}}, "trigger"),
            ({"autoscaling": {"keda": {"fallback": {"behavior": "hold"}}}}, "behavior"),
            ({"replicas": {"min": -1}}, "min"),
            ({"concurency": 4}, "concurency"),
            ({"worker": {"drainTimeoutSeconds": "30s"}}, "drainTimeoutSeconds"),
        ]
        for values, word in cases:
            with self.subTest(values=values):
                self.assertIn(word, self.schema_error(values))

    def test_contradictions_fail_with_the_fix(self):
        message = self.render_error({"exporter": {"enabled": False}})
        self.assertIn("exporter.enabled=true", message)
        message = self.render_error(
            {"broker": {"type": "amqp"}, "autoscaling": {"keda": {"trigger": "redis"}}}
        )
        self.assertIn("needs broker.type=redis", message)
        message = self.render_error(
            {"autoscaling": {"engine": "hpa", "hpa": {"cpuUtilization": None}}}
        )
        self.assertIn("cpuUtilization", message)


if __name__ == "__main__":
    unittest.main()
