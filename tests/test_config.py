"""Configuration: groups, overrides, help, and the one-line errors for user mistakes."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import pickle
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from orchestrator.cli import main
from orchestrator.config import (
    GROUPS,
    ConfigError,
    group_options,
    job_spec,
    load_config,
    parse_override,
    repeated_overrides,
    schema_fields,
)
from strategies.registry import RULES


def test_defaults_come_from_conf_yaml():
    cfg = load_config()
    assert (cfg.strategy.name, cfg.data.name, cfg.model.name, cfg.cloud.name) == (
        "mean", "digits", "cnn", "local")
    assert cfg.workers == 4 and cfg.steps == 300


def test_group_choice_and_dotted_overrides():
    cfg = load_config(["model=mlp", "data=fake", "workers=8", "optim.lr=1e-3",
                       "data.batch_size=7", "ray.address=null", "run.name=exp1",
                       "data.args.shape=[1,8,8]", "eval.every=5", "seed=3"])
    assert cfg.model.name == "mlp" and cfg.data.name == "fake"
    assert cfg.workers == 8 and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.data.batch_size == 7 and cfg.data.args["shape"] == [1, 8, 8]
    assert cfg.ray.address is None and cfg.run.name == "exp1"
    assert cfg.eval.every == 5 and cfg.seed == 3


def test_a_target_replaces_the_built_in_option():
    """model.target / data.target: the option becomes 'custom', the built-in's arguments do
    not apply; a built-in names its own target (one path for both)."""
    cfg = load_config(["model.target=mypkg.nets:make", "model.args.depth=3"])
    assert (cfg.model.name, cfg.model.target, cfg.model.args) == (
        "custom", "mypkg.nets:make", {"depth": 3})
    assert load_config().model.target == "orchestrator.models:cnn"
    assert load_config(["data.target=mypkg.data:load"]).data.args == {}
    assert load_config(["model=mlp", "model.args.hidden=7"]).model.args == {"hidden": 7}
    with pytest.raises(ConfigError, match="give either model=<option> or model.target"):
        load_config(["model=mlp", "model.target=mypkg.nets:make"])


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
    ("log.progress=maybe", "expected boolean"),
    ("workers=0", "workers=0: must be >= 1"),
    ("optim.lr=-0.1", "optim.lr=-0.1: must be > 0"),
    ("data.partition=random", "data.partition=random: not allowed; valid: iid, "
                              "classes_per_worker, dirichlet"),
    ("strategy=nope", "strategy=nope: unknown option; valid: bulyan, centered_clip, geomed, "
                      "gossip, krum, mean, median, multi_krum, sign_vote, trimmed_mean"),
    ("model=vgg", "model=vgg: unknown option; valid: cnn, mlp, resnet18, resnet20"),
    ("workers", "malformed override 'workers'"),
    ("=3", "malformed override '=3'"),
    ("data.args.shape=[1,2", "malformed value in 'data.args.shape=[1,2'"),
    ("eval.on=gpu", "eval.on=gpu: not allowed; valid: driver, worker"),
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


def test_gossip_needs_two_workers():
    with pytest.raises(ConfigError) as err:
        load_config(["strategy=gossip", "workers=1"])
    assert str(err.value) == "strategy=gossip with workers=1: gossip needs at least 2 workers"
    assert load_config(["strategy=gossip", "workers=2"]).workers == 2
    assert load_config(["workers=1"]).workers == 1  # the parameter server runs with one


def test_repeated_overrides_last_wins_with_a_note():
    overrides = ["workers=2", "strategy=krum", "workers=3", "strategy=mean", "seed=1"]
    assert repeated_overrides(overrides) == ["workers given twice; using workers=3",
                                             "strategy given twice; using strategy=mean"]
    cfg = load_config(overrides)
    assert cfg.workers == 3 and cfg.strategy.name == "mean"
    assert repeated_overrides(["seed=1", "seed=2", "seed=3"]) == [
        "seed given 3 times; using seed=3"]
    assert repeated_overrides(["workers=2", "steps=2"]) == []


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


# --------------------------------------------------------------------------- config per component
@pytest.mark.parametrize("overrides, expected", [
    (["strategy=mean", "strategy.topology=ring"],
     "strategy.topology needs strategy=gossip (got strategy=mean)"),
    (["strategy=krum", "strategy.compress=moniqua"], "strategy.compress needs strategy=gossip"),
    (["strategy=gossip", "strategy.pre=[nnm]"],
     "strategy.pre applies to parameter-server rules, not to strategy=gossip"),
    (["strategy=gossip", "strategy.m=2"],
     "strategy.m applies to parameter-server rules, not to strategy=gossip"),
    (["strategy.noise=0.1", "strategy=gossip"], "strategy.noise applies to parameter-server"),
    (["cloud=local", "cloud.preempt_prob=0.1"],
     "cloud.preempt_prob needs cloud=simulated (got cloud=local)"),
    (["cloud=static", "cloud.ami=ami-1"], "cloud.ami needs cloud=aws (got cloud=static)"),
    (["cloud.bid=0.2"], "cloud.bid needs cloud=simulated or cloud=aws"),
])
def test_a_key_of_another_option_is_one_clear_error(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_the_group_option_picks_the_schema_class():
    from cloud.config import AwsCloudConfig, CloudConfig, SimulatedCloudConfig
    from strategies.config import GossipConfig, ParameterServerConfig

    assert type(load_config().strategy) is ParameterServerConfig
    assert type(load_config(["strategy=gossip"]).strategy) is GossipConfig
    assert type(load_config().cloud) is CloudConfig
    assert type(load_config(["cloud=static"]).cloud) is CloudConfig
    assert type(load_config(["cloud=simulated"]).cloud) is SimulatedCloudConfig
    assert type(load_config(["cloud=aws"]).cloud) is AwsCloudConfig
    assert not hasattr(load_config().strategy, "topology")
    assert not hasattr(load_config(["strategy=gossip"]).strategy, "pre")


def test_rule_options_come_from_the_registry():
    from strategies.registry import PREAGGREGATORS, RULES

    assert set(group_options("strategy")) == {*RULES.names(), "gossip"}
    keys = set(schema_fields())
    for entry in [*RULES.entries(), *PREAGGREGATORS.entries()]:
        for f in dataclasses.fields(entry.params) if entry.params else ():
            assert f"strategy.{f.name}" in keys
    assert load_config(["strategy=multi_krum", "strategy.m=3"]).strategy.m == 3
    cfg = load_config(["strategy=centered_clip", "strategy.tau=2", "strategy.iters=5"])
    assert (cfg.strategy.tau, cfg.strategy.iters) == (2.0, 5)
    assert load_config(["strategy=geomed", "strategy.tol=1e-4"]).strategy.tol == 1e-4
    cfg = load_config(["strategy.pre=[bucketing]", "strategy.bucket_size=3"])
    assert cfg.strategy.bucket_size == 3
    with pytest.raises(ConfigError, match="strategy.m=-1: must be >= 0"):
        load_config(["strategy=multi_krum", "strategy.m=-1"])


def test_a_registered_rule_needs_no_yaml_file(monkeypatch):
    from strategies.registry import RULES, Entry

    monkeypatch.setitem(RULES._entries, "toy_rule", Entry(
        "toy_rule", lambda params: None, "a rule without conf/strategy/toy_rule.yaml",
        min_workers=lambda f: 2 * f + 1, requirement="n >= 2f+1"))
    assert load_config(["strategy=toy_rule"]).strategy.name == "toy_rule"
    with pytest.raises(ConfigError, match="toy_rule needs n >= 2f"r"\+1 = 5 workers for f=2"):
        load_config(["strategy=toy_rule", "workers=4", "byzantine.f=2"])


def test_the_parameter_server_schema_is_built_from_params():
    from strategies.config import _registry_fields
    from strategies.registry import Registry

    @dataclass
    class ToyParams:
        width: int = field(default=4, metadata={"help": "the toy's width", "ge": 1})

    toys = Registry("toy")
    toys.register("a", "first", params=ToyParams)(lambda p: p)
    toys.register("b", "second", params=ToyParams)(lambda p: p)  # the same option: one field
    [(name, tp, f)] = _registry_fields((toys,), taken={"name"})
    assert (name, tp, f.default, f.metadata["help"]) == ("width", int, 4, "a: the toy's width")

    @dataclass
    class Clash:
        width: float = 1.0

    toys.register("c", "third", params=Clash)(lambda p: p)
    with pytest.raises(TypeError, match="'width' is declared differently"):
        _registry_fields((toys,), taken=set())


def test_gossip_gamma_is_resolved_outside_the_checks():
    from strategies.config import GossipConfig, gossip_gamma

    assert gossip_gamma(GossipConfig(compress="moniqua", bits=1)) == 0.1
    assert gossip_gamma(GossipConfig(compress="choco")) == 0.3
    assert gossip_gamma(GossipConfig()) == 1.0
    assert gossip_gamma(GossipConfig(gamma=0.5)) == 0.5
    assert load_config(["strategy=gossip", "strategy.compress=choco"]).strategy.gamma == 0.3
    assert load_config(["strategy=gossip", "strategy.gamma=0.7"]).strategy.gamma == 0.7


def test_configs_pickle_for_ray_actors():
    cfg = load_config(["strategy=multi_krum", "cloud=simulated"])
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and type(again.strategy) is type(cfg.strategy)


def test_job_spec_carries_what_pools_need():
    from cloud.config import JobSpec

    cfg = load_config(["workers=3", "seed=7", "run.name=r", "worker.num_cpus=2",
                       "ray.address=127.0.0.1:1"])
    assert job_spec(cfg) == JobSpec(workers=3, seed=7, run_name="r", worker_num_cpus=2.0,
                                    ray=cfg.ray)


def test_help_shows_both_strategy_families_and_the_rules_descriptions(capsys):
    from strategies.registry import RULES

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "strategy fields of strategy=gossip:" in out and "strategy.topology" in out
    assert "strategy fields of the parameter-server rules" in out and "strategy.m " in out
    assert "cloud fields of cloud=simulated:" in out and "cloud fields of cloud=aws:" in out
    for entry in RULES.entries():
        assert entry.description in out


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_cloud_imports_nothing_from_orchestrator():
    root = pathlib.Path(__file__).resolve().parent.parent
    files = sorted((root / "cloud").rglob("*.py"))
    assert files
    for path in files:
        assert "orchestrator" not in _imports(path), f"{path.name} imports orchestrator"
    for path in [root / "strategies" / "config.py", root / "conf" / "schema.py"]:
        assert not _imports(path) & {"orchestrator", "cloud", "ray"}, path.name



def test_the_collective_plane_refuses_gossip_and_takes_every_rule():
    with pytest.raises(ConfigError) as err:
        load_config(["strategy=gossip", "worker.plane=collective"])
    assert str(err.value) == ("worker.plane=collective: strategy=gossip has its own plane; "
                              "use worker.plane=driver or auto")
    for rule in RULES.names():
        load_config([f"strategy={rule}", "workers=7", "worker.plane=collective"])


def test_auto_picks_the_collective_plane_for_plain_mean_only():
    from orchestrator.config import uses_collective_plane

    assert uses_collective_plane(load_config())
    assert not uses_collective_plane(load_config(["worker.plane=driver"]))
    assert not uses_collective_plane(load_config(["strategy=median", "workers=3"]))
    assert not uses_collective_plane(load_config(["byzantine.f=1"]))
    assert uses_collective_plane(load_config(["strategy=median", "workers=3",
                                              "worker.plane=collective"]))
