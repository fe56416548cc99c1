"""Byzantine workers in the job: configuration rules, the driver's aggregation step, and
end-to-end runs on a real local Ray cluster."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.config import ConfigError, load_config
from orchestrator.parameter_server import Aggregation
from orchestrator.run import train
from orchestrator.step import TooFewWorkers
from strategies.attacks import byzantine_ranks
from strategies.rules.krum import krum


@pytest.mark.parametrize("overrides, message", [
    (["strategy=krum", "workers=5", "byzantine.f=2"],
     "strategy=krum with workers=5: krum needs n >= 2f+3 = 7 workers for f=2, got 5"),
    (["strategy=bulyan", "workers=6", "strategy.f=1"], "bulyan needs n >= 4f+3 = 7"),
    (["strategy=krum", "workers=9", "byzantine.f=2", "strategy.pre=[bucketing]"],
     "got 5"),  # bucketing leaves ceil(9/2) = 5 inputs for the rule
    (["strategy.pre=[shuffle]"], "unknown step 'shuffle'; valid: bucketing, nnm"),
    (["strategy=krum", "strategy.noise=1"], "strategy.noise needs strategy=median or sign_vote"),
    (["byzantine.f=4", "workers=4"], "byzantine.f=4: must be < workers=4"),
    (["byzantine.attack=flip"], "byzantine.attack=flip: not allowed; valid: sign_flip, "
                                "gaussian, alie, ipm, bulyan_coord, nan, label_flip"),
    (["strategy=multi_krum", "workers=7", "byzantine.f=1", "strategy.m=7"],
     "strategy.m=7: must be <= workers - f = 6"),
])
def test_rule_requirements_are_checked_before_ray_starts(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert message in str(err.value)


def rows(n: int, d: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_attack_replaces_exactly_the_byzantine_rows():
    cfg = load_config(["workers=7", "strategy=krum", "byzantine.f=2", "byzantine.attack=ipm",
                       "byzantine.eps=3"])
    agg = Aggregation(cfg)
    assert agg.byzantine == set(byzantine_ranks(7, 2, cfg.seed))
    G, ranks = rows(7), list(range(7))
    forged = agg._inject_attack(G, ranks, torch.Generator())
    honest = [r for r in ranks if r not in agg.byzantine]
    for r in ranks:
        expected = -3 * G[honest].mean(0) if r in agg.byzantine else G[r]
        assert torch.allclose(forged[r], expected)
    assert torch.equal(agg(G, ranks, step=1), krum(forged, 2))


def test_non_finite_gradients_are_rejected_and_counted():
    """Rejected rows count as identified faulty inputs: the rule runs on the rest with f - k."""
    agg = Aggregation(load_config(["workers=7", "strategy=trimmed_mean", "byzantine.f=2",
                                   "byzantine.attack=nan", "strategy.f=3"]))
    G = rows(7)
    out = agg(G, list(range(7)), step=1)
    honest = [r for r in range(7) if r not in agg.byzantine]
    kept = G[honest].sort(dim=0).values[1:-1]  # trimmed with f = 3 - 2 = 1
    assert agg.rejected == 2 and torch.allclose(out, kept.mean(0))


def test_finite_rows_whose_sum_overflows_are_kept_and_inf_rows_rejected():
    """The finiteness check sums each row; a sum can overflow float32 on finite values."""
    agg = Aggregation(load_config(["workers=4", "strategy=mean"]))
    G = torch.zeros(4, 3)
    G[0] = torch.tensor([3e38, 3e38, -1.0])  # finite, sum overflows to +inf
    G[1, 2] = float("inf")
    G[2, 0], G[2, 1] = float("inf"), float("-inf")  # sums to NaN
    G[3] = 1.0
    out = agg(G, list(range(4)), step=1)
    assert agg.rejected == 2
    assert torch.equal(out, (G[0] + G[3]) / 2)


def test_too_few_live_workers_skip_or_fail():
    skip = Aggregation(load_config(["workers=5", "strategy=krum", "byzantine.f=1"]))
    assert skip(rows(4), [0, 1, 2, 3], step=1) is None  # krum needs 5 for f=1
    fail = Aggregation(load_config(["workers=5", "strategy=krum", "byzantine.f=1",
                                    "strategy.on_too_few=fail"]))
    with pytest.raises(TooFewWorkers, match="krum needs n >= 2f\\+3 = 5 workers"):
        fail(rows(4), [0, 1, 2, 3], step=1)


def test_centered_clip_starts_from_the_previous_aggregate():
    agg = Aggregation(load_config(["workers=5", "strategy=centered_clip", "strategy.tau=0.1"]))
    first = agg(rows(5, seed=1), list(range(5)), step=1)
    assert torch.equal(agg.state[-1]["prev"], first)  # the rule's state, returned
    second = agg(rows(5, seed=2), list(range(5)), step=2)
    assert (second - first).norm() <= 0.1 * 3 + 1e-6  # 3 iterations of radius tau from prev


def run(make_config, *overrides: str) -> dict:
    return train(make_config("workers=5", "steps=120", "model=mlp", *overrides))


def test_ipm_breaks_mean_but_not_krum(ray_session, make_config):
    attack = ("byzantine.f=1", "byzantine.attack=ipm", "byzantine.eps=10")
    broken = run(make_config, "strategy=mean", *attack)
    robust = run(make_config, "strategy=krum", *attack)
    assert broken["test_acc"] < 0.5 or broken["skipped_steps"] > 60
    assert robust["test_acc"] > 0.85 and robust["skipped_steps"] == 0
    assert robust["byzantine_ranks"] == byzantine_ranks(5, 1, 0)


def test_sign_vote_sends_one_bit_per_parameter(ray_session, make_config):
    summary = run(make_config, "strategy=sign_vote", "optim.lr=0.001", "optim.momentum=0")
    n_params = 64 * 128 + 128 + 128 * 10 + 10  # the mlp on 8x8 digits
    assert summary["bytes_sent"] == 120 * 5 * math.ceil(n_params / 8)
    assert summary["test_acc"] > 0.85


def test_nan_attack_never_reaches_the_model(ray_session, make_config):
    summary = run(make_config, "strategy=median", "byzantine.f=2", "byzantine.attack=nan")
    assert summary["rejected_updates"] == 120 * 2
    assert summary["test_acc"] > 0.85


def test_label_flip_attack_runs_in_the_workers_data(ray_session, make_config):
    summary = run(make_config, "strategy=trimmed_mean", "byzantine.f=1",
                  "byzantine.attack=label_flip")
    assert summary["test_acc"] > 0.85 and summary["rejected_updates"] == 0
