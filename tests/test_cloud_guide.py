"""docs/cloud.md, the quick start on AWS, is checked command by command wherever that is possible without AWS.

The page's code blocks are read as a reader would copy them. JSON blocks parse, and every IAM policy has IAM's
shape; the head's policy grants what Ray's autoscaler calls (EC2, iam:PassRole on the workers' role, the AMI's
SSM parameter) and both policies grant the buckets every job on the page reads or writes. `ray` command lines
parse with Ray's own CLI (click, without running), `hlip-ray` and `python jobs/...` lines with the project's
parser, and their configs load with the overrides given. YAML blocks load; files named exist; `sed` edits match
what the files hold; the quotas are what `cluster/aws.yaml` can start; Kubernetes names are the manifests'.
A program the tests do not know fails the page, so that no command goes unchecked by accident.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from hlip_ray.cli import build_parser
from hlip_ray.config import load_config
from tests.conftest import REPO_ROOT

PAGE = REPO_ROOT / "docs" / "cloud.md"
AWS_YAML = REPO_ROOT / "cluster" / "aws.yaml"
RAYCLUSTER_YAML = REPO_ROOT / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB_YAML = REPO_ROOT / "cluster" / "kuberay" / "rayjob.yaml"
LOCK = REPO_ROOT / "cluster" / "requirements.lock"

# Values for what the page computes on the reader's machine (`export X=$(...)`).
TEST_VALUES = {"ACCOUNT": "123456789012", "RAY_AUTH_TOKEN": "test-token"}
# vCPUs of the instance types cluster/aws.yaml uses (EC2's instance type pages); a new type must be added here.
INSTANCE_VCPUS = {"m6i.4xlarge": 16, "c7i.16xlarge": 64, "c6i.16xlarge": 64, "p4d.24xlarge": 96,
                  "p5.48xlarge": 192, "g6e.48xlarge": 192}
# EC2's vCPU quota families, by the instance family's leading letters.
QUOTA_FAMILIES = {"Standard (A, C, D, H, I, M, R, T, Z)": tuple("acdhimrtz"), "P": ("p",), "G and VT": ("g", "vt")}
# Programs on the page that only a cloud can run: their lines are read by the tests below that need them
# (IAM, ECR, SSM, quotas, Helm), nothing more.
CLOUD_ONLY = {"aws", "helm"}
# Entry points of `ray job submit` other than the project's, run as they are on the cluster.
OTHER_ENTRYPOINTS = {"nvidia-smi"}


# -- reading the page ------------------------------------------------------------------------
def code_blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, body, the prose before it) of every fenced block at the start of a line."""
    blocks, last = [], 0
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
        blocks.append((match.group(1), match.group(2), text[last:match.start()]))
        last = match.end()
    return blocks


def blocks_of(language: str, text: str | None = None) -> list[tuple[str, str]]:
    return [(body, before) for lang, body, before in code_blocks(text or PAGE.read_text()) if lang == language]


def bash_lines(text: str | None = None) -> list[str]:
    """Every command line of the page's bash blocks, continuation lines joined, comments and blanks left out."""
    lines = []
    for body, _ in blocks_of("bash", text):
        for line in body.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(line.strip())
    return lines


def expand(word: str, variables: dict[str, str]) -> str:
    def value(match):
        name = match.group(1) or match.group(2)
        assert name in variables, f"${name} is used before the page sets it: {word}"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, word)


def commands(text: str | None = None) -> list[list[str]]:
    """The page's simple commands as argv lists, in order, with the variables the page exports expanded.

    `export A=... B=...` lines set variables (a `$(...)` value takes its TEST_VALUES stand-in); other lines
    are split on `|`, `&&`, `||` and `;` as a shell would."""
    variables: dict[str, str] = {}
    found = []
    for line in bash_lines(text):
        if line.startswith("export "):
            for name, raw in re.findall(r"(\w+)=(\$\([^)]*\)|\S+)", line[len("export "):]):
                if raw.startswith("$("):
                    assert name in TEST_VALUES, f"{name} is computed on the page; give it a value in TEST_VALUES"
                    variables[name] = TEST_VALUES[name]
                else:
                    variables[name] = expand(raw, variables)
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        argv: list[str] = []
        for token in lexer:
            if token in {"|", "&&", "||", ";"}:
                found.append(argv)
                argv = []
            else:
                argv.append(expand(token, variables))
        found.append(argv)
    return [argv for argv in found if argv]


