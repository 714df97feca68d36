"""One partner's node: DiLoCo rounds over the swarm, from the parts `node.build` makes.

A round, as `Node.run_round` reads:
1. settle the round in flight if it is done (node.rounds), and catch up if the swarm is ahead (node.sync);
2. inner steps of AdamW on local data until the round's meeting is near (comm.matchmaking: the meeting our last
   round's group agreed on, or else the first partner with H steps calls it; a faster one keeps training until then,
   a slower one stops with fewer steps; one that missed it goes to it late and follows its group);
3. at the meeting, settle what is still in flight, then launch this round: our pseudo-gradient `theta - working`,
   declared and all-reduced with the round's agreed group in the background (comm.averaging) while the next round
   trains; a blocking round (`--no-overlap`) settles it at once;
4. settling applies the group's average with the outer Nesterov step, keeping the progress trained since the launch,
   or (left out of the group) takes the state the round ends on; then re-sync if parts were lost, checkpoint, and one
   metrics record.

The training thread never waits for the network except at a meeting whose previous round is still in flight: the
meeting time, the positions peers advertise and the peer table are read by background threads.

A node that joins a run already under way (or comes back to one) first downloads the swarm's shared state
(`StateSync.first_catch_up`). On stop (Ctrl-C, SIGTERM) the node settles the round in flight, checkpoints where it is,
mid-round included, and resumes from there. The network is the session (`session_class`, a seam for test subclasses
that inject faults: `testing.faults`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from tapestry_p2p.comm.averaging import AveragingConfig, AveragingResult, RoundMeta
from tapestry_p2p.comm.matchmaking import DECLARE_LEAD, MeetingClock, Pace
from tapestry_p2p.comm.statesync.client import Download
from tapestry_p2p.node.build import Parts, build_parts
from tapestry_p2p.node.config import NodeConfig
from tapestry_p2p.node.metrics import RoundMetrics, Summary, mean
from tapestry_p2p.node.rounds import Launched, RoundPipeline
from tapestry_p2p.node.session import SessionOptions, SwarmSession
from tapestry_p2p.node.spec_watch import SpecWatch
from tapestry_p2p.p2p.processes import train_below_the_network
from tapestry_p2p.telemetry.status import StatusPublisher

logger = logging.getLogger(__name__)


class Node:
    """A partner's training node. `run()` returns after max_rounds, or when `stop` is set."""

    session_class: type[SwarmSession] = SwarmSession

    def __init__(
        self,
        config: NodeConfig,
        on_round: Optional[Callable[[RoundMetrics], None]] = None,
        on_step: Optional[Callable[[int, int], None]] = None,
        parts: Optional[Parts] = None,
    ) -> None:
        self.config = config
        self.parts = parts or build_parts(config)
        self.shared, self.trainer, self.sync = self.parts.shared, self.parts.trainer, self.parts.sync
        self.checkpoints, self.metrics, self.feedback = self.parts.checkpoints, self.parts.metrics, self.parts.feedback
        self.group = self.parts.group
        self.on_round = on_round or (lambda record: None)
        self.on_step = on_step or (lambda done, target: None)  # inner steps done this round, and H
        self.stop = threading.Event()
        self.session: Optional[SwarmSession] = None
        self.rounds = RoundPipeline(self.sync, self.stop, self._finish)
        self.sync.on_adopt = self._adopted
        self.rounds_done = 0
        self.last_loss = float("nan")
        self.round_losses: list[float] = []  # inner-step losses of the round under way (kept across a stop/resume)
        self._step_seconds = 0.0  # how long one inner step takes (a running estimate)
        self._warned_slow_step = False
        self._rounds_since_save, self._saved_at = 0, time.monotonic()
        self._events: dict[str, Any] = {}  # protocol facts since the last record (a catch-up), for the next one
        self._attended: tuple[int, float] = (0, -math.inf)  # the last meeting we went to: (its round, its time)
        self._agreed: tuple[int, float] = (0, 0.0)  # the next meeting our last group agreed on: (its round, its time)
        self._swarm_ready: Optional[float] = None  # when the --min-peers trainers were ready (a fresh run's round 1)
        self.resumed = self.checkpoints is not None and self.checkpoints.exists()
        if self.checkpoints is not None and self.resumed:
            self.round_losses.extend(self.checkpoints.resume())

    @property
    def status(self) -> StatusPublisher:
        """Our status record: published once we joined the swarm, only kept up to date before (or when solo)."""
        return self.metrics.status

    @property
    def leader(self) -> bool:
        """Whether this process is the partner's swarm node (always, except ranks > 0 under torchrun)."""
        return self.group is None or self.group.ranks.leader

    # ---- the loop ----

    def run(self) -> Summary:
        """Join the swarm (unless solo), run rounds until --max-rounds or a stop, settle, checkpoint."""
        started = time.monotonic()
        if not self.leader:
            return self._follow(started)
        with contextlib.ExitStack() as stack:
            if self.group is not None:
                stack.callback(self.group.close)
                stack.callback(self._release_ranks)
            if not self.config.solo:
                self._join_swarm(stack)
                train_below_the_network()  # (the DHT and averager processes are running: they keep their priority)
            stack.callback(self.rounds.close)
            while not self.stop.is_set() and (
                self.config.max_rounds is None or self._rounds_started() < self.config.max_rounds
            ):
                if not self.run_round():
                    break
            self._settle_all()  # the last round launched, or the one in flight at a stop
            if self.stop.is_set() or self._rounds_since_save:
                self._save()  # stopped (mid-round, too), or rounds since the last periodic checkpoint: keep them
        seconds = time.monotonic() - started
        return Summary(self.rounds_done, self.shared.round, self.trainer.steps, self.last_loss, seconds)

    def run_round(self) -> bool:
        """One round (see the module docstring); its record goes to `on_round` when it settles. Returns False if told
        to stop."""
        if self.group is not None:
            self.group.working_model_reset()  # each round starts every rank from rank 0's working model
        self.rounds.settle_if_done()
        with self.rounds.phases("catch_up"):
            self._catch_up()
        round_no = self.rounds.position + 1
        training_started = time.monotonic()
        meeting = self._train_until_meeting(round_no)
        if meeting is None:
            logger.info("round %d abandoned: stopping", round_no)
            return False
        training_seconds = time.monotonic() - training_started
        self.rounds.settle(our_round_only=True)  # the meeting waits for our round still in flight
        if self.rounds.entry is not None or self.rounds.position + 1 != round_no:
            # we follow the swarm's outcome of a round we were left out of, and do not hold it yet (or we just took
            # another state): this meeting is not for our state; train on, our progress goes out with a later round
            logger.info("not meeting round %d: our shared model is not the one it is declared against", round_no)
            return True
        self._attended = (round_no, meeting)
        self._launch(meeting, training_seconds)
        if not self.config.overlap:
            self._settle_all(blocking=True)
        return True

    def _rounds_started(self) -> int:
        return self.rounds_done + self.rounds.launched

    def _settle_all(self, blocking: bool = False) -> None:
        """Settle until nothing is in flight (a round we were left out of is followed by the state it ends on)."""
        while self.rounds.entry is not None:
            self.rounds.settle(blocking=blocking)

    # ---- the steps of a round ----

    def _catch_up(self) -> None:
        """If the swarm has moved on (we were alone, away, or out of step), settle our round in flight (so that the
        state we download is the swarm's latest when we adopt it) and take the state a majority holds."""
        if self.session is None or not self.sync.peers_to_follow(self.rounds.position)[0]:
            return
        self._settle_all()
        download = self.sync.catch_up(self.rounds.position)
        if download is not None:
            self._caught_up(download)

    def _train_until_meeting(self, round_no: int) -> Optional[float]:
        """Train until the meeting is near (calling it ourselves once we have H steps); returns the meeting time (0
        when solo), or None if told to stop. The round's losses are in `self.round_losses` (not empty when we resumed
        mid-round)."""
        clock = None if self.session is None else self._meeting_clock(round_no)
        if clock is not None and self._swarm_ready is not None and self.shared.round == 0:
            clock.start(self._swarm_ready)  # a fresh run's first meeting, the same on every partner
            self._events["swarm_ready"] = self._swarm_ready
        self._swarm_ready = None
        intended: Optional[tuple] = None
        try:
            self.status.update(state="training")
            while not self.stop.is_set():
                if clock is not None and self._agreed[0] == round_no:
                    clock.agree(self._agreed[1])  # (our last group's members proposed it to each other)
                    self._agreed = (0, 0.0)
                if clock is not None and clock.meeting is not None and self.rounds.entry is None:
                    # declare as soon as we know the meeting and hold the state we declare against, and train on
                    intent = (clock.meeting, self.shared.round, self.shared.hash())
                    if intent != intended:
                        self.sync.averaging.intend(*intent)
                        intended = intent
                # a step that would end past the meeting's declarations is not started (a step may take seconds)
                if clock is not None and clock.should_stop_training(self._step_seconds):
                    meeting = clock.meeting
                    if meeting is not None:
                        return meeting
                if len(self.round_losses) >= self.config.inner_steps:
                    if clock is None:
                        return 0.0
                    # we are the first (or alone): call the meeting, train until it nears; not while our previous
                    # round is in flight (nobody could declare this one before holding that one's state); if the
                    # others met for this round while we were busy, go to their meeting late and follow its group
                    if clock.meeting is None and self.rounds.entry is None:
                        missed = clock.missed
                        if missed is not None:
                            logger.info("round %d: we missed its meeting; following the group that met", round_no)
                            return missed
                        clock.propose(first=self._rounds_started() == 0)
                self.rounds.settle_if_done()
                self._inner_step()
            return None
        finally:
            if clock is not None:
                clock.close()

    def _meeting_clock(self, round_no: int) -> MeetingClock:
        assert self.session is not None
        # peers of another run spec never average with us: they must not set our meeting times either
        prefix = f"{self.config.run_id}.{self.parts.spec_digest}"
        schedule, owner, averaging = self.config.schedule, self.session.owner, self.sync.averaging
        attended = self._attended[1] if self._attended[0] == round_no else -math.inf
        return MeetingClock(
            self.session.dht,
            prefix,
            round_no,
            schedule,
            owner,
            averaging.now,
            averaging.lead(),
            averaging.ahead(schedule.window),
            attended,
        )

    def _inner_step(self) -> None:
        started = time.perf_counter()
        with self.rounds.phases("inner"):
            if self.group is not None:
                self.group.lead_step(self.trainer.model)
            self.round_losses.append(self.trainer.step())
        self._timed_step(time.perf_counter() - started)
        self.status.update(inner_step=self.trainer.steps, state="training")
        self.on_step(len(self.round_losses), self.config.inner_steps)

    def _timed_step(self, seconds: float) -> None:
        """Keep an estimate of one inner step's duration; say once if it is too long for the round window."""
        self._step_seconds = seconds if self._step_seconds == 0.0 else 0.5 * (self._step_seconds + seconds)
        usable = self.config.schedule.window - DECLARE_LEAD
        if self._step_seconds > usable and not self._warned_slow_step and self.session is not None:
            self._warned_slow_step = True
            logger.warning(
                "an inner step takes %.1fs, more than the %.1fs a round window leaves: slower partners will miss "
                "rounds; raise --round-window above %.0f",
                self._step_seconds,
                usable,
                self._step_seconds + DECLARE_LEAD + 1,
            )

    def _contribution(self) -> tuple[list[torch.Tensor], RoundMeta]:
        """Our pseudo-gradient `theta - working`, and what we declare with it (the shared model it was computed
        against, and our inner steps)."""
        with self.rounds.phases("pseudo_gradient"):
            delta = self.shared.pseudo_gradient(self.trainer.model)
        with self.rounds.phases("hash"):
            meta = RoundMeta(self.shared.round, self.shared.hash(), len(self.round_losses), self._pace())
        return delta, meta

    def _pace(self) -> Pace:
        """When we can meet for the round after this one (our group agrees on it in the all-reduce: `Pace`): once our
        next H inner steps are done at the step time measured so far, and the round window after that."""
        averaging, train = self.sync.averaging, self.config.inner_steps * self._step_seconds
        window = self.config.schedule.window
        ahead, limit = averaging.ahead(window), 3 * window
        if self.config.overlap:  # (we train the next round while this one is averaged)
            return Pace(ready=averaging.now() + train, ahead=ahead, limit=limit)
        return Pace(after=train, ahead=ahead, limit=limit)

    def _launch(self, meeting: float, training_seconds: float) -> None:
        """Hand this round to the network (in the background); training goes on from the working model."""
        delta, meta = self._contribution()
        losses = list(self.round_losses)
        self.round_losses.clear()
        self.rounds.launch(meeting, delta, meta, losses, training_seconds)

    def _finish(self, result: AveragingResult, launched: Launched) -> None:
        """A round of ours settled: re-sync if it lost parts, checkpoint, write its record."""
        self.last_loss = mean(launched.losses)
        self.rounds_done += 1
        if result.next_meeting > 0.0:
            self._agreed = (result.group_round + 1, result.next_meeting)
        phases = self.rounds.phases
        if self.sync.out_of_step(result):
            self.status.update(state="loading state")
        with phases("resync"):
            resynced = self.sync.after_round(result)
            self.sync.averaging.publish_round(self.rounds.position)
        with phases("hash"):
            self.shared.hash()  # once per round (cached until theta changes): record, checkpoint, state server
        with phases("checkpoint"):
            self._save(periodic=True)
        self.on_round(self._record(result, launched, resynced))

    # ---- catching up and adopting ----

    def _caught_up(self, download: Download) -> None:
        """We hold the swarm's state now (adopted, or ours already: `download.held`). If its servers had their next
        round in flight, the swarm meets next for the round after it: we await that round's outcome (the state it ends
        on) and meet with them, instead of meeting alone for a round they already averaged."""
        if not download.held:
            self._events.update(caught_up_round=download.state_id.round, caught_up_from=len(download.servers))
        if download.in_flight:
            awaited = download.state_id.round + 1
            self.rounds.await_round(awaited, download.in_flight)
            logger.info("the swarm has round %d in flight: taking its outcome once it settles", awaited)
        self.sync.averaging.publish_round(self.rounds.position)
        if not download.held:
            self._save()

    def _adopted(self) -> None:
        """We took another peer's state: the round under way, the one in flight and what we owed belong to the model
        we left."""
        self.rounds.drop()
        self.round_losses.clear()
        if self.feedback is not None:
            self.feedback.reset()

    # ---- records and checkpoints ----

    def _record(self, result: AveragingResult, launched: Launched, resynced: bool) -> RoundMetrics:
        phases = self.rounds.phases
        events, self._events = self._events, {}
        record = RoundMetrics(
            round=launched.meta.round + 1,
            step=self.trainer.steps,
            inner_steps=len(launched.losses),
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
            group_id=result.group_id,
            members=list(result.members),
            attempt=result.attempt,
            left_out=result.left_out,
            meeting=result.meeting,
            next_meeting=result.next_meeting,
            lost_reducers=list(result.lost_reducers),
            recovered=list(result.recovered),
            agreed_lost=list(result.agreed_lost),
            unreported=list(result.unreported),
            refused=dict(result.refused),
            clipped=result.clipped,
            update_norm=result.norm,
            seconds=phases.seconds,
            compute_seconds=phases.seconds.get("inner", 0.0),
            allreduce_seconds=phases.seconds.get("allreduce", 0.0),
            wait_seconds=phases.seconds.get("wait", 0.0),
            **events,
        )
        self.metrics.write(record, launched.training_seconds)
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
        swarm, advertise our state, and wait for --min-peers trainers."""
        config = self.config
        options = SessionOptions(
            config.run_id,
            config.initial_peers,
            config.listen,
            config.announce,
            config.identity,
            consortium=self.parts.consortium,
            consortium_file=config.consortium,
        )
        self.session = session = stack.enter_context(self.session_class(options))
        logger.info("peer %s listening on %s", session.peer_id, " ".join(session.addresses()))
        self.metrics.status = session.publish_status(
            partner=config.partner,
            region=config.region,
            role="trainer",
            compression=config.compression,
            spec=self.parts.spec_digest,
            round=self.shared.round,
            inner_step=self.trainer.steps,
        )
        watch = SpecWatch(session, self.parts.spec, self.parts.spec_digest)
        watch.start()
        stack.callback(watch.stop)
        averaging = AveragingConfig(
            [p.shape for p in self.shared.params],
            config.compression,
            config.inner_steps,
            self.parts.spec_digest,
            config.clip_multiple,
        )
        self.sync.averaging = session.averaging(averaging, self.sync.share_state, self.feedback)
        if config.initial_peers:
            self.status.update(state="loading state")
            outcome, download = self.sync.first_catch_up(self.stop, config.start_fresh)
            if download is not None:
                self._caught_up(download)
            elif outcome == "alone" and not session.others_online():
                logger.warning(
                    "nobody else is in run %r yet: training alone until partners join "
                    "(check --run-id if you expected a running swarm)",
                    config.run_id,
                )
        self.sync.averaging.publish_round(self.rounds.position)  # from now on, we serve our state
        self.status.update(state="idle", ready=self.sync.averaging.now())
        self.status.publish_soon()
        self._swarm_ready = session.wait_for_trainers(config.min_peers, self.stop, self.parts.spec_digest)

    # ---- torchrun ranks ----

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
