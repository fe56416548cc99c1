"""Decentralized training: every worker owns a model replica and talks only to its neighbours.

One round, top to bottom:
  1. every live worker computes its gradient at its own model and encodes its message
     (fp32, Moniqua 1-8 bits, or CHOCO); the message stays in Ray's object store;
  2. the driver gives each worker the object refs of its neighbours' messages and its row of
     the Metropolis-Hastings mixing matrix W over the live workers; each worker fetches the
     messages itself (worker to worker, never through the driver), decodes them and updates:
       none (D-PSGD): x_i <- sum_j W_ij x_j - lr g_i
       moniqua:       x_i <- x_i + gamma sum_j W_ij (x^_j - x^_i) - lr g_i
       choco:         x^_j += Q_j;  x_i <- x_i - lr g_i + gamma sum_j W_ij (x^_j - x^_i)
  3. the driver sets Moniqua's bound theta >= max |x_i - x_j| for the next round, one per block
     of strategy.block_size values: margin x the smaller of two upper bounds on the spread,
     (a) D-PSGD's 2 lr max|g| / (spectral gap of W) and (b) the largest distance to a decoded
     neighbour plus two local steps. (b) alone can run away (its decoding error grows with
     theta); (a) caps it but holds in steady state only, and quantization noise widens the
     spread beyond D-PSGD's. So after a membership change or a detected wrap-around the driver
     measures the spread on the replicas themselves (all pairs, per block) and lets theta stay
     up to that spread while they settle; a wrap also doubles (a)'s factor for good.
     With rounding=dither all workers share the round's dither, drawn from (seed, step).
Membership changes (preemption, join) rebuild W over the live workers; a joining worker
starts from a live neighbour's model.
"""

from __future__ import annotations

import math
import time
from collections import deque
from functools import lru_cache

import numpy as np
import ray
import torch

from cloud import make_pool
from orchestrator.checkpoint import CheckpointStore
from orchestrator.config import Config, to_dict
from orchestrator.data import Dataset, batch_indices, load_dataset, partition
from orchestrator.job import Progress, check_resumable, evaluate
from orchestrator.metrics import RunLog
from orchestrator.models import build_model, flatten, unflatten_into
from orchestrator.workers import WorkerPool, worker_device
from strategies.compression import (
    block_max,
    choco_compress,
    dense_encode,
    moniqua_decode,
    moniqua_delta,
    moniqua_encode,
    moniqua_theta,
    shared_dither,
    wrapped,
)
from strategies.topology import gossip_weights, mixing_matrix, spectral_gap

SETTLE_ROUNDS = 20  # rounds after a resync in which theta may stay up to the measured spread


