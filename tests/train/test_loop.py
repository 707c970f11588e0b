"""Training end to end on the shared tiny store: cached == online, determinism, a SIGKILL inside a
checkpoint write and the resume, online-fresh views and their resume, export to timm, refusals.
Two torchrun ranks: tests/train/test_two_ranks.py."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from store.features import FeatureStore, StoreError
from data.shards import ImageSet
from train.config import load_config
from train.loader import Plan
from train.learner import NonFiniteLoss
from train.loop import train
from train.sources import build_source
from train.objective import build_objective

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = {"model.depth": 2}           # a 2-block student where the student is not the point


def _overrides(data, store, **kw):
    base = {"data.images": data, "data.store": store, "data.views": 2, "data.shuffle_window": 2,
            "data.decoder": "pil", "data.num_workers": 1, "data.streams": 2, "train.batch_size": 4, "train.log_every": 1,
            "schedule.epochs": 4, "schedule.warmup_epochs": 1}
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def _cfg(data, store, **kw):
    return load_config(None, _overrides(data, store, **kw))


def _losses(run):
    return [json.loads(ln)["loss"] for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_cached_and_online_give_the_same_loss_and_gradients(prepared_data, teacher_store, tmp_path, codec,
                                                            step_difference, tiny_teacher):
    store = teacher_store
    teachers = "[mae,mocov3,ibot]"
    if codec == "int8":            # a one-teacher int8 store keeps this test short
        from extract.config import ExtractConfig
        from extract.runner import run_extraction
        store = tmp_path / "int8"
        run_extraction(ExtractConfig(store=store, views=2, seed=0, batch_size=4, codec="int8", decoder="pil",
                                     view_pixels="none", device="cpu"),
                       teacher=tiny_teacher("mae"), data=ImageSet.open(prepared_data),
                       progress=False)
        teachers = "[mae]"
    cfg = _cfg(prepared_data, store, **TINY, **{"data.teachers": teachers})
    plan = Plan(ImageSet.open(prepared_data), seed=0, views=2, batch_size=4, window=2, streams=2)
    cached, stats = build_source(cfg, plan, online=False, device="cpu")
    online, stats_o = build_source(cfg, plan, online=True, device="cpu")
    for epoch in (0, 1):
        _, cb = next(iter(cached.epoch(epoch)))
        _, ob = next(iter(online.epoch(epoch)))
        bc, bo = cached.materialize(cb, "cpu"), online.materialize(ob, "cpu")
        for key in ("index", "view", "images", "student_visible"):
            torch.testing.assert_close(bc[key], bo[key], rtol=0, atol=0)
        for name in bc["teachers"]:
            torch.testing.assert_close(bc["teachers"][name]["index"], bo["teachers"][name]["index"], rtol=0, atol=0)
        torch.manual_seed(0)
        objective = build_objective(cfg, stats)
        lo, rel_loss, rel_grad = step_difference(objective, bo, bc)
        print(f"{codec} epoch {epoch}: loss {lo:.6f}, relative loss diff {rel_loss:.2e}, "
              f"relative gradient diff {rel_grad:.2e}")
        bound = 1e-3 if codec == "fp16" else 2e-2
        assert rel_loss < bound and rel_grad < bound


def test_online_sources_rebuild_a_stores_teachers_from_its_build_records_and_refuse_another_build(
        teacher_store, tmp_path):
    """The shared store's tiny teachers come back from the store alone (no patch, no config key):
    the build each records (architecture, model arguments, seed) gives the recorded digest. A
    record altered to another build, or absent as in an older store (read as the descriptor's
    default build, a ViT-B, which these weights are not), is refused naming the teacher."""
    import zarr
    from teachers.vit import default_build
    from train.online import teachers_of_store

    fs = FeatureStore.open(teacher_store)
    for name, t in teachers_of_store(fs, ["mae", "ibot"], device="cpu").items():
        ts = fs.teacher(name)
        assert t.build == ts.build == ts.config["build"] and ts.build["seed"] == 0
        assert len(t.vit.blocks) == 1 and t.embed_dim == ts.width and t.digest == ts.config["checkpoint_digest"]
    store = tmp_path / "store"
    shutil.copytree(teacher_store, store)
    group = zarr.open_group(str(store / "mae"), mode="a")
    config = dict(group.attrs["config"])
    config["build"] = {**config["build"], "seed": 1}
    group.attrs["config"] = config
    with pytest.raises(StoreError, match=r"online teacher mae \(random-init\) is not the one the store .* made with"):
        teachers_of_store(FeatureStore.open(store), ["mae"], device="cpu")
    group.attrs["config"] = {k: v for k, v in config.items() if k != "build"}
    assert FeatureStore.open(store).teacher("mae").build == default_build("mae", seed=0)
    with pytest.raises(StoreError, match=r"online teacher mae \(random-init\) is not the one the store"):
        teachers_of_store(FeatureStore.open(store), ["mae"], device="cpu")


def test_two_runs_with_one_seed_log_identical_losses(prepared_data, teacher_store, tmp_path):
    cfg = _cfg(prepared_data, teacher_store, **TINY)
    train(cfg, out_dir=tmp_path / "a", max_steps=3, progress=False)
    train(cfg, out_dir=tmp_path / "b", max_steps=3, progress=False)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == 3 and a == b
    assert json.loads((tmp_path / "a" / "run.json").read_text())["git_commit"]
    assert "gate:" in (tmp_path / "a" / "config.yaml").read_text()
    assert (tmp_path / "a" / "loss.png").stat().st_size > 1000


def _train_cmd(data, store, out, *extra, steps=6, **kw):
    return [sys.executable, str(ROOT / "cli.py"), "train", "--data", str(data), "--store", str(store),
            "--out", str(out), "--steps", str(steps), "--ckpt-steps", "1", "--device", "cpu", *extra,
            *_overrides(data, store, **kw)[2:]]


# `cli.py ARGS` in a new interpreter whose third checkpoint write stops half way: torch.save writes
# half of the checkpoint's bytes into the temporary file, then the process SIGKILLs itself.
_TORN = """
import io, os, signal, sys
import torch
from cli import main
real, saves = torch.save, []