def saved_json_files(text: str | None = None) -> dict[str, dict]:
    """The JSON blocks the page tells the reader to save, by file name (`Save ... as `x.json``)."""
    saved = {}
    for body, before in blocks_of("json", text):
        names = re.findall(r"[Ss]ave [^`]*?as `([\w.-]+\.json)`", before.split("```")[-1])
        if names:
            saved[names[-1]] = json.loads(body)
    return saved


def with_account(policy: dict) -> dict:
    return json.loads(json.dumps(policy).replace("<ACCOUNT>", TEST_VALUES["ACCOUNT"]))


def aws_config() -> dict:
    return yaml.safe_load(AWS_YAML.read_text())


def manifest(path: Path, kind: str) -> dict:
    return next(doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") == kind)


# -- IAM -------------------------------------------------------------------------------------
ACTION = re.compile(r"^[a-z0-9-]+:[A-Za-z0-9*?]+$")


def policy_shape_errors(policy) -> list[str]:
    """What IAM would refuse in a policy document: the 2012-10-17 grammar, as this page uses it."""
    if not isinstance(policy, dict):
        return ["a policy is a JSON object"]
    errors = []
    if policy.get("Version") != "2012-10-17":
        errors.append(f"Version must be 2012-10-17, not {policy.get('Version')!r}")
    statements = policy.get("Statement")
    if not isinstance(statements, list) or not statements:
        return [*errors, "Statement must be a non-empty list"]
    trust = any("Principal" in statement for statement in statements)
    for index, statement in enumerate(statements):
        where = f"Statement[{index}]"
        if statement.get("Effect") not in {"Allow", "Deny"}:
            errors.append(f"{where}: Effect must be Allow or Deny")
        if not re.fullmatch(r"[A-Za-z0-9]*", statement.get("Sid", "")):
            errors.append(f"{where}: a Sid is letters and digits only")
        actions = statement.get("Action")
        actions = [actions] if isinstance(actions, str) else actions
        if not actions or not all(isinstance(action, str) and ACTION.match(action) for action in actions):
            errors.append(f"{where}: Action must be service:Action names, got {statement.get('Action')!r}")
        unknown = set(statement) - {"Sid", "Effect", "Action", "Resource", "Principal", "Condition"}
        if unknown:
            errors.append(f"{where}: keys this page does not use: {sorted(unknown)}")
        if trust:
            if "Principal" not in statement or "Resource" in statement:
                errors.append(f"{where}: a trust policy's statements name a Principal and no Resource")
        else:
            resources = statement.get("Resource")
            resources = [resources] if isinstance(resources, str) else resources
            if not resources or not all(isinstance(r, str) and (r == "*" or r.startswith("arn:")) for r in resources):
                errors.append(f"{where}: Resource must be * or ARNs, got {statement.get('Resource')!r}")
    return errors


def allows(policy: dict, action: str, resource: str) -> bool:
    """Whether an identity policy allows `action` on `resource`: IAM's wildcards, an explicit Deny wins."""
    def matches(patterns, value, case_sensitive):
        patterns = [patterns] if isinstance(patterns, str) else patterns
        if not case_sensitive:
            return any(fnmatch.fnmatchcase(value.lower(), pattern.lower()) for pattern in patterns)
        return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)

    effects = {statement["Effect"] for statement in policy["Statement"]
               if matches(statement["Action"], action, False) and matches(statement["Resource"], resource, True)}
    return "Allow" in effects and "Deny" not in effects


def aws_commands(service: str, subcommand: str, text: str | None = None) -> list[dict[str, str]]:
    """The options of every `aws SERVICE SUBCOMMAND ...` line, as {option: value}."""
    return [{argv[i].lstrip("-"): argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}
            for argv in commands(text) if argv[:3] == ["aws", service, subcommand]]


