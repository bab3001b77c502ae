"""deploy/rayservice.yaml: valid against KubeRay's RayService CRD schema (v1) and Ray Serve's own
config schema, its import path builds the application it says, and a broken copy fails. Nothing
here contacts a cluster or starts Ray."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deploy" / "rayservice.yaml"
CRD_SCHEMA = ROOT / "deploy" / "schema" / "rayservice.v1.schema.json"


def k8s_to_jsonschema(node):
    """An openAPIV3Schema (structural, as in a CRD) as JSON Schema the way the API server and
    ``kubectl apply`` (strict field validation) read it: ``nullable``, ``x-kubernetes-int-or-string``
    and unknown fields refused unless ``x-kubernetes-preserve-unknown-fields``. CEL rules
    (``x-kubernetes-validations``) are not evaluated."""
    if isinstance(node, list):
        return [k8s_to_jsonschema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: k8s_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validator():
    schema = k8s_to_jsonschema(json.loads(CRD_SCHEMA.read_text()))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture(scope="module")
def manifest():
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]
    assert len(docs) == 1, "deploy/rayservice.yaml holds one RayService"
    return docs[0]


def errors(validator, doc):
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc))


def serve_config(doc):
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def containers(doc):
    cluster = doc["spec"]["rayClusterConfig"]
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def test_manifest_is_a_valid_rayservice(manifest, validator):
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert errors(validator, manifest) == []


@pytest.mark.parametrize("breakage, where", [
    (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].__setitem__("replicas", "two"), "replicas"),
    (lambda d: d["spec"]["rayClusterConfig"].__setitem__("workerGroupSpec", []), "workerGroupSpec"),
    (lambda d: d["spec"].__setitem__("serveConfigV2", {"applications": []}), "serveConfigV2"),
    (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
     ["resources"]["limits"].__setitem__("nvidia.com/gpu", [1]), "nvidia.com/gpu"),
    (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
     ["readinessProbe"]["httpGet"].__setitem__("port", 8000.5), "port"),
])
def test_broken_copies_fail(manifest, validator, breakage, where):
    broken = copy.deepcopy(manifest)
    breakage(broken)
    found = errors(validator, broken)
    assert found, f"a broken {where} passed the CRD schema"
    assert any(where in e for e in found), found


def test_serve_config_matches_ray_serve_schema(manifest):
    schema = pytest.importorskip("ray.serve.schema")
    config = serve_config(manifest)
    parsed = schema.ServeDeploySchema.model_validate(config)
    assert [a.name for a in parsed.applications] == ["dp360rt"]
    for field, bad, where in [("import_path", "ray_config", "import_path"), ("port", "eight thousand", "port")]:
        broken = copy.deepcopy(config)
        (broken["applications"][0] if field == "import_path" else broken["http_options"])[field] = bad
        with pytest.raises(ValueError, match=where):
            schema.ServeDeploySchema.model_validate(broken)


def test_probes_and_gpus_fit_the_service(manifest):
    config = serve_config(manifest)
    port = config["http_options"]["port"]
    from dp360rt.serve.app import PUBLIC_PATHS
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = 0
    for group in workers:
        (c,) = group["template"]["spec"]["containers"]
        assert {p["name"]: p["containerPort"] for p in c["ports"]}["serve"] == port
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "serve"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "serve"}
        assert {c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]} <= set(PUBLIC_PATHS)
        assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        gpus += group["replicas"]
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "readinessProbe" not in head, "KubeRay deploys the app only once the head is ready: no /readyz there"
    assert config["applications"][0]["args"]["replicas"] == gpus, "one generation replica per GPU pod"
    # every pod mounts the checkpoints where the args name them, and runs the same image
    args = config["applications"][0]["args"]
    for name, pod in containers(manifest):
        (c,) = pod["containers"]
        assert c["image"] == "REGISTRY/dp360rt:0.1.0", name
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        for key in ("nvs", "backview", "conditions", "store"):
            assert any(args[key].startswith(m + "/") for m in mounts), (name, key)


def test_import_path_builds_the_application(manifest):
    pytest.importorskip("ray.serve")
    from ray import serve
    import ray
    try:
        from ray._common.utils import import_attr           # how Serve resolves import_path (Ray >= 2.47)
    except ImportError:  # pragma: no cover - older Ray
        from ray._private.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from dp360rt.serve import ray_config

    (app_config,) = serve_config(manifest)["applications"]
    builder = import_attr(app_config["import_path"])
    assert builder is ray_config.app
    app = call_user_app_builder_with_args_if_necessary(builder, app_config["args"])
    assert isinstance(app, serve.Application)
    ingress = app._bound_deployment
    assert ingress.name == "Ingress" and ingress.num_replicas == 1
    (generator,) = [a for a in ingress.init_args if isinstance(a, serve.Application)]
    gen = generator._bound_deployment
    assert gen.name == "GenerationReplica"
    assert gen.num_replicas == app_config["args"]["replicas"]
    assert gen.ray_actor_options["num_gpus"] == 1
    spec = gen.init_args[0]
    assert (spec["device"], spec["dtype"], spec["nvs"]) == ("cuda", "fp16", app_config["args"]["nvs"])
    options = ingress.init_args[1]
    assert options["store"] == app_config["args"]["store"] and options["max_queue"] == 16
    assert not ray.is_initialized(), "building the application must not start Ray"


def test_builder_args_are_checked():
    pytest.importorskip("ray.serve")
    from dp360rt.serve import ray_config
    ns = ray_config.serve_namespace({"random": "tiny", "device": "cpu", "max-queue": 3, "no_viewer": True,
                                     "replica_cpus": 0.5})
    assert (ns.random, ns.max_queue, ns.no_viewer, ns.replica_cpus, ns.ray) == ("tiny", 3, True, 0.5, True)
    with pytest.raises(ValueError, match="unknown argument 'replicaz'"):
        ray_config.serve_namespace({"random": "tiny", "replicaz": 2})
    with pytest.raises(ValueError, match="http_options.port"):
        ray_config.serve_namespace({"random": "tiny", "port": 9000})
    with pytest.raises(ValueError, match="must be 1 or more"):
        ray_config.serve_namespace({"random": "tiny", "replicas": 0})
    with pytest.raises(ValueError, match="invalid choice"):
        ray_config.serve_namespace({"random": "tiny", "dtype": "fp8"})
    with pytest.raises(ValueError, match="is a flag"):
        ray_config.serve_namespace({"random": "tiny", "no_viewer": "yes"})
