"""A ROS 2 node that drives an omniwheel base with the served Mobile VLA policy.

    pip install ./client        # in the robot's Python (ROS 2 Humble: 3.10, Jazzy: 3.12); no torch
    python3 ros2_node.py --ros-args -p url:=http://policy-server:8000 -p token_file:=/etc/mobile-vla/token \
        -p instruction:="go to the red box" -r camera/image_raw:=/front_camera/image_raw
    ros2 topic pub --once instruction std_msgs/String "data: 'go to the blue ball'"   # a new episode

In:  `camera/image_raw` (sensor_msgs/Image, rgb8 or bgr8), `instruction` (std_msgs/String: starts a new
     episode), and `odom` (nav_msgs/Odometry) only when the model's state is the measured velocity.
Out: `cmd_vel` (geometry_msgs/Twist: linear.x, linear.y m/s and angular.z rad/s in the base frame,
     REP-103), at `control_hz`.

Chunk execution (`mobile_vla_client.ChunkRunner`): at every control tick the node publishes the
current chunk's action for this step while the next request (the newest frame, the step cursor and
the measured delay) is in flight, so a round trip longer than a tick does not stall the base; an answer
skips the actions the robot has overtaken meanwhile and blends into the new chunk over `blend_steps`.
Anything doubtful publishes a zero Twist (stop) instead of guessing: a frame older than
`max_frame_age_s`, a chunk used up with no new answer (no answer within the deadline, a refusal), a
confidence under `min_confidence`, or a server safety decision `stop`/`handover`. The robot id
defaults to the node's namespace (`/r17/...` -> `r17`); the token must cover it (docs/http_api.md,
Auth). Written against rclpy's Humble/Jazzy API; ROS is not installed where this repository is
tested, so the test suite only compiles this file (tests/test_ros2_example.py).
"""

from __future__ import annotations

import time

import numpy as np
import rclpy
from geometry_msgs.msg import Twist
from mobile_vla_client import ChunkRunner, Client
from nav_msgs.msg import Odometry
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import String


def frame_of(msg: Image) -> np.ndarray:
    """A sensor_msgs/Image (rgb8 or bgr8) -> uint8 [H, W, 3] RGB; rows may carry padding (`step`)."""
    if msg.encoding not in ("rgb8", "bgr8"):
        raise ValueError(f"camera encoding {msg.encoding!r}: rgb8 or bgr8 expected")
    rows = np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.step)
    pixels = rows[:, : msg.width * 3].reshape(msg.height, msg.width, 3)
    return pixels[:, :, ::-1] if msg.encoding == "bgr8" else pixels


