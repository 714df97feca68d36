"""One partner's node: composes data, inner trainer, shared model, swarm session, state sync, checkpoints and metrics
into DiLoCo rounds.

A round, as `Node.run_round` reads:
1. inner steps of AdamW on local data until H steps are done *and* the round's meeting time (see
   `comm.matchmaking`) is near;
2. pseudo-gradient `theta - working`, averaged with the peers that meet (bit-exact, compressed on the wire);
3. outer Nesterov step on `theta`; the working copy restarts from it;
4. re-sync from the group if our shared model disagreed with it (`sync`); checkpoint; one metrics record.

A node that joins a run already under way (or comes back to one) first downloads the swarm's shared state
(`StateSync.first_catch_up`). On stop (Ctrl-C, SIGTERM) the node checkpoints where it is, mid-round included, and
resumes from there.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Optional

import torch

from tapestry_p2p.comm.averager import FaultHook
from tapestry_p2p.comm.averaging import AveragingResult, RoundMeta
from tapestry_p2p.comm.codec import LOSSLESS
from tapestry_p2p.comm.error_feedback import ErrorFeedback
from tapestry_p2p.comm.matchmaking import MATCHMAKING_LEAD, MeetingClock
from tapestry_p2p.comm.statesync.client import Download
from tapestry_p2p.node.config import NodeConfig
from tapestry_p2p.node.metrics import MetricsWriter, Phases, RoundMetrics, Summary, mean
from tapestry_p2p.node.overlap import Awaited, InFlight
from tapestry_p2p.node.session import SessionOptions, SwarmSession
from tapestry_p2p.node.spec import SpecError, digest_of, encode, first_difference
from tapestry_p2p.node.sync import StateSync
from tapestry_p2p.p2p.dht import dht_time
from tapestry_p2p.security.consortium import ConsortiumError
from tapestry_p2p.security.consortium import load as load_consortium
from tapestry_p2p.telemetry.status import StatusPublisher
from tapestry_p2p.training.checkpoint import CheckpointManager, RunIdentity
from tapestry_p2p.training.data import TokenStream
from tapestry_p2p.training.distributed import PartnerGroup, launched_ranks
from tapestry_p2p.training.inner import InnerTrainer, resolve_device
from tapestry_p2p.training.model import build_model, check_vocabulary, tokenizer_of
from tapestry_p2p.training.outer import SharedModel
from tapestry_p2p.training.tokenizer import make_tokenizer

logger = logging.getLogger(__name__)

SPEC_REPUBLISH = 600.0  # seconds between publications of our run spec (it lives node.session.SPEC_LIFETIME)


class Node:
    """A partner's training node. `run()` returns after max_rounds, or when `stop` is set."""

    def __init__(
        self,
        config: NodeConfig,
        on_round: Optional[Callable[[RoundMetrics], None]] = None,
        on_step: Optional[Callable[[int, int], None]] = None,
        fault: Optional[FaultHook] = None,
        update_scale: float = 1.0,
    ) -> None:
        self.config = config
        self.update_scale = update_scale  # a test hook: a faulty partner sends this times its update
        self.on_round = on_round or (lambda record: None)
        self.on_step = on_step or (lambda done, target: None)  # inner steps done this round, and H
        self.fault = fault  # a test hook for the averager (tapestry_p2p.testing.faults)
        self.stop = threading.Event()
        self.session: Optional[SwarmSession] = None
        self.rounds_done = 0
        self.last_loss = float("nan")
        self.round_losses: list[float] = []  # inner-step losses of the round under way (kept across a stop/resume)
        self._step_seconds = 0.0  # how long one inner step takes (a running estimate)
        self._warned_slow_step = False
        if config.threads:
            torch.set_num_threads(config.threads)
        self.consortium = None if config.consortium is None else load_consortium(config.consortium)
        if self.consortium is not None and self.consortium.run_id != config.run_id:
            raise ConsortiumError(
                f"{config.consortium} is the consortium of run {self.consortium.run_id!r}, not {config.run_id!r}: "
                f"pass --run-id {self.consortium.run_id}"
            )
        self.shared = SharedModel(build_model(config.model, config.model_seed), config.outer)
        initial = self.shared.hash()
        if config.initial_model and initial != config.initial_model:
            raise SpecError(
                f"our initial model hashes to {initial}, the run spec pins {config.initial_model}: "
                "use the model files the consortium agreed on (`tapestry spec show` prints the hash of yours)"
            )
        self.spec = encode(config.spec())
        self.spec_digest = digest_of(self.spec)
        if self.consortium is not None and self.consortium.spec not in ("", self.spec_digest):
            raise ConsortiumError(
                f"{config.consortium} pins run spec {self.consortium.spec}, we train {self.spec_digest}: join with "
                "the run.toml the consortium agreed on (`tapestry spec show` prints a spec's digest)"
            )
        self._spec_published = -SPEC_REPUBLISH
        self._spec_reported: set[str] = set()  # peers already told to be on another spec
        run = RunIdentity(config.run_id, self.consortium.consortium_id if self.consortium else "", initial)
        tokenizer = make_tokenizer(tokenizer_of(config.model))
        check_vocabulary(self.shared.model, tokenizer.vocab_size)
        ranks = launched_ranks()
        device = resolve_device(config.device, ranks.local_rank if ranks.world > 1 else None)
        if config.train.batch_size % (ranks.world * config.grad_accum):
            raise SpecError(
                f"the run's batch size {config.train.batch_size} does not split into {ranks.world} ranks x "
                f"--grad-accum {config.grad_accum}; pick a --grad-accum (or a number of ranks) that divides it"
            )
        per_rank = config.train.batch_size // ranks.world
        batches = TokenStream(
            config.data, tokenizer, config.model.block_size, per_rank, config.text_field, (ranks.rank, ranks.world)
        )
        working: torch.nn.Module = copy.deepcopy(self.shared.model).to(device)
        self.group = None if ranks.world == 1 else PartnerGroup(ranks, device)
        if self.group is not None:
            working = self.group.wrap(working)
            logger.info("rank %d of %d of this partner on %s", ranks.rank, ranks.world, device)
        train = dataclasses.replace(config.train, batch_size=per_rank)
        self.trainer = InnerTrainer(working, batches, train, device, config.grad_accum)
        lock = threading.Lock()  # theta and the outer optimizer, shared with the state-serving thread
        # what our lossy-coded contributions still owe the swarm (comm.error_feedback)
        self.feedback = (
            ErrorFeedback([p.shape for p in self.shared.params])
            if config.compression not in LOSSLESS and not config.solo
            else None
        )
        self.sync = StateSync(self.shared, self.trainer.model, lock, on_adopt=self._adopted)
        self.checkpoints = (
            None
            if config.checkpoint_dir is None
            else CheckpointManager(
                config.checkpoint_dir,
                self.shared,
                self.trainer,
                config.model,
                lock,
                run,
                config.keep_checkpoints,
                self.feedback,
            )
        )
        self._rounds_since_save, self._saved_at = 0, time.monotonic()
        self.in_flight = InFlight()  # --overlap: the round whose all-reduce runs while we train the next
        self._phases = Phases()  # where the time goes until the next round's record (see run_round)
        self.resumed = self.checkpoints is not None and self.checkpoints.exists()
        if self.checkpoints is not None and self.resumed:
            self.round_losses.extend(self.checkpoints.resume())
        tokens_per_step = config.train.batch_size * config.model.block_size
        self.metrics = MetricsWriter(config.metrics, StatusPublisher.disabled(), tokens_per_step)

    def _adopted(self) -> None:
        """We took another peer's state: the round under way, the one in flight and what we owed belong to the model
        we left."""
        self.in_flight.drop()
        self.round_losses.clear()
        if self.feedback is not None:
            self.feedback.reset()

    @property
    def position(self) -> int:
        """The round our shared model reaches once the round in flight settles (what we advertise; our next meeting is
        `position + 1`)."""
        return self.shared.round + (self.in_flight.round is not None)

    @property
    def status(self) -> StatusPublisher:
        """Our status record: published once we joined the swarm, only kept up to date before (or when solo)."""
        return self.metrics.status

    # ---- the loop ----

    @property
    def leader(self) -> bool:
        """Whether this process is the partner's swarm node (always, except ranks > 0 under torchrun)."""
        return self.group is None or self.group.ranks.leader

    def run(self) -> Summary:
        started = time.monotonic()
        if not self.leader:
            return self._follow(started)
        with contextlib.ExitStack() as stack:
            if self.group is not None:
                stack.callback(self.group.close)
                stack.callback(self._release_ranks)
            if not self.config.solo:
                self._join_swarm(stack)
            stack.callback(self.in_flight.close)
            while not self.stop.is_set() and (
                self.config.max_rounds is None or self._rounds_started() < self.config.max_rounds
            ):
                if not self.run_round():
                    break
            self._settle_in_flight()  # --overlap: the last round launched, or the one in flight at a stop
            if self.stop.is_set() or self._rounds_since_save:
                self._save()  # stopped (mid-round, too), or rounds since the last periodic checkpoint: keep them
        seconds = time.monotonic() - started
        return Summary(self.rounds_done, self.shared.round, self.trainer.steps, self.last_loss, seconds)

    def _release_ranks(self) -> None:
        """Rank 0 under torchrun, at the end: every rank ends on the shared model (saved before this), then stops."""
        assert self.group is not None
        with self.sync.lock:
            self.shared.copy_into(self.trainer.model)
        self.group.stop(self.trainer.model)

    def _follow(self, started: float) -> Summary:
        """A rank > 0 under torchrun: the inner steps rank 0 commands, nothing else (see training.distributed)."""
        assert self.group is not None
        try:
            self.group.follow(self.trainer.model, self.trainer.step)
        finally:
            self.group.close()
        seconds = time.monotonic() - started
        return Summary(0, self.shared.round, self.trainer.steps, float("nan"), seconds)

    def run_round(self) -> bool:
        """One round: train until the meeting, then average and apply (blocking), or launch this round's all-reduce
        in the background (--overlap, see node.overlap; the round in flight before it is settled as soon as it is
        done, at the latest at this meeting). Each settled round's record goes to `on_round`. Returns False if told
        to stop."""
        if not self.config.overlap:
            self._phases = Phases()  # a blocking round is its own accounting period
        self._check_specs()
        if self.group is not None:
            self.group.working_model_reset()  # each round starts every rank from rank 0's working model
        if self.in_flight.done():  # --overlap: our last round settles before we compare with the swarm
            self._settle_in_flight()
        with self._phases("catch_up"):
            # the swarm has moved on (we were alone, away, or out of step): rejoin it. Our round in flight settles
            # first, so that the state we download is the swarm's latest when we adopt it.
            if self.in_flight.round is not None and self.sync.peers_ahead(self.position):
                self._settle_in_flight()
            caught_up = self.sync.catch_up(self.position)
        if caught_up is not None:
            self._caught_up(caught_up)
        round_no = self.position + 1
        training_started = time.monotonic()
        meeting = self._train_until_meeting(round_no)
        if meeting is None:
            logger.info("round %d abandoned: stopping", round_no)
            return False
        training_seconds = time.monotonic() - training_started
        if self.config.overlap:
            self._settle_in_flight()  # if it is not done yet, we wait for it here
            self._launch(meeting, training_seconds)
        else:
            self._settle_in_flight()  # the swarm's round we awaited since catching up (servers with --overlap)
            losses = list(self.round_losses)
            result = self._average(meeting)
            with self._phases("outer_step"):
                self._apply(result)
            self._finish(result, losses, training_seconds)
        return True

    def _rounds_started(self) -> int:
        return self.rounds_done + self.in_flight.launched

    def _finish(self, result: AveragingResult, losses: list[float], training_seconds: float) -> None:
        """After a round's outer step: re-sync if it left us out of step, checkpoint, write its record."""
        self.last_loss = mean(losses)
        self.rounds_done += 1
        if self.sync.out_of_step(result):
            self.status.update(state="loading state")
        with self._phases("resync"):
            resynced = self.sync.after_round(result)
            self.sync.averaging.publish_round(self.position)
        with self._phases("hash"):
            self.shared.hash()  # once per round (cached until theta changes): record, checkpoint, state server
        with self._phases("checkpoint"):
            self._save(periodic=True)
        self.on_round(self._record(result, len(losses), resynced, training_seconds))

    # ---- the four steps ----

    def _train_until_meeting(self, round_no: int) -> Optional[float]:
        """Train until H steps are done and the meeting is near; returns the meeting time (0 when solo), or None if
        told to stop. The round's losses are in `self.round_losses` (not empty when we resumed mid-round)."""
        clock = (
            None
            if self.session is None
            # peers of another run spec never average with us: they must not set our meeting times either
            else MeetingClock(
                self.session.dht,
                f"{self.config.run_id}.{self.spec_digest}",
                round_no,
                self.config.schedule,
                self.session.owner,
            )
        )
        self.status.update(state="training")
        meeting = None
        while not self.stop.is_set():
            # a step that would end past the meeting's matchmaking is not started (a step may take seconds)
            if clock is not None and clock.should_stop_training(self._step_seconds):
                meeting = clock.poll()
                break
            if len(self.round_losses) >= self.config.inner_steps:
                if clock is None:
                    break
                if meeting is None:
                    meeting = clock.agree()  # we are the first (or alone): call the meeting, train until it nears
                if dht_time() + self._step_seconds >= meeting - MATCHMAKING_LEAD:
                    break
            if self.in_flight.done():  # --overlap: apply the last round's average as soon as it is there
                self._settle_in_flight()
            step_started = time.perf_counter()
            with self._phases("inner"):
                if self.group is not None:
                    self.group.lead_step(self.trainer.model)
                self.round_losses.append(self.trainer.step())
            self._timed_step(time.perf_counter() - step_started)
            self.status.update(inner_step=self.trainer.steps, state="training")
            self.on_step(len(self.round_losses), self.config.inner_steps)
        if self.stop.is_set():
            return None
        if clock is None:
            return 0.0
        return meeting if meeting is not None else clock.agree()

    def _timed_step(self, seconds: float) -> None:
        """Keep an estimate of one inner step's duration; say once if it is too long for the round window."""
        self._step_seconds = seconds if self._step_seconds == 0.0 else 0.5 * (self._step_seconds + seconds)
        usable = self.config.schedule.window - MATCHMAKING_LEAD
        if self._step_seconds > usable and not self._warned_slow_step and self.session is not None:
            self._warned_slow_step = True
            logger.warning(
                "an inner step takes %.1fs, more than the %.1fs a round window leaves: slower partners will miss "
                "rounds; raise --round-window above %.0f",
                self._step_seconds,
                usable,
                self._step_seconds + MATCHMAKING_LEAD + 1,
            )

    def _contribution(self) -> tuple[list[torch.Tensor], RoundMeta]:
        """Our pseudo-gradient `theta - working`, and the metadata we declare to the group with it."""
        with self._phases("pseudo_gradient"):
            delta = self.shared.pseudo_gradient(self.trainer.model)
            if self.update_scale != 1.0:
                delta = [d * self.update_scale for d in delta]
        with self._phases("hash"):
            meta = RoundMeta(round=self.shared.round, hash=self.shared.hash(), steps=len(self.round_losses))
        return delta, meta

    def _average(self, meeting: float) -> AveragingResult:
        """Step 2 (blocking rounds): the round's one call to the network."""
        delta, meta = self._contribution()
        self.status.update(state="averaging")
        result = self.sync.averaging.average(delta, meeting, meta)
        for name, seconds in result.seconds.items():
            self._phases.add(name, seconds)
        return result

    def _apply(self, result: AveragingResult) -> None:
        """Step 3 (blocking rounds): the outer step; the working copy restarts from the new theta."""
        with self.sync.lock:
            self.shared.apply(result.averaged)
            self.shared.copy_into(self.trainer.model)
        self.round_losses.clear()

    def _launch(self, meeting: float, training_seconds: float) -> None:
        """--overlap: start this round's all-reduce in the background; training goes on from the working model."""
        delta, meta = self._contribution()
        losses = list(self.round_losses)
        self.round_losses.clear()
        averaging = self.sync.averaging
        with self.sync.lock:
            self.sync.in_flight = True
        self.in_flight.launch(lambda: averaging.average(delta, meeting, meta), delta, losses, training_seconds)
        averaging.publish_round(self.position)

    def _settle_in_flight(self) -> None:
        """--overlap: wait for the round in flight, apply its average keeping our newer progress, finish it. Its
        record closes the accounting period (`self._phases`) that overlapped it."""
        with self._phases("wait"):
            launched = self.in_flight.wait()
        if launched is None:
            return
        if isinstance(launched, Awaited):  # not our round: the swarm's, since we caught up
            self._take_awaited(launched)
            return
        result = launched.future.result()
        for name, seconds in result.seconds.items():  # these ran in the background, overlapping our compute
            self._phases.add("background_wait" if name == "wait" else name, seconds)
        with self._phases("outer_step"), self.sync.lock:
            self.shared.apply_keeping_progress(result.averaged, self.trainer.model, launched.delta)
            self.sync.in_flight = False
        self._finish(result, launched.losses, launched.training_seconds)
        self._phases = Phases()

    def _caught_up(self, download: Download) -> None:
        """We hold the swarm's state now (adopted, or ours already: `download.held`). If its servers had their next
        round in flight, the swarm meets next for the round after it: we await that round's outcome (the state it
        ends on) and meet with them, instead of meeting alone for a round they already averaged."""
        if download.in_flight:
            awaited, peers = download.state_id.round + 1, download.in_flight
            self.in_flight.await_state(lambda: self.sync.await_round(awaited, peers, self.stop), awaited)
            logger.info("the swarm has round %d in flight: taking its outcome once it settles", awaited)
        self.sync.averaging.publish_round(self.position)
        if not download.held:
            self._save()

    def _take_awaited(self, awaited: Awaited) -> None:
        """The swarm's round we awaited settled: adopt the state it ends on, keeping our progress since we caught up
        (our next round sends it). If it did not settle, we train on from the state we have (position back)."""
        download = awaited.future.result()
        if self.sync.adopt(download, awaited.round, keep_progress=True):
            logger.info("took the swarm's round %d (model %s)", awaited.round, self.shared.hash())
        else:
            logger.warning(
                "the swarm's round %d did not settle where we could download it: training on from round %d",
                awaited.round,
                self.shared.round,
            )
        self.sync.averaging.publish_round(self.position)

    def _record(
        self, result: AveragingResult, inner_steps: int, resynced: bool, training_seconds: float
    ) -> RoundMetrics:
        phases = self._phases
        record = RoundMetrics(
            round=self.shared.round,
            step=self.trainer.steps,
            inner_steps=inner_steps,
            loss=self.last_loss,
            group_size=result.group_size,
            bytes_sent=result.bytes_sent,
            bytes_received=result.bytes_received,
            round_seconds=round(time.monotonic() - phases.started, 3),
            time=time.time(),
            model_hash=self.shared.hash(),
            peer_id=self.sync.peer_id,
            partner=self.config.partner,
            compression=self.config.compression,
            failure=result.failure,
            resynced=resynced,
            refused={**result.dropped, **result.refused},
            clipped=result.clipped,
            update_norm=result.norm,
            seconds=phases.seconds,
            compute_seconds=phases.seconds.get("inner", 0.0),
            allreduce_seconds=phases.seconds.get("allreduce", 0.0),
            wait_seconds=phases.seconds.get("wait", 0.0),
        )
        self.metrics.write(record, training_seconds)
        return record

    def _save(self, periodic: bool = False) -> None:
        """Checkpoint now; `periodic` (after a round): only every --checkpoint-every rounds or minutes."""
        if self.checkpoints is None or not self.leader:
            return
        config = self.config
        if periodic:
            self._rounds_since_save += 1
            minutes = (time.monotonic() - self._saved_at) / 60
            due_by_rounds = config.checkpoint_rounds > 0 and self._rounds_since_save >= config.checkpoint_rounds
            due_by_time = config.checkpoint_minutes > 0 and minutes >= config.checkpoint_minutes
            if not (due_by_rounds or due_by_time):
                return
        self.checkpoints.save(self.round_losses)
        self._rounds_since_save, self._saved_at = 0, time.monotonic()

    # ---- joining ----

    def _join_swarm(self, stack: contextlib.ExitStack) -> None:
        """Start the session (DHT, status, averager); `stack` stops it when the run ends. Then catch up with the
        swarm, and wait for --min-peers trainers."""
        config = self.config
        options = SessionOptions(
            config.run_id,
            config.initial_peers,
            config.listen,
            config.announce,
            config.identity,
            consortium=self.consortium,
            consortium_file=config.consortium,
        )
        self.session = stack.enter_context(SwarmSession(options))
        self.sync.peer_id = self.session.peer_id
        logger.info("peer %s listening on %s", self.session.peer_id, " ".join(self.session.addresses()))
        self.metrics.status = self.session.publish_status(
            partner=config.partner,
            region=config.region,
            role="trainer",
            compression=config.compression,
            spec=self.spec_digest,
            round=self.shared.round,
            inner_step=self.trainer.steps,
        )
        self._check_specs()
        self.sync.averaging = self.session.averaging(
            [p.shape for p in self.shared.params],
            config.compression,
            self.sync.share_state,
            config.inner_steps,
            config.clip_multiple,
            self.spec_digest,
            self.fault,
            self.feedback,
        )
        self.sync.averaging.publish_round(self.shared.round)
        if config.initial_peers:
            self.status.update(state="loading state")
            outcome, download = self.sync.first_catch_up(self.stop, config.start_fresh)
            if download is not None:
                self._caught_up(download)
            elif outcome == "alone" and not self.session.others_online():
                logger.warning(
                    "nobody else is in run %r yet: training alone until partners join "
                    "(check --run-id if you expected a running swarm)",
                    config.run_id,
                )
        self.status.update(state="idle")
        self.session.wait_for_trainers(config.min_peers, self.stop, self.spec_digest)

    def _check_specs(self) -> None:
        """Keep our run spec published, and say once per peer when a trainer of our run trains another spec (it is
        never matched with us: the spec digest is part of the averager's schema)."""
        if self.session is None:
            return
        if time.monotonic() - self._spec_published >= SPEC_REPUBLISH:
            self.session.publish_spec(self.spec)
            self._spec_published = time.monotonic()
        for peer in self.session.peers():
            if peer.role != "trainer" or peer.state == "left" or peer.spec in ("", self.spec_digest):
                continue
            if peer.peer_id in self._spec_reported:
                continue
            self._spec_reported.add(peer.peer_id)
            theirs = self.session.read_spec(peer.spec)
            difference = first_difference(json.loads(self.spec), theirs) if theirs else "its spec is not readable"
            logger.warning(
                "partner %r (peer %s) trains run spec %s, we train %s (%s): it will not average with us; "
                "every partner must join with the same run.toml",
                peer.partner,
                peer.peer_id,
                peer.spec,
                self.spec_digest,
                difference,
            )
