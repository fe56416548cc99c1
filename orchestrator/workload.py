"""The workload: the model to train, the data, the loss and the evaluation metric.

Each part is a callable, named in the configuration as `module:callable` (model.target,
data.target, loss.target, eval.target) or handed over directly by orchestrator.api.train.
The built-in models and data sets are such callables as well: conf/model/cnn.yaml names
`orchestrator.models:cnn`, conf/data/digits.yaml `orchestrator.data:digits`. The contract:

- model: `fn(**model.args) -> torch.nn.Module`; a factory that takes `input_shape` or
  `num_classes` (and is not given them in model.args) gets those of the data set;
- data: `fn(split, **data.args)` with split "train" or "test", returning a map-style
  `torch.utils.data.Dataset` of (input, label) pairs; one that takes `root` gets data.root
  (an s3:// root is first copied to a local cache on each node, orchestrator.data_sync);
- loss: `fn(model, batch) -> scalar tensor`, batch being what the DataLoader yields
  (default: cross entropy of model(inputs) against the labels);
- eval metric: `fn(model, dataset) -> dict of floats`, logged beside the default metrics
  (test_acc without a loss.target, test_loss with one).

A part that does not import, is not callable, raises or returns the wrong type is a
`WorkloadError` (a ConfigError: one line naming the key, the target and the cause).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from orchestrator.config import Config, ConfigError

PARTS = ("model", "data", "loss", "eval")


class WorkloadError(ConfigError):
    """A part of the workload failed: the message names its key, its target and the cause."""


def cause(error: BaseException) -> str:
    """The exception as Python's last traceback line has it ("ValueError: no such file"),
    cut to one line."""
    lines = traceback.format_exception_only(type(error), error)[-1].strip().splitlines()
    return lines[0] + (" ..." if len(lines) > 1 else "")


def import_target(key: str, target: str) -> Callable:
    """The callable that `target` ("package.module:attribute.path") names."""
    module_name, sep, path = target.partition(":")
    if not sep or not module_name or not path:
        raise WorkloadError(f"{key}={target}: expected module:callable, e.g. "
                            "mypackage.models:make_model")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises
        raise WorkloadError(f"{key}={target}: cannot import {module_name} ({cause(e)})") from None
    for part in path.split("."):
        if not hasattr(obj, part):
            raise WorkloadError(f"{key}={target}: {module_name} has no attribute "
                                f"'{path}'") from None
        obj = getattr(obj, part)
    if not callable(obj):
        raise WorkloadError(f"{key}={target}: {path} is a {type(obj).__name__}, not callable")
    return obj


def target_name(fn: Callable) -> str:
    """'module:qualname' of a callable handed over directly (what config.yaml records)."""
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def takes(fn: Callable, name: str) -> bool:
    """Whether `fn` accepts a keyword argument `name` (or any, through **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name and p.kind is not p.POSITIONAL_ONLY or p.kind is p.VAR_KEYWORD
               for p in params)


@dataclass(frozen=True)
class DataInfo:
    """What the driver learnt from the test split: an input's shape and the number of
    classes (None where the data set does not tell)."""

    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None


def data_info(dataset: Any) -> DataInfo:
    """An input's shape (of the first sample) and the classes: len(dataset.classes), else
    max(dataset.targets) + 1, else None."""
    first = dataset[0]
    x = first[0] if isinstance(first, (tuple, list)) else first
    shape = tuple(x.shape) if hasattr(x, "shape") else None
    if getattr(dataset, "classes", None) is not None:
        return DataInfo(shape, len(dataset.classes))
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets):
        return DataInfo(shape, int(torch.as_tensor(targets).max()) + 1)
    return DataInfo(shape, None)


def cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    """The default loss: classification of (inputs, labels) batches."""
    inputs, labels = batch
    return nn.functional.cross_entropy(model(inputs), labels)