def iam_commands(subcommand: str, text: str | None = None) -> list[dict[str, str]]:
    return aws_commands("iam", subcommand, text)


def role_policies(text: str | None = None) -> dict[str, dict]:
    """The policy the page puts on each instance profile's role: {profile name: policy with the test account}."""
    saved = saved_json_files(text)
    role_of = {c["instance-profile-name"]: c["role-name"] for c in iam_commands("add-role-to-instance-profile", text)}
    policy_of = {}
    for put in iam_commands("put-role-policy", text):
        name = put["policy-document"].removeprefix("file://")
        assert name in saved, f"put-role-policy names {name}, which the page does not tell the reader to save"
        policy_of[put["role-name"]] = with_account(saved[name])
    return {profile: policy_of[role] for profile, role in role_of.items() if role in policy_of}


def profile_names() -> tuple[str, set[str]]:
    """(the head's instance profile, the workers' instance profiles) that cluster/aws.yaml names."""
    config = aws_config()
    head, workers = None, set()
    for name, node_type in config["available_node_types"].items():
        profile = node_type["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[-1]
        if name == config["head_node_type"]:
            head = profile
        else:
            workers.add(profile)
    return head, workers


def head_policy_errors(text: str | None = None) -> list[str]:
    """What Ray's autoscaler would be refused on the head with the page's policies."""
    policies = role_policies(text)
    head, workers = profile_names()
    if head not in policies:
        return [f"no policy on the head's instance profile {head}"]
    policy, account = policies[head], TEST_VALUES["ACCOUNT"]
    config = aws_config()
    errors = [f"the head may not {action}" for action in
              ("ec2:RunInstances", "ec2:DescribeInstances", "ec2:TerminateInstances", "ec2:CreateTags")
              if not allows(policy, action, "*")]
    role_of = {c["instance-profile-name"]: c["role-name"] for c in iam_commands("add-role-to-instance-profile", text)}
    for worker in workers:
        role = f"arn:aws:iam::{account}:role/{role_of.get(worker, worker)}"
        if not allows(policy, "iam:PassRole", role):
            errors.append(f"the head may not pass {role} to the workers it launches")
    region = config["provider"]["region"]
    for node_type in config["available_node_types"].values():
        image = node_type["node_config"]["ImageId"]
        if image.startswith("resolve:ssm:"):
            parameter = f"arn:aws:ssm:{region}::parameter{image.removeprefix('resolve:ssm:')}"
            if not allows(policy, "ssm:GetParameters", parameter):
                errors.append(f"the head may not resolve the AMI {parameter}")
    return errors


# -- commands --------------------------------------------------------------------------------
def ray_context(argv: list[str]) -> tuple[list[str], click.Context]:
    """Parse a `ray ...` command line with Ray's click CLI, without running it: (the command path, its context)."""
    from ray.scripts.scripts import cli

    command, args, path = cli, argv[1:], ["ray"]
    while isinstance(command, click.Group):
        context = command.make_context(path[-1], list(args))
        rest = [*getattr(context, "_protected_args", []), *context.args]
        name, command, _ = command.resolve_command(context, rest)
        path.append(name)
        args = rest[1:]
    return path, command.make_context(path[-1], list(args))


def job_argv(argv: list[str]) -> list[str]:
    """`python jobs/X.py ARGS` as the `hlip-ray` argv it runs (the subcommand the job file calls)."""
    script = REPO_ROOT / argv[1]
    assert script.is_file(), f"{argv[1]} does not exist"
    called = re.search(r'main\(\["([\w-]+)"', script.read_text())
    assert called, f"{argv[1]} does not call hlip_ray.cli.main"
    return [called.group(1), *argv[2:]]


def check_hlip_ray(argv: list[str]) -> None:
    """An `hlip-ray` argv (without the program name) parses, and its config loads with its overrides."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as error:
        raise AssertionError(f"hlip-ray {' '.join(argv)}: argparse refuses it") from error
    config = getattr(args, "config", None)
    if config is not None:
        assert (REPO_ROOT / config).is_file(), f"--config {config} does not exist"
    load_config(REPO_ROOT / config if config else None, getattr(args, "overrides", None) or [])
    space = getattr(args, "space", None)
    if space is not None:
        from hlip_ray.tune.space import load_space

        load_space(REPO_ROOT / space)


def node_resources() -> set[str]:
    return {name for node_type in aws_config()["available_node_types"].values() for name in node_type["resources"]}


def check_entrypoint(entrypoint: list[str]) -> None:
    if entrypoint[0] == "python" and len(entrypoint) > 1 and entrypoint[1].startswith("jobs/"):
        check_hlip_ray(job_argv(entrypoint))
    elif entrypoint[0] == "hlip-ray":
        check_hlip_ray(entrypoint[1:])
    else:
        assert entrypoint[0] in OTHER_ENTRYPOINTS, f"an entry point the tests do not know: {entrypoint}"


def check_ray(argv: list[str]) -> None:
    """A `ray` command line parses with Ray's CLI; what it names exists and agrees with the cluster."""
    try:
        path, context = ray_context(argv)
    except click.UsageError as error:
        raise AssertionError(f"{' '.join(argv)}: {error.format_message()}") from error
    params = context.params
    if "cluster_config_file" in params:
        assert (REPO_ROOT / params["cluster_config_file"]).is_file(), f"{params['cluster_config_file']} does not exist"
    if path[1:] == ["job", "submit"]:
        assert params["address"] == "http://127.0.0.1:8265", "jobs go through the tunnel to the head's job API"
        if params["runtime_env"]:
            runtime_env = yaml.safe_load((REPO_ROOT / params["runtime_env"]).read_text())
            assert runtime_env["working_dir"] == ".", "submitted from the repository root"
        if params["entrypoint_resources"]:
            resources = json.loads(params["entrypoint_resources"])
            assert set(resources) <= node_resources(), f"no node offers {set(resources) - node_resources()}"
        assert params["entrypoint"], f"{' '.join(argv)}: no entry point"
        check_entrypoint(list(params["entrypoint"]))


def kubernetes_names() -> dict[str, set[str]]:
    cluster = manifest(RAYCLUSTER_YAML, "RayCluster")["metadata"]["name"]
    return {"raycluster": {cluster}, "svc": {f"{cluster}-head-svc"},
            "job": {manifest(RAYJOB_YAML, "RayJob")["metadata"]["name"]}}


def check_kubectl(argv: list[str]) -> None:
    names = kubernetes_names()
    if argv[1] in {"apply", "delete"}:
        files = [argv[i + 1] for i, word in enumerate(argv) if word == "-f"]
        assert files, f"{' '.join(argv)}: only -f FILE is used on this page"
        for name in files:
            assert (REPO_ROOT / name).is_file(), f"kubectl {argv[1]} -f {name}: no such file"
    elif argv[1] in {"port-forward", "exec", "logs"}:
        target = next(word for word in argv[2:] if "/" in word)
        kind, name = target.split("/", 1)
        assert name in names.get(kind, set()), f"{target}: the manifests define {names}"
    elif argv[1] == "get":
        assert argv[3] in names.get(argv[2], set()), f"kubectl get {argv[2]} {argv[3]}: the manifests name {names}"
    else:
        raise AssertionError(f"kubectl {argv[1]}: not a use the tests know")


def check_docker(argv: list[str]) -> None:
    if argv[1] == "build":
        dockerfile = argv[argv.index("-f") + 1]
        assert (REPO_ROOT / dockerfile).is_file() and argv[-1] == ".", "built from the repository root"
    else:
        assert argv[1] in {"login", "push"}, f"docker {argv[1]}: not a use the tests know"


def check_sed(argv: list[str]) -> None:
    """`sed -i "s|A|B|; ..." FILES`: every repository file exists and holds every A it replaces."""
    assert argv[1] == "-i"
    script, files = argv[2], argv[3:]
    patterns = [expression.strip()[2:].split(expression.strip()[1])[0] for expression in script.split(";")]
    for name in files:
        path = REPO_ROOT / name
        if "/" not in name and not path.exists():
            continue   # a file the page has the reader save (head-policy.json, ...)
        assert path.is_file(), f"sed -i ... {name}: no such file"
        missing = [pattern for pattern in patterns if not re.search(pattern, path.read_text())]
        assert not missing, f"sed -i ... {name}: the file holds none of {missing}"


def check_pip(argv: list[str]) -> None:
    locked = {line.split("==")[0].lower(): line.split("==")[1].split(";")[0].strip()
              for line in LOCK.read_text().splitlines() if "==" in line and not line.startswith("#")}
    for word in argv[2:]:
        requirement = Requirement(word)
        if requirement.name.lower() in locked:
            assert requirement.specifier.contains(locked[requirement.name.lower()]), \
                f"{word}: the cluster's image has {requirement.name}=={locked[requirement.name.lower()]}"


CHECKERS = {"ray": check_ray, "kubectl": check_kubectl, "docker": check_docker, "sed": check_sed, "pip": check_pip,
            "hlip-ray": lambda argv: check_hlip_ray(argv[1:]),
            "python": lambda argv: check_hlip_ray(job_argv(argv))}


def check_command(argv: list[str]) -> None:
    if argv[0] in CLOUD_ONLY:
        return
    assert argv[0] in CHECKERS, f"{' '.join(argv)}: a program the tests do not know; add a check for it"
    CHECKERS[argv[0]](argv)


# -- the tests -------------------------------------------------------------------------------
def test_the_page_has_the_steps_of_a_run():
    argv_seen = [" ".join(argv) for argv in commands()]
    for expected in ("ray up cluster/aws.yaml", "ray dashboard cluster/aws.yaml", "python jobs/manifest.py",
                     "python jobs/preprocess.py", "python jobs/train.py", "python jobs/eval.py",
                     "ray down cluster/aws.yaml", "kubectl apply -f cluster/kuberay/raycluster.yaml",
                     "kubectl apply -f cluster/kuberay/rayjob.yaml"):
        assert any(expected in line for line in argv_seen), expected
    # A client of a head with token authentication sends the token only with RAY_AUTH_MODE=token.
    assert "export RAY_AUTH_MODE=token" in bash_lines()


PAGE_COMMANDS = commands()


@pytest.mark.parametrize("argv", PAGE_COMMANDS, ids=[" ".join(argv)[:70] for argv in PAGE_COMMANDS])
def test_every_command_parses_and_names_what_exists(argv):
    check_command(argv)


def test_every_json_block_parses_as_an_iam_policy():
    bodies = [body for body, _ in blocks_of("json")]
    assert len(bodies) >= 4
    for body in bodies:
        errors = policy_shape_errors(json.loads(body))
        assert not errors, errors


def test_every_policy_file_a_command_uses_is_on_the_page():
    saved = saved_json_files()
    used = {word.removeprefix("file://") for argv in commands() for word in argv if word.startswith("file://")}
    assert used and used <= set(saved), f"used but not on the page: {used - set(saved)}"


def test_the_head_policy_grants_what_rays_autoscaler_needs():
    assert not head_policy_errors()


def test_the_workers_policy_grants_storage_and_the_image_but_nothing_that_launches_nodes():
    policies = role_policies()
    _, workers = profile_names()
    account = TEST_VALUES["ACCOUNT"]
    for worker in workers:
        policy = policies[worker]
        for action in ("ec2:RunInstances", "ec2:TerminateInstances", "iam:PassRole", "ssm:GetParameters"):
            assert not allows(policy, action, "*") and not allows(policy, action, f"arn:aws:iam::{account}:role/x")


def test_both_policies_cover_every_bucket_and_the_image_the_page_uses():
    policies = role_policies()
    uris = {match for argv in commands() for word in argv for match in re.findall(r"s3://[^\s,'\"]+", word)}
    assert uris
    repositories = [options["repository-name"] for options in aws_commands("ecr", "create-repository")]
    region = aws_config()["provider"]["region"]
    for profile, policy in policies.items():
        for uri in uris:
            bucket, _, key = uri.removeprefix("s3://").partition("/")
            assert allows(policy, "s3:ListBucket", f"arn:aws:s3:::{bucket}"), (profile, uri)
            for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
                assert allows(policy, action, f"arn:aws:s3:::{bucket}/{key or 'x'}/x"), (profile, action, uri)
        for repository in repositories:
            assert allows(policy, "ecr:GetAuthorizationToken", "*"), profile
            arn = f"arn:aws:ecr:{region}:{TEST_VALUES['ACCOUNT']}:repository/{repository}"
            assert allows(policy, "ecr:BatchGetImage", arn) and allows(policy, "ecr:GetDownloadUrlForLayer", arn)


def test_the_page_creates_the_instance_profiles_aws_yaml_names():
    head, workers = profile_names()
    created = {c["instance-profile-name"] for c in iam_commands("create-instance-profile")}
    assert created == {head, *workers}
    roles = {c["role-name"] for c in iam_commands("create-role")}
    assert {c["role-name"] for c in iam_commands("add-role-to-instance-profile")} <= roles
    trust = saved_json_files()
    for role in iam_commands("create-role"):
        policy = trust[role["assume-role-policy-document"].removeprefix("file://")]
        assert any(s.get("Principal") == {"Service": "ec2.amazonaws.com"} and s["Action"] == "sts:AssumeRole"
                   for s in policy["Statement"]), "EC2 instances must be able to take the role"


def test_the_irsa_trust_names_the_manifests_service_account():
    account = manifest(RAYCLUSTER_YAML, "ServiceAccount")
    subject = f"system:serviceaccount:default:{account['metadata']['name']}"
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].rsplit("/", 1)[-1]
    web_identity = [json.loads(body) for body, _ in blocks_of("json") if "AssumeRoleWithWebIdentity" in body]
    assert len(web_identity) == 1
    [statement] = web_identity[0]["Statement"]
    conditions = statement["Condition"]["StringEquals"]
    assert subject in conditions.values() and "sts.amazonaws.com" in conditions.values()
    assert f"role `{role}`" in PAGE.read_text() or f"role {role}" in PAGE.read_text(), role


