"""mammo_ray: train, evaluate and explain breast-cancer classifiers on mammograms with Ray."""
from __future__ import annotations

import os as _os

# A local Ray must bind loopback only. Ray reads this when it is imported, so it is set
# here, before any mammo_ray module imports ray (setdefault: a user's value wins).
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

__version__ = "0.1.0"
