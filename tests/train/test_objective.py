"""train/student.py, train/adapters.py, train/objective.py: the model side of CoMAD.

Tiny models (width 48, 2 encoder + 2 decoder blocks, teacher width 64) and batches of
2 keep this file fast; the one test on the real ViT-Tiny checks the masked forward
against timm's own. Torch runs single-threaded here: on a few shared cores that is
several times faster for models this small.
"""
from __future__ import annotations

import pytest
import torch

from train.adapters import TeacherAdapter, collapse_monitor, fit_pca
from train.config import load_config
from train.objective import build_objective
from train.student import FeatureDecoder, MaskedStudent, sincos_pos_embed_2d

N_K = {"mae": 98, "mocov3": 118, "ibot": 137}
TINY = ["model.embed_dim=48", "model.depth=2", "model.num_heads=3", "decoder.width=48",
        "decoder.num_heads=3", "adapters.in_dim=64", "adapters.init=random"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg(*extra):
    return load_config(overrides=TINY + list(extra))


def _ascending(g, b, n):
    return torch.stack([torch.sort(torch.randperm(196, generator=g)[:n])[0] for _ in range(b)])


def make_batch(*, seed=0, b=2, c=64, dtype=torch.float16):
    """A batch in the loader's format with random images and random teacher tokens."""
    g = torch.Generator().manual_seed(seed)
    teachers = {n: {"cls": torch.randn(b, c, generator=g).to(dtype),
                    "patch": torch.randn(b, k, c, generator=g).to(dtype),
                    "index": _ascending(g, b, k)} for n, k in N_K.items()}
    return {"index": torch.arange(b), "view": torch.zeros(b, dtype=torch.int64),
            "images": torch.randn(b, 3, 224, 224, generator=g),
            "student_visible": _ascending(g, b, 49), "teachers": teachers}


# ---- student and decoder ------------------------------------------------------------
def test_masked_student_on_all_196_patches_equals_timms_full_forward():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = MaskedStudent().eval()          # the real vit_tiny_patch16_224
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cls, patch = student(images, torch.arange(196).unsqueeze(0))
        ref = student.vit.forward_features(images)
    assert cls.shape == (1, 192) and patch.shape == (1, 196, 192)
    assert torch.allclose(cls, ref[:, 0], atol=1e-5) and torch.allclose(patch, ref[:, 1:], atol=1e-5)


def test_masked_student_output_depends_only_on_visible_patches():
    cfg = tiny_cfg()
    student = build_objective(cfg).student.eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(1, 3, 224, 224, generator=g)
    visible = _ascending(g, 1, 49)
    hidden = torch.ones(196, dtype=torch.bool)
    hidden[visible[0]] = False
    # paint over every hidden 16x16 patch: the encoder must not notice
    pix = hidden.reshape(14, 14).repeat_interleave(16, 0).repeat_interleave(16, 1)
    other = torch.where(pix, torch.randn_like(images), images)
    with torch.no_grad():
        a, b = student(images, visible), student(other, visible)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_decoder_maps_visible_tokens_to_all_196_positions_and_sincos_is_fixed():
    dec = FeatureDecoder(in_dim=48, width=32, depth=1, num_heads=2, out_dim=48)
    g = torch.Generator().manual_seed(2)
    vis = _ascending(g, 2, 49)
    s = dec(torch.randn(2, 48, generator=g), torch.randn(2, 49, 48, generator=g), vis)
    assert s.shape == (2, 196, 48)
    assert "pos_embed" not in dict(dec.named_parameters())
    table = sincos_pos_embed_2d(dim=32, grid=14)
    assert table.shape == (196, 32) and torch.allclose(table[0, :8], torch.zeros(8))  # sin(0) = 0
    learned = FeatureDecoder(in_dim=48, width=32, depth=1, num_heads=2, out_dim=48, pos_embed="learned")
    assert "pos_embed" in dict(learned.named_parameters())


def test_student_checkpoint_round_trips_and_a_wrong_one_names_its_keys(tmp_path):
    src = build_objective(tiny_cfg("train.seed=1")).student
    path = tmp_path / "student.pth"
    torch.save(src.vit.state_dict(), path)
    dst = build_objective(tiny_cfg("train.seed=2", f"model.checkpoint={path}")).student
    for (k, a), (_, b) in zip(src.vit.state_dict().items(), dst.vit.state_dict().items()):
        assert torch.equal(a, b), k
    bad = dict(src.vit.state_dict())
    bad["head.weight"] = torch.zeros(10, 48)
    del bad["norm.bias"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as e:
        build_objective(tiny_cfg(f"model.checkpoint={tmp_path / 'bad.pth'}"))
    assert "bad.pth" in str(e.value) and "norm.bias" in str(e.value) and "head.weight" in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_objective(tiny_cfg(f"model.checkpoint={tmp_path / 'missing.pth'}"))


def test_same_seed_same_model_and_the_global_rng_is_untouched():
    before = torch.random.get_rng_state()
    a, b = build_objective(tiny_cfg()), build_objective(tiny_cfg())
    c = build_objective(tiny_cfg("train.seed=7"))
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# ---- adapters -----------------------------------------------------------------------
def test_pca_adapter_keeps_data_lying_in_an_out_dim_subspace_exactly():
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(64, 16, generator=g))[0]          # 16-dim subspace
    offset = torch.randn(64, generator=g)
    tokens = torch.randn(500, 16, generator=g) * torch.linspace(3, 1, 16) @ basis.T + offset
    mean, comps = fit_pca(tokens, k=16)
    adapter = TeacherAdapter(in_dim=64, out_dim=16, name="mae")
    adapter.init_from_pca(mean, comps.numpy())   # numpy accepted, as the store gives it
    coords = adapter.linear(tokens)
    recon = mean + coords @ adapter.proj.weight                          # least-squares inverse
    assert torch.allclose(recon, tokens, atol=1e-4)
    # the coordinates are centred and ordered by decreasing variance
    assert coords.mean(0).abs().max() < 1e-4
    var = coords.var(0)
    assert torch.all(var[:-1] >= var[1:] - 1e-4)
    with pytest.raises(ValueError, match="adapter mae: PCA components"):
        adapter.init_from_pca(mean, comps[:8])


def test_frozen_adapter_has_no_grad_and_trainable_reconstruction_is_unexplained_variance():
    g = torch.Generator().manual_seed(4)
    t = torch.randn(300, 64, generator=g, requires_grad=True)
    frozen = TeacherAdapter(in_dim=64, out_dim=16)
    out = frozen(t.half())
    assert out.dtype == torch.float32 and out.grad_fn is None
    assert not any(p.requires_grad for p in frozen.parameters()) and frozen.decoder is None
    train = TeacherAdapter(in_dim=64, out_dim=16, trainable=True)
    with torch.no_grad():   # a collapsed reconstruction (always the batch mean) scores 1
        train.decoder.weight.zero_()
        train.decoder.bias.copy_(t.mean(0))
    assert torch.allclose(train.reconstruction_loss(t, train(t)), torch.tensor(1.0), atol=1e-5)
    # METHOD's plain squared error: the same numerator, undivided (here the tokens' batch variance)
    plain = TeacherAdapter(in_dim=64, out_dim=16, trainable=True, recon_form="squared_error")
    plain.load_state_dict(train.state_dict())
    variance = (t - t.mean(0)).pow(2).sum(-1).mean()
    assert torch.allclose(plain.reconstruction_loss(t, plain(t)), variance, rtol=1e-5)
    with pytest.raises(ValueError, match="reconstruction form 'l1'"):
        TeacherAdapter(in_dim=64, out_dim=16, trainable=True, recon_form="l1")
    built = build_objective(tiny_cfg("adapters.mode=trainable", "loss.recon_form=squared_error"))
    assert {a.recon_form for a in built.trainable.adapters.values()} == {"squared_error"}


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_pca_adapters_under_bf16_autocast_match_fp32_where_a_bf16_matmul_does_not(trainable):
    """Teacher tokens sit far from the origin (mean norm 20x their spread here): W t and
    b = -W mean nearly cancel. Bound: max |bf16-autocast output - fp32 output| <= 1e-4 on
    LayerNorm'd (unit-scale) outputs. The pre-fix form, LayerNorm(W t + b) with the matmul
    under autocast, misses it by orders of magnitude."""
    g = torch.Generator().manual_seed(11)
    mean = 20 * torch.randn(768, generator=g) / 768 ** 0.5 * 4
    tokens = mean + torch.randn(400, 768, generator=g) * torch.linspace(2, 0.1, 768)
    adapter = TeacherAdapter(in_dim=768, out_dim=192, trainable=trainable)
    adapter.init_from_pca(*fit_pca(tokens, k=192))
    batch = tokens[:64].reshape(4, 16, 768).half()
    ref = adapter(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(batch)
        old = adapter.norm(adapter.proj(batch.float()))        # what forward did before
        rec = adapter.reconstruction_loss(batch.flatten(0, 1), out.flatten(0, 1)) if trainable else None
    out, old, ref = out.detach(), old.detach().float(), ref.detach()
    err, err_old = float((out - ref).abs().max()), float((old - ref).abs().max())
    print(f"trainable={trainable}: max |diff| vs fp32: now {err:.2e}, bf16 matmul {err_old:.2e}")
    assert out.dtype == torch.float32 and err <= 1e-4
    assert err_old > 100 * 1e-4
    if trainable:
        ref_rec = adapter.reconstruction_loss(batch.flatten(0, 1), ref.flatten(0, 1))
        assert rec.dtype == torch.float32 and torch.allclose(rec, ref_rec, rtol=1e-5)


def test_collapse_monitor_is_mean_cosine_between_different_tokens():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 5, generator=g)
    cos = torch.nn.functional.cosine_similarity(x[:, None], x[None], dim=-1)
    brute = (cos.sum() - cos.diagonal().sum()) / (7 * 6)
    assert torch.allclose(collapse_monitor(x), brute, atol=1e-6)
    assert torch.allclose(collapse_monitor(x[:1].expand(7, 5) * torch.arange(1, 8)[:, None]),
                          torch.tensor(1.0))


# ---- the objective --------------------------------------------------------------------
def test_objective_returns_loss_and_every_part_as_tensors_and_gate_shares_sum_to_one():
    obj = build_objective(tiny_cfg("adapters.mode=trainable"))
    out = obj(make_batch())
    keys = {"loss", "loss_token", "loss_spatial", "loss_recon", "coverage"}
    keys |= {f"{p}/{n}" for p in ("gate", "collapse") for n in N_K}
    assert keys <= set(out) and all(torch.is_tensor(v) and v.dim() == 0 for v in out.values())
    assert torch.allclose(sum(out[f"gate/{n}"] for n in N_K), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(out["loss"], out["loss_token"] + out["loss_spatial"] + out["loss_recon"])
    assert out["loss_recon"] > 0
    w = obj(make_batch(), return_weights=True)["weights"]
    assert w.shape == (3, 2, 197) and torch.allclose(w[:, :, 0].sum(0), torch.ones(2))


@pytest.mark.parametrize("mode", ["frozen", "trainable"])
def test_bf16_autocast_with_float16_tokens_gives_finite_float32_losses_close_to_fp32(mode):
    obj = build_objective(tiny_cfg(f"adapters.mode={mode}"))
    batch = make_batch(seed=9, dtype=torch.float16)
    ref = obj(batch)
    seen = []
    hook = obj.student.vit.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(batch)
    hook.remove()
    assert seen == [torch.bfloat16]   # autocast really ran the matmuls in bf16
    out["loss"].backward()
    for k in ("loss", "loss_token", "loss_spatial", "loss_recon"):
        assert out[k].dtype == torch.float32 and torch.isfinite(out[k]), k
        assert torch.allclose(out[k], ref[k], rtol=0.05, atol=1e-3), k


def test_gradients_reach_student_and_decoder_but_not_frozen_adapters():
    obj = build_objective(tiny_cfg())
    obj(make_batch())["loss"].backward()
    side = obj.student_side()
    for name, p in list(side.student.named_parameters()) + list(side.decoder.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert side.student.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert side.decoder.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert side.adapters is None
    assert all(p.grad is None and not p.requires_grad for p in obj.frozen_adapters.parameters())
    trainable = {id(p) for p in obj.trainable_modules().parameters()}
    assert not any(id(p) in trainable for p in obj.frozen_adapters.parameters())


def test_trainable_adapters_learn_through_the_target_and_the_reconstruction():
    obj = build_objective(tiny_cfg("adapters.mode=trainable"))
    assert obj.frozen_adapters is None
    obj(make_batch())["loss"].backward()
    for name, adapter in obj.adapters.items():
        assert adapter.proj.weight.grad.abs().sum() > 0, name
        assert adapter.decoder.weight.grad.abs().sum() > 0, name


def test_teacher_tokens_are_placed_by_their_index_not_by_their_order():
    obj = build_objective(tiny_cfg()).eval()
    batch = make_batch(seed=6)
    shuffled = make_batch(seed=6)
    perm = torch.randperm(N_K["ibot"], generator=torch.Generator().manual_seed(0))
    t = shuffled["teachers"]["ibot"]
    t["patch"], t["index"] = t["patch"][:, perm], t["index"][:, perm]
    with torch.no_grad():
        a, b = obj(batch), obj(shuffled)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_uncovered_positions_get_no_gradient_from_the_map_loss():
    obj = build_objective(tiny_cfg())
    batch = make_batch(seed=7)
    for t in batch["teachers"].values():   # nobody sees patches 0..9: keep the others
        n = min(int((t["index"][i] >= 10).sum()) for i in range(2))
        keep = torch.stack([t["index"][i][t["index"][i] >= 10][:n] for i in range(2)])
        pos = torch.stack([torch.searchsorted(t["index"][i], keep[i]) for i in range(2)])
        t["patch"] = torch.gather(t["patch"], 1, pos.unsqueeze(-1).expand(-1, -1, t["patch"].shape[-1]))
        t["index"] = keep
    grads = {}
    decoder = obj.student_side().decoder
    def keep_grad(module, inputs, output):
        output.register_hook(lambda g: grads.update(s=g))

    handle = decoder.register_forward_hook(keep_grad)
    out = obj(batch)
    out["loss"].backward()
    handle.remove()
    assert out["coverage"] < 1
    assert torch.all(grads["s"][:, :10] == 0) and grads["s"][:, 10:].abs().sum() > 0


def test_wrapped_trainable_module_still_runs_and_unwraps():
    class Wrapper(torch.nn.Module):   # stands in for DDP: holds the module as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(*args)

    obj = build_objective(tiny_cfg())
    ref = obj(make_batch())["loss"]
    obj.wrap_trainable(Wrapper)
    assert isinstance(obj.trainable, Wrapper) and obj.student is obj.trainable.module.student
    assert torch.allclose(obj(make_batch())["loss"], ref)


def test_pca_init_needs_stats_for_every_teacher_given():
    random_init = build_objective(tiny_cfg("adapters.init=pca"))   # None: to load weights into
    assert torch.equal(random_init.adapters["mae"].proj.weight,
                       build_objective(tiny_cfg()).adapters["mae"].proj.weight)
    stats = {n: {"mean": torch.zeros(64), "components": torch.eye(64)} for n in ("mae", "ibot")}
    with pytest.raises(ValueError, match=r"lack teacher\(s\) \['mocov3'\]"):
        build_objective(tiny_cfg("adapters.init=pca"), stats)
    stats["mocov3"] = (torch.zeros(64), torch.eye(64))
    obj = build_objective(tiny_cfg("adapters.init=pca"), stats)
    assert torch.equal(obj.adapters["mocov3"].proj.weight, torch.eye(64)[:48])


def test_missing_teacher_in_batch_is_named():
    obj = build_objective(tiny_cfg())
    batch = make_batch()
    del batch["teachers"]["mocov3"]
    with pytest.raises(KeyError, match="mocov3"):
        obj(batch)


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_overfitting_one_batch_drives_the_loss_down_by_90_percent(kind):
    obj = build_objective(tiny_cfg(f"loss.kind={kind}"))
    batch = make_batch(seed=8)
    opt = torch.optim.AdamW(obj.trainable_modules().parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(150):   # about 120 steps reach 10% on this batch
        loss = obj(batch)["loss"]
        losses.append(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    first, last = float(losses[0]), float(torch.stack(losses[-5:]).mean())
    assert last < 0.1 * first, (first, last)
