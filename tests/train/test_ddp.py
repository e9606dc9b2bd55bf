"""Data-parallel training: the one loop on 2 gloo ranks against one process.

The ranks are real processes in a real gloo process group (``torch.multiprocessing``, the
same group Ray Train's ``TorchTrainer`` sets up for its workers), running
:func:`mammo_ray.train.loop.fit` exactly as a Ray Train worker does.
"""
from __future__ import annotations

import pickle
from dataclasses import replace
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mammo_ray.config import PreprocessSpec, TrainConfig
from mammo_ray.data.arrays import SplitArrays
from mammo_ray.models.checkpoint import load_checkpoint
from mammo_ray.train.feed import Batch, MemoryFeed, deal, micro_steps, with_lookahead
from mammo_ray.train.loop import build_training_model, evaluate, fit, make_loss
from mammo_ray.train.ranks import Ranks
from mammo_ray.train.data import epoch_order

SPEC = PreprocessSpec(size=(32, 32), dtype="uint8")


def synthetic(n: int, split: str, seed: int, signal: int = 60) -> SplitArrays:
    """Noise images whose brightness carries the label: a model can learn it, AUC is not 0.5."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 3 == 0).astype(np.int64)
    pixels = rng.integers(0, 150, size=(n, 32, 32)) + labels[:, None, None] * signal
    return SplitArrays(pixels=pixels.astype(np.uint8), labels=labels, image_ids=[f"{split}-{i:04d}" for i in range(n)],
                       patient_keys=[None] * n, split=split)


def config(**kw) -> TrainConfig:
    base = dict(backbone="simplecnn", pretrained="none", freeze_ratio=0.0, batch_size=8, epochs=1, max_batches=3,
                amp=False, device="cpu", patience=0, eval_batch_size=16, seed=3)
    return TrainConfig(**{**base, **kw})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, payload: str, folder: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with open(payload, "rb") as f:
            job = pickle.load(f)
        if job["mode"] == "fit":
            seen: list[tuple[int, list[str]]] = []
            fit(job["cfg"], SPEC, job["train"], job["val"], out=folder, trace=lambda e, ids: seen.append((e, ids)))
        else:  # "auc": the sharded validation of a given model
            model = build_training_model(job["cfg"])
            model.load_state_dict(job["state"])
            metrics, _ = evaluate(model, job["val"], norm=job["norm"], device=torch.device("cpu"),
                                  loss_fn=make_loss(job["cfg"], job["val"], torch.device("cpu")), cfg=job["cfg"])
            seen = [(0, metrics)]
        with open(Path(folder) / f"seen-rank{rank}.pkl", "wb") as f:
            pickle.dump(seen, f)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, job: dict, folder: Path) -> list[list[tuple[int, object]]]:
    """Run ``job`` on ``world`` gloo ranks; each rank's trace (epoch, ids) in rank order."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = folder / "job.pkl"
    payload.write_bytes(pickle.dumps(job))
    mp.spawn(_rank_main, args=(world, _free_port(), str(payload), str(folder)), nprocs=world, join=True)
    return [pickle.loads((folder / f"seen-rank{r}.pkl").read_bytes()) for r in range(world)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(str(folder / "last.pt"))["model"]


def assert_same_weights(a: dict, b: dict, *, buffers: bool) -> None:
    keys = [k for k in a if buffers or not ("running_" in k or "num_batches" in k)]
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("rows,batch,world", [(64, 8, 2), (69, 8, 2), (67, 4, 3), (5, 8, 2), (31, 32, 1), (33, 16, 2)])
def test_deal_gives_every_image_to_one_rank_once(rows, batch, world):
    order = epoch_order(np.zeros(rows, np.int64), seed=1, epoch=2, balanced=False)
    parts = [deal(order, batch, Ranks(r, world)) for r in range(world)]
    steps = {len(p) for p in parts}
    assert steps == {micro_steps(rows, batch, world)}  # every rank runs the same number of steps
    dealt = np.concatenate([np.concatenate(p) for p in parts])
    assert sorted(dealt.tolist()) == list(range(rows))  # each image exactly once: none dropped, none twice
    assert all(len(b) >= 2 for p in parts for b in p)  # BatchNorm never sees a batch of one
    # step j holds the same images whatever the split across ranks: two ranks at b equal one at 2b
    if world == 2 and rows % (2 * batch) == 0:
        single = deal(order, 2 * batch, Ranks(0, 1))
        for j, whole in enumerate(single):
            assert sorted(whole.tolist()) == sorted(np.concatenate([parts[0][j], parts[1][j]]).tolist())


def test_a_short_tail_of_a_stream_joins_the_batch_before():
    def b(ids):
        return Batch(np.zeros((len(ids), 2, 2), np.uint8), np.zeros(len(ids), np.int64), list(ids))

    out = list(with_lookahead([b("ab"), b("cd"), b("e")]))
    assert [(x.image_ids, more) for x, more in out] == [(["a", "b"], True), (["c", "d", "e"], False)]
    assert [(x.image_ids, m) for x, m in with_lookahead([b("a")])] == [(["a"], False)]
    assert list(with_lookahead([])) == []


@pytest.mark.slow
@pytest.mark.parametrize("case", ["simplecnn", "simplecnn-frozen-bn", "resnet18-freeze-0.5"])
def test_two_ranks_at_half_batch_equal_one_process(case, tmp_path):
    """k=3 optimizer steps on 2 gloo ranks at per-rank batch B/2 against one process.

    Where BatchNorm trains, each rank normalises by its own half-batch (torch's SyncBatchNorm
    runs on GPUs only), so one process is given the same half-batches as 2 accumulated
    micro-batches; where every BatchNorm is frozen (simplecnn at ratio 1), one process at batch B
    is the same computation.
    """
    train, val = synthetic(64, "train", 1), synthetic(23, "val", 2)
    if case == "simplecnn":
        ddp, one = config(), config(accumulate=2)
    elif case == "simplecnn-frozen-bn":
        ddp, one = config(freeze_ratio=1.0), config(freeze_ratio=1.0, batch_size=16)
    else:
        ddp, one = config(backbone="resnet18", freeze_ratio=0.5), config(backbone="resnet18", freeze_ratio=0.5,
                                                                         accumulate=2)
    run_ranks(2, {"mode": "fit", "cfg": ddp, "train": train, "val": val}, tmp_path / "ddp")
    fit(one, SPEC, train, val, out=str(tmp_path / "one"))
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    assert_same_weights(a, b, buffers=case == "simplecnn-frozen-bn")
    torch.manual_seed(one.seed)
    init = build_training_model(one).state_dict()
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], init[k])]
    assert moved, "no weight changed: the comparison would prove nothing"
    if case == "resnet18-freeze-0.5":
        from mammo_ray.models.freezing import freeze_units

        model = build_training_model(one)
        report = freeze_units(model, "resnet18", 0.5)
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert frozen and report.frozen_params > 0
        for name in frozen:  # frozen parameters never entered DDP's reducer: unchanged
            assert torch.equal(a[name], init[name]), name


