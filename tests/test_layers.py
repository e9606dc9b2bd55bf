"""The architecture's rules, checked: the import layers (import-linter), a `--help` that
imports neither torch nor Ray, the registry's names known below the model layer, and job
entrypoints that only call the CLI."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def _lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(pythonpath), "PATH": str(BIN)}
    return subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_layers_contract_is_kept_and_breaking_it_fails(tmp_path):
    ok = _lint(REPO, REPO)
    assert ok.returncode == 0 and "1 kept, 0 broken" in ok.stdout, ok.stdout[-2000:] + ok.stderr[-2000:]
    # the same contract on a copy where evaluate imports train (a peer): broken
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "mammo_ray", copy / "mammo_ray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    target = copy / "mammo_ray" / "evaluate" / "report.py"
    target.write_text(target.read_text() + "\nfrom mammo_ray.train import loop  # noqa: E402,F401\n")
    bad = _lint(copy, copy)
    assert bad.returncode != 0, bad.stdout[-2000:]
    assert "mammo_ray.evaluate is not allowed to import mammo_ray.train" in bad.stdout


@pytest.mark.parametrize("argv", [[], ["preprocess"], ["train"], ["tune"], ["evaluate"], ["explain"], ["demo"],
                                  ["lr-find"], ["synth"]])
def test_help_imports_neither_torch_nor_ray(argv):
    code = ("import sys\nfrom mammo_ray.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('LOADED', 'torch' in sys.modules, 'ray' in sys.modules, 'torchvision' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, *argv, "--help"], capture_output=True, text=True, timeout=120,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage: " in r.stdout and r.stdout.strip().splitlines()[-1] == "LOADED False False False", r.stdout[-500:]


def test_cpu_task_modules_import_no_torch():
    """Ray imports a task function's module in every worker process that runs it: the archive
    jobs' read/write tasks and the preprocess job's must not pull torch (4-6 CPU-s and ~600 MB
    per CPU worker), scipy or scikit-learn in with them."""
    from mammo_ray.explain import archive, job, score, tasks

    used = {archive.prepare_batch, job.write_batch, job.write_score_batch, score.write_score_batch}
    assert {f.__module__ for f in used} == {"mammo_ray.explain.tasks"}
    assert all(getattr(tasks, f.__name__) is f for f in used)
    code = ("import sys, mammo_ray.explain.tasks, mammo_ray.data.pipeline\n"
            "print('LOADED', *(m in sys.modules for m in ('torch', 'torchvision', 'scipy', 'sklearn')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "LOADED False False False False", r.stdout[-500:]


def test_help_wall_time_against_bare_python():
    """`mammo-ray --help` against `python -c pass` in the same run (the figure in docs/benchmarks.md)."""
    def best(cmd: list[str]) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run(cmd, capture_output=True, timeout=120, check=True)
            times.append(time.perf_counter() - t)
        return min(times)

    bare = best([sys.executable, "-c", "pass"])
    cli = best([str(BIN / "mammo-ray"), "--help"])
    print(f"mammo-ray --help {cli:.2f} s vs python -c pass {bare:.2f} s")
    assert cli < bare + 2.0  # torch alone costs about 2 s to import here


def test_config_knows_the_registrys_backbones():
    """In a fresh process (other tests register backbones of their own): the registry ships
    exactly the names config lists; a later registration is accepted by configs too."""
    code = ("from mammo_ray.config import BUILTIN_BACKBONES, backbone_names\n"
            "from mammo_ray.models.registry import list_backbones\n"
            "print(sorted(BUILTIN_BACKBONES) == list_backbones() == backbone_names())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.stdout.strip() == "True", r.stdout + r.stderr[-2000:]


def test_job_entrypoints_only_call_the_cli():
    for path in sorted((REPO / "jobs").glob("*.py")):
        tree = ast.parse(path.read_text())
        used = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("mammo_ray")}
        used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if a.name.startswith("mammo_ray")}
        assert used == {"mammo_ray.smoke"}, (path.name, used)


def test_evaluate_threshold_renamed_and_configs_load_from_yaml(tmp_path, capsys):
    """evaluate's rule is --threshold-method; its old --threshold spelling is refused with the
    new one (explain's --threshold stays a probability). Evaluate and explain configs load from
    YAML like the others, with flags on top and unknown keys refused."""
    from mammo_ray.cli import main
    from mammo_ray.config import EvaluateConfig, ExplainConfig

    code = None
    try:
        main(["evaluate", "--checkpoint", "c.pt", "--data", "d", "--out", "o", "--threshold", "youden"])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "--threshold youden" in err and "--threshold-method" in err, err
    y = tmp_path / "e.yaml"
    y.write_text("threshold_method: sensitivity\nn_boot: 50\n")
    assert EvaluateConfig.load(str(y), n_boot=7) == EvaluateConfig(threshold_method="sensitivity", n_boot=7)
    y.write_text("method: layercam\ntop_n: 4\n")
    assert ExplainConfig.load(str(y), top_n=None) == ExplainConfig(method="layercam", top_n=4)
    y.write_text("n_boots: 5\n")
    import pytest as _pytest

    with _pytest.raises(ValueError, match="n_boots"):
        EvaluateConfig.load(str(y))
    with _pytest.raises(ValueError, match="threshold_method='otsu'"):
        EvaluateConfig(threshold_method="otsu")


def test_no_function_over_60_lines_and_no_module_over_400():
    """The size rules of the architecture (data/synth.py, a drawing module, is exempt)."""
    too_long = []
    for path in sorted((REPO / "mammo_ray").rglob("*.py")):
        if path.name == "synth.py":
            continue
        text = path.read_text()
        if len(text.splitlines()) > 400:
            too_long.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}")
    assert not too_long, too_long