def torn_save(obj, f, *args, **kwargs):
    saves.append(obj)
    if len(saves) < 3:
        return real(obj, f, *args, **kwargs)
    whole = io.BytesIO()
    real(obj, whole, *args, **kwargs)
    f.write(whole.getvalue()[:len(whole.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = torn_save
main(sys.argv[1:])
"""


def test_sigkill_in_a_checkpoint_write_then_resume_repeat_the_uninterrupted_loss_sequence(
        prepared_data, teacher_store, tmp_path, one_torch_thread):
    """The uninterrupted run and the resume run in this process; the killed one in another (one
    thread each, so the losses repeat bit for bit across processes)."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    cfg = _cfg(prepared_data, teacher_store, **TINY)
    train(cfg, out_dir=ref, max_steps=6, progress=False)
    script = tmp_path / "torn.py"
    script.write_text(_TORN)
    killed = subprocess.run([sys.executable, str(script), *_train_cmd(prepared_data, teacher_store, run, **TINY)[2:]],
                            cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert list(run.glob("last.pt.tmp*"))                       # killed inside the write of step 3's checkpoint
    assert torch.load(run / "last.pt", weights_only=False)["step"] == 2 and len(_losses(run)) == 3
    train(cfg, out_dir=run, max_steps=6, ckpt_steps=1, resume=True, progress=False)
    assert len(_losses(ref)) == 6 and _losses(run) == _losses(ref)
    # without --resume an existing run is refused; with another config the resume is refused
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(cfg, out_dir=run, max_steps=6, progress=False)
    with pytest.raises(ValueError, match="gate.mode: checkpoint 'consensus', now 'uniform'"):
        train(_cfg(prepared_data, teacher_store, **TINY, **{"gate.mode": "uniform"}), out_dir=run, max_steps=6,
              resume=True, progress=False)


def test_exported_student_loads_strictly_in_timm(prepared_data, teacher_store, tmp_path):
    import timm
    cfg = _cfg(prepared_data, teacher_store)
    train(cfg, out_dir=tmp_path / "run", max_steps=1, progress=False)
    out = tmp_path / "student.safetensors"
    from click.testing import CliRunner
    from cli import main
    r = CliRunner().invoke(main, ["export", str(tmp_path / "run"), str(out)])   # in process: no subprocess needed
    assert r.exit_code == 0, (r.output, r.exception)
    assert str(out) in r.stdout
    model = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)))
    from safetensors.torch import load_file
    a, b = load_file(out), load_file(tmp_path / "run" / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"],
                       ck["model"]["student.vit.blocks.0.attn.qkv.weight"])


def test_mismatched_or_incomplete_stores_are_refused(prepared_data, photo_tree, teacher_store, tmp_path):
    with pytest.raises(StoreError, match="seed: store has 0, expected 1"):
        train(_cfg(prepared_data, teacher_store, **{"data.seed": 1}), out_dir=tmp_path / "a", max_steps=1)
    with pytest.raises(StoreError, match="holds 2 views per image but the config sets data.views=4"):
        train(_cfg(prepared_data, teacher_store, **{"data.views": 4}), out_dir=tmp_path / "b", max_steps=1)
    with pytest.raises(StoreError, match="no teacher 'dino'"):
        train(_cfg(prepared_data, teacher_store, **{"data.teachers": "[mae,dino]"}), out_dir=tmp_path / "c",
              max_steps=1)
    broken = tmp_path / "broken"
    shutil.copytree(teacher_store, broken)
    FeatureStore.open(broken).teacher("ibot").group["complete"][0, 1] = 3
    with pytest.raises(StoreError, match="1 of 6 blocks are incomplete"):
        train(_cfg(prepared_data, broken), out_dir=tmp_path / "d", max_steps=1)
    from data.shards import prepare
    other = prepare(photo_tree, tmp_path / "other", shard_size=4, progress=False)
    with pytest.raises(StoreError, match="data_digest"):
        train(_cfg(other.root, teacher_store), out_dir=tmp_path / "e", max_steps=1)


def _nan_on_forward(monkeypatch, n: int) -> None:
    """Make the loss of the objective's ``n``-th forward NaN."""
    import train.learner as learner
    real = learner.build_objective

    def poisoned(cfg, stats):
        obj = real(cfg, stats)
        forward, calls = obj.forward, []

        def forward_nan(batch):
            out = forward(batch)
            calls.append(1)
            if len(calls) == n:
                out["loss"] = out["loss"] * float("nan")
            return out
        obj.forward = forward_nan
        return obj
    monkeypatch.setattr(learner, "build_objective", poisoned)


def test_non_finite_loss_stops_the_run_naming_the_step(prepared_data, teacher_store, tmp_path, monkeypatch):
    _nan_on_forward(monkeypatch, 2)
    cfg = _cfg(prepared_data, teacher_store, **TINY, **{"train.log_every": 3})
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 1"):
        train(cfg, out_dir=tmp_path / "nan", max_steps=6, progress=False)


def test_a_nan_between_a_log_step_and_a_checkpoint_never_replaces_the_last_good_checkpoint(
        prepared_data, teacher_store, tmp_path, monkeypatch):
    """Logs at steps 4 and 8, checkpoints every 3 steps, the loss of step 4 (0-based) NaN: the
    checkpoint due after 6 steps is not written (the run stops there naming step 4), and last.pt
    still holds the finite state after 3 steps that the message names."""
    _nan_on_forward(monkeypatch, 5)
    cfg = _cfg(prepared_data, teacher_store, **{"train.log_every": 4, "model.depth": 2, "data.teachers": "[mae]",
                                                      "schedule.epochs": 16, "train.ckpt_every": 100})
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss, match=f"non-finite loss at step 4; stopping \\(last good checkpoint: "
                                            f"{run / 'last.pt'}\\)"):
        train(cfg, out_dir=run, max_steps=8, ckpt_steps=3, progress=False)
    saved = torch.load(run / "last.pt", weights_only=False)
    assert saved["step"] == 3
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_compiled_student_side_matches_eager_losses(prepared_data, teacher_store, tmp_path, monkeypatch):
    """train.compile=true wraps the student side in torch.compile (after DDP, if any). The
    aot_eager backend keeps this test short (inductor's first C++ compile of the student
    takes ~90 s on two CPU cores); it traces the same graph inductor would compile."""
    import train.learner as learner
    monkeypatch.setattr(learner, "COMPILE_BACKEND", "aot_eager")
    small = {"model.depth": 2, "data.teachers": "[mae]"}
    train(_cfg(prepared_data, teacher_store, **small), out_dir=tmp_path / "eager", max_steps=2, progress=False)
    train(_cfg(prepared_data, teacher_store, **small, **{"train.compile": "true"}), out_dir=tmp_path / "compiled",
          max_steps=2, progress=False)
    eager, compiled = np.array(_losses(tmp_path / "eager")), np.array(_losses(tmp_path / "compiled"))
    print(f"eager {eager.tolist()}, compiled {compiled.tolist()}")
    assert len(eager) == 2 and np.all(np.abs(compiled - eager) <= 1e-5 * np.abs(eager))
    keys = torch.load(tmp_path / "compiled" / "last.pt", weights_only=False)["model"].keys()
    assert "student.vit.cls_token" in keys and not any("_orig_mod" in k for k in keys)


