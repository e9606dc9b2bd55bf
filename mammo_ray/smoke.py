"""``--smoke-test`` for every job entrypoint (``jobs/*.py``): one small phantom data set and,
where a stage needs one, a checkpoint trained for two epochs, all written under ``--out``;
then the stage's own command runs on them with the user's other flags. Seconds on a laptop,
and the same code path a cluster job takes."""
from __future__ import annotations

import os

from mammo_ray.cli import main
from mammo_ray.data.synth import write_phantoms

STAGES = ("preprocess", "train", "tune", "evaluate", "explain", "score")
SIZE = "64"


def _split_out(stage: str, argv: list[str]) -> tuple[str, list[str]]:
    """The smoke folder (``--out``, default ``smoke-<stage>``) and the other flags."""
    rest = [a for a in argv if a != "--smoke-test"]
    if "--out" in rest:
        i = rest.index("--out")
        out = rest[i + 1]
        del rest[i:i + 2]
        return out, rest
    return f"smoke-{stage}", rest


def _checked(code: int | None, what: str) -> None:
    if code:
        raise SystemExit(f"smoke test: {what} failed (exit {code})")


def smoke_data(out: str, n: int = 48) -> tuple[str, str]:
    """Phantoms (in class folders) preprocessed at 64 px, and an external set of raw phantoms
    from another seed. Returns (preprocessed folder, external raw folder)."""
    raw, data, external = (os.path.join(out, x) for x in ("phantoms", "data", "external-phantoms"))
    # the smoke test's own inputs and model: a rerun into the same folder replaces them
    write_phantoms(raw, n, seed=0, height=256, width=208, overwrite=True)
    write_phantoms(external, max(8, n // 4), seed=1, height=256, width=208, contrast=0.8, overwrite=True)
    _checked(main(["preprocess", raw, "--out", data, "--size", SIZE, "--overwrite"]), "preprocess")
    return data, external


def smoke_checkpoint(out: str, data: str) -> str:
    """simplecnn trained for two epochs on the smoke data; the path of its best checkpoint."""
    model = os.path.join(out, "model")
    _checked(main(["train", "--data", data, "--out", model, "--backbone", "simplecnn", "--pretrained", "none",
                   "--freeze-ratio", "0", "--epochs", "2", "--overwrite"]), "train")
    return os.path.join(model, "best.pt")


def smoke_argv(stage: str, argv: list[str]) -> list[str]:
    """The stage's command line on freshly made smoke inputs (``argv``'s other flags kept)."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: use one of {', '.join(STAGES)}")
    out, rest = _split_out(stage, argv)
    if stage == "preprocess":
        raw = os.path.join(out, "phantoms")
        write_phantoms(raw, 24, seed=0, height=256, width=208, overwrite=True)
        return ["preprocess", raw, "--out", os.path.join(out, "data"), "--size", SIZE, "--overwrite", *rest]
    data, external = smoke_data(out)
    if stage == "train":
        return ["train", "--data", data, "--out", os.path.join(out, "model"), "--backbone", "simplecnn", "--pretrained",
                "none", "--freeze-ratio", "0", "--epochs", "2",
                *rest]
    if stage == "tune":
        return ["tune", "--data", data, "--out", os.path.join(out, "sweep"), "--backbones", "simplecnn", "--pretrained",
                "none",
                "--freeze-ratios", "0", "0.5", "--lr-bounds", "1e-3:1e-2", "--epochs", "2", *rest]
    checkpoint = smoke_checkpoint(out, data)
    if stage == "evaluate":
        return ["evaluate", "--checkpoint", checkpoint, "--data", data, "--external", external,
                "--out", os.path.join(out, "evaluate"), "--n-boot", "50", *rest]
    if stage == "score":
        return ["score", external, "--checkpoint", checkpoint, "--out", os.path.join(out, "score"), *rest]
    return ["explain", external, "--checkpoint", checkpoint, "--out", os.path.join(out, "explain"),
            "--preview-size", "128", *rest]


def run_job(stage: str, argv: list[str]) -> int:
    """A job entrypoint: ``--smoke-test`` runs the stage on smoke inputs, else the stage as given."""
    return main(smoke_argv(stage, argv) if "--smoke-test" in argv else [stage, *argv])