def expected_quotas() -> dict[str, int]:
    """vCPUs each EC2 quota must allow for cluster/aws.yaml's pools at their largest: max_workers of the biggest
    instance type of each family (the head counts once, on demand)."""
    config = aws_config()
    quotas: dict[str, int] = {}
    for name, node_type in config["available_node_types"].items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in INSTANCE_VCPUS, f"{instance}: add its vCPUs to INSTANCE_VCPUS"
        letters = re.match(r"[a-z]+", instance).group()   # c7i.16xlarge -> c, vt1.3xlarge -> vt
        family = next((f for f, prefixes in QUOTA_FAMILIES.items() if letters in prefixes), None)
        assert family, f"{instance}: add its quota family to QUOTA_FAMILIES"
        spot = node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        quota = f"All {family} Spot Instance Requests" if spot else f"Running On-Demand {family} instances"
        count = 1 if name == config["head_node_type"] else node_type["max_workers"]
        quotas[quota] = max(quotas.get(quota, 0), count * INSTANCE_VCPUS[instance])
    return quotas


def test_the_quotas_to_ask_for_are_what_aws_yaml_can_start():
    rows = re.findall(r"^\| ((?:All|Running) [^|]+?) \| [^|]+ \| (\d+) \|$", PAGE.read_text(), re.M)
    assert {name: int(vcpus) for name, vcpus in rows} == expected_quotas()


