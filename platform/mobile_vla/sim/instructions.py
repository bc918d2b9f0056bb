"""Instruction templates: how a generated scene is put into words.

An instruction names the target by colour and shape and, when obstacles stand beside the straight
path, says which side they are on, as the original recordings did ("1box_left" -> "... avoiding the
box on the left"). Every template has a stable id so a split spec can hold some out of training
(the `unseen_paraphrase` split) and the scene JSON records which one made each sentence.

    instruction = compose("go_to", "avoiding", target=("red", "box"), obstacles=[("barrel", "left")])
    # 'go to the red box avoiding the barrel on the left'
"""

from __future__ import annotations

from collections.abc import Sequence

# Goal clause: what to reach. {target} is "red box", "blue ball", ...
GOAL_TEMPLATES: dict[str, str] = {
    "go_to": "go to the {target}",
    "navigate_to": "navigate to the {target}",
    "drive_to": "drive to the {target}",
    "move_towards": "move towards the {target}",
    "find_and_stop": "find the {target} and stop next to it",
    "approach": "approach the {target}",
    "head_over": "head over to the {target}",
    "make_your_way": "make your way to the {target}",
}

# Avoid clause, appended when obstacles are present. {obstacles} is "the barrel on the left" or
# "the barrel on the left and the cone on the right".
AVOID_TEMPLATES: dict[str, str] = {
    "avoiding": "avoiding {obstacles}",
    "steering_clear": "steering clear of {obstacles}",
    "going_around": "going around {obstacles}",
    "keeping_away": "keeping away from {obstacles}",
}

ALL_TEMPLATE_IDS: tuple[str, ...] = tuple(GOAL_TEMPLATES) + tuple(AVOID_TEMPLATES)


def target_phrase(colour: str, shape: str) -> str:
    """("red", "box") -> 'red box'."""
    return f"{colour} {shape}"


def obstacles_phrase(obstacles: Sequence[tuple[str, str]]) -> str:
    """[("barrel", "left"), ("cone", "right")] -> 'the barrel on the left and the cone on the right'."""
    parts = [f"the {kind} on the {side}" for kind, side in obstacles]
    return " and ".join(parts)


def compose(
    goal_id: str,
    avoid_id: str | None,
    target: tuple[str, str],
    obstacles: Sequence[tuple[str, str]] = (),
) -> str:
    """The sentence for one scene; `avoid_id` is ignored when there are no obstacles."""
    sentence = GOAL_TEMPLATES[goal_id].format(target=target_phrase(*target))
    if obstacles and avoid_id is not None:
        sentence += " " + AVOID_TEMPLATES[avoid_id].format(obstacles=obstacles_phrase(obstacles))
    return sentence
