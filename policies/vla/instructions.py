"""What the small VLA is told per task: several phrasings each, all seen in training (one drawn per
sample), the first used when nobody says otherwise (evaluation, a teacher for RPD)."""

from __future__ import annotations

from robodistill.errors import UserError

INSTRUCTIONS: dict[str, list[str]] = {
    "PushCube-v1": [
        "push the cube to the goal region",
        "slide the cube forward onto the target",
        "move the block into the red and white target by pushing it",
    ],
    "PickCube-v1": [
        "pick up the cube and move it to the goal position",
        "grasp the cube and lift it to the target",
        "lift the red block and bring it to the goal",
    ],
    "PullCube-v1": [
        "pull the cube back to the goal region",
        "drag the cube toward the robot onto the target",
        "pull the block backwards into the target area",
    ],
    "LiftPegUpright-v1": [
        "lift the peg and stand it upright",
        "pick up the lying peg and turn it upright",
        "set the peg upright on the table",
    ],
    "StackCube-v1": [
        "stack the red cube on top of the green cube",
        "put the red block onto the green block",
        "place the red cube on the green one",
    ],
}


def phrasings(task: str) -> list[str]:
    if task not in INSTRUCTIONS:
        raise UserError(f"no instructions for {task}; the small VLA knows {', '.join(INSTRUCTIONS)} "
                        f"(add phrasings to robodistill.policies.vla.instructions.INSTRUCTIONS)")
    return INSTRUCTIONS[task]
