"""infra/ and docs/scaling.md: the files parse, have the fields their tools require, and every cdam command
in them is a real command with real flags (parsed by ``jobs.cli.build_parser``). Docker, Kubernetes and
the cluster launcher are not run here."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from bench import sizes
from jobs.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
COMMAND_STARTS = ("cdam ", "python -m jobs ", "python3 -m jobs ", "ray job submit ", "docker run ", "docker compose ")
"""A line starting with one of these (after '#', '$' and blanks) is a command line."""


def cdam_commands(text: str) -> list[list[str]]:
    """The argv (after ``cdam`` or ``python -m jobs``) of every cdam command in a script, comment or doc.

    Backslash continuations are joined; a command ends at '&&', ';' or '|'.
    """
    text = re.sub(r"\\\n[#\s]*", " ", text)
    commands = []
    for line in text.splitlines():
        line = line.strip().lstrip("#$").strip()
        if not line.startswith(COMMAND_STARTS):
            continue
        match = re.search(r"(?:^|\s)(?:cdam|python3? -m jobs)\s+(?=[a-z])(.*)", line)
        if match is None:
            continue
        tokens = shlex.split(match[1], comments=True)
        end = next(
            (i for i, token in enumerate(tokens) if token in ("&&", ";", "|", "||", "&", ">", ">>", "<", "2>")),
            len(tokens),
        )
        commands.append(tokens[:end])
    return commands


def assert_real_command(argv: list[str]) -> None:
    """The argv parses with cdam's own parser (``--help`` exits 0; anything else that exits fails)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as exit_:
        assert exit_.code == 0 and ("--help" in argv or "-h" in argv), (
            f"cdam {shlex.join(argv)}: {stderr.getvalue().strip()}"
        )


def fenced_blocks(markdown: str, language: str) -> str:
    return "\n".join(re.findall(rf"```{language}\n(.*?)```", markdown, flags=re.S))


