"""Every GPU figure in one go, for the few minutes a GPU is lent (`benchmarks/gpu.sh`).

    bash benchmarks/gpu.sh                 # on the GPU machine, after `make venv`
    bash benchmarks/gpu.sh --dry-run       # anywhere: every step's command exists and parses (CI)

Steps (each a command of this repository, run in order, under 8 minutes on one GPU):
  train-*      benchmarks/train.py: resnet50 and vgg19 train steps at freezing 0, 0.5 and 1.0,
               224 px, channels_last, with AMP (bf16) and without; peak GPU memory per ratio
  explain      benchmarks/explain.py on the GPU with AMP: the CAM stage against bare inference,
               and the whole explain job on a GPU actor
  tune         a real 4-trial sweep at 0.25 GPU per trial (`mammo-ray tune`) on phantoms, with
               GPU utilisation sampled by nvidia-smi every second
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
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
MAMMO_RAY = str(Path(sys.executable).with_name("mammo-ray"))


def steps(work: str) -> list[dict]:
    """The commands, in order: (name, argv, kind). ``kind``: "bench" prints a JSON object last;
    "cli" is a mammo-ray command; "setup" prepares the sweep's data."""
    out: list[dict] = []
    for backbone in ("resnet50", "vgg19"):
        for amp in ("--amp", "--no-amp"):
            out.append({"name": f"train-{backbone}{'-amp' if amp == '--amp' else '-fp32'}", "kind": "bench",
                        "argv": [PY, str(REPO / "benchmarks" / "train.py"), "--backbone", backbone, "--size", "224",
                                 "--batch-size", "64", "--steps", "20", "--device", "cuda", amp]})
    out.append({"name": "explain", "kind": "bench",
                "argv": [PY, str(REPO / "benchmarks" / "explain.py"), "--device", "cuda", "--amp", "--images", "256",
                         "--batch-size", "64", "--job-images", "512", "--repeats", "3"]})
    phantoms, data = os.path.join(work, "phantoms"), os.path.join(work, "data")
    out.append({"name": "tune-synth", "kind": "setup",
                "argv": [MAMMO_RAY, "synth", "--out", phantoms, "--n", "400"]})
    out.append({"name": "tune-preprocess", "kind": "setup",
                "argv": [MAMMO_RAY, "preprocess", phantoms, "--out", data, "--size", "224"]})
    out.append({"name": "tune", "kind": "cli", "gpu_sampling": True,
                "argv": [MAMMO_RAY, "tune", "--data", data, "--out", os.path.join(work, "sweep"),
                         "--backbones", "resnet50", "--freeze-ratios", "0", "0.25", "0.5", "0.75",
                         "--lr-bounds", "1e-4:1e-3", "--epochs", "3", "--gpus-per-trial", "0.25",
                         "--cpus-per-trial", "2"]})
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


def run(step: dict, timeout: int) -> dict:
    samples: list[dict] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_gpu, args=(stop, samples), daemon=True)
    if step.get("gpu_sampling") and shutil.which("nvidia-smi"):
        sampler.start()
    t0 = time.perf_counter()
    r = subprocess.run(step["argv"], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                       env={**os.environ, "RAY_ADDRESS": ""})
    stop.set()
    res = {"name": step["name"], "returncode": r.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    if r.returncode:
        res["stderr_tail"] = r.stderr[-2000:]
    if step["kind"] == "bench":
        res["result"] = last_json(r.stdout)
    if samples:
        busy = [s["util"] for s in samples]
        res["gpu_utilisation"] = {"mean": round(sum(busy) / len(busy), 1), "max": max(busy), "samples": len(busy),
                                  "peak_mem_mb": max(s["mem_mb"] for s in samples)}
    return res


def summary_rows(results: list[dict]) -> list[str]:
    rows = ["| step | figure |", "|---|---|"]
    for r in results:
        res = r.get("result") or {}
        if r["returncode"]:
            fig = f"failed (exit {r['returncode']})"
        elif r["name"].startswith("train-"):
            ips = res.get("images_per_s", {})
            fig = (f"{' / '.join(f'{v:.0f}' for v in ips.values())} img/s at freezing {' / '.join(ips)}; peak GPU MB "
                   f"{res.get('peak_gpu_memory_mb')}")
        elif r["name"] == "explain":
            fig = (f"CAM {res.get('cam_images_per_s')} img/s vs bare {res.get('bare_forward_images_per_s')} "
                   f"({res.get('cam_vs_bare_forward')}); whole job {res.get('job_images_per_s')} img/s")
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
    p.add_argument("--timeout", type=int, default=300, help="seconds per step")
    return p


def main(args) -> int:
    work = tempfile.mkdtemp(prefix="mammo-gpu-")
    plan = steps(work)
    if args.dry_run:
        problems = {s["name"]: check(s) for s in plan}
        for name, why in problems.items():
            print(f"{name}: {'ok' if why is None else why}")
        print(f"nvidia-smi: {'found' if shutil.which('nvidia-smi') else 'not found (GPU utilisation needs it)'}")
        return 1 if any(problems.values()) else 0
    results = []
    for step in plan:
        print(f"[gpu] {step['name']} ...", flush=True)
        results.append(run(step, args.timeout))
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() if shutil.which("nvidia-smi") else None
    Path(args.out).write_text(json.dumps({"gpu": gpu, "steps": results}, indent=2))
    print("\n".join([f"GPU: {gpu}", *summary_rows(results), f"(JSON: {args.out})"]))
    return 1 if any(r["returncode"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
