"""The user's workload: model, data, loss and eval targets (orchestrator/workload.py), the
workers loading their own shards, the Python entry point, gradient accumulation and bf16,
and data.root on S3 (the moto server over HTTP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from moto_server import fake_aws_env, moto_server
from workloads import calls

from orchestrator.config import ConfigError, load_config
from orchestrator.data import digits
from orchestrator.data_sync import local_root, sync
from orchestrator.run import train
from orchestrator.workers import Worker
from orchestrator.workload import DataInfo, WorkloadError, import_target, resolve_workload

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- in process
@pytest.mark.parametrize("target, expected", [
    ("nowhere_at_all:make", "cannot import nowhere_at_all (ModuleNotFoundError: No module "
                            "named 'nowhere_at_all')"),
    ("tests.workloads:missing", "tests.workloads has no attribute 'missing'"),
    ("tests.workloads:NOT_CALLABLE", "NOT_CALLABLE is a int, not callable"),
    ("tests.workloads", "expected module:callable, e.g. mypackage.models:make_model"),
])
def test_a_bad_target_is_one_line_naming_key_and_target(target, expected):
    with pytest.raises(WorkloadError) as err:
        import_target("model.target", target)
    assert str(err.value) == f"model.target={target}: {expected}"


def workload(*overrides: str):
    return resolve_workload(load_config(list(overrides)))


def test_a_failing_factory_names_the_key_the_target_and_the_cause():
    with pytest.raises(WorkloadError, match=r"^data.target=tests.workloads:failing_data: the "
                       r"train split failed: FileNotFoundError: no train data here$"):
        workload("data.target=tests.workloads:failing_data").dataset("train")
    with pytest.raises(WorkloadError, match="the test split is a int, not a map-style Dataset"):
        workload("data.target=tests.workloads:not_a_dataset").dataset("test")
    with pytest.raises(WorkloadError, match="returned a str, not a torch.nn.Module"):
        workload("model.target=tests.workloads:not_a_model").model(DataInfo())
    with pytest.raises(WorkloadError, match="unexpected keyword argument 'depth'"):
        workload("model=mlp", "model.args.depth=3").model(DataInfo((1, 8, 8), 10))


def test_loss_and_metric_results_are_checked():
    w = workload("loss.target=tests.workloads:vector_loss")
    model = w.model(DataInfo((1, 8, 8), 10))
    batch = (torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(WorkloadError, match=r"loss.target=tests.workloads:vector_loss: "
                       r"returned Tensor\(4,\), not a scalar float tensor"):
        w.check_loss(model, batch)


def test_built_in_model_gets_the_data_shape_and_classes_it_asks_for():
    w = workload("model=cnn", "model.args.width=4")
    net = w.model(DataInfo((3, 16, 16), 7))
    assert net(torch.zeros(2, 3, 16, 16)).shape == (2, 7)
    assert net[0].out_channels == 4


def test_default_metrics_follow_the_loss():
    test = digits("test")
    model = workload().model(DataInfo((1, 8, 8), 10))
    assert set(workload().evaluate(model, test, 100)) == {"test_acc"}
    w = workload("loss.target=orchestrator.workload:cross_entropy",
                 "eval.target=examples.char_lm.char_lm:bits_per_char")
    assert set(w.evaluate(model, test, 100, metric=False)) == {"test_loss"}


# --------------------------------------------------------------------------- data on S3
@pytest.fixture(scope="module")
def endpoint():
    with moto_server() as url:
        yield url


def test_an_s3_data_root_is_synced_to_each_node_cache(endpoint, tmp_path, monkeypatch):
    """data.root=s3://...: the factory reads a local copy; a second sync downloads nothing;
    a changed object is fetched again."""
    fake_aws_env(monkeypatch)
    monkeypatch.setenv("SQUALL_S3_ENDPOINT_URL", endpoint)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="data")
    for split in ("train", "test"):
        x, y = digits(split).tensors
        path = tmp_path / f"{split}.npz"
        np.savez(path, x=x.numpy(), y=y.numpy())
        s3.upload_file(str(path), "data", f"sets/digits/{split}.npz")
    cache = tmp_path / "cache"
    w = workload("data.target=tests.workloads:npz_digits", "data.root=s3://data/sets/digits",
                 f"data.cache={cache}")
    assert len(w.dataset("train")) == len(digits("train"))
    assert (cache / "data/sets/digits/test.npz").exists()
    assert sync("data", "sets/digits", cache / "data/sets/digits") == 0
    s3.put_object(Bucket="data", Key="sets/digits/test.npz", Body=b"changed")
    assert sync("data", "sets/digits", cache / "data/sets/digits") == 1
    assert (cache / "data/sets/digits/test.npz").read_bytes() == b"changed"
    with pytest.raises(ConfigError, match="data.root=s3://nobucket: bucket "
                       "'nobucket' does not exist"):
        local_root("s3://nobucket", str(cache))


# --------------------------------------------------------------------------- on Ray
def test_the_workers_load_the_training_split_not_the_driver(ray_session, make_config, tmp_path):
    """Each worker calls the data factory in its own process for the train split; the driver
    only for the test split it evaluates on."""
    log = tmp_path / "calls.txt"
    summary = train(make_config("workers=3", "steps=20", "model=mlp",
                                "data.target=tests.workloads:recording_digits",
                                f"data.args.log={log}"))
    assert summary["test_acc"] > 0.5
    train_pids = [pid for split, pid in calls(log) if split == "train"]
    assert len(train_pids) == len(set(train_pids)) == 3 and os.getpid() not in train_pids
    assert [pid for split, pid in calls(log) if split == "test"] == [os.getpid()]


def test_eval_on_a_worker_keeps_the_driver_free_of_data(ray_session, make_config, tmp_path):
    log = tmp_path / "calls.txt"
    summary = train(make_config(
        "workers=2", "steps=30", "eval.on=worker", "eval.every=10",
        "model.target=orchestrator.models:mlp", "model.args.input_shape=[1,8,8]",
        "model.args.num_classes=10", "data.target=tests.workloads:recording_digits",
        f"data.args.log={log}"))
    assert summary["test_acc"] > 0.5
    assert os.getpid() not in [pid for _, pid in calls(log)]
    rows = [json.loads(line) for line in Path(summary["run_dir"], "metrics.jsonl").open()]
    assert [r["step"] for r in rows if "test_acc" in r] == [10, 20, 30]


@pytest.fixture
def make_worker():
    """A parameter-server worker object in this process (its torch threads given back)."""
    threads = torch.get_num_threads()

    def make(*overrides: str) -> Worker:
        cfg = load_config(["workers=2", "model=mlp", *overrides])
        return Worker(0, resolve_workload(cfg), cfg, DataInfo((1, 8, 8), 10), "cpu")

    yield make
    torch.set_num_threads(threads)


def test_gradient_accumulation_equals_the_larger_batch(make_worker):
    """2 micro-batches of 16 are the batch of 32 of the same step (batch_indices positions),
    so the gradients agree up to summation order."""
    big = make_worker("data.batch_size=32")
    accumulated = make_worker("data.batch_size=16", "worker.grad_accum=2")
    state = big.state.numpy().copy()
    for step in (1, 2, 9):
        expected = big.gradient(state, step)
        got = accumulated.gradient(state, step)
        np.testing.assert_allclose(got.grad, expected.grad, rtol=1e-4, atol=1e-6)
        assert got.loss == pytest.approx(expected.loss, rel=1e-5)


def test_bf16_autocast_computes_the_gradient_in_bfloat16(make_worker):
    fp32, bf16 = make_worker(), make_worker("worker.precision=bf16")
    state = fp32.state.numpy().copy()
    a, b = fp32.gradient(state, 1).grad, bf16.gradient(state, 1).grad
    assert b.dtype == np.float32 and not np.array_equal(a, b)  # rounded in bf16 on the way
    assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.99


def test_the_examples_train(ray_session, make_config):
    """examples/: the image classifier with its own data module, and the character-level
    language model with its own loss and metric."""
    shapes = train(make_config("workers=2", "steps=120", "run.name=shapes",
                               "model.target=examples.shapes.shapes:make_model",
                               "data.target=examples.shapes.shapes:make_data",
                               "data.args.samples=600"))
    assert shapes["test_acc"] > 0.5  # 5 classes: chance is 0.2
    lm = train(make_config("workers=2", "steps=60", "run.name=lm",
                           "model.target=examples.char_lm.char_lm:make_model",
                           "data.target=examples.char_lm.char_lm:make_data",
                           "loss.target=examples.char_lm.char_lm:next_char_loss",
                           "eval.target=examples.char_lm.char_lm:bits_per_char",
                           "optim.name=AdamW", "optim.lr=3e-3", "optim.momentum=0"))
    assert lm["bits_per_char"] < 4.5 and "test_acc" not in lm  # uniform: log2(57) = 5.8


# --------------------------------------------------------------------------- Python API
SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from orchestrator.api import train
    from orchestrator.data import digits

    def make_model(input_shape, num_classes):  # defined in __main__: travels by value
        return torch.nn.Sequential(torch.nn.Flatten(),
                                   torch.nn.Linear(64, num_classes))

    def data(split):
        return digits(split)

    def loss(model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    summary = train(sys.argv[1:], model=make_model, data=data, loss=loss,
                    metric=lambda model, ds: {"samples": len(ds)})
    print(json.dumps(summary))
""")


def test_the_python_entry_point_takes_callables(tmp_path):
    """A script's own functions (as in a notebook) go to the workers by value; the config
    records their names; the summary comes back."""
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), "workers=2", "steps=40",
                           f"run.dir={tmp_path}", "run.name=api", "log.progress=false",
                           "optim.lr=0.1"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["test_loss"] < 1.5 and summary["samples"] == len(digits("test"))
    saved = (tmp_path / "api" / "config.yaml").read_text()
    assert "target: __main__:make_model" in saved and "target: __main__:<lambda>" in saved