@dataclass
class Workload:
    """The resolved workload: callables and their arguments (sent to every worker, by
    cloudpickle: a callable of an importable module travels by name, one defined in
    __main__ or a notebook by value)."""

    model_fn: Callable[..., nn.Module]
    data_fn: Callable[..., Any]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
    metric_fn: Callable[[nn.Module, Any], dict] | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    data_args: dict[str, Any] = field(default_factory=dict)
    root: str = ""  # data.root: a local directory or s3://bucket/prefix
    cache: str = ""  # data.cache: where an s3:// root is copied on each node
    targets: dict[str, str] = field(default_factory=dict)  # part -> target, for messages

    def _error(self, part: str, what: str) -> WorkloadError:
        return WorkloadError(f"{part}.target={self.targets.get(part, '?')}: {what}")

    def dataset(self, split: str) -> Any:
        """The data factory's data set for `split` ("train" or "test")."""
        kwargs = dict(self.data_args)
        if self.root and "root" not in kwargs and takes(self.data_fn, "root"):
            from orchestrator.data_sync import local_root

            kwargs["root"] = local_root(self.root, self.cache)
        try:
            dataset = self.data_fn(split, **kwargs)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's factory
            raise self._error("data", f"the {split} split failed: {cause(e)}") from None
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise self._error("data", f"the {split} split is a {type(dataset).__name__}, not "
                              "a map-style Dataset (__getitem__ and __len__)")
        if len(dataset) == 0:
            raise self._error("data", f"the {split} split is empty")
        return dataset

    def model(self, info: DataInfo) -> nn.Module:
        """A new model (its initial weights follow torch's seed): model_fn(**model.args),
        plus the data's input_shape and num_classes where the factory takes them."""
        kwargs = dict(self.model_args)
        for name, value in (("input_shape", info.input_shape), ("num_classes", info.num_classes)):
            if name not in kwargs and value is not None and takes(self.model_fn, name):
                kwargs[name] = value
        try:
            model = self.model_fn(**kwargs)
        except Exception as e:  # noqa: BLE001 - the user's factory
            raise self._error("model", cause(e)) from None
        if not isinstance(model, nn.Module):
            raise self._error("model", f"returned a {type(model).__name__}, not a "
                              "torch.nn.Module")
        return model

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The training loss of one batch (the loss target's, else cross entropy)."""
        return (self.loss_fn or cross_entropy)(model, batch)

    def check_loss(self, model: nn.Module, batch: Any) -> None:
        """The loss of one batch is a scalar tensor that backward() can follow."""
        try:
            value = self.loss(model, batch)
        except Exception as e:  # noqa: BLE001 - the user's function
            if self.loss_fn is None:
                raise self._error("model", f"cross entropy of model(inputs) against the "
                                  f"labels failed: {cause(e)}; set loss.target") from None
            raise self._error("loss", cause(e)) from None
        if not (isinstance(value, torch.Tensor) and value.numel() == 1
                and value.is_floating_point()):
            raise self._error("loss", f"returned {type(value).__name__}"
                              f"{tuple(value.shape) if hasattr(value, 'shape') else ''}, "
                              "not a scalar float tensor")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Any, batch_size: int,
                 device: torch.device | str = "cpu", metric: bool = True) -> dict[str, float]:
        """The metrics of `model` on `dataset`: test_acc (classification) or test_loss (a
        loss target), then (metric=True) the eval target's own."""
        was_training = model.training
        model.eval()
        try:
            metrics = self._default_metrics(model, dataset, batch_size, torch.device(device))
            if metric and self.metric_fn is not None:
                metrics.update(self.metric(model, dataset))
        finally:
            model.train(was_training)
        return metrics

    def _default_metrics(self, model: nn.Module, dataset: Any, batch_size: int,
                         device: torch.device) -> dict[str, float]:
        total, score = 0, 0.0
        for batch in DataLoader(dataset, batch_size=batch_size):
            batch = to_device(batch, device)
            size = len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)
            if self.loss_fn is None:
                inputs, labels = batch
                score += float((model(inputs).argmax(1) == labels).sum())
            else:
                score += float(self.loss_fn(model, batch)) * size
            total += size
        return {"test_acc" if self.loss_fn is None else "test_loss": score / max(total, 1)}

    @torch.no_grad()
    def metric(self, model: nn.Module, dataset: Any) -> dict[str, float]:
        """The eval target's metrics of `model` on `dataset`, as floats."""
        try:
            values = self.metric_fn(model, dataset)
        except Exception as e:  # noqa: BLE001 - the user's function
            raise self._error("eval", cause(e)) from None
        try:
            return {str(k): float(v) for k, v in dict(values).items()}
        except (TypeError, ValueError):
            raise self._error("eval", f"returned {type(values).__name__}, not a dict of "
                              "numbers") from None


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """A batch (tensor, or tuple/list/dict of them) moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device, non_blocking) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch


def code_paths(cfg: Config) -> list[str]:
    """Where the user's modules are found on the driver, as on the workers: the current
    directory (as `python -m` has it), ray.working_dir, and the parents of ray.py_modules."""
    paths = [os.getcwd()]
    if cfg.ray.working_dir:
        paths.append(cfg.ray.working_dir)
    paths += [str(Path(p).expanduser().resolve().parent) for p in cfg.ray.py_modules]
    return [str(Path(p).expanduser().resolve()) for p in paths if "://" not in p]


def resolve_workload(cfg: Config, **given: Callable | None) -> Workload:
    """The workload of cfg; `given` (model, data, loss, eval) are callables handed over
    directly, which take the place of their targets."""
    for path in code_paths(cfg):
        if path not in sys.path:
            sys.path.append(path)
    parts: dict[str, Callable | None] = {}
    for part in PARTS:
        target = getattr(cfg, part).target
        if given.get(part) is not None:
            parts[part] = given[part]
        elif target:
            parts[part] = import_target(f"{part}.target", target)
        else:
            parts[part] = None
    return Workload(model_fn=parts["model"], data_fn=parts["data"], loss_fn=parts["loss"],
                    metric_fn=parts["eval"], model_args=dict(cfg.model.args),
                    data_args=dict(cfg.data.args), root=cfg.data.root, cache=cfg.data.cache,
                    targets={p: getattr(cfg, p).target for p in PARTS})
