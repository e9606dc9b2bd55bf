"""A checkpoint's stored values are input: each is checked when the file is loaded, and a
checkpoint whose weights do not fit its backbone is refused on the driver, in one line, before
any output folder or Ray actor exists (issue 26, item 5 and the first "lesser" item)."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mammo_ray.cli import main
from mammo_ray.config import PreprocessSpec, TrainConfig
from mammo_ray.models.checkpoint import load_checkpoint, save_checkpoint
from mammo_ray.models.registry import build_model


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A simplecnn checkpoint as training writes it (with history and best metrics)."""
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.manual_seed(0)
    metrics = {"val_auc": 0.8, "val_auc_low": 0.7, "val_auc_high": 0.9, "val_threshold": 0.4, "val_loss": 0.5,
               "train_loss": 0.6, "lr": 1e-4, "seconds": 1.0}
    save_checkpoint(str(path), model=build_model("simplecnn"), cfg=TrainConfig(backbone="simplecnn", pretrained="none", freeze_ratio=0.25),
                    spec=PreprocessSpec(size=64), epoch=3, metrics=metrics,
                    extra={"history": [{"epoch": 1, **metrics}], "best_epoch": 3, "best_metrics": metrics})
    return path


def _tampered(good: Path, tmp_path: Path, change) -> str:
    state = torch.load(good, weights_only=True)
    change(state)
    out = tmp_path / "best.pt"
    buf = io.BytesIO()
    torch.save(state, buf)
    out.write_bytes(buf.getvalue())
    return str(out)


def _set(*keys, value):
    def change(state):
        d = state
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return change


NAN, INF = math.nan, math.inf
TAMPERED = [
    (_set("metrics", "val_threshold", value=NAN), r"metrics\.val_threshold=nan: must be a finite number in \[0, 1\]"),
    (_set("metrics", "val_threshold", value=INF), r"metrics\.val_threshold=inf: must be a finite number in \[0, 1\]"),
    (_set("metrics", "val_threshold", value=1.5), r"metrics\.val_threshold=1\.5: must be a finite number in \[0, 1\]"),
    (_set("metrics", "val_threshold", value="0.4"), r"metrics\.val_threshold='0\.4': must be a finite number"),
    (_set("metrics", "val_auc", value=-0.1), r"metrics\.val_auc=-0\.1: must be a finite number in \[0, 1\]"),
    (_set("metrics", "val_loss", value=NAN), r"metrics\.val_loss=nan: must be a finite number >= 0"),
    (_set("metrics", value=[0.5]), r"metrics=\[0\.5\]: must be a mapping"),
    (_set("best_metrics", "val_threshold", value=NAN), r"best_metrics\.val_threshold=nan"),
    (_set("history", value=[{"epoch": 1, "val_auc": INF}]), r"history\[0\]\.val_auc=inf"),
    (_set("freeze_ratio", value=NAN), r"freeze_ratio=nan: must be a finite number in \[0, 1\]"),
    (_set("freeze_ratio", value=2.0), r"freeze_ratio=2\.0: must be a finite number in \[0, 1\]"),
    (_set("train_config", "freeze_ratio", value=0.5), r"train_config\.freeze_ratio=0\.5: differs from freeze_ratio=0\.25"),
    (_set("train_config", "base_lr", value=NAN), r"train_config\.base_lr=nan: must be a finite number"),
    (_set("spec", "std", value=NAN), r"spec\.std=nan: must be a finite number"),
    (_set("spec", "std", value=0.0), r"spec\.std=0\.0: must be a finite number in \[0\.01, 1\]"),
    (_set("spec", "mean", value=INF), r"spec\.mean=inf: must be a finite number"),
    (_set("spec", "size", value=[100000, 100000]), r"spec\.size=\(100000, 100000\): use one int or \[height, width\]"),
    (_set("spec", "size", value=[0, 0]), r"spec\.size=\(0, 0\)"),
    (_set("normalization", "std", value=NAN), r"normalization\.std=nan: must be a finite number in \[0\.01, 1\]"),
    (_set("normalization", "mean", value=-3.0), r"normalization\.mean=-3\.0: must be a finite number in \[0, 1\]"),
    (_set("normalization", value="imagenet"), r"normalization='imagenet': must be a mapping of mean, std and source"),
    (_set("epoch", value=-1), r"epoch=-1: must be an int >= 0"),
    (_set("version", value=NAN), r"version=nan: must be an int in \[1, 1\]"),
    (_set("backbone", value="resnet1000"), r"backbone='resnet1000': use one of"),
]


@pytest.mark.parametrize("change,message", TAMPERED, ids=[m.split(":")[0].replace("\\", "") for _, m in TAMPERED])
def test_tampered_value_refused_in_one_line_naming_the_field(good, tmp_path, change, message):
    path = _tampered(good, tmp_path, change)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert len(text.splitlines()) == 1 and text.startswith(f"checkpoint {path}: "), text
    assert __import__("re").search(message, text), text


def test_untampered_checkpoint_loads(good):
    state = load_checkpoint(str(good))
    assert state["metrics"]["val_threshold"] == 0.4 and state["normalization"] == {"mean": 0.5, "std": 0.25,
                                                                                    "source": "default"}


