"""HeadwiseMuon: torch's Muon exactly when a group is whole, and a per-head polar factor when it says heads."""

from __future__ import annotations

import copy

import pytest
import torch

from qkvlab.muon import HeadwiseMuon, orthogonalize


def _steps(optimizer, params, grads) -> None:
    for grad in grads:
        for p, g in zip(params, grad, strict=True):
            p.grad = g.clone()
        optimizer.step()


@pytest.mark.parametrize("heads", [None, 1])
@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_whole_matrix_groups_match_torch_muon(heads, adjust) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(48, 32), (32, 48), (16, 16)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(5)]
    settings = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9, "adjust_lr_fn": adjust}
    _steps(HeadwiseMuon(ours, heads=heads, **settings), ours, grads)
    _steps(torch.optim.Muon(theirs, **settings), theirs, grads)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head_axis", [0, 1])
def test_per_head_orthogonalisation_orthogonalises_each_head(head_axis) -> None:
    gen = torch.Generator().manual_seed(1)
    heads, d_head, d = 4, 8, 32
    shape = (heads * d_head, d) if head_axis == 0 else (d, heads * d_head)
    # a gradient whose heads differ in scale by 100×: the whole-matrix polar factor is not orthogonal per head
    grad = torch.randn(shape, generator=gen)
    scales = torch.tensor([1.0, 0.1, 0.01, 1.0]).repeat_interleave(d_head)
    grad = grad * (scales[:, None] if head_axis == 0 else scales[None, :])
    per_head = orthogonalize(grad, heads, head_axis)
    whole = orthogonalize(grad)[0][0]
    assert len(per_head) == heads
    for piece, _ in per_head:
        sv = torch.linalg.svdvals(piece.float())
        assert sv.min() > 0.5 and sv.max() < 1.5  # Newton–Schulz's band around 1, for every head
    small = torch.linalg.svdvals(whole.chunk(heads, dim=head_axis)[2].float())
    assert small.min() < 0.3  # in the whole-matrix factor the 100× smaller head is not orthogonal
    # the optimiser applies exactly these pieces, each with its slice's lr adjustment
    param = torch.nn.Parameter(torch.zeros(shape))
    param.grad = grad
    HeadwiseMuon(
        [param], lr=0.1, weight_decay=0.0, momentum=0.0, nesterov=False, heads=heads, head_axis=head_axis
    ).step()
    for (piece, piece_shape), applied in zip(
        per_head, param.detach().chunk(heads, dim=head_axis), strict=True
    ):
        factor = max(1, piece_shape[0] / piece_shape[1]) ** 0.5
        torch.testing.assert_close(applied, -0.1 * factor * piece.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head_axis", [0, 1])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_all_heads_in_one_batched_iteration_equal_each_head_alone(head_axis, dtype) -> None:
    """orthogonalize runs every head's Newton–Schulz at once (a 3-D stack); each piece is what the 2-D
    iteration gives that head's slice alone: torch's own function in bfloat16 (to bfloat16's rounding:
    a batched GEMM may sum in another order), ours in float32 (to float32's)."""
    from qkvlab.muon import newton_schulz

    heads, d_head, d = 4, 16, 64
    shape = (heads * d_head, d) if head_axis == 0 else (d, heads * d_head)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    grad = grad * torch.tensor([1.0, 0.1, 0.01, 3.0]).repeat_interleave(d_head).unsqueeze(1 - head_axis)
    pieces = orthogonalize(grad, heads, head_axis, dtype=dtype)
    tol = {"bfloat16": {"rtol": 0.02, "atol": 0.008}, "float32": {"rtol": 1e-5, "atol": 1e-6}}[dtype]
    for (ortho, piece_shape), alone in zip(pieces, grad.chunk(heads, dim=head_axis), strict=True):
        assert piece_shape == alone.shape and ortho.shape == alone.shape
        assert ortho.dtype == getattr(torch, dtype)
        torch.testing.assert_close(ortho.float(), newton_schulz(alone, dtype=dtype).float(), **tol)
    with pytest.raises(ValueError, match="a matrix or a stack of matrices"):
        newton_schulz(torch.zeros(2, 2, 2, 2))


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (64, 64)])
def test_float32_newton_schulz_is_torchs_iteration_in_other_arithmetic(shape) -> None:
    """newton_schulz(dtype="float32") is torch's quintic iteration (same coefficients, steps, scaling,
    transposition): equal to a float64 run of it to float32 precision, and to torch's bfloat16 result to
    bfloat16's."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C

    from qkvlab.muon import newton_schulz

    a, b, c = DEFAULT_A, DEFAULT_B, DEFAULT_C
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    x = grad.double().T if shape[0] > shape[1] else grad.double()
    x = x / x.norm()
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    reference = x.T if shape[0] > shape[1] else x
    fast = newton_schulz(grad, dtype="float32")
    assert fast.dtype == torch.float32 and fast.shape == grad.shape
    torch.testing.assert_close(fast.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast, newton_schulz(grad).float(), rtol=0.03, atol=0.02)  # torch's, bfloat16
    with pytest.raises(ValueError, match="accepted: bfloat16, float32"):
        newton_schulz(grad, dtype="float16")


def test_state_round_trip_resumes_identically() -> None:
    gen = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(32, 16, generator=gen))]
    grads = [[torch.randn(32, 16, generator=gen)] for _ in range(6)]
    straight = HeadwiseMuon(params, lr=0.01, heads=4)
    _steps(straight, params, grads)
    resumed_params = [torch.nn.Parameter(torch.randn(32, 16, generator=torch.Generator().manual_seed(2)))]
    first = HeadwiseMuon(resumed_params, lr=0.01, heads=4)
    _steps(first, resumed_params, grads[:3])
    state = copy.deepcopy(first.state_dict())
    second = HeadwiseMuon(resumed_params, lr=0.01, heads=4)
    second.load_state_dict(state)
    _steps(second, resumed_params, grads[3:])
    assert torch.equal(params[0], resumed_params[0])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="2-D matrices only"):
        HeadwiseMuon([torch.nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="do not split into 3 heads"):
        orthogonalize(torch.zeros(8, 4), heads=3)
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        HeadwiseMuon([torch.nn.Parameter(torch.zeros(4, 4))], adjust_lr_fn="nope")


def test_muon_with_adamw_is_torch_muon_and_torch_adamw_in_one_optimiser() -> None:
    from qkvlab.muon import MuonWithAdamW

    gen = torch.Generator().manual_seed(3)
    matrix, vector = torch.randn(24, 16, generator=gen), torch.randn(16, generator=gen)
    ours = [torch.nn.Parameter(matrix.clone()), torch.nn.Parameter(vector.clone())]
    muon_ref, adamw_ref = torch.nn.Parameter(matrix.clone()), torch.nn.Parameter(vector.clone())
    grads = [[torch.randn(24, 16, generator=gen), torch.randn(16, generator=gen)] for _ in range(5)]
    combined = MuonWithAdamW(
        [
            {"params": [ours[0]], "algorithm": "muon", "weight_decay": 0.1},
            {"params": [ours[1]], "algorithm": "adamw", "weight_decay": 0.05},
        ],
        lr=0.01,
        betas=(0.9, 0.95),
        momentum=0.95,
    )
    _steps(combined, ours, grads)
    _steps(
        torch.optim.Muon([muon_ref], lr=0.01, weight_decay=0.1, momentum=0.95),
        [muon_ref],
        [[g[0]] for g in grads],
    )
    _steps(
        torch.optim.AdamW([adamw_ref], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05),
        [adamw_ref],
        [[g[1]] for g in grads],
    )
    torch.testing.assert_close(ours[0], muon_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], adamw_ref, rtol=1e-6, atol=1e-6)
    # one scheduler drives both kinds of group
    scheduler = torch.optim.lr_scheduler.LambdaLR(combined, lambda step: 0.5)
    assert [g["lr"] for g in combined.param_groups] == [0.005, 0.005]
    assert scheduler.get_last_lr() == [0.005, 0.005]
    with pytest.raises(ValueError, match="2-D matrices only"):
        MuonWithAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], "algorithm": "muon"}])


def test_tag_groups_puts_matrices_on_muon_and_refuses_a_head_split_it_cannot_make() -> None:
    from qkvlab.muon import tag_groups

    def group(role: str, *shapes: tuple[int, ...], names: tuple[str, ...] = ()) -> dict:
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        return {"role": role, "params": params, "param_names": list(names) or [f"{role}.{i}" for i in range(len(params))]}  # fmt: skip

    groups = [group("q", (32, 16)), group("o", (16, 32)), group("q", (32,)), group("embed", (50, 16)),
              group("v", (8, 32), names=("layers.0.v_proj.lora_A.default.weight",)), group("mlp", (64, 16))]  # fmt: skip
    tag_groups(groups, per_head="q,o", heads={"q": 4, "o": 4})
    assert [g["algorithm"] for g in groups] == ["muon", "muon", "adamw", "adamw", "adamw", "muon"]
    assert (groups[0]["heads"], groups[0]["head_axis"], groups[1]["heads"], groups[1]["head_axis"]) == (
        4,
        0,
        4,
        1,
    )
    assert "heads" not in groups[5]  # mlp: whole matrices
    with pytest.raises(ValueError, match="does not split into 3 heads along dim 0"):
        tag_groups([group("q", (32, 16))], per_head="q", heads={"q": 3})
    with pytest.raises(ValueError, match="per-head Muon for k: no trainable 2-D matrix"):
        tag_groups([group("q", (32, 16))], per_head="q,k", heads={"q": 4, "k": 4})