def test_yaml_blocks_load_and_the_aws_snippet_fits_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    blocks = [body for body, _ in blocks_of("yaml")]
    assert blocks
    for body in blocks:
        documents = [doc for doc in yaml.safe_load_all(body) if doc is not None]
        assert documents and all(isinstance(doc, dict) for doc in documents)
        if "initialization_commands" in documents[0]:
            config = {**aws_config(), **documents[0]}
            validate_config(prepare_config(copy.deepcopy(config)))
            assert all(isinstance(command, str) for command in config["initialization_commands"])
        for doc in documents:
            if doc.get("kind") == "NodePool":   # the taints it sets are the ones the GPU group tolerates
                spec = manifest(RAYCLUSTER_YAML, "RayCluster")["spec"]
                tolerated = {t["key"] for group in spec["workerGroupSpecs"]
                             for t in group["template"]["spec"].get("tolerations", [])}
                assert {t["key"] for t in doc["spec"]["template"]["spec"]["taints"]} <= tolerated


def test_names_on_the_page_are_the_clusters():
    config = aws_config()
    images = {node_type["node_config"]["ImageId"].removeprefix("resolve:ssm:")
              for node_type in config["available_node_types"].values()}
    for argv in commands():
        if argv[:3] == ["aws", "ssm", "get-parameter"]:
            assert argv[argv.index("--name") + 1] in images, "the AMI parameter cluster/aws.yaml resolves"
        if argv[:3] == ["aws", "ec2", "describe-instances"]:
            from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

            assert f"Name=tag:{TAG_RAY_CLUSTER_NAME},Values={config['cluster_name']}" in argv


