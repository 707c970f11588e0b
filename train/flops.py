"""FLOPs of one training step per image, counted from what the step runs (for MFU).

A FLOP is a multiply or an add (a multiply-add is 2); matrix products are counted exactly,
forward and backward, as they run (what each part counts: ``step_flops_per_image``), and
checked against ``torch.utils.flop_counter.FlopCounterMode`` on a real step (tests/train/test_flops.py)."""
from __future__ import annotations

from typing import Mapping

from data import views as V
from train.objective import teacher_widths

PATCHES = V.NUM_PATCHES
PATCH_PIXELS = 3 * 16 * 16


def vit_blocks_forward(*, depth: int, width: int, tokens: int, mlp_ratio: float = 4.0) -> float:
    """Forward matmul FLOPs of ``depth`` pre-norm ViT blocks on ``tokens`` tokens of one image:
    qkv + proj + MLP (2 * tokens * (4 + 2 * mlp_ratio) * width^2) and attention
    (QK^T and AV: 4 * tokens^2 * width)."""
    per_block = 2 * tokens * (4 + 2 * mlp_ratio) * width * width + 4 * tokens * tokens * width
    return depth * per_block


def step_flops_per_image(cfg, *, n_visible: int, teacher_tokens: Mapping[str, int],
                         widths: Mapping[str, int] | None = None) -> dict[str, float]:
    """FLOPs of one optimiser step per image of a :class:`train.config.Config` run.

    n_visible: the student's visible patches (n). teacher_tokens: {teacher: 1 + n_k}, the
    tokens each teacher contributes per image; widths: {teacher: token width} (default
    ``objective.teacher_widths(cfg)``, the descriptors'). Returns {"encoder", "decoder", "adapters",
    "gate", "total"} in FLOPs (forward and backward together):

    - encoder: the patch embedding of all 196 patches (the hidden ones are dropped after it),
      forward + weight gradient (the images need no input gradient); the blocks on CLS + the n
      visible patches, 3x forward (both gradients), attention included;
    - decoder: its input embedding on 1 + n tokens, its blocks on 197 tokens, its head on the 196
      patches when it is not the identity, 3x forward;
    - adapters, per teacher on its 1 + n_k tokens: frozen ones forward only; trainable ones forward
      + weight gradient, plus the reconstruction decoder U at 3x forward;
    - gate: its cosines and fusion over K teachers x 197 positions, forward only (no autograd).
    Losses, norms, softmaxes and the collapse monitor are elementwise and left out (< 0.1% of a step).
    """
    d, w = cfg.model.embed_dim, cfg.decoder.width
    widths = teacher_widths(cfg) if widths is None else widths
    embed = 2 * PATCHES * PATCH_PIXELS * d
    encoder = 2 * embed + 3 * vit_blocks_forward(depth=cfg.model.depth, width=d, tokens=n_visible + 1)
    dec_fwd = (2 * (n_visible + 1) * d * w
               + vit_blocks_forward(depth=cfg.decoder.depth, width=w, tokens=PATCHES + 1,
                                    mlp_ratio=cfg.decoder.mlp_ratio)
               + (2 * PATCHES * w * d if w != d else 0))
    decoder = 3 * dec_fwd
    trainable = cfg.adapters.mode == "trainable"
    adapters = 0.0
    for name, tokens in teacher_tokens.items():
        c = widths[name]
        proj = 2 * tokens * c * d
        adapters += 2 * proj + 3 * (2 * tokens * d * c) if trainable else proj
    k, slots = len(teacher_tokens), PATCHES + 1
    # normalise K adapted tokens and the student's, affinity and agreement dot products,
    # the sum over teachers, the fused target: ~ 2 FLOPs per element for each
    gate = 2.0 * slots * d * (5 * k + 1)
    total = encoder + decoder + adapters + gate
    return dict(encoder=float(encoder), decoder=float(decoder), adapters=float(adapters),
                gate=float(gate), total=float(total))
