"""Ray job entrypoint for a Tune sweep.

    ray job submit --working-dir . -- python jobs/tune.py --data DIR --out DIR --config sweep.yaml
    python jobs/tune.py --smoke-test --out /tmp/smoke-tune        # about a minute, on phantoms

Options are those of ``mammo-ray tune``; this file only parses and calls.
"""
from __future__ import annotations

import os
import sys

from mammo_ray.cli import main


def smoke_test_argv(argv: list[str]) -> list[str]:
    """Phantoms -> preprocess (64 px) -> a 2-trial simplecnn sweep of 2 epochs, under ``--out``."""
    from mammo_ray.data.synth import write_phantoms

    out = argv[argv.index("--out") + 1] if "--out" in argv else "smoke-tune"
    raw, data = os.path.join(out, "phantoms"), os.path.join(out, "data")
    write_phantoms(raw, 48, seed=0, height=256, width=208)
    code = main(["preprocess", raw, "--out", data, "--size", "64", "--overwrite"])
    if code:
        sys.exit(code)
    rest = [a for a in argv if a != "--smoke-test"]
    if "--out" in rest:
        i = rest.index("--out")
        rest[i + 1] = os.path.join(out, "sweep")
    else:
        rest += ["--out", os.path.join(out, "sweep")]
    return ["tune", "--data", data, "--backbones", "simplecnn", "--freeze-ratios", "0", "0.5",
            "--lr-bounds", "1e-3:1e-2", "--epochs", "2", *rest]


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(smoke_test_argv(args) if "--smoke-test" in args else ["tune", *args]))
