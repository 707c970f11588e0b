"""The student: a masked timm ViT encoder (``MaskedStudent``, MAE-style: the hidden patches dropped
after their embedding) and the light decoder that completes the map (``FeatureDecoder``, MAE's
recipe), as docs/method.md "Student and decoder" describes them."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.state import drop_placeholder_head, load_strict, read_state_dict
from teachers.descriptors import STUDENT_GRID

GRID = STUDENT_GRID  # 224 / 16: the grid every teacher shares (teachers/descriptors.py)
NUM_PATCHES = GRID * GRID


def sincos_pos_embed_2d(*, dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings: (grid*grid, dim) float32, row-major.

    Half the channels encode the row, half the column; each half is [sin, cos] of the
    coordinate times geometric frequencies 1 / 10000^(i / (dim/4)). ``dim % 4 == 0``.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * freqs.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class MaskedStudent(nn.Module):
    """A timm ViT (default ``vit_tiny_patch16_224``, num_classes=0) run on CLS + the visible
    patches: all patches are embedded and given their position embeddings, then the hidden ones
    are dropped and the rest go through the blocks and the final norm. On all 196 patches it
    equals timm's own ``forward_features`` (tested).

    Attribute ``vit`` is the plain timm model, so its state dict is a timm state dict.
    """

    def __init__(self, *, arch: str = "vit_tiny_patch16_224", embed_dim: int = 192,
                 depth: int = 12, num_heads: int = 3, drop_path: float = 0.0):
        super().__init__()
        import timm

        self.vit = timm.create_model(arch, pretrained=False, num_classes=0,
                                     embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                     drop_path_rate=drop_path)
        v = self.vit
        if v.cls_token is None or v.num_prefix_tokens != 1 or getattr(v, "no_embed_class", False) \
                or v.pos_embed is None or getattr(v, "dynamic_img_size", False):
            raise ValueError(f"student arch {arch!r} must be a plain ViT with one CLS token and "
                             "absolute position embeddings that include the CLS slot")
        if tuple(v.patch_embed.grid_size) != (GRID, GRID):
            raise ValueError(f"student arch {arch!r} has a {v.patch_embed.grid_size} patch grid; "
                             f"the store's masks are on a {GRID}x{GRID} grid")
        self.embed_dim = embed_dim

    def forward(self, images: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the visible patches.

        images: (B, 3, 224, 224) float, normalised. visible: (B, n) int64 patch ids in
        [0, 196). Returns (cls (B, D), patch (B, n, D)) after the final norm, in the
        order of ``visible``.
        """
        v = self.vit
        x = v.patch_embed(images)                       # (B, 196, D)
        x = v._pos_embed(x)                             # (B, 197, D): CLS + pos embed
        cls, patches = x[:, :1], x[:, 1:]
        idx = visible.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x = torch.cat([cls, torch.gather(patches, 1, idx)], dim=1)   # (B, 1 + n, D)
        x = v.patch_drop(x)
        x = v.norm_pre(x)
        x = v.blocks(x)
        x = v.norm(x)
        return x[:, 0], x[:, 1:]


class FeatureDecoder(nn.Module):
    """MAE-style decoder: encoder tokens at visible positions -> S at all 196 positions.

    A linear embed of the encoder tokens, a shared learned mask token at every hidden position,
    fixed 2-D sin-cos position embeddings (or learned ones), timm ``Block``s and a LayerNorm. Its
    CLS slot is decoded with the patches (so it can attend to the image summary) and dropped."""

    def __init__(self, *, in_dim: int, width: int = 192, depth: int = 2, num_heads: int = 3,
                 mlp_ratio: float = 4.0, out_dim: int = 192, pos_embed: str = "sincos"):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(in_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        if pos_embed == "sincos":
            table = torch.cat([torch.zeros(1, width), sincos_pos_embed_2d(dim=width, grid=GRID)])
            self.register_buffer("pos_embed", table.unsqueeze(0), persistent=False)
        elif pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + NUM_PATCHES, width))
        else:
            raise ValueError(f"decoder pos_embed={pos_embed!r}; use 'sincos' or 'learned'")
        self.blocks = nn.Sequential(*[Block(dim=width, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                            qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, out_dim) if width != out_dim else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's init (uses whatever generator the caller forked; see build_objective)."""
        nn.init.normal_(self.mask_token, std=0.02)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, cls: torch.Tensor, patch: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """cls: (B, Din), patch: (B, n, Din), visible: (B, n) int64 in [0, 196).

        Returns S: (B, 196, out_dim), row-major over the 14 x 14 grid.
        """
        b, _, _ = patch.shape
        x = self.embed(torch.cat([cls.unsqueeze(1), patch], dim=1))   # (B, 1 + n, W)
        width = x.shape[-1]
        grid = self.mask_token.to(x.dtype).expand(b, NUM_PATCHES, width)
        idx = visible.unsqueeze(-1).expand(-1, -1, width)
        grid = torch.scatter(grid, 1, idx, x[:, 1:])                      # (B, 196, W)
        x = torch.cat([x[:, :1], grid], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 1:])


def load_student_checkpoint(student: MaskedStudent, path: str | Path) -> None:
    """Load a timm state dict (``.safetensors``, or a torch file holding the dict or
    ``{"model": dict}`` / ``{"state_dict": dict}``) into ``student.vit``, strictly.

    Raises FileNotFoundError naming the file, ValueError naming missing, unexpected
    or mis-shaped keys (core/state.py).
    """
    state = read_state_dict(path, what="student checkpoint")
    state = drop_placeholder_head(state, student.vit)   # an export's all-zero classifier
    load_strict(student.vit, state, what=f"student checkpoint {path} does not match the student "
                                         "(a timm state dict of the same arch, num_classes=0)")


def count_params(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["MaskedStudent", "FeatureDecoder", "load_student_checkpoint", "sincos_pos_embed_2d",
           "GRID", "NUM_PATCHES", "count_params"]
