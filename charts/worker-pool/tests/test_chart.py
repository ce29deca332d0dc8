"""Chart tests for charts/worker-pool.

The chart is rendered by the real Helm engine (helm-python-sdk, no helm binary),
linted, every core-kind object is validated against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields fail), and the wiring between the
objects is asserted: the grace period covers the drain, the autoscaler's target is
the workers' concurrency, the exporter's URL names its Service, the env follows the
values. The pod-deletion-cost admission policy's CEL is evaluated (cel-python) on
the requests it must let through and on those it must refuse.

Run: scripts/chart-test (it installs the packages into a virtualenv).
"""

import copy
import json
import posixpath
import re
import unittest
from pathlib import Path
from urllib.parse import urlparse

import celpy
import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from helm_python import _native as helm_native

CHART = Path(__file__).resolve().parent.parent
EXAMPLES = CHART / "examples"
NAMESPACE = "pools"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest
# the validator knows.
KUBE_VERSIONS = ["1.25.0", kubernetes_validate.utils.latest_version()]
CORE_API_GROUPS = (
    "v1",
    "apps/",
    "policy/",
    "autoscaling/",
    "rbac.authorization.k8s.io/",
    "networking.k8s.io/",
    "admissionregistration.k8s.io/",
)
# ValidatingAdmissionPolicy v1 exists from Kubernetes 1.30; both kinds are
# cluster-scoped.
ADMISSION_POLICY_SINCE = "1.30.0"
CLUSTER_SCOPED = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
DIGEST = "sha256:" + "0123456789abcdef" * 4


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
                            "type": {
                                "enum": ["metrics-api", "external-push", "redis", "rabbitmq"]
                            },
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
    "keda-rabbitmq-http-trigger": {
        "broker": {"type": "amqp"},
        "autoscaling": {
            "keda": {
                "trigger": "rabbitmq",
                "rabbitmq": {"protocol": "http", "authenticationRef": "rabbitmq-management"},
            }
        },
    },
    "keda-exporter-push": {
        "autoscaling": {"keda": {"trigger": "exporter-push", "activationBacklog": 2}},
        "worker": {"queues": [{"name": "a", "weight": 2}, {"name": "b"}]},
    },
    "keda-exporter-push-amqp": {
        "broker": {"type": "amqp"},
        "autoscaling": {"keda": {"trigger": "exporter-push"}},
        "exporter": {"grpcPort": 7000, "watchInterval": "2s"},
    },
    "autoscaling-off": {"autoscaling": {"enabled": False}, "replicas": {"min": 3}},
    "pod-deletion-cost": {"podDeletionCost": {"enabled": True}},
    "monitoring": {"serviceMonitor": {"enabled": True}},
    "no-fallback": {"autoscaling": {"keda": {"fallback": {"enabled": False}}}},
    "network-policy": {
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    },
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
                }
            ],
            "egress": {
                "brokerTo": [{"ipBlock": {"cidr": "10.20.0.0/24"}}],
                "brokerPorts": [6379],
            },
        }
    },
    "redis-tls-digest": {
        "image": {"digest": DIGEST},
        "exporter": {"image": {"digest": DIGEST.replace("0", "f")}},
        "broker": {
            "redis": {"url": "rediss://redis:6380"},
            "tls": {"caSecret": "redis-ca", "caKey": "ca.pem"},
        },
    },
    "redis-url-file": {
        "broker": {
            "urlFromSecretFile": True,
            "redis": {"existingSecret": "pool-redis", "existingSecretKey": "redis-url"},
        }
    },
    "amqp-url-files-tls": {
        "broker": {
            "type": "amqp",
            "urlFromSecretFile": True,
            "tls": {"caConfigMap": "rabbitmq-ca"},
            "amqp": {
                "existingSecret": "pool-amqp",
                "managementExistingSecret": "pool-amqp",
                "managementExistingSecretKey": "management",
            },
        }
    },
}


def render(chart, values, release, kube_version=None):
    if kube_version is None:
        return chart.render(values, name=release, namespace=NAMESPACE)
    # Chart.render (helm-python-sdk 0.2.2) does not pass kube_version on, though the
    # engine under it takes it, as lint does: ask the engine directly.
    opts = {"name": release, "namespace": NAMESPACE, "kube_version": kube_version}
    return json.loads(
        helm_native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(opts))
    )


class Rendered:
    """One rendering: objects by (kind, name), and the NOTES text."""

    def __init__(self, values, release="pool", kube_version=None):
        self.values_in = values
        with helm.Chart.load(CHART) as chart:
            chart.validate_schema(values)
            self.values = chart.merge_values(values)
            manifests = render(chart, values, release, kube_version)
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


