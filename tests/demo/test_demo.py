"""The demo and its report: held-out loss and CKA detect distillation, gate maps are the objective's weights,
`inspect --run` draws them, and a second demo run reuses everything the first made."""
import base64
import io
import os
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from data.shards import ImageSet
from train import diagnostics as report
from train.config import load_config
from demo.pipeline import run_demo
from demo.stages import DemoError, DemoSettings
from train.loop import train

TINY_STUDENT = ["model.depth=2", "decoder.depth=1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_run(prepared_data, teacher_store, tmp_path_factory):
    """A 2-block student trained 16 steps (batch 4, lr 1e-3) on the shared 13-image store."""
    out = tmp_path_factory.mktemp("demo_run") / "run"
    cfg = load_config(None, [f"data.images={prepared_data}", f"data.store={teacher_store}", "data.views=2",
                             "data.shuffle_window=2", "data.decoder=pil", "data.num_workers=1", "data.streams=2",
                             "train.batch_size=4", "train.log_every=4", "schedule.epochs=8",
                             "schedule.warmup_epochs=1", "optim.base_lr=0.064",
                             "train.clip_grad=3.0",   # a rate this high (16 steps to learn) needs clipping
                             *TINY_STUDENT])
    train(cfg, out_dir=out, max_steps=16, progress=False)
    return out


@pytest.fixture(scope="module")
def heldout(tmp_path_factory, tiny_teacher):
    """(data, store) of the demo's held-out photos (samples/photos.py HELDOUT_PHOTOS: none of
    them is in the training tree), extracted by the training store's teachers, one view."""
    from extract.config import ExtractConfig
    from extract.runner import run_extraction
    from samples.photos import HELDOUT_PHOTOS, write_photo_tree
    from data.shards import prepare

    root = tmp_path_factory.mktemp("heldout")
    tree = write_photo_tree(root / "photos", max_side=256, photos=HELDOUT_PHOTOS)
    prepare(tree, root / "data", shard_size=5, progress=False, workers=0)
    data = ImageSet.open(root / "data")
    for name in ("mae", "mocov3", "ibot"):
        run_extraction(ExtractConfig(store=root / "store", views=1, seed=0, batch_size=5, decoder="pil",
                                     stats_images=len(data), codec="fp16", view_pixels="none", device="cpu"),
                       teacher=tiny_teacher(name), data=data, progress=False)
    return root / "data", root / "store"


def test_the_demos_heldout_split_holds_other_photos_than_its_training_split(tmp_path):
    from samples.photos import HELDOUT_PHOTOS, PHOTOS, write_photo_splits

    def sources(photos):
        return {load.source for _, _, load, *_ in photos}

    assert sources(PHOTOS).isdisjoint(sources(HELDOUT_PHOTOS)) and len(sources(HELDOUT_PHOTOS)) == 9
    train, held, _ = write_photo_splits(tmp_path, copies=2, heldout_copies=2, max_side=64)

    def photo(path):                    # the photo a file is made from: its stem without the crop suffix
        stem, _, copy = path.stem.rpartition("_c")
        return stem if copy.isdigit() else path.stem

    names = {split: {photo(p) for p in tree.rglob("*.*")} for split, tree in (("train", train), ("held", held))}
    assert names["train"] == {p[1] for p in PHOTOS} and names["held"] == {p[1] for p in HELDOUT_PHOTOS}
    assert len(list(held.rglob("*.*"))) == 18 and len(list(train.rglob("*.*"))) == 26


def _samples(prepared_data, teacher_store, indices, view=0):
    return report.load_samples(teacher_store, ImageSet.open(prepared_data), indices=indices,
                               views=[view] * len(indices), epoch=0, teachers=["mae", "mocov3", "ibot"])


def test_linear_cka_is_one_under_rotation_and_scale_and_small_for_independent_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    assert report.linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-9)
    assert report.linear_cka(x, torch.randn(400, 12, generator=g)) < 0.1
    half = torch.cat([x[:, :6], torch.randn(400, 6, generator=g)], 1)
    assert 0.3 < report.linear_cka(x, half) < 0.8
    with pytest.raises(ValueError, match="same N|\\(N, D1\\)"):
        report.linear_cka(x, x[:10])


