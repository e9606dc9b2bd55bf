"""Patient pseudonyms keyed by a secret the user holds.

``patient_key`` groups a patient's images for the split and the patient-level bootstrap. It
is an HMAC-SHA256 of the patient id under a secret key, so that nobody holding the outputs
can recover an id by hashing candidates (a salted hash with a public salt fell to a brute
force of all six-digit ids in about a second). The key never enters the outputs.

Where the key comes from, first match wins:

1. ``MAMMO_RAY_PATIENT_KEY``: the key itself (at least 16 characters), for clusters, where
   a Kubernetes Secret or the job's environment provides it;
2. a key file named by ``--patient-key-file`` (or ``MAMMO_RAY_PATIENT_KEY_FILE``);
3. the user's key file ``$XDG_CONFIG_HOME/mammo-ray/patient.key`` (``~/.config/...``).

A key file that does not exist is created with 32 random bytes, readable by its owner only,
so every later run of the same user (preprocessing more data, an external set) derives the
same keys and patients link across sets. A key file inside an output folder is refused.

No Ray here: keys are derived on the driver, and the secret never travels to workers.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

KEY_ENV = "MAMMO_RAY_PATIENT_KEY"
KEY_FILE_ENV = "MAMMO_RAY_PATIENT_KEY_FILE"
MIN_KEY_CHARS = 16


@dataclass(frozen=True)
class PatientSecret:
    """A secret key and where it came from (``source`` is safe to log: never the key)."""

    key: bytes
    source: str

    def __repr__(self) -> str:  # a secret must not leak through logs or tracebacks
        return f"PatientSecret(source={self.source!r})"

    @property
    def key_id(self) -> str:
        """A public fingerprint (HMAC of a constant): tells whether two runs used the same key."""
        return hmac.new(self.key, b"mammo-ray patient key id", hashlib.sha256).hexdigest()[:12]


def default_key_file() -> Path:
    """``$MAMMO_RAY_PATIENT_KEY_FILE``, else ``$XDG_CONFIG_HOME/mammo-ray/patient.key``."""
    if os.environ.get(KEY_FILE_ENV):
        return Path(os.environ[KEY_FILE_ENV]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "mammo-ray" / "patient.key"


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # O_EXCL: two runs starting at once cannot both write (the loser reads the winner's key)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    logger.warning("created a new patient key at %s: keep it (and keep it private) so later runs derive the "
                   "same patient keys; on a cluster set %s from a secret instead", path, KEY_ENV)


def load_patient_secret(key_file: str | os.PathLike[str] | None = None, *,
                        forbidden: tuple[str, ...] = ()) -> PatientSecret:
    """The secret for patient keys (see the module doc for the order).

    Args:
        key_file: an explicit key file (created when missing).
        forbidden: output folders the key file must not lie in.

    Raises:
        ValueError: a key shorter than 16 characters, an empty key file, or a key file
            inside an output folder.
    """
    env = os.environ.get(KEY_ENV)
    if env is not None and not key_file:
        if len(env.strip()) < MIN_KEY_CHARS:
            raise ValueError(f"{KEY_ENV} has {len(env.strip())} characters: use a random secret of at least "
                             f"{MIN_KEY_CHARS} (e.g. `openssl rand -hex 32`)")
        return PatientSecret(env.strip().encode(), f"${KEY_ENV}")
    path = Path(key_file).expanduser() if key_file else default_key_file()
    from mammo_ray.outputs import inside

    for out in forbidden:
        if inside(str(path), out):
            raise ValueError(f"patient key file {path} is inside the output folder {out}: the key would be "
                             "shipped with the pseudonyms it protects; keep it outside the outputs")
    if not path.exists():
        _create_key_file(path)
    text = path.read_text().strip()
    if len(text) < MIN_KEY_CHARS:
        raise ValueError(f"patient key file {path} holds {len(text)} characters: use a random secret of at least "
                         f"{MIN_KEY_CHARS} (delete the file to have one generated)")
    if path.stat().st_mode & 0o077:
        logger.warning("patient key file %s is readable by others: chmod 600 it", path)
    return PatientSecret(text.encode(), str(path))


def patient_key(patient_id: str | None, secret: PatientSecret) -> str | None:
    """HMAC-SHA256 of a patient id under the secret (16 hex characters); None when unknown."""
    if patient_id is None or str(patient_id).strip() == "":
        return None
    return hmac.new(secret.key, str(patient_id).encode("utf-8"), hashlib.sha256).hexdigest()[:16]
