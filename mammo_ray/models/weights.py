"""Starting weights of a backbone, resolved in one place (no Ray here).

Three sources, at most one per model:

* ``pretrained="imagenet"``: for torchvision backbones, the file torchvision itself uses,
  ``<torch.hub.get_dir()>/checkpoints/<basename of the weights url>``; when it is missing it
  is downloaded once through ``torch.hub.download_url_to_file`` with torch.hub's sha256
  prefix check (the hex after the last ``-`` in the file name), exactly as
  ``torch.hub.load_state_dict_from_url(check_hash=True)`` does. For a backbone whose
  weights ship in a Python package (``efficientnet_lite0``), that file; nothing is downloaded.
* ``weights_path``: a state dict of the 3-channel, 1000-class backbone, a local path or a URI
  (``s3://...``, read with :func:`mammo_ray.io.read_bytes`).
* ``state_dict``: tensors already in memory, e.g. resolved once on a Ray driver with
  :func:`resolve_weights` and shipped to trials and actors through the object store, so that
  the nodes of a cluster neither download nor need the file.

Offline mode (``offline=True`` or the environment variable ``MAMMO_RAY_OFFLINE=1`` for jobs)
never downloads: a missing cache file is a one-line FileNotFoundError naming the file and
its folder. Every file is read with ``torch.load(weights_only=True)``: a pickle that would
run code while loading is refused, never executed.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pickle
import socket
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch

from mammo_ray import io as mio
from mammo_ray.models.checkpoint import unsafe_globals
from mammo_ray.models.registry import (
    PRETRAINED_CHOICES,
    BackboneSpec,
    get_backbone,
    list_backbones,
)

logger = logging.getLogger(__name__)

#: environment variable that turns offline mode on for jobs (``1``/``true``/``yes``/``on``)
ENV_OFFLINE = "MAMMO_RAY_OFFLINE"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
#: seconds a download may wait on one connect or read before it fails
DOWNLOAD_TIMEOUT_S = 60.0
_WAYS_OUT = "pass --weights PATH|s3://... (a state dict of the 3-channel backbone), or put the file at {file} and use --offline"

StateDict = dict[str, torch.Tensor]
Source = Path | bytes


# ---- where ImageNet weights come from

def offline_from_env() -> bool:
    """Whether ``MAMMO_RAY_OFFLINE`` asks for offline mode.

    Raises:
        ValueError: the variable holds something other than 1/true/yes/on or 0/false/no/off/empty.
    """
    value = os.environ.get(ENV_OFFLINE, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"{ENV_OFFLINE}={value!r}: use 1 (offline) or 0")
    return value in _TRUE


def has_imagenet(spec: BackboneSpec) -> bool:
    """True when the backbone has ImageNet weights (a torchvision download or a package file)."""
    return spec.weights_enum is not None or spec.imagenet_file is not None


def imagenet_backbones() -> list[str]:
    """Names of the registered backbones that have ImageNet weights, sorted."""
    return [n for n in list_backbones() if has_imagenet(get_backbone(n))]


def _check_has_imagenet(spec: BackboneSpec) -> None:
    if not has_imagenet(spec):
        raise ValueError(f"backbone={spec.name!r} has no ImageNet weights; use pretrained=None or one of "
                         f"{', '.join(imagenet_backbones())}")


def weights_url(name: str) -> str:
    """The URL torchvision downloads ``name``'s ImageNet weights from.

    Raises:
        ValueError: unknown backbone, or one without torchvision ImageNet weights.
    """
    spec = get_backbone(name)
    _check_has_imagenet(spec)
    if spec.weights_enum is None:
        raise ValueError(f"backbone={name!r}: its ImageNet weights ship in a package, not at a torchvision URL")
    import torchvision  # deferred: see registry._torchvision

    return torchvision.models.get_weight(spec.weights_enum).url


def expected_weights_file(name: str) -> Path:
    """Where the ImageNet weights of ``name`` are read from.

    For a torchvision backbone ``<torch.hub.get_dir()>/checkpoints/<basename of the weights
    url>``, the file torchvision itself uses (e.g. ``resnet50-11ad3fa6.pth``); for a backbone
    whose weights ship in a package, that package's file.

    Raises:
        ValueError: unknown backbone, or one without ImageNet weights.
        FileNotFoundError: the package that ships the weights is not installed.
    """
    spec = get_backbone(name)
    _check_has_imagenet(spec)
    if spec.imagenet_file is not None:
        return spec.imagenet_file()
    # torch.hub names the cached file after the url's basename (hub.load_state_dict_from_url)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights_url(name)).path)


def hash_prefix(path: Path) -> str | None:
    """torch.hub's sha256 prefix in a file name (``resnet18-f37072fd.pth`` -> ``f37072fd``), or None."""
    match = torch.hub.HASH_REGEX.search(path.name)
    return match.group(1) if match else None


