"""Ray job entrypoint for the explain batch job.

    ray job submit --working-dir . -- python jobs/explain.py s3://archive/ --checkpoint s3://runs/best.pt \\
        --out s3://runs/explain --method gradcam --gpus-per-worker 1 --resume

Options are those of ``mammo-ray explain``; this file only parses and calls.
"""
from __future__ import annotations

import sys

from mammo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["explain", *sys.argv[1:]]))
