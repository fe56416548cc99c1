"""The driver's optimizer: torch.optim classes by name, schedules as functions of the step,
clipping of the aggregated update."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.config import ConfigError, load_config
from orchestrator.optimizer import OptimConfig, build_optimizer, clip_by_norm, lr_at
from orchestrator.run import train


def test_schedules_are_the_formulas():
    warm = OptimConfig(lr=1.0, warmup_steps=4)
    assert [lr_at(warm, s, 100) for s in (1, 2, 4, 5, 50)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    step = OptimConfig(lr=1.0, schedule="step", step_size=10, step_gamma=0.5)
    assert [lr_at(step, s, 100) for s in (1, 10, 11, 20, 21)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    cosine = OptimConfig(lr=2.0, schedule="cosine", warmup_steps=10)
    assert lr_at(cosine, 11, 110) == 2.0  # the peak right after the warm-up
    assert lr_at(cosine, 60, 110) == pytest.approx(1.0 + math.cos(math.pi * 49 / 100))
    assert lr_at(cosine, 111, 110) == pytest.approx(0.0, abs=1e-12)  # past the end: the floor


def test_any_torch_optimizer_by_name_with_its_arguments():
    cfg = load_config(["optim.name=AdamW", "optim.args.betas=[0.9,0.95]", "optim.lr=0.01",
                       "optim.weight_decay=0.1"])
    opt = build_optimizer(cfg.optim, [torch.zeros(3, requires_grad=True)])
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.95) or list(group["betas"]) == [0.9, 0.95]
    assert group["lr"] == 0.01 and group["weight_decay"] == 0.1
    sgd = build_optimizer(load_config(["optim.momentum=0.5"]).optim,
                          [torch.zeros(3, requires_grad=True)])
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["momentum"] == 0.5


@pytest.mark.parametrize("overrides, message", [
    (["optim.name=adamx"], "optim.name=adamx: not allowed; valid: adadelta"),
    (["optim.args.nonsense=3"], "unexpected keyword argument 'nonsense'"),
    (["optim.name=adam", "optim.args.betas=[2,3]"], "Invalid beta parameter"),
    (["optim.schedule=linear"], "optim.schedule=linear: not allowed"),
    (["strategy=gossip", "optim.name=adam"], "optim.name applies to the parameter-server"),
])
def test_bad_optimizer_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(overrides)
    assert "\n" not in str(err.value)


def test_clip_by_norm():
    v = torch.tensor([3.0, 4.0])
    assert torch.equal(clip_by_norm(v, 0.0), v)
    assert torch.equal(clip_by_norm(v, 10.0), v)
    assert torch.allclose(clip_by_norm(v, 1.0), torch.tensor([0.6, 0.8]))


def test_adamw_with_warmup_cosine_and_clipping_learns(ray_session, make_config):
    cfg = make_config("steps=60", "model=mlp", "optim.name=AdamW", "optim.lr=0.003",
                      "optim.schedule=cosine", "optim.warmup_steps=10", "optim.clip_norm=1.0")
    summary = train(cfg)
    assert summary["steps_done"] == 60 and summary["test_acc"] > 0.6