class VlaDriver(Node):
    """Camera frames and an instruction in, velocity commands out, through the policy server."""

    def __init__(self) -> None:
        super().__init__("mobile_vla_driver")
        url = self.declare_parameter("url", "http://127.0.0.1:8000").value
        token_file = self.declare_parameter("token_file", "/etc/mobile-vla/token").value
        robot_id = self.declare_parameter("robot_id", self.get_namespace().strip("/").replace("/", "-") or "r-1").value
        instruction = self.declare_parameter("instruction", "").value
        control_hz = float(self.declare_parameter("control_hz", 5.0).value)  # the rate the model was trained at
        self.min_confidence = float(self.declare_parameter("min_confidence", 0.3).value)
        self.max_frame_age_s = float(self.declare_parameter("max_frame_age_s", 0.5).value)
        blend_steps = int(self.declare_parameter("blend_steps", 2).value)
        with open(token_file) as handle:
            token = handle.read().split()[0]
        # a request's whole budget, retries included: the chunk in hand covers the wait, up to half of it
        self.robot = Client(url, token, robot_id=robot_id, deadline_s=1.0 / control_hz, send_deadline=True)
        model = self.robot.model_info()  # what the served model wants as `state`, and how long it is
        self.state_input, self.state_dim = model.state_input, model.state_dim
        self.robot.deadline_s = max(1.0, model.chunk / 2) / control_hz
        self.runner = ChunkRunner(
            self.robot, self.timed_frame, self.state, self.publish, control_hz, blend_steps, self.min_confidence
        )
        self.get_logger().info(f"{robot_id}: model {model.name} v{model.version}, state = {self.state_input}")

        self.frame: np.ndarray | None = None
        self.frame_at = 0.0
        self.measured = (0.0, 0.0, 0.0)
        self.command = Twist()  # the last published command: the state `previous_command` models take
        self.cmd = self.create_publisher(Twist, "cmd_vel", 10)
        inputs = MutuallyExclusiveCallbackGroup()  # frames keep arriving while a step waits for its answer
        camera = "camera/image_raw"
        self.create_subscription(Image, camera, self.on_image, qos_profile_sensor_data, callback_group=inputs)
        self.create_subscription(String, "instruction", self.on_instruction, 10, callback_group=inputs)
        if self.state_input == "measured_velocity":
            self.create_subscription(Odometry, "odom", self.on_odometry, 10, callback_group=inputs)
        self.create_timer(1.0 / control_hz, self.step, callback_group=MutuallyExclusiveCallbackGroup())
        if instruction:
            self.robot.start_episode(instruction)

    def on_image(self, msg: Image) -> None:
        try:
            self.frame, self.frame_at = frame_of(msg), time.monotonic()
        except ValueError as exc:
            self.get_logger().error(str(exc), throttle_duration_sec=5.0)

    def on_instruction(self, msg: String) -> None:
        if msg.data.strip():
            episode = self.robot.start_episode(msg.data)  # a new episode: a fresh memory
            self.runner.reset()  # no chunk of the last episode, its answer in flight ignored
            self.get_logger().info(f"episode {episode}: {msg.data!r}")

    def on_odometry(self, msg: Odometry) -> None:
        twist = msg.twist.twist
        self.measured = (twist.linear.x, twist.linear.y, twist.angular.z)

    def state(self) -> list[float]:
        """What the model takes as state: the command executed last, the measured velocity, or zeros."""
        if self.state_input == "previous_command":
            values = [self.command.linear.x, self.command.linear.y, self.command.angular.z]
        elif self.state_input == "measured_velocity":
            values = list(self.measured)
        else:
            values = []
        return (values + [0.0] * self.state_dim)[: self.state_dim]

    def timed_frame(self) -> tuple[np.ndarray, float]:
        """The newest frame and its age in ms (part of the delay the request reports)."""
        return self.frame, (time.monotonic() - self.frame_at) * 1000

    def publish(self, linear_x: float, linear_y: float, angular_z: float) -> None:
        command = Twist()
        command.linear.x, command.linear.y, command.angular.z = linear_x, linear_y, angular_z
        self.cmd.publish(command)
        self.command = command

    def step(self) -> None:
        if self.robot.instruction is None or self.frame is None:
            return  # nothing to do yet
        if time.monotonic() - self.frame_at > self.max_frame_age_s:
            self.get_logger().warning("camera frame too old: stopping", throttle_duration_sec=2.0)
            self.publish(0.0, 0.0, 0.0)
            return
        errors = self.runner.errors
        self.runner.tick()  # the chunk's action for this step; the next request when none is in flight
        if self.runner.errors > errors:  # refused, or no answer within the deadline
            self.get_logger().warning(str(self.runner.last_error), throttle_duration_sec=2.0)

    def stop(self) -> None:
        self.cmd.publish(Twist())
        self.runner.close()
        self.robot.close()


def main() -> None:
    """Runs the node until Ctrl-C; the base gets a zero Twist on the way out."""
    rclpy.init()
    node = VlaDriver()
    executor = MultiThreadedExecutor(num_threads=2)
    executor.add_node(node)
    try:
        executor.spin()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
        node.destroy_node()
        if rclpy.ok():  # Ctrl-C may have shut the context down already
            rclpy.shutdown()


if __name__ == "__main__":
    main()
