"""Chaos benchmark: preemption storms, SIGKILLs, malformed invocations, attacks under preemption.

    .venv/bin/python -m benchmarks.chaos            # full run (~65 min on a busy 2-core box)
    .venv/bin/python -m benchmarks.chaos --quick    # smoke run (~12 min there): small targets
    .venv/bin/python -m benchmarks.chaos --sections malformed,grid   # only these sections

Four sections, each a set of real `python -m orchestrator train ...` processes (each with a
fresh RAY_TMPDIR, its own session, no AWS credentials, Ray on loopback):

1. storm: one run on a simulated spot pool with a high per-step reclaim probability, against
   the same job without preemption (same seed): preemptions, joins, live workers, skipped
   steps, both accuracies. Met when preemptions >= the target and |acc - clean| <= 0.02.
2. sigkill: one run killed with SIGKILL (its whole process group: driver and local Ray) at
   seeded random steps, resumed each time by the same command, then run to the end; met when
   its model.pt equals an uninterrupted run's tensor by tensor (torch.equal).
3. malformed: bad invocations (unknown keys, bad values, ranges, group options, paths,
   run.name escapes, cross-family keys, rule requirements, malformed overrides); each must
   exit 2 with one stderr line `squall: error: ...` naming its input, no traceback, nothing
   on stdout, no file created (run.dir and the working directory are temporary and checked),
   and nothing started (RAY_TMPDIR stays empty, no process left in its session).
4. grid: every robust rule x every attack on a simulated pool with cloud.preempt_prob=0.1;
   each run must exit 0 (skipped steps are fine).

Every number and verdict in benchmarks/chaos.md is computed from what the run measured. The
script rewrites only the part between `<!-- generated -->` and `<!-- end generated -->`, and
inside it only the blocks of the sections it ran (a section not run keeps its earlier block,
with that block's own date and command); the "Reading notes" below it are never touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.md_parts import invocation

SQUALL = [sys.executable, "-m", "orchestrator", "train"]
OUT = Path(__file__).with_suffix(".md")
TITLE = "# Chaos benchmark: preemption storms, SIGKILLs, malformed invocations, attacks " \
        "under preemption"
GEN_START, GEN_END = "<!-- generated -->", "<!-- end generated -->"
NOTES_HEADING = "## Reading notes"
NOTES_STUB = (f"{NOTES_HEADING}\n\n(Hand-written interpretation goes here; "
              "`python -m benchmarks.chaos` never rewrites this section.)\n")
SECTIONS = {  # key -> title, in the order they run and appear
    "storm": "1. Preemption storm",
    "sigkill": "2. SIGKILL and resume",
    "malformed": "3. Malformed invocations",
    "grid": "4. Every attack x every rule under heavy preemption",
}
ACC_TOLERANCE = 0.02


@dataclass(frozen=True)
class Settings:
    """What one mode (--quick or full) runs."""

    mode: str
    storm_workers: int = 5
    storm_steps: int = 6000
    storm_prob: float = 0.02
    storm_target: int = 50
    kill_count: int = 20
    kill_steps: int = 150
    kill_seed: int = 7
    quick_cases_only: bool = False
    grid_rules: tuple[str, ...] | None = None  # None: every rule of the registry
    grid_attacks: tuple[str, ...] | None = None  # None: every attack
    grid_steps: int = 60
    grid_prob: float = 0.1


FULL = Settings("full")
QUICK = Settings("quick", storm_steps=600, storm_target=5, kill_count=3, kill_steps=40,
                 quick_cases_only=True, grid_rules=("median", "krum"),
                 grid_attacks=("alie", "sign_flip"))


def log(text: str) -> None:
    print(text, flush=True)


# =========================================================================== processes
def clean_env(ray_tmp: Path, empty_file: Path) -> dict[str, str]:
    """A squall subprocess's environment: no AWS credentials from anywhere, no Ray address,
    Ray's temporary directory `ray_tmp`, Ray on loopback."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k not in ("RAY_ADDRESS", "SQUALL_S3_ENDPOINT_URL")}
    env.update(AWS_CONFIG_FILE=str(empty_file), AWS_SHARED_CREDENTIALS_FILE=str(empty_file),
               AWS_EC2_METADATA_DISABLED="true", RAY_TMPDIR=str(ray_tmp),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    return env


def _stat_fields(pid: str) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...


def session_processes(sid: int, also_mentioning: str = "") -> dict[int, str]:
    """Live (non-zombie) processes of session `sid`, or whose command line mentions
    `also_mentioning` (a Ray temp dir): pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        fields_ = _stat_fields(entry.name)
        if fields_ is None or fields_[0] == "Z":
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields_[3]) == sid or (also_mentioning and also_mentioning in cmd):
            found[int(entry.name)] = cmd.strip()[:160]
    return found


@dataclass
class Finished:
    """What one squall process did."""

    args: list[str]
    rc: int | None  # None: killed by this harness (timeout or a planned SIGKILL)
    stdout: str
    stderr: str
    wall_s: float
    leftovers: dict[int, str]  # processes still alive after it ended (then killed here)
    ray_tmp_used: bool  # something appeared in its RAY_TMPDIR
    timed_out: bool = False


class Squall:
    """One `python -m orchestrator train ARGS` in its own session, with a fresh RAY_TMPDIR
    (short: Ray's socket paths are limited to ~100 characters)."""

    def __init__(self, args: list[str], cwd: Path | None = None) -> None:
        self.args = args
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="cr", dir="/tmp"))
        self.empty = self.ray_tmp.with_name(self.ray_tmp.name + "-empty")
        self.empty.write_text("")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([*SQUALL, *args], cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True,
                                     env=clean_env(self.ray_tmp, self.empty))

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self, timeout: float) -> Finished:
        """Wait (killing the group at `timeout`), then look for what it left running."""
        timed_out = False
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill_group()
            try:
                out, err = self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:  # a process outside the group holds the pipes
                self._end(self._leftovers())
                out, err = self.proc.communicate()
        wall = time.perf_counter() - self.t0
        leftovers = self._leftovers()
        self._end(leftovers)
        used = any(self.ray_tmp.iterdir())
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        self.empty.unlink(missing_ok=True)
        rc = None if timed_out or self.proc.returncode == -signal.SIGKILL else \
            self.proc.returncode
        return Finished(self.args, rc, out, err, wall, leftovers, used, timed_out)

    def _leftovers(self) -> dict[int, str]:
        """Its processes still alive 3 s after it ended (a clean exit may take its helpers a
        moment): those of its session, and any whose command line names its RAY_TMPDIR."""
        found: dict[int, str] = {}
        for _ in range(30):
            found = session_processes(self.proc.pid, str(self.ray_tmp))
            if not found:
                break
            time.sleep(0.1)
        return found

    @staticmethod
    def _end(pids: dict[int, str]) -> None:
        """SIGKILL processes this harness started (they are in its runs' sessions or name their
        RAY_TMPDIR), so that the next run starts on a quiet machine."""
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_squall(args: list[str], timeout: float = 600, cwd: Path | None = None) -> Finished:
    return Squall(args, cwd).finish(timeout)