@pytest.mark.slow
def test_every_image_once_per_epoch_across_ranks_and_the_same_run_twice(tmp_path):
    """2 ranks, 2 full epochs of 69 images (a tail that does not divide): each epoch's images
    are each trained on once by exactly one rank; the same seed and worker count give the same
    order and the same weights."""
    train, val = synthetic(69, "train", 4), synthetic(21, "val", 5)
    job = {"mode": "fit", "cfg": config(epochs=2, max_batches=0), "train": train, "val": val}
    first = run_ranks(2, job, tmp_path / "a")
    for epoch in (1, 2):
        ids = [i for rank in first for e, batch in rank for i in batch if e == epoch]
        assert sorted(ids) == sorted(train.image_ids), epoch  # once each, none twice, none left out
    history = load_checkpoint(str(tmp_path / "a" / "last.pt"))["history"]
    assert [h["train_images"] for h in history] == [69, 69]
    second = run_ranks(2, job, tmp_path / "b")
    assert first == second
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"), buffers=True)


@pytest.mark.slow
def test_sharded_validation_auc_equals_one_process(tmp_path):
    """Each of 2 ranks scores its share of an odd-sized val split; AUC over the gathered scores
    equals one process's AUC of the same model on the same split (averaging per-shard AUCs
    would not)."""
    from mammo_ray.models.normalization import resolve_normalization

    cfg = config()
    train, val = synthetic(64, "train", 6, signal=2), synthetic(23, "val", 7, signal=2)
    fit(cfg, SPEC, train, val, out=str(tmp_path / "m"))
    state = weights(tmp_path / "m")
    norm = resolve_normalization(cfg, SPEC)
    model = build_training_model(cfg)
    model.load_state_dict(state)
    single, _ = evaluate(model, val, norm=norm, device=torch.device("cpu"),
                         loss_fn=make_loss(cfg, MemoryFeed(val), torch.device("cpu")), cfg=cfg)
    ranks = run_ranks(2, {"mode": "auc", "cfg": cfg, "val": val, "state": state, "norm": norm}, tmp_path / "auc")
    sharded = [r[0][1] for r in ranks]
    assert 0.5 < single["val_auc"] < 1.0
    for m in sharded:
        assert m["val_auc"] == pytest.approx(single["val_auc"], abs=1e-12)
        assert m["val_loss"] == pytest.approx(single["val_loss"], rel=1e-6)