def load_yaml(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def test_kuberay_rayjob_runs_a_real_explain_on_gpu_workers_with_keys_from_a_secret():
    job = load_yaml("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    entry = spec["entrypoint"]
    assert entry.startswith("python -m jobs explain ")  # jobs/__main__.py is the entry point
    assert (ROOT / "jobs" / "__main__.py").is_file()
    argv = shlex.split(entry)[3:]
    assert_real_command(argv)
    args = build_parser().parse_args(argv)
    assert (
        args.command == "explain"
        and all(shard.startswith("s3://") for shard in args.shards)
        and args.output.startswith("s3://")
    )

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray_version_of("Dockerfile.cuda")
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head only drives
    workers = cluster["workerGroupSpecs"]
    assert len(workers) == 1 and workers[0]["groupName"] and workers[0]["replicas"] >= 1
    pods = [head["template"]["spec"], workers[0]["template"]["spec"]]
    containers = [pod["containers"][0] for pod in pods]
    assert [c["name"] for c in containers] == ["ray-head", "ray-worker"]
    for container in containers:
        assert container["image"].endswith("/cdam:cuda")
        assert container["envFrom"] == [{"secretRef": {"name": "cdam-s3"}}]  # keys from a secret, never in the manifest
        assert not any(
            "SECRET" in variable["name"] or "KEY" in variable["name"] for variable in container.get("env", [])
        )
    worker_resources = containers[1]["resources"]
    assert worker_resources["limits"]["nvidia.com/gpu"] == 1 == worker_resources["requests"]["nvidia.com/gpu"]
    assert "kubectl create secret generic cdam-s3" in (INFRA / "kuberay-rayjob.yaml").read_text()


def test_ray_cluster_launcher_config_has_what_ray_up_needs():
    config = load_yaml("ray-cluster.yaml")
    for field in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "setup_commands"):
        assert field in config, field
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types and types[config["head_node_type"]]["resources"] == {"CPU": 0}
    for node in types.values():
        assert node["node_config"]["InstanceType"] and node["node_config"]["IamInstanceProfile"]["Name"]
    assert any(
        "pip install" in command and "/home/ubuntu/cdam" in command and "ray[default]" in command
        for command in config["setup_commands"]
    )
    assert config["file_mounts"]["/home/ubuntu/cdam"] == "."
    commands = cdam_commands((INFRA / "ray-cluster.yaml").read_text())
    assert [argv[0] for argv in commands] == ["explain"]
    assert_real_command(commands[0])


def test_compose_runs_minio_and_real_cdam_commands_against_it():
    compose = load_yaml("compose.yaml")
    services = compose["services"]
    assert set(services) == {"minio", "create-bucket", "cdam"}
    assert services["minio"]["image"].startswith("minio/minio") and services["minio"]["command"][0] == "server"
    bucket_script = services["create-bucket"]["entrypoint"][-1]
    assert "mc mb --ignore-existing local/cdam" in bucket_script
    cdam = services["cdam"]
    assert (INFRA / cdam["build"]["context"] / cdam["build"]["dockerfile"]).resolve() == INFRA / "Dockerfile.cpu"
    assert cdam["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    environment = cdam["environment"]
    assert environment["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert environment["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
    assert environment["AWS_SECRET_ACCESS_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    commands = cdam_commands(cdam["command"][-1])
    assert [argv[0] for argv in commands] == ["pack", "explain", "verify"]
    for argv in commands:
        assert_real_command(argv)
    assert all("s3://cdam/" in " ".join(argv) for argv in commands)


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_install_the_project_and_run_cdam(dockerfile):
    text = (INFRA / dockerfile).read_text()
    instructions = [
        line.split(None, 1) for line in re.sub(r"\\\n\s*", " ", text).splitlines() if line and not line.startswith("#")
    ]
    keywords = [instruction[0] for instruction in instructions]
    assert keywords[0] == "FROM" and "python:3.11" in instructions[0][1]
    copied = [instruction[1].split()[:-1] for instruction in instructions if instruction[0] == "COPY"]
    for sources in copied:
        assert all((ROOT / source).exists() for source in sources), sources
    assert {"pyproject.toml", "cdam_worker", "jobs", "schemas"} <= {source for sources in copied for source in sources}
    installs = [
        instruction[1] for instruction in instructions if instruction[0] == "RUN" and "pip install" in instruction[1]
    ]
    assert any(re.search(r"pip install .* \. ", install + " ") and "ray[default]" in install for install in installs)
    assert "wget" in text  # KubeRay's health probes run wget in the container
    assert json.loads(next(i[1] for i in instructions if i[0] == "CMD"))[0] == "cdam"
    ignored = (INFRA / f"{dockerfile}.dockerignore").read_text().splitlines()
    assert ignored[1] == "*" and {"!pyproject.toml", "!cdam_worker", "!jobs", "!schemas"} <= set(ignored)


def ray_version_of(dockerfile: str) -> str:
    return re.search(r"^ARG RAY_VERSION=(\S+)$", (INFRA / dockerfile).read_text(), flags=re.M)[1]


def test_both_images_install_the_same_ray_version():
    assert ray_version_of("Dockerfile.cpu") == ray_version_of("Dockerfile.cuda")


def test_iam_policy_is_valid_json_with_read_and_write_statements():
    policy = json.loads((INFRA / "iam-policy.json").read_text())
    actions = {action for statement in policy["Statement"] for action in statement["Action"]}
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"} <= actions


@pytest.mark.parametrize("page", ["infra/README.md", "docs/scaling.md", "README.md"])
def test_cdam_commands_in_the_docs_are_real(page):
    commands = cdam_commands(fenced_blocks((ROOT / page).read_text(), "bash"))
    assert commands
    for argv in commands:
        assert_real_command(argv)


def test_scaling_doc_sizes_match_the_code():
    page = (ROOT / "docs" / "scaling.md").read_text()
    assert sizes.doc_block() in page
    # The numbers the prose quotes
    assert (
        f"`--targets all --dtype float16` stores {sizes.layout(1000, 'float16', False).bytes_per_image() / 1024:.0f} KiB"
        in page
    )
    assert (
        f"--store-basis` ({sizes.layout(5, 'float16', True).bytes_per_image() / 1024:.0f} KiB per image at float16)"
        in page
    )


def test_command_finder_sees_continued_lines_and_stops_at_operators():
    text = "# cdam pack a b \\\n#   --maxcount 3 && cdam verify x\nprose about cdam explain here\n$ python -m jobs verify d | tee log\n"
    assert cdam_commands(text) == [["pack", "a", "b", "--maxcount", "3"], ["verify", "d"]]