def check_file_hash(path: Path) -> None:
    """Check a local file against the sha256 prefix in its name, as torch.hub does for downloads.

    Raises:
        ValueError: the file's sha256 does not start with that prefix.
    """
    prefix = hash_prefix(path)
    if not prefix:
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(prefix):
        raise ValueError(f"weights {path}: sha256 {digest[:16]}... does not start with {prefix!r} as its name says "
                         f"(corrupt or replaced file): reinstall or delete it")


# ---- reading files safely

def _one_line(exc: BaseException) -> str:
    # The first sentence of the first line: messages here are one line, torch's go on with
    # advice (e.g. to re-run with weights_only=False, which would run the pickle's code).
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.split(". ")[0].split(" Re-running torch.load")[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _refusal(src: Source, source: str) -> str:
    # the callables the pickle would import, listed without running any (torch's scanner)
    names = unsafe_globals(src if isinstance(src, bytes) else Path(src).read_bytes())
    what = f"(it references {', '.join(names[:3])})" if names else "(or is no PyTorch file at all)"
    return (f"weights {source} refused: the file needs arbitrary code execution to load {what}; only plain tensor "
            f"state dicts are read (torch.load weights_only=True)")


def _as_state_dict(obj: object, source: str) -> StateDict:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a common wrapper around torchvision-format weights
    if not isinstance(obj, Mapping):
        raise ValueError(f"weights {source}: expected a state dict (name -> tensor), found a {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"weights {source}: expected a state dict (name -> tensor), but {key!r} holds a "
                             f"{type(value).__name__}")
    return dict(obj)


def load_state_file(src: Source, *, source: str) -> StateDict:
    """Read a state dict from a local file or from bytes, refusing anything but tensors.

    Args:
        src: a local path, or the file's bytes (e.g. from an object store).
        source: how to name it in errors (path, URI or URL).

    Returns:
        The state dict (tensors on the CPU).

    Raises:
        ValueError: the file needs code execution to load (a pickle of arbitrary objects), is
            truncated or corrupt, or holds something other than a state dict.
    """
    try:
        # weights_only: a state dict is tensors only, and unpickling arbitrary objects from a
        # downloaded or user-supplied file would run code
        obj = torch.load(io.BytesIO(src) if isinstance(src, bytes) else src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # from None: torch's message ends with advice to load with weights_only=False, i.e. to
        # run the file's code; the refusal says what matters in one line
        raise ValueError(_refusal(src, source)) from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"weights {source} cannot be read: truncated or corrupt PyTorch file ({_one_line(err)})") from None
    return _as_state_dict(obj, source)


# ---- download

@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torch.hub's urlopen takes no timeout: the process-wide default is the only knob, so a
    # stalled server fails the download instead of hanging the driver forever
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def download_weights(url: str, dst: Path, *, name: str, progress: bool = False,
                     timeout_s: float | None = None) -> StateDict:
    """Download ``url`` to ``dst`` with torch.hub's hash check, keeping it only when it loads.

    torch.hub writes to ``<tmp>.<uuid>.partial`` and renames only after the sha256 prefix
    matched; it goes to a hidden temporary name first and becomes ``dst`` only once it also
    reads as a state dict, so a failed, truncated or foreign download never sits in the
    cache where the next run would pick it up.

    Args:
        url: where to download from.
        dst: the cache file (its name carries the sha256 prefix).
        name: the backbone, for messages.
        progress: show torch.hub's progress bar on stderr.
        timeout_s: seconds one connect or read may wait (None: :data:`DOWNLOAD_TIMEOUT_S`).

    Returns:
        The downloaded state dict.

    Raises:
        FileNotFoundError: the download failed, timed out, had the wrong hash or is not a
            readable state dict; the message names the URL, the cache file and the ways out.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex}.download"
    logger.info("downloading the ImageNet weights of %s from %s to %s", name, url, dst)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S if timeout_s is None else timeout_s):
            torch.hub.download_url_to_file(url, str(tmp), hash_prefix=hash_prefix(dst), progress=progress)
        state = load_state_file(tmp, source=url)
        os.replace(tmp, dst)  # atomic: readers see no file or the whole, checked one
    except (OSError, RuntimeError, ValueError, EOFError) as err:  # URLError, timeout, invalid hash, bad file
        raise FileNotFoundError(f"could not download the ImageNet weights of {name} from {url} to {dst} "
                                f"({_one_line(err)}); nothing was saved: {_WAYS_OUT.format(file=dst)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return state


# ---- fitting a state dict to a backbone

def _mismatch(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> tuple[str, int] | None:
    # The first mismatching key in model order (then the first unexpected one in file
    # order), and how many keys differ in all.
    first: str | None = None
    count = 0
    for key, ref in reference.items():
        if key not in state:
            why = f"{key!r} is missing from the file"
        elif tuple(state[key].shape) != tuple(ref.shape):
            why = f"{key!r} has shape {tuple(state[key].shape)} in the file, {tuple(ref.shape)} in the model"
        else:
            continue
        first, count = first or why, count + 1
    for key in state:
        if key not in reference:
            first, count = first or f"{key!r} is not a tensor of the model", count + 1
    return (first, count) if first else None


def fit_state_dict(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], *, spec: BackboneSpec,
                   source: str) -> StateDict:
    """Bring ``state`` to the backbone's keys and check every key and shape.

    Args:
        state: a loaded state dict, in the backbone's keys or in a format its spec converts
            (``BackboneSpec.convert_state``, e.g. the efficientnet-lite0 package's keys).
        reference: the 3-channel, 1000-class model's state dict (keys and shapes only).
        spec: the backbone.
        source: how to name the weights in errors.

    Returns:
        The state dict in the model's keys.

    Raises:
        ValueError: one line naming the first mismatching key (missing, unexpected or wrong shape).
    """
    try:
        state = spec.convert_state(state, reference) if spec.convert_state else dict(state)
    except ValueError as err:
        raise ValueError(f"weights {source} do not fit the 3-channel, 1000-class {spec.name}: {err}") from None
    # files saved before BatchNorm counted its batches (torchvision's 2017 ResNets) lack the
    # counter; BatchNorm ignores it when momentum is set, as it is in every backbone here
    for key in reference:
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.tensor(0, dtype=torch.long)
    bad = _mismatch(state, reference)
    if bad:
        raise ValueError(f"weights {source} do not fit the 3-channel, 1000-class {spec.name}: first mismatch: "
                         f"{bad[0]} ({bad[1]} keys differ)")
    return state


def _reference_state(spec: BackboneSpec) -> StateDict:
    # the meta device gives keys and shapes without allocating or initialising (vgg19: 0.02 s
    # instead of 2.8 s), so a driver can check weights before shipping them
    with torch.device("meta"):
        return spec.builder(weights=None).state_dict()


# ---- the one entry point

def _imagenet_state(spec: BackboneSpec, *, offline: bool, progress: bool) -> tuple[StateDict, str]:
    if spec.imagenet_file is not None:  # shipped in a package: never downloaded
        path = spec.imagenet_file()
        check_file_hash(path)
        return load_state_file(path, source=str(path)), str(path)
    path = expected_weights_file(spec.name)
    if path.is_file():
        return load_state_file(path, source=str(path)), str(path)
    if offline or offline_from_env():
        why = "--offline" if offline else f"{ENV_OFFLINE}=1"
        raise FileNotFoundError(f"ImageNet weights for {spec.name} not found: expected {path.name} in {path.parent} "
                                f"({why}: nothing is downloaded); place the file there or pass --weights PATH")
    url = weights_url(spec.name)
    return download_weights(url, path, name=spec.name, progress=progress), url


def _file_state(weights_path: str | os.PathLike[str]) -> tuple[StateDict, str]:
    where = os.fspath(weights_path)
    if not mio.is_uri(where):
        if not Path(where).is_file():
            raise FileNotFoundError(f"weights_path={where!r}: no such file")
        return load_state_file(Path(where), source=where), where
    try:
        data = mio.read_bytes(where)
    except OSError as err:
        raise FileNotFoundError(f"weights_path={where!r}: cannot read it ({_one_line(err)})") from err
    return load_state_file(data, source=where), where


def check_sources(*, pretrained: str | None, weights_path: object, state_dict: object = None) -> None:
    """Validate the choice of starting weights.

    Raises:
        ValueError: ``pretrained`` is not None or ``"imagenet"``, or more than one source is given.
    """
    if pretrained is not None and pretrained not in PRETRAINED_CHOICES:
        raise ValueError(f"pretrained={pretrained!r}: use one of None, {', '.join(PRETRAINED_CHOICES)}")
    given = [f"{k}={v!r}" for k, v in (("pretrained", pretrained), ("weights_path", weights_path)) if v is not None]
    given += ["state_dict=<dict>"] if state_dict is not None else []
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)}: give one of them")


def resolve_weights(name: str, *, pretrained: str | None = None, weights_path: str | os.PathLike[str] | None = None,
                    offline: bool = False, progress: bool = False) -> StateDict | None:
    """The checked starting state dict of backbone ``name``, or None for a random init.

    Call it once on a driver and hand the result to every trial or actor (``ray.put``), then
    ``build_model(name, state_dict=...)`` there: nodes then neither download nor read files.

    Args:
        name: a registered backbone.
        pretrained: None or ``"imagenet"`` (hub cache, downloaded when missing; or the
            package file of backbones that ship one).
        weights_path: a local path or URI of a state dict of the 3-channel, 1000-class backbone.
        offline: never download (also on with ``MAMMO_RAY_OFFLINE=1``).
        progress: show a download progress bar on stderr.

    Returns:
        The state dict in the model's keys (CPU tensors), ready for ``load_state_dict`` of the
        3-channel, 1000-class model; None when neither ``pretrained`` nor ``weights_path`` is given.

    Raises:
        ValueError: unknown backbone or ``pretrained`` value, both sources given, no ImageNet
            weights for this backbone (the message lists those that have them), a file that
            needs code execution to load, or weights that do not fit (first mismatching key).
        FileNotFoundError: offline and not in the cache, a failed download, or a missing file.
    """
    spec = get_backbone(name)
    check_sources(pretrained=pretrained, weights_path=weights_path)
    if pretrained is None and weights_path is None:
        return None
    if pretrained is not None:
        _check_has_imagenet(spec)
        state, source = _imagenet_state(spec, offline=offline, progress=progress)
    else:
        state, source = _file_state(weights_path)
    state = fit_state_dict(state, _reference_state(spec), spec=spec, source=source)
    logger.info("resolved %s weights from %s", name, source)
    return state
