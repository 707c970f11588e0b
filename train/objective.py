"""The CoMAD objective: student + decoder + adapters + gate + losses, batch -> loss dict
(``CoMADObjective.forward``, built by ``build_objective``). Its parts, DDP wrapping and logged
values: docs/method.md "The objective"; its steps: docs/CONTRACTS.md "The objective in steps"."""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch
from torch import nn

from teachers.descriptors import descriptor
from train.adapters import TeacherAdapter, TeacherModules, collapse_monitor
from train.config import teacher_names
from train.gate import fuse, gate_weights
from train.losses import spatial_kl, spatial_mse, token_kl, token_mse
from train.student import NUM_PATCHES, FeatureDecoder, MaskedStudent, load_student_checkpoint


class StudentSide(nn.Module):
    """Everything that learns: student encoder, decoder, trainable adapters (or None).

    forward(images (B,3,224,224), visible (B,n) int64, tokens {name: (B, 1+n_k, C)})
    -> dict with "cls" (B, D), "patch" (B, n, D), "map" (B, 196, D), and for trainable
    adapters "adapted" {name: (B, 1+n_k, D)} and "recon" (scalar, mean over teachers).
    """

    def __init__(self, *, student: MaskedStudent, decoder: FeatureDecoder,
                 adapters: TeacherModules | None):
        super().__init__()
        self.student, self.decoder, self.adapters = student, decoder, adapters

    def forward(self, images: torch.Tensor, visible: torch.Tensor,
                tokens: Mapping[str, torch.Tensor]) -> dict:
        """images (B,3,224,224) float, visible (B,n) int64, tokens {name: (B,1+n_k,C) float32}
        -> {"cls" (B,D), "patch" (B,n,D), "map" (B,196,D)[, "adapted", "recon"]}."""
        cls, patch = self.student(images, visible)
        out = {"cls": cls, "patch": patch, "map": self.decoder(cls, patch, visible)}
        if self.adapters is not None:
            adapted, recon = {}, []
            for name, adapter in self.adapters.items():
                a = adapter(tokens[name])
                adapted[name] = a
                recon.append(adapter.reconstruction_loss(tokens[name].flatten(0, 1),
                                                         a.flatten(0, 1)))
            out["adapted"] = adapted
            out["recon"] = torch.stack(recon).mean()
        return out


