"""Issue 27 frictions 5-7: one set of defaults that every ``--help`` shows, a tune plan before the
sweep, progress and rounded figures on the console, and one CLI rule per question."""
from __future__ import annotations

import argparse
import logging
import re

import pytest

from mammo_ray.cli import DEFAULT_LEVEL, get_args_parser, main
from mammo_ray.cli.options import flag_state, format_default, option_default, shows_default
from mammo_ray.config import (EvaluateConfig, ExplainConfig, PreprocessConfig, ScoreConfig, SweepConfig,
                              TrainConfig)
from mammo_ray.demo import DemoConfig


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _code_defaults() -> dict[str, tuple]:
    """Each subcommand's config objects, as its ``_run_*`` function builds them (flags named like
    their fields; None: the dataclass default)."""
    demo = DemoConfig.laptop()
    pre = PreprocessConfig()
    return {"synth": (), "preprocess": (pre, pre.spec), "train": (TrainConfig(),), "lr-find": (TrainConfig(),),
            "tune": (SweepConfig(), TrainConfig()), "evaluate": (EvaluateConfig(),), "score": (ScoreConfig(),),
            "explain": (ExplainConfig(),), "demo": (demo, demo.sweep)}


#: what main() does when a console flag is not given
CONSOLE_DEFAULTS = {"verbose": False, "quiet": False, "debug": False, "log_level": DEFAULT_LEVEL, "log_dir": None}


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_every_option_of_every_subcommand_shows_the_default_the_code_uses():
    """Walks every parser (so flags other stages add later are covered): each option's help, as
    ``--help`` prints it, names its default, and where the code has one (a config field of the
    flag's name, else argparse's default) it is that value."""
    parser = get_args_parser()
    subs = _subparsers(parser)
    configs = _code_defaults()
    assert set(subs) == set(configs), "a new subcommand: add its config objects here"
    checked = 0
    for name, sub in subs.items():
        rendered = "".join(sub.format_help().split())  # textwrap also breaks at hyphens: compare unspaced
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not shows_default(action):
                continue
            if any(action in g._group_actions for g in sub._mutually_exclusive_groups if g.required):
                continue  # one of them is required: no default
            text = _flat(formatter._expand_help(action))
            assert "".join(text.split()) in rendered, (name, action.dest)
            assert "default:" in text, f"{name} {action.option_strings[0]}: help names no default: {text!r}"
            if action.default == argparse.SUPPRESS:  # the console flags: the top level's, "not given" = False
                found, value = True, CONSOLE_DEFAULTS[action.dest]
            else:
                found, value = option_default(action, configs[name])
            if found and value is not None:
                if action.nargs == 0:
                    value = flag_state(action, value)
                want = f"default: {format_default(value)}"
                assert want in text, f"{name} {action.option_strings[0]}: {text!r} lacks {want!r}"
            checked += 1
    assert checked > 100  # every stage's options, the console flags included


def test_defaults_are_the_real_data_runs_and_train_and_tune_agree():
    train, sweep = TrainConfig(), SweepConfig()
    assert (train.backbone, train.pretrained, train.freeze_ratio) == ("efficientnet_lite0", "imagenet", 0.5)
    assert (train.optimizer, train.base_lr, train.max_lr, train.step_size_epochs, train.epochs) == \
        ("adamw", 1e-4, 1e-3, 1.0, 2)  # one whole cycle: training ends at the lowest LR
    assert sweep.backbones == (train.backbone,) and sweep.lr_bounds == ((train.base_lr, train.max_lr),)
    assert sweep.epochs == train.epochs and sweep.grid_size * sweep.num_samples == 4
    assert PreprocessConfig().ratios == (0.7, 0.15, 0.15)
    assert ExplainConfig().method == "layercam"
    assert TrainConfig(pretrained="none").pretrained is None  # random init, spelled where None means "not given"
    with pytest.raises(ValueError, match="pretrained: none to start from the weights file"):
        TrainConfig(weights="w.pt")


def test_help_text_states_the_shipped_defaults():
    """The figures a reader looks for, in the printed help (wrapped lines joined)."""
    subs = _subparsers(get_args_parser())
    train = _flat(subs["train"].format_help())
    for needle in ("(default: efficientnet_lite0)", "(default: imagenet)", "(default: 0.5)", "(default: 0.0001)",
                   "(default: 0.001)", "(default: 1)"):
        assert needle in train, needle
    demo = _flat(subs["demo"].format_help())
    laptop = DemoConfig.laptop()
    assert f"default: {laptop.n};" in demo and f"default: {laptop.sweep.epochs};" in demo
    assert "360" not in demo and "default 12" not in demo  # what --help said while the code ran 240 and 2
    assert "(default: 0.7 0.15 0.15)" in _flat(subs["preprocess"].format_help())
    assert "(default: layercam)" in _flat(subs["explain"].format_help())


def test_train_with_new_defaults_needs_random_init_named_for_simplecnn_and_weights_replace_imagenet(capsys):
    parser = get_args_parser()
    base = ["train", "--data", "d", "--out", "o"]
    from mammo_ray.cli.commands import _train_config

    cfg = _train_config(parser.parse_args(base + ["--weights", "w.pt"]))
    assert cfg.pretrained is None and cfg.weights == "w.pt"  # --weights alone: the file, not ImageNet
    assert _train_config(parser.parse_args(base + ["--pretrained", "none"])).pretrained is None
    with pytest.raises(ValueError, match="give one of them"):
        _train_config(parser.parse_args(base + ["--weights", "w.pt", "--pretrained", "imagenet"]))


