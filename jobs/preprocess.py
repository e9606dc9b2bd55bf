"""Ray job entrypoint for preprocessing.

    ray job submit --working-dir . -- python jobs/preprocess.py INPUT... --out DIR [options]
    python jobs/preprocess.py --smoke-test --out /tmp/smoke     # seconds, on phantoms

All options are those of ``mammo-ray preprocess``; this file only parses and calls.
"""
from __future__ import annotations

import os
import sys

from mammo_ray.cli import main


def smoke_test_argv(argv: list[str]) -> list[str]:
    """Replace the inputs by 24 small phantoms written under ``--out``."""
    from mammo_ray.data.synth import write_phantoms

    out = argv[argv.index("--out") + 1] if "--out" in argv else "smoke-preprocess"
    raw = os.path.join(out, "phantoms")
    write_phantoms(raw, 24, seed=0, height=256, width=208)
    rest = [a for a in argv if a != "--smoke-test"]
    return ["preprocess", raw, "--size", "64", "--overwrite", *([] if "--out" in rest else ["--out", out]), *rest]


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(smoke_test_argv(args) if "--smoke-test" in args else ["preprocess", *args]))
