"""The one AdamW builder of the training apps: parameter groups (own lr, decay only on matrices) and the fused
kernel, which must step exactly like torch's reference loop."""

from __future__ import annotations

import torch
from torch import nn

from pallava.train.optim import adamw


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def build(model: nn.Module) -> torch.optim.AdamW:
    return adamw(
        model,
        group_of=lambda name: "head" if name.startswith("2.") else "body",
        lr_of=lambda group: 1e-2 if group == "head" else 1e-3,
        weight_decay=0.1,
    )


def test_groups_carry_their_lr_and_decay_only_matrices():
    model = small_model()
    model[1].requires_grad_(False)  # frozen parameters stay out
    groups = {group["name"]: group for group in build(model).param_groups}
    assert sorted(groups) == ["body", "body-no-decay", "head", "head-no-decay"]
    assert [p.shape for p in groups["body"]["params"]] == [torch.Size([8, 4])]
    assert groups["head"]["lr"] == 1e-2 and groups["body-no-decay"]["lr"] == 1e-3
    assert groups["body"]["weight_decay"] == 0.1 and groups["head-no-decay"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups.values()) == 4  # two weights, two biases


def test_the_fused_optimizer_steps_like_the_reference_loop():
    fused_model, loop_model = small_model(), small_model()
    fused = build(fused_model)
    assert fused.defaults["fused"]
    reference_groups = [  # the same groups over the twin, for torch's per-parameter loop
        {key: value for key, value in group.items() if key not in ("fused", "foreach")}
        for group in build(loop_model).param_groups
    ]
    loop = torch.optim.AdamW(reference_groups, fused=False, foreach=False)
    inputs = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for model, optimizer in ((fused_model, fused), (loop_model, loop)):
            optimizer.zero_grad()
            model(inputs).square().mean().backward()
            optimizer.step()
    for ours, reference in zip(fused_model.parameters(), loop_model.parameters(), strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
    assert not torch.equal(fused_model[0].weight, small_model()[0].weight)  # it did train