def test_resume_loads_to_the_cpu_and_restores_each_generator_with_its_own_setter(tmp_path, monkeypatch):
    """A checkpoint loaded onto its device (map_location=device, as before) moves the CPU RNG
    state there and torch.set_rng_state refuses it ("meta" stands in for a GPU); loaded onto
    the CPU, the CPU state is restored exactly and the CUDA state goes, as a CPU byte
    tensor, to torch.cuda.set_rng_state for the run's device."""
    from core.run import load_checkpoint
    from train.noise import restore_rng
    torch.manual_seed(3)
    cuda_state = torch.randint(0, 256, (16,), dtype=torch.uint8)      # stands in for a GPU's state
    saved = dict(torch=torch.get_rng_state(), cuda=cuda_state)
    path = tmp_path / "last.pt"
    torch.save(dict(step=5, rng=saved), path)
    expected = torch.rand(4)
    with pytest.raises((RuntimeError, TypeError)):
        torch.set_rng_state(torch.load(path, map_location="meta", weights_only=False)["rng"]["torch"])
    ck = load_checkpoint(path)
    assert all(t.device.type == "cpu" for t in ck["rng"].values())
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state, device)))
    torch.rand(100)                                                     # move the generator on
    restore_rng(ck["rng"], "cuda:1")
    assert torch.equal(torch.rand(4), expected)
    ((state, device),) = calls
    assert state.device.type == "cpu" and state.dtype == torch.uint8 and torch.equal(state, cuda_state)
    assert device == torch.device("cuda:1")
    calls.clear()
    restore_rng(ck["rng"], "cpu")                                  # a CPU run sets no CUDA state
    assert calls == [] and torch.equal(torch.rand(4), expected)


