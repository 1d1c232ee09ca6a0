"""Typed settings of TIP, read from `algorithm.tip` (a DictConfig or a plain dict)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from tip_verl.core.answer_gate import ANSWER_TEACHER_MODES
from tip_verl.core.selection import selection_rule_names

DIVERGENCE_NAMES = ("k1", "abs_k1", "k3")
MIX_NAMES = ("replace", "add", "teacher_only")
TEACHER_TRUST_NAMES = ("always", "checked", "verified")
# Keys that moved to another section: one threshold decides "correct" for teacher trust and the outcome split.
MOVED_KEYS = {"correct_threshold": "algorithm.tip.correct_threshold"}


@dataclass(frozen=True)
class TipConfig:
    """Settings of token-importance selection and of the hybrid OPD + GRPO advantage: verl's `algorithm.tip`.

    Each field's meaning, default and choices: the `algorithm.tip` table of docs/config.md (checked against
    this class by tests/test_config_docs.py).
    """

    rule: str = "soft_or"
    ratio: float = 0.5
    divergence: str = "k3"
    coef: float = 1.0
    mix: str = "replace"
    seed: int = 0
    entropy_quantile: float = 0.98
    divergence_quantile: float = 0.98
    quadrant_quantile: float = 0.5
    entropy_threshold: Optional[float] = None
    divergence_threshold: Optional[float] = None
    preselect: bool = False
    teacher_trust: str = "always"
    endorse_prob: float = 0.5
    correct_threshold: float = 0.0
    answer_teacher: str = "always"
    answer_marker: Optional[str] = None
    answer_tolerance: float = 0.1

    def __post_init__(self):
        _check_choice("rule", self.rule, selection_rule_names())  # live: rules registered later count
        _check_choice("divergence", self.divergence, DIVERGENCE_NAMES)
        _check_choice("mix", self.mix, MIX_NAMES)
        _check_choice("teacher_trust", self.teacher_trust, TEACHER_TRUST_NAMES)
        _check_choice("answer_teacher", self.answer_teacher, ANSWER_TEACHER_MODES)
        if self.answer_marker is not None and not (isinstance(self.answer_marker, str) and self.answer_marker):
            raise ValueError(f"algorithm.tip.answer_marker={self.answer_marker!r}: must be null or a non-empty string.")
        if self.answer_teacher != "always" and self.answer_marker is None:
            raise ValueError(
                f"algorithm.tip.answer_teacher={self.answer_teacher} gates the teacher on the answer, which starts "
                "after algorithm.tip.answer_marker: set it to the text that introduces the final answer (e.g. "
                "'####' or '\\boxed'), or answer_teacher=always."
            )
        if self.answer_teacher != "always" and self.mix == "teacher_only":
            raise ValueError(
                f"algorithm.tip.answer_teacher={self.answer_teacher} hands the answer tokens the teacher may not "
                "refute to the outcome (GRPO) advantage, which mix=teacher_only drops: set algorithm.tip.mix=replace "
                "or add."
            )
        if isinstance(self.endorse_prob, bool) or not (
            isinstance(self.endorse_prob, (int, float)) and 0.0 < self.endorse_prob <= 1.0
        ):
            raise ValueError(f"algorithm.tip.endorse_prob={self.endorse_prob!r}: must be in (0, 1], e.g. 0.5.")
        if isinstance(self.answer_tolerance, bool) or not (
            isinstance(self.answer_tolerance, (int, float)) and 0.0 <= self.answer_tolerance < 1.0
        ):
            raise ValueError(
                f"algorithm.tip.answer_tolerance={self.answer_tolerance!r}: must be in [0, 1), the share of accepted "
                "answers the teacher may refute before answer_teacher=confirm_on_record gates it, e.g. 0.1."
            )
        if isinstance(self.correct_threshold, bool) or not (
            isinstance(self.correct_threshold, (int, float)) and math.isfinite(self.correct_threshold)
        ):
            raise ValueError(f"algorithm.tip.correct_threshold={self.correct_threshold!r}: must be a finite number.")
        _check_fraction("ratio", self.ratio, "the share of each rollout's tokens that gets the teacher signal")
        _check_fraction("entropy_quantile", self.entropy_quantile, "the batch quantile entropy is clipped at")
        _check_fraction("divergence_quantile", self.divergence_quantile, "the batch quantile divergence is clipped at")
        _check_fraction("quadrant_quantile", self.quadrant_quantile, "the batch quantile splitting high/low")
        for name in ("entropy_threshold", "divergence_threshold"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value < math.inf):
                raise ValueError(
                    f"algorithm.tip.{name}={value!r}: must be null (use quadrant_quantile) "
                    "or a non-negative number of nats."
                )
        if not isinstance(self.coef, (int, float)) or not math.isfinite(self.coef):
            raise ValueError(f"algorithm.tip.coef={self.coef!r}: must be a finite number, e.g. 1.0.")
        if not isinstance(self.preselect, bool):
            raise ValueError(f"algorithm.tip.preselect={self.preselect!r}: must be true or false.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"algorithm.tip.seed={self.seed!r}: must be a non-negative integer.")

    @classmethod
    def from_any(cls, config: Any) -> "TipConfig":
        """Build from None, a TipConfig, a mapping of TIP keys, or a verl algorithm config holding `tip`."""
        if config is None or isinstance(config, cls):
            return config or cls()
        section = _as_plain_mapping(config, "algorithm.tip")
        if "tip" in section or "adv_estimator" in section:  # a whole verl `algorithm` section
            section = section.get("tip")
        return build_section(cls, section, "algorithm.tip")


def config_value(config: Any, dotted: str, default: Any = None) -> Any:
    """The value at `dotted` ("actor_rollout_ref.actor.strategy") of a nested config (DictConfig, dict, or an
    object with attributes), or `default` where any level is missing or None."""
    node = config
    for key in dotted.split("."):
        if node is None:
            return default
        getter = getattr(node, "get", None)
        node = getter(key, None) if getter is not None else getattr(node, key, None)
    return default if node is None else node


def build_section(cls: type, section: Any, name: str) -> Any:
    """Build dataclass `cls` from None, an instance, or a mapping (dict or DictConfig) of its fields.

    Unknown keys raise, naming the config section `name` and the valid keys.
    """
    if section is None or isinstance(section, cls):
        return section or cls()
    values = _as_plain_mapping(section, name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    moved = [f"{key} is now {MOVED_KEYS[key]}" for key in unknown if key in MOVED_KEYS]
    if moved:
        raise ValueError(f"In {name}: {'; '.join(moved)}.")
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in {name}; valid keys are {sorted(fields)}.")
    return cls(**values)


def _as_plain_mapping(config: Any, name: str) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            return dict(OmegaConf.to_container(config, resolve=True))
    except ImportError:  # omegaconf is optional for the pure core
        pass
    if dataclasses.is_dataclass(config):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"{name} must be a mapping (dict or DictConfig), got {type(config).__name__}.")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"algorithm.tip.{name}={value!r} is not known; set one of {list(choices)}.")


def _check_fraction(name: str, value: Any, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
        raise ValueError(f"algorithm.tip.{name}={value!r} must be in (0, 1]: it is {meaning}.")
