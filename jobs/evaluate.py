"""Ray job entrypoint for evaluation.

    ray job submit --working-dir . -- python jobs/evaluate.py --sweep OUT --data DIR --external EXT --out DIR
    python jobs/evaluate.py --smoke-test --out /tmp/smoke-evaluate      # seconds to a minute, on phantoms

Options are those of ``mammo-ray evaluate``; this file only calls the CLI
(``--smoke-test``: ``mammo_ray.smoke``, shared by every job).
"""
from __future__ import annotations

import sys

from mammo_ray.smoke import run_job

if __name__ == "__main__":
    sys.exit(run_job("evaluate", sys.argv[1:]))