# ---- online-fresh: a new view per (image, epoch) ------------------------------------------------
# online-fresh without a store: two random teachers (tiny under the tiny_random_init fixture), statistics
# on 4 images, a 2-block student
FRESH = {"data.source": "online-fresh", "data.teachers_from": "random-init", "data.teachers": "[mae,ibot]",
         "data.stats_images": 4, **TINY}


def _views_by_index(source, epoch):
    """{image index: (teacher mae's visible ids, the decoded crop)} over one epoch's CPU batches."""
    out = {}
    for _, b in source.epoch(epoch):
        for k, i in enumerate(b["index"].tolist()):
            out[i] = (b["teachers"]["mae"]["visible"][k], b["images"][k])
    return out


def test_fresh_views_differ_every_epoch_while_replayed_views_repeat_with_period_v(prepared_data):
    from train.loader import OnlineSource
    from train.online import FreshSource
    plan = Plan(ImageSet.open(prepared_data), seed=0, views=2, batch_size=4, window=2, streams=2)
    replay = OnlineSource(plan, teachers={"mae": None}, decoder="pil")      # CPU batches only: no teacher runs
    fresh = FreshSource(plan, teachers={"mae": None}, decoder="pil")
    r = [_views_by_index(replay, e) for e in range(4)]
    f = [_views_by_index(fresh, e) for e in range(4)]

    def same(a, b):
        return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    compared = 0
    for e in range(4):
        for d in range(e + 1, 4):
            for i in set(r[e]) & set(r[d]):
                compared += 1
                assert same(r[e][i], r[d][i]) == ((d - e) % 2 == 0), (i, e, d)     # period V = 2
                assert not same(f[e][i], f[d][i]), (i, e, d)
                assert not torch.equal(f[e][i][0], f[d][i][0]) and not torch.equal(f[e][i][1], f[d][i][1])
    assert compared > 20
    # the same images, order and student masks as the replay source: only the views differ
    for (_, a), (_, b) in zip(replay.epoch(1), fresh.epoch(1)):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["student_visible"], b["student_visible"])


