"""`ExactAverager`: hivemind's DecentralizedAverager running our bit-exact runner, serving our shared state.

It glues three things onto hivemind's averager (matchmaking, timeouts and load balancing stay hivemind's):
- each all-reduce runs `ExactAllReduceRunner` (`allreduce.py`) and reports an `AllReduceOutcome` (traffic, lost
  spans, lost senders) instead of hivemind's bare gathered metadata;
- the shared state is served and downloaded in slices (`statesync/transport.py`, mixed in);
- a failure inside our overrides is a bug, not a network event: it is logged here with its traceback and reaches the
  node as `AveragingBug`, so the round is reported as failed rather than as "no group" (hivemind would wrap it in a
  MatchmakingException like any network failure).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import AllreduceException
from hivemind.utils.asyncio import as_aiter, azip

from tapestry_p2p.comm.allreduce import NETWORK_FAILURES, ExactAllReduceRunner, Traffic, zero_spans
from tapestry_p2p.comm.statesync.transport import StateTransport
from tapestry_p2p.p2p import hivemind_compat
from tapestry_p2p.p2p.processes import keeping_sigint_handler

logger = logging.getLogger(__name__)

# `fault(event, allreduce_index)`, called in the averager process at "served" (after serving one averaged part to a
# groupmate) and "finished" (after our tensors hold the average, before the outcome is accounted); tests arm it
# (tapestry_p2p.testing.faults), production passes None.
FaultHook = Callable[[str, int], None]


class AveragingBug(hivemind_compat.ReportedFailure, AllreduceException):
    """An exception inside tapestry's all-reduce overrides; already logged with its traceback in the averager process.

    An AllreduceException, so hivemind ends the step with it (instead of leaving the task's exception unretrieved)."""


@dataclass
class AllReduceOutcome:
    """What one all-reduce returns to the training process (pickled across the averager's process boundary)."""

    gathered: dict[str, Any]  # peer id (base58) -> the metadata that peer passed as `gather` (untrusted)
    traffic: Traffic
    failed_fraction: float = 0.0  # share of values whose reducer failed (those values get no update this round)
    senders_lost: int = 0  # groupmates whose parts never reached us as a reducer (our span averages the others')


class ExactAverager(StateTransport, DecentralizedAverager):
    """DecentralizedAverager with ExactAllReduceRunner, per-round outcomes and a pluggable shared state.

    :param state_fn: called in the host process when a peer downloads our state; returns `(metadata, tensors)`.
      None disables state sharing.
    :param fault: a test hook (see FaultHook); None in production.
    Other arguments are DecentralizedAverager's.
    """

    def __init__(
        self,
        *args: Any,
        state_fn: Optional[Callable[[], tuple[Any, Sequence[torch.Tensor]]]] = None,
        fault: Optional[FaultHook] = None,
        **kwargs: Any,
    ) -> None:
        self._state_fn = state_fn
        self._fault = fault
        self._allreduces = 0
        self._outcome = AllReduceOutcome({}, Traffic())
        self._bug: Optional[AveragingBug] = None
        super().__init__(*args, allow_state_sharing=state_fn is not None, **kwargs)

    def run_in_background(self, await_ready: bool = True, timeout: Optional[float] = None) -> None:
        keeping_sigint_handler(lambda: super(ExactAverager, self).run_in_background(await_ready, timeout))

    def run(self) -> None:
        hivemind_compat.install("averager")
        super().run()

    def get_current_state(self) -> tuple[Any, Sequence[torch.Tensor], None]:
        if self._state_fn is None:
            raise RuntimeError("state sharing is off for this averager")
        metadata, tensors = self._state_fn()
        return metadata, tensors, None

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any) -> Any:
        self._bug = None
        try:
            gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        except MatchmakingException:
            if self._bug is not None:  # hivemind wrapped our bug like a network failure: unwrap it
                raise self._bug from None
            raise
        self._outcome.gathered = {peer.to_base58(): data for peer, data in gathered.items()}
        return self._outcome

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: Optional[bytes] = None, **kwargs: Any
    ) -> None:
        self._allreduces += 1
        try:
            await self._exact_allreduce(tensors, group_info, group_id, **kwargs)
        except NETWORK_FAILURES:
            raise
        except Exception as e:
            logger.exception(
                "all-reduce #%d failed inside tapestry's overrides (a bug, not the network)", self._allreduces
            )
            self._bug = AveragingBug(f"internal error in the all-reduce: {type(e).__name__}: {e}")
            raise self._bug from e

    async def _exact_allreduce(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: Optional[bytes], **kwargs: Any
    ) -> None:
        index, fault = self._allreduces, self._fault
        group_id = group_info.group_id if group_id is None else group_id
        runner = ExactAllReduceRunner(
            after_part_served=None if fault is None else lambda: fault("served", index),
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        self._outcome = AllReduceOutcome({}, runner.traffic)
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            raise ValueError("tapestry peers always contribute to the average; auxiliary mode is not supported")
        async for tensor, averaged in azip(as_aiter(*tensors), runner):
            tensor.copy_(averaged)
        try:  # senders that never show up are banned by hivemind after sender_timeout; don't wait longer than that
            await asyncio.wait_for(runner.all_served.wait(), timeout=runner.sender_timeout)
        except TimeoutError:
            logger.debug("some groupmates were not served their averaged parts in time")
        if fault is not None:
            fault("finished", index)
        # A reducer that failed may have sent part of its span to some members and not to others; nobody uses any of
        # it, so all survivors end the round with the same values.
        zeroed = zero_spans(tensors, runner.failed_spans())
        self._outcome.failed_fraction = zeroed / max(runner.tensor_part_container.total_size, 1)
        failed_after = runner.tensor_part_reducer.sender_failed_after
        self._outcome.senders_lost = sum(after != float("inf") for after in failed_after)
