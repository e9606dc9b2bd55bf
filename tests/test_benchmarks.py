"""Every benchmark runs (``--smoke-test``: tiny sizes) and prints its JSON object with the
ratios the README quotes; the figures themselves are not asserted (shared, noisy machines)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

RATIO_KEYS = {"preprocess": "ray_vs_loop", "train": None, "tune": None, "evaluate": None,
              "explain": "cam_vs_naive", "realdata": None}


@pytest.mark.parametrize("name", sorted(RATIO_KEYS))
def test_benchmark_smoke_test_prints_json(name, tmp_path):
    env_cmd = [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--smoke-test"]
    r = subprocess.run(env_cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # the benchmark's own object is printed last, indented, from a line holding only "{"
    text = "\n" + r.stdout
    result = json.loads(text[text.rindex("\n{\n"):text.rindex("}") + 1])
    assert isinstance(result, dict) and result
    key = RATIO_KEYS[name]
    if key:
        assert result[key] > 0
    if name == "realdata":  # every stage ran on the pretrained backbone: a row per checkpoint, CAMs scored
        assert result["smoke_test"] and len(result["rows"]) >= 2 and result["localization"]["n"] > 0
        assert {r["init"] for r in result["rows"]} == {"imagenet", "random"}
    if name == "explain":
        assert result["max_abs_diff_vs_naive_maps"] < 1e-4 and result["job_images_per_s"] > 0
