"""Frozen configuration of the network and of its training run."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Shape of an HM-LSTM character language model.

    Attributes:
      vocab_size: number of token ids, including the unknown id 0.
      embed_dim: size of the character embedding fed to layer 1.
      num_units: hidden size of each layer, bottom first; its length is the
        number of layers.
      output_dim: size of the output embedding h_e before the softmax.
      top_boundary: whether the top layer has its own boundary detector.
        Public implementations read the paper differently here. Off (the
        default): the top layer has no z, so it only UPDATEs (when the layer
        below fired) or COPYs, and its boundary output is always 0. On: it
        computes z like every other layer and FLUSHes after a boundary.
      layer_norm: layer normalisation of the gate pre-activations (the paper's
        best results use it).
    """

    vocab_size: int
    embed_dim: int = 64
    num_units: tuple[int, ...] = (128, 128, 128)
    output_dim: int = 256
    top_boundary: bool = False
    layer_norm: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_units", tuple(int(n) for n in self.num_units))
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if not self.num_units or min(self.num_units) < 1:
            raise ValueError(f"num_units needs one positive size per layer, got {self.num_units}")

    @property
    def num_layers(self) -> int:
        return len(self.num_units)

    @property
    def num_detectors(self) -> int:
        """Layers with a boundary detector: all but the top one unless top_boundary."""
        return self.num_layers if self.top_boundary else self.num_layers - 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["num_units"] = list(self.num_units)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


BOUNDARY_UNITS = ("words", "phrases", "sentences")  # what --boundary-targets can teach a layer
# The most characters of look-ahead a model may take: the server holds that many undecided characters per
# stream and runs that many padding steps when a stream ends.
MAX_LOOKAHEAD = 16


def seed_error(seed: int) -> str | None:
    """Why ``seed`` cannot seed TensorFlow's and NumPy's generators (they take 0 to 2^32 - 1); None if it can."""
    return None if 0 <= seed < 2**32 else f"--seed must be 0 to {2**32 - 1:,}, got {seed}"


