"""`mobile_vla.client`: the robot-side HTTP client (see mobile_vla.serve.client)."""

from mobile_vla.serve.client import ActAnswer, ApiError, RobotClient, encode_jpeg

__all__ = ["ActAnswer", "ApiError", "RobotClient", "encode_jpeg"]