def test_non_finite_metrics_are_stored_as_undefined(tmp_path):
    """Our own files never hold what the loader refuses: a diverged run's NaN loss is saved as
    None (undefined), as an AUC of one class is."""
    path = tmp_path / "last.pt"
    save_checkpoint(str(path), model=build_model("simplecnn"), cfg=TrainConfig(backbone="simplecnn", pretrained="none"),
                    spec=PreprocessSpec(size=64), epoch=1, metrics={"val_loss": NAN, "val_auc": None},
                    extra={"history": [{"epoch": 1, "val_loss": INF}], "best_metrics": {"val_loss": NAN}})
    state = load_checkpoint(str(path))
    assert state["metrics"] == {"val_loss": None, "val_auc": None}
    assert state["history"] == [{"epoch": 1, "val_loss": None}] and state["best_metrics"] == {"val_loss": None}


# ---- weights that do not fit the backbone

def _other_backbone(state):
    # simplecnn's weights under a resnet18 label: every key differs
    state["backbone"] = "resnet18"
    state["train_config"]["backbone"] = "resnet18"


def _wider_head(state):
    state["model"]["head.weight"] = torch.zeros(2, 128)


def _dropped_key(state):
    del state["model"]["features.0.1.running_mean"]


def _nan_weight(state):
    state["model"]["features.1.0.weight"][0, 0, 0, 0] = NAN


MISFITS = [
    (_other_backbone, r"does not fit backbone resnet18: 122 missing key\(s\) \(e\.g\. 'conv1\.weight'\), "
                      r"26 unexpected key\(s\) \(e\.g\. 'features\.0\.0\.weight'\) of its 122"),
    (_wider_head, r"does not fit backbone simplecnn: 'head\.weight' has shape \(2, 128\) in the checkpoint, "
                  r"\(1, 128\) in the model"),
    (_dropped_key, r"does not fit backbone simplecnn: 1 missing key\(s\) \(e\.g\. 'features\.0\.1\.running_mean'\)"),
    (_nan_weight, r"model\.features\.1\.0\.weight holds NaN or inf"),
]


@pytest.mark.parametrize("change,message", MISFITS, ids=["other-backbone", "shape", "missing", "nan-weight"])
def test_weights_that_do_not_fit_are_refused_in_one_line(good, tmp_path, change, message):
    path = _tampered(good, tmp_path, change)
    with pytest.raises(ValueError, match=message) as info:
        load_checkpoint(path)
    assert len(str(info.value).splitlines()) == 1


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imgs")
    for k in range(2):
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (80, 64), dtype=np.uint8)).save(folder / f"i{k}.png")
    return folder


COMMANDS = {
    "score": lambda ck, out, imgs: ["score", str(imgs), "--checkpoint", ck, "--out", out],
    "explain": lambda ck, out, imgs: ["explain", str(imgs), "--checkpoint", ck, "--out", out],
    "evaluate": lambda ck, out, imgs: ["evaluate", "--checkpoint", ck, "--data", str(imgs), "--out", out],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("change,message", [TAMPERED[0], MISFITS[0], MISFITS[1]], ids=["nan-threshold", "backbone",
                                                                                         "shape"])
def test_every_command_refuses_before_any_work(good, tmp_path, images, capsys, command, change, message):
    """score, explain and evaluate: rc 2, one line naming the field or the mismatch, no
    traceback, and no --out left behind (the check runs before the folder or any actor)."""
    import ray

    path = _tampered(good, tmp_path, change)
    out = tmp_path / "out"
    was_up = ray.is_initialized()
    assert main(COMMANDS[command](path, str(out), images)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mammo-ray")]
    assert len(lines) == 1 and __import__("re").search(message, lines[0]), err
    assert "Traceback" not in err and "ActorDiedError" not in err
    assert not out.exists()
    assert ray.is_initialized() == was_up  # no Ray started for a refused checkpoint


@pytest.mark.parametrize("field,value,message", [
    ("std", math.nan, r"std=nan: must be a finite number"),
    ("mean", 7.0, r"mean=7\.0: must be a finite number in \[0, 1\]"),
    ("size", [0, 99999], r"size=\(0, 99999\): use one int or \[height, width\]"),
])
def test_a_parquet_spec_is_checked_and_the_refusal_names_the_file(tmp_path, field, value, message):
    """The spec in a preprocessed set's Parquet metadata is input too (train and evaluate read it)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mammo_ray.config import to_dict
    from mammo_ray.data.parquet import SPEC_KEY, read_spec

    (tmp_path / "train").mkdir()
    spec = {**to_dict(PreprocessSpec(size=64)), field: value}
    table = pa.table({"image_id": ["a"]}).replace_schema_metadata({SPEC_KEY: json.dumps(spec).encode()})
    pq.write_table(table, tmp_path / "train" / "part-0.parquet")
    with pytest.raises(ValueError, match=r"part-0\.parquet: the spec in its Parquet metadata: " + message) as info:
        read_spec(str(tmp_path))
    assert len(str(info.value).splitlines()) == 1
