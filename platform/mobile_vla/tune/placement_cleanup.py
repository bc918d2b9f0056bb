"""Freeing the workers of a trial that ended early.

ASHA stops a trial by ending its driver; the Train controller it owns dies with it, but the workers'
placement group outlives the controller. Ray Train's own cleaner finds such groups through the state
API, which needs the dashboard; on a cluster without one (`include_dashboard=False`, e.g. tests) the
CPUs stay reserved and later trials wait forever. So each trial's controller records its workers'
placement group in the GCS key-value store (`PlacementGroupRecorder`), and the sweep removes the groups
of trials that ended early once their controller is gone (`ReleaseEndedTrials`). Removing a group Ray
already removed is a no-op.
"""

from __future__ import annotations

import logging
import time

import ray
import ray._private.state
from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_list, _internal_kv_put
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune import Callback
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

log = logging.getLogger(__name__)

KV_NAMESPACE = "mobile_vla.tune"
END_WAIT_S = 30.0  # at the end of the sweep, how long to wait for a stopped trial's controller to die


def _kv_prefix(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}/{trial_id}/"


class PlacementGroupRecorder(WorkerGroupCallback):
    """A Ray Train callback (runs in the controller) recording each worker group's placement group.

    RunConfig.callbacks passes non-UserCallback entries straight to the controller: Ray's documented
    room for workarounds built on its internal callbacks.
    """

    def __init__(self, sweep_name: str, trial_id: str) -> None:
        self.sweep_name = sweep_name
        self.trial_id = trial_id

    def after_worker_group_start(self, worker_group) -> None:
        try:
            group = worker_group.get_worker_group_state().placement_group_handle.placement_group
            controller = ray.get_runtime_context().get_actor_id() or ""
            _internal_kv_put(
                _kv_prefix(self.sweep_name, self.trial_id) + group.id.hex(),
                controller.encode(),
                namespace=KV_NAMESPACE,
            )
        except Exception as exc:  # bookkeeping must never fail a training run
            log.warning("could not record the worker placement group of trial %s: %s", self.trial_id, exc)


def _actor_alive(actor_id: str) -> bool:
    info = ray._private.state.actors(actor_id=actor_id)  # the GCS actor table: no dashboard needed
    return bool(info) and info.get("State") != "DEAD"


def _recorded(sweep_name: str, trial_id: str) -> bool:
    return bool(_internal_kv_list(_kv_prefix(sweep_name, trial_id), namespace=KV_NAMESPACE))


def release_trial_resources(sweep_name: str, trial_id: str, wait_s: float = 0.0) -> list[str]:
    """Removes the recorded placement groups of a trial whose Train controller is dead; returns their ids
    (those whose controller still lives are left for the next call).
    """
    prefix = _kv_prefix(sweep_name, trial_id)
    removed = []
    deadline = time.monotonic() + wait_s
    for key in _internal_kv_list(prefix, namespace=KV_NAMESPACE):
        key = key.decode() if isinstance(key, bytes) else key
        controller = (_internal_kv_get(key, namespace=KV_NAMESPACE) or b"").decode()
        while controller and _actor_alive(controller) and time.monotonic() < deadline:
            time.sleep(0.5)
        if controller and _actor_alive(controller):
            continue
        group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(key[len(prefix) :])))
        if placement_group_table(group).get("state") not in (None, "REMOVED"):
            remove_placement_group(group)
            removed.append(group.id.hex())
        _internal_kv_del(key, namespace=KV_NAMESPACE)
    return removed


class ReleaseEndedTrials(Callback):
    """A Tune callback freeing the workers of trials that ended early (stopped by ASHA, or failed)."""

    def __init__(self, sweep_name: str) -> None:
        self.sweep_name = sweep_name
        self.pending: set[str] = set()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.pending.add(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.pending.add(trial.trial_id)

    def on_step_begin(self, iteration, trials, **info) -> None:
        for trial_id in list(self.pending):
            try:
                freed = release_trial_resources(self.sweep_name, trial_id)
            except Exception as exc:
                log.warning("could not free the workers of trial %s: %s", trial_id, exc)
                self.pending.discard(trial_id)
                continue
            if freed:
                log.info("trial %s ended early: freed its workers' placement group(s) %s", trial_id, freed)
            if not _recorded(self.sweep_name, trial_id):
                self.pending.discard(trial_id)

    def on_experiment_end(self, trials, **info) -> None:
        for trial_id in list(self.pending):
            release_trial_resources(self.sweep_name, trial_id, wait_s=END_WAIT_S)
