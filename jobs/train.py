"""Ray job entrypoint for training one model.

    ray job submit --working-dir . -- python jobs/train.py --data DIR --out DIR [options]
    python jobs/train.py --smoke-test --out /tmp/smoke-train      # seconds, on phantoms

Options are those of ``mammo-ray train``; this file only parses and calls.
"""
from __future__ import annotations

import os
import sys

from mammo_ray.cli import main


def smoke_test_argv(argv: list[str]) -> list[str]:
    """Phantoms -> preprocess (64 px) -> 2 epochs of simplecnn, under ``--out`` (the model in ``model/``)."""
    out = argv[argv.index("--out") + 1] if "--out" in argv else "smoke-train"
    data = os.path.join(out, "data")
    from mammo_ray.data.synth import write_phantoms

    raw = os.path.join(out, "phantoms")
    write_phantoms(raw, 48, seed=0, height=256, width=208)
    code = main(["preprocess", raw, "--out", data, "--size", "64", "--overwrite"])
    if code:
        sys.exit(code)
    rest = [a for a in argv if a != "--smoke-test"]
    if "--out" in rest:  # the model beside the data, never around it (an --out may not hold an input)
        rest[rest.index("--out") + 1] = os.path.join(out, "model")
    else:
        rest += ["--out", os.path.join(out, "model")]
    return ["train", "--data", data, "--backbone", "simplecnn", "--epochs", "2", *rest]


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(smoke_test_argv(args) if "--smoke-test" in args else ["train", *args]))