def test_cka_with_the_fused_targets_scores_both_students_on_every_covered_held_out_token(heldout, tiny_run):
    """The score's rows are CLS + the student-visible patches some teacher saw, the targets the
    agreement gate's. Whether distillation raises it is no property of random teachers and 16
    steps (docs/performance.md: the demo's trained student scores below the untrained one; so did
    this run's on full-depth random ViT-B teachers of seeds 1 and 2, 0.24 vs 0.27 and 0.31 vs
    0.32), so it is not asserted here; the held-out losses below check what training does."""
    _, trained = report.load_run(tiny_run)
    _, untrained = report.load_run(tiny_run, trained=False)
    assert not torch.equal(trained.student.vit.blocks[0].attn.qkv.weight,
                           untrained.student.vit.blocks[0].attn.qkv.weight)
    samples = _samples(*heldout, list(range(9)))
    batch = report.sample_batch(samples, trained.teacher_names)
    scores = report.cka_scores(trained, untrained, batch)
    print(scores)
    covered = sum(1 + len(np.intersect1d(s.student_visible, np.concatenate(list(s.teacher_visible.values()))))
                  for s in samples)
    assert scores["tokens"] == covered and scores["gate"] == "agreement"
    for column in ("fused", *trained.teacher_names):
        assert 0 < scores[column]["trained"] <= 1 and 0 < scores[column]["untrained"] <= 1
    assert scores["fused"]["trained"] != scores["fused"]["untrained"]


def test_heldout_losses_are_the_objectives_losses_and_distillation_lowers_them_on_unseen_photos(heldout, tiny_run):
    _, trained = report.load_run(tiny_run)
    _, untrained = report.load_run(tiny_run, trained=False)
    batch = report.sample_batch(_samples(*heldout, list(range(9))), trained.teacher_names)
    losses = report.heldout_losses(trained, untrained, batch)
    print(losses)
    assert losses["gate"] == "agreement"
    for lab in ("trained", "untrained"):
        assert losses[lab]["total"] == pytest.approx(losses[lab]["token"] + losses[lab]["spatial"], rel=1e-12)
    assert losses["trained"]["total"] < 0.8 * losses["untrained"]["total"]
    # with a gate that has no student term the targets are the objective's own: the same losses
    for lab, objective in (("trained", trained), ("untrained", untrained)):
        objective.gate_mode = "agreement"
        with torch.no_grad():
            logs = objective(batch)
        assert float(logs["loss_token"]) == pytest.approx(losses[lab]["token"], rel=1e-5)
        assert float(logs["loss_spatial"]) == pytest.approx(losses[lab]["spatial"], rel=1e-5)


def test_gate_maps_are_the_objectives_weights_nan_where_a_teacher_did_not_look(
        prepared_data, teacher_store, tiny_run):
    _, objective = report.load_run(tiny_run)
    samples = _samples(prepared_data, teacher_store, [3, 9], view=1)
    batch = report.sample_batch(samples, objective.teacher_names)
    maps = report.gate_maps(objective, batch)
    w = objective(batch, return_weights=True)["weights"]
    for b, (s, m) in enumerate(zip(samples, maps)):
        stack = np.stack([m[n] for n in objective.teacher_names])              # (K, 196)
        for k, name in enumerate(objective.teacher_names):
            seen = np.zeros(196, bool)
            seen[s.teacher_visible[name]] = True
            assert np.isnan(m[name][~seen]).all()
            np.testing.assert_allclose(m[name][seen], w[k, b, 1:][torch.from_numpy(seen)].numpy(), rtol=1e-6)
        anyone = ~np.isnan(stack).all(0)
        np.testing.assert_allclose(np.nansum(stack[:, anyone], 0), 1.0, rtol=1e-5)


def test_cli_inspect_with_a_run_draws_the_gate_weight_row(prepared_data, teacher_store, tiny_run, tmp_path):
    from cli import main
    args = ["inspect", str(teacher_store), "--data", str(prepared_data), "--index", "5", "--device", "cpu"]
    plain = CliRunner().invoke(main, args + ["--out", str(tmp_path / "plain.png")])
    gated = CliRunner().invoke(main, args + ["--out", str(tmp_path / "gated.png"), "--run", str(tiny_run)])
    assert plain.exit_code == 0 and gated.exit_code == 0, plain.output + gated.output
    assert Image.open(tmp_path / "gated.png").height > 1.7 * Image.open(tmp_path / "plain.png").height


def _tiny_settings(**kw):
    base = dict(copies=1, heldout_copies=1, views=2, steps=4, batch_size=4, stats_images=4, teacher_batch=8,
                panels=2, bench_steps=0, decoder="pil", train_overrides=(*TINY_STUDENT, "decoder.width=96"))
    base.update(kw)
    return DemoSettings(**base)


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "report" not in p.parts}


class _Refs(HTMLParser):
    """Every attribute that can point outside the page, the images, and the text."""

    def __init__(self):
        super().__init__()
        self.refs, self.images, self.text = [], 0, []

    def handle_starttag(self, tag, attrs):
        self.images += tag == "img"
        self.refs += [(tag, k, v or "") for k, v in attrs if k in ("src", "href", "srcset", "action", "data", "poster")]

    def handle_data(self, data):
        self.text.append(data)


def _assert_self_contained(page, *, images, text):
    source = page.read_text()
    parser = _Refs()
    parser.feed(source)
    assert parser.images == images and len(parser.refs) == images, parser.refs
    for tag, key, value in parser.refs:              # figures are data: URIs, nothing is a file or a server
        assert tag == "img" and key == "src" and value.startswith("data:image/png;base64,"), (tag, key, value[:60])
        assert Image.open(io.BytesIO(base64.b64decode(value.split(",", 1)[1]))).width > 100
    assert "http://" not in source and "https://" not in source and "url(" not in source and "@import" not in source
    assert all(t in "".join(parser.text) for t in text)


