"""The training loop on phantoms: learns, checkpoints, resumes, refuses bad input early."""
from __future__ import annotations

import re

import json
import pickle
import time

import numpy as np
import pytest
import torch

from mammo_ray.cli import main
from mammo_ray.config import TrainConfig
from mammo_ray.models.checkpoint import load_checkpoint, model_from_checkpoint
from mammo_ray.models.normalization import checkpoint_normalization
from mammo_ray.train.data import load_training_data
from mammo_ray.train.loop import fit, predict


@pytest.fixture(scope="module")
def loaded(train_data_dir):
    return load_training_data(str(train_data_dir))


@pytest.mark.slow
def test_small_model_learns_phantoms_in_a_small_budget(loaded, tmp_path):
    """12 epochs of simplecnn on 210 phantoms at 96 px: about 9 s on an idle 2-core CPU
    (the time is reported, not asserted: shared machines are noisy; the figure is in docs/benchmarks.md)."""
    spec, train, val = loaded
    cfg = TrainConfig(backbone="simplecnn", pretrained=None, freeze_ratio=0.0, epochs=12, batch_size=32,
                      optimizer="adamw", base_lr=1e-4, max_lr=3e-3, step_size_epochs=2, patience=0, seed=0)
    t0 = time.perf_counter()
    result = fit(cfg, spec, train, val, out=str(tmp_path / "run"))
    seconds = time.perf_counter() - t0
    assert result.best_metrics["val_auc"] >= 0.9, result.history
    print(f"simplecnn reached val AUC {result.best_metrics['val_auc']:.3f} in {seconds:.1f} s")
    for name in ("best.pt", "last.pt", "history.csv", "metrics.json", "config.yaml"):
        assert (tmp_path / "run" / name).exists()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["best_epoch"] == result.best_epoch


def test_checkpoint_round_trip_weights_only(loaded, tmp_path):
    spec, train, val = loaded
    cfg = TrainConfig(backbone="simplecnn", pretrained=None, epochs=1, batch_size=32, max_batches=2, freeze_ratio=0.5)
    fit(cfg, spec, train, val, out=str(tmp_path))
    state = load_checkpoint(str(tmp_path / "best.pt"))
    assert state["backbone"] == "simplecnn" and state["freeze_ratio"] == 0.5 and state["epoch"] == 1
    assert state["spec"]["size"] == [96, 96] and state["train_config"]["max_batches"] == 2
    assert set(state["metrics"]) >= {"val_auc", "val_loss", "train_loss"}
    model = model_from_checkpoint(state)
    again = model_from_checkpoint(load_checkpoint(str(tmp_path / "best.pt")))
    p1 = predict(model, val, norm=checkpoint_normalization(state), device=torch.device("cpu"))
    p2 = predict(again, val, norm=checkpoint_normalization(state), device=torch.device("cpu"))
    np.testing.assert_array_equal(p1, p2)
    assert p1.shape == (len(val),) and ((p1 >= 0) & (p1 <= 1)).all()


def test_resume_continues_where_it_stopped(loaded, tmp_path):
    spec, train, val = loaded
    cfg2 = TrainConfig(backbone="simplecnn", pretrained=None, epochs=2, batch_size=32, max_batches=3, patience=0)
    fit(cfg2, spec, train, val, out=str(tmp_path / "a"))
    cfg3 = TrainConfig(**{**cfg2.__dict__, "epochs": 3})
    resumed = fit(cfg3, spec, train, val, out=str(tmp_path / "b"), resume=str(tmp_path / "a" / "last.pt"))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    straight = fit(cfg3, spec, train, val, out=str(tmp_path / "c"))
    # same seed, same data order and augmentation per epoch: resuming gives the same weights
    assert resumed.history[-1]["val_loss"] == pytest.approx(straight.history[-1]["val_loss"], rel=1e-4)


def test_checkpoint_of_another_backbone_is_refused(loaded, tmp_path):
    spec, train, val = loaded
    fit(TrainConfig(backbone="simplecnn", pretrained=None, freeze_ratio=0.0, epochs=1, max_batches=1), spec, train, val,
        out=str(tmp_path))
    with pytest.raises(ValueError, match="is simplecnn at freeze_ratio=0.0, not resnet18 at freeze_ratio=0.0"):
        fit(TrainConfig(backbone="resnet18", pretrained=None, freeze_ratio=0.0, epochs=2), spec, train, val,
            resume=str(tmp_path / "last.pt"))


def test_pickled_or_foreign_checkpoints_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "mammo_ray.checkpoint", "payload": Evil()}, evil)
    with pytest.raises(ValueError, match="refused: loading it would run arbitrary code"):
        load_checkpoint(str(evil))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(ValueError, match="not a mammo_ray checkpoint"):
        load_checkpoint(str(foreign))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(pickle.dumps([1, 2, 3])[:5])
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        load_checkpoint(str(junk))


@pytest.mark.parametrize("argv,needle", [
    (["--backbone", "resnet5"], "argument --backbone: invalid choice: 'resnet5'"),
    (["--freeze-ratio", "1.5"], "freeze_ratio=1.5: use a number in [0, 1]"),
    (["--base-lr", "0.1", "--max-lr", "0.01"], "base_lr=0.1, max_lr=0.01: need 0 < base_lr < max_lr"),
    (["--clr-mode", "cosine"], "argument --clr-mode: invalid choice: 'cosine'"),
])
def test_bad_train_arguments_are_one_line_errors(argv, needle, train_data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        raise SystemExit(main(["train", "--data", str(train_data_dir), "--out", str(tmp_path), *argv]))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "last.pt").exists()  # refused before any training


def test_train_cli_without_train_split(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")]) == 2
    assert "no train/ split" in capsys.readouterr().err


def test_lr_find_suggests_ordered_bounds_and_plots(train_data_dir, tmp_path, capsys):
    code = main(["lr-find", "--data", str(train_data_dir), "--out", str(tmp_path), "--backbone", "simplecnn",
                 "--pretrained", "none",
                 "--steps", "30", "--batch-size", "16"])
    assert code == 0
    result = json.loads((tmp_path / "lr_find.json").read_text())
    assert 0 < result["suggested_base_lr"] < result["suggested_max_lr"] < 1.0
    assert len(result["lrs"]) <= 30 and np.all(np.diff(result["lrs"]) > 0)
    assert (tmp_path / "lr_find.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "suggested --base-lr" in printed and re.search(r"--lr-bounds \S+e-\d+:\S+e-\d+ \(tune\)", printed), printed
