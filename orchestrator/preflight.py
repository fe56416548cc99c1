"""Checks of what a run will write, before Ray starts: `squall train` calls preflight(cfg)
after load_config and before orchestrator.run.train, so that a run that cannot write its run
directory or its checkpoints stops with one line (ConfigError) and leaves nothing behind.

Nothing is created here: a directory the run would create is checked by its nearest existing
ancestor (a directory, names within the file system's limits, and a directory can be made in it:
a probe made and removed at once, because os.access says yes to root on /proc or /sys).
S3 checkpoint locations get one listing (credentials found, bucket answers).
"""

from __future__ import annotations

import errno
import importlib.util
import os
import stat
import tempfile
from pathlib import Path

from orchestrator.config import Config, ConfigError, shown

# Room left in a path for what the run writes below a directory it checks:
# "/checkpoints/.ckpt-000000000.json.tmp-0123456789ab" and a little more.
RESERVED = 64


def preflight(cfg: Config) -> None:
    """ConfigError (one line, naming the key) when the run could not write what it must."""
    base = Path(cfg.run.dir).expanduser()
    check_directory("run.dir", cfg.run.dir, base)
    run_dir = base / cfg.run.name if cfg.run.name else None
    if run_dir is not None:
        _check_inside("run.name", cfg.run.name, base, run_dir)
        check_directory("run.name", cfg.run.name, run_dir)
    _check_checkpoint_dir(cfg, run_dir)
    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("log.tensorboard=true needs the tensorboard package: "
                          "pip install 'squall[tensorboard]'")


def _check_checkpoint_dir(cfg: Config, run_dir: Path | None) -> None:
    from orchestrator.checkpoint import CheckpointError, check_location  # torch: loaded anyway

    if not cfg.checkpoint.dir:  # <run dir>/checkpoints: checked with the run dir, unless it exists
        if run_dir is not None and run_dir.is_dir():
            check_directory("checkpoint.dir", str(run_dir / "checkpoints"),
                            run_dir / "checkpoints")
        return
    try:
        scheme, where = check_location(cfg.checkpoint.dir)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if scheme == "file":
        check_directory("checkpoint.dir", cfg.checkpoint.dir, Path(where))


def check_directory(key: str, value: str, path: Path) -> None:
    """`path` is a directory the run writes into, or one it can create: ConfigError naming
    `key`=`value` otherwise. Creates nothing that stays."""
    what = shown(key, value)
    existing, missing = _nearest_existing(what, path)
    mode = os.stat(existing).st_mode
    if not stat.S_ISDIR(mode):
        kind = "a file" if stat.S_ISREG(mode) else "something else"
        where = "" if existing == path else f"{existing} is "
        raise ConfigError(f"{what}: {where}{kind}, not a directory")
    name_max = _pathconf(existing, "PC_NAME_MAX", 255)
    for part in missing:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(f"{what}: too long for the file system: a name of "
                              f"{len(os.fsencode(part))} bytes; at most {name_max} bytes per "
                              f"path part in {existing}")
    path_max = _pathconf(existing, "PC_PATH_MAX", 4096)
    if len(os.fsencode(str(path))) + RESERVED >= path_max:
        raise ConfigError(f"{what}: too long for the file system: a path of "
                          f"{len(os.fsencode(str(path)))} bytes; at most "
                          f"{path_max - RESERVED - 1} (the run's files go below it)")
    try:  # os.access answers yes to root even where nothing can be made (/proc, /sys)
        os.rmdir(tempfile.mkdtemp(prefix=".squall-preflight-", dir=existing))
    except OSError as e:
        reason = e.strerror or type(e).__name__
        if existing == path:
            raise ConfigError(f"{what}: cannot write in {existing} ({reason})") from None
        raise ConfigError(f"{what}: cannot create directories in {existing} ({reason})") from None


def _nearest_existing(what: str, path: Path) -> tuple[Path, list[str]]:
    """The path itself or its nearest existing ancestor, and the names below it to create."""
    missing: list[str] = []
    while True:
        try:
            os.stat(path)
            return path, missing[::-1]
        except PermissionError as e:
            raise ConfigError(f"{what}: cannot look into {path.parent} ({e.strerror})") from None
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
                raise ConfigError(f"{what}: cannot use {path} ({e.strerror})") from None
            if os.path.islink(path):  # a link to nowhere: mkdir would fail on it
                raise ConfigError(f"{what}: {path} is a symbolic link to a missing "
                                  f"{os.readlink(path)}") from None
        if path.parent == path:  # not even the root exists: cannot happen on a sane system
            raise ConfigError(f"{what}: no existing directory above it")
        missing.append(path.name)
        path = path.parent


def _check_inside(key: str, value: str, base: Path, run_dir: Path) -> None:
    """run.name resolves inside run.dir (a symbolic link can point elsewhere)."""
    inside, target = os.path.realpath(base), os.path.realpath(run_dir)
    if target == inside or os.path.commonpath([inside, target]) != inside:
        raise ConfigError(f"{shown(key, value)}: resolves to {target}, outside "
                          f"run.dir={base}; it must name a directory inside run.dir")


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default