def test_non_square_16_bit_rows_train_end_to_end_with_accumulation(tmp_path):
    """Rows as `preprocess --size 48 32 --dtype uint16` writes them train in one process, with
    2 micro-batches per optimizer step: the LR schedule counts optimizer steps, not batches."""
    rng = np.random.default_rng(0)
    n = 40
    labels = (np.arange(n) % 2).astype(np.int64)
    pixels = (rng.integers(0, 40000, size=(n, 48, 32)) + labels[:, None, None] * 20000).astype(np.uint16)
    train = SplitArrays(pixels=pixels, labels=labels, image_ids=[f"t{i}" for i in range(n)], patient_keys=[None] * n,
                        split="train")
    val = SplitArrays(pixels=pixels[:12], labels=labels[:12], image_ids=[f"v{i}" for i in range(12)],
                      patient_keys=[None] * 12, split="val")
    spec = PreprocessSpec(size=(48, 32), dtype="uint16")
    result = fit(config(accumulate=2, max_batches=0, epochs=1), spec, train, val, out=str(tmp_path))
    row = result.history[0]
    assert row["train_images"] == n and row["optimizer_steps"] == 3  # 5 micro-batches of 8 -> 3 steps
    assert load_checkpoint(str(tmp_path / "best.pt"))["spec"]["size"] == [48, 32]


@pytest.mark.parametrize("backbone,ratio", [("resnet18", 0.25), ("simplecnn", 0.0)])
def test_activation_checkpointing_changes_memory_not_the_result(backbone, ratio, tmp_path):
    """Recomputed activations give the same weights and BatchNorm statistics after 3 steps (the
    recomputation leaves the running statistics alone: they move once per step, not twice)."""
    train, val = synthetic(48, "train", 8), synthetic(16, "val", 9)
    plain = config(backbone=backbone, freeze_ratio=ratio, max_batches=3)
    fit(plain, SPEC, train, val, out=str(tmp_path / "plain"))
    fit(replace(plain, activation_checkpointing=True), SPEC, train, val, out=str(tmp_path / "ckpt"))
    assert_same_weights(weights(tmp_path / "plain"), weights(tmp_path / "ckpt"), buffers=True)


def _bound_rank(rank: int, port: int, folder: str) -> None:
    import os
    import subprocess

    import torch.distributed as dist

    from mammo_ray.train.rendezvous import init_group

    Path(folder, f"pid{rank}").write_text(str(os.getpid()))
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # a caller's choice of interface would decide it
        os.environ.pop(var, None)
    init_group("gloo", rank, 2, "127.0.0.1", port, 60)
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.barrier()  # both ranks' sockets are open now: rank 0 lists them
    if rank == 0:
        listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        Path(folder, "ss.txt").write_text(listening)
        Path(folder, "sum.txt").write_text(str(float(t)))
        Path(folder, "ifname.txt").write_text(os.environ.get("GLOO_SOCKET_IFNAME", ""))
    dist.barrier()
    dist.destroy_process_group()


def test_the_process_group_listens_on_the_meeting_address_only(tmp_path):
    """Ray Train's own setup (env://) left rank 0's TCPStore on every interface (*:port), found
    by the demo's loopback check. Through train/rendezvous.py's init_group (what Ray Train's
    workers call, via BoundTorchConfig), 2 real gloo ranks meeting at 127.0.0.1 hold no
    listening socket on any other address, and their all-reduce works."""
    from mammo_ray.train.rendezvous import loopback_interface

    port = _free_port()
    mp.spawn(_bound_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "sum.txt").read_text() == "2.0"
    assert (tmp_path / "ifname.txt").read_text() == loopback_interface()  # gloo on loopback, whatever the host name says
    pids = [(tmp_path / f"pid{r}").read_text() for r in range(2)]
    ranks = [line for line in (tmp_path / "ss.txt").read_text().splitlines()
             if any(f"pid={pid}," in line for pid in pids)]
    assert any(f"127.0.0.1:{port} " in line for line in ranks), ranks  # the store, on the address given
    assert len(ranks) >= 3 and all(" 127.0.0.1:" in line for line in ranks), ranks  # + each rank's gloo pair
