"""Configuration: groups, overrides, help, and the one-line errors for user mistakes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.cli import main
from orchestrator.config import (
    GROUPS,
    ConfigError,
    group_options,
    load_config,
    parse_override,
    schema_fields,
)


def test_defaults_come_from_conf_yaml():
    cfg = load_config()
    assert (cfg.strategy.name, cfg.data.name, cfg.model.name, cfg.cloud.name) == (
        "mean", "digits", "cnn", "local")
    assert cfg.workers == 4 and cfg.steps == 300


def test_group_choice_and_dotted_overrides():
    cfg = load_config(["model=mlp", "data=fake", "workers=8", "optim.lr=1e-3",
                       "data.batch_size=7", "ray.address=null", "run.name=exp1",
                       "data.shape=[1,8,8]", "eval.every=5", "seed=3"])
    assert cfg.model.name == "mlp" and cfg.data.name == "fake"
    assert cfg.workers == 8 and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.data.batch_size == 7 and cfg.data.shape == [1, 8, 8]
    assert cfg.ray.address is None and cfg.run.name == "exp1"
    assert cfg.eval.every == 5 and cfg.seed == 3


def test_group_yaml_values_apply_then_overrides_win():
    assert load_config(["data=mnist"]).data.batch_size == 64  # from conf/data/mnist.yaml
    assert load_config(["data.batch_size=5", "data=mnist"]).data.batch_size == 5


def test_required_keys_exist():
    keys = set(schema_fields())
    for key in ["workers", "steps", "seed", "data.batch_size", "optim.lr", "run.name",
                "run.dir", "eval.every", "ray.address"]:
        assert key in keys
    for group in ["strategy", "data", "model", "cloud"]:
        assert group in GROUPS and group_options(group)


def test_every_field_has_help():
    assert all(info.help for info in schema_fields().values())


@pytest.mark.parametrize("override, expected", [
    ("wrkers=3", "unknown key 'wrkers'; did you mean 'workers'?"),
    ("optim.lrr=0.1", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("workers=abc", "workers=abc: expected integer"),
    ("data.download=maybe", "expected boolean"),
    ("workers=0", "workers=0: must be >= 1"),
    ("optim.lr=-0.1", "optim.lr=-0.1: must be > 0"),
    ("data.partition=random", "data.partition=random: not allowed; valid: iid, "
                              "classes_per_worker, dirichlet"),
    ("strategy=nope", "strategy=nope: unknown option; valid: bulyan, centered_clip, geomed, "
                      "gossip, krum, mean, median, multi_krum, sign_vote, trimmed_mean"),
    ("model=vgg", "model=vgg: unknown option; valid: cnn, mlp, resnet18, resnet20"),
    ("workers", "malformed override 'workers'"),
    ("=3", "malformed override '=3'"),
    ("data.shape=[1,2", "malformed value in 'data.shape=[1,2'"),
    ("workers=2,4,8", "comma-separated value is a sweep"),
    ("strategy.name=mean", "pick it with strategy=<option>"),
])
def test_bad_input_is_one_clear_error(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_error_exits_2_with_one_line_and_no_ray(capsys):
    import ray

    assert main(["train", "workers=-1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "squall: error: workers=-1: must be >= 1"
    assert not ray.is_initialized()


def test_cli_error_as_a_process_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "train", "stratgy=krum"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "squall: error: unknown key 'stratgy'; did you mean 'strategy'?"]
    assert "Traceback" not in proc.stderr


def test_unknown_command(capsys):
    assert main(["trian"]) == 2
    assert "valid: train, config, trace" in capsys.readouterr().err


def test_train_help_lists_groups_options_and_field_docs(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "digits*" in out and "cifar10" in out and "resnet20" in out
    for key, info in schema_fields().items():
        if not key.endswith(".name") or key == "run.name":
            assert key in out and info.help in out


def test_config_command_prints_resolved_yaml(capsys):
    import yaml

    assert main(["config", "model=mlp", "workers=6"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["name"] == "mlp" and printed["workers"] == 6


def test_parse_override_values():
    assert parse_override("strategy.pre=[bucketing,nnm]") == ("strategy.pre",
                                                              ["bucketing", "nnm"])
    assert parse_override("ray.address=127.0.0.1:6379") == ("ray.address", "127.0.0.1:6379")
    assert parse_override("run.name=") == ("run.name", "")
