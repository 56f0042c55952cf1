"""cluster.yaml (Ray cluster launcher, GCP) checked offline, plus what Ray itself does not check.

Ray's own check is `prepare_config` (merge with Ray's gcp/defaults.yaml, merge setup commands, fill
per-type worker bounds) followed by `validate_config` (ray-schema.json and cross-field rules). Neither
needs GCP libraries or the network: the GCP-specific step, `bootstrap_gcp` (project, service account,
SSH key, subnet), runs only in `ray up` and needs `google-api-python-client` and credentials, so it is
not exercised here. Ray's schema stops at `node_config`, and Ray never compares `resources` with the
machine it launches, so the tests below pin those properties themselves.

These are private Ray APIs: pyproject pins Ray's version range.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import yaml

ray_util = pytest.importorskip("ray.autoscaler._private.util")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
README = ROOT / "README.md"
DEFAULT_SPACE = ROOT / "search_spaces" / "default.yaml"
DOCS_HEADING = "## Run on Google Cloud"


# vCPUs per machine type, from cloud.google.com/compute/docs/{general-purpose,accelerator-optimized}-machines.
# A machine type not listed here fails the test: add it, so that `resources` is checked against it.
VCPUS = {
    "n2-standard-4": 4,
    "n2-standard-8": 8,
    "n2-standard-16": 16,
    "g2-standard-4": 4,
    "g2-standard-8": 8,
    "g2-standard-12": 12,
    "g2-standard-16": 16,
    "g2-standard-24": 24,
    "g2-standard-32": 32,
    "g2-standard-48": 48,
    "a2-highgpu-1g": 12,
    "a2-highgpu-2g": 24,
    "a2-highgpu-4g": 48,
    "a2-ultragpu-1g": 12,
}
# Accelerator-optimized machine types come with a fixed GPU model and count; GCE rejects any other
# guestAccelerators for them at launch time, long after `ray up` has started.
BUILT_IN_GPUS = {
    "g2-standard-4": ("nvidia-l4", 1),
    "g2-standard-8": ("nvidia-l4", 1),
    "g2-standard-12": ("nvidia-l4", 1),
    "g2-standard-16": ("nvidia-l4", 1),
    "g2-standard-24": ("nvidia-l4", 2),
    "g2-standard-32": ("nvidia-l4", 1),
    "g2-standard-48": ("nvidia-l4", 4),
    "a2-highgpu-1g": ("nvidia-tesla-a100", 1),
    "a2-highgpu-2g": ("nvidia-tesla-a100", 2),
    "a2-highgpu-4g": ("nvidia-tesla-a100", 4),
    "a2-ultragpu-1g": ("nvidia-a100-80gb", 1),
}
# Ray's GCP bootstrap creates this service account (DEFAULT_SERVICE_ACCOUNT_ID in
# ray/autoscaler/_private/gcp/config.py, not importable without google-api-python-client).
RAY_SERVICE_ACCOUNT_ID = "ray-autoscaler-sa-v1"
# GCE instance names are at most 63 characters; Ray names them "ray-<cluster>-worker-<8 hex>-compute".
INSTANCE_NAME_MAX_LEN = 63


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw: dict) -> dict:
    return ray_util.prepare_config(copy.deepcopy(raw))


@pytest.fixture(scope="module")
def docs_text() -> str:
    """The README's Google Cloud section (the one place these docs live)."""
    readme = README.read_text()
    assert DOCS_HEADING in readme, f"README.md has no {DOCS_HEADING!r} section"
    section = readme.split(DOCS_HEADING, 1)[1]
    # The section ends at the next second-level heading (### subsections belong to it).
    return DOCS_HEADING + re.split(r"\n## ", section, maxsplit=1)[0]


def node_types(config: dict) -> dict:
    return config["available_node_types"]


def gpu_types(config: dict) -> dict:
    return {name: t for name, t in node_types(config).items() if t["resources"].get("GPU", 0) > 0}


def worker_types(config: dict) -> dict:
    return {name: t for name, t in node_types(config).items() if name != config["head_node_type"]}


def accelerator_count(node_config: dict) -> int:
    return sum(a["acceleratorCount"] for a in node_config.get("guestAccelerators", []))


