"""ViT-S/16 backbone on torchvision's ``VisionTransformer``: class-token output, position embeddings interpolated
for crops of another size, the released code's initialisation, and stochastic depth (drop-path) on the encoder
blocks. Imported only when a ViT is built (:func:`excb.method.backbones.build_backbone`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero a residual branch for a random ``rate`` of the samples, scale the rest by
    1/(1 − rate) (identity when not training or ``rate == 0``)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPathEncoderBlock(EncoderBlock):
    """torchvision's ``EncoderBlock`` with stochastic depth on both residual branches (attention and MLP).

    Existing blocks are switched to this class in place (:func:`set_drop_path`), so parameter names and
    checkpoints stay those of torchvision's block."""

    drop_path_rate: float = 0.0

    def forward(self, input: Tensor) -> Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = input + drop_path(self.dropout(x), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.ln_2(x)), self.drop_path_rate, self.training)


def set_drop_path(module: nn.Module, rate: float) -> None:
    """Set the stochastic-depth rate of every ViT encoder block in ``module``: block i of n gets
    ``rate · i / (n − 1)`` (DINO's linear rule: 0 for the first block, ``rate`` for the last); 0 switches it off."""
    blocks = [m for m in module.modules() if isinstance(m, EncoderBlock)]
    for i, block in enumerate(blocks):
        block.__class__ = DropPathEncoderBlock
        block.drop_path_rate = rate * i / max(len(blocks) - 1, 1)


class ViTBackbone(nn.Module):
    """torchvision ``VisionTransformer`` (ViT-S/16: patch 16, width 384, depth 12, 6 heads) returning the class
    token; position embeddings are interpolated so that local crops of another size can pass through.
    ``drop_path`` > 0 adds stochastic depth (see :func:`set_drop_path`)."""

    def __init__(self, in_channels: int = 3, image_size: int = 224, drop_path: float = 0.0) -> None:
        super().__init__()
        self.vit = VisionTransformer(image_size=image_size, patch_size=16, num_layers=12, num_heads=6,
                                     hidden_dim=384, mlp_dim=1536)
        if in_channels != 3:
            self.vit.conv_proj = nn.Conv2d(in_channels, 384, kernel_size=16, stride=16)
        self.vit.heads = nn.Identity()
        self.out_dim = 384
        init_vit_like_released(self.vit)
        if drop_path > 0:
            set_drop_path(self, drop_path)

    def _pos_embedding(self, n_patches: int) -> Tensor:
        pos = self.vit.encoder.pos_embedding  # [1, 1 + N0, D]
        n0 = pos.shape[1] - 1
        if n_patches == n0:
            return pos
        cls, grid = pos[:, :1], pos[:, 1:]
        g0, g1 = int(math.sqrt(n0)), int(math.sqrt(n_patches))
        grid = grid.reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(g1, g1), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, g1 * g1, -1)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.vit.conv_proj(x).flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.vit.class_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self._pos_embedding(tokens.shape[1])
        enc = self.vit.encoder
        tokens = enc.ln(enc.layers(enc.dropout(tokens)))
        return tokens[:, 0]


def init_vit_like_released(vit: VisionTransformer) -> None:
    """Re-initialise a torchvision ViT as the released ExCB (DINO-style) ViT is initialised: every linear weight
    (attention q/k/v and output projections, MLP layers) ~ truncated normal (std 0.02, cut at ±2), biases 0;
    LayerNorm γ = 1, β = 0; class token and position embeddings ~ truncated normal (std 0.02); the patch
    embedding keeps PyTorch's default Conv2d initialisation. (torchvision's own: Xavier-uniform MLP weights,
    zero class token, normal position embeddings, a fan-in truncated normal patch embedding.)"""
    for m in vit.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention):
            nn.init.trunc_normal_(m.in_proj_weight, std=0.02)
            nn.init.zeros_(m.in_proj_bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.trunc_normal_(vit.class_token, std=0.02)
    nn.init.trunc_normal_(vit.encoder.pos_embedding, std=0.02)
    vit.conv_proj.reset_parameters()