def summary_of(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def last_logged_step(run_dir: Path) -> int:
    """The step of the last complete line of metrics.jsonl (0 when there is none)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def shown_args(args: list[str], tmp: Path | str | None = None) -> str:
    """The command line for the markdown, the temporary directory shown as $TMP."""
    text = shlex.join(["python", "-m", "orchestrator", "train", *args])
    return text.replace(str(tmp), "$TMP") if tmp else text


def last_error_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(md_cell(str(c)) for c in r) + " |" for r in rows)]


def yes(ok: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "not run"}[ok]


@dataclass
class SectionResult:
    key: str
    verdict: bool
    summary: str  # one line for the verdict table
    lines: list[str] = field(default_factory=list)  # the section's markdown body


# =========================================================================== 1. storm
def storm_verdict(preemptions: int, acc: float, clean_acc: float, target: int,
                  finished: bool = True, tolerance: float = ACC_TOLERANCE) -> bool:
    """Met: both runs finished, at least `target` preemptions survived, and the final test
    accuracy within `tolerance` of the clean run's."""
    return finished and preemptions >= target and abs(acc - clean_acc) <= tolerance + 1e-12


def storm_args(s: Settings, tmp: Path, name: str, prob: float) -> list[str]:
    return [f"workers={s.storm_workers}", f"steps={s.storm_steps}", "model=mlp", "seed=0",
            "cloud=simulated", f"cloud.preempt_prob={prob:g}", "cloud.replace_delay_s=0",
            "log.progress=false", "eval.every=0", f"run.dir={tmp}", f"run.name={name}"]


def section_storm(s: Settings, tmp: Path) -> SectionResult:
    runs = {}
    for name, prob in (("clean", 0.0), ("storm", s.storm_prob)):
        args = storm_args(s, tmp, name, prob)
        log(f"[storm] {shown_args(args, tmp)}")
        done = run_squall(args, timeout=3600)
        summary = summary_of(tmp / name) or {}
        runs[name] = (args, done, summary)
        log(f"[storm] {name}: exit {done.rc}, {done.wall_s:.0f} s, acc "
            f"{summary.get('test_acc', float('nan')):.4f}, preemptions "
            f"{summary.get('preemptions')}, joins {summary.get('joins')}, skipped "
            f"{summary.get('skipped_steps')}")
    return storm_report(s, tmp, runs)


def storm_report(s: Settings, tmp: Path, runs: dict) -> SectionResult:
    nan = float("nan")
    rows, finished = [], True
    for name, (_, done, summary) in runs.items():
        ok = done.rc == 0 and summary.get("steps_done") == s.storm_steps
        finished &= ok
        rows.append([name, f"`cloud.preempt_prob={s.storm_prob if name == 'storm' else 0:g}`",
                     str(done.rc), str(summary.get("steps_done", "-")),
                     str(summary.get("preemptions", "-")), str(summary.get("joins", "-")),
                     f"{summary.get('live_workers_mean', nan):.2f}",
                     str(summary.get("skipped_steps", "-")), str(summary.get("lost_steps", "-")),
                     f"{summary.get('test_acc', nan):.4f}", f"{done.wall_s:.0f}",
                     str(len(done.leftovers))])
    storm, clean = runs["storm"][2], runs["clean"][2]
    pre = int(storm.get("preemptions", 0))
    acc, clean_acc = storm.get("test_acc", nan), clean.get("test_acc", nan)
    met = storm_verdict(pre, acc, clean_acc, s.storm_target, finished)
    diff = abs(acc - clean_acc)
    lines = [
        f"Both runs: `{shown_args(runs['storm'][0], tmp)}`; the clean run has "
        "`cloud.preempt_prob=0` (same seed, same simulated pool, nothing reclaimed).", "",
        *table(["run", "preemption", "exit", "steps done", "preemptions", "joins",
                "live workers (mean)", "skipped steps", "steps redone", "test acc", "wall s",
                "processes left"], rows), "",
        f"- preemptions: {pre} (target >= {s.storm_target}): "
        f"{'yes' if pre >= s.storm_target else 'no'}",
        f"- |acc - clean| = |{acc:.4f} - {clean_acc:.4f}| = {diff:.4f} "
        f"(target <= {ACC_TOLERANCE}): {'yes' if diff <= ACC_TOLERANCE + 1e-12 else 'no'}",
        f"- both runs exited 0 after {s.storm_steps} steps: {'yes' if finished else 'no'}",
        f"- **verdict: {yes(met)}**",
    ]
    summary = (f"{pre} preemptions (>= {s.storm_target}), acc {acc:.4f} vs clean "
               f"{clean_acc:.4f} (diff {diff:.4f} <= {ACC_TOLERANCE})")
    return SectionResult("storm", met, summary, lines)


# =========================================================================== 2. sigkill
def kill_points(count: int, steps: int, seed: int) -> list[int]:
    """`count` distinct seeded random steps in [2, steps - 2], increasing."""
    return sorted(random.Random(seed).sample(range(2, steps - 1), count))


def sigkill_verdict(equal: list[bool], completed: bool) -> bool:
    return completed and bool(equal) and all(equal)


@dataclass
class Kill:
    point: int
    logged_at_kill: int = 0  # last step in metrics.jsonl when the group was killed
    resumed_from: int = 0  # the checkpoint step this attempt started from
    exited_early: str = ""  # the attempt ended by itself before the point (rc, last line)
    leftovers: int = 0


RESUMING = re.compile(r"squall: resuming run .* from step (\d+)")


def kill_at(args: list[str], run_dir: Path, kill: Kill, timeout: float = 300) -> None:
    """Start the run; SIGKILL its process group once it has logged `kill.point`. Lines the
    previous attempt left in metrics.jsonl do not count: only once this attempt has written
    the file (a resumed run first cuts it back to its checkpoint)."""
    metrics = run_dir / "metrics.jsonl"

    def mtime() -> int | None:
        return metrics.stat().st_mtime_ns if metrics.exists() else None

    stale = mtime()
    squall = Squall(args)
    deadline = time.time() + timeout
    while (time.time() < deadline and squall.proc.poll() is None
           and (mtime() == stale or last_logged_step(run_dir) < kill.point)):
        time.sleep(0.02)
    alive = squall.proc.poll() is None
    squall.kill_group()
    kill.logged_at_kill = last_logged_step(run_dir)
    done = squall.finish(timeout=60)
    if not alive:
        kill.exited_early = f"exit {squall.proc.returncode}: {last_error_line(done.stderr)}"
    match = RESUMING.search(done.stderr)
    kill.resumed_from = int(match.group(1)) if match else 0
    kill.leftovers = len(done.leftovers)


def sigkill_args(s: Settings, tmp: Path, name: str) -> list[str]:
    return [f"steps={s.kill_steps}", "workers=2", "model=mlp", "seed=0", "log.progress=false",
            "eval.every=0", "checkpoint.every_steps=5", f"run.dir={tmp}", f"run.name={name}"]


def section_sigkill(s: Settings, tmp: Path) -> SectionResult:
    import torch

    ref_args, args = sigkill_args(s, tmp, "reference"), sigkill_args(s, tmp, "killed")
    log(f"[sigkill] reference: {shown_args(ref_args, tmp)}")
    ref = run_squall(ref_args)
    kills = [Kill(p) for p in kill_points(s.kill_count, s.kill_steps, s.kill_seed)]
    for i, kill in enumerate(kills, 1):
        kill_at(args, tmp / "killed", kill)
        log(f"[sigkill] kill {i}/{len(kills)} at step >= {kill.point}: logged "
            f"{kill.logged_at_kill}, had resumed from {kill.resumed_from}"
            + (f", ENDED EARLY {kill.exited_early}" if kill.exited_early else ""))
    final = run_squall(args)
    resumed = RESUMING.search(final.stderr)
    summary = summary_of(tmp / "killed") or {}
    log(f"[sigkill] final run: exit {final.rc}, lost_steps {summary.get('lost_steps')}")
    equal, differing = [], []
    if ref.rc == 0 and final.rc == 0:
        a = torch.load(tmp / "reference" / "model.pt", weights_only=True)
        b = torch.load(tmp / "killed" / "model.pt", weights_only=True)
        for key in sorted(set(a) | set(b)):
            same = key in a and key in b and torch.equal(a[key], b[key])
            equal.append(same)
            if not same:
                differing.append(key)
    return sigkill_report(s, tmp, args, ref, final, kills, summary, equal, differing,
                          int(resumed.group(1)) if resumed else 0)


def attempts_table(kills: list[Kill], final_from: int, final_steps: int | None
                   ) -> tuple[list[list[str]], int]:
    """One row per attempt (each killed one, then the final run): the step it started from,
    the last step it logged, the steps it computed a second time (the previous attempt had
    logged them), whether it wrote a checkpoint; and the sum of the steps redone."""
    starts = [k.resumed_from for k in kills] + [final_from]
    reached = [k.logged_at_kill for k in kills] + [final_steps or 0]
    rows, total = [], 0
    for i, (start, last) in enumerate(zip(starts, reached)):
        redone = max(0, reached[i - 1] - start) if i else 0
        total += redone
        wrote = "yes" if i + 1 < len(starts) and starts[i + 1] > start else (
            "-" if i + 1 == len(starts) else "no")
        if i < len(kills):
            k = kills[i]
            rows.append([str(i + 1), str(k.point), str(start), str(last), str(redone), wrote,
                         str(k.leftovers), k.exited_early or "-"])
        else:
            rows.append(["final", "-", str(start), str(last), str(redone), wrote, "-", "-"])
    return rows, total


def sigkill_report(s: Settings, tmp: Path, args: list[str], ref: Finished, final: Finished,
                   kills: list[Kill], summary: dict, equal: list[bool], differing: list[str],
                   final_from: int) -> SectionResult:
    rows, redone = attempts_table(kills, final_from, summary.get("steps_done"))
    completed = (final.rc == 0 and summary.get("steps_done") == s.kill_steps
                 and ref.rc == 0)
    met = sigkill_verdict(equal, completed)
    lost = summary.get("lost_steps")
    agree = "equal" if lost == redone else (
        f"**they differ by {redone - lost}**" if isinstance(lost, int) else "no summary")
    lines = [
        f"`{shown_args(args, tmp)}` killed with SIGKILL (`os.killpg`: the driver and its "
        f"local Ray) once this attempt's metrics.jsonl showed the kill step ({s.kill_count} "
        f"steps drawn with `random.Random({s.kill_seed})`), each time started again with the "
        "same command, then run to the end; compared with `run.name=reference`, never "
        "interrupted. An attempt starts from the newest checkpoint (`squall: resuming run ... "
        "from step N`); the steps it redoes are those the attempt before it had logged past "
        "that step; `checkpoint written`: the next attempt started later than this one.", "",
        *table(["attempt", "kill step", "started from", "last step logged", "steps redone",
                "checkpoint written", "processes left", "ended by itself"], rows), "",
        f"- kill points: {', '.join(str(k.point) for k in kills)}",
        f"- the final run: exit {final.rc}, steps_done {summary.get('steps_done')}; reference: "
        f"exit {ref.rc}",
        f"- steps redone, summed over the attempts: {redone}; the summary's `lost_steps`: "
        f"{lost} ({agree})",
        f"- processes left after the kills: {sum(k.leftovers for k in kills)}",
        f"- model.pt tensors equal (torch.equal) to the reference: {sum(equal)} of "
        f"{len(equal)}" + (f"; differing: {', '.join(differing)}" if differing else ""),
        f"- **verdict: {yes(met)}**",
    ]
    if final.rc != 0:
        lines.append(f"- final run's last stderr line: `{last_error_line(final.stderr)}`")
    text = (f"{len(kills)} kills, {sum(equal)}/{len(equal)} tensors equal; lost_steps {lost} "
            f"vs {redone} steps redone")
    return SectionResult("sigkill", met, text, lines)


# =========================================================================== 3. malformed
@dataclass(frozen=True)
class Case:
    kind: str
    args: tuple[str, ...]  # {a_file} and {work} are filled in
    mentions: str  # the message must contain this (it names the input)
    quick: bool = False
    shown: str = ""  # how the markdown shows the arguments (long ones)


LONG_NAME = "a" * 5000


def case(kind: str, *args: str, mentions: str = "", quick: bool = False, shown: str = "") -> Case:
    return Case(kind, args, mentions or args[-1].split("=")[0], quick, shown)


CASES = [
    # unknown keys
    case("unknown key", "stratgy=mean", quick=True),
    case("unknown key", "wrkers=3"),
    case("unknown key", "optim.lrr=0.1"),
    case("unknown key", "workers.num_cpus=2"),
    case("unknown key", "foo.bar.baz=1"),
    case("unknown key", "data.bogus=1"),
    # values of the wrong type
    case("bad value", "workers=abc", quick=True),
    case("bad value", "workers=1.5"),
    case("bad value", "steps=ten"),
    case("bad value", "data.args.download=maybe", mentions="data.target"),
    case("bad value", "optim.lr=fast"),
    case("bad value", "data.args.shape=abc", mentions="data.target"),
    # out of range
    case("out of range", "workers=0"),
    case("out of range", "workers=-1"),
    case("out of range", "steps=0"),
    case("out of range", "seed=-1"),
    case("out of range", "optim.lr=-1", quick=True),
    case("out of range", "optim.lr=0"),
    case("out of range", "optim.momentum=1"),
    case("out of range", "data.batch_size=0"),
    case("out of range", "data.args.test_fraction=1.5", mentions="data.target"),
    case("out of range", "data.alpha=0"),
    case("out of range", "data.classes_per_worker=0"),
    case("out of range", "eval.every=-5"),
    case("out of range", "eval.batch_size=0"),
    case("out of range", "checkpoint.keep=0"),
    case("out of range", "checkpoint.every_steps=-1"),
    case("out of range", "worker.num_cpus=0"),
    case("out of range", "worker.step_timeout_s=-1"),
    case("bad value", "model.args.nosuch=1", mentions="model.target"),
    case("out of range", "optim.warmup_steps=-1"),
    case("out of range", "optim.step_gamma=2"),
    case("bad value", "optim.args.nosuch=1", mentions="optim.args"),
    case("bad value", "optim.name=adam", "optim.args.betas=oops", mentions="optim.args"),
    case("out of range", "byzantine.f=-1"),
    case("out of range", "byzantine.eps=0"),
    case("out of range", "ray.num_cpus=0"),
    case("out of range", "cloud.spot_price=-1"),
    case("out of range", "cloud=simulated", "cloud.preempt_prob=1.5", quick=True),
    case("out of range", "cloud=simulated", "cloud.preempt_prob=1"),
    case("out of range", "cloud=simulated", "cloud.replace_delay_s=-1"),
    case("out of range", "cloud=simulated", "cloud.time_scale=0"),
    case("out of range", "strategy=gossip", "strategy.gamma=2"),
    case("out of range", "strategy=gossip", "strategy.theta_margin=0.5"),
    case("out of range", "strategy=multi_krum", "strategy.m=-1"),
    case("out of range", "strategy=centered_clip", "strategy.tau=0"),
    case("out of range", "cloud=aws", "cloud.instance_types=[g5.xlarge]",
         "cloud.imds_poll_s=100"),
    # values outside a field's choices
    case("bad choice", "data.partition=random"),
    case("bad choice", "optim.name=nosuchopt"),
    case("bad choice", "optim.name=lbfgs"),
    case("bad choice", "optim.schedule=cyclic"),
    case("bad choice", "worker.device=tpu"),
    case("bad choice", "byzantine.attack=nope", quick=True),
    case("bad choice", "strategy.pre=[foo]"),
    case("bad choice", "strategy.on_too_few=wait"),
    case("bad choice", "checkpoint.replicas=some"),
    case("bad choice", "strategy=gossip", "strategy.topology=star"),
    case("bad choice", "strategy=gossip", "strategy.compress=zip"),
    case("bad choice", "strategy=gossip", "strategy.bits=3"),
    case("bad choice", "strategy=gossip", "strategy.rounding=up"),
    # group options
    case("bad group option", "strategy=nope", quick=True),
    case("bad group option", "model=vgg"),
    case("bad group option", "data=imagenet"),
    case("bad group option", "cloud=gcp"),
    case("bad group option", "strategy.name=mean"),
    case("bad group option", "model.name=mlp"),
    # a key of another family or pool
    case("cross-family key", "strategy=mean", "strategy.topology=ring", quick=True),
    case("cross-family key", "strategy=krum", "strategy.compress=moniqua"),
    case("cross-family key", "strategy=gossip", "strategy.pre=[nnm]"),
    case("cross-family key", "strategy=gossip", "strategy.m=2"),
    case("cross-family key", "cloud.preempt_prob=0.1"),
    case("cross-family key", "cloud=static", "cloud.ami=ami-1"),
    case("cross-family key", "cloud.bid=0.2"),
    case("cross-family key", "strategy=gossip", "byzantine.f=1", mentions="byzantine.f"),
    # requirements across fields
    case("rule requirement", "strategy=gossip", "workers=1", mentions="workers=1", quick=True),
    case("rule requirement", "strategy=bulyan", "workers=6", "byzantine.f=1", mentions="bulyan",
         quick=True),
    case("rule requirement", "strategy=krum", "workers=4", "byzantine.f=1", mentions="krum"),
    case("rule requirement", "strategy=median", "workers=2", "byzantine.f=1", mentions="median"),
    case("rule requirement", "workers=4", "byzantine.f=4"),
    case("rule requirement", "strategy=mean", "strategy.noise=0.1"),
    case("rule requirement", "strategy=multi_krum", "workers=5", "byzantine.f=1",
         "strategy.m=5"),
    case("rule requirement", "strategy=bulyan", "workers=7", "byzantine.f=1",
         "strategy.pre=[bucketing]", mentions="bulyan"),
    case("rule requirement", "strategy=gossip", "strategy.compress=moniqua", "strategy.bits=1",
         "strategy.rounding=stochastic", mentions="stochastic"),
    case("rule requirement", "strategy=gossip", "strategy.compress=choco",
         "strategy.topology=one_peer_exp", mentions="choco"),
    case("rule requirement", "cloud=simulated", "cloud.trace=x.csv", "cloud.preempt_prob=0.1",
         mentions="cloud.trace"),
    case("rule requirement", "cloud=simulated", "workers=4", "cloud.on_demand_workers=5"),
    case("rule requirement", "cloud=simulated", "workers=4", "cloud.max_nodes=2"),
    case("rule requirement", "cloud=aws", mentions="cloud=aws"),
    # malformed overrides
    case("malformed override", "workers", quick=True),
    case("malformed override", "=3", mentions="=3"),
    case("malformed override", "workers=[", mentions="workers=["),
    case("malformed override", "data.args.shape=[1,2", mentions="data.args.shape=[1,2"),
    case("malformed override", "data.args.shape={a: 1", mentions="data.args.shape"),
    case("malformed override", "workers=2,4,8", mentions="workers=2,4,8"),
    case("malformed override", "9lives=1"),
    case("malformed override", "workers:3"),
    case("malformed override", "--workers=3"),
    case("malformed override", "foo"),
    # paths the run cannot write or read
    case("bad path", "run.dir=/proc/runs", quick=True),
    case("bad path", "run.dir=/sys/kernel"),
    case("bad path", "run.dir={a_file}"),
    case("bad path", "run.dir={a_file}/runs"),
    case("bad path", "checkpoint.dir=/proc/nonexistent/x"),
    case("bad path", "checkpoint.dir={a_file}"),
    case("bad path", "checkpoint.dir=gs://bucket/x"),
    case("bad path", "checkpoint.dir=s3://nobucket"),
    case("bad path", f"run.name={LONG_NAME}", shown="run.name=aaa...a (5000 characters)"),
    case("bad path", "run.dir={work}", "run.name=a_file/y", mentions="run.name"),
    case("bad path", "cloud=simulated", "cloud.trace=/nonexistent.csv"),
    case("bad path", "data=mnist", "data.root=/nonexistent/data", mentions="mnist"),
    # run.name escaping run.dir
    case("run.name escape", "run.name=../../escape", quick=True),
    case("run.name escape", "run.name=/abs/x"),
    case("run.name escape", "run.name=a/../../b"),
    case("run.name escape", "run.name=.."),
    case("run.name escape", "run.name=."),
    case("run.name escape", 'run.name="a\\nb"'),
]


def invocation_problems(rc: int | None, stdout: str, stderr: str, mentions: str,
                        created: list[str], leftovers: int, ray_used: bool) -> list[str]:
    """Why a bad invocation's handling falls short (empty: it passes)."""
    problems = []
    if rc != 2:
        problems.append(f"exit {rc}" if rc is not None else "killed after the timeout")
    lines = stderr.splitlines()
    if "Traceback" in stderr:
        problems.append("traceback")
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines")
    if not lines or not lines[0].startswith("squall: error: "):
        problems.append("no `squall: error:` line first")
    elif mentions not in lines[0]:
        problems.append(f"message does not name `{mentions}`")
    if stdout.strip():
        problems.append("printed on stdout")
    if created:
        problems.append(f"created {', '.join(created[:3])}")
    if leftovers:
        problems.append(f"{leftovers} processes left running")
    if ray_used:
        problems.append("Ray started (RAY_TMPDIR not empty)")
    return problems


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@dataclass
class Outcome:
    case: Case
    shown: str
    message: str
    problems: list[str]


def run_case(c: Case) -> Outcome:
    """The invocation in a fresh working directory holding `a_file`; run.dir points into it
    unless the case sets run.dir."""
    work = Path(tempfile.mkdtemp(prefix="cw", dir="/tmp"))
    try:
        (work / "a_file").write_text("not a directory\n")
        args = [a.replace("{a_file}", str(work / "a_file")).replace("{work}", str(work))
                for a in c.args]
        extra = [] if any(a.startswith("run.dir=") for a in args) else [f"run.dir={work}/runs"]
        before = snapshot(work)
        outside = [Path(a.split("=", 1)[1]) for a in args
                   if a.startswith(("run.dir=", "checkpoint.dir=")) and "=/" in a]
        existed = {p: p.exists() for p in outside}
        done = run_squall([*args, *extra], timeout=120, cwd=work)
        created = sorted(snapshot(work) - before)
        created += [str(p) for p, was in existed.items() if not was and p.exists()]
        lines = done.stderr.splitlines()
        message = lines[0] if len(lines) == 1 else last_error_line(done.stderr)
        problems = invocation_problems(done.rc, done.stdout, done.stderr, c.mentions, created,
                                       len(done.leftovers), done.ray_tmp_used)
        shown = c.shown or shlex.join(c.args).replace("{a_file}", "$WORK/a_file").replace(
            "{work}", "$WORK")
        return Outcome(c, shown, message, problems)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def section_malformed(s: Settings, tmp: Path) -> SectionResult:
    cases = [c for c in CASES if c.quick or not s.quick_cases_only]
    outcomes = []
    for i, c in enumerate(cases, 1):
        outcome = run_case(c)
        outcomes.append(outcome)
        status = "ok" if not outcome.problems else "FAIL: " + "; ".join(outcome.problems)
        log(f"[malformed {i:3d}/{len(cases)}] {status} | {outcome.shown[:80]} -> "
            f"{outcome.message[:120]}")
    return malformed_report(outcomes)


def malformed_report(outcomes: list[Outcome]) -> SectionResult:
    passed = sum(not o.problems for o in outcomes)
    distinct = len({o.shown for o in outcomes})
    met = passed == len(outcomes) and distinct == len(outcomes)
    rows = [[str(i), o.case.kind, f"`{o.shown}`", o.message,
             "pass" if not o.problems else "**fail**: " + "; ".join(o.problems)]
            for i, o in enumerate(outcomes, 1)]
    failed = [o for o in outcomes if o.problems]
    lines = [
        "Each: `python -m orchestrator train ARGS run.dir=$WORK/runs` (run.dir only when ARGS "
        "do not set it) in a fresh working directory $WORK holding a file `a_file`, with a "
        "fresh empty RAY_TMPDIR, no AWS credentials (empty config files, no instance "
        "metadata) and its own session. Pass: exit 2; stderr exactly one line starting "
        "`squall: error: ` that contains the input named in the case; no traceback; empty "
        "stdout; nothing created in $WORK (or at an absolute run.dir/checkpoint.dir it named); "
        "RAY_TMPDIR still empty; no process left in its session.", "",
        *table(["#", "kind", "arguments", "stderr", "result"], rows), "",
        f"- {passed} of {len(outcomes)} invocations pass ({distinct} distinct)",
    ]
    if failed:
        lines.append("- failing: " + "; ".join(f"`{o.shown}` ({', '.join(o.problems)})"
                                               for o in failed))
    lines.append(f"- **verdict: {yes(met)}**")
    return SectionResult("malformed", met, f"{passed}/{len(outcomes)} invocations pass", lines)


# =========================================================================== 4. grid
GRID_MARGIN = 1  # workers beyond the rule's requirement


def grid_workers(rule: str, f: int = 1) -> int:
    """The workers the rule needs for f, plus GRID_MARGIN (at least 3): at the bare minimum
    the first reclaim would leave too few for every later step (skipped), so the rules would
    barely aggregate under changing membership."""
    from strategies.registry import RULES

    return max(3, RULES.get(rule).min_workers(f) + GRID_MARGIN)


def grid_args(s: Settings, tmp: Path, rule: str, attack: str) -> list[str]:
    return [f"strategy={rule}", f"workers={grid_workers(rule)}", "byzantine.f=1",
            f"byzantine.attack={attack}", "cloud=simulated", f"cloud.preempt_prob={s.grid_prob:g}",
            "cloud.replace_delay_s=0", f"steps={s.grid_steps}", "model=mlp", "seed=0",
            "log.progress=false", "eval.every=0", "checkpoint.every_steps=0", f"run.dir={tmp}",
            f"run.name={rule}-{attack}"]


@dataclass
class GridCell:
    rule: str
    attack: str
    args: list[str]
    rc: int | None
    wall_s: float
    summary: dict | None
    error: str
    leftovers: int

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.summary is not None


def grid_names(s: Settings) -> tuple[list[str], list[str]]:
    from strategies.registry import ATTACKS, RULES

    return list(s.grid_rules or RULES.names()), list(s.grid_attacks or ATTACKS.names())


def section_grid(s: Settings, tmp: Path) -> SectionResult:
    rules, attacks = grid_names(s)
    cells = []
    for i, (rule, attack) in enumerate([(r, a) for r in rules for a in attacks], 1):
        args = grid_args(s, tmp, rule, attack)
        done = run_squall(args, timeout=600)
        summary = summary_of(tmp / f"{rule}-{attack}")
        cell = GridCell(rule, attack, args, done.rc, done.wall_s, summary,
                        "" if done.rc == 0 else last_error_line(done.stderr), len(done.leftovers))
        cells.append(cell)
        log(f"[grid {i:3d}/{len(rules) * len(attacks)}] {rule:>13} x {attack:<12} exit "
            f"{done.rc} {done.wall_s:5.1f} s  " + (grid_cell_text(cell) if cell.ok else
                                                   cell.error))
    return grid_report(s, tmp, rules, attacks, cells)


def grid_cell_text(cell: GridCell) -> str:
    if not cell.ok:
        return f"**exit {cell.rc}**"
    s = cell.summary
    return (f"ok: skipped {s['skipped_steps']}, preempted {s['preemptions']}, joins "
            f"{s['joins']}" + (f", rejected {s['rejected_updates']}"
                               if s.get("rejected_updates") else ""))


def grid_report(s: Settings, tmp: Path, rules: list[str], attacks: list[str],
                cells: list[GridCell]) -> SectionResult:
    by = {(c.rule, c.attack): c for c in cells}
    rows = [[f"`{rule}` (n={grid_workers(rule)})",
             *(grid_cell_text(by[rule, a]) if (rule, a) in by else "not run" for a in attacks)]
            for rule in rules]
    ok = sum(c.ok for c in cells)
    met = bool(cells) and ok == len(cells)
    example = grid_args(s, tmp, rules[0], attacks[0])
    lines = [
        f"Each cell: `{shown_args(example, tmp)}` with the cell's rule and attack; workers = "
        f"the rule's requirement for f=1 plus {GRID_MARGIN} (at least 3; at the bare minimum "
        "the first reclaim would skip every later step), Byzantine rank fixed by the seed. A "
        f"cell reads `exit status: skipped steps (of {s.grid_steps}), workers preempted, "
        "replacements joined`; a skipped step had too few gradients for the rule (or none).",
        "",
        *table(["rule \\ attack", *attacks], rows), "",
        f"- {ok} of {len(cells)} runs exit 0; processes left after them: "
        f"{sum(c.leftovers for c in cells)}",
    ]
    for c in cells:
        if not c.ok:
            lines.append(f"- **failed**: `{shown_args(c.args, tmp)}`: exit {c.rc}: "
                         f"`{c.error}`")
    lines.append(f"- **verdict: {yes(met)}**")
    return SectionResult("grid", met, f"{ok}/{len(cells)} runs exit 0", lines)


# =========================================================================== markdown
def machine_line() -> str:
    import ray
    import torch

    return (f"{os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()}), "
            f"Python {platform.python_version()}, torch {torch.__version__}, ray "
            f"{ray.__version__}; SQUALL_COMPILE={os.environ.get('SQUALL_COMPILE', 'unset')}")


def code_version() -> str:
    """The commit of the tree measured, `+changes` when tracked files differ from it."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    return commit + (" +changes" if git("status", "--porcelain", "--untracked-files=no")
                     else "")


def section_block(result: SectionResult, cmd: str, date: str, elapsed_s: float,
                  code: str = "") -> str:
    """A section's block: a machine-readable result line, its title, when, on which code and
    how it was measured, and its body."""
    meta = json.dumps({"verdict": result.verdict, "summary": result.summary})
    at = f" at commit {code}" if code else ""
    return "\n".join([
        f"<!-- result {meta} -->", f"## {SECTIONS[result.key]}", "",
        f"Measured {date}{at} by `{cmd}` in {elapsed_s / 60:.1f} min.", "", *result.lines])


BLOCK = re.compile(r"<!-- section:(\w+) -->\n(.*?)\n<!-- /section:\1 -->", re.S)
RESULT = re.compile(r"<!-- result (\{.*?\}) -->")


def split_markdown(old: str) -> tuple[dict[str, str], str]:
    """The section blocks of an earlier file and everything after its generated part (the
    reading notes). A file without markers is kept whole as notes."""
    if GEN_START not in old or GEN_END not in old:
        return {}, (NOTES_STUB if not old.strip() else f"{NOTES_HEADING}\n\n{old.strip()}\n")
    start, end = old.index(GEN_START), old.index(GEN_END)
    blocks = {m.group(1): m.group(2) for m in BLOCK.finditer(old[start:end])}
    return blocks, old[end + len(GEN_END):].lstrip("\n")


def verdict_rows(blocks: dict[str, str]) -> list[list[str]]:
    rows = []
    for key, title in SECTIONS.items():
        found = RESULT.search(blocks.get(key, ""))
        meta = json.loads(found.group(1)) if found else {"verdict": None, "summary": ""}
        rows.append([title, yes(meta["verdict"]), meta["summary"]])
    return rows


def render(header: list[str], blocks: dict[str, str], notes: str) -> str:
    body = [TITLE, "", GEN_START, *header, "", "## Verdicts", "",
            *table(["section", "verdict", "numbers"], verdict_rows(blocks)), ""]
    for key, title in SECTIONS.items():
        text = blocks.get(key) or f"## {title}\n\nNot run yet."
        body += [f"<!-- section:{key} -->", text, f"<!-- /section:{key} -->", ""]
    return "\n".join([*body, GEN_END, "", notes.rstrip("\n"), ""])


def write_markdown(out: Path, header: list[str], new_blocks: dict[str, str]) -> None:
    """Rewrite the generated part of `out`: the header, the verdict table, the blocks of
    `new_blocks` (the others as they were); the reading notes stay as they are."""
    old = out.read_text() if out.exists() else ""
    blocks, notes = split_markdown(old)
    blocks.update(new_blocks)
    out.write_text(render(header, blocks, notes))


def header_lines(cmd: str, date: str, s: Settings, ran: list[str]) -> list[str]:
    mode = ("**--quick smoke run**: smaller targets and a subset of cases and cells (the full "
            "run is `python -m benchmarks.chaos`)" if s.mode == "quick" else "full run")
    return [
        f"Last written {date} by `{cmd}` (from the repository root; {mode}); sections "
        f"measured by that command: {', '.join(ran) or 'none'}. Each section says when and by "
        "which command it was measured.", "",
        f"- machine: {machine_line()}; load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} when written",
        "- every run is a separate `python -m orchestrator train ...` process (its own session, "
        "a fresh RAY_TMPDIR under /tmp, no AWS credentials, Ray on loopback); every number "
        "and verdict below is computed from what those processes did and wrote",
    ]


# =========================================================================== main
RUNNERS: dict[str, Callable[[Settings, Path], SectionResult]] = {
    "storm": section_storm, "sigkill": section_sigkill, "malformed": section_malformed,
    "grid": section_grid}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: fewer kills, fewer invocations, a subset of the grid")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, from {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--storm-steps", type=int, default=0,
                        help="steps of the storm's two runs (default: 6000, --quick 600)")
    args = parser.parse_args()
    chosen = [k.strip() for k in args.sections.split(",") if k.strip()]
    if unknown := [k for k in chosen if k not in SECTIONS]:
        parser.error(f"unknown section(s) {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    settings = QUICK if args.quick else FULL
    if args.storm_steps:
        settings = dataclasses.replace(settings, storm_steps=args.storm_steps)
    cmd = invocation("benchmarks.chaos")
    t_start = time.perf_counter()
    verdicts = {}
    for key in [k for k in SECTIONS if k in chosen]:
        log(f"== {SECTIONS[key]}")
        t0 = time.perf_counter()
        code = code_version()  # at the start: other work may land while it runs
        with tempfile.TemporaryDirectory(prefix="chaos-", dir="/tmp") as tmp:
            result = RUNNERS[key](settings, Path(tmp))
        date = time.strftime("%Y-%m-%d %H:%M %Z")
        block = section_block(result, cmd, date, time.perf_counter() - t0, code)
        write_markdown(args.out, header_lines(cmd, date, settings, chosen), {key: block})
        verdicts[key] = result.verdict
        log(f"== {SECTIONS[key]}: {yes(result.verdict)} ({result.summary}); "
            f"{(time.perf_counter() - t0) / 60:.1f} min")
    log(f"done in {(time.perf_counter() - t_start) / 60:.1f} min; wrote {args.out}: "
        + ", ".join(f"{k} {yes(v)}" for k, v in verdicts.items()))


if __name__ == "__main__":
    main()