@dataclass(frozen=True)
class TrainConfig:
    """How one training run goes.

    Slope annealing follows the paper: a = min(slope_max, slope_start +
    slope_rate * epoch), set once per epoch on a variable the graph reads.
    """

    batch_size: int = 32
    seq_len: int = 100
    learning_rate: float = 2e-3
    clip_norm: float = 1.0
    epochs: int = 10
    max_steps: int | None = None
    max_minutes: float | None = None
    seed: int = 0
    val_fraction: float = 0.1
    slope_start: float = 1.0
    slope_rate: float = 0.04
    slope_max: float = 5.0
    checkpoint_every: int = 200
    eval_every: int | None = None
    slope_per_step: bool = False  # anneal continuously (fractional epochs) instead of once per epoch
    rate_targets: tuple[float, ...] = ()  # per boundary layer: wanted share of characters where z fires
    rate_penalty: float = 1.0  # loss += rate_penalty * sum_l (firing rate of l - target_l)^2
    entropy_target: float = 0.0  # weight of the self-supervised boundary targets: the model's own entropy peaks
    # Layer l's target is the entropy peaks among the highest peak_fractions[l] of the batch's peaks
    # (1.0: every peak). Empty: layer 1 alone, every peak.
    peak_fractions: tuple[float, ...] = ()
    peak_window: int = 0  # > 0: rank layer 1's peaks by height above the mean entropy of this many characters around
    # Per detector layer, bottom first: the unit whose starts it is taught from the delimiters the corpus had
    # ("words", "phrases", "sentences"), or "none" (left to the self-supervised targets). Empty or only "none":
    # no layer is.
    boundary_targets: tuple[str, ...] = ()
    boundary_weight: float = 1.0  # weight of the supervised boundary loss
    # Characters of look-ahead: the supervised detectors' output at step t is taught whether character t-K
    # started a unit, so each boundary is decided K characters after the unit's first (0: at once, causal).
    lookahead: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"sequence length must be at least 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1), got {self.val_fraction}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"--lr must be a positive number, got {self.learning_rate}")
        if seed_error(self.seed):
            raise ValueError(seed_error(self.seed))
        if not self.clip_norm > 0:
            raise ValueError(f"--clip must be a positive number, got {self.clip_norm}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be at least 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.max_steps}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"--minutes must be a positive number, got {self.max_minutes}")
        if not (math.isfinite(self.slope_max) and self.slope_max >= self.slope_start):
            raise ValueError(f"--slope-max must be at least the starting slope {self.slope_start:g} (the boundary "
                             f"detector's slope only grows), got {self.slope_max}")
        if not (math.isfinite(self.slope_rate) and self.slope_rate >= 0):
            raise ValueError(f"--slope-rate must be 0 or more (the slope only grows), got {self.slope_rate}")
        for flag, value in (("--rate-penalty", self.rate_penalty), ("--entropy-target", self.entropy_target)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{flag} is the weight of a loss term, 0 (off) or more, got {value}")
        if self.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")
        object.__setattr__(self, "rate_targets", tuple(float(r) for r in self.rate_targets))
        if any(not 0.0 <= r <= 1.0 for r in self.rate_targets):
            raise ValueError(f"rate targets are shares of characters in [0, 1], got {self.rate_targets}")
        object.__setattr__(self, "peak_fractions", tuple(float(r) for r in self.peak_fractions))
        if self.peak_window < 0:
            raise ValueError(f"--peak-window is a number of characters, at least 0, got {self.peak_window}")
        if any(not 0.0 < r <= 1.0 for r in self.peak_fractions):
            raise ValueError(f"peak fractions are shares of the entropy peaks in (0, 1], got {self.peak_fractions}")
        object.__setattr__(self, "boundary_targets", tuple(str(t) for t in self.boundary_targets))
        bad = [t for t in self.boundary_targets if t not in BOUNDARY_UNITS + ("none",)]
        if bad:
            raise ValueError(f"--boundary-targets takes, per layer, one of {', '.join(BOUNDARY_UNITS)} or none; "
                             f"got {', '.join(map(repr, bad))}")
        if all(t == "none" for t in self.boundary_targets):  # "none" alone: off (it turns a preset's off)
            object.__setattr__(self, "boundary_targets", ())
        if not (math.isfinite(self.boundary_weight) and self.boundary_weight > 0):
            raise ValueError(f"--boundary-weight is the weight of a loss term, more than 0, got {self.boundary_weight}")
        if not 0 <= self.lookahead <= min(MAX_LOOKAHEAD, self.seq_len - 1):
            raise ValueError(f"--lookahead is a number of characters from 0 to {min(MAX_LOOKAHEAD, self.seq_len - 1)} "
                             f"(at most {MAX_LOOKAHEAD}, and below --seq-len), got {self.lookahead}")

    def detector_problem(self, detectors: int) -> str | None:
        """What is wrong with the boundary settings for a model with ``detectors`` layers that have a detector
        (None: nothing)."""
        taught = self.supervised_layers
        if taught and taught[-1][0] >= detectors:
            return (f"--boundary-targets gives layer {taught[-1][0] + 1} a target, but the model has {detectors} "
                    "layer(s) with a boundary detector; give fewer (--top-boundary gives the top layer one)")
        if self.lookahead and len(taught) < detectors:
            return (f"--lookahead delays the boundaries taught from the delimiters, so every layer with a detector "
                    f"needs a unit in --boundary-targets (here {detectors}, e.g. "
                    f"{','.join(BOUNDARY_UNITS[:detectors])}); a layer that learns its own boundaries decides them "
                    "at once")
        return None

    @property
    def target_fractions(self) -> tuple[float, ...]:
        """Per layer with a self-supervised target: the share of entropy peaks it is taught."""
        if not self.entropy_target:
            return ()
        return self.peak_fractions or (1.0,)

    @property
    def supervised_layers(self) -> tuple[tuple[int, str], ...]:
        """(layer index from 0, unit) of each layer taught from the corpus's delimiters."""
        return tuple((l, u) for l, u in enumerate(self.boundary_targets) if u != "none")

    @property
    def start_aligned(self) -> int:
        """How many bottom layers are taught to fire on a unit's first character (the start alignment):
        those with a self-supervised or a supervised target; the layers above fire on its last (the paper's)."""
        return max(len(self.target_fractions), max((l + 1 for l, _ in self.supervised_layers), default=0))

    def boundary_learning(self, detectors: int) -> dict[str, str]:
        """How each layer with a detector learned its boundaries, by layer number (from 1): "supervised: word
        starts" (from the delimiters the text had), "self-supervised: entropy peaks", or "unsupervised" (the
        language-model loss alone, with the firing-rate penalty where set)."""
        taught = dict(self.supervised_layers)
        out = {}
        for l in range(detectors):
            if l in taught:
                out[str(l + 1)] = f"supervised: {taught[l][:-1]} starts"
            elif l < len(self.target_fractions):
                out[str(l + 1)] = "self-supervised: entropy peaks"
            else:
                out[str(l + 1)] = "unsupervised"
        return out

    def slope_at(self, epoch: float) -> float:
        return min(self.slope_max, self.slope_start + self.slope_rate * epoch)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rate_targets"] = list(self.rate_targets)
        d["peak_fractions"] = list(self.peak_fractions)
        d["boundary_targets"] = list(self.boundary_targets)
        return d


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
