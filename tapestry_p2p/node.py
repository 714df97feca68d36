"""One partner's node: wires data, inner trainer, shared model, averaging, checkpoints and metrics into DiLoCo rounds.

A round, as `Node.run_round` reads:
1. inner steps of AdamW on local data until H steps are done *and* the round's meeting time (see `rounds`) is near;
2. pseudo-gradient `theta - working`, averaged with the peers that meet (bit-exact, compressed on the wire);
3. outer Nesterov step on `theta`; the working copy restarts from it;
4. re-sync from the group if our shared model disagreed with it; checkpoint; one metrics record.

A node that joins a run already under way (or comes back to one) first downloads the swarm's shared state
(`_catch_up`). On stop (Ctrl-C, SIGTERM) the node checkpoints where it is, mid-round included, and resumes from there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from tapestry_p2p import __version__, checkpoint
from tapestry_p2p.averaging import Download, RoundResult, SoloAveraging, SwarmAveraging
from tapestry_p2p.codec import CHOICES
from tapestry_p2p.data import ByteBatches, load_text_bytes
from tapestry_p2p.model import ModelConfig, build_model
from tapestry_p2p.outer import OuterConfig, SharedModel
from tapestry_p2p.rounds import MATCHMAKING_LEAD, MeetingClock, RoundSchedule
from tapestry_p2p.swarm import (
    DEFAULT_PEER_LISTEN,
    DHTOptions,
    ephemeral_identity,
    load_or_create_identity,
    start_dht,
    stop_dht,
    visible_maddrs,
)
from tapestry_p2p.telemetry import StatusPublisher, read_statuses, signing_key, validators
from tapestry_p2p.train import InnerTrainer, TrainConfig, mean

logger = logging.getLogger(__name__)

CATCH_UP_RETRY_SECONDS = 10.0  # a joiner that finds the swarm ahead but nobody serving its state asks again this often
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class NodeConfig:
    run_id: str
    data: Path
    initial_peers: List[str] = field(default_factory=list)
    listen: List[str] = field(default_factory=lambda: list(DEFAULT_PEER_LISTEN))
    announce: List[str] = field(default_factory=list)
    identity: Optional[Path] = None
    checkpoint_dir: Optional[Path] = None
    metrics: Optional[Path] = None
    partner: str = "partner"
    region: str = "unknown"
    inner_steps: int = 50  # H: inner steps before a peer calls the round's meeting
    max_rounds: Optional[int] = None  # stop after this many outer rounds; None: until interrupted
    min_peers: int = 1  # trainers (us included) that must be online before our first round
    compression: str = "8bit"
    threads: int = 0  # torch threads; 0 keeps torch's default
    solo: bool = False  # no network at all: the trained-alone baseline
    start_fresh: bool = False  # if the swarm is ahead and nobody serves its state: train from our own, don't wait
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    schedule: RoundSchedule = field(default_factory=RoundSchedule)

    def __post_init__(self) -> None:
        if not RUN_ID_PATTERN.match(self.run_id):
            raise ValueError(f"run id {self.run_id!r} must be 1-64 letters, digits, '-' or '_'")
        if self.inner_steps <= 0:
            raise ValueError(f"inner steps must be a positive integer, got {self.inner_steps}")
        if self.max_rounds is not None and self.max_rounds <= 0:
            raise ValueError(f"max rounds must be a positive integer, got {self.max_rounds}")
        if self.compression not in CHOICES:
            raise ValueError(f"compression must be one of {', '.join(CHOICES)}, got {self.compression!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.min_peers <= 0:
            raise ValueError(f"min peers must be a positive integer, got {self.min_peers}")


@dataclass
class RoundRecord:
    """One line of `--metrics` (JSON Lines)."""

    round: int
    step: int
    inner_steps: int
    loss: float
    group_size: int
    bytes_sent: int
    bytes_received: int
    round_seconds: float
    time: float
    model_hash: str
    peer_id: str
    partner: str
    compression: str
    failure: Optional[str]
    resynced: bool

    def to_json(self) -> str:
        record = dict(self.__dict__)
        record["loss"] = record["loss"] if math.isfinite(record["loss"]) else None
        return json.dumps(record)


def run_seed(run_id: str) -> int:
    """The model-initialization seed every peer of a run agrees on without talking."""
    return zlib.crc32(run_id.encode())


class Node:
    """A partner's training node. `run()` returns after max_rounds, or when `stop` is set."""

    def __init__(
        self,
        config: NodeConfig,
        on_round: Optional[Callable[[RoundRecord], None]] = None,
        on_step: Optional[Callable[[int, int], None]] = None,
    ):
        self.config = config
        self.on_round = on_round or (lambda record: None)
        self.on_step = on_step or (lambda done, target: None)  # inner steps done this round, and H
        self.stop = threading.Event()
        self.dht: Optional[DHT] = None
        self.status = StatusPublisher.disabled()
        self.bytes_total = [0, 0]  # sent, received over this session
        self._lock = threading.Lock()  # theta and the outer optimizer, shared with the state-serving thread
        self.peer_id = "solo"
        self.rounds_done = 0
        self.last_loss = float("nan")
        self._round_losses: List[float] = []  # inner-step losses of the round under way (kept across a stop/resume)
        self._clean = True  # our last round received every averaged part (peers comparing states ask for it)
        if config.threads:
            torch.set_num_threads(config.threads)
        data = load_text_bytes(config.data, min_bytes=config.model.block_size + 2)
        seed = run_seed(config.run_id)
        self.shared = SharedModel(build_model(config.model, seed), config.outer)
        working = build_model(config.model, seed)
        batches = ByteBatches(
            data, config.model.block_size, config.train.batch_size, seed=zlib.crc32(config.partner.encode())
        )
        self.trainer = InnerTrainer(working, batches, config.train)
        self.resumed = False
        if config.checkpoint_dir is not None and checkpoint.exists(config.checkpoint_dir):
            self._resume(config.checkpoint_dir)

    # ---- state: checkpoints and sharing ----

    def _resume(self, directory: Path) -> None:
        shared, state = checkpoint.load(directory)
        expected = {k: tuple(v.shape) for k, v in self.shared.model.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in shared.items()}
        if found != expected:
            differs = sorted(k for k in expected.keys() | found.keys() if found.get(k) != expected.get(k))[0]
            raise checkpoint.CheckpointError(
                f"{directory / checkpoint.MODEL_FILE} holds a model of another shape ({differs}: {found.get(differs)} "
                f"there, {expected.get(differs)} with these options); pass the model options it was trained with, "
                f"or a new --checkpoint-dir"
            )
        self.shared.model.load_state_dict(shared)
        try:
            self.shared.load_state_dict(state["outer"])
            self.trainer.load_state_dict(state["inner"])
            torch.set_rng_state(state["torch_rng"])
            self._round_losses = [float(x) for x in state.get("round_losses", [])]
            model_hash = state["model_hash"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise checkpoint.CheckpointError(
                f"{directory / checkpoint.STATE_FILE} does not fit this model or version ({type(e).__name__}); "
                f"{checkpoint.way_out(directory)}"
            ) from None
        if self.shared.hash() != model_hash:
            raise checkpoint.CheckpointError(
                f"{directory / checkpoint.STATE_FILE} belongs to another {checkpoint.MODEL_FILE} (interrupted write?);"
                f" {checkpoint.way_out(directory)}"
            )
        self.resumed = True
        logger.info(
            "resumed from %s at round %d, step %d (%d steps into the next round)",
            directory, self.shared.round, self.trainer.steps, len(self._round_losses),
        )  # fmt: skip

    def _save(self) -> None:
        """Checkpoint everything resuming needs: after each round, after a catch-up, and when stopping mid-round."""
        if self.config.checkpoint_dir is None:
            return
        with self._lock:
            state = {
                "outer": self.shared.state_dict(),
                "inner": self.trainer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "round_losses": list(self._round_losses),
                "model_hash": self.shared.hash(),
                "version": __version__,
            }
        checkpoint.save(self.config.checkpoint_dir, self.shared.model.state_dict(), state)

    def _share_state(self) -> Tuple[Dict[str, Any], List[torch.Tensor]]:
        """What a peer downloads from us: theta and the outer momentum (runs in hivemind's helper thread)."""
        with self._lock:
            metadata = {"round": self.shared.round, "hash": self.shared.hash(), "clean": self._clean}
            tensors = [p.detach().clone() for p in self.shared.params]
            tensors += [m.clone() for m in self.shared.momentum_buffers()]
            return metadata, tensors

    def _adopt(self, download: Optional[Download], min_round: int) -> bool:
        """Take a downloaded shared state if it is well-formed, at least `min_round`, and hashes to what its servers
        announced; returns whether we did. The working model restarts from it."""
        if download is None:
            return False
        round_no, tensors, n = download.state[0], download.tensors, len(self.shared.params)
        shapes_ok = len(tensors) == 2 * n and all(
            t.shape == p.shape for t, p in zip(tensors, self.shared.params + self.shared.params)
        )
        if not shapes_ok or round_no < min_round or not all(torch.isfinite(t).all() for t in tensors):
            logger.warning("ignored a downloaded state (round %d, %d tensors): malformed or too old", round_no, n)
            return False
        with self._lock:
            before = (
                [p.detach().clone() for p in self.shared.params],
                self.shared.momentum_buffers(),
                self.shared.round,
            )
            self.shared.load(tensors[:n], tensors[n:], round_no)
            if self.shared.hash() != download.state[1]:
                self.shared.load(*before)
                logger.warning("ignored a downloaded state whose hash differs from what its servers announced")
                return False
            self.shared.copy_into(self.trainer.model)
            self._round_losses = []
            self._clean = True  # we now hold a state the group agreed on
        return True

    # ---- the loop ----

    def run(self) -> "Summary":
        started = time.monotonic()
        with contextlib.ExitStack() as stack:
            averaging = SoloAveraging() if self.config.solo else self._join_swarm(stack)
            while not self.stop.is_set() and (
                self.config.max_rounds is None or self.rounds_done < self.config.max_rounds
            ):
                record = self.run_round(averaging)
                if record is None:
                    break
                self.on_round(record)
            if self.stop.is_set():
                self._save()  # stopped (mid-round, too): keep everything done so far
        return Summary(
            self.rounds_done, self.shared.round, self.trainer.steps, self.last_loss, time.monotonic() - started
        )

    def _join_swarm(self, stack: contextlib.ExitStack) -> SwarmAveraging:
        """Start the DHT, status publisher and averager; `stack` stops them in reverse order when the run ends."""
        identity = self.config.identity or stack.enter_context(ephemeral_identity())
        load_or_create_identity(identity)  # validates an existing file (corrupt, readable by others)
        key = signing_key(identity)
        options = DHTOptions(
            initial_peers=self.config.initial_peers,
            listen=self.config.listen,
            announce=self.config.announce,
            identity=identity,
            record_validators=validators(self.config.run_id, key),
        )
        self.dht = start_dht(options)
        stack.callback(stop_dht, self.dht)
        self.peer_id = self.dht.peer_id.to_base58()
        logger.info("peer %s listening on %s", self.peer_id, " ".join(visible_maddrs(self.dht)))
        self.status = StatusPublisher(
            self.dht, self.config.run_id, key,
            dict(peer_id=self.peer_id, partner=self.config.partner, region=self.config.region, role="trainer",
                 compression=self.config.compression, round=self.shared.round, inner_step=self.trainer.steps),
        )  # fmt: skip
        self.status.start()
        stack.callback(self.status.stop)
        averaging = SwarmAveraging(
            self.dht, self.config.run_id, [p.shape for p in self.shared.params], self.config.compression,
            self._share_state,
        )  # fmt: skip
        stack.callback(averaging.shutdown)
        averaging.publish_round(self.shared.round)
        if self.config.initial_peers:
            self.status.update(state="loading state")
            self._first_catch_up(averaging)
        self._wait_for_peers()
        return averaging

    def _wait_for_peers(self) -> None:
        """Before the first round, wait until `min_peers` trainers of the run (us included) report in the DHT."""
        self.status.update(state="idle")
        announced = False
        while not self.stop.is_set():
            online = sum(1 for p in read_statuses(self.dht, self.config.run_id) if p.role == "trainer")
            if online >= self.config.min_peers:
                return
            if not announced:
                logger.info("waiting for %d trainers to come online (%d so far)", self.config.min_peers, online)
                announced = True
            self.stop.wait(1.0)

    def _first_catch_up(self, averaging: SwarmAveraging) -> None:
        """On joining: if the swarm is ahead of us, start from its state. If nobody serves it, wait and ask again
        (a joiner that trains from its own state would only be overwritten later), unless told to start fresh."""
        while not self.stop.is_set():
            ahead = averaging.highest_round_online()
            if ahead <= self.shared.round:
                if ahead < 0 and not self._others_online():
                    logger.warning(
                        "nobody else is in run %r yet: training alone until partners join "
                        "(check --run-id if you expected a running swarm)", self.config.run_id,
                    )  # fmt: skip
                return
            if self._catch_up(averaging):
                return
            if self.config.start_fresh:
                logger.warning("the swarm is at round %d but nobody served its state: training from ours", ahead)
                return
            logger.warning(
                "the swarm is at round %d but nobody served its state; asking again in %.0fs "
                "(pass --start-fresh to train from our own state instead)", ahead, CATCH_UP_RETRY_SECONDS,
            )  # fmt: skip
            self.stop.wait(CATCH_UP_RETRY_SECONDS)

    def _others_online(self) -> bool:
        """Whether any other node (trainer or bootstrap) reports in this run's peer table."""
        return any(p.peer_id != self.peer_id for p in read_statuses(self.dht, self.config.run_id))

    def _catch_up(self, averaging) -> bool:
        """Adopt the swarm's state if some peer is ahead of us and serves it; returns whether we did."""
        if averaging.highest_round_online() <= self.shared.round:
            return False
        download = averaging.download_state(min_round=self.shared.round + 1)
        if not self._adopt(download, self.shared.round + 1):
            return False
        logger.info(
            "caught up with the swarm at round %d (model %s), downloaded from %d peers",
            self.shared.round, download.state[1], len(download.servers),
        )  # fmt: skip
        averaging.publish_round(self.shared.round)
        self._save()
        return True

    def _resync(self, averaging, peers: List[str], group_round: int) -> bool:
        """After a round that may have left us out of step with our group (we disagreed with it going in, or some
        values lost their reducer), compare states with the group and download the agreed one if ours differs.
        Returns whether we downloaded."""
        others = [p for p in peers if p != self.peer_id]
        mine = (self.shared.round, self.shared.hash())
        agreed = averaging.agreed_state(self.peer_id, mine, self._clean, others, group_round)
        if agreed is None or agreed == mine:
            return False
        download = averaging.download_state(min_round=mine[0], peers=others, want=agreed)
        return self._adopt(download, mine[0])

    def _inner_loop(self, clock: Optional[MeetingClock]) -> Tuple[List[float], Optional[float]]:
        """Train until H steps are done and the meeting is near; returns the round's losses and the meeting time."""
        losses = self._round_losses  # not empty when we resumed mid-round
        meeting = None
        while not self.stop.is_set():
            if clock is not None and clock.should_stop_training():
                meeting = clock.poll()
                break
            if len(losses) >= self.config.inner_steps:
                if clock is None:
                    break
                if meeting is None:
                    meeting = clock.agree()  # we are the first (or alone): call the meeting, train until it nears
                if get_dht_time() >= meeting - MATCHMAKING_LEAD:
                    break
            loss = self.trainer.step()
            with self._lock:
                losses.append(loss)
            self.status.update(inner_step=self.trainer.steps, state="training")
            self.on_step(len(losses), self.config.inner_steps)
        return losses, meeting

    def run_round(self, averaging) -> Optional[RoundRecord]:
        started = time.monotonic()
        self._catch_up(averaging)  # if the swarm has moved on (we were alone, away, or out of step), rejoin it
        round_no = self.shared.round + 1
        clock = None if self.dht is None else MeetingClock(self.dht, self.config.run_id, round_no, self.config.schedule)
        self.status.update(state="training")
        losses, meeting = self._inner_loop(clock)
        training_seconds = time.monotonic() - started
        if self.stop.is_set():
            logger.info("round %d abandoned: stopping", round_no)
            return None
        if clock is not None and meeting is None:
            meeting = clock.agree()
        delta = self.shared.pseudo_gradient(self.trainer.model)
        gather = {"round": self.shared.round, "hash": self.shared.hash(), "steps": len(losses)}
        self.status.update(state="averaging")
        result: RoundResult = averaging.average(delta, meeting or 0.0, gather)
        with self._lock:
            self.shared.apply(result.averaged)
            self.shared.copy_into(self.trainer.model)
            self._round_losses = []
            self._clean = result.clean
        resynced = False
        if result.group_size > 1 and (result.needs_resync or result.failure):
            self.status.update(state="loading state")
            resynced = self._resync(averaging, result.peers, result.group_round)
            if resynced:
                logger.warning("round %d left us out of step with the group: re-synced from it", self.shared.round)
        averaging.publish_round(self.shared.round)
        model_hash = self.shared.hash()
        self._save()
        self.rounds_done += 1
        self.last_loss = mean(losses)
        record = RoundRecord(
            round=self.shared.round,
            step=self.trainer.steps,
            inner_steps=len(losses),
            loss=self.last_loss,
            group_size=result.group_size,
            bytes_sent=result.bytes_sent,
            bytes_received=result.bytes_received,
            round_seconds=round(time.monotonic() - started, 3),
            time=time.time(),
            model_hash=model_hash,
            peer_id=self.peer_id,
            partner=self.config.partner,
            compression=self.config.compression,
            failure=result.failure,
            resynced=resynced,
        )
        if self.config.metrics is not None:
            with open(self.config.metrics, "a") as f:
                f.write(record.to_json() + "\n")
        self._report(record, training_seconds)
        return record

    def _report(self, record: RoundRecord, training_seconds: float) -> None:
        self.bytes_total[0] += record.bytes_sent
        self.bytes_total[1] += record.bytes_received
        tokens = record.inner_steps * self.config.train.batch_size * self.config.model.block_size
        self.status.update(
            state="training", round=record.round, inner_step=record.step,
            loss=record.loss if math.isfinite(record.loss) else None,
            tokens_per_second=float(tokens / max(training_seconds, 1e-6)),
            bytes_sent_round=record.bytes_sent, bytes_received_round=record.bytes_received,
            bytes_sent_total=self.bytes_total[0], bytes_received_total=self.bytes_total[1],
            group_size=record.group_size, round_seconds=float(record.round_seconds),
            last_failure=record.failure[:200] if record.failure else None,
        )  # fmt: skip


@dataclass
class Summary:
    rounds: int  # outer rounds completed in this session
    round: int  # the shared model's round number
    steps: int
    last_loss: float
    seconds: float

    def line(self) -> str:
        loss = f"{self.last_loss:.3f}" if math.isfinite(self.last_loss) else "n/a"
        return (
            f"stopped after {self.rounds} rounds this session (shared round {self.round}, "
            f"{self.steps} inner steps, last loss {loss}, {self.seconds:.0f}s)"
        )
