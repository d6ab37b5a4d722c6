"""timm's VisionTransformer, where timm is installed.

timm needs torchvision, and the registry's torchvision is built against CUDA torch: beside the
pinned CPU torch of `make test` it installs but does not load (torchvision 0.28.0 with torch
2.13.0+cpu: "operator torchvision::nms does not exist", checked 2026-12-06), and no CPU build of it is
on the package registries this project may use. So this module runs where timm exists (the GPU
machine's image has it) and is skipped elsewhere.
The in-tree test ``test_timm_style_fused_qkv_follows_its_reshape_convention`` covers timm's
layout without timm.
"""

from __future__ import annotations

import pytest
import torch

import qkvlab

timm = pytest.importorskip("timm")


def test_timm_vit_spectra_and_split() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5).double().eval()
    report = qkvlab.inspect(model)
    arch = report.architecture
    assert (arch.family, arch.n_layers, arch.n_heads, arch.d_head) == ("timm-vit", 12, 3, 64)
    block = model.blocks[4].attn
    d = arch.d_model
    with torch.no_grad():  # timm's own convention: qkv(x).reshape(B, N, 3, H, d_head)
        eye = torch.eye(d, dtype=torch.float64)[None]
        probe = (block.qkv(eye) - block.qkv(torch.zeros(1, 1, d, dtype=torch.float64))).reshape(
            1, d, 3, 3, 64
        )
    q, k = probe[0, :, 0], probe[0, :, 1]  # (d, H, d_head)
    for h in range(3):
        expected = torch.linalg.svdvals(k[:, h] @ q[:, h].T)[:64]
        got = torch.tensor(report.select("qk", 4)[h]["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(got, expected)
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
    qkvlab.split_fused_qkv(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=1e-6, atol=1e-6)
    roles = qkvlab.roles(model)
    assert roles["blocks.0.attn.qkv.v.weight"] == "v"
    assert roles["cls_token"] == "embed" and roles["pos_embed"] == "embed"
    assert roles["head.weight"] == "head"
    assert roles["blocks.0.norm1.weight"] == "norm"
    assert roles["blocks.0.mlp.fc1.weight"] == "mlp"
