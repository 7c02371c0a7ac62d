"""MemoirConfig: every knob of the method, validated, with YAML/JSON round-trip and presets."""
from __future__ import annotations

import dataclasses
import json
import math
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
CONFLICT_POLICIES = ("supersede", "keep")
UNCONVERGED_POLICIES = ("keep", "rollback")
MEMORY_LAYOUTS = ("shared", "private")


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
    def from_dict(cls, data: dict, source: str | None = None):
        """Fields from a mapping (e.g. a YAML file named ``source``): unknown keys are refused, values
        checked against each field's type and range, with the file, field and value in the error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        where = f"{source}: " if source else ""
        if unknown:
            raise ValueError(f"{where}unknown {cls.__name__} field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{where}{err}") from None


def option(default=dataclasses.MISSING, *, help: str, kind: type, choices: tuple = (), low=None, high=None,
           low_open: bool = False, high_open: bool = False, optional: bool = False, factory=None):
    """A config field with its type, range and help text in the field metadata (as peft's configs do).

    ``kind`` is the value type (``int``, ``float``, ``bool``, ``str``, ``dict``); ``low`` / ``high``
    bound numbers (``*_open``: the bound itself is excluded); ``optional``: ``None`` is allowed.
    """
    meta = {"help": help, "kind": kind, "choices": tuple(choices), "low": low, "high": high,
            "low_open": low_open, "high_open": high_open, "optional": optional}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def check_value(cls_name: str, f: dataclasses.Field, value):
    """``value`` of field ``f`` checked (and a numeric string read as a number): ``ValueError`` otherwise."""
    m = f.metadata

    def bad(why):
        raise ValueError(f"{cls_name}.{f.name}={value!r}: {why}")

    if value is None:
        if m["optional"]:
            return None
        bad("must be set (None is not allowed)")
    kind = m["kind"]
    if kind is bool:
        if not isinstance(value, bool):
            bad("must be true or false" + (" (a string is not a boolean)" if isinstance(value, str) else ""))
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            bad("must be an integer")
    elif kind is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                bad("must be a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad("must be a number")
        value = float(value)
        if not math.isfinite(value):
            bad("must be finite")
    elif kind is str:
        if not isinstance(value, str):
            bad("must be a string")
    elif kind is dict:
        if not isinstance(value, dict):
            bad("must be a mapping")
    if m["choices"] and value not in m["choices"]:
        bad(f"must be one of {m['choices']}")
    low, high = m["low"], m["high"]
    if low is not None and (value < low or (m["low_open"] and value == low)):
        bad(f"must be {'>' if m['low_open'] else '>='} {low}")
    if high is not None and (value > high or (m["high_open"] and value == high)):
        bad(f"must be {'<' if m['high_open'] else '<='} {high}")
    return value


def check_fields(obj) -> None:
    """Check (and normalise) every field of a dataclass built with :func:`option`."""
    for f in dataclasses.fields(obj):
        if "kind" in f.metadata:
            setattr(obj, f.name, check_value(type(obj).__name__, f, getattr(obj, f.name)))


def range_text(f: dataclasses.Field) -> str:
    """The allowed values of a field, for help texts and the README table."""
    m = f.metadata
    if m["choices"]:
        text = " / ".join(f"`{c}`" for c in m["choices"])
    elif m["kind"] is bool:
        text = "`true` / `false`"
    elif m["low"] is not None or m["high"] is not None:
        lo = "" if m["low"] is None else f"{'(' if m['low_open'] else '['}{m['low']}"
        hi = "" if m["high"] is None else f"{m['high']}{')' if m['high_open'] else ']'}"
        if lo and hi:
            text = f"{lo}, {hi}"
        elif lo:
            text = f"{'>' if m['low_open'] else '>='} {m['low']}"
        else:
            text = f"{'<' if m['high_open'] else '<='} {m['high']}"
        text = f"{m['kind'].__name__} {text}"
    else:
        text = m["kind"].__name__
    return text + (", or none" if m["optional"] else "")


@dataclass
class MemoirConfig(DictFields):
    """Hyper-parameters of one MEMOIR memory.

    Defaults follow the reference code (hparams/MEMOIR/llama3-8b.yaml); ``None`` means
    "derive from the model": ``layer`` from depth, ``top_k`` from the paper's k/D ratio.
    Departures from the reference are separate options whose defaults keep the reference
    (docs/results.md "Method options" has what each one measured).  Each field's type, range and
    help live in its metadata: :func:`markdown_table` and the CLI help are generated from them.
    """

    layer: int | None = option(None, kind=int, low=0, optional=True,
                               help="decoder layer whose FFN output projection gets the memory (none: 27/32 of the depth)")
    top_k: int | None = option(None, kind=int, low=1, optional=True,
                               help="columns per edit, k of the layer's D inputs (none: the paper's k/D = 4096/14336)")
    threshold: float = option(0.4, kind=float, low=0.0, high=1.0,
                              help="tau: a stored edit is switched on when its mask overlap with the query reaches it")
    threshold_mode: str = option("fixed", kind=str, choices=("fixed", "auto"),
                                 help="`auto`: after each edit, tau = best overlap of background texts with the "
                                      "bank + threshold_margin")
    threshold_margin: float = option(0.02, kind=float, low=0.0, high=1.0,
                                     help="margin above the background texts' best overlap (threshold_mode auto)")
    aggregation: str = option("mean_decentered", kind=str, choices=AGGREGATIONS,
                              help="how prompt-token activations are pooled before top-k")
    n_iter: int = option(30, kind=int, low=0, help="optimisation steps per edit (at most)")
    lr: float = option(1.0, kind=float, low=0.0, low_open=True, help="SGD learning rate of the memory columns")
    weight_decay: float = option(1e-5, kind=float, low=0.0, help="SGD weight decay (see decay_scope)")
    grad_clip: float = option(1.0, kind=float, low=0.0, low_open=True, help="gradient norm clip per step")
    early_stop: bool = option(True, kind=bool, help="stop an edit once the loss is small and flat")
    early_stop_loss: float = option(0.02, kind=float, low=0.0, help="early stop: loss at most this")
    early_stop_delta: float = option(1e-4, kind=float, low=0.0, help="early stop: loss change at most this")
    num_context_templates: int = option(10, kind=int, low=0, high=10,
                                        help="random-prefix copies of the edit prompt trained beside it")
    seed: int = option(0, kind=int, help="seed of the TopHash permutation and the context templates")
    feature_scaling: str = option("none", kind=str, choices=FEATURE_SCALINGS,
                                  help="`std`: divide the de-centred feature by the background std before top-k")
    decay_scope: str = option("all", kind=str, choices=DECAY_SCOPES,
                              help="weight decay on the whole memory (`all`), the edit's own columns (`active`) or none")
    column_protection: float = option(0.0, kind=float, low=0.0,
                                      help="p > 0: a column owned by u earlier edits gets its gradient scaled by "
                                           "1 / (1 + p u)")
    column_protection_mode: str = option("absolute", kind=str, choices=PROTECTION_MODES,
                                         help="`relative`: that scale divided by its mean over the edit's columns "
                                              "(a preference, not a smaller step)")
    preserve_neighbours: int = option(0, kind=int, low=0,
                                      help="project each edit's gradient off the keys of up to m conflicting "
                                           "earlier edits (their outputs stay exactly)")
    preserve_min_overlap: float = option(0.0, kind=float, low=0.0, high=1.0,
                                         help="an earlier edit conflicts when its mask shares this fraction of "
                                              "the new mask's columns")
    preserve_max_rank: float = option(1.0, kind=float, low=0.0, high=1.0, low_open=True,
                                      help="the protected keys span at most this fraction of the k columns")
    preserve_energy: float = option(0.0, kind=float, low=0.0, high=1.0, high_open=True,
                                    help="also protect the principal directions holding this share of all "
                                         "earlier edits' key energy inside the new mask")
    preserve_energy_after: int = option(0, kind=int, low=0,
                                        help="start the energy projection once the bank holds this many edits")
    router: str = option("mask", kind=str, choices=ROUTERS,
                         help="`mask`: the best mask overlap >= tau wins; `subject`: only edits whose subject "
                              "the query mentions are eligible, then the best overlap >= tau")
    subject_layer: int = option(4, kind=int, low=1, help="router subject: hidden states after this many layers")
    subject_threshold: float = option(0.95, kind=float, low=-1.0, high=1.0,
                                      help="router subject: the mean over an edit's subject tokens of their best cosine "
                                           "with a query token must reach this")
    subject_casefold: bool = option(True, kind=bool,
                                    help="router subject: a query naming no stored subject as written is also read "
                                         "lower-cased and scores its better reading (subjects in capitals reach their edit)")
    subject_casefold_margin: float = option(0.01, kind=float, low=0.0, high=1.0,
                                            help="router subject: the lower-cased reading scores this much less (it "
                                                 "matches more loosely: with 0, 2.1 % of CounterFact neighbours fire)")
    subject_spellings: bool = option(True, kind=bool,
                                     help="router subject: a query writing a stored subject or alias with a typo, "
                                          "other casing, accents or spacing, or as its acronym, names it too "
                                          "(memoir.spelling)")
    subject_common_aliases: bool = option(True, kind=bool,
                                          help="router subject, with subject_spellings: a subject listed in the shipped "
                                               "table of common aliases (memoir/data/aliases.txt) is also named by its "
                                               "other names there (\"Holland\", \"US\")")
    subject_fallback_tokens: int = option(3, kind=int, low=1,
                                          help="router subject, an edit given without a subject: its key is this many "
                                               "prompt tokens, those least like any background token")
    subject_fallback_relations: bool = option(True, kind=bool,
                                              help="router subject, an edit given without a subject: relation wordings "
                                                   "(memoir/data/relation_templates.txt) count as background too, so "
                                                   "relation words are not taken for the subject")
    other_questions: int = option(0, kind=int, low=0,
                                  help="an edit with a subject also trains this many other questions about it "
                                       "(relation wordings of memoir/data/relation_templates.txt) to keep the unedited "
                                       "model's next-token distribution, so the edit does not answer them (0: off; "
                                       "one-by-one editing only)")
    other_questions_weight: float = option(1.0, kind=float, low=0.0,
                                           help="weight of the other questions' KL term in an edit's loss")
    other_questions_tolerance: float = option(0.05, kind=float, low=0.0,
                                              help="early stop also needs the other questions' mean KL (nats) to be "
                                                   "at most this")
    other_questions_skip: int = option(10, kind=int, low=0,
                                       help="the relation wordings most like the edit's own question (last prompt "
                                            "token at the edited layer) are never used as other questions: they may "
                                            "reword it")
    on_conflict: str = option("supersede", kind=str, choices=CONFLICT_POLICIES,
                              help="a new edit asking a stored edit's question (same subject and relation): "
                                   "`supersede` removes the stored one, `keep` keeps both (memoir.conflicts)")
    conflict_threshold: float = option(0.4, kind=float, low=0.0, high=1.0,
                                       help="same relation: the prompts' masks with the subject replaced share "
                                            "this fraction of columns")
    check_neighbours: int = option(4, kind=int, low=0,
                                   help="after each edit, re-check the m earlier converged edits sharing most of "
                                        "its columns; `EditResult.disturbed` lists those no longer producing "
                                        "their target (0: off)")
    memory: str = option("shared", kind=str, choices=MEMORY_LAYOUTS,
                         help="`shared`: every edit writes its mask's columns of one memory (the reference); "
                              "`private`: each edit trains on an empty scratch and keeps its own low-rank block "
                              "(memoir.private), so later edits cannot overwrite it; column protection, "
                              "preservation and check_neighbours then have nothing to protect and are not used")
    private_rank: int = option(16, kind=int, low=1,
                               help="memory private: rank of each edit's stored block (truncated SVD)")
    train_input_scale: float = option(1.0, kind=float, low=0.0, high=1.0, low_open=True,
                                      help="while an edit trains, the memory reads its inputs scaled "
                                           "by this factor, so the block reaches the target from weaker inputs")
    block_gain: float = option(1.0, kind=float, low=1.0,
                               help="memory private: each edit's trained block is stored multiplied by this "
                                    "gain, so inputs that match the prompt's only in part (a rephrasing) still "
                                    "reach the target; decode steps of a generation read the block as trained "
                                    "(no effect on a shared memory)")
    stop_after_target: bool = option(False, kind=bool,
                                     help="memory private: in a generation an edit's block is read for the prompt "
                                          "and until its target's tokens are produced, then the model goes on "
                                          "unedited (the target is not repeated; no effect on a shared memory)")
    on_unconverged: str = option("keep", kind=str, choices=UNCONVERGED_POLICIES,
                                 help="an edit whose prompt does not yet produce its target after training "
                                      "(teacher-forced argmax): `keep` stores it anyway (the reference), "
                                      "`rollback` leaves the editor as it was (`EditResult.kept` is False)")
    tuned_for: dict = option(kind=dict, factory=dict,
                             help="the model a preset was tuned for (`memoir.models.model_signature`); "
                                  "another model warns")

    def __post_init__(self):
        if self.threshold == "auto":
            raise ValueError("MemoirConfig.threshold='auto': threshold is a number; calibration is threshold_mode: auto")
        check_fields(self)

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
        """A config file: its fields, or ``base: <preset or file>`` plus the fields it changes."""
        return cls.from_mapping(read_mapping(path), source=str(path))

    @classmethod
    def from_mapping(cls, data: dict, source: str | None = None) -> "MemoirConfig":
        """:meth:`from_dict`, where ``base:`` stands for the fields of a shipped preset (a name) or of
        another config file (a ``.yaml`` / ``.json`` path, relative to this file's folder)."""
        return cls.from_dict(_resolve_base(dict(data), source, ()), source=source)

    @classmethod
    def preset(cls, name: str) -> "MemoirConfig":
        """A shipped preset by name: ``"smollm2"`` (tuned for SmolLM2-135M) or ``"reference"`` (the paper's)."""
        available = preset_names()
        if name not in available:
            raise ValueError(f"no preset {name!r}; available: {', '.join(available)} (a config file is read with "
                             f"MemoirConfig.load)")
        if name == "reference":
            return cls()
        return cls.from_dict(read_mapping(PRESET_DIR / f"{name}.yaml"), source=f"preset {name}")

    def fits(self, signature: dict) -> bool:
        """Whether this config was tuned for a model with this signature (or for no model in particular)."""
        return all(signature.get(k) == v for k, v in self.tuned_for.items())


def _resolve_base(data: dict, source: str | None, chain: tuple) -> dict:
    """``data`` with its ``base:`` replaced by the fields it names (files may chain, never in a loop)."""
    base = data.pop("base", None)
    if base is None:
        return data
    where = source or "config"
    if not isinstance(base, str):
        raise ValueError(f"{where}: 'base' must name a preset or a config file, got {base!r}")
    if not base.endswith((".yaml", ".yml", ".json")):
        return {**MemoirConfig.preset(base).to_dict(), **data}
    folder = pathlib.Path(source).parent if source and not source.startswith("preset ") else pathlib.Path.cwd()
    path = (folder / base).resolve()
    if path in chain:
        raise ValueError(f"{where}: 'base' files form a loop ({' -> '.join(map(str, chain + (path,)))})")
    if not path.is_file():
        raise ValueError(f"{where}: base config file {base!r} not found (looked for {path})")
    return {**_resolve_base(read_mapping(path), str(path), chain + (path,)), **data}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) + ["reference"]


def preset_for(signature: dict) -> str | None:
    """The shipped preset tuned for a model with this signature, if any."""
    for name in preset_names():
        cfg = MemoirConfig.preset(name)
        if cfg.tuned_for and cfg.fits(signature):
            return name
    return None


def markdown_table(cls=None) -> str:
    """The configuration reference (field, default, allowed values, meaning), from the field metadata."""
    cls = cls or MemoirConfig
    rows = ["| field | default | values | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = "none" if default is None else ("`{}`" if default == {} else f"`{default}`")
        rows.append(f"| `{f.name}` | {shown} | {range_text(f)} | {f.metadata['help']} |")
    return "\n".join(rows)


def field_help(name: str, cls=None) -> str:
    """One field's help text with its allowed values (for CLI options that override it)."""
    f = {f.name: f for f in dataclasses.fields(cls or MemoirConfig)}[name]
    return f"{f.metadata['help']} ({range_text(f)}; overrides the config)"


def default_layer(num_layers: int) -> int:
    """The paper's depth fraction (layer 27 of 32) applied to this model's depth."""
    return min(num_layers - 1, max(0, round(num_layers * PAPER_LAYER_FRACTION)))


def default_top_k(input_dim: int) -> int:
    return max(1, round(input_dim * PAPER_K_RATIO))



def rewrite_table(readme) -> None:
    """Replace the generated table between the config-table markers of a Markdown file."""
    readme = pathlib.Path(readme)
    text = readme.read_text()
    start, end = "<!-- config-table:start -->\n", "<!-- config-table:end -->"
    if start not in text or end not in text:
        raise ValueError(f"{readme}: no {start.strip()} ... {end} section")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + start + markdown_table() + "\n" + end + tail)
