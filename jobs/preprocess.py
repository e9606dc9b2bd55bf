"""Ray job entrypoint for preprocessing.

    ray job submit --working-dir . -- python jobs/preprocess.py INPUT... --out DIR [options]
    python jobs/preprocess.py --smoke-test --out /tmp/smoke     # seconds, on phantoms

All options are those of ``mammo-ray preprocess``; this file only calls the CLI
(``--smoke-test``: ``mammo_ray.smoke``, shared by every job).
"""
from __future__ import annotations

import sys

from mammo_ray.smoke import run_job

if __name__ == "__main__":
    sys.exit(run_job("preprocess", sys.argv[1:]))
