"""train/flops.py: the FLOPs that MFU divides by are the FLOPs a training step runs."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from train.config import load_config
from train.flops import step_flops_per_image
from train.objective import build_objective

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_K = {"mae": 98, "mocov3": 118, "ibot": 137}
TINY = ["model.embed_dim=48", "model.depth=2", "model.num_heads=3", "decoder.num_heads=2",
        "decoder.depth=1", "adapters.in_dim=64", "adapters.init=random"]


def _batch(b: int, c: int) -> dict:
    g = torch.Generator().manual_seed(0)

    def ascending(n):
        return torch.stack([torch.sort(torch.randperm(196, generator=g)[:n])[0] for _ in range(b)])
    teachers = {n: {"cls": torch.randn(b, c, generator=g), "patch": torch.randn(b, k, c, generator=g),
                    "index": ascending(k)} for n, k in N_K.items()}
    return {"images": torch.randn(b, 3, 224, 224, generator=g), "student_visible": ascending(49),
            "teachers": teachers}


@pytest.mark.parametrize("extra", [["adapters.mode=frozen", "decoder.width=48"],
                                   ["adapters.mode=trainable", "decoder.width=32"]],
                         ids=["frozen-adapters", "trainable-adapters-decoder-head"])
def test_counted_flops_equal_flop_counter_mode_on_one_step(extra):
    cfg = load_config(overrides=TINY + extra)
    objective = build_objective(cfg)
    for m in objective.modules():       # CPU SDPA has no FLOP formula in torch; the explicit
        if hasattr(m, "fused_attn"):    # QK^T and AV matmuls are the same FLOPs
            m.fused_attn = False
    b = 2
    batch = _batch(b, cfg.adapters.in_dim)
    with FlopCounterMode(display=False) as counter:
        objective(batch)["loss"].backward()
    measured = counter.get_total_flops() / b
    counted = step_flops_per_image(cfg, n_visible=49, teacher_tokens={n: 1 + k for n, k in N_K.items()})
    matmuls = counted["total"] - counted["gate"]
    print(f"{extra}: FlopCounterMode {measured:.4e} per image, counted matmuls {matmuls:.4e}, "
          f"parts {({k: f'{v:.3e}' for k, v in counted.items()})}")
    assert abs(matmuls - measured) / measured < 1e-3
    assert counted["adapters"] > 0 and counted["gate"] > 0
    assert 0 < counted["gate"] < 1e-2 * counted["total"]