class CoMADObjective(nn.Module):
    """batch -> {"loss", parts} (``forward``). Build with build_objective."""

    def __init__(self, *, student: MaskedStudent, decoder: FeatureDecoder,
                 adapters: Mapping[str, TeacherAdapter], adapters_trainable: bool,
                 gate_mode: str = "consensus", gate_tau: float = 0.1, loss_kind: str = "kl",
                 tau: float = 1.0, tau_spatial: float = 4.0, spatial_weight: float = 1.0,
                 recon_weight: float = 1.0):
        super().__init__()
        if loss_kind not in ("kl", "mse"):
            raise ValueError(f"loss kind {loss_kind!r}; use 'kl' or 'mse'")
        self.teacher_names = list(adapters)
        adapters = TeacherModules(adapters)
        self.trainable = StudentSide(student=student, decoder=decoder,
                                     adapters=adapters if adapters_trainable else None)
        self.frozen_adapters = None if adapters_trainable else adapters
        self.gate_mode, self.gate_tau = gate_mode, gate_tau
        self.loss_kind, self.tau, self.tau_spatial = loss_kind, tau, tau_spatial
        self.spatial_weight, self.recon_weight = spatial_weight, recon_weight

    # ---- module access ------------------------------------------------------------
    def wrap_trainable(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Replace ``self.trainable`` by ``wrap(self.trainable)`` (e.g. DDP, compile)."""
        self.trainable = wrap(self.trainable)

    def trainable_modules(self) -> nn.Module:
        """The (possibly wrapped) module whose parameters learn."""
        return self.trainable

    def student_side(self) -> StudentSide:
        """The unwrapped StudentSide (through DDP ``.module`` / compile ``._orig_mod``)."""
        m = self.trainable
        while not isinstance(m, StudentSide):
            inner = getattr(m, "module", None)
            m = inner if isinstance(inner, nn.Module) else getattr(m, "_orig_mod")
        return m

    @property
    def student(self) -> MaskedStudent:
        return self.student_side().student

    @property
    def adapters(self) -> TeacherModules:
        return self.frozen_adapters if self.frozen_adapters is not None else self.student_side().adapters

    # ---- the step -----------------------------------------------------------------
    def adapted_grid(self, batch: Mapping) -> "AdaptedGrid":
        """The batch's teacher tokens through ``self.adapters``, and on the 197-slot grid.
        Frozen adapters make it the same for every student: a sweep computes it once per
        batch for the learners that share them (train/learner.py)."""
        tokens, slots = teacher_tokens(batch, self.teacher_names)
        adapted = {name: self.adapters[name](tokens[name]) for name in self.teacher_names}
        return AdaptedGrid(adapted, *scatter_grid(adapted, slots, self.teacher_names))

    def forward(self, batch: Mapping, *, grid: "AdaptedGrid | None" = None,
                return_weights: bool = False) -> dict[str, torch.Tensor]:
        """batch -> the loss dict (tensors only, no host sync). A batch (cached or online)::

            {"index": (B,) int64, "view": (B,) int64,
             "images": (B, 3, 224, 224) float32 normalised,
             "student_visible": (B, 49) int64 ascending patch ids in [0, 196),
             "teachers": {name: {"cls": (B, C_k), "patch": (B, n_k, C_k),
                                 "index": (B, n_k) int64 ascending}}}

        Tokens may be float16 (cast to float32 before the adapters); they are scattered by their
        ``index`` onto the 197-slot grid (slot 0 = CLS, slot 1 + p = patch p). Returns ``loss``
        (with graph) and detached ``loss_token``, ``loss_spatial``, ``loss_recon`` (0 for frozen
        adapters), ``gate/<teacher>`` (the teacher's share of the fused targets, the shares sum
        to 1), ``collapse/<teacher>`` and ``coverage`` (docs/method.md "The objective").

        grid: ``self.adapted_grid(batch)`` already computed (frozen adapters only).
        return_weights: also return "weights" (K, B, 197) float32, the gate weights of
        ``self.teacher_names`` at CLS (slot 0) and each patch (slot 1 + p), for pictures.
        """
        images, visible, names = batch["images"], batch["student_visible"], self.teacher_names
        if grid is not None and self.frozen_adapters is None:
            raise ValueError("a precomputed adapted grid needs frozen adapters (adapters.mode=frozen)")
        if self.frozen_adapters is not None:
            grid = self.adapted_grid(batch) if grid is None else grid
            tokens = {}                 # the student side reads no teacher tokens with frozen adapters
        else:
            tokens, slots = teacher_tokens(batch, names)
        out = self.trainable(images, visible, tokens)
        z_cls, z_patch, s_map = out["cls"], out["patch"], out["map"]
        if grid is None:                # trainable adapters: adapted inside the student side
            grid = AdaptedGrid(out["adapted"], *scatter_grid(out["adapted"], slots, names))
        adapted, dense, seen = grid
        y, w = fused_targets(dense, seen, mode=self.gate_mode, tau=self.gate_tau,
                             student=student_grid(z_cls, z_patch, s_map, visible))
        has_target = seen.any(0)                                             # (B, 197)
        l_tok, l_sp = distill_losses(z_cls, z_patch, s_map, visible=visible, targets=y, has_target=has_target,
                                     kind=self.loss_kind, tau=self.tau, tau_spatial=self.tau_spatial)
        loss = l_tok + self.spatial_weight * l_sp
        l_rec = out.get("recon")
        if l_rec is not None:
            loss = loss + self.recon_weight * l_rec
        else:
            l_rec = torch.zeros((), device=loss.device)

        logs = {"loss": loss, "loss_token": l_tok.detach(), "loss_spatial": l_sp.detach(),
                "loss_recon": l_rec.detach()}
        with torch.no_grad():
            n_target = has_target.sum().clamp_min(1)
            for k, name in enumerate(self.teacher_names):
                logs[f"gate/{name}"] = w[k].sum() / n_target
                logs[f"collapse/{name}"] = collapse_monitor(adapted[name][:, 1:].flatten(0, 1))
            logs["coverage"] = has_target[:, 1:].float().mean()
        if return_weights:
            logs["weights"] = w
        return logs


# ---- the objective's steps: teacher tokens -> adapted grid -> fused targets -> losses --------
class AdaptedGrid(NamedTuple):
    """The adapted teacher tokens of a batch: {name: (B, 1 + n_k, D)}, and on the 197-slot
    grid, dense (K, B, 197, D) and seen (K, B, 197) bool."""
    adapted: dict
    dense: torch.Tensor
    seen: torch.Tensor


def teacher_tokens(batch: Mapping, names) -> tuple[dict, dict]:
    """The batch's tokens of each teacher in ``names`` as ({name: (B, 1 + n_k, C_k) float32, CLS
    first}, {name: (B, 1 + n_k) int64 grid slots: 0 for CLS, 1 + p for patch p}); a batch that
    lacks a teacher or whose shapes disagree is refused naming it."""
    teachers, visible = batch["teachers"], batch["student_visible"]
    missing = [n for n in names if n not in teachers]
    if missing:
        raise KeyError(f"batch lacks teacher(s) {missing}; it has {sorted(teachers)}")
    b = visible.shape[0]
    if batch["images"].shape[0] != b:
        raise ValueError(f"batch images {tuple(batch['images'].shape)} and student_visible "
                         f"{tuple(visible.shape)} disagree on the batch size")
    tokens, slots = {}, {}
    for name in names:
        t = teachers[name]
        if t["patch"].shape[:2] != t["index"].shape or t["cls"].shape[0] != b:
            raise ValueError(f"batch teacher {name!r}: cls {tuple(t['cls'].shape)}, patch "
                             f"{tuple(t['patch'].shape)}, index {tuple(t['index'].shape)} "
                             f"disagree (batch {b})")
        tokens[name] = torch.cat([t["cls"].float().unsqueeze(1), t["patch"].float()], dim=1)
        zero = torch.zeros(b, 1, dtype=t["index"].dtype, device=t["index"].device)
        slots[name] = torch.cat([zero, t["index"] + 1], dim=1)
    return tokens, slots


def scatter_grid(adapted: Mapping[str, torch.Tensor], slots: Mapping[str, torch.Tensor],
                 names) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapted tokens {name: (B, 1 + n_k, D)} scattered by their ``slots`` onto the 197-slot
    grid: dense (K, B, 197, D) (zeros where unseen) and seen (K, B, 197) bool, K in ``names`` order."""
    dense, seen = [], []
    for name in names:
        a, idx = adapted[name], slots[name]
        b, d = a.shape[0], a.shape[-1]
        grid = torch.zeros(b, 1 + NUM_PATCHES, d, dtype=a.dtype, device=a.device)
        dense.append(torch.scatter(grid, 1, idx.unsqueeze(-1).expand(-1, -1, d), a))
        seen.append(torch.zeros(b, 1 + NUM_PATCHES, dtype=torch.bool, device=a.device).scatter(1, idx, True))
    return torch.stack(dense), torch.stack(seen)


