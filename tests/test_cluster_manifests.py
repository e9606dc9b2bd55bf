"""Validate everything in cluster/: the Ray cluster launcher config, the KubeRay RayCluster and
RayJob manifests, and the job runtime_env.

Each validator is a plain function that returns a list of problems (empty: valid), so every
rule is exercised twice: on the real files (no problems) and on a deliberately broken copy
(the expected problem is reported). Nothing here starts Ray; the only slow part is asking each
job script for its ``--help`` (in process, once per script; the first one imports torch).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
import re
import runpy
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY_API = "ray.io/v1"
GPU_KEY = "nvidia.com/gpu"

# Instance types used by cluster/launcher-aws.yaml: (vCPUs, GPUs). Declared resources must
# match the hardware, or the autoscaler plans with numbers the node does not have.
AWS_INSTANCE_RESOURCES: dict[str, tuple[int, int]] = {
    "m5.xlarge": (4, 0), "m5.2xlarge": (8, 0), "m5.4xlarge": (16, 0),
    "g5.xlarge": (4, 1), "g5.2xlarge": (8, 1), "g5.12xlarge": (48, 4), "g5.48xlarge": (192, 8),
    "g6.xlarge": (4, 1), "g6.12xlarge": (48, 4), "p4d.24xlarge": (96, 8),
}

# runtime_env fields of Ray 2.60 (ray.runtime_env.RuntimeEnv), to recognise a runtime_env file.
RUNTIME_ENV_KEYS = {"working_dir", "py_modules", "pip", "uv", "conda", "env_vars", "excludes", "container",
                    "image_uri", "config", "py_executable", "worker_process_setup_hook", "nsight"}

# Credentials, as text (any file) and as literal values of secret-looking names (YAML).
SECRET_PATTERNS: dict[str, re.Pattern[str]] = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key value": re.compile(
        r"(?i)(?:aws_secret_access_key|aws_session_token|secret_access_key)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{16,}"),
    "Ray auth token value": re.compile(r"(?i)ray_auth_token[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9_\-]{16,}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}
SECRET_NAME = re.compile(r"(?i)(secret|token|password|passwd|access_key|private_key)")


# ----------------------------------------------------------------------------- loading
def cluster_yaml_files() -> list[Path]:
    """Every YAML file under cluster/."""
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_documents(path: Path) -> list[Any]:
    """All YAML documents of ``path`` (``yaml.safe_load_all``), empty ones dropped."""
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def classify(doc: Any) -> str:
    """``launcher``, ``runtime_env``, ``RayCluster``, ``RayJob`` or ``unknown``."""
    if not isinstance(doc, dict):
        return "unknown"
    if "apiVersion" in doc or "kind" in doc:
        return str(doc.get("kind")) if doc.get("kind") in ("RayCluster", "RayJob") else "unknown"
    if "provider" in doc and "available_node_types" in doc:
        return "launcher"
    if doc and set(doc) <= RUNTIME_ENV_KEYS:
        return "runtime_env"
    return "unknown"


def manifests() -> list[tuple[str, str, dict[str, Any]]]:
    """``(id, kind, document)`` for every document of every YAML file in cluster/."""
    out = []
    for path in cluster_yaml_files():
        rel = path.relative_to(REPO).as_posix()
        try:
            docs = load_documents(path)
        except yaml.YAMLError as exc:
            out.append((rel, "unparsable", {"error": " ".join(str(exc).split())}))
            continue
        for i, doc in enumerate(docs):
            out.append((rel if len(docs) == 1 else f"{rel}#{i}", classify(doc), doc))
    return out


def of_kind(kind: str) -> list[Any]:
    """The documents of one kind, as pytest params named by file."""
    return [pytest.param(doc, id=ident) for ident, k, doc in manifests() if k == kind]


def project_metadata() -> dict[str, Any]:
    """``[project]`` of pyproject.toml."""
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def project_requirements() -> dict[str, Requirement]:
    """pyproject.toml's ``[project].dependencies`` by canonical package name."""
    reqs = (Requirement(r) for r in project_metadata()["dependencies"])
    return {canonicalize_name(r.name): r for r in reqs}


# ----------------------------------------------------------------------------- job scripts
@dataclass(frozen=True)
class ScriptOptions:
    """What a job script accepts, read from its ``--help``."""

    options: frozenset[str]
    required: frozenset[str]
    takes_value: frozenset[str]
    takes_many: frozenset[str]
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)


