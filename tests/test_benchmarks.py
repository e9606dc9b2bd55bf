"""Every benchmark runs (``--smoke-test``: tiny sizes) and prints its JSON object with the
ratios docs/benchmarks.md quotes; the figures themselves are not asserted (shared, noisy machines)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

RATIO_KEYS = {"preprocess": "ray_vs_loop", "train": None, "tune": None, "evaluate": None,
              "explain": "cam_vs_naive", "realdata": None, "train_scale": "stream_vs_memory_min"}


def _bench(name: str):
    """benchmarks/<name>.py imported as a module (the folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _printed_json(capsys) -> dict:
    # the benchmark's own object is printed last, indented, from a line holding only "{"
    text = "\n" + capsys.readouterr().out
    return json.loads(text[text.rindex("\n{\n"):text.rindex("}") + 1])


@pytest.mark.parametrize("name", sorted(RATIO_KEYS))
def test_benchmark_smoke_test_prints_json(name, ray_local, tmp_path, monkeypatch, capsys):
    """In this process, on the session's Ray (each benchmark leaves a Ray it did not start
    running): a subprocess per benchmark would pay an interpreter, a torch import and a Ray
    start each. ``python benchmarks/<name>.py --smoke-test`` runs the same ``main``."""
    import torch

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        bench = _bench(name)
        extra = ["--tta", "vflip"] if name == "realdata" else []  # evaluate's option passed through
        returned = bench.main(bench.get_args_parser().parse_args(["--smoke-test", *extra]))
    finally:
        torch.set_num_threads(threads)  # benchmarks pin the thread count of the model they time
    result = _printed_json(capsys)
    assert isinstance(result, dict) and result
    assert result == json.loads(json.dumps(returned, default=str))
    key = RATIO_KEYS[name]
    if key:
        assert result[key] > 0
    if name == "realdata":  # every stage ran on the pretrained backbone: a row per checkpoint, CAMs scored
        assert result["smoke_test"] and len(result["rows"]) >= 2 and result["localization"]["n"] > 0
        # the smoke plan: seeds 0 and 1, a random-init baseline for seed 0 only (--random-seeds 0)
        assert {(r["init"], r["seed"]) for r in result["rows"]} == {("imagenet", 0), ("random", 0), ("imagenet", 1)}
        assert len({r["checkpoint"] for r in result["rows"]}) == 3  # three scores folders, none overwritten
        # per seed with a baseline, pretrained minus random init paired on the same test images
        assert [p["seed"] for p in result["pretrained_minus_random_paired"]] == [0]
        for p, seed in zip(result["pretrained_minus_random_paired"], (0,), strict=True):
            rows = {r["init"]: r["test_auc"] for r in result["rows"] if r["seed"] == seed}
            # from the 6-decimal scores files, so equal to the AUCs of metrics.json up to their rounding
            assert p["delta"] == pytest.approx(rows["imagenet"] - rows["random"], abs=1e-3)
            assert p["resampled"] == "patients" and p["n"] > 0  # phantoms' few test patients: the interval may be None
        assert {k: v["n_seeds"] for k, v in result["mean_over_seeds"].items()} == {"imagenet": 2, "random": 1}
        assert result["mean_over_seeds"]["imagenet"]["test_auc_sd"] is not None  # a spread over 2 seeds
        assert result["tta"] == "vflip"
        assert json.loads((Path(result["out"]) / "evaluate" / "metrics.json").read_text())["tta"] == "vflip"
    if name == "explain":
        assert result["max_abs_diff_vs_naive_maps"] < 1e-4 and result["job_images_per_s"] > 0
    if name == "train_scale":  # every ratio of the issue, each from real Ray Train runs of this process
        for ratio in result["targets"]:
            assert result[ratio] > 0, ratio
        assert set(result["stream_vs_memory"]) == {"64"} and set(result["freeze_speedup"]) == {"2"}
        assert set(result["peak_memory_ratio"]) == {"driver", "train_worker"}
        # a configuration two figures share ran once: stream N and 4N, memory 2 workers at 0.5 and 0, 1 worker
        assert len(result["runs"]) == 5 and {r["ingest"] for r in result["runs"]} == {"memory", "stream"}
        for run in result["runs"]:  # the sampler found the run's Ray Train workers among this process's Ray
            assert run["peak_memory"]["train_worker_processes"] >= run["workers"]
            assert run["peak_memory"]["train_worker"]["rss_mb"] > 0 and run["images_per_s"] > 0


def test_benchmark_script_runs_as_a_script(tmp_path):
    """One benchmark as users run it, a script in its own process (the others share ``main``)."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "evaluate.py"), "--smoke-test"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    text = "\n" + r.stdout
    assert json.loads(text[text.rindex("\n{\n"):text.rindex("}") + 1])["batched_images_per_s"] > 0


def test_archive_benchmark_smoke_test_in_process(ray_local, capsys):
    """benchmarks/archive.py on the session's Ray (three small jobs; a subprocess would start its
    own Ray): score at N and 4N, top:K against score, the per-stage profile."""
    archive = _bench("archive")
    result = archive.main(archive.get_args_parser().parse_args(["--smoke-test"]))
    assert len(result["score"]["wall_s"]) == 2 and "explain_all" not in result
    assert result["top_vs_score"] > 0 and result["explain_top"]["k"] >= 1
    assert set(result["score"]["stage_seconds_large"]) == {"decode_preprocess", "model", "write"}
    assert _printed_json(capsys) == json.loads(json.dumps(result))


def test_gpu_script_dry_run_checks_every_step():
    """`benchmarks/gpu.sh --dry-run` on this CPU machine: every step's command exists and its
    flags parse (nothing runs); a step with a flag its parser refuses is reported."""
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in r.stdout.strip().splitlines() if ": " in line)
    for name in ("train-resnet50-amp", "train-vgg19-fp32", "explain", "tune", "realdata-preprocess-640",
                 "realdata-tune-640", "realdata-evaluate-640", "ddp-tune", "train-scale"):
        assert lines.get(name) == "ok", r.stdout
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    bad = {**gpu.steps("/tmp/x")[0]}
    bad["argv"] = [*bad["argv"], "--amp-dtype", "fp8"]
    assert "do not parse" in gpu.check(bad)
    tune = next(s for s in gpu.steps("/tmp/x") if s["name"] == "tune")
    assert "--gpus-per-trial" in tune["argv"] and tune["argv"][tune["argv"].index("--gpus-per-trial") + 1] == "0.25"

    def flag(step: dict, name: str) -> str:
        return step["argv"][step["argv"].index(name) + 1]

    # the DDP and streamed steps: one worker per GPU of the machine (1 in a dry run)
    for gpus in (1, 4):
        plan = {s["name"]: s for s in gpu.steps("/tmp/x", gpus=gpus, cpus=16)}
        assert flag(plan["ddp-tune"], "--workers") == flag(plan["train-scale"], "--workers") == str(gpus)
        assert flag(plan["ddp-tune"], "--ingest") == "stream" and flag(plan["ddp-tune"], "--gpus-per-worker") == "1"
        assert float(flag(plan["realdata-tune-640"], "--gpus-per-trial")) == min(1.0, gpus / 5)
    real = {s["name"]: s for s in gpu.steps("/tmp/x", shared=Path("/nowhere"))}
    assert flag(real["realdata-preprocess-640"], "--size") == "640"
    assert flag(real["realdata-tune-640"], "--backbones") == "efficientnet_lite0"
    assert flag(real["realdata-tune-640"], "--pretrained") == "imagenet"
    assert flag(real["realdata-evaluate-640"], "--n-boot") == "1000"
    assert "--data" not in real["train-scale"]["argv"] and "scale-preprocess-224" not in real  # synthetic rows
    assert all(real[f"realdata-{s}-full"]["optional"] for s in ("preprocess", "tune", "evaluate"))


def test_gpu_script_skips_steps_past_the_deadline(tmp_path, monkeypatch):
    """The GPU run's bookkeeping, on stand-in steps: a step past its budget is stopped (exit 124)
    and its dependants skipped; a step that would not fit before the deadline, an optional step
    whose whole budget does not fit, and a real-data step without the shared data are skipped
    with the reason; the JSON records each."""
    gpu = _bench("gpu")
    py = sys.executable

    def step(name, code, budget, **extra):
        return {"name": name, "kind": "cli", "argv": [py, "-c", code], "budget_s": budget, **extra}

    plan = [step("quick", "pass", 30), step("stuck", "import time; time.sleep(60)", 2),
            step("after-stuck", "pass", 30, needs=["stuck"]), step("big", "pass", 300, min_s=200),
            step("extra", "pass", 60, optional=True), step("real", "pass", 30, needs_data=True),
            step("last", "pass", 30)]
    monkeypatch.setattr(gpu, "steps", lambda work, **kw: plan)
    monkeypatch.setenv("MAMMO_RAY_SHARED_DATA", str(tmp_path / "no-shared"))
    out = tmp_path / "gpu.json"
    t0 = time.perf_counter()
    code = gpu.main(gpu.get_args_parser().parse_args(["--deadline", "50", "--out", str(out)]))
    assert time.perf_counter() - t0 < 40 and code == 1  # the stuck step failed the run
    got = {r["name"]: r for r in json.loads(out.read_text())["steps"]}
    assert got["quick"]["returncode"] == 0 and got["last"]["returncode"] == 0
    assert got["stuck"]["returncode"] == 124 and got["stuck"]["timed_out"]
    assert got["after-stuck"]["skipped"] == "needs stuck, which failed"
    assert "before the deadline" in got["big"]["skipped"] and "before the deadline" in got["extra"]["skipped"]
    assert "no breast-cancer-detection-640/labels.csv" in got["real"]["skipped"]
    assert gpu.shared_data() == (tmp_path / "no-shared").resolve()


def test_realdata_trial_plan_pairs_each_baseline_with_its_seed():
    """The ratio sweep first; a random-init baseline only for the seeds asked (run 7 ran three
    pretrained seeds and one baseline); a baseline without its pretrained seed is refused."""
    plan = _bench("realdata").trial_plan
    assert plan([0]) == [("sweep-imagenet", "imagenet", 0), ("sweep-random", "random", 0)]
    assert plan([0, 1, 2], [0]) == [("sweep-imagenet", "imagenet", 0), ("sweep-random", "random", 0),
                                    ("sweep-imagenet-s1", "imagenet", 1), ("sweep-imagenet-s2", "imagenet", 2)]
    assert plan([3, 4], [4]) == [("sweep-imagenet", "imagenet", 3), ("sweep-imagenet-s4", "imagenet", 4),
                                 ("sweep-random-s4", "random", 4)]
    assert [p[1] for p in plan([0, 1], [])] == ["imagenet", "imagenet"]
    with pytest.raises(SystemExit, match=r"--random-seeds 5: not among --seeds 0 1 "):
        plan([0, 1], [1, 5])
