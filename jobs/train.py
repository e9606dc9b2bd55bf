"""Ray job entrypoint for training one model.

    ray job submit --working-dir . -- python jobs/train.py --data DIR --out DIR [options]
    python jobs/train.py --smoke-test --out /tmp/smoke-train      # seconds, on phantoms

Options are those of ``mammo-ray train``; this file only calls the CLI
(``--smoke-test``: ``mammo_ray.smoke``, shared by every job).
"""
from __future__ import annotations

import sys

from mammo_ray.smoke import run_job

if __name__ == "__main__":
    sys.exit(run_job("train", sys.argv[1:]))