def test_html_report_embeds_its_figures_and_refuses_what_it_cannot_embed(tmp_path):
    from demo.report import to_html, to_markdown
    Image.new("RGB", (120, 40), (200, 10, 10)).save(tmp_path / "f.png")
    blocks = [("h1", "T"), ("p", "a **b** `c<d>`"), ("table", ["x", "y"], [["1", "2"]], None), ("img", "fig", "f.png"),
              ("ul", ["one"])]
    (tmp_path / "r.html").write_text(to_html(blocks, tmp_path))
    _assert_self_contained(tmp_path / "r.html", images=1, text=("T", "c<d>", "one"))
    assert "<strong>b</strong>" in (tmp_path / "r.html").read_text()
    assert "![fig](f.png)" in to_markdown(blocks) and "| x | y |" in to_markdown(blocks)
    (tmp_path / "f.svg").write_text("<svg/>")
    with pytest.raises(ValueError, match="f.svg"):
        to_html([("img", "fig", "f.svg")], tmp_path)


def test_second_demo_run_reuses_every_stage_refuses_other_settings_and_resumes_a_killed_run(tmp_path,
                                                                                            tiny_random_init):
    out = tmp_path / "demo"
    lines = []
    first = run_demo(out=out, settings=_tiny_settings(), progress=False, echo=lines.append)
    assert first["reused"] == [] and len(lines) == 10 and lines[0].count("UNTRAINED") == 3
    assert all(ln.startswith(f"[{k + 1}/9]") for k, ln in enumerate(lines[1:]))
    readme = first["report"].read_text()
    for part in ("UNTRAINED", "held-out loss", "linear CKA", "Store size per codec", "panel_", "Not measured"):
        assert part in readme
    for png in ("losses.png", "gates.png"):
        assert Image.open(out / "report" / png).width > 300
    assert len(list((out / "report").glob("panel_*.png"))) == 2
    _assert_self_contained(first["html"], images=4, text=("UNTRAINED", "linear CKA", "Store size per codec"))
    before = _mtimes(out)

    lines.clear()
    second = run_demo(out=out, settings=_tiny_settings(), progress=False, echo=lines.append)
    assert second["reused"] == ["photos", "prepared train shards", "prepared heldout shards",
                                "train feature store (all teachers complete)",
                                "heldout feature store (all teachers complete)", "training run (4 steps)",
                                "held-out evaluation", "store size measurement"]
    assert _mtimes(out) == before                         # nothing outside the report was rewritten
    assert second["cka"] == first["cka"] and second["heldout_loss"] == first["heldout_loss"]
    readme = second["report"].read_text()
    assert "Reused from an earlier run" in readme and "| first run (s) | this run (s) |" in readme
    _assert_self_contained(second["html"], images=4, text=("Reused from an earlier run", "first run (s)"))

    with pytest.raises(DemoError, match=r"steps: .* has 4, now 5"):
        run_demo(out=out, settings=_tiny_settings(steps=5), progress=False, echo=lines.append)

    os.remove(out / "run" / "student.safetensors")        # as if killed after the last checkpoint
    lines.clear()
    run_demo(out=out, settings=_tiny_settings(), progress=False, echo=lines.append)
    assert any("resumed to step 4" in ln for ln in lines)
    assert (out / "run" / "student.safetensors").is_file()


def test_teacher_sources_use_the_official_files_present_and_random_init_for_the_rest(tmp_path):
    from demo.stages import teacher_sources
    (tmp_path / "mae_pretrain_vit_base.pth").write_bytes(b"x")
    (tmp_path / "checkpoint.pth").write_bytes(b"x")                   # not an official name: ignored
    assert teacher_sources(tmp_path) == {"mae": str((tmp_path / "mae_pretrain_vit_base.pth").resolve()),
                                         "mocov3": None, "ibot": None}
    assert teacher_sources(None) == {"mae": None, "mocov3": None, "ibot": None}


def test_cached_throughput_row_is_the_training_stages_median_rate_without_its_first_interval():
    from demo.stages import training_throughput
    metrics = [{"step": 5, "images_per_second": 1.0}, {"step": 10, "images_per_second": 30.0},
               {"step": 15, "images_per_second": 10.0}, {"step": 20, "images_per_second": 20.0}]
    row = training_throughput(metrics, batch_size=16)
    assert row["mode"] == "cached" and row["images_per_second"] == 20.0 and row["intervals"] == 3
    assert row["spread"] == [10.0, 30.0]
    assert training_throughput(metrics[:1], batch_size=16)["images_per_second"] == 1.0   # the only one
    assert training_throughput([], batch_size=16) is None