def kuberay_minimum() -> Version:
    stated = {Version(v) for path in (RAYCLUSTER_YAML, RAYJOB_YAML)
              for v in re.findall(r"Needs KubeRay (\d+\.\d+\.\d+) or newer", path.read_text())}
    assert len(stated) == 1, f"the manifests state one minimum KubeRay version, found {stated}"
    return stated.pop()


def test_the_kuberay_the_page_installs_is_one_the_manifests_run_on():
    installs = [argv for argv in commands() if argv[:2] == ["helm", "install"] and "kuberay/kuberay-operator" in argv]
    assert len(installs) == 1
    assert Version(installs[0][installs[0].index("--version") + 1]) >= kuberay_minimum()
    assert f"KubeRay {kuberay_minimum()} or newer" in PAGE.read_text()


# -- the checks fail on a broken page ----------------------------------------------------------
SUBMIT = ("ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml "
          "--entrypoint-resources '{\"driver\": 1}' -- ")


@pytest.mark.parametrize("line", [
    SUBMIT.replace("--runtime-env", "--runtime-envs") + "python jobs/train.py --config jobs/configs/smoke.yaml",
    SUBMIT + "python jobs/train.py --config jobs/configs/missing.yaml",
    SUBMIT + "python jobs/train.py --config jobs/configs/smoke.yaml train.no_such_key=1",
    SUBMIT + "python jobs/eval.py --checkpoint s3://b/c --splits val",
    SUBMIT.replace("driver", "no_such_pool") + "python jobs/manifest.py --root s3://b/raw --out s3://b/m.parquet",
    "ray up cluster/missing.yaml",
    "hlip-ray manifest --out s3://b/m.parquet",
    "kubectl apply -f cluster/kuberay/missing.yaml",
    "kubectl port-forward svc/other-head-svc 8265:8265",
    "sed -i \"s|ghcr.io/<nobody>/image|x|\" cluster/aws.yaml",
    "terraform apply",
], ids=range(11))
def test_a_broken_command_fails_the_checks(line):
    with pytest.raises((AssertionError, ValueError)):   # a check's assertion, or ConfigError from the config
        for argv in commands(f"```bash\n{line}\n```\n"):
            check_command(argv)


def test_a_policy_without_what_the_autoscaler_needs_fails_the_checks():
    page = PAGE.read_text()
    assert not head_policy_errors(page)
    assert head_policy_errors(page.replace('"Action": "iam:PassRole"', '"Action": "iam:GetRole"'))
    assert head_policy_errors(page.replace('"ec2:TerminateInstances", ', ""))
    broken = json.loads(blocks_of("json")[1][0])
    broken["Statement"][0]["Effect"] = "Permit"
    assert policy_shape_errors(broken)
