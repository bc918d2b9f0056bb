"""Split spec: which scenes may appear in which split, so held-out evaluation measures generalisation.

    spec = load_split_spec("my_splits.yaml", ["splits.val.fraction=0.2", "splits.train.fraction=0.5"])
    spec = default_split_spec()          # what `mobile-vla data generate` uses without --split-spec

A scene is drawn from two seeds: a *layout* seed (room size, textures, where the robot, target,
distractors and obstacles stand) and an *episode* seed (which colour x shape is the target, the
obstacle kinds, the instruction template, the heading jitter). Held-out splits differ from training
in exactly one factor:

| split | episode seeds | layouts | targets | templates | rendering |
|---|---|---|---|---|---|
| train | own range | training pool | training pairs | training | plain |
| val | own range | training pool | training pairs | training | plain |
| unseen_layout | own range | disjoint range | training pairs | training | plain |
| unseen_pair | own range | training pool | held-out pairs | training | plain |
| unseen_paraphrase | own range | training pool | training pairs | held-out | plain |
| visual_shift | own range | training pool | training pairs | training | MiniWorld domain randomisation |

Validation guarantees: episode seed ranges never overlap; a split's layout range either IS the
training pool or is disjoint from it; every colour and every shape appears in a training pair while
the held-out pairs never do (not even as distractors); held-out templates never make a training
sentence and both template kinds keep at least one training template.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from mobile_vla.config import StrictModel, apply_overrides, format_validation_error, read_yaml
from mobile_vla.errors import ConfigError
from mobile_vla.sim.instructions import AVOID_TEMPLATES, GOAL_TEMPLATES

# MiniWorld's colour names (miniworld.entity.COLOR_NAMES), written out so this module stays light.
MINIWORLD_COLOURS = ("blue", "green", "grey", "purple", "red", "yellow")
TARGET_SHAPES = ("box", "ball", "key")
OBSTACLE_KINDS = ("barrel", "cone")
TRAIN_SPLIT = "train"


class SeedRange(StrictModel):
    """Half-open range [start, stop) of integer seeds."""

    start: int = Field(ge=0)
    stop: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> SeedRange:
        if self.stop <= self.start:
            raise ValueError(f"stop ({self.stop}) must be greater than start ({self.start})")
        return self

    @property
    def size(self) -> int:
        return self.stop - self.start

    def overlaps(self, other: SeedRange) -> bool:
        return self.start < other.stop and other.start < self.stop

    def __contains__(self, seed: int) -> bool:
        return self.start <= seed < self.stop


class SplitConfig(StrictModel):
    """One split: its share of the episodes and what its scenes are drawn from."""

    fraction: float = Field(ge=0.0, le=1.0, description="share of --episodes given to this split")
    seeds: SeedRange = Field(description="episode seeds; never shared between splits")
    layouts: SeedRange = Field(description="layout seeds; the training pool or disjoint from it")
    targets: Literal["train_pairs", "held_out_pairs"] = "train_pairs"
    templates: Literal["train", "held_out"] = "train"
    domain_rand: bool = Field(False, description="MiniWorld domain randomisation (visual shift)")


def _split(fraction, seeds, layouts, **kwargs) -> SplitConfig:
    return SplitConfig(
        fraction=fraction,
        seeds=SeedRange(start=seeds[0], stop=seeds[1]),
        layouts=SeedRange(start=layouts[0], stop=layouts[1]),
        **kwargs,
    )


TRAIN_LAYOUTS = (0, 1_000)


def _default_splits() -> dict[str, SplitConfig]:
    return {
        "train": _split(0.6, (0, 1_000_000), TRAIN_LAYOUTS),
        "val": _split(0.1, (1_000_000, 1_100_000), TRAIN_LAYOUTS),
        "unseen_layout": _split(0.075, (2_000_000, 2_100_000), (1_000_000, 1_100_000)),
        "unseen_pair": _split(0.075, (3_000_000, 3_100_000), TRAIN_LAYOUTS, targets="held_out_pairs"),
        "unseen_paraphrase": _split(0.075, (4_000_000, 4_100_000), TRAIN_LAYOUTS, templates="held_out"),
        "visual_shift": _split(0.075, (5_000_000, 5_100_000), TRAIN_LAYOUTS, domain_rand=True),
    }


class SplitSpec(StrictModel):
    """What the generator may put in each split: colours, shapes, held-out pairs, seeds, templates."""

    colours: list[str] = Field(
        default_factory=lambda: ["red", "green", "blue", "yellow", "purple"],
        description="target/distractor colours (grey is left out: it vanishes against concrete)",
    )
    shapes: list[str] = Field(default_factory=lambda: list(TARGET_SHAPES))
    obstacle_kinds: list[str] = Field(default_factory=lambda: list(OBSTACLE_KINDS))
    held_out_pairs: list[tuple[str, str]] = Field(
        default_factory=lambda: [("red", "ball"), ("green", "key"), ("blue", "box")],
        description="(colour, shape) targets that never appear in training scenes",
    )
    held_out_templates: list[str] = Field(
        default_factory=lambda: ["head_over", "make_your_way", "keeping_away"],
        description="instruction template ids never used for training sentences",
    )
    splits: dict[str, SplitConfig] = Field(default_factory=_default_splits)

    @model_validator(mode="after")
    def _no_leaks(self) -> SplitSpec:
        self._check_vocabulary()
        self._check_pairs()
        self._check_templates()
        self._check_splits()
        return self

    # -- validation, each failure names the field and value ----------------------------------------
    def _check_vocabulary(self) -> None:
        for field, values, allowed in (
            ("colours", self.colours, MINIWORLD_COLOURS),
            ("shapes", self.shapes, TARGET_SHAPES),
            ("obstacle_kinds", self.obstacle_kinds, OBSTACLE_KINDS),
        ):
            if not values:
                raise ValueError(f"{field} is empty")
            for value in values:
                if value not in allowed:
                    raise ValueError(f"{field}: {value!r} is not one of {list(allowed)}")
            if len(set(values)) != len(values):
                raise ValueError(f"{field} = {values}: duplicate entries")

    def _check_pairs(self) -> None:
        for colour, shape in self.held_out_pairs:
            if colour not in self.colours or shape not in self.shapes:
                raise ValueError(f"held_out_pairs: ({colour!r}, {shape!r}) is not a colours x shapes pair")
        train = self.train_pairs()
        for colour in self.colours:
            if not any(c == colour for c, _ in train):
                raise ValueError(f"held_out_pairs: colour {colour!r} would never be seen in training")
        for shape in self.shapes:
            if not any(s == shape for _, s in train):
                raise ValueError(f"held_out_pairs: shape {shape!r} would never be seen in training")

    def _check_templates(self) -> None:
        for template_id in self.held_out_templates:
            if template_id not in GOAL_TEMPLATES and template_id not in AVOID_TEMPLATES:
                known = sorted(GOAL_TEMPLATES) + sorted(AVOID_TEMPLATES)
                raise ValueError(f"held_out_templates: {template_id!r} is not a template id ({known})")
        for kind in ("goal", "avoid"):
            if not self.template_ids("train", kind):
                raise ValueError(
                    f"held_out_templates = {self.held_out_templates}: no {kind} template left for training"
                )

    def _check_splits(self) -> None:
        if TRAIN_SPLIT not in self.splits:
            raise ValueError(f"splits: a {TRAIN_SPLIT!r} split is required (got {sorted(self.splits)})")
        train = self.splits[TRAIN_SPLIT]
        if train.targets != "train_pairs" or train.templates != "train" or train.domain_rand:
            raise ValueError("splits.train: must use targets=train_pairs, templates=train, domain_rand=false")
        total = sum(s.fraction for s in self.splits.values())
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"splits: fractions add up to {total:g}, expected 1")
        names = list(self.splits)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if self.splits[a].seeds.overlaps(self.splits[b].seeds):
                    raise ValueError(f"splits.{a}.seeds and splits.{b}.seeds overlap: episode seeds would leak")
        for name, split in self.splits.items():
            same_pool = split.layouts == train.layouts
            if not same_pool and split.layouts.overlaps(train.layouts):
                raise ValueError(
                    f"splits.{name}.layouts = [{split.layouts.start}, {split.layouts.stop}) partly overlaps "
                    f"the training pool [{train.layouts.start}, {train.layouts.stop}): use it or stay clear of it"
                )
            if split.targets == "held_out_pairs" and not self.held_out_pairs:
                raise ValueError(f"splits.{name}.targets = held_out_pairs but held_out_pairs is empty")
            if split.templates == "held_out":
                for kind in ("goal", "avoid"):
                    if not self.template_ids("held_out", kind):
                        raise ValueError(f"splits.{name}.templates = held_out but no {kind} template is held out")

    # -- queries used by scene sampling ------------------------------------------------------------
    def train_pairs(self) -> list[tuple[str, str]]:
        held = {tuple(p) for p in self.held_out_pairs}
        return [(c, s) for c in self.colours for s in self.shapes if (c, s) not in held]

    def target_pairs(self, split: str) -> list[tuple[str, str]]:
        if self.splits[split].targets == "held_out_pairs":
            return [tuple(p) for p in self.held_out_pairs]
        return self.train_pairs()

    def distractor_pairs(self, split: str) -> list[tuple[str, str]]:
        """Distractors come from training pairs everywhere: a held-out pair is only ever a target."""
        return self.train_pairs()

    def template_ids(self, which: Literal["train", "held_out"], kind: Literal["goal", "avoid"]) -> list[str]:
        ids = GOAL_TEMPLATES if kind == "goal" else AVOID_TEMPLATES
        held = set(self.held_out_templates)
        return [t for t in ids if (t in held) == (which == "held_out")]

    def is_held_out(self, split: str) -> bool:
        """True for splits that test generalisation (not train, not a same-distribution val)."""
        s, train = self.splits[split], self.splits[TRAIN_SPLIT]
        return s.layouts != train.layouts or s.targets != "train_pairs" or s.templates != "train" or s.domain_rand

    def allocate(self, episodes: int) -> dict[str, int]:
        """Episodes per split by largest remainder, in spec order for ties (deterministic)."""
        exact = {name: episodes * s.fraction for name, s in self.splits.items()}
        counts = {name: int(math.floor(v)) for name, v in exact.items()}
        left = episodes - sum(counts.values())
        order = sorted(exact, key=lambda n: -(exact[n] - counts[n]))
        for name in order[:left]:
            counts[name] += 1
        return counts


def default_split_spec() -> SplitSpec:
    """The built-in split spec (`mobile-vla data generate --show-split-spec` prints it)."""
    return SplitSpec()


def load_split_spec(path: str | Path | None = None, overrides: list[str] | None = None) -> SplitSpec:
    """YAML file (keys absent from it keep their defaults) or the defaults, plus dotted overrides."""
    if path is None:
        data, source = default_split_spec().model_dump(mode="json"), "default split spec"
    else:
        data, source = read_yaml(path), str(path)
    data = apply_overrides(data, overrides, source)
    try:
        return SplitSpec.model_validate(data)
    except ValidationError as exc:
        cross_field = [e for e in exc.errors() if not e["loc"]]
        if cross_field:  # whole-spec checks: the message names the fields, the input is the whole file
            raise ConfigError(
                "\n".join(f"{source}: {e['msg'].removeprefix('Value error, ')}" for e in cross_field)
            ) from None
        raise ConfigError(format_validation_error(exc, source, data)) from None


def split_spec_yaml(spec: SplitSpec) -> str:
    """The spec as a YAML file that `--split-spec` reads back."""
    import yaml

    header = "# Split spec. Use: mobile-vla data generate --out DIR --split-spec this_file.yaml\n"
    return header + yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
