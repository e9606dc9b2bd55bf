"""Every GPU figure in one go, for the few minutes a GPU is lent (`benchmarks/gpu.sh`).

    bash benchmarks/gpu.sh                 # on the GPU machine, after `make venv`
    bash benchmarks/gpu.sh --dry-run       # anywhere: every step's command exists and parses (CI)
    bash benchmarks/gpu.sh --deadline 600 --shared-data shared/data

Steps (each a command of this repository, run in order; G is `torch.cuda.device_count()` at run
time, 1 in a dry run):
  train-*      benchmarks/train.py: resnet50 and vgg19 train steps at freezing 0, 0.5 and 1.0,
               224 px, channels_last, with AMP (bf16) and without; peak GPU memory per ratio
  explain      benchmarks/explain.py on the GPU with AMP: the CAM stage against bare inference,
               and the whole explain job on a GPU actor
  realdata-*-640
               the real-data experiment (the shared digital set, ../shared/data): preprocess at
               640 px (patient-grouped 70:15:15, std 0.5), a Tune sweep of ImageNet-pretrained
               efficientnet_lite0 (the one EfficientNet-Lite backbone registered) over freezing
               0 / 0.25 / 0.5 / 0.75 / 1, 2 epochs, 5 trials sharing the GPUs, then `mammo-ray
               evaluate` of every ratio's best checkpoint with patient-bootstrap CIs (test split)
  tune         a real 4-trial sweep at 0.25 GPU per trial (`mammo-ray tune`) on phantoms, with
               GPU utilisation sampled by nvidia-smi every second
  ddp-tune     a sweep whose trial is a G-worker DDP run (`--workers G --gpus-per-worker 1`, nccl)
               with the streamed ingest (Ray Data), on the same phantoms
  scale-preprocess-224/-512, train-scale
               benchmarks/train_scale.py on the GPU (G workers, 1 GPU each): streamed over
               in-memory images/s on the shared set at 224 and 512 px, peak memory at N and 4N
               rows, freezing 0.5 over 0 (and G over 1 worker where G > 1)
  realdata-*-full
               the sweep and evaluation again at the set's full resolution (the size in its
               labels.csv), only if minutes remain, and skipped where that is 640 px already
Each step has a time budget (its timeout) and the whole run a deadline (--deadline, default 12
minutes: the lease is 15, the machine's start and the copies take the rest): a step starts only
while at least its ``min_s`` remain before the deadline, and runs at most until it; later steps
are recorded as skipped, with the reason, as are steps whose inputs failed or were skipped. The
budgets are caps, not measurements. The shared data: --shared-data, else $MAMMO_RAY_SHARED_DATA,
else ../shared/data beside the repository, else shared/data inside it (the GPU machine's copy
of the working tree carries shared/); without the digital set the real-data steps are skipped
and train-scale uses synthetic rows.
Writes one JSON file (--out, default gpu-results.json) and prints a summary table whose rows go
into docs/benchmarks.md's GPU section as they are. (Scoring's steady state joins when `mammo-ray score`
lands: the archive-scale issue.)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
MAMMO_RAY = str(Path(sys.executable).with_name("mammo-ray"))


DIGITAL = "breast-cancer-detection-640"
REAL_SIZE = 640


def shared_data(flag: str | None = None) -> Path:
    """The shared data folder: the flag, else $MAMMO_RAY_SHARED_DATA, else ../shared/data beside
    the repository, else shared/data inside it (what the GPU machine's copy carries)."""
    chosen = flag or os.environ.get("MAMMO_RAY_SHARED_DATA")
    if chosen:
        return Path(chosen).resolve()
    beside, inside = REPO.parent / "shared" / "data", REPO / "shared" / "data"
    return beside if beside.exists() or not inside.exists() else inside


def native_size(labels_csv: Path) -> int | None:
    """The largest side of the digital set's images, from its labels.csv ``width``/``height``
    columns (None where the file or the columns are missing)."""
    import csv

    try:
        with open(labels_csv, newline="") as f:
            sides = [max(int(r["width"]), int(r["height"])) for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        return None
    return max(sides) if sides else None


def gpu_count(dry_run: bool) -> int:
    """GPUs of this machine at run time; 1 in a dry run (the plan of a one-GPU machine)."""
    if dry_run:
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def _realdata_steps(work: str, labels: Path, size: int, tag: str, gpus: int, cpus: int, *,
                    optional: bool = False, skip: str | None = None) -> list[dict]:
    """Preprocess the digital set at ``size``, sweep efficientnet_lite0 over five freezing ratios,
    evaluate each ratio's best checkpoint with CIs."""
    data, sweep = os.path.join(work, f"real{tag}"), os.path.join(work, f"sweep{tag}")
    trials = 5
    extra = {"optional": optional, **({"skip": skip} if skip else {})}
    return [
        {"name": f"realdata-preprocess-{tag}", "kind": "setup", "budget_s": 150, "needs_data": True, **extra,
         "argv": [MAMMO_RAY, "preprocess", str(labels), "--out", data, "--size", str(size),
                  "--ratios", "0.7", "0.15", "0.15", "--std", "0.5"]},
        {"name": f"realdata-tune-{tag}", "kind": "cli", "gpu_sampling": True, "budget_s": 300, "min_s": 180,
         "needs": [f"realdata-preprocess-{tag}"], "report": os.path.join(sweep, "summary.json"), **extra,
         "argv": [MAMMO_RAY, "tune", "--data", data, "--out", sweep, "--backbones", "efficientnet_lite0",
                  "--pretrained", "imagenet", "--freeze-ratios", "0", "0.25", "0.5", "0.75", "1",
                  "--lr-bounds", "1e-4:1e-3", "--epochs", "2", "--step-size-epochs", "1", "--batch-size", "32",
                  "--patience", "0", "--gpus-per-trial", f"{min(1.0, gpus / trials):g}",
                  "--cpus-per-trial", str(max(1, (cpus - 1) // trials))]},
        {"name": f"realdata-evaluate-{tag}", "kind": "cli", "budget_s": 120, "min_s": 60,
         "needs": [f"realdata-tune-{tag}"], "report": os.path.join(work, f"eval{tag}", "metrics.json"), **extra,
         "argv": [MAMMO_RAY, "evaluate", "--sweep", sweep, "--data", data, "--out", os.path.join(work, f"eval{tag}"),
                  "--n-boot", "1000"]},
    ]


def steps(work: str, *, gpus: int = 1, cpus: int | None = None, shared: Path | None = None) -> list[dict]:
    """The commands, in order: (name, argv, kind) and the step's time budget. ``kind``: "bench"
    prints a JSON object last; "cli" is a mammo-ray command; "setup" prepares data. ``budget_s``:
    its timeout; ``min_s``: the least time left before the deadline for it to start (default half
    its budget); ``needs``: steps that must have succeeded first; ``needs_data``: the shared
    digital set; ``optional``: runs only when its whole budget fits; ``skip``: why it never runs
    here; ``report``: a JSON file whose figures join the step's result. ``gpus``: the workers of
    the DDP steps (one per GPU)."""
    cpus = cpus or os.cpu_count() or 1
    shared = shared if shared is not None else shared_data()
    labels = shared / DIGITAL / "labels.csv"
    out: list[dict] = []
    for backbone in ("resnet50", "vgg19"):
        for amp in ("--amp", "--no-amp"):
            out.append({"name": f"train-{backbone}{'-amp' if amp == '--amp' else '-fp32'}", "kind": "bench",
                        "budget_s": 60,
                        "argv": [PY, str(REPO / "benchmarks" / "train.py"), "--backbone", backbone, "--size", "224",
                                 "--batch-size", "64", "--steps", "20", "--device", "cuda", amp]})
    out.append({"name": "explain", "kind": "bench", "budget_s": 90,
                "argv": [PY, str(REPO / "benchmarks" / "explain.py"), "--device", "cuda", "--amp", "--images", "256",
                         "--batch-size", "64", "--job-images", "512", "--repeats", "3"]})
    out += _realdata_steps(work, labels, REAL_SIZE, str(REAL_SIZE), gpus, cpus)
    phantoms, data = os.path.join(work, "phantoms"), os.path.join(work, "data")
    out.append({"name": "tune-synth", "kind": "setup", "budget_s": 45,
                "argv": [MAMMO_RAY, "synth", "--out", phantoms, "--n", "400"]})
    out.append({"name": "tune-preprocess", "kind": "setup", "budget_s": 60, "needs": ["tune-synth"],
                "argv": [MAMMO_RAY, "preprocess", phantoms, "--out", data, "--size", "224"]})
    out.append({"name": "tune", "kind": "cli", "gpu_sampling": True, "budget_s": 150, "min_s": 90,
                "needs": ["tune-preprocess"],
                "argv": [MAMMO_RAY, "tune", "--data", data, "--out", os.path.join(work, "sweep"),
                         "--backbones", "resnet50", "--freeze-ratios", "0", "0.25", "0.5", "0.75",
                         "--lr-bounds", "1e-4:1e-3", "--epochs", "3", "--gpus-per-trial", "0.25",
                         "--cpus-per-trial", "2"]})
    per_worker = max(1, min(4, (cpus - 2) // gpus))  # CPUs left over for Ray Data's reads
    out.append({"name": "ddp-tune", "kind": "cli", "gpu_sampling": True, "budget_s": 120, "min_s": 60,
                "needs": ["tune-preprocess"], "report": os.path.join(work, "ddp-sweep", "summary.json"),
                "argv": [MAMMO_RAY, "tune", "--data", data, "--out", os.path.join(work, "ddp-sweep"),
                         "--backbones", "resnet50", "--pretrained", "none", "--freeze-ratios", "0", "0.5",
                         "--epochs", "2", "--patience", "0", "--batch-size", "64", "--workers", str(gpus),
                         "--gpus-per-worker", "1", "--cpus-per-worker", str(per_worker), "--ingest", "stream"]})
    scale = [PY, str(REPO / "benchmarks" / "train_scale.py"), "--device", "cuda", "--workers", str(gpus),
             "--gpus-per-worker", "1", "--cpus-per-worker", str(per_worker), "--backbone", "resnet18",
             "--rows", "256", "--memory-size", "512", "--epochs", "2", "--batch-size", "64"]
    needs: list[str] = []
    if labels.exists():  # the figure is on the shared set; synthetic rows where it is missing
        for size in (224, 512):
            folder = os.path.join(work, f"scale{size}")
            out.append({"name": f"scale-preprocess-{size}", "kind": "setup", "budget_s": 90, "needs_data": True,
                        "argv": [MAMMO_RAY, "preprocess", str(labels), "--out", folder, "--size", str(size),
                                 "--ratios", "0.7", "0.15", "0.15"]})
            needs.append(f"scale-preprocess-{size}")
        scale += ["--data", os.path.join(work, "scale224"), os.path.join(work, "scale512")]
    out.append({"name": "train-scale", "kind": "bench", "gpu_sampling": True, "budget_s": 240, "min_s": 120,
                "needs": needs, "argv": scale})
    full = native_size(labels)
    skip = (None if full and full != REAL_SIZE else
            f"the set's images are {full}x{full}: {REAL_SIZE} px is its full resolution (realdata-*-{REAL_SIZE})"
            if full else f"{labels}: no width/height to read the full resolution from")
    out += _realdata_steps(work, labels, full or REAL_SIZE, "full", gpus, cpus, optional=True, skip=skip)
    return out


def _parser_of(script: Path) -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(script.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(script.parent))
    return module.get_args_parser()


def check(step: dict) -> str | None:
    """Why a step's command would not run (missing script or executable, flags its parser
    refuses), or None. Parses only: nothing is executed."""
    argv = step["argv"]
    if argv[0] == PY:
        script = Path(argv[1])
        if not script.exists():
            return f"{script} not found"
        parser, args = _parser_of(script), argv[2:]
    else:
        if not shutil.which(argv[0]) and not os.path.exists(argv[0]):
            return f"{argv[0]} not found (install with `make venv`)"
        from mammo_ray.cli import get_args_parser

        parser, args = get_args_parser(), argv[1:]
    try:
        parser.parse_args(args)
    except SystemExit as exc:
        return f"its flags do not parse (exit {exc.code}): {' '.join(args)}"
    return None


def sample_gpu(stop: threading.Event, samples: list[dict]) -> None:
    """nvidia-smi once a second: utilisation and memory of every GPU."""
    while not stop.is_set():
        r = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True)
        for line in r.stdout.strip().splitlines():
            i, util, mem = (x.strip() for x in line.split(","))
            samples.append({"t": time.time(), "gpu": int(i), "util": float(util), "mem_mb": float(mem)})
        stop.wait(1.0)


def last_json(text: str) -> dict | None:
    """The object a benchmark prints last (from a line holding only "{")."""
    text = "\n" + text
    try:
        return json.loads(text[text.rindex("\n{\n"):text.rindex("}") + 1])
    except ValueError:
        return None


def report_figures(step: dict) -> dict | None:
    """The figures of a step's ``report`` file: a sweep's best trial, or evaluate's AUC and CI per
    checkpoint on each set."""
    path = step.get("report")
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        data = json.load(f)
    if "checkpoints" in data:  # evaluate's metrics.json
        rows = []
        for ck in data["checkpoints"]:
            for name, res in (ck.get("sets") or {}).items():
                ci = ((res.get("ci") or {}).get("roc_auc")) or {}
                rows.append({"checkpoint": ck.get("tag"), "freeze_ratio": ck.get("freeze_ratio"), "set": name,
                             "n": res.get("n"), "roc_auc": (res.get("metrics") or {}).get("roc_auc"),
                             "ci": [ci.get("low"), ci.get("high")],
                             "val_auc": (ck.get("train_metrics") or {}).get("val_auc")})
        return {"evaluate": rows}
    return {"sweep": {k: data.get(k) for k in ("trials", "errors", "best")}}


def run(step: dict, timeout: float) -> dict:
    samples: list[dict] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_gpu, args=(stop, samples), daemon=True)
    if step.get("gpu_sampling") and shutil.which("nvidia-smi"):
        sampler.start()
    t0 = time.perf_counter()
    # a session of its own: a step past its budget is stopped with everything it started (Ray)
    proc = subprocess.Popen(step["argv"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        code, timed_out = proc.returncode, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        code, timed_out = 124, True
    stop.set()
    res = {"name": step["name"], "returncode": code, "seconds": round(time.perf_counter() - t0, 1),
           "budget_s": round(timeout, 1)}
    if timed_out:
        res["timed_out"] = True
    if code:
        res["stderr_tail"] = (stderr or "")[-2000:]
    if step["kind"] == "bench":
        res["result"] = last_json(stdout or "")
    figures = report_figures(step) if not code else None
    if figures:
        res["result"] = figures
    if samples:
        busy = [s["util"] for s in samples]
        res["gpu_utilisation"] = {"mean": round(sum(busy) / len(busy), 1), "max": max(busy), "samples": len(busy),
                                  "peak_mem_mb": max(s["mem_mb"] for s in samples)}
    return res


def why_skip(step: dict, done: dict[str, dict], left: float, shared: Path) -> str | None:
    """Why ``step`` does not start: its own reason, the shared data missing, a needed step that
    did not succeed, or too little time before the deadline (``left`` seconds)."""
    if step.get("skip"):
        return step["skip"]
    if step.get("needs_data") and not (shared / DIGITAL / "labels.csv").exists():
        return f"no {DIGITAL}/labels.csv under {shared} (--shared-data or MAMMO_RAY_SHARED_DATA)"
    for need in step.get("needs", []):
        prior = done.get(need)
        if prior is None or prior.get("skipped") or prior.get("returncode"):
            return f"needs {need}, which {'was skipped' if prior and prior.get('skipped') else 'failed'}"
    least = step["budget_s"] if step.get("optional") else step.get("min_s", step["budget_s"] / 2)
    if left < least:
        return f"{left:.0f} s left before the deadline, the step needs at least {least:.0f} s"
    return None


def summary_rows(results: list[dict]) -> list[str]:
    rows = ["| step | figure |", "|---|---|"]
    for r in results:
        res = r.get("result") or {}
        if r.get("skipped"):
            fig = f"skipped: {r['skipped']}"
        elif r.get("timed_out"):
            fig = f"stopped at its budget ({r['budget_s']} s)"
        elif r["returncode"]:
            fig = f"failed (exit {r['returncode']})"
        elif r["name"].startswith("train-"):
            ips = res.get("images_per_s", {})
            fig = (f"{' / '.join(f'{v:.0f}' for v in ips.values())} img/s at freezing {' / '.join(ips)}; peak GPU MB "
                   f"{res.get('peak_gpu_memory_mb')}")
        elif r["name"] == "explain":
            fig = (f"CAM {res.get('cam_images_per_s')} img/s vs bare {res.get('bare_forward_images_per_s')} "
                   f"({res.get('cam_vs_bare_forward')}); whole job {res.get('job_images_per_s')} img/s")
        elif r["name"] == "train-scale":
            fig = (f"stream/memory {res.get('stream_vs_memory')}; peak memory 4N/N {res.get('peak_memory_ratio')}; "
                   f"freezing 0.5/0 {res.get('freeze_speedup')}; {res.get('workers')} workers/1 "
                   f"{res.get('workers_speedup')}")
        elif r["name"].startswith("realdata-evaluate"):
            fig = "; ".join(f"r={e['freeze_ratio']} {e['set']} AUC {e['roc_auc']:.3f} [{e['ci'][0]}, {e['ci'][1]}]"
                            for e in res.get("evaluate", []) if e.get("roc_auc") is not None) + f" ({r['seconds']} s)"
        elif "sweep" in res:
            fig = f"{r['seconds']} s; best {res['sweep'].get('best')}"
        elif "gpu_utilisation" in r:
            fig = f"{r['seconds']} s; GPU utilisation {r['gpu_utilisation']}"
        else:
            fig = f"{r['seconds']} s"
        rows.append(f"| {r['name']} | {fig} |")
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="check every step's command and flags; run nothing")
    p.add_argument("--out", default="gpu-results.json")
    p.add_argument("--deadline", type=float, default=720,
                   help="seconds for the whole run: a step starts only while its min_s remain (default 12 min "
                        "of the 15-minute lease)")
    p.add_argument("--timeout", type=int, default=None, help="cap every step's budget at this many seconds")
    p.add_argument("--shared-data", default=None,
                   help="the shared data folder (default: $MAMMO_RAY_SHARED_DATA, else ../shared/data beside the "
                        "repository, else shared/data inside it)")
    return p


def main(args) -> int:
    work = tempfile.mkdtemp(prefix="mammo-gpu-")
    shared = shared_data(args.shared_data)
    plan = steps(work, gpus=gpu_count(args.dry_run), shared=shared)
    if args.dry_run:
        problems = {s["name"]: check(s) for s in plan}
        for step in plan:
            why = problems[step["name"]]
            note = f" (at run time: skipped, {step['skip']})" if why is None and step.get("skip") else ""
            print(f"{step['name']}: {'ok' if why is None else why}{note}")
        print(f"nvidia-smi: {'found' if shutil.which('nvidia-smi') else 'not found (GPU utilisation needs it)'}")
        found = (shared / DIGITAL / "labels.csv").exists()
        print(f"shared data: {shared} ({'found' if found else 'not found: the real-data steps would be skipped'})")
        return 1 if any(problems.values()) else 0
    t0 = time.perf_counter()
    results: list[dict] = []
    done: dict[str, dict] = {}
    for step in plan:
        left = args.deadline - (time.perf_counter() - t0)
        why = why_skip(step, done, left, shared)
        if why:
            print(f"[gpu] {step['name']}: skipped ({why})", flush=True)
            res = {"name": step["name"], "returncode": None, "skipped": why}
        else:
            budget = min(step["budget_s"], args.timeout or step["budget_s"], left)
            print(f"[gpu] {step['name']} (at most {budget:.0f} s) ...", flush=True)
            res = run(step, budget)
        results.append(res)
        done[step["name"]] = res
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() if shutil.which("nvidia-smi") else None
    Path(args.out).write_text(json.dumps({"gpu": gpu, "gpus": gpu_count(False), "deadline_s": args.deadline,
                                          "seconds": round(time.perf_counter() - t0, 1), "shared_data": str(shared),
                                          "steps": results}, indent=2))
    print("\n".join([f"GPU: {gpu}", *summary_rows(results), f"(JSON: {args.out})"]))
    return 1 if any(r["returncode"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