def pod_labels(deployment):
    return deployment["spec"]["template"]["metadata"]["labels"]


def volumes_of(deployment):
    return {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}


def file_source(deployment, path):
    """Where a container's file comes from: (kind, name, key) of the Secret or
    ConfigMap behind the one mount holding `path`."""
    mounts = [
        m
        for m in container(deployment).get("volumeMounts", [])
        if path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    if len(mounts) != 1:
        raise AssertionError(f"{path}: expected one mount holding it, found {mounts}")
    (mount,) = mounts
    # A subPath mount does not follow an update of its Secret or ConfigMap.
    if "subPath" in mount or "subPathExpr" in mount:
        raise AssertionError(f"{path}: mounted with a subPath")
    volume = volumes_of(deployment)[mount["name"]]
    source = volume.get("secret") or volume.get("configMap")
    name = source.get("secretName") or source.get("name")
    rest = posixpath.relpath(path, mount["mountPath"])
    keys = [i["key"] for i in source.get("items", []) if i["path"] == rest]
    (key,) = keys or [rest]
    return ("Secret" if "secret" in volume else "ConfigMap"), name, key


class PolicyUnderTest:
    """A rendered ValidatingAdmissionPolicy, evaluated as the API server does for one
    request: its matchConditions, then its variables in order, then each validation.
    An expression that errs counts as refusing (failurePolicy: Fail)."""

    def __init__(self, policy):
        self.spec = policy["spec"]
        self.env = celpy.Environment()

    def _eval(self, expression, activation):
        return self.env.program(self.env.compile(expression)).evaluate(activation)

    @staticmethod
    def _true(value):
        return isinstance(value, celpy.celtypes.BoolType) and bool(value)

    def admit(self, request, old, new):
        """None when the policy does not apply, else the messages of the failed
        validations (empty: admitted)."""
        activation = {
            "request": celpy.json_to_cel(request),
            "oldObject": celpy.json_to_cel(old),
            "object": celpy.json_to_cel(new),
        }
        for condition in self.spec["matchConditions"]:
            if not self._true(self._eval(condition["expression"], activation)):
                return None
        variables = celpy.celtypes.MapType()
        for variable in self.spec.get("variables", []):
            value = self._eval(variable["expression"], {**activation, "variables": variables})
            variables[celpy.celtypes.StringType(variable["name"])] = value
        activation["variables"] = variables
        return [
            v["message"]
            for v in self.spec["validations"]
            if not self._true(self._eval(v["expression"], activation))
        ]


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
                versions = KUBE_VERSIONS
                if obj["apiVersion"].startswith("admissionregistration.k8s.io/"):
                    versions = [ADMISSION_POLICY_SINCE, KUBE_VERSIONS[-1]]
                for version in versions:
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
                if obj["kind"] in CLUSTER_SCOPED:
                    # One per release in the cluster: the name carries the namespace.
                    self.assertNotIn("namespace", obj["metadata"])
                    self.assertTrue(obj["metadata"]["name"].endswith(f".{NAMESPACE}"))
                else:
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
                if broker["urlFromSecretFile"]:
                    self.assertNotIn("REDIS_URL", env)
                    self.assertIn("REDIS_URL_FILE", env)
                elif broker["redis"]["existingSecret"]:
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
                if broker["urlFromSecretFile"]:
                    self.assertNotIn("AMQP_URL", env)
                    self.assertIn("AMQP_URL_FILE", env)
                elif broker["amqp"]["existingSecret"]:
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
            for key in (
                "REDIS_URL",
                "REDIS_URL_FILE",
                "REDIS_PREFIX",
                "REDIS_CA_FILE",
                "AMQP_URL",
                "AMQP_URL_FILE",
                "AMQP_MANAGEMENT_URL",
                "AMQP_MANAGEMENT_URL_FILE",
                "AMQP_QUEUE_TYPE",
                "AMQP_CA_FILE",
            ):
                self.assertEqual(exporter.get(key), workers.get(key), key)
                if key.endswith("_FILE") and key in workers:
                    # The same file, from the same source, in both.
                    self.assertEqual(
                        file_source(r.exporter(), exporter[key]),
                        file_source(r.workers(), workers[key]),
                        key,
                    )
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
                if trigger["type"] == "external-push":
                    # The exporter's GetMetricSpec gives the target: its --capacity.
                    self.assertEqual(args_of(r.exporter())["--capacity"], concurrency)
                    continue
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
                    if t["type"] == "external-push":
                        # The exporter's IsActive applies it.
                        self.assertEqual(
                            args_of(r.exporter())["--activation-backlog"],
                            str(k["activationBacklog"]),
                        )
                        continue
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

    def test_metrics_api_is_the_default_trigger(self):
        # KEDA applies no fallback while an external scaler cannot be reached (KEDA
        # issue 8056): the default keeps metrics-api, whose failures do trigger it.
        (trigger,) = self.rendered["defaults"].one("ScaledObject")["spec"]["triggers"]
        self.assertEqual(trigger["type"], "metrics-api")
        exporter = self.rendered["defaults"].exporter()
        self.assertNotIn("--grpc-listen", args_of(exporter))
        self.assertEqual([p["name"] for p in container(exporter)["ports"]], ["http"])

    def test_push_trigger_reaches_the_exporter_grpc_service_by_name(self):
        seen = 0
        for name, r in self.scenarios():
            triggers = [
                t
                for so in r.all("ScaledObject")
                for t in so["spec"]["triggers"]
                if t["type"] == "external-push"
            ]
            exporter = r.exporter() if r.values["exporter"]["enabled"] else None
            if not triggers:
                if exporter is not None:
                    self.assertNotIn("--grpc-listen", args_of(exporter))
                continue
            seen += 1
            (trigger,) = triggers
            self.assertEqual(trigger["name"], "backlog")
            meta = trigger["metadata"]
            self.assertEqual(meta["pool"], args_of(exporter)["--pool"])
            host, _, port = meta["scalerAddress"].rpartition(":")
            service_name, ns, svc, cluster, local = host.split(".")
            self.assertEqual((ns, svc, cluster, local), (NAMESPACE, "svc", "cluster", "local"))
            (service,) = [s for s in r.all("Service") if s["metadata"]["name"] == service_name]
            (sport,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
            self.assertEqual(sport["name"], "grpc")
            pod_labels = exporter["spec"]["template"]["metadata"]["labels"]
            self.assertTrue(matches(service["spec"]["selector"], pod_labels))
            (cport,) = [p for p in container(exporter)["ports"] if p["name"] == sport["targetPort"]]
            args = args_of(exporter)
            self.assertEqual(args["--grpc-listen"], f"0.0.0.0:{cport['containerPort']}")
            self.assertEqual(args["--watch-interval"], r.values["exporter"]["watchInterval"])
            # The HTTP port stays for /metrics and /livez.
            self.assertEqual(args["--listen"], f"0.0.0.0:{r.values['exporter']['port']}")
        self.assertEqual(seen, 2)

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
        concurrency = env_of(r.workers())["WORKER_CONCURRENCY"]
        # protocol amqp, not left to KEDA's guess from the host's scheme: a passive
        # declare, which reports the ready messages only (no excludeUnacknowledged:
        # KEDA refuses it outside http).
        self.assertEqual(
            t["metadata"],
            {
                "queueName": "default",
                "mode": "QueueLength",
                "protocol": "amqp",
                "value": concurrency,
                "activationValue": "0",
                "hostFromEnv": "AMQP_URL",
            },
        )
        self.assertEqual(t["name"], "ready-default")
        # KEDA resolves hostFromEnv in the scale target's first container.
        self.assertTrue(env_of(r.workers())["AMQP_URL"].startswith("amqp://"))
        self.assertIn("counts waiting jobs only", r.notes)
        self.assertIn("ready messages", r.notes)
        self.assertIn("managementUrl is empty", r.notes)

    def test_native_rabbitmq_trigger_over_http_counts_unacknowledged_messages(self):
        r = Rendered(SCENARIOS["keda-rabbitmq-http-trigger"])
        (t,) = r.one("ScaledObject")["spec"]["triggers"]
        concurrency = env_of(r.workers())["WORKER_CONCURRENCY"]
        # The management API's count is ready + unacknowledged unless
        # excludeUnacknowledged is true: written out, so the object says what it counts.
        self.assertEqual(
            t["metadata"],
            {
                "queueName": "default",
                "mode": "QueueLength",
                "protocol": "http",
                "excludeUnacknowledged": "false",
                "value": concurrency,
                "activationValue": "0",
            },
        )
        self.assertEqual(t["name"], "messages-default")
        # The host (management URL and vhost) comes from the TriggerAuthentication.
        self.assertEqual(t["authenticationRef"], {"name": "rabbitmq-management"})
        self.assertNotIn("waiting jobs only", r.notes)
        self.assertIn("unacknowledged", r.notes)

    def test_fallback_behavior_from_keda_2_17_and_static_before(self):
        for version in ("2.17", "2.17.0", "v2.18.1", "2.20"):
            with self.subTest(version=version):
                r = Rendered({"autoscaling": {"keda": {"version": version}}})
                self.assertEqual(
                    r.one("ScaledObject")["spec"]["fallback"]["behavior"],
                    "currentReplicasIfHigher",
                )
                # Helm cannot check the version: the NOTES say what was assumed.
                self.assertIn(f"KEDA 2.17 or later (autoscaling.keda.version={version})", r.notes)
        # KEDA before 2.17 has no fallback.behavior, and behaves as static: static is
        # left out rather than sent to an API server that drops it.
        for behavior in ("static", ""):
            with self.subTest(version="2.16", behavior=behavior):
                r = Rendered(
                    {"autoscaling": {"keda": {"version": "2.16", "fallback": {"behavior": behavior}}}}
                )
                self.assertEqual(
                    r.one("ScaledObject")["spec"]["fallback"], {"failureThreshold": 3, "replicas": 1}
                )
                self.assertIn("(static, 1 replica(s))", r.notes)
                self.assertNotIn("KEDA 2.17", r.notes)
        # Without a fallback the version changes nothing.
        r = Rendered({"autoscaling": {"keda": {"version": "2.9", "fallback": {"enabled": False}}}})
        self.assertNotIn("fallback", r.one("ScaledObject")["spec"])

    def test_quiet_surplus_env_only_when_enabled(self):
        self.assertNotIn("WORKER_QUIET_SURPLUS", env_of(Rendered({}).workers()))
        on = Rendered({"worker": {"quietSurplus": True}})
        self.assertEqual(env_of(on.workers())["WORKER_QUIET_SURPLUS"], "true")
        gpu = Rendered(example("gpu-inference"))
        self.assertEqual(env_of(gpu.workers())["WORKER_QUIET_SURPLUS"], "true")
        self.assertEqual(env_of(gpu.workers())["WORKER_POD_DELETION_COST"], "true")

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
        # The worker's one API call is a merge PATCH of its own pod
        # (worker-core/src/kubernetes.rs): no get, list, watch or update.
        self.assertEqual(
            role["rules"],
            [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}],
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


class Security(unittest.TestCase):
    def test_admission_policy_binds_the_workers_service_account_on_pod_updates(self):
        for values in (
            SCENARIOS["pod-deletion-cost"],
            merge(SCENARIOS["pod-deletion-cost"], {"serviceAccount": {"name": "gpu-workers"}}),
        ):
            with self.subTest(values=values):
                r = Rendered(values, kube_version="v1.30.0")
                account = r.workers()["spec"]["template"]["spec"]["serviceAccountName"]
                self.assertEqual(r.one("ServiceAccount")["metadata"]["name"], account)
                policy = r.one("ValidatingAdmissionPolicy")
                spec = policy["spec"]
                self.assertEqual(spec["failurePolicy"], "Fail")
                self.assertEqual(
                    spec["matchConstraints"]["resourceRules"],
                    [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["UPDATE"],
                            "resources": ["pods"],
                        }
                    ],
                )
                self.assertEqual(
                    [c["expression"] for c in spec["matchConditions"]],
                    [f"request.userInfo.username == 'system:serviceaccount:{NAMESPACE}:{account}'"],
                )
                binding = r.one("ValidatingAdmissionPolicyBinding")
                self.assertEqual(binding["spec"]["policyName"], policy["metadata"]["name"])
                self.assertEqual(binding["spec"]["validationActions"], ["Deny"])
                self.assertEqual(
                    binding["spec"]["matchResources"]["namespaceSelector"],
                    {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}},
                )
                self.assertIn(policy["metadata"]["name"], r.notes)
                self.assertNotIn("WARNING: no admission policy", r.notes)

    def test_admission_policy_admits_only_the_cost_annotation_of_the_own_pod(self):
        r = Rendered(SCENARIOS["pod-deletion-cost"], kube_version="v1.30.0")
        policy = PolicyUnderTest(r.one("ValidatingAdmissionPolicy"))
        account = r.workers()["spec"]["template"]["spec"]["serviceAccountName"]
        user = f"system:serviceaccount:{NAMESPACE}:{account}"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "pool-worker-pool-7d9c-x2x4q",
                "namespace": NAMESPACE,
                "uid": "6f1c0e52-0000-4000-8000-000000000001",
                "labels": pod_labels(r.workers()),
                "annotations": {"kubectl.kubernetes.io/default-container": "worker"},
                "ownerReferences": [
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u"}
                ],
                "resourceVersion": "41",
            },
            "spec": r.workers()["spec"]["template"]["spec"],
            "status": {"phase": "Running"},
        }
        bare = copy.deepcopy(pod)
        del bare["metadata"]["annotations"], bare["metadata"]["labels"]
        other = copy.deepcopy(pod)
        other["metadata"].update(name="pool-worker-pool-7d9c-zzzzz", uid="other-uid")

        def request(
            name=pod["metadata"]["name"], uid=pod["metadata"]["uid"], namespace=NAMESPACE, who=user
        ):
            extra = {"authentication.kubernetes.io/credential-id": ["JTI=1"]}
            if name:
                extra["authentication.kubernetes.io/pod-name"] = [name]
            if uid:
                extra["authentication.kubernetes.io/pod-uid"] = [uid]
            return {
                "operation": "UPDATE",
                "namespace": namespace,
                "userInfo": {"username": who, "extra": extra},
            }

        def change(old, edit):
            new = copy.deepcopy(old)
            # The API server's field manager rewrites this on every write.
            new["metadata"]["managedFields"] = [{"manager": "worker", "operation": "Update"}]
            edit(new)
            return new

        def cost(value):
            def edit(p):
                p["metadata"].setdefault("annotations", {})[COST_ANNOTATION] = value

            return edit

        costed = change(pod, cost("3"))
        admitted = {
            "the cost, first set": (request(), pod, change(pod, cost("0"))),
            "the cost, changed": (request(), costed, change(costed, cost("7"))),
            "the cost, removed": (
                request(),
                costed,
                change(costed, lambda p: p["metadata"]["annotations"].pop(COST_ANNOTATION)),
            ),
            "the cost, on a pod without annotations or labels": (
                request(),
                bare,
                change(bare, cost("1")),
            ),
            "the cost, by a token carrying no pod uid": (
                request(uid=None),
                pod,
                change(pod, cost("1")),
            ),
        }
        refused = {
            "another annotation too": (
                request(),
                pod,
                change(pod, lambda p: (cost("1")(p), p["metadata"]["annotations"].update(x="y"))),
            ),
            "another annotation changed": (
                request(),
                pod,
                change(
                    pod,
                    lambda p: p["metadata"]["annotations"].update(
                        {"kubectl.kubernetes.io/default-container": "sidecar"}
                    ),
                ),
            ),
            "the annotations removed": (
                request(),
                pod,
                change(pod, lambda p: p["metadata"].pop("annotations")),
            ),
            "a label changed": (
                request(),
                pod,
                change(
                    pod,
                    lambda p: p["metadata"]["labels"].update({"app.kubernetes.io/component": "x"}),
                ),
            ),
            "the labels removed": (
                request(),
                pod,
                change(pod, lambda p: p["metadata"].pop("labels")),
            ),
            "a label added": (
                request(),
                bare,
                change(bare, lambda p: p["metadata"].update(labels={"app": "web"})),
            ),
            "the owner dropped": (
                request(),
                pod,
                change(pod, lambda p: p["metadata"].pop("ownerReferences")),
            ),
            "a finalizer added": (
                request(),
                pod,
                change(pod, lambda p: p["metadata"].update(finalizers=["example.com/hold"])),
            ),
            "the image changed": (
                request(),
                pod,
                change(pod, lambda p: p["spec"]["containers"][0].update(image="evil:latest")),
            ),
            "another pod's cost": (request(), other, change(other, cost("1"))),
            "a recreated pod of the same name": (
                request(uid="an-older-pod"),
                pod,
                change(pod, cost("1")),
            ),
            "a pod of the same name in another namespace": (
                request(namespace="elsewhere"),
                pod,
                change(pod, cost("1")),
            ),
            "a token bound to no pod": (
                request(name=None, uid=None),
                pod,
                change(pod, cost("1")),
            ),
        }
        for name, (req, old, new) in admitted.items():
            with self.subTest(admitted=name):
                self.assertEqual(policy.admit(req, old, new), [])
        for name, (req, old, new) in refused.items():
            with self.subTest(refused=name):
                self.assertTrue(policy.admit(req, old, new))
        # Anyone else is none of its business.
        for who in ("system:serviceaccount:pools:other", user + "-2", "alice"):
            with self.subTest(user=who):
                req = request(who=who)
                self.assertIsNone(policy.admit(req, pod, change(pod, lambda p: p["spec"].clear())))

    def test_admission_policy_absent_when_off_or_before_kubernetes_1_30(self):
        cases = {
            "podDeletionCost off": ({}, "v1.30.0", None),
            "admissionPolicy off": (
                {"podDeletionCost": {"enabled": True, "admissionPolicy": {"enabled": False}}},
                "v1.30.0",
                "podDeletionCost.admissionPolicy.enabled=false",
            ),
            "Kubernetes 1.29": (SCENARIOS["pod-deletion-cost"], "v1.29.0", "Kubernetes 1.30"),
        }
        for name, (values, kube, warning) in cases.items():
            with self.subTest(name):
                r = Rendered(values, kube_version=kube)
                self.assertEqual(
                    r.all("ValidatingAdmissionPolicy") + r.all("ValidatingAdmissionPolicyBinding"),
                    [],
                )
                if warning:
                    self.assertIn(warning, r.notes)
                    self.assertIn("may patch any pod", r.notes)
                    self.assertEqual(r.one("Role")["rules"][0]["verbs"], ["patch"])
                else:
                    self.assertNotIn("any pod", r.notes)

    def test_network_policies_admit_only_the_configured_peers_on_the_http_ports(self):
        r = Rendered(SCENARIOS["network-policy"])
        np = r.values["networkPolicy"]
        policies = {
            p["metadata"]["labels"]["app.kubernetes.io/component"]: p
            for p in r.all("NetworkPolicy")
        }
        self.assertEqual(set(policies), {"worker", "exporter"})
        expected_from = {
            "worker": np["metricsFrom"],
            "exporter": np["scalerFrom"] + np["metricsFrom"],
        }
        for component, deployment in (("worker", r.workers()), ("exporter", r.exporter())):
            with self.subTest(component=component):
                policy = policies[component]["spec"]
                selector = policy["podSelector"]["matchLabels"]
                self.assertTrue(matches(selector, pod_labels(deployment)))
                other = r.exporter() if component == "worker" else r.workers()
                self.assertFalse(matches(selector, pod_labels(other)))
                (http,) = [p for p in container(deployment)["ports"] if p["name"] == "http"]
                self.assertEqual(
                    policy["ingress"],
                    [
                        {
                            "from": expected_from[component],
                            "ports": [{"protocol": "TCP", "port": http["containerPort"]}],
                        }
                    ],
                )
                # Egress: DNS, and the broker on its port; nothing else.
                self.assertEqual(policy["policyTypes"], ["Ingress", "Egress"])
                self.assertEqual(
                    policy["egress"],
                    [
                        {
                            "ports": [
                                {"protocol": "UDP", "port": 53},
                                {"protocol": "TCP", "port": 53},
                            ]
                        },
                        {
                            "to": np["egress"]["brokerTo"],
                            "ports": [{"protocol": "TCP", "port": 6379}],
                        },
                    ],
                )
        self.assertEqual(Rendered({}).all("NetworkPolicy"), [])

        # The workers' own egress (the API server for the deletion cost, what the jobs
        # reach) is theirs alone; without it NOTES says what is missing.
        api = {"to": [{"ipBlock": {"cidr": "172.20.0.10/32"}}], "ports": [{"port": 6443}]}
        cost = merge(SCENARIOS["network-policy"], {"podDeletionCost": {"enabled": True}})
        self.assertIn("cannot reach the Kubernetes", Rendered(cost).notes)
        r = Rendered(merge(cost, {"networkPolicy": {"egress": {"workerExtra": [api]}}}))
        self.assertNotIn("cannot reach the Kubernetes", r.notes)
        policies = {
            p["metadata"]["labels"]["app.kubernetes.io/component"]: p
            for p in r.all("NetworkPolicy")
        }
        self.assertEqual(policies["worker"]["spec"]["egress"][-1], api)
        self.assertNotIn(api, policies["exporter"]["spec"]["egress"])

    def test_network_policy_admits_keda_to_the_grpc_port_with_the_push_trigger(self):
        values = merge(
            SCENARIOS["network-policy"], {"autoscaling": {"keda": {"trigger": "exporter-push"}}}
        )
        r = Rendered(values)
        np = r.values["networkPolicy"]
        policy = r.one("NetworkPolicy", "exporter")["spec"]
        ports = {p["name"]: p["containerPort"] for p in container(r.exporter())["ports"]}
        self.assertEqual(
            policy["ingress"],
            [
                {
                    "from": np["scalerFrom"],
                    "ports": [{"protocol": "TCP", "port": ports["grpc"]}],
                },
                {
                    "from": np["metricsFrom"],
                    "ports": [{"protocol": "TCP", "port": ports["http"]}],
                },
            ],
        )

    def test_network_policies_without_peers_admit_no_one_and_leave_egress_open(self):
        cases = {
            # KEDA reads the exporter: its namespace (the default scalerFrom) may.
            "exporter trigger": ({}, {"worker": [], "exporter": ["keda"]}),
            # KEDA's external-push trigger reads the exporter over gRPC.
            "exporter-push trigger": (
                {"autoscaling": {"keda": {"trigger": "exporter-push"}}},
                {"worker": [], "exporter": ["keda"]},
            ),
            # KEDA reads Redis itself: no one reaches the exporter.
            "redis trigger": (
                {"autoscaling": {"keda": {"trigger": "redis"}}},
                {"worker": [], "exporter": []},
            ),
        }
        for name, (values, allowed) in cases.items():
            with self.subTest(name):
                r = Rendered(merge(values, {"networkPolicy": {"enabled": True}}))
                for policy in r.all("NetworkPolicy"):
                    spec = policy["spec"]
                    component = policy["metadata"]["labels"]["app.kubernetes.io/component"]
                    namespaces = [
                        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                        for rule in spec["ingress"]
                        for peer in rule["from"]
                    ]
                    self.assertEqual(namespaces, allowed[component])
                    # A rule without peers would let everyone in.
                    for rule in spec["ingress"]:
                        self.assertTrue(rule.get("from"), rule)
                    self.assertEqual(spec["policyTypes"], ["Ingress"])
                    self.assertNotIn("egress", spec)

    def test_broker_ca_is_mounted_into_workers_and_exporter(self):
        cases = {
            "redis-tls-digest": ("REDIS_CA_FILE", "AMQP_CA_FILE", ("Secret", "redis-ca", "ca.pem")),
            "amqp-url-files-tls": (
                "AMQP_CA_FILE",
                "REDIS_CA_FILE",
                ("ConfigMap", "rabbitmq-ca", "ca.crt"),
            ),
        }
        for scenario, (variable, absent, source) in cases.items():
            with self.subTest(scenario):
                r = Rendered(SCENARIOS[scenario])
                paths = set()
                for d in (r.workers(), r.exporter()):
                    env = env_of(d)
                    self.assertNotIn(absent, env)
                    self.assertEqual(file_source(d, env[variable]), source)
                    paths.add(env[variable])
                # One fixed path, the same in both.
                self.assertEqual(len(paths), 1)
        r = Rendered({})
        for d in (r.workers(), r.exporter()):
            self.assertFalse({"REDIS_CA_FILE", "AMQP_CA_FILE"} & set(env_of(d)))
            self.assertNotIn("broker-ca", volumes_of(d))

    def test_image_digest_pins_workers_and_exporter(self):
        r = Rendered(SCENARIOS["redis-tls-digest"])
        self.assertEqual(
            container(r.workers())["image"], f"ghcr.io/worker-pools/demo-worker@{DIGEST}"
        )
        self.assertEqual(
            container(r.exporter())["image"],
            f"ghcr.io/worker-pools/workerctl@{DIGEST.replace('0', 'f')}",
        )
        # A digest wins over a tag.
        r = Rendered(
            {
                "image": {"tag": "1.2.3", "digest": DIGEST},
                "exporter": {"image": {"tag": "1.2.3", "digest": DIGEST}},
            }
        )
        for d in (r.workers(), r.exporter()):
            self.assertTrue(container(d)["image"].endswith(f"@{DIGEST}"))
            self.assertNotIn("1.2.3", container(d)["image"])
        r = Rendered({})
        self.assertEqual(container(r.workers())["image"], "ghcr.io/worker-pools/demo-worker:0.1.0")
        self.assertEqual(container(r.exporter())["image"], "ghcr.io/worker-pools/workerctl:0.1.0")

    def test_broker_urls_from_secret_files(self):
        cases = {
            "redis-url-file": {"REDIS_URL_FILE": ("Secret", "pool-redis", "redis-url")},
            "amqp-url-files-tls": {
                "AMQP_URL_FILE": ("Secret", "pool-amqp", "url"),
                "AMQP_MANAGEMENT_URL_FILE": ("Secret", "pool-amqp", "management"),
            },
        }
        for scenario, files in cases.items():
            with self.subTest(scenario):
                r = Rendered(SCENARIOS[scenario])
                for d in (r.workers(), r.exporter()):
                    env = env_of(d)
                    for variable, source in files.items():
                        self.assertEqual(file_source(d, env[variable]), source)
                        self.assertNotIn(variable.removesuffix("_FILE"), env)
                    # No URL in the spec, not even by reference.
                    for e in container(d)["env"]:
                        self.assertNotIn("://", e.get("value", ""), e)
                        self.assertNotIn("secretKeyRef", e.get("valueFrom", {}), e)
                    for m in container(d).get("volumeMounts", []):
                        if m["name"] != "tmp":
                            self.assertTrue(m["readOnly"], m)

        # The native rabbitmq trigger cannot read AMQP_URL from the worker any more:
        # its TriggerAuthentication gives the host.
        r = Rendered(
            merge(
                SCENARIOS["amqp-url-files-tls"],
                {
                    "autoscaling": {
                        "keda": {
                            "trigger": "rabbitmq",
                            "rabbitmq": {"authenticationRef": "rabbitmq-auth"},
                        }
                    }
                },
            )
        )
        (t,) = r.one("ScaledObject")["spec"]["triggers"]
        self.assertNotIn("hostFromEnv", t["metadata"])
        self.assertEqual(t["authenticationRef"], {"name": "rabbitmq-auth"})

    def test_schema_takes_the_security_values(self):
        with helm.Chart.load(CHART) as chart:
            for name in (
                "network-policy",
                "redis-tls-digest",
                "redis-url-file",
                "amqp-url-files-tls",
            ):
                with self.subTest(scenario=name):
                    chart.validate_schema(SCENARIOS[name])
            chart.validate_schema(
                {"podDeletionCost": {"enabled": True, "admissionPolicy": {"enabled": False}}}
            )


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
            ({"autoscaling": {"keda": {"version": "latest"}}}, "version"),
            ({"autoscaling": {"keda": {"version": "2"}}}, "version"),
            # Unquoted, 2.10 would be the number 2.1.
            ({"autoscaling": {"keda": {"version": 2.16}}}, "version"),
            ({"autoscaling": {"keda": {"rabbitmq": {"protocol": "auto"}}}}, "protocol"),
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
        message = self.render_error(
            {
                "broker": {"type": "amqp"},
                "autoscaling": {"keda": {"trigger": "rabbitmq", "rabbitmq": {"protocol": "http"}}},
            }
        )
        self.assertIn("autoscaling.keda.rabbitmq.authenticationRef", message)

    def test_fallback_behavior_refused_before_keda_2_17(self):
        # 2.9 is older than 2.17 as versions, not as strings.
        for version, behavior in (
            ("2.16", "currentReplicasIfHigher"),
            ("v2.16.1", "currentReplicasIfHigher"),
            ("2.9", "currentReplicas"),
        ):
            with self.subTest(version=version, behavior=behavior):
                message = self.render_error(
                    {"autoscaling": {"keda": {"version": version, "fallback": {"behavior": behavior}}}}
                )
                self.assertIn(f"autoscaling.keda.version={version}", message)
                self.assertIn("KEDA 2.17", message)
                # The consequence: the pool is set to fallback.replicas, busy or not.
                self.assertIn("fallback.replicas (1)", message)
                self.assertIn("autoscaling.keda.fallback.behavior=static", message)

    def test_security_values_refused_with_the_fix(self):
        cases = [
            ({"image": {"digest": "latest"}}, "digest"),
            ({"exporter": {"image": {"digest": "sha256:abc"}}}, "digest"),
            ({"broker": {"urlFromSecretFile": "yes"}}, "urlFromSecretFile"),
            ({"networkPolicy": {"egress": {"brokerPorts": [0]}}}, "brokerPorts"),
            ({"networkPolicy": {"metricsFrom": [{}]}}, "metricsFrom"),
            # The name goes into the admission policy's CEL.
            ({"serviceAccount": {"name": "w' || true || '"}}, "name"),
        ]
        for values, word in cases:
            with self.subTest(values=values):
                self.assertIn(word, self.schema_error(values))
        cases = [
            ({"broker": {"urlFromSecretFile": True}}, "broker.redis.existingSecret"),
            (
                {"broker": {"type": "amqp", "urlFromSecretFile": True}},
                "broker.amqp.existingSecret",
            ),
            (
                {
                    "broker": {
                        "type": "amqp",
                        "urlFromSecretFile": True,
                        "amqp": {
                            "existingSecret": "a",
                            "managementUrl": "http://u:p@rabbitmq:15672",
                        },
                    }
                },
                "managementExistingSecret",
            ),
            (
                {
                    "broker": {
                        "type": "amqp",
                        "urlFromSecretFile": True,
                        "amqp": {"existingSecret": "a"},
                    },
                    "autoscaling": {"keda": {"trigger": "rabbitmq"}},
                },
                "autoscaling.keda.rabbitmq.authenticationRef",
            ),
            ({"broker": {"tls": {"caSecret": "a", "caConfigMap": "b"}}}, "not both"),
        ]
        for values, fix in cases:
            with self.subTest(values=values):
                self.assertIn(fix, self.render_error(values))

if __name__ == "__main__":
    unittest.main()
