"""TEST-ONLY: failover and hot-swap drills on the real Serve app, without mocking Ray Serve.

`compose_app(args, drill=DrillConfig(...))` deploys the primary as a drill replica: the production
replica body plus injected faults for robots whose id starts with a prefix, and a pause before each
new version loads (standing in for a TensorRT engine build). It is no app argument, so no Serve config
file can switch it on; tests and drill scripts pass it in code. Never use it in production.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from pydantic import Field

from mobile_vla.config import StrictModel
from mobile_vla.serve.deployments import POLICY_DEPLOYMENTS, OnnxReplica, TensorRTReplica, policy_deployment
from mobile_vla.serve.schemas import StepFailure, StepRequest, StepResult
from mobile_vla.serve.settings import ONNX, TENSORRT, PolicyUserConfig


class FaultConfig(StrictModel):
    """One injected fault. It hits only robots whose id starts with `robot_prefix`: an `error` fails
    only their steps (their batch-mates keep the primary's answer); a `slow` stall holds the whole
    batch the drill robot is in, so batch-mates are answered by the fallback after `primary_timeout_s`.
    """

    mode: Literal["error", "slow"]
    robot_prefix: str = Field(default="drill-", min_length=1)
    delay_s: float = Field(default=1.0, ge=0, le=60)


class DrillConfig(StrictModel):
    """What a drill does to the primary deployment (the fallback and the shadow stay production)."""

    primary_faults: list[FaultConfig] = Field(default_factory=list)
    primary_prepare_delay_s: float = Field(
        default=0.0, ge=0, le=600, description="the primary's pause before a new version, like an engine build"
    )

    def policy_config(self, production: PolicyUserConfig) -> DrillPolicyConfig:
        """The primary's user_config: the production one plus this drill."""
        return DrillPolicyConfig(
            **production.model_dump(), faults=self.primary_faults, prepare_delay_s=self.primary_prepare_delay_s
        )


class DrillPolicyConfig(PolicyUserConfig):
    """A drill replica's user_config."""

    faults: list[FaultConfig] = Field(default_factory=list)
    prepare_delay_s: float = Field(default=0.0, ge=0, le=600)


class DrillReplica:
    """Mixed in before a production replica body: injects the configured faults and pause."""

    CONFIG = DrillPolicyConfig

    def _prepare_version(self, config: DrillPolicyConfig) -> None:
        time.sleep(config.prepare_delay_s)
        super()._prepare_version(config)

    async def step_batch(self, requests: list[StepRequest]) -> list[StepResult | StepFailure]:
        failed: dict[int, StepFailure] = {}
        for fault in self._config.faults if self._config else ():
            hit = [i for i, r in enumerate(requests) if r.robot_id.startswith(fault.robot_prefix)]
            if hit and fault.mode == "slow":
                await asyncio.sleep(fault.delay_s)
            elif hit:
                error = StepFailure(f"injected fault for robots {fault.robot_prefix}* (drill)")
                failed.update((i, error) for i in hit)
        healthy = [r for i, r in enumerate(requests) if i not in failed]
        answers = iter(await super().step_batch(healthy) if healthy else [])
        return [failed[i] if i in failed else next(answers) for i in range(len(requests))]


class DrillTensorRTReplica(DrillReplica, TensorRTReplica):
    """TensorRT primary under a drill."""


class DrillOnnxReplica(DrillReplica, OnnxReplica):
    """ONNX primary under a drill."""


def drill_deployment(kind: str):
    """The drill replica of `kind`, deployed under the production deployment's name."""
    replica = {TENSORRT: DrillTensorRTReplica, ONNX: DrillOnnxReplica}[kind]
    return policy_deployment(replica, POLICY_DEPLOYMENTS[kind].name)