@pytest.mark.slow  # ~13 s: Ray, the training data and the probe
@pytest.mark.usefixtures("ray_local")
def test_tune_prints_its_plan_and_wants_yes_past_an_hour_on_cpus(train_data_dir, tmp_path, capsys):
    """A timing probe of the first trial's model gives the estimate; thousands of trial-epochs of
    it on a machine without GPUs pass an hour: refused in one line before anything is written."""
    out = tmp_path / "sweep"
    argv = ["tune", "--data", str(train_data_dir), "--out", str(out), "--backbones", "simplecnn", "--pretrained",
            "none", "--freeze-ratios", "0.5", "--num-samples", "1000", "--epochs", "1000"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    plan = re.search(r"plan: 1000 trials x 1000 epochs .*estimate ([0-9.]+) (s|min|h) \((\d+) ms per training image",
                     captured.out)
    assert plan, captured.out
    err = [line for line in captured.err.strip().splitlines() if "error:" in line]
    assert len(err) == 1 and "pass --yes to start it" in err[0] and "without GPUs" in err[0], captured.err
    assert plan.group(2) == "h" and float(plan.group(1)) > 1
    assert not out.exists() or not any(out.iterdir())  # nothing written, no trial started


def test_train_off_a_terminal_logs_progress_lines_and_rounds_figures(train_data_dir, tmp_path, capsys, monkeypatch):
    """Under pytest stderr is no terminal: tqdm draws nothing, so the epoch's progress comes as
    log lines (every PROGRESS_EVERY_S; shortened here so a 3-batch epoch shows them)."""
    import mammo_ray.cli.commands as commands

    monkeypatch.setattr(commands, "PROGRESS_EVERY_S", 1e-6)
    code = main(["train", "--data", str(train_data_dir), "--out", str(tmp_path / "m"), "--backbone", "simplecnn",
                 "--pretrained", "none", "--epochs", "1", "--max-batches", "3", "--batch-size", "16"])
    assert code == 0
    captured = capsys.readouterr()
    lines = re.findall(r"epoch 1/1: (\d+)/48 \(\d+%\), 0 errors, [0-9.]+ images/s, ETA \S+; train_loss [0-9.]+",
                       captured.err)
    assert [int(n) for n in lines] == [16, 32, 48], captured.err
    best = re.search(r"best epoch 1: val_auc (\S+) val_accuracy (\S+)", captured.out)
    assert best and all(len(v.split(".")[-1]) <= 3 for v in best.groups()), captured.out


def test_console_figures_are_rounded():
    from mammo_ray.console import rounded

    assert rounded(0.5822222222222222) == 0.582 and rounded(None) is None and rounded(3) == 3


def test_annotations_csv_beside_the_images_is_not_called_unread(tmp_path, caplog):
    from mammo_ray.data.inputs import discover

    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    lesions = tmp_path / "lesions.csv"
    lesions.write_text("path,lesion_x,lesion_y,lesion_r\na.png,1,1,1\n")
    with caplog.at_level(logging.WARNING, logger="mammo_ray"):
        discover([str(tmp_path)], labels_optional=True)
    assert "lesions.csv is not read" in caplog.text  # a CSV nobody reads: still said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mammo_ray"):
        listing = discover([str(tmp_path)], labels_optional=True, read_elsewhere=(str(lesions),))
    assert "is not read" not in caplog.text and len(listing.records) == 1


def test_evaluate_console_summary_is_short():
    from mammo_ray.evaluate.report import console_summary

    res = {"n": 40, "metrics": {"roc_auc": 0.61234, "recall": 0.5, "specificity": 0.755},
           "ci": {"roc_auc": {"low": 0.4, "high": 0.8}}}
    report = {"checkpoints": [{"tag": "a", "backbone": "b", "freeze_ratio": 0.5, "train_metrics": {"val_auc": 0.7},
                               "sets": {"test": res, "external-x": {"metrics": None, "reason": "one class"}}}],
              "comparisons": []}
    lines = console_summary(report)
    assert lines == ["* a (val AUC 0.700) test n=40: AUC 0.612 [0.400, 0.800], sensitivity 0.500, specificity 0.755",
                     "* a (val AUC 0.700) external-x: n/a (one class)"]


def test_cli_consistency(capsys, caplog):
    """--version; a bare --tta refused alike in evaluate, score and explain; --overview-size with
    --top kept as a warned alias; --allow-spec-mismatch explained; plain-text top-level help; the
    predicted label's column named as such."""
    import mammo_ray
    from mammo_ray.explain.results import SCORE_COLUMNS

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"mammo-ray {mammo_ray.__version__}"
    archive = ["a", "--checkpoint", "c.pt", "--out", "o"]
    for argv in (["evaluate", "--checkpoint", "c.pt", "--data", "d", "--out", "o"], ["score", *archive],
                 ["explain", *archive]):
        with pytest.raises(SystemExit) as done:
            main([*argv, "--tta"])
        err = capsys.readouterr().err.strip().splitlines()
        assert done.value.code == 2 and len(err) == 1, err
        assert err[0].endswith("argument --tta: expected one argument: one of none, vflip, hflip, flips"), err
    parser = get_args_parser()
    assert parser.parse_args(["explain", *archive, "--overview-size", "8"]).top_n == 8
    with caplog.at_level(logging.WARNING, logger="mammo_ray"):
        assert parser.parse_args(["explain", *archive, "--top", "9"]).top_n == 9
    assert "--top is deprecated: use --overview-size" in caplog.text
    subs = _subparsers(parser)
    mismatch = next(a for a in subs["evaluate"]._actions if a.dest == "allow_spec_mismatch")
    assert mismatch.help and "pixel spec" in mismatch.help
    assert "``" not in parser.format_help() and "mammo-ray command line" in parser.format_help()
    assert "predicted_label" in SCORE_COLUMNS and "predicted" not in SCORE_COLUMNS
