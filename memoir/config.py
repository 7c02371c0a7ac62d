"""MemoirConfig: every knob of the method, validated, with YAML/JSON round-trip and presets."""
from __future__ import annotations

import dataclasses
import json
import pathlib
from dataclasses import dataclass, field

import yaml

from memoir.tophash import AGGREGATIONS

# The paper's LLaMA-3-8B setting: k = 4096 of D = 14336 features, layer 27 of 32.
PAPER_K_RATIO = 4096 / 14336
PAPER_LAYER_FRACTION = 27 / 32

PRESET_DIR = pathlib.Path(__file__).resolve().parent / "presets"

FEATURE_SCALINGS = ("none", "std")
DECAY_SCOPES = ("all", "active", "none")
PROTECTION_MODES = ("absolute", "relative")
ROUTERS = ("mask", "subject")


def read_mapping(path) -> dict:
    """The mapping stored in a YAML or JSON file (by suffix), with clear errors otherwise."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields")
    return data


class DictFields:
    """``to_dict`` / ``from_dict`` for config dataclasses; unknown keys are an error, not ignored."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass
class MemoirConfig(DictFields):
    """Hyper-parameters of one MEMOIR memory.

    Defaults follow the reference code (hparams/MEMOIR/llama3-8b.yaml); ``None`` means
    "derive from the model": ``layer`` from depth, ``top_k`` from the paper's k/D ratio.
    Departures from the reference are separate options whose defaults keep the reference.
    """

    layer: int | None = None
    top_k: int | None = None
    threshold: float | str = 0.4  # or "auto": calibrated against background texts (see editor)
    aggregation: str = "mean_decentered"
    n_iter: int = 30
    lr: float = 1.0
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    early_stop: bool = True
    early_stop_loss: float = 0.02
    early_stop_delta: float = 1e-4
    num_context_templates: int = 10
    seed: int = 0
    full_forward: bool = False
    # --- departures from the reference (documented in docs/results.md "Method options") ---
    feature_scaling: str = "none"  # "std": divide the de-centred feature by the background std
    decay_scope: str = "all"  # "all" = SGD weight decay on the whole memory (reference)
    # > 0: a column already owned by u earlier edits gets its gradient scaled by 1 / (1 + p*u),
    # so a new edit prefers its fresh columns and overwrites less of the old ones.
    column_protection: float = 0.0
    # "absolute": the scale above (old edits win more and more: at N = 732 with k/D = 0.15 every
    # column has ~110 owners and new edits no longer converge); "relative": divided by its mean over
    # the edit's own columns, so only the preference for less-used columns remains, not the shrinking step.
    column_protection_mode: str = "absolute"
    # > 0: each edit's gradient is projected so that the keys of the m earlier edits it would
    # move most keep their memory output exactly (memoir/preserve.py); 0 = off (reference).
    preserve_neighbours: int = 0
    # Only earlier edits whose stored mask shares at least this fraction of the new mask's k columns
    # are candidates (0 = any shared column).  Conflicting edits (same subject) share 50-80 %,
    # unrelated ones ~22 % on SmolLM2: gating keeps the projection for real conflicts only.
    preserve_min_overlap: float = 0.0
    # At most this fraction of the k columns' dimensions may be protected (1.0 = no cap): the most
    # aligned conflicting edits are kept while their keys span <= max_rank * k directions.
    preserve_max_rank: float = 1.0
    # > 0: also protect the principal directions of *all* earlier edits' keys inside the new edit's
    # columns (each edit weighted by the share of its key there), until this fraction of their energy
    # or the rank budget left by the exact neighbours is used (memoir/preserve.py); 0 = off.
    preserve_energy: float = 0.0
    # ... but only once the bank holds at least this many earlier edits: while the bank is small the
    # gated neighbours already cover the conflicts and the extra projection only costs generalisation.
    preserve_energy_after: int = 0
    # threshold "auto": tau = the best overlap any background text reaches against the bank, plus this.
    threshold_margin: float = 0.02
    # Router.  "mask" (reference): the stored edit with the largest mask overlap, if >= threshold.
    # "subject": only edits whose subject the query mentions are eligible (hidden-state subject keys
    # at layer subject_layer, cosine >= subject_threshold; memoir/subject_router.py); among them the
    # largest mask overlap wins, whatever its value.
    router: str = "mask"
    subject_layer: int = 4
    subject_threshold: float = 0.95
    extra: dict = field(default_factory=dict)  # free-form notes carried with a preset

    def __post_init__(self):
        def bad(name, value, why):
            raise ValueError(f"MemoirConfig.{name}={value!r}: {why}")

        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            bad("layer", self.layer, "must be a non-negative layer index or None")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            bad("top_k", self.top_k, "must be a positive integer or None")
        if self.threshold != "auto":
            try:
                tau = float(self.threshold)
            except (TypeError, ValueError):
                tau = float("nan")
            if not 0.0 <= tau <= 1.0:
                bad("threshold", self.threshold, "tau must lie in [0, 1] or be 'auto'")
            self.threshold = tau
        if self.router not in ROUTERS:
            bad("router", self.router, f"must be one of {ROUTERS}")
        if not isinstance(self.subject_layer, int) or self.subject_layer < 1:
            bad("subject_layer", self.subject_layer, "must be a positive layer count")
        if not -1.0 <= float(self.subject_threshold) <= 1.0:
            bad("subject_threshold", self.subject_threshold, "a cosine threshold must lie in [-1, 1]")
        if not 0.0 < float(self.preserve_max_rank) <= 1.0:
            bad("preserve_max_rank", self.preserve_max_rank, "must lie in (0, 1]")
        if not 0.0 <= float(self.preserve_energy) < 1.0:
            bad("preserve_energy", self.preserve_energy, "must lie in [0, 1)")
        if not isinstance(self.preserve_energy_after, int) or self.preserve_energy_after < 0:
            bad("preserve_energy_after", self.preserve_energy_after, "must be a non-negative integer")
        if not 0.0 <= float(self.preserve_min_overlap) <= 1.0:
            bad("preserve_min_overlap", self.preserve_min_overlap, "must lie in [0, 1]")
        if not 0.0 <= float(self.threshold_margin) <= 1.0:
            bad("threshold_margin", self.threshold_margin, "must lie in [0, 1]")
        if self.aggregation not in AGGREGATIONS:
            bad("aggregation", self.aggregation, f"must be one of {AGGREGATIONS}")
        if not isinstance(self.n_iter, int) or self.n_iter < 0:
            bad("n_iter", self.n_iter, "must be a non-negative integer")
        for name in ("lr", "weight_decay", "grad_clip", "early_stop_loss", "early_stop_delta", "column_protection"):
            if float(getattr(self, name)) < 0:
                bad(name, getattr(self, name), "must be >= 0")
        if self.lr == 0:
            bad("lr", self.lr, "must be > 0")
        if not isinstance(self.num_context_templates, int) or not 0 <= self.num_context_templates <= 10:
            bad("num_context_templates", self.num_context_templates, "must be an integer in [0, 10]")
        if not isinstance(self.preserve_neighbours, int) or self.preserve_neighbours < 0:
            bad("preserve_neighbours", self.preserve_neighbours, "must be a non-negative integer")
        if self.feature_scaling not in FEATURE_SCALINGS:
            bad("feature_scaling", self.feature_scaling, f"must be one of {FEATURE_SCALINGS}")
        if self.column_protection_mode not in PROTECTION_MODES:
            bad("column_protection_mode", self.column_protection_mode, f"must be one of {PROTECTION_MODES}")
        if self.decay_scope not in DECAY_SCOPES:
            bad("decay_scope", self.decay_scope, f"must be one of {DECAY_SCOPES}")

    # ------------------------------------------------------------------ derived values
    def resolve(self, num_layers: int, input_dim: int) -> "MemoirConfig":
        """A copy with ``layer`` and ``top_k`` filled in for a model; checks they fit."""
        layer = self.layer if self.layer is not None else default_layer(num_layers)
        top_k = self.top_k if self.top_k is not None else default_top_k(input_dim)
        if layer >= num_layers:
            raise ValueError(f"MemoirConfig.layer={layer}: the model has only {num_layers} layers")
        if top_k > input_dim:
            raise ValueError(f"MemoirConfig.top_k={top_k}: k > D, the layer input has only {input_dim} features")
        return dataclasses.replace(self, layer=layer, top_k=top_k)

    # ------------------------------------------------------------------ serialisation
    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    def save(self, path) -> None:
        path = pathlib.Path(path)
        text = self.to_json() if path.suffix == ".json" else self.to_yaml()
        path.write_text(text)

    @classmethod
    def load(cls, path) -> "MemoirConfig":
        return cls.from_dict(read_mapping(path))

    @classmethod
    def preset(cls, name: str) -> "MemoirConfig":
        """A shipped preset, e.g. ``"smollm2"`` (tuned) or ``"reference"`` (the paper's defaults)."""
        if name == "reference":
            return cls()
        path = PRESET_DIR / f"{name}.yaml"
        if not path.exists():
            available = sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) + ["reference"]
            raise ValueError(f"no preset {name!r}; available: {', '.join(available)}")
        return cls.load(path)


def default_layer(num_layers: int) -> int:
    """The paper's depth fraction (layer 27 of 32) applied to this model's depth."""
    return min(num_layers - 1, max(0, round(num_layers * PAPER_LAYER_FRACTION)))


def default_top_k(input_dim: int) -> int:
    return max(1, round(input_dim * PAPER_K_RATIO))