def head_start_command(config: dict) -> str:
    (cmd,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    return cmd


def find_number(tree, keys: set[str]) -> float | None:
    """The largest number stored under any of `keys` anywhere in a parsed YAML tree."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if str(k).lower() in keys and isinstance(v, int | float) and not isinstance(v, bool):
                    found.append(float(v))
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(tree)
    return max(found) if found else None


# --- Ray's own checks -------------------------------------------------------------------------


def test_passes_ray_prepare_and_validate(prepared: dict):
    ray_util.validate_config(prepared)
    assert prepared["provider"]["type"] == "gcp"
    assert prepared["head_node_type"] in node_types(prepared)


def test_prepare_keeps_our_start_commands(raw: dict, prepared: dict):
    # prepare_config fills missing top-level keys from Ray's gcp/defaults.yaml, whose head start
    # command binds the dashboard to 0.0.0.0. Ours must survive the merge unchanged.
    assert prepared["head_start_ray_commands"] == raw["head_start_ray_commands"]
    assert prepared["worker_start_ray_commands"] == raw["worker_start_ray_commands"]
    assert any("$RAY_HEAD_IP" in c for c in prepared["worker_start_ray_commands"])


# --- what Ray does not check ------------------------------------------------------------------


def test_dashboard_stays_on_loopback(prepared: dict):
    cmd = head_start_command(prepared)
    assert "--head" in cmd
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", cmd), cmd
    for c in prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]:
        assert "0.0.0.0" not in c, c


def test_gpu_resources_match_accelerators(raw: dict):
    for name, t in node_types(raw).items():
        nc = t["node_config"]
        assert t["resources"].get("GPU", 0) == accelerator_count(nc), name
        machine = nc["machineType"]
        assert machine in VCPUS, f"{name}: add {machine}'s vCPU count to VCPUS in this test"
        assert t["resources"]["CPU"] == VCPUS[machine], f"{name}: CPU must equal {machine}'s vCPUs"
        if machine in BUILT_IN_GPUS:
            model, count = BUILT_IN_GPUS[machine]
            accels = nc.get("guestAccelerators", [])
            assert [(a["acceleratorType"], a["acceleratorCount"]) for a in accels] == [(model, count)], name


def test_there_is_an_l4_worker_and_an_a100_worker(raw: dict):
    accels = {
        a["acceleratorType"] for t in gpu_types(raw).values() for a in t["node_config"]["guestAccelerators"]
    }
    assert "nvidia-l4" in accels
    assert any("a100" in a for a in accels)
    assert accelerator_count(node_types(raw)[raw["head_node_type"]]["node_config"]) == 0, "CPU head node"


def test_gpu_nodes_terminate_on_host_maintenance(raw: dict):
    for name, t in gpu_types(raw).items():
        scheduling = t["node_config"].get("scheduling")
        # GCE's `scheduling` is an object; Ray's old examples write a list, which GCE rejects.
        assert isinstance(scheduling, dict), f"{name}: scheduling must be a mapping"
        assert scheduling.get("onHostMaintenance") == "TERMINATE", name
        # A VM that restarts by itself comes back without Ray; let the autoscaler replace it.
        assert scheduling.get("automaticRestart") is False, name


def test_gpu_nodes_boot_an_image_with_cuda_drivers(raw: dict):
    for name, t in gpu_types(raw).items():
        (boot,) = [d for d in t["node_config"]["disks"] if d.get("boot")]
        image = boot["initializeParams"]["sourceImage"]
        assert image.startswith("projects/deeplearning-platform-release/global/images/family/common-cu"), name
        assert "nvidia" in image, f"{name}: pick a family with the NVIDIA driver preinstalled"


def test_workers_scale_from_zero_within_max_workers(raw: dict, prepared: dict):
    workers = worker_types(prepared)
    assert all(t["min_workers"] == 0 for t in workers.values())
    assert 0 < prepared["max_workers"] <= 16
    assert all(t["max_workers"] <= prepared["max_workers"] for t in workers.values())
    assert any(t["max_workers"] > 0 for t in gpu_types(prepared).values()), "some GPU type must scale up"


def default_trial_resources() -> tuple[float, float]:
    """(gpu, cpu) that search_spaces/default.yaml gives each trial, read the way `tune` reads it."""
    from paraphrase_ray.sweep.spec import load_spec

    res = load_spec(DEFAULT_SPACE).resources
    return float(res.gpu), float(res.cpu)


def trials_per_node(t: dict, gpu: float, cpu: float) -> int:
    return min(math.floor(t["resources"]["GPU"] / gpu + 1e-9), math.floor(t["resources"]["CPU"] / cpu + 1e-9))


def test_default_search_space_fits_gpu_workers(raw: dict):
    gpu, cpu = default_trial_resources()
    assert gpu > 0 and cpu > 0
    for name, t in gpu_types(raw).items():
        per_node = math.floor(t["resources"]["GPU"] / gpu + 1e-9)
        assert per_node >= 1, f"{name}: a trial asks for {gpu} GPUs"
        assert per_node * gpu == pytest.approx(t["resources"]["GPU"]), f"{name}: GPU share leaves a gap"
        assert per_node * cpu <= t["resources"]["CPU"], (
            f"{name}: {per_node} trials need {per_node * cpu} CPUs"
        )


def test_docs_state_the_default_trial_resources(raw: dict, docs_text: str):
    gpu, cpu = default_trial_resources()
    m = re.search(r"default search space gives each trial `gpu: ([\d.]+)` and `cpu: ([\d.]+)`", docs_text)
    assert m, "README's Google Cloud section no longer states the default space's per-trial resources"
    assert (float(m[1]), float(m[2])) == (gpu, cpu)
    m = re.search(r"one\s+`(worker_[a-z0-9]+)`\s+runs\s+(\d+)\s+trials at a time", docs_text)
    assert m and int(m[2]) == trials_per_node(node_types(raw)[m[1]], gpu, cpu)


def test_setup_commands_install_this_package(raw: dict, prepared: dict):
    remote = [r for r, local in raw["file_mounts"].items() if local in (".", "./")]
    assert remote == [f"/home/{raw['auth']['ssh_user']}/paraphrase-ray"], (
        "repo root mounted in the SSH user's home"
    )
    remote_home = "~/" + remote[0].split("/", 3)[3]
    for key in ("head_setup_commands", "worker_setup_commands"):
        installs = [c for c in prepared[key] if "pip install" in c and "-e '.[gcp]'" in c]
        assert installs, f"{key} must pip install -e '.[gcp]'"
        assert any(f"cd {remote[0]}" in c or f"cd {remote_home}" in c for c in installs), key
    # The same commands run on every node type: no per-type override drops the install.
    assert all("worker_setup_commands" not in t for t in node_types(raw).values())


def test_gcp_extra_has_what_ray_up_and_gcs_need():
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib  # Python >= 3.11

        gcp = tomllib.loads(text)["project"].get("optional-dependencies", {}).get("gcp")
    except ImportError:  # Python 3.10: the extra is one `gcp = [...]` array
        m = re.search(r"^gcp\s*=\s*\[(.*?)\]\s*$", text, flags=re.M | re.S)
        gcp = re.findall(r'"([^"]+)"', m.group(1)) if m else None
    assert gcp is not None, "setup_commands install '.[gcp]': pyproject.toml must define the gcp extra"
    names = {re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower() for req in gcp}
    # `ray up` imports googleapiclient for the GCP provider; gs:// goes through pyarrow, a core dependency.
    assert "google-api-python-client" in names


def test_workers_run_as_ray_service_account(raw: dict):
    # Without a service account on the workers, trials could not write checkpoints to gs://.
    project = raw["provider"]["project_id"]
    email = f"{RAY_SERVICE_ACCOUNT_ID}@{project}.iam.gserviceaccount.com"
    for name, t in worker_types(raw).items():
        (account,) = t["node_config"]["serviceAccounts"]
        assert account["email"] == email, name
        assert "https://www.googleapis.com/auth/cloud-platform" in account["scopes"], name


def test_provider_and_names_are_valid_for_gcp(raw: dict, docs_text: str):
    provider = raw["provider"]
    assert provider["availability_zone"].startswith(provider["region"] + "-")
    project = provider["project_id"]
    if project == "YOUR_PROJECT_ID":
        # Not a valid project id (so Ray cannot try to create it), and the docs say how to set it.
        assert f"s/{project}/" in docs_text
    # Node type names become GCE label values: lowercase letters, digits, '_' and '-'.
    for name in node_types(raw):
        assert re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", name), name
    cluster = raw["cluster_name"]
    assert re.fullmatch(r"[a-z][a-z0-9-]*[a-z0-9]", cluster)
    assert len(f"ray-{cluster}-worker-12345678-compute") <= INSTANCE_NAME_MAX_LEN


# --- the docs agree with the config ---------------------------------------------------------


def test_docs_name_only_existing_node_types(raw: dict, docs_text: str):
    types = node_types(raw)
    named = set(re.findall(r"`((?:head|worker)_[a-z0-9_]+)`", docs_text))
    assert named <= set(types), f"docs name node types cluster.yaml lacks: {named - set(types)}"
    assert set(types) <= named, f"docs do not describe: {set(types) - named}"
    machines = {t["node_config"]["machineType"] for t in types.values()}
    named_machines = set(
        re.findall(r"\b[a-z]\d+[a-z]?-(?:standard|highgpu|ultragpu|highmem)-\d+g?\b", docs_text)
    )
    assert named_machines <= machines, (
        f"docs name machine types cluster.yaml lacks: {named_machines - machines}"
    )
    accels = {
        a["acceleratorType"] for t in types.values() for a in t["node_config"].get("guestAccelerators", [])
    }
    named_accels = set(re.findall(r"\bnvidia-[a-z0-9-]*[a-z0-9]\b", docs_text))
    assert named_accels <= accels, f"docs name accelerators cluster.yaml lacks: {named_accels - accels}"


def test_docs_give_the_commands_in_order(raw: dict, docs_text: str):
    steps = [
        "sed -i.bak",
        "ray up cluster.yaml",
        "ray dashboard cluster.yaml",
        "--storage gs://$BUCKET/paraphrase-ray --address auto",
        "--resume",
        "serve deploy serve/config.yaml",
        "ray down cluster.yaml",
    ]
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", docs_text, flags=re.S))
    positions = [commands.find(s) for s in steps]
    assert -1 not in positions, [s for s, p in zip(steps, positions, strict=True) if p == -1]
    assert positions == sorted(positions)
    # Job entrypoints cd into the path the repo is mounted at.
    (remote,) = raw["file_mounts"]
    assert f"cd {remote} && paraphrase-ray tune --space search_spaces/default.yaml" in commands
    assert "estimate" in docs_text.lower()