@functools.cache
def script_help(script: str) -> tuple[int, str]:
    """``python SCRIPT --help``, run in this process with runpy (the CLI imports torch once per
    process; a subprocess per script would pay that again). Returns (exit code, output)."""
    buf, argv = io.StringIO(), sys.argv
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            runpy.run_path(str(REPO / script), run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except Exception as exc:  # reported as a problem of the manifest that names the script
        code = 1
        buf.write(f"{type(exc).__name__}: {exc}")
    finally:
        sys.argv = argv
    return code, buf.getvalue()


def parse_help(text: str) -> ScriptOptions:
    """Options, required options, options taking a value and choices, from argparse's help.

    Required options are those outside ``[...]`` (and ``(...|...)`` groups) in the usage;
    option lines are the lines indented by exactly two spaces that start with a dash (help
    text is indented further); ``...`` in an option's metavar means several values.
    """
    usage = text.split("\n\n", 1)[0]
    required, depth = set(), 0
    for token in re.findall(r"[\[\]()]|[^\s\[\]()]+", usage):
        depth += token in "[("
        depth -= token in "])"
        if depth == 0 and token.startswith("--"):
            required.add(token.split("=")[0])
    options, takes_value, takes_many, choices = set(), set(), set(), {}
    for line in text.splitlines():
        m = re.match(r"^  (?:-\w+, )*(--[\w-]+)(?:[ =](\S.*?))?(?:\s{2,}.*)?$", line)
        if not m:
            continue
        flag, spec = m.group(1), m.group(2)
        options.add(flag)
        if spec:
            takes_value.add(flag)
            if "..." in spec:
                takes_many.add(flag)
            c = re.match(r"\{([^}]*)\}", spec)
            if c:
                choices[flag] = tuple(c.group(1).split(","))
    return ScriptOptions(frozenset(options), frozenset(required), frozenset(takes_value), frozenset(takes_many),
                         choices)


def script_options(script: str) -> ScriptOptions:
    """The options of ``script`` (repo-relative), from its ``--help``.

    Raises:
        FileNotFoundError: no such script in the repository.
        RuntimeError: ``--help`` failed.
    """
    if not (REPO / script).is_file():
        raise FileNotFoundError(script)
    code, out = script_help(script)
    if code != 0:
        raise RuntimeError(f"python {script} --help exited {code}: {out[-500:]}")
    return parse_help(out)


def split_entrypoint(entrypoint: str) -> tuple[str, list[str]]:
    """``python jobs/x.py ARGS`` -> (``jobs/x.py``, ARGS).

    Raises:
        ValueError: not of the form ``python SCRIPT ...``.
    """
    tokens = shlex.split(entrypoint)
    if len(tokens) < 2 or not re.fullmatch(r"python[0-9.]*", Path(tokens[0]).name) or not tokens[1].endswith(".py"):
        raise ValueError(f"entrypoint {entrypoint!r}: expected 'python jobs/<stage>.py ...'")
    return tokens[1], tokens[2:]


def flag_value(args: list[str], flag: str) -> str | None:
    """The value given to ``flag`` (``--flag V`` or ``--flag=V``), or None."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def check_entrypoint(entrypoint: str) -> list[str]:
    """The script exists in the repository, every ``--flag`` is one of its options, required
    options are given, values are among the choices, and repo files named exist."""
    try:
        script, args = split_entrypoint(entrypoint)
    except ValueError as exc:
        return [str(exc)]
    try:
        opts = script_options(script)
    except (FileNotFoundError, RuntimeError) as exc:
        return [f"{script}: no such script in the repository" if isinstance(exc, FileNotFoundError) else str(exc)]
    problems, given, current = [], set(), None
    for a in args:
        if a.startswith("--"):
            flag = a.split("=", 1)[0]
            given.add(flag)
            if flag not in opts.options:
                problems.append(f"{script}: {flag} is not an option (options: {', '.join(sorted(opts.options))})")
            current = flag if flag in opts.takes_value and "=" not in a else None
            if "=" in a and flag in opts.choices and a.split("=", 1)[1] not in opts.choices[flag]:
                problems.append(f"{script}: {a}: use one of {', '.join(opts.choices[flag])}")
            continue
        if current in opts.choices and a not in opts.choices[current]:
            problems.append(f"{script}: {current} {a}: use one of {', '.join(opts.choices[current])}")
        if current not in opts.takes_many:
            current = None  # the next bare word is a positional argument
        if not re.match(r"^[a-z][a-z0-9+.-]*://", a) and re.search(r"\.(ya?ml|csv|json)$", a) and not (REPO / a).is_file():
            problems.append(f"{script}: {a}: no such file in the repository (the job runs in the working_dir)")
    for flag in sorted(opts.required - given):
        problems.append(f"{script}: required option {flag} is missing")
    return problems


# ----------------------------------------------------------------------------- resources
def quantity(value: Any) -> float:
    """A Kubernetes CPU/GPU quantity (``8``, ``"8"``, ``"500m"``) as a number."""
    s = str(value)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


@dataclass(frozen=True)
class PodGroup:
    """A KubeRay worker group as Ray sees it: per-pod CPUs/GPUs and how many pods at most."""

    name: str
    cpus: float
    gpus: float
    pods: int


def ray_container(template: dict[str, Any]) -> dict[str, Any]:
    """The Ray container of a pod template (KubeRay: the first container)."""
    return ((template.get("spec") or {}).get("containers") or [{}])[0]


def worker_groups(spec: dict[str, Any]) -> list[PodGroup]:
    """Worker groups of a RayCluster spec; ``pods`` is maxReplicas with the autoscaler on,
    else replicas (what a RayJob's fixed cluster runs)."""
    groups = []
    for g in spec.get("workerGroupSpecs") or []:
        limits = (ray_container(g.get("template") or {}).get("resources") or {}).get("limits") or {}
        params = g.get("rayStartParams") or {}
        gpus = quantity(params.get("num-gpus", limits.get(GPU_KEY, 0)))
        cpus = quantity(params.get("num-cpus", limits.get("cpu", 0)))
        pods = int(g.get("maxReplicas", 0) if spec.get("enableInTreeAutoscaling") else g.get("replicas", 0))
        groups.append(PodGroup(str(g.get("groupName")), cpus, gpus, pods))
    return groups


def sweep_trial_resources(args: list[str]) -> tuple[float, float]:
    """(cpus, gpus) per Tune trial: the flag, else the ``--config`` sweep YAML, else SweepConfig's default."""
    from mammo_ray.config import SweepConfig

    config_path = flag_value(args, "--config")
    config: dict[str, Any] = {}
    if config_path and (REPO / config_path).is_file():
        config = yaml.safe_load((REPO / config_path).read_text(encoding="utf-8")) or {}
    defaults = SweepConfig.__dataclass_fields__
    out = []
    for key in ("cpus_per_trial", "gpus_per_trial"):
        flag = flag_value(args, "--" + key.replace("_", "-"))
        out.append(float(flag if flag is not None else config.get(key, defaults[key].default)))
    return out[0], out[1]


def check_job_resources(script: str, args: list[str], spec: dict[str, Any]) -> list[str]:
    """The resources a job asks for fit the cluster it runs on.

    Tune: a trial (cpus + gpus) fits in one pod of some worker group. Explain: one actor's GPU
    share fits in one pod, and all ``--workers`` actors fit in the cluster's GPUs.
    """
    groups = worker_groups(spec)
    total_gpus = sum(g.gpus * g.pods for g in groups)
    if script.endswith("tune.py"):
        cpus, gpus = sweep_trial_resources(args)
        if not any(g.pods > 0 and g.gpus >= gpus and g.cpus >= cpus for g in groups):
            return [f"{script}: a trial needs {cpus:g} CPUs + {gpus:g} GPUs in one pod; worker groups offer "
                    + ", ".join(f"{g.name}: {g.cpus:g} CPUs + {g.gpus:g} GPUs x {g.pods}" for g in groups)]
    elif script.endswith("explain.py"):
        gpw, workers = flag_value(args, "--gpus-per-worker"), flag_value(args, "--workers")
        if gpw is None or workers is None:
            return [f"{script}: give --workers and --gpus-per-worker explicitly so the manifest shows what it asks for"]
        per_pod = max((g.gpus for g in groups if g.pods > 0), default=0.0)
        if float(gpw) > per_pod:
            return [f"{script}: --gpus-per-worker {gpw} > {per_pod:g} GPUs per worker pod"]
        if int(workers) * float(gpw) > total_gpus:
            return [f"{script}: --workers {workers} x --gpus-per-worker {gpw} = {int(workers) * float(gpw):g} GPUs "
                    f"> {total_gpus:g} GPUs in the cluster"]
    return []


# ----------------------------------------------------------------------------- shared rules
def walk(obj: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(path, key, value) for every mapping entry and list item (key None) of a nested YAML structure."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{path}.{k}", k, v
            yield from walk(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield f"{path}[{i}]", None, v
            yield from walk(v, f"{path}[{i}]")


def find_secrets_in_text(text: str) -> list[str]:
    """Credential-looking strings in a file's text (names only, never the match)."""
    return [f"looks like a {name}" for name, rx in SECRET_PATTERNS.items() if rx.search(text)]


def find_literal_secrets(doc: Any) -> list[str]:
    """Secret-named keys or Kubernetes env entries that carry a literal value instead of a
    reference (``valueFrom.secretKeyRef``); runtimeEnvYAML strings are searched too."""
    problems = []
    for path, key, value in walk(doc):
        if isinstance(value, dict) and isinstance(value.get("name"), str) and "value" in value \
                and SECRET_NAME.search(value["name"]):
            problems.append(f"{path}: env {value['name']} has a literal value; use valueFrom.secretKeyRef")
        # a path (file_mounts "~/.ray/auth_token", ssh_private_key: /path) names a file, not a secret
        is_path = (isinstance(key, str) and "/" in key) or (isinstance(value, str) and value.startswith(("~/", "/")))
        if isinstance(key, str) and SECRET_NAME.search(key) and isinstance(value, (str, int)) and not is_path:
            problems.append(f"{path}: {key} holds a literal value")
        if key == "runtimeEnvYAML" and isinstance(value, str):
            try:
                problems += find_literal_secrets(yaml.safe_load(value))
            except yaml.YAMLError:
                pass  # reported by check_rayjob
    return problems


def check_ray_image(image: str, ray_version: str | None = None) -> list[str]:
    """A ``rayproject/ray`` image has the project's Ray (and ``rayVersion``) and a Python the
    project supports."""
    m = re.match(r"^(?:docker\.io/)?rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)(.*)$", image)
    if not m:
        return []  # a custom image: nothing to read from its tag
    version, rest = m.groups()
    ray_req = project_requirements()["ray"]
    problems = []
    if Version(version) not in ray_req.specifier:
        problems.append(f"image {image}: Ray {version} is outside pyproject's ray{ray_req.specifier}")
    if ray_version is not None and version != ray_version:
        problems.append(f"image {image}: Ray {version} != rayVersion {ray_version}")
    py = re.search(r"-py(\d)(\d+)", rest)
    if py and Version(f"{py.group(1)}.{py.group(2)}") not in SpecifierSet(project_metadata()["requires-python"]):
        problems.append(f"image {image}: Python {py.group(1)}.{py.group(2)} is outside requires-python")
    return problems


def excluded_package_files(patterns: list[str]) -> list[str]:
    """Files of mammo_ray/ and jobs/ that ``patterns`` (relative to the repository root) would
    leave out of the upload. Ray matches runtime_env excludes with this gitignore pathspec; for
    the forms used in rsync_exclude ("/anchored", bare names, "**/x", "*.ext") rsync agrees."""
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", patterns)
    files = [p.relative_to(REPO).as_posix() for d in ("mammo_ray", "jobs") for p in (REPO / d).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    return [f for f in files if spec.match_file(f)]


def check_runtime_env(env: Any, *, remote_working_dir: bool) -> list[str]:
    """A job runtime_env: valid for Ray 2.60, installs pyproject's dependencies (not ray),
    no object-store variables in env_vars, excludes keep the package, and (RayJobs) a
    working_dir the cluster can fetch."""
    from ray.runtime_env import RuntimeEnv

    from mammo_ray.ray_utils import CREDENTIAL_PREFIXES

    if not isinstance(env, dict):
        return [f"runtime_env is a {type(env).__name__}, not a mapping"]
    problems = []
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as exc:
        problems.append(f"Ray rejects the runtime_env: {exc}")
    pip = env.get("pip")
    packages = pip.get("packages", []) if isinstance(pip, dict) else pip if isinstance(pip, list) else []
    names = set()
    for p in packages:
        try:
            names.add(canonicalize_name(Requirement(str(p)).name))
        except InvalidRequirement:
            problems.append(f"pip: {p!r} is not a requirement")
    missing = sorted(set(project_requirements()) - {"ray"} - names)
    if missing:
        problems.append(f"pip misses pyproject dependencies: {', '.join(missing)}")
    if "ray" in names:
        # Ray checks that a job's pip install leaves the cluster's Ray in place and fails it otherwise
        problems.append("pip lists ray: the cluster's Ray must be used, not reinstalled")
    forwarded = sorted(k for k in (env.get("env_vars") or {}) if k.startswith(CREDENTIAL_PREFIXES))
    if forwarded:
        problems.append(f"env_vars {', '.join(forwarded)}: the drivers forward these through ray.init's runtime_env, "
                        "and Ray refuses a repeated key ('Failed to merge the Job's runtime env')")
    dropped = excluded_package_files(list(env.get("excludes") or []))
    if dropped:
        problems.append(f"excludes drop package files: {', '.join(dropped[:5])}")
    wd = env.get("working_dir")
    if remote_working_dir and not (isinstance(wd, str) and re.match(r"^(s3|gs|https?)://", wd)):
        problems.append(f"working_dir {wd!r}: a RayJob's submitter has no checkout; use a remote .zip URI")
    return problems


# ----------------------------------------------------------------------------- launcher
def check_launcher(cfg: dict[str, Any]) -> list[str]:
    """A ``ray up`` config: Ray's own schema, a GPU-free head, a 1-GPU and a multi-GPU worker
    type, declared resources that match the instance types, the project installed from the
    synced checkout, rsync excludes that keep the package, images with the project's Ray."""
    import jsonschema
    import ray.autoscaler

    problems = []
    required = ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers", "file_mounts",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    problems += [f"missing key {k}" for k in required if k not in cfg]
    if problems:
        return problems
    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        schema = json.load(f)
    try:
        jsonschema.validate(cfg, schema)
    except jsonschema.ValidationError as exc:
        problems.append(f"ray-schema.json: {exc.message} at {'/'.join(map(str, exc.absolute_path))}")
    types, head = cfg["available_node_types"], cfg["head_node_type"]
    if head not in types:
        return problems + [f"head_node_type {head!r} is not in available_node_types"]
    gpus = {}
    for name, t in types.items():
        res = t.get("resources") or {}
        itype = (t.get("node_config") or {}).get("InstanceType")
        hw = AWS_INSTANCE_RESOURCES.get(itype)
        if hw is None and "GPU" not in res:
            problems.append(f"{name}: instance type {itype!r} unknown to the test: declare resources GPU")
        if hw is not None:
            for key, n in zip(("CPU", "GPU"), hw):
                if key in res and res[key] != n:
                    problems.append(f"{name}: resources {key}={res[key]} but {itype} has {n}")
        gpus[name] = res.get("GPU", hw[1] if hw else 0)
        if name != head and t.get("max_workers", 0) < max(t.get("min_workers", 0), 1):
            problems.append(f"{name}: max_workers must be >= max(min_workers, 1)")
    if gpus[head] != 0:
        problems.append(f"head node type {head} has {gpus[head]} GPUs; the head must have none")
    workers = {n: g for n, g in gpus.items() if n != head}
    if 1 not in workers.values():
        problems.append("no worker type with exactly 1 GPU")
    if not any(g > 1 for g in workers.values()):
        problems.append("no worker type with several GPUs")
    # the project is installed from a file mount of the repository root
    mounts = [remote for remote, local in (cfg.get("file_mounts") or {}).items()
              if (REPO / os.path.expanduser(str(local))).resolve() == REPO]
    commands = [c for k in ("setup_commands", "head_setup_commands", "worker_setup_commands")
                for c in cfg.get(k) or []]
    installs = [c for c in commands for m in mounts if re.search(r"\bpip install\b", c) and m in shlex.split(c)]
    if not mounts:
        problems.append("file_mounts does not sync the repository root ('.')")
    elif not installs:
        problems.append(f"no setup command pip-installs the synced checkout ({', '.join(mounts)})")
    dropped = excluded_package_files(list(cfg.get("rsync_exclude") or []))
    if dropped:
        problems.append(f"rsync_exclude drops package files: {', '.join(dropped[:5])}")
    docker = cfg.get("docker") or {}
    images = [docker.get(k) for k in ("image", "head_image", "worker_image")]
    images += [(t.get("docker") or {}).get("worker_image") for t in types.values()]
    for image in filter(None, images):
        problems += check_ray_image(image)
    return problems


# ----------------------------------------------------------------------------- KubeRay
def check_cluster_spec(spec: Any) -> list[str]:
    """A RayCluster spec (standalone or a RayJob's rayClusterSpec): head group without GPUs,
    GPU worker groups whose nvidia.com/gpu limit equals num-gpus, sane replica bounds, images
    with the rayVersion, credentials only by reference."""
    if not isinstance(spec, dict):
        return ["spec is not a mapping"]
    problems = [f"missing spec.{k}" for k in ("rayVersion", "headGroupSpec", "workerGroupSpecs") if not spec.get(k)]
    if problems:
        return problems
    ray_version = str(spec["rayVersion"])
    if Version(ray_version) not in project_requirements()["ray"].specifier:
        problems.append(f"rayVersion {ray_version} is outside pyproject's ray{project_requirements()['ray'].specifier}")
    head = spec["headGroupSpec"]
    head_containers = ((head.get("template") or {}).get("spec") or {}).get("containers") or []
    if not head_containers:
        problems.append("headGroupSpec.template.spec.containers is empty")
    if any(GPU_KEY in ((c.get("resources") or {}).get("limits") or {}) for c in head_containers) \
            or quantity((head.get("rayStartParams") or {}).get("num-gpus", 0)) != 0:
        problems.append("the head group asks for GPUs; the head must have none")
    for g in spec["workerGroupSpecs"]:
        name = g.get("groupName")
        if not name:
            problems.append("a worker group has no groupName")
        if not g.get("template"):
            problems.append(f"worker group {name}: no pod template")
            continue
        lo, n, hi = g.get("minReplicas", 0), g.get("replicas", g.get("minReplicas", 0)), g.get("maxReplicas", 0)
        if not lo <= n <= hi:
            problems.append(f"worker group {name}: need minReplicas <= replicas <= maxReplicas, got {lo}, {n}, {hi}")
        limits = (ray_container(g["template"]).get("resources") or {}).get("limits") or {}
        param = (g.get("rayStartParams") or {}).get("num-gpus")
        if param is not None and quantity(param) != quantity(limits.get(GPU_KEY, 0)):
            problems.append(f"worker group {name}: rayStartParams num-gpus {param} != {GPU_KEY} limit "
                            f"{limits.get(GPU_KEY, 0)}")
    if not any(g.gpus > 0 and g.pods > 0 for g in worker_groups(spec)):
        problems.append("no worker group with GPUs")
    for _, key, value in walk(spec):
        if key == "image" and isinstance(value, str):
            problems += check_ray_image(value, ray_version)
    return problems


def containers_of(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group, pod spec) of the head and every worker group of a cluster spec."""
    groups = [("head", spec.get("headGroupSpec") or {})]
    groups += [(str(g.get("groupName")), g) for g in spec.get("workerGroupSpecs") or []]
    return [(name, (g.get("template") or {}).get("spec") or {}) for name, g in groups]


def check_s3_credentials(spec: dict[str, Any]) -> list[str]:
    """Every Ray pod of a cluster that reads s3:// gets credentials from a Secret
    (env valueFrom.secretKeyRef) or an IAM-bound service account, never literally."""
    problems = []
    for name, pod in containers_of(spec):
        if pod.get("serviceAccountName"):
            continue
        env = {e.get("name"): e for e in (pod.get("containers") or [{}])[0].get("env") or []}
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            if not ((env.get(var) or {}).get("valueFrom") or {}).get("secretKeyRef"):
                problems.append(f"{name}: {var} does not come from a Secret (env valueFrom.secretKeyRef)")
    return problems


def check_raycluster(doc: dict[str, Any]) -> list[str]:
    """A KubeRay RayCluster manifest: keys, the cluster spec, and S3 credentials from a Secret in
    every Ray pod (jobs submitted to it read and write s3://)."""
    problems = [] if doc.get("apiVersion") == KUBERAY_API else [f"apiVersion {doc.get('apiVersion')!r}: use {KUBERAY_API}"]
    if doc.get("kind") != "RayCluster":
        problems.append(f"kind {doc.get('kind')!r} is not RayCluster")
    if not (doc.get("metadata") or {}).get("name"):
        problems.append("metadata.name is missing")
    return problems + check_cluster_spec(doc.get("spec")) + check_s3_credentials(doc.get("spec") or {})


def resolve_cluster(spec: dict[str, Any], clusters: dict[str, dict[str, Any]]) -> tuple[dict[str, Any] | None, list[str]]:
    """A RayJob's cluster spec: inline ``rayClusterSpec``, or the RayCluster of cluster/ that its
    ``clusterSelector`` (``ray.io/cluster: NAME``) names."""
    if spec.get("rayClusterSpec"):
        return spec["rayClusterSpec"], []
    selector = spec.get("clusterSelector") or {}
    if not selector:
        return None, ["neither rayClusterSpec nor clusterSelector"]
    name = selector.get("ray.io/cluster")
    if name not in clusters:
        return None, [f"clusterSelector {selector}: no RayCluster named {name!r} in cluster/"]
    return clusters[name], []


def check_rayjob(doc: dict[str, Any], clusters: dict[str, dict[str, Any]]) -> list[str]:
    """A KubeRay RayJob: keys, the entrypoint (script, flags), the runtime env, the cluster it
    runs on, and that the job's resource flags fit that cluster."""
    problems = [] if doc.get("apiVersion") == KUBERAY_API else [f"apiVersion {doc.get('apiVersion')!r}: use {KUBERAY_API}"]
    if doc.get("kind") != "RayJob":
        problems.append(f"kind {doc.get('kind')!r} is not RayJob")
    if not (doc.get("metadata") or {}).get("name"):
        problems.append("metadata.name is missing")
    spec = doc.get("spec") or {}
    entrypoint = spec.get("entrypoint")
    if not isinstance(entrypoint, str) or not entrypoint.strip():
        return problems + ["spec.entrypoint is missing"]
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes must be true (GPU pods are not left running)")
    ttl = spec.get("ttlSecondsAfterFinished")
    if not isinstance(ttl, int) or ttl < 0:
        problems.append(f"ttlSecondsAfterFinished {ttl!r}: give seconds >= 0")
    try:
        env = yaml.safe_load(spec.get("runtimeEnvYAML", ""))
    except yaml.YAMLError as exc:
        env = None
        problems.append(f"runtimeEnvYAML does not parse: {' '.join(str(exc).split())[:200]}")
    if env is not None:
        problems += [f"runtimeEnvYAML: {p}" for p in check_runtime_env(env, remote_working_dir=True)]
    elif "runtimeEnvYAML" not in spec:
        problems.append("runtimeEnvYAML is missing (the cluster image does not have the project)")
    problems += check_entrypoint(entrypoint)
    cluster, found = resolve_cluster(spec, clusters)
    problems += found
    if cluster is not None:
        if spec.get("rayClusterSpec"):
            problems += check_cluster_spec(cluster)
        try:
            script, args = split_entrypoint(entrypoint)
        except ValueError:
            return problems  # reported by check_entrypoint
        problems += check_job_resources(script, args, cluster)
        if "s3://" in entrypoint:
            problems += check_s3_credentials(cluster)
    return problems


# ============================================================================= tests
ALL = manifests()
CLUSTERS = {(doc.get("metadata") or {}).get("name"): doc.get("spec") or {} for _, k, doc in ALL if k == "RayCluster"}


def test_cluster_folder_has_every_manifest_and_only_known_kinds():
    """Every YAML parses and is a launcher config, a runtime_env, a RayCluster or a RayJob."""
    kinds = [k for _, k, _ in ALL]
    assert [(i, doc.get("error")) for i, k, doc in ALL if k == "unparsable"] == []
    assert [i for i, k, _ in ALL if k == "unknown"] == []
    for kind in ("launcher", "runtime_env", "RayCluster", "RayJob"):
        assert kind in kinds, f"no {kind} in cluster/"
    scripts = sorted(split_entrypoint(doc["spec"]["entrypoint"])[0] for _, k, doc in ALL if k == "RayJob")
    assert scripts == ["jobs/explain.py", "jobs/tune.py"]
    assert classify({"kind": "Secret", "apiVersion": "v1"}) == "unknown"


@pytest.mark.parametrize("cfg", of_kind("launcher"))
def test_launcher_config(cfg):
    """The `ray up` config passes every launcher rule."""
    assert check_launcher(cfg) == []


@pytest.mark.parametrize("doc", of_kind("RayCluster"))
def test_raycluster_manifest(doc):
    """The RayCluster passes every cluster rule."""
    assert check_raycluster(doc) == []


@pytest.mark.parametrize("doc", of_kind("RayJob"))
def test_rayjob_manifest(doc):
    """Each RayJob: real script and flags, valid runtime env, resources that fit its cluster."""
    assert check_rayjob(doc, CLUSTERS) == []


@pytest.mark.parametrize("env", of_kind("runtime_env"))
def test_runtime_env_file(env):
    """cluster/runtime_env.yaml: valid, covers pyproject, uploads the package but not the venv or data."""
    assert check_runtime_env(env, remote_working_dir=False) == []
    # `ray job submit --working-dir .` uploads the checkout: the venv and git history stay home
    assert excluded_package_files(env["excludes"]) == []
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", env["excludes"])
    assert all(spec.match_file(p) for p in (".venv/bin/python", ".git/HEAD", "data/raw/a.dcm", "outputs/x/best.pt"))


@pytest.mark.parametrize("path", [pytest.param(p, id=p.relative_to(REPO).as_posix()) for p in sorted(CLUSTER.rglob("*"))
                                  if p.is_file()])
def test_no_credentials_in_cluster_files(path):
    """No key, secret or token in any file of cluster/, as text or as a literal YAML value."""
    text = path.read_text(encoding="utf-8")
    assert find_secrets_in_text(text) == []
    if path.suffix in (".yaml", ".yml"):
        for doc in load_documents(path):
            assert find_literal_secrets(doc) == []


def test_paper_sweep_fits_the_single_gpu_worker_type():
    """jobs/sweep-paper.yaml's trial (cpus_per_trial + gpus_per_trial) fits one 1-GPU node."""
    (cfg,) = [doc for _, k, doc in ALL if k == "launcher"]
    cpus, gpus = sweep_trial_resources(["--config", "jobs/sweep-paper.yaml"])
    assert gpus >= 1  # the paper's configuration is a GPU sweep
    one_gpu = [t["resources"] for n, t in cfg["available_node_types"].items()
               if n != cfg["head_node_type"] and t["resources"].get("GPU") == 1]
    assert any(r["CPU"] >= cpus and r["GPU"] >= gpus for r in one_gpu), (cpus, gpus, one_gpu)


# ----------------------------------------------------------------------------- the rules fail
def _the(kind: str) -> dict[str, Any]:
    return copy.deepcopy(next(doc for _, k, doc in ALL if k == kind))


def _rayjob(script: str) -> dict[str, Any]:
    return copy.deepcopy(next(doc for _, k, doc in ALL if k == "RayJob" and script in doc["spec"]["entrypoint"]))


def _has(problems: list[str], fragment: str) -> bool:
    return any(fragment in p for p in problems)


def _cases(table: list[tuple[Any, str]]) -> list[Any]:
    """(mutation, expected problem) rows as pytest params named by the expected problem."""
    return [pytest.param(m, f, id=f) for m, f in table]


def test_parse_help_reads_required_options_values_and_choices():
    opts = script_options("jobs/tune.py")
    assert {"--data", "--out"} <= opts.required and "--config" not in opts.required
    assert "--resume" in opts.options and "--resume" not in opts.takes_value
    assert opts.choices["--scheduler"] == ("fifo", "asha")
    assert "--gpus-per-trial" in opts.takes_value and "--gpus-per-trial" not in opts.takes_many
    assert "--backbones" in opts.takes_many


@pytest.mark.parametrize("mutate, fragment", _cases([
    (lambda c: c["available_node_types"]["ray.head.cpu"]["resources"].update(GPU=1), "the head must have none"),
    (lambda c: c["available_node_types"].pop("ray.worker.gpu4"), "no worker type with several GPUs"),
    (lambda c: c["available_node_types"].pop("ray.worker.gpu1"), "no worker type with exactly 1 GPU"),
    (lambda c: c["available_node_types"]["ray.worker.gpu4"]["resources"].update(GPU=8), "but g5.12xlarge has 4"),
    (lambda c: c.update(setup_commands=["pip install mammo-ray"]), "pip-installs the synced checkout"),
    (lambda c: c.update(file_mounts={}), "does not sync the repository root"),
    (lambda c: c["rsync_exclude"].append("data"), "rsync_exclude drops package files: mammo_ray/data/"),
    (lambda c: c["docker"].update(image="rayproject/ray:2.9.0-py311-gpu"), "Ray 2.9.0 is outside"),
    (lambda c: c.pop("head_node_type"), "missing key head_node_type"),
    (lambda c: c["available_node_types"]["ray.worker.gpu1"].update(resourcez={}), "ray-schema.json"),
]))
def test_launcher_rules_catch_broken_configs(mutate, fragment):
    cfg = _the("launcher")
    mutate(cfg)
    assert _has(check_launcher(cfg), fragment), check_launcher(cfg)


def _gpu_group(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["workerGroupSpecs"][0]


def _set_env(group: dict[str, Any], name: str, entry: dict[str, Any]) -> None:
    env = group["template"]["spec"]["containers"][0]["env"]
    env[[e["name"] for e in env].index(name)] = {"name": name, **entry}


@pytest.mark.parametrize("mutate, fragment", _cases([
    (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "use ray.io/v1"),
    (lambda d: _gpu_group(d["spec"])["rayStartParams"].update({"num-gpus": "2"}), "num-gpus 2 != nvidia.com/gpu limit 1"),
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
        {GPU_KEY: "1"}), "the head must have none"),
    (lambda d: d["spec"].pop("workerGroupSpecs"), "missing spec.workerGroupSpecs"),
    (lambda d: _gpu_group(d["spec"]).update(replicas=9), "minReplicas <= replicas <= maxReplicas"),
    (lambda d: d["spec"].update(rayVersion="2.59.0"), "!= rayVersion 2.59.0"),
    (lambda d: _set_env(_gpu_group(d["spec"]), "AWS_SECRET_ACCESS_KEY", {"value": "x"}),
     "AWS_SECRET_ACCESS_KEY does not come from a Secret"),
]))
def test_raycluster_rules_catch_broken_manifests(mutate, fragment):
    doc = _the("RayCluster")
    mutate(doc)
    assert _has(check_raycluster(doc), fragment), check_raycluster(doc)


@pytest.mark.parametrize("mutate, fragment", _cases([
    (lambda s: s.update(entrypoint=s["entrypoint"] + " --gpus-per-trail 1"), "--gpus-per-trail is not an option"),
    (lambda s: s.update(entrypoint=s["entrypoint"].replace("jobs/tune.py", "jobs/tunes.py")), "jobs/tunes.py: no such script"),
    (lambda s: s.update(entrypoint=s["entrypoint"].replace("--data ", "--config-dir ")), "required option --data is missing"),
    (lambda s: s.update(entrypoint=s["entrypoint"] + " --scheduler hyperband"), "--scheduler hyperband: use one of fifo, asha"),
    (lambda s: s.update(entrypoint=s["entrypoint"].replace("jobs/sweep-paper.yaml", "jobs/sweep-gpu.yaml")),
     "jobs/sweep-gpu.yaml: no such file"),
    (lambda s: s.update(entrypoint=s["entrypoint"].replace("--gpus-per-trial 1", "--gpus-per-trial 2")),
     "a trial needs 4 CPUs + 2 GPUs in one pod"),
    (lambda s: s.update(entrypoint=s["entrypoint"].replace("--cpus-per-trial 4", "--cpus-per-trial 16")),
     "a trial needs 16 CPUs + 1 GPUs"),
    (lambda s: s.update(runtimeEnvYAML="pip: [torch\n  env_vars: {"), "runtimeEnvYAML does not parse"),
    (lambda s: s.update(runtimeEnvYAML=s["runtimeEnvYAML"].replace("    - torch>=2.4,<2.15\n", "")), "pip misses pyproject dependencies: torch"),
    (lambda s: s.update(runtimeEnvYAML=s["runtimeEnvYAML"] + "  AWS_ENDPOINT_URL: http://minio:9000\n"),
     "env_vars AWS_ENDPOINT_URL"),
    (lambda s: s.update(runtimeEnvYAML=s["runtimeEnvYAML"].replace("  packages:\n", "  packages:\n    - ray[tune]==2.60.0\n")),
     "pip lists ray"),
    (lambda s: s.update(runtimeEnvYAML=s["runtimeEnvYAML"].replace(
        "s3://mammo-ray-artifacts/code/mammo_ray-0.1.0.zip", ".")), "a RayJob's submitter has no checkout"),
    (lambda s: s.update(runtimeEnvYAML=s["runtimeEnvYAML"].replace(".zip", "")), "Ray rejects the runtime_env"),
    (lambda s: s.pop("shutdownAfterJobFinishes"), "shutdownAfterJobFinishes must be true"),
    (lambda s: s.update(ttlSecondsAfterFinished="10m"), "ttlSecondsAfterFinished '10m'"),
    (lambda s: s.pop("rayClusterSpec"), "neither rayClusterSpec nor clusterSelector"),
    (lambda s: (s.pop("rayClusterSpec"), s.update(clusterSelector={"ray.io/cluster": "nope"})), "no RayCluster named 'nope'"),
]))
def test_rayjob_rules_catch_broken_tune_jobs(mutate, fragment):
    doc = _rayjob("jobs/tune.py")
    mutate(doc["spec"])
    assert _has(check_rayjob(doc, CLUSTERS), fragment), check_rayjob(doc, CLUSTERS)


@pytest.mark.parametrize("mutate, fragment", _cases([
    (lambda s: s.update(entrypoint=s["entrypoint"].replace("--method gradcam", "--method scorecam")),
     "--method scorecam: use one of gradcam"),
    (lambda s: s.update(entrypoint=s["entrypoint"] + " --gpus-per-trial 1"), "--gpus-per-trial is not an option"),
    (lambda s: s.update(entrypoint=s["entrypoint"].replace("--checkpoint ", "--weights ")),
     "required option --checkpoint is missing"),
    (lambda s: s.update(entrypoint=s["entrypoint"].replace("--workers 8", "--workers 9")), "= 4.5 GPUs > 4 GPUs"),
    (lambda s: _set_env(s["rayClusterSpec"]["workerGroupSpecs"][0], "AWS_ACCESS_KEY_ID", {"value": "x"}),
     "gpu-1: AWS_ACCESS_KEY_ID does not come from a Secret"),
]))
def test_rayjob_rules_catch_broken_explain_jobs(mutate, fragment):
    doc = _rayjob("jobs/explain.py")
    mutate(doc["spec"])
    assert _has(check_rayjob(doc, CLUSTERS), fragment), check_rayjob(doc, CLUSTERS)


def test_rayjob_can_run_on_the_raycluster_by_selector():
    doc = _rayjob("jobs/tune.py")
    doc["spec"].pop("rayClusterSpec")
    doc["spec"]["clusterSelector"] = {"ray.io/cluster": "mammo-ray"}
    assert check_rayjob(doc, CLUSTERS) == []


def test_tune_trial_resources_come_from_the_sweep_file_without_flags():
    spec = _rayjob("jobs/tune.py")["spec"]["rayClusterSpec"]
    assert sweep_trial_resources(["--config", "jobs/sweep-paper.yaml"]) == (4.0, 1.0)
    assert check_job_resources("jobs/tune.py", ["--config", "jobs/sweep-paper.yaml"], spec) == []
    _gpu_group(spec)["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "2"
    assert _has(check_job_resources("jobs/tune.py", ["--config", "jobs/sweep-paper.yaml"], spec), "a trial needs 4 CPUs")


@pytest.mark.parametrize("args, fragment", [
    (["--workers", "16", "--gpus-per-worker", "0.5"], "= 8 GPUs > 4 GPUs in the cluster"),
    (["--workers", "2", "--gpus-per-worker", "2"], "--gpus-per-worker 2 > 1 GPUs per worker pod"),
    (["--workers", "8"], "give --workers and --gpus-per-worker explicitly"),
])
def test_explain_resource_rule_catches_oversubscription(args, fragment):
    """Independent of jobs/explain.py's --help: only the resource flags are read."""
    spec = _rayjob("jobs/explain.py")["spec"]["rayClusterSpec"]
    assert check_job_resources("jobs/explain.py", ["--workers", "8", "--gpus-per-worker", "0.5"], spec) == []
    assert _has(check_job_resources("jobs/explain.py", args, spec), fragment)


def test_explain_capacity_counts_max_replicas_when_autoscaling():
    spec = copy.deepcopy(CLUSTERS["mammo-ray"])  # autoscaled: up to 8 one-GPU pods
    assert check_job_resources("jobs/explain.py", ["--workers", "16", "--gpus-per-worker", "0.5"], spec) == []
    spec["enableInTreeAutoscaling"] = False  # now only `replicas` (1) pods
    assert _has(check_job_resources("jobs/explain.py", ["--workers", "16", "--gpus-per-worker", "0.5"], spec),
                "> 1 GPUs in the cluster")


def test_runtime_env_rules_catch_an_unanchored_data_exclude():
    env = _the("runtime_env")
    env["excludes"] = ["data/"]  # would also drop mammo_ray/data/ from the upload
    assert _has(check_runtime_env(env, remote_working_dir=False), "excludes drop package files: mammo_ray/data/")


def test_secret_rules_catch_keys_in_text_and_yaml():
    key_id = "AKIA" + "ABCDEFGHIJKLMNOP"  # built here so that this file itself holds no key
    secret = "wJalrXUtnFEMI" + "K7MDENGbPxRfiCYEXAMPLEKEY"
    assert find_secrets_in_text(f"aws_access_key_id = {key_id}") == ["looks like a AWS access key id"]
    assert find_secrets_in_text(f"AWS_SECRET_ACCESS_KEY: {secret}") == ["looks like a AWS secret key value"]
    assert find_secrets_in_text("key: AWS_SECRET_ACCESS_KEY\n--from-literal=AWS_SECRET_ACCESS_KEY=...") == []
    env_entry = {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": secret}]}
    assert _has(find_literal_secrets(env_entry), "has a literal value; use valueFrom.secretKeyRef")
    job = {"spec": {"runtimeEnvYAML": f"env_vars:\n  RAY_AUTH_TOKEN: {secret}\n"}}
    assert _has(find_literal_secrets(job), "RAY_AUTH_TOKEN holds a literal value")
    assert find_literal_secrets({"env": [{"name": "AWS_SECRET_ACCESS_KEY",
                                          "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}) == []


# ============================================================================= patient key, weights
# Issue 26: the patient-key Secret the manifests read was never created, the launcher gave the
# nodes no key (so each cluster made its own), and the manifests cached ImageNet weights on the
# workers while `tune` reads them on its driver (the head).

def readme_shell_lines(text: str) -> list[str]:
    """The commands of the fenced code blocks of a Markdown text, continuation lines joined and
    comment lines dropped (a commented ``--from-literal`` is no key)."""
    lines: list[str] = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        pending = ""
        for raw in block.splitlines():
            line = raw.strip()
            if line.startswith("#"):
                continue
            pending += " " + line.rstrip("\\").strip()
            if not line.endswith("\\"):
                lines.append(pending.strip())
                pending = ""
    return [line for line in lines if line]


def secrets_created(text: str) -> dict[str, set[str]]:
    """Secret name -> its keys, for every ``kubectl create secret generic`` of a README."""
    created: dict[str, set[str]] = {}
    for line in readme_shell_lines(text):
        words = shlex.split(line, comments=True)
        if words[:4] != ["kubectl", "create", "secret", "generic"] or len(words) < 5:
            continue
        keys = created.setdefault(words[4], set())
        for w in words[5:]:
            for flag in ("--from-literal=", "--from-file="):
                if w.startswith(flag):
                    value = w[len(flag):]
                    keys.add(value.split("=", 1)[0] if "=" in value else os.path.basename(value))
    return created


def secret_refs(doc: Any, where: str = "") -> list[tuple[str, str, bool, str]]:
    """(secret, key, optional, where) of every ``secretKeyRef`` in a manifest."""
    found = []
    if isinstance(doc, dict):
        ref = doc.get("secretKeyRef")
        if isinstance(ref, dict):
            found.append((ref.get("name"), ref.get("key"), bool(ref.get("optional")), where))
        for k, v in doc.items():
            found += secret_refs(v, f"{where}.{k}" if where else str(k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += secret_refs(v, f"{where}[{i}]")
    return found


def check_secrets_created(docs: list[tuple[str, Any]], created: dict[str, set[str]]) -> list[str]:
    """Every Secret key a manifest reads without ``optional: true`` is created by the README's
    steps; otherwise the pod stays in CreateContainerConfigError."""
    problems = []
    for ident, doc in docs:
        for name, key, optional, _ in secret_refs(doc):
            if optional:
                continue
            if name not in created:
                problems.append(f"{ident}: Secret {name} is read but cluster/README.md never creates it")
            elif key not in created[name]:
                problems.append(f"{ident}: Secret {name} has no key {key} in cluster/README.md's command")
    return sorted(set(problems))


#: where mammo_ray reads the patient key by default (XDG_CONFIG_HOME unset), as a launcher path
DEFAULT_KEY_PATH = "~/.config/mammo-ray/patient.key"


def check_patient_key_mount(cfg: dict[str, Any]) -> list[str]:
    """The launcher copies one key file (the user's) to every node at the default key path."""
    mounts = cfg.get("file_mounts") or {}
    if DEFAULT_KEY_PATH not in mounts:
        return [f"file_mounts does not copy the patient key file to {DEFAULT_KEY_PATH}: each node's driver "
                "would create a key of its own"]
    if os.path.expanduser(str(mounts[DEFAULT_KEY_PATH])) != os.path.expanduser(DEFAULT_KEY_PATH):
        return [f"file_mounts copies {mounts[DEFAULT_KEY_PATH]} as the patient key: use your own key file, "
                f"{DEFAULT_KEY_PATH}, so the laptop and every cluster share it"]
    return []


def test_every_secret_a_manifest_reads_is_created_in_the_readme():
    created = secrets_created((CLUSTER / "README.md").read_text(encoding="utf-8"))
    kube = [(i, doc) for i, k, doc in ALL if k in ("RayCluster", "RayJob")]
    assert {"mammo-ray-s3", "mammo-ray-patient-key"} <= set(created)
    assert created["mammo-ray-patient-key"] == {"MAMMO_RAY_PATIENT_KEY"}
    refs = {name for _, doc in kube for name, *_ in secret_refs(doc)}
    assert "mammo-ray-patient-key" in refs  # the check below has something to check
    assert check_secrets_created(kube, created) == []


def test_secret_rule_catches_a_missing_secret_or_key():
    kube = [(i, doc) for i, k, doc in ALL if k in ("RayCluster", "RayJob")]
    before = secrets_created("```bash\nkubectl create secret generic mammo-ray-s3 \\\n"
                             "    --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...\n```\n")
    assert _has(check_secrets_created(kube, before), "Secret mammo-ray-patient-key is read but cluster/README.md never "
                                                      "creates it")
    wrong_key = {**before, "mammo-ray-patient-key": {"patient.key"}}
    assert _has(check_secrets_created(kube, wrong_key), "has no key MAMMO_RAY_PATIENT_KEY")


def test_launcher_gives_every_node_the_one_key_file():
    from mammo_ray.privacy import default_key_file

    cfg = of_kind("launcher")[0].values[0]
    assert check_patient_key_mount(cfg) == []
    # the mounted path is the one mammo_ray reads when nothing else is set
    with pytest.MonkeyPatch.context() as mp:
        for k in ("XDG_CONFIG_HOME", "MAMMO_RAY_PATIENT_KEY_FILE"):
            mp.delenv(k, raising=False)
        assert str(default_key_file()) == os.path.expanduser(DEFAULT_KEY_PATH)
    assert any("chmod 600 " + DEFAULT_KEY_PATH in c for c in cfg["setup_commands"])
    broken = copy.deepcopy(cfg)
    del broken["file_mounts"][DEFAULT_KEY_PATH]
    assert _has(check_patient_key_mount(broken), "does not copy the patient key file")
    broken["file_mounts"][DEFAULT_KEY_PATH] = "./patient.key"
    assert _has(check_patient_key_mount(broken), "use your own key file")


def _paper_weight_files() -> set[str]:
    from mammo_ray.config import SweepConfig
    from mammo_ray.models.weights import weights_url

    sweep = SweepConfig.load(str(REPO / "jobs" / "sweep-paper.yaml"))
    assert sweep.train.get("pretrained") == "imagenet"
    return {weights_url(b).rsplit("/", 1)[1] for b in sweep.backbones}


def check_weights_on_head(spec: dict[str, Any], files: set[str]) -> list[str]:
    """The tune driver runs on the head and reads the ImageNet weights there: the head fetches
    every file into a volume its Ray container mounts as TORCH_HOME; no worker fetches any."""
    problems = []
    head = spec["headGroupSpec"]["template"]["spec"]
    inits = head.get("initContainers") or []
    fetched = {f for c in inits for f in re.findall(r"[\w.-]+\.pth", json.dumps(c.get("command", [])))}
    if fetched != files:
        problems.append(f"head init containers fetch {sorted(fetched)}, the tune driver reads {sorted(files)}")
    container = head["containers"][0]
    torch_home = {e["name"]: e.get("value") for e in container.get("env", [])}.get("TORCH_HOME")
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    init_mounts = {m["mountPath"]: m["name"] for c in inits for m in c.get("volumeMounts", [])}
    if torch_home not in mounts or init_mounts.get(torch_home) != mounts.get(torch_home):
        problems.append(f"head TORCH_HOME {torch_home!r} is not the volume the init container fills")
    for group in spec["workerGroupSpecs"]:
        tmpl = group["template"]["spec"]
        if any(re.search(r"\.pth", json.dumps(c)) for c in tmpl.get("initContainers") or []):
            problems.append(f"{group['groupName']}: fetches ImageNet weights that no worker reads")
    return problems


def test_imagenet_weights_are_cached_where_tune_reads_them():
    """Both clusters that run `tune` give its driver (the head) the weights, and workers none;
    the launcher fills the head's cache with the driver's own resolve_weights."""
    files = _paper_weight_files()
    specs = [doc["spec"] for _, k, doc in ALL if k == "RayCluster"]
    specs += [doc["spec"]["rayClusterSpec"] for _, k, doc in ALL
              if k == "RayJob" and "jobs/tune.py" in doc["spec"]["entrypoint"]]
    assert len(specs) == 2
    for spec in specs:
        assert check_weights_on_head(spec, files) == []
    broken = copy.deepcopy(specs[0])
    broken["workerGroupSpecs"][0]["template"]["spec"]["initContainers"] = \
        broken["headGroupSpec"]["template"]["spec"].pop("initContainers")
    assert _has(check_weights_on_head(broken, files), "head init containers fetch []")
    assert _has(check_weights_on_head(broken, files), "fetches ImageNet weights that no worker reads")
    cfg = of_kind("launcher")[0].values[0]
    head = " ".join(cfg["head_setup_commands"])
    assert "resolve_weights" in head and all(b in head for b in ("'resnet50'", "'vgg19'"))
    assert not any(".pth" in c or "weights" in c for c in cfg.get("worker_setup_commands") or [])


def test_one_key_file_gives_the_same_patient_keys_on_every_cluster(ray_local, phantom_dir, tmp_path, monkeypatch):
    """The whole path: one key file; a launcher node reads it at the default path, a KubeRay
    head as MAMMO_RAY_PATIENT_KEY from the Secret made with --from-file (newline included).
    Both runs derive the same patient_key for every patient (and the same key id); a run with
    another key file shares none."""
    import pyarrow.parquet as pq

    from mammo_ray.config import PreprocessConfig
    from mammo_ray.data.pipeline import run_preprocess

    files = sorted((phantom_dir / "benign").glob("*.png"))[:3] + sorted((phantom_dir / "malignant").glob("*.png"))[:3]
    manifest = tmp_path / "in" / "labels.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,label,patient_id\n" + "".join(
        f"{f.parent.name}/{f.name},{f.parent.name},P{i % 4}\n" for i, f in enumerate(files)))
    for f in files:
        (manifest.parent / f.parent.name).mkdir(exist_ok=True)
        (manifest.parent / f.parent.name / f.name).write_bytes(f.read_bytes())
    key_text = "0123456789abcdef" * 4 + "\n"  # as `openssl rand -hex 32 >` writes it

    def keys(out) -> dict[str, str]:
        table = pq.ParquetDataset(sorted(str(p) for p in out.rglob("*.parquet"))).read(columns=["image_id", "patient_key"])
        return dict(zip(table["image_id"].to_pylist(), table["patient_key"].to_pylist()))

    def run(name: str) -> tuple[dict[str, str], str]:
        out = tmp_path / name
        run_preprocess([str(manifest)], str(out), PreprocessConfig.load(size=32))
        return keys(out), json.loads((out / "summary.json").read_text())["patient_key_id"]

    monkeypatch.delenv("MAMMO_RAY_PATIENT_KEY", raising=False)
    monkeypatch.delenv("MAMMO_RAY_PATIENT_KEY_FILE", raising=False)
    node_home = tmp_path / "launcher-node" / ".config"  # file_mounts' copy at the default path
    (node_home / "mammo-ray").mkdir(parents=True)
    (node_home / "mammo-ray" / "patient.key").write_text(key_text)
    (node_home / "mammo-ray" / "patient.key").chmod(0o600)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(node_home))
    launcher, launcher_id = run("launcher")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "kuberay-head"))  # no key file there
    monkeypatch.setenv("MAMMO_RAY_PATIENT_KEY", key_text)  # secretKeyRef of the --from-file Secret
    kuberay, kuberay_id = run("kuberay")
    assert len(launcher) == 6 and len(set(launcher.values())) == 4
    assert kuberay == launcher and kuberay_id == launcher_id
    assert not (tmp_path / "kuberay-head").exists()  # the head made no key of its own
    monkeypatch.setenv("MAMMO_RAY_PATIENT_KEY", "fedcba9876543210" * 4)
    other, other_id = run("other")
    assert other.keys() == launcher.keys() and not set(other.values()) & set(launcher.values())
    assert other_id != launcher_id