def student_grid(z_cls: torch.Tensor, z_patch: torch.Tensor, s_map: torch.Tensor,
                 visible: torch.Tensor) -> torch.Tensor:
    """The student's token at every slot, detached (the gate's u): z_cls at CLS, its encoder
    token z where the patch was visible, the decoder's S elsewhere. (B, 197, D)."""
    with torch.no_grad():
        u = torch.cat([z_cls.unsqueeze(1), s_map], dim=1).detach().clone()
        vis_idx = (visible + 1).unsqueeze(-1).expand(-1, -1, u.shape[-1])
        return u.scatter(1, vis_idx, z_patch.detach().to(u.dtype))


# Each gate without its student-affinity term: the targets of a gate that reads no student.
STUDENT_FREE_GATE = {"consensus": "agreement", "agreement": "agreement", "affinity": "uniform",
                     "uniform": "uniform"}


def fused_targets(dense: torch.Tensor, seen: torch.Tensor, *, mode: str, tau: float,
                  student: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused targets y (B, 197, D) and the gate weights w (K, B, 197) of the adapted grid.
    ``student`` (B, 197, D), the gate's u, is needed by the modes with the affinity term; None
    is allowed for the student-free modes (``STUDENT_FREE_GATE`` values) only."""
    if student is None:
        if mode not in STUDENT_FREE_GATE.values():
            raise ValueError(f"gate mode {mode!r} reads the student; pass student=")
        student = dense[0]                      # unread by the student-free modes
    w = gate_weights(student=student, adapted=dense, seen=seen, mode=mode, tau=tau)
    return fuse(adapted=dense, weights=w), w


def distill_losses(z_cls: torch.Tensor, z_patch: torch.Tensor, s_map: torch.Tensor, *, visible: torch.Tensor,
                   targets: torch.Tensor, has_target: torch.Tensor, kind: str, tau: float,
                   tau_spatial: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token loss, spatial loss) of a student's encoder tokens (z_cls (B, D), z_patch (B, n, D)
    at ``visible``) and decoder map s_map (B, 196, D) against the fused ``targets`` (B, 197, D),
    counted where ``has_target`` (B, 197): the token loss over CLS and the visible patches, the
    spatial loss over the 196 positions; ``kind`` "kl" (temperatures tau, tau_spatial) or "mse"."""
    y_vis = torch.gather(targets[:, 1:], 1, visible.unsqueeze(-1).expand(-1, -1, targets.shape[-1]))
    tok_student = torch.cat([z_cls.unsqueeze(1), z_patch], dim=1)
    tok_target = torch.cat([targets[:, :1], y_vis], dim=1)
    tok_valid = torch.cat([has_target[:, :1], torch.gather(has_target[:, 1:], 1, visible)], dim=1)
    map_valid = has_target[:, 1:]
    if kind == "kl":
        return (token_kl(student=tok_student, target=tok_target, valid=tok_valid, tau=tau),
                spatial_kl(student=s_map, target=targets[:, 1:], valid=map_valid, tau=tau_spatial))
    return (token_mse(student=tok_student, target=tok_target, valid=tok_valid),
            spatial_mse(student=s_map, target=targets[:, 1:], valid=map_valid))


def _mean_and_components(st) -> tuple:
    """A teacher's statistics as (mean (C,), components (>= D, C)): given as that pair or as
    ``FeatureStore`` stats hold them, {"mean", "components", ...}."""
    return (st["mean"], st["components"]) if isinstance(st, Mapping) else tuple(st)


def teacher_widths(cfg, teacher_stats: Mapping | None = None) -> dict[str, int]:
    """{teacher: token width} of ``cfg.data.teachers``: ``cfg.adapters.in_dim`` for all when set
    (synthetic tests), else each teacher's statistics' width (the store's, the truth at read
    time), else its descriptor's (teachers/descriptors.py)."""
    if cfg.adapters.in_dim is not None:
        return {n: int(cfg.adapters.in_dim) for n in teacher_names(cfg)}
    out = {}
    for n in teacher_names(cfg):
        st = (teacher_stats or {}).get(n)
        out[n] = descriptor(n).width if st is None else int(_mean_and_components(st)[0].shape[-1])
    return out


def build_objective(cfg, teacher_stats: Mapping | None = None) -> CoMADObjective:
    """Build the objective from a :class:`train.config.Config`.

    teacher_stats: {name: (mean (C,), components (>= D, C))} (a run's ``RunStore.stats``, read
    once when it opens its store; or {name: {"mean", "components"}}, as ``TeacherStore.stats``
    hold them) for every teacher in ``cfg.data.teachers``
    (used when ``cfg.adapters.init == "pca"``). ``None`` leaves the adapters at their seeded
    random init: only for rebuilding a model whose weights then come from a checkpoint
    (export, evaluation); training with ``adapters.init=pca`` must pass the stats. The parameters
    are initialised under a forked RNG seeded by ``cfg.train.seed``: the same seed gives
    the same model and the global RNG is left untouched. A ``cfg.model.checkpoint``
    then replaces the student encoder's weights (strictly).
    """
    names = list(teacher_names(cfg))
    use_pca = cfg.adapters.init == "pca" and teacher_stats is not None
    if use_pca:
        absent = [n for n in names if n not in teacher_stats]
        if absent:
            raise ValueError(f"teacher_stats lack teacher(s) {absent}; they have {sorted(teacher_stats)}")
    d = cfg.model.embed_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        student = MaskedStudent(arch=cfg.model.arch, embed_dim=d, depth=cfg.model.depth,
                                num_heads=cfg.model.num_heads, drop_path=cfg.model.drop_path)
        decoder = FeatureDecoder(in_dim=d, width=cfg.decoder.width, depth=cfg.decoder.depth,
                                 num_heads=cfg.decoder.num_heads, mlp_ratio=cfg.decoder.mlp_ratio,
                                 out_dim=d, pos_embed=cfg.decoder.pos_embed)
        trainable = cfg.adapters.mode == "trainable"
        widths = teacher_widths(cfg, teacher_stats)
        adapters = {n: TeacherAdapter(in_dim=widths[n], out_dim=d, trainable=trainable,
                                      name=n, recon_form=cfg.loss.recon_form) for n in names}
    if use_pca:
        for n in names:
            adapters[n].init_from_pca(*_mean_and_components(teacher_stats[n]))
    if cfg.model.checkpoint:
        load_student_checkpoint(student, cfg.model.checkpoint)
    return CoMADObjective(student=student, decoder=decoder, adapters=adapters,
                          adapters_trainable=trainable, gate_mode=cfg.gate.mode,
                          gate_tau=cfg.gate.tau, loss_kind=cfg.loss.kind, tau=cfg.loss.tau,
                          tau_spatial=cfg.loss.tau_spatial, spatial_weight=cfg.loss.spatial_weight,
                          recon_weight=cfg.loss.recon_weight)