def test_fresh_view_global_batches_do_not_depend_on_the_world_size(prepared_data):
    from train.online import FreshSource
    data = ImageSet.open(prepared_data)

    def batches(rank, world):
        plan = Plan(data, seed=0, views=2, batch_size=4, window=2, streams=2, rank=rank, world=world)
        return [b for e in (0, 1) for _, b in FreshSource(plan, teachers={"mae": None}, decoder="pil").epoch(e)]

    one, r0, r1 = batches(0, 1), batches(0, 2), batches(1, 2)
    assert len(one) == len(r0) == len(r1) == 4
    for g, a, b in zip(one, r0, r1):          # rank 0's half then rank 1's is the global batch
        assert torch.equal(g["index"], torch.cat([a["index"], b["index"]]))
        assert torch.equal(g["images"], torch.cat([a["images"], b["images"]]))
        assert torch.equal(g["student_visible"], torch.cat([a["student_visible"], b["student_visible"]]))
        assert torch.equal(g["teachers"]["mae"]["visible"],
                           torch.cat([a["teachers"]["mae"]["visible"], b["teachers"]["mae"]["visible"]]))


def test_fresh_view_training_crashed_and_resumed_repeats_the_uninterrupted_losses_and_keeps_its_statistics(
        prepared_data, tmp_path, one_torch_thread, arm_crash, monkeypatch, tiny_random_init):
    ref, run = tmp_path / "ref", tmp_path / "run"
    cfg = _cfg(prepared_data, "", **FRESH)
    train(cfg, out_dir=ref, max_steps=4, progress=False)
    with pytest.raises(arm_crash(monkeypatch, 2)):
        train(cfg, out_dir=run, max_steps=4, ckpt_steps=1, progress=False)
    assert len(_losses(run)) == 2
    train(cfg, out_dir=run, max_steps=4, ckpt_steps=1, resume=True, progress=False)
    assert len(_losses(ref)) == 4 and _losses(run) == _losses(ref)
    assert json.loads((ref / "run.json").read_text())["source"] == "online-fresh"
    assert (ref / "teacher_stats.npz").is_file()
    # a run folder's statistics are never replaced by others'
    with pytest.raises(StoreError, match="teacher_stats.npz holds the adapter statistics"):
        train(_cfg(prepared_data, "", **{**FRESH, "data.stats_images": 5}), out_dir=run, max_steps=4,
              resume=True, progress=False)


def test_sources_without_a_store_name_what_they_miss(prepared_data, tmp_path):
    with pytest.raises(ValueError, match="data.source=cached reads the teacher tokens from a store"):
        train(_cfg(prepared_data, ""), out_dir=tmp_path / "a", max_steps=1, progress=False)
    with pytest.raises(ValueError, match="online-replay replays the store's views: set data.store"):
        train(_cfg(prepared_data, "", **{"data.source": "online-replay"}), out_dir=tmp_path / "b", max_steps=1,
              progress=False)
    with pytest.raises(ValueError, match="online-fresh without data.store needs data.teachers_from"):
        train(_cfg(prepared_data, "", **{"data.source": "online-fresh"}), out_dir=tmp_path / "c", max_steps=1,
              progress=False)
    with pytest.raises(ValueError, match="contradicts data.source=online-fresh"):
        train(_cfg(prepared_data, "", **FRESH), out_dir=tmp_path / "d", online=True, max_steps=1, progress=False)
    with pytest.raises(FileNotFoundError, match="missing official checkpoint file"):
        train(_cfg(prepared_data, "", **{**FRESH, "data.teachers_from": str(tmp_path)}), out_dir=tmp_path / "e",
              max_steps=1, progress=False)
