"""Chaos (issue 16), short: the real app (ONNX primary + ONNX fallback) under a 10-robot 10 Hz load,
the ingress, then the primary, then the fallback replica killed with SIGKILL, one at a time.

The driver is benchmarks/serve_chaos.py (the long run writes benchmarks/results/serve_chaos.json);
here each phase has a few seconds of load. Asserted: no robot ever gets another robot's answer
(signed robot_id and the action chunk precomputed in-process), and failures stay inside the outage
each kill causes: a call can only fail if it was in flight at the kill or sent before the new
replica answered (plus one call deadline), so the count is bounded by robots * (hz * (recovery_s +
2 * deadline_s) + 1), and after recovery every robot is served again.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mobile_vla.serve.memory_token import MemoryCodec
from tests.serve.conftest import deployed_app

pytestmark = pytest.mark.slow  # a Serve app deployed and three replicas restarted: minutes on 2 cores

ROOT = Path(__file__).resolve().parents[2]
APP = "mobile-vla-chaos"
ROBOTS, HZ, DEADLINE_S, PHASE_S = 10, 10.0, 1.0, 6.0


@pytest.fixture(scope="module")
def chaos():
    """benchmarks/serve_chaos.py as a module (it imports its sibling serve_load, as the script does)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.append(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("serve_chaos_benchmark", ROOT / "benchmarks" / "serve_chaos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_kill_each_replica_under_load_no_cross_talk_and_failures_only_during_the_outage(
    chaos, ray_cluster, serve_home, use_home
):
    with use_home(serve_home):
        fleet = chaos.make_fleet("models:/mobile-vla-policy@champion", ROBOTS)
    with deployed_app(APP, serve_home, chaos.app_args(str(serve_home / "tokens"))) as app:
        codec = MemoryCodec.from_file(serve_home / "serve" / "memory_secret")  # the app's keys (made at deploy)
        load = chaos.FleetLoad(app.url, app.token, fleet, codec, hz=HZ, deadline_s=DEADLINE_S)
        result = chaos.run_chaos(load, APP, app.url, PHASE_S)
    shown = ("phases", "kills", "chaos_failed_share", "mismatches", "max_own_error")
    print(json.dumps({"min_expected_gap": chaos.min_pairwise_gap(fleet), **{k: result[k] for k in shown}}, indent=1))

    answered = [o for o in load.outcomes if o.ok]
    assert len(answered) > ROBOTS * HZ * PHASE_S  # the load ran (more than one phase's worth answered)
    assert result["mismatches"] == 0, [p["mismatch_examples"] for p in result["phases"].values()]
    assert result["phases"]["calm"]["failed_share"] <= 0.01, result["phases"]["calm"]
    assert [k["deployment"] for k in result["kills"]] == [chaos.INGRESS, chaos.PRIMARY, chaos.FALLBACK]
    for kill in result["kills"]:
        phase = result["phases"][kill["phase"]]
        assert kill["new_pid"] != kill["killed_pid"]
        bound = ROBOTS * (HZ * (kill["recovery_s"] + 2 * DEADLINE_S) + 1)
        assert phase["failed"] <= bound, (kill, phase)
        outage = (kill["killed_at"] - DEADLINE_S, kill["recovered_at"] + DEADLINE_S)
        late = [
            o
            for o in load.outcomes
            if o.phase == kill["phase"] and not o.ok and not outage[0] <= o.sent_at <= outage[1]
        ]
        assert not late, (kill, late[:5])  # outside the outage window every call is answered