class GossipWorker:
    """One replica: its shard, its model as a flat vector, and what it knows of neighbours."""

    def __init__(self, rank: int, x: np.ndarray, y: np.ndarray, shard: np.ndarray, cfg: Config,
                 input_shape: tuple[int, ...], num_classes: int, device: str,
                 byzantine: bool = False, start_state: np.ndarray | None = None) -> None:
        torch.set_num_threads(max(1, int(cfg.worker.num_cpus)))
        self.rank, self.cfg, self.device = rank, cfg, torch.device(device)
        self.x_data = torch.from_numpy(x[shard]).to(self.device)
        self.y_data = torch.from_numpy(y[shard]).to(self.device)
        torch.manual_seed(cfg.seed)  # the same initial model on every worker
        self.model = build_model(cfg.model, input_shape, num_classes).to(self.device)
        self.params = list(self.model.parameters())
        self.x = torch.from_numpy(flatten(self.params)).to(self.device)
        if start_state is not None:  # a joiner starts from a live neighbour's model
            self.x = torch.as_tensor(np.array(start_state)).to(self.device)
        self.momentum = torch.zeros_like(self.x)
        self.reset_neighbours()

    def ready(self) -> int:
        import os

        return os.getpid()

    def state(self) -> np.ndarray:
        return self.x.cpu().numpy()

    def reset_neighbours(self) -> None:
        """Forget per-neighbour state (CHOCO's public copies, last decodes): membership changed."""
        self.public: dict[int, torch.Tensor] = {}
        self.last_decoded: dict[int, torch.Tensor] = {}

    def message(self, step: int, theta: float | np.ndarray) -> tuple[object, int]:
        """Gradient at the own model, then the message the neighbours will read (and its
        size in bytes, for the driver)."""
        unflatten_into(self.x, self.params)
        idx = torch.from_numpy(batch_indices(len(self.y_data), self.cfg.data.batch_size, step,
                                             self.cfg.seed, self.rank)).to(self.device)
        self.model.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(self.model(self.x_data[idx]), self.y_data[idx])
        loss.backward()
        optim = self.cfg.optim
        g = torch.cat([p.grad.reshape(-1) for p in self.params]) + optim.weight_decay * self.x
        self.momentum = optim.momentum * self.momentum + g
        self.step_vec = optim.lr * self.momentum  # the local SGD step: x - step_vec
        self.loss = loss.item()
        st = self.cfg.strategy
        gen = torch.Generator(device=self.device).manual_seed(
            self.cfg.seed * 1_000_003 + step * 1009 + self.rank)
        if st.compress == "moniqua":
            # The round's dither is the same on every worker: drawn from (seed, step) alone.
            self.dither = (shared_dither(self.x.numel(), self.cfg.seed * 1_000_003 + step)
                           if st.rounding == "dither" else None)
            self.own = moniqua_encode(self.x, torch.as_tensor(theta), st.bits, st.rounding,
                                      gen, block=st.block_size, dither=self.dither)
        elif st.compress == "choco":
            self.own = choco_compress(self.x - self.step_vec - self.public.get(
                self.rank, torch.zeros_like(self.x)), st.choco_compressor, generator=gen)
        else:
            self.own = dense_encode(self.x)
        return self.own, self.own.nbytes

    def mix(self, refs: list, weights: dict[int, float]) -> dict:
        """Fetch the neighbours' messages (refs in the order of `weights`), decode, update.
        A neighbour whose message is gone (its machine vanished) is left out of this round."""
        st, x = self.cfg.strategy, self.x
        msgs: dict[int, object] = {}
        for (j, _), ref in zip(weights.items(), refs):
            if ref is None and j != self.rank:
                continue  # that neighbour was lost before it sent
            try:
                msgs[j] = self.own if j == self.rank else ray.get(ref)
            except ray.exceptions.RayError:
                continue
        w = {j: weights[j] for j in msgs}
        w[self.rank] += sum(weights.values()) - sum(w.values())  # missing weight stays home
        block = st.block_size or x.numel()
        wraps, max_diff = 0, np.zeros(1)
        if st.compress == "moniqua":
            # The jump check is reliable only while delta < 1/4 (strategies.compression
            # .wrapped): at 1 bit and 2-bit stochastic only non-finite decodes are caught.
            check_jumps = moniqua_delta(st.bits, st.rounding) < 0.25
            half_b = self.own.modulus / 2  # B / 2 per value: the largest correct offset
            own = moniqua_decode(self.own, x, self.dither)
            mix, spread = torch.zeros_like(x), torch.zeros(-(-x.numel() // block))
            for j, msg in msgs.items():
                if j == self.rank:
                    continue
                decoded = moniqua_decode(msg, x, self.dither)
                previous = self.last_decoded.get(j) if check_jumps else None
                if wrapped(decoded, previous, half_b):  # bits=None: the limit is B / 2
                    wraps += 1  # this neighbour's value cannot be trusted this round
                else:
                    mix += w[j] * (decoded - own)
                self.last_decoded[j] = decoded
                spread = torch.maximum(spread, block_max(decoded - x, block).float())
            max_diff = spread.numpy()  # per block: the next round's theta
            self.x = x + st.gamma * mix - self.step_vec
        elif st.compress == "choco":
            for j, msg in msgs.items():
                self.public[j] = self.public.get(j, torch.zeros_like(x)) + msg.decompress().to(x)
            x_half = x - self.step_vec
            me = self.public[self.rank]
            self.x = x_half + st.gamma * sum(w[j] * (self.public[j] - me)
                                             for j in msgs if j != self.rank)
            max_diff = np.array([max([float((self.public[j] - me).abs().max())
                                      for j in msgs] + [0.0])])
        else:
            dense = {j: msg.decompress().to(x) for j, msg in msgs.items()}
            self.x = sum(w[j] * dense[j] for j in dense) - self.step_vec
            max_diff = np.array([max(float((dense[j] - x).abs().max()) for j in dense)])
        return {"loss": self.loss, "bytes": self.own.nbytes, "wraps": wraps,
                "max_diff": max_diff, "max_step": block_max(self.step_vec, block).numpy()}


RemoteGossipWorker = ray.remote(GossipWorker)


@lru_cache(maxsize=64)
def mixing_gap(live: tuple[int, ...] | list[int], topology: str) -> float:
    """Spectral gap of W over the live workers, per round. A time-varying topology is taken
    over one period (log2 n rounds), its gap spread evenly over the rounds."""
    n = len(live)
    if n < 2:
        return 1.0
    period = max(1, math.ceil(math.log2(n))) if topology == "one_peer_exp" else 1
    product = torch.eye(n, dtype=torch.float64)
    for step in range(period):
        product = mixing_matrix(list(live), topology, step) @ product
    gap = spectral_gap(product)
    return max(1 - (1 - gap) ** (1 / period), 1e-3)


def train_gossip(cfg: Config) -> dict:
    """Run (or resume) one decentralized job; returns its summary (also in summary.json)."""
    t_start = time.perf_counter()
    st = cfg.strategy

    # ---- data and the driver's copy of the model (for evaluating the average)
    data: Dataset = load_dataset(cfg.data, cfg.seed)
    shards = partition(data.y_train, cfg.workers, cfg.data, cfg.seed, data.num_classes)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    params = list(model.parameters())

    pool = make_pool(cfg)  # its own checks (cloud=aws: ami, run.name) before the run dir
    log = RunLog(cfg)
    store = CheckpointStore(cfg.checkpoint.dir or str(log.dir / "checkpoints"),
                            keep=cfg.checkpoint.keep)
    progress, replicas = Progress(), {}
    checkpoint = store.load_latest()
    if checkpoint is not None:
        check_resumable(checkpoint.manifest["config"], cfg)
        progress = Progress(**checkpoint.state["progress"])
        replicas = {int(r): v.numpy() for r, v in checkpoint.state["replicas"].items()}
        unflatten_into(checkpoint.state["average"], params)
    progress.lost_steps += log.open_metrics(progress.step)

    interrupted, ray_address = False, ""
    wraps, theta, margin = 0, np.full(1, 1e-8), st.theta_margin  # theta: one per block
    cap = 2.0  # (a)'s factor
    held, resynced_at = np.zeros(1), -SETTLE_ROUNDS  # spread measured on the replicas, when
    recent_steps: deque[np.ndarray] = deque(maxlen=20)  # per block, for theta's bound (a)
    if checkpoint is not None:
        theta, cap = checkpoint.state["theta"].numpy(), checkpoint.state["cap"]
        recent_steps.extend(checkpoint.state["recent_steps"].numpy())
    cost0 = (progress.cost_usd, progress.on_demand_cost_usd)
    workers: WorkerPool | None = None

    def start_state(rank: int):
        """A (re)starting worker begins from its saved replica, else from a live one's model."""
        if rank in replicas:
            return replicas.pop(rank)
        if workers is not None and workers.live:
            actor, _ = next(iter(workers.live.values()))
            return actor.state.remote()
        return None

    def average() -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """The mean of the live replicas, and each of them (a worker that just died is left
        out here; the next round drops it)."""
        refs = {rank: actor.state.remote() for rank, (actor, _) in workers.live.items()}
        states = {}
        for rank, ref in refs.items():
            try:
                states[rank] = ray.get(ref)
            except ray.exceptions.RayError:
                continue
        if not states:
            return flatten(params), states
        return np.mean(list(states.values()), axis=0), states

    def resync(step: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(theta, held, step): theta per block measured on the replicas themselves, their
        spread over all pairs plus two local steps (one all-gather through the driver, only
        when needed); the spread theta may hold to for SETTLE_ROUNDS after `step`."""
        states = torch.from_numpy(np.stack(list(average()[1].values())))
        spread = block_max(states.amax(0) - states.amin(0), st.block_size or states.shape[1])
        theta = moniqua_theta(spread + torch.from_numpy(2 * recent_steps[-1]), margin).numpy()
        return theta, theta / margin, step

    def save_checkpoint() -> None:
        avg, states = average()
        snapshot = {**progress.__dict__, "wall_s": progress.wall_s + time.perf_counter() - t_start}
        state = {"average": torch.from_numpy(avg), "progress": snapshot,
                 "theta": torch.from_numpy(theta), "cap": cap,
                 "recent_steps": torch.from_numpy(np.array(recent_steps)), "replicas": {
            str(rank): torch.tensor(s) for rank, s in states.items()}  # s: read-only (Ray)
            if cfg.checkpoint.replicas == "all" else {}}
        store.save(progress.step, state, {"config": to_dict(cfg)})

    try:
        machines = pool.start(cfg.workers)
        worker_device(cfg)
        workers = WorkerPool(cfg, data, shards, pool, set(), RemoteGossipWorker, start_state)
        workers.start(machines)
        ray_address = ray.get_runtime_context().gcs_address
        members = sorted(workers.live)
        last_save = time.monotonic()

        # ---- the rounds
        for step in range(progress.step + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            events = pool.poll(step)
            for machine in events.joined:
                workers.add(machine)
            progress.joins += workers.admit()
            if events.noticed and workers.live:  # a noticed replica is about to go with its
                save_checkpoint()  # machine: a just-in-time checkpoint keeps it
            progress.preemptions += workers.drain(events.noticed)
            if sorted(workers.live) != members:  # W is rebuilt over the live workers
                members = sorted(workers.live)
                workers.call("reset_neighbours", ())
                if st.compress == "moniqua" and workers.live and recent_steps:
                    theta, held, resynced_at = resync(step)  # new neighbour pairs

            messages, lost = workers.call("message", (step, theta), reclaim=events.reclaim_now,
                                          payload=True)
            # W over the round's members: a worker lost during this round leaves a gap (its
            # weight stays home) rather than new neighbour pairs that theta was not set for.
            live = sorted(messages)
            weights = {r: gossip_weights(members, st.topology, r, step) for r in live}
            mix_args = {r: ([messages[j][0] if j in messages else None for j in weights[r]],
                            weights[r]) for r in live}
            stats, lost2 = workers.call("mix", mix_args) if live else ({}, 0)
            progress.preemptions += lost + lost2

            if stats:
                round_wraps = sum(s["wraps"] for s in stats.values())
                wraps += round_wraps
                # theta per block for the next round: margin x the smaller of (a) D-PSGD's
                # spread bound cap lr max|g| / gap and (b) the distance seen to decoded
                # neighbours plus both sides' next local step.
                recent_steps.append(np.max([s["max_step"] for s in stats.values()], axis=0))
                seen = np.max([s["max_diff"] + 2 * s["max_step"] for s in stats.values()],
                              axis=0)
                if round_wraps and workers.live:  # a decode was not to be trusted
                    theta, held, resynced_at = resync(step)
                    cap = 2 * cap
                elif np.isfinite(seen).all():
                    limit = cap * np.max(recent_steps, axis=0) / mixing_gap(tuple(live),
                                                                            st.topology)
                    if step - resynced_at <= SETTLE_ROUNDS:
                        limit = np.maximum(limit, held)
                    theta = moniqua_theta(torch.from_numpy(np.minimum(seen, limit)),
                                          margin).numpy()
                progress.loss = float(np.mean([s["loss"] for s in stats.values()]))
                progress.bytes_sent += sum(s["bytes"] for s in stats.values())
            else:
                progress.skipped_steps += 1
                time.sleep(0.05)

            progress.step = step
            progress.live.append(len(stats))
            spot, on_demand = pool.costs()  # so far, for plots over time
            record = {"step": step, "loss": progress.loss, "live_workers": len(stats),
                      "step_s": time.perf_counter() - t0, "bytes_sent": progress.bytes_sent,
                      "wall_s": progress.wall_s + time.perf_counter() - t_start,
                      "cost_usd": cost0[0] + spot, "on_demand_cost_usd": cost0[1] + on_demand,
                      "theta": float(theta.max()), "wraps": wraps}
            if (step % st.consensus_every == 0 or step == cfg.steps) and workers.live:
                avg, states = average()
                record["consensus_dist"] = float(np.mean(
                    [np.linalg.norm(s - avg) for s in states.values()] or [0.0]))
                if (cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.steps:
                    unflatten_into(avg, params)
                    record["test_acc"] = evaluate(model, data, cfg.eval.batch_size)
            log.step(record)

            ckpt = cfg.checkpoint
            if workers.live and ((ckpt.every_steps and step % ckpt.every_steps == 0) or
                                 step == cfg.steps or (ckpt.every_s and time.monotonic() -
                                                       last_save >= ckpt.every_s)):
                save_checkpoint()
                last_save = time.monotonic()
    except KeyboardInterrupt:
        interrupted = True
        if workers is not None and workers.live:
            save_checkpoint()
    finally:
        if workers is not None and workers.live:
            unflatten_into(average()[0], params)
        if workers is not None:
            workers.stop()
        spot, on_demand = pool.costs()
        progress.cost_usd, progress.on_demand_cost_usd = cost0[0] + spot, cost0[1] + on_demand
        pool.shutdown()

    torch.save(model.state_dict(), log.dir / "model.pt")
    live = progress.live
    summary = {
        "run_dir": str(log.dir), "ray_address": ray_address,
        "test_acc": evaluate(model, data, cfg.eval.batch_size), "loss": progress.loss,
        "steps_done": progress.step, "wall_s": progress.wall_s + time.perf_counter() - t_start,
        "live_workers_mean": float(np.mean(live)) if live else 0.0,
        "bytes_sent": progress.bytes_sent,
        "bytes_per_worker_step": progress.bytes_sent / max(1, sum(live)),
        "cost_usd": progress.cost_usd, "on_demand_cost_usd": progress.on_demand_cost_usd,
        "preemptions": progress.preemptions, "joins": progress.joins,
        "lost_steps": progress.lost_steps, "skipped_steps": progress.skipped_steps,
        "wraps": wraps, "rejected_updates": 0, "byzantine_ranks": [],
        "interrupted": interrupted, "error": "",
        "final_theta": float(theta.max()),
    }
    log.finish(summary, live)
    return summary
