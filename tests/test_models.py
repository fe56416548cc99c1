"""Models build for every data shape; flat vectors round-trip."""

from __future__ import annotations

import pytest
import torch

from orchestrator.config import load_config
from orchestrator.models import flatten, float_buffers, unflatten_into
from orchestrator.workload import DataInfo, resolve_workload


def build_model(model: str, shape: tuple, num_classes: int) -> torch.nn.Module:
    """A built-in model through the same path as every model target."""
    workload = resolve_workload(load_config([f"model={model}"]))
    return workload.model(DataInfo(shape, num_classes))


@pytest.mark.parametrize("model", ["cnn", "mlp", "resnet20", "resnet18"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_models_fit_every_input_shape(model, shape):
    net = build_model(model, shape, 10)
    assert net(torch.randn(2, *shape)).shape == (2, 10)


def test_resnet20_has_its_published_size():
    net = build_model("resnet20", (3, 32, 32), 10)
    n = sum(p.numel() for p in net.parameters())
    assert 0.26e6 < n < 0.29e6  # 0.27M in He et al. 2016 (projection shortcuts add a little)


def test_flat_vector_round_trip():
    torch.manual_seed(0)
    a = build_model("resnet20", (3, 32, 32), 10)
    b = build_model("resnet20", (3, 32, 32), 10)
    a(torch.randn(4, 3, 32, 32))  # moves BatchNorm statistics away from their init
    state = flatten(list(a.parameters()) + float_buffers(a))
    unflatten_into(state, list(b.parameters()) + float_buffers(b))
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        if x.is_floating_point():
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match="flat vector has"):
        unflatten_into(state[:-1], list(b.parameters()) + float_buffers(b))
