"""MemoirEditor: attach a MEMOIR memory to a HuggingFace causal LM, edit it, query it."""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from memoir import conflicts, editing, persist, spelling, subject_router
from memoir.background import background_statistics, default_background_texts, relation_templates, relation_texts
from memoir.batching import build_batch
from memoir.config import CONFLICT_POLICIES, UNCONVERGED_POLICIES, MemoirConfig, preset_for
from memoir.layer import MemoirLayer
from memoir.locks import ReadWriteLock
from memoir.models import Target, locate_target, model_signature
from memoir.preserve import KeyStore
from memoir.private import PrivateBlocks
from memoir.route import CallLocal, Route
from memoir.subject_router import SubjectKeys
from memoir.routing import PromptRouting
from memoir.tophash import make_permutation
from memoir.types import EditRecords, EditRequest, EditResult, Retrieval

__all__ = ["MemoirEditor", "EditRequest", "EditResult", "Retrieval", "default_background_texts"]

log = logging.getLogger(__name__)

TEMPLATE_SEEDS = ("I", "You", "Because", "Yes", "Q: ")
TEMPLATE_LENGTHS = (5, 10)


def _locked(mode: str):
    """Run the method under the editor's read lock (``"reading"``: concurrent with other readers,
    not with an edit) or write lock (``"writing"``: alone, seen by readers whole or not at all)."""
    def wrap(method):
        @functools.wraps(method)
        def locked(self, *args, **kwargs):
            with getattr(self._lock, mode)():
                return method(self, *args, **kwargs)
        return locked
    return wrap


_reads, _writes = _locked("reading"), _locked("writing")


def choose_config(model: nn.Module, config: MemoirConfig | None) -> MemoirConfig:
    """The config an editor runs: the given one (a warning if it was tuned for another model), else the
    shipped preset tuned for this model, else the reference settings (with a notice)."""
    signature = model_signature(model)
    if config is not None:
        if not config.fits(signature):
            warnings.warn(f"this MemoirConfig was tuned for {config.tuned_for}, not for this model "
                          f"({signature}); its settings may not suit it", stacklevel=3)
        return config
    name = preset_for(signature)
    if name is not None:
        log.info("memoir: using the %r preset, tuned for this model", name)
        return MemoirConfig.preset(name)
    log.warning("memoir: no preset is tuned for this model (%s); using the reference settings "
                "(MemoirConfig(): the paper's LLaMA-3-8B hyper-parameters)", signature.get("model_type", "unknown"))
    return MemoirConfig()


class MemoirEditor(PromptRouting):
    """Attach a MEMOIR memory (in place) to ``model`` and edit it.

    ``editor.model`` is the edited model: plain ``model(...)`` and ``model.generate(...)`` use the
    memory, routing every sequence of a batch from its own prompt.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        config: MemoirConfig | None = None,
        background_texts=None,
        *,
        background: tuple[torch.Tensor, torch.Tensor] | None = None,
        full_forward: bool = False,
    ):
        """``config=None``: the shipped preset tuned for this model if there is one (logged), the
        reference settings otherwise (with a notice).  A config tuned for another model warns.
        ``full_forward``: every edit step runs the whole model, as the reference loop does, instead
        of replaying the frozen layers below the edit (same result, slower; for checking)."""
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.model = model
        self.tokenizer = tokenizer
        self._lock = ReadWriteLock()  # edits write, generate / retrieve / save read (memoir.locks)
        config = choose_config(model, config)
        target = locate_target(model, config.layer)
        if isinstance(target.module, MemoirLayer):
            raise ValueError(f"{target.qualified_name} already carries a MEMOIR memory")
        self.config = config.resolve(target.num_layers, target.in_features)
        if not isinstance(full_forward, bool):
            raise TypeError(f"full_forward={full_forward!r}: must be True or False")
        self.full_forward = full_forward
        self.target: Target = target
        for p in model.parameters():
            p.requires_grad_(False)
        if background is not None:
            mean, std = background
        else:
            mean, std = background_statistics(model, tokenizer, target, background_texts or default_background_texts())
        self.layer = MemoirLayer(
            target.module,
            target.in_features,
            target.out_features,
            top_k=self.config.top_k,
            threshold=1.0 if self.config.threshold_mode == "auto" else self.config.threshold,
            aggregation=self.config.aggregation,
            feature_scaling=self.config.feature_scaling,
            permutation=make_permutation(target.in_features, self.config.seed),
            background_mean=mean,
            background_std=std,
        )
        if self.config.memory == "private":
            self.layer.private = PrivateBlocks(target.out_features, self.config.top_k, self.config.private_rank,
                                               device=self.device)
            self.layer.stop_after_target = self.config.stop_after_target
            self.layer.block_gain = self.config.block_gain
        target.install(self.layer)
        self._nested = CallLocal(active=False)  # inside the subject router's own partial pass
        if self.config.router == "subject":
            self._setup_subject_router(background_texts or default_background_texts())
        self._install_routing()
        self._templates: list[str] | None = None
        self._relation_keys: tuple[list[str], torch.Tensor] | None = None  # relation_question_keys()
        self._records = EditRecords()  # the stored edits by id, oldest first
        # ((subject_common_aliases, records version), the records it holds by id, memoir.spelling.SpellingIndex)
        self._spellings = None
        self.removed: list[int] = []  # ids of edits removed or superseded, in order
        self._next_id = 0
        # threshold_mode "auto": the masks of the background texts calibrate tau against the bank.
        self._background_texts = background_texts or default_background_texts()
        self._background_masks: torch.Tensor | None = None

    # ------------------------------------------------------------------ plumbing
    @property
    def device(self) -> torch.device:
        return self.layer.memory.device

    @property
    def keys(self) -> KeyStore:
        """Preservation keys of the stored edits (filled when preserve_neighbours / preserve_energy is on)."""
        return self.layer.keys

    @property
    def threshold(self) -> float:
        """The retrieval threshold tau in force (calibrated after every edit under ``threshold_mode: auto``)."""
        return self.layer.threshold

    @torch.no_grad()
    def background_masks(self, batch_size: int = 16) -> torch.Tensor:
        """Packed TopHash masks ``[T, W]`` of the background texts (computed once, frozen model)."""
        if self._background_masks is None:
            packed = []
            texts = self._background_texts
            for i in range(0, len(texts), batch_size):
                batch = build_batch(self.tokenizer, texts[i : i + batch_size], device=self.device)
                packed.append(self.layer.query_masks(self.layer_inputs(batch), batch.prompt_mask)[2])
            self._background_masks = torch.cat(packed)
        return self._background_masks

    @torch.no_grad()
    def layer_inputs(self, batch) -> torch.Tensor:
        """``[B, S, D]``: the edited layer's inputs for a batch, from the unedited model without
        routing; the pass stops at the layer (nothing above it or the head runs)."""
        with self.disabled(), self.layer.using_route(Route.unrouted(batch.input_ids.shape[0], self.device)), \
                self.layer.capturing() as seen:
            self.layer.run_until_input(self.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                       use_cache=False)
        return seen[0].reshape(*batch.input_ids.shape, -1)

    def calibrate_threshold(self) -> float:
        """Under ``threshold_mode: auto`` set tau just above the best overlap any background text reaches.

        Background texts stand for unrelated prompts: a query that overlaps the bank no more than
        they do should get the unedited model.  The bound rises with the bank (more chances of a
        chance overlap), so it is recomputed after every edit.  Fixed thresholds are left alone.
        """
        if self.config.threshold_mode != "auto":
            return self.layer.threshold
        if len(self.layer.bank) == 0:
            self.layer.threshold = 1.0
        else:
            scores, _ = self.layer.bank.best_match(self.background_masks().to(self.device), 0.0)
            self.layer.threshold = min(1.0, float(scores.max()) + self.config.threshold_margin)
        return self.layer.threshold

    # ------------------------------------------------------------------ subject router
    def _setup_subject_router(self, texts: list[str]) -> None:
        cfg = self.config
        if cfg.subject_layer > self.target.layer_index:
            raise ValueError(f"subject_layer {cfg.subject_layer} must not exceed the edited layer "
                             f"({self.target.layer_index}): its states are read before the memory")
        self.layer.subject = SubjectKeys(self.target.out_features).to(self.device)
        self._prefixed_states = subject_router.PrefixedStates(self.model, self.target.layers, cfg.subject_layer,
                                                              self.tokenizer)
        states = self._own_token_states(texts)
        self.layer.subject.mean = states.mean(0)
        # Background token states, to tell which tokens of a prompt without a subject are specific.
        self._background_states = F.normalize(states - self.layer.subject.mean, dim=-1)
        self._specificity_states = None  # the background and the relation wordings, built on first use

    def _own_token_states(self, texts: list[str]) -> torch.Tensor:
        """``[T, d]``: the subject-layer states of every text's own tokens, the texts in batches of 16."""
        states = []
        for i in range(0, len(texts), 16):
            s, o = self._subject_states(texts=texts[i:i + 16])
            states.append(s[o])
        return torch.cat(states).to(self.device)

    def _subject_states(self, input_ids=None, attention_mask=None, texts: list[str] | None = None):
        """``(states [B, S', d], own [B, S'])`` of ``PREFIX + text`` at the subject layer, for ``texts``
        or the text of each row of ``input_ids``; ``own`` marks the text's tokens."""
        if texts is None:
            texts = subject_router.row_texts(self.tokenizer, input_ids, attention_mask)
        with self._nested.overriding(active=True):
            return self._prefixed_states(texts, self.device)

    def _on_model_forward(self, module, args, kwargs):
        if self._nested.get("active"):
            return None  # the router's own partial pass: not a prompt of the caller
        return super()._on_model_forward(module, args, kwargs)

    def _on_prefill(self, args, kwargs, attention_mask) -> None:
        subject, calls = self.layer.subject, self.layer.calls
        if subject is None or len(self.layer.bank) == 0 or calls.get("pinned") is not None:
            return  # nothing to verify, or a pass with a fixed route (an edit's training)
        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        if input_ids is None or input_ids.dim() != 2:
            return  # e.g. inputs_embeds: no token ids to verify, the mask router decides alone
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        span = self._span.get("override")
        if span is not None and span.shape == input_ids.shape:
            # A teacher-forced prompt + target pass: only the prompt may name the subject.
            attention_mask = attention_mask.bool() & span.to(attention_mask.device)
        texts = subject_router.row_texts(self.tokenizer, input_ids, attention_mask)
        self.layer.calls.set(eligible=self.eligibility(texts))

    def eligibility(self, texts: list[str]) -> torch.Tensor | None:
        """``[B, N]`` bool: the bank rows each prompt text may be routed to (it names their subject),
        or ``None`` when every row may (no subject router, or an empty bank).  What the prompt pass
        of ``generate`` decides; an inference stack routing its own requests calls it with their
        prompt texts (``memoir.integrations.step_router``)."""
        if self.layer.subject is None or len(self.layer.bank) == 0:
            return None
        threshold = self.config.subject_threshold
        eligible = self._subject_scores(texts, floor=threshold) >= threshold
        if self.config.subject_spellings:
            eligible = eligible | self._spelled(texts).to(eligible.device)
        return eligible

    def _spelled(self, texts: list[str]) -> torch.Tensor:
        """``[B, N]`` bool: the bank rows whose subject or an alias each text writes in some form
        (:mod:`memoir.spelling`).  The index follows the stored records: new edits are added to it,
        and it is rebuilt only when an edit it holds was removed or rolled back."""
        common = self.config.subject_common_aliases
        built = self._spellings
        if built is None or built[0] != (common, self._records.version):
            indexed = built[1] if built is not None and built[0][0] == common else {}
            if any(self._records.get(i) is not r for i, r in indexed.items()):
                indexed = {}  # an edit was removed or rolled back: rebuild (rare; appends are incremental)
            index = built[2] if indexed else spelling.SpellingIndex(self.tokenizer)
            indexed = dict(indexed)
            for i, r in self._records.items():
                if i not in indexed:
                    index.add(r.edit_id, r.subject, r.aliases, common=common)
                    indexed[i] = r
            self._spellings = ((common, self._records.version), indexed, index)
        index = self._spellings[2]
        bank_ids = self.layer.bank.ids.cpu()
        out = torch.zeros((len(texts), bank_ids.shape[0]), dtype=torch.bool)
        for b, text in enumerate(texts):
            named = index.named(text)
            if named:  # edits no longer in the bank drop out here
                out[b] = torch.isin(bank_ids, torch.tensor(sorted(named), dtype=torch.int64))
        return out

    def _subject_scores(self, texts: list[str], floor: float | None = None) -> torch.Tensor:
        """``[B, N]``: how well each text names each bank row's subject.  Under ``subject_casefold`` a
        text is also read lower-cased and scores its better reading, so a subject written in capitals
        reaches the lower-cased keys every edit keeps; the lower-cased reading counts
        ``subject_casefold_margin`` less, since lower-cased tokens of different names look more alike
        (experiments/casefold_probe.py).  With ``floor``, only scores reaching it are exact
        (``SubjectKeys.scores``), and a text is read lower-cased only when no edit reaches the floor
        as written: whether any edit is eligible is the same, and most routed prompts skip the second
        partial pass."""
        subject, ids = self.layer.subject, self.layer.bank.ids
        folded = [i for i, t in enumerate(texts) if self.config.subject_casefold and t.lower() != t]
        if floor is None:
            states, own = self._subject_states(texts=texts + [texts[i].lower() for i in folded])
            scores = subject.scores(states, own, ids)
            scores, folded_scores = scores[: len(texts)], scores[len(texts):]
        else:
            states, own = self._subject_states(texts=texts)
            scores = subject.scores(states, own, ids, floor=floor)
            named = (scores >= floor).any(dim=1).tolist()
            folded = [i for i in folded if not named[i]]
            if not folded:
                return scores
            states, own = self._subject_states(texts=[texts[i].lower() for i in folded])
            folded_scores = subject.scores(states, own, ids, floor=floor)  # it needs more than floor too
        if folded:
            mine = torch.tensor(folded, device=scores.device)
            scores = scores.clone()
            scores[mine] = torch.maximum(scores[mine], folded_scores - self.config.subject_casefold_margin)
        return scores

    @torch.no_grad()
    def _subject_keys(self, request: EditRequest) -> list[torch.Tensor]:
        """Key groups of one edit, each ``[m, d]``: the states of the subject's tokens as given and
        lower-cased, and of each alias written in the prompt in the subject's place; without a subject
        (or one not found in the prompt), one group of the prompt's most specific tokens
        (:meth:`_specific_tokens`)."""
        variants = [(request.prompt, request.subject)]
        named = bool(request.subject) and request.subject in request.prompt
        if named and request.subject.lower() != request.subject:
            variants.append((request.prompt.replace(request.subject, request.subject.lower(), 1),
                             request.subject.lower()))
        if named:
            variants += [(request.prompt.replace(request.subject, alias, 1), alias) for alias in request.aliases]
        groups = []
        for prompt, subject in variants:
            ids, pos = subject_router.subject_positions(self.tokenizer, prompt, subject)
            ids_t = torch.tensor([ids], device=self.device)
            with self._nested.overriding(active=True):
                states = subject_router.token_states(self.model, self.target.layers, self.config.subject_layer,
                                                     ids_t, torch.ones_like(ids_t))[0]
            if pos:
                groups.append(states[pos])
            elif not groups:
                groups.append(self._specific_tokens(prompt, states))
        return groups

    def _specific_tokens(self, prompt: str, states: torch.Tensor) -> torch.Tensor:
        """States ``[m, d]`` of the ``subject_fallback_tokens`` prompt tokens least like any background
        token (names, not "city" or "located"): the key group of an edit given without a subject, in
        prompt order.  Relation wordings count as background too (``subject_fallback_relations``):
        without them a rare relation word ("twin", "product") is taken for a name, and every prompt
        of that relation would then fire the edit."""
        _, _, own = subject_router.prefixed_batch(self.tokenizer, [prompt], self.device)
        mine = states[own[0]]
        return mine[self._specific_positions(mine)]

    def _specific_positions(self, mine: torch.Tensor) -> torch.Tensor:
        """Sorted positions, among a prompt's own token states ``mine [m, d]``, of its most specific tokens."""
        q = F.normalize(mine - self.layer.subject.mean.to(mine.device), dim=-1)
        likeness = (q @ self._specificity_background().T).amax(dim=1)
        n = self.config.subject_fallback_tokens
        return likeness.topk(min(n, len(mine)), largest=False).indices.sort().values

    def _specificity_background(self) -> torch.Tensor:
        if not self.config.subject_fallback_relations:
            return self._background_states
        if self._specificity_states is None:
            relations = F.normalize(self._own_token_states(relation_texts()) - self.layer.subject.mean, dim=-1)
            self._specificity_states = torch.cat([self._background_states, relations])
        return self._specificity_states

    # ------------------------------------------------------------------ context templates
    @torch.no_grad()
    def context_templates(self) -> list[str]:
        """``"{}"`` plus prefixes generated once by the base model (memory off), as the reference."""
        if self._templates is None:
            templates = ["{}"]
            n = self.config.num_context_templates
            if n > 0:
                with self.disabled():
                    for length in TEMPLATE_LENGTHS:
                        texts = self.generate(list(TEMPLATE_SEEDS), max_new_tokens=length)
                        for seed, cont in zip(TEMPLATE_SEEDS, texts):
                            prefix = (seed + cont).replace("{", " ").replace("}", " ").strip()
                            templates.append(prefix + " {}")
                templates = templates[: n + 1]
            self._templates = templates
        return self._templates

    @torch.no_grad()
    def relation_question_keys(self) -> tuple[list[str], torch.Tensor]:
        """``(templates, keys [T, D])``: the relation wordings of memoir/data/relation_templates.txt and
        the question key of each (:func:`memoir.editing.question_keys`, read with a neutral subject),
        computed once; ``other_questions`` picks from them."""
        if self._relation_keys is None:
            batch = build_batch(self.tokenizer, relation_texts(), device=self.device)
            keys = editing.question_keys(self.layer, self.layer_inputs(batch), batch.prompt_mask)
            self._relation_keys = (relation_templates(), keys)
        return self._relation_keys

    # ------------------------------------------------------------------ enable / disable
    def disable(self) -> None:
        """Switch the memory off: the model behaves exactly as the unedited one."""
        self.layer.enabled = False

    def enable(self) -> None:
        self.layer.enabled = True

    # ------------------------------------------------------------------ editing
    @_writes
    def edit(self, prompt: str, target: str, subject: str | None = None, on_conflict: str | None = None,
             on_unconverged: str | None = None, aliases=()) -> EditResult:
        """Write one fact: after this, ``prompt`` (and its rephrasings) continue with ``target``.

        ``subject``: the entity the fact is about, as written in ``prompt`` (the subject router keys
        the edit on it; without one it infers the prompt's most specific tokens).  ``aliases``: other
        names of the subject ("USA" for "United States"); queries naming one reach the edit too.

        ``on_conflict`` (default: the config's): ``"supersede"`` removes the stored edits that ask
        the same question (same subject and relation, :mod:`memoir.conflicts`) before writing, so the
        new answer replaces theirs (``EditResult.replaced`` names them); ``"keep"`` keeps them.
        ``on_unconverged`` (default: the config's): ``"rollback"`` undoes an edit whose prompt does not
        produce the target after training (``EditResult.kept`` is False), ``"keep"`` stores it anyway.
        All or nothing: if the edit fails, diverges (:class:`memoir.editing.EditDiverged`) or is
        interrupted, memory, bank, keys and records are exactly as before
        (:class:`memoir.editing.EditTransaction`).
        """
        policy, unconverged = self._policies(on_conflict, on_unconverged)
        request = self.check_request(EditRequest(prompt, target, subject, aliases))
        start = time.perf_counter()
        inputs = editing.encode_edit(self, request)
        inputs.others = editing.other_questions(self, request, inputs)
        with editing.EditTransaction(self) as txn:
            replaced = tuple(conflicts.find_conflicts(self, request)) if policy == "supersede" else ()
            for old in replaced:
                self._forget(old)
            private = self.layer.private is not None  # nothing shared to protect
            owners_before = self.layer.column_usage() if self.config.column_protection > 0 and not private else None
            edit_id, row = self._store_mask(inputs.packed, request)  # drops the keys of an edit it replaces
            preserved, basis = editing.preservation_basis(self, inputs, txn) if not private else ([], None)
            transforms = editing.gradient_transforms(self.config, self.layer.memory, inputs, owners_before, basis)
            with self.layer.training_passes(editing.input_augmentation(self.config)):
                training = editing.optimise(self, inputs, row, transforms)
            if private:
                training = editing.store_private(self, inputs, edit_id, row, training)
            result = EditResult(edit_id, request.prompt, request.target, training.steps, training.loss, 0.0,
                                preserved=tuple(preserved), replaced=replaced, converged=training.converged,
                                subject=request.subject, aliases=request.aliases)
            if not training.converged and unconverged == "rollback":
                txn.rollback()
                result.edit_id, result.preserved, result.replaced, result.kept = None, (), (), False
            else:
                if inputs.keys is not None:
                    self.keys.add(edit_id, inputs.keys)
                if self.layer.subject is not None:
                    with self._nested.overriding(active=True):
                        self.layer.subject.add(edit_id, self._subject_keys(request))
                self.calibrate_threshold()
                # Earlier edits sharing the most columns, re-checked: did this one overwrite them?
                neighbours = [i for i in editing.overlapping_edits(inputs.packed, txn.bank_words, txn.bank_ids,
                                                                   0 if private else self.config.check_neighbours)
                              if i in self._records and self._records[i].converged]
                result.disturbed = tuple(i for i, ok in zip(neighbours, editing.still_reached(self, neighbours))
                                         if not ok)
                self._records[edit_id] = result
        result.seconds = time.perf_counter() - start
        return result

    def _policies(self, on_conflict: str | None, on_unconverged: str | None) -> tuple[str, str]:
        """The conflict and unconverged policies in force (the config's where not given), checked."""
        policy = on_conflict or self.config.on_conflict
        if policy not in CONFLICT_POLICIES:
            raise ValueError(f"on_conflict={policy!r}: must be one of {CONFLICT_POLICIES}")
        unconverged = on_unconverged or self.config.on_unconverged
        if unconverged not in UNCONVERGED_POLICIES:
            raise ValueError(f"on_unconverged={unconverged!r}: must be one of {UNCONVERGED_POLICIES}")
        return policy, unconverged

    def check_request(self, item) -> EditRequest:
        """``item`` as an :class:`EditRequest`, or a ``ValueError`` naming what is wrong with it: a
        missing or non-string field, a text with no visible characters, special-token text in the
        target (it would train control tokens) or a prompt longer than the model's context."""
        request = EditRequest.coerce(item)
        specials = [t for t in self.tokenizer.all_special_tokens if t and t in request.target]
        if specials:
            raise ValueError(f"edit request {request.prompt!r} -> {request.target!r}: the target contains the "
                             f"special token text {', '.join(map(repr, specials))}, which would be trained as "
                             "a control token")
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if limit:
            n = len(self.tokenizer(request.prompt + " " + request.target, add_special_tokens=True)["input_ids"])
            longest = max(len(self.tokenizer(t.format(""))["input_ids"]) for t in self.context_templates())
            if n + longest > limit:
                raise ValueError(f"edit request {request.prompt[:60]!r}...: prompt and target take {n} tokens "
                                 f"(+ {longest} of context template), more than the model's context of "
                                 f"{limit} positions")
        return request

    def edits(self) -> list[EditResult]:
        """The stored edits, oldest first: id, prompt, target, subject, steps, loss, converged, seconds."""
        return [dataclasses.replace(r) for r in self._records.values()]

    def conflicts(self, prompt: str, subject: str | None = None) -> list[int]:
        """Ids of the stored edits that ask the same question as ``prompt`` (what ``supersede`` replaces)."""
        return conflicts.find_conflicts(self, EditRequest(prompt, "", subject))

    @_writes
    def remove(self, edit_id: int) -> None:
        """Forget a stored edit: its mask leaves the bank and its keys leave the key stores, so the
        prompts it answered get the unedited model's answer back exactly (rows routed to no edit
        never read the memory); the other edits keep theirs.  Under ``memory: "shared"`` its memory
        columns stay, shared with others; under ``"private"`` its block goes with it.  The id is
        listed in ``editor.removed`` and saved with it."""
        if edit_id not in self._records:
            raise KeyError(f"no stored edit {edit_id}; stored: {sorted(self._records)}")
        with editing.EditTransaction(self):
            self._forget(edit_id)
            self.calibrate_threshold()

    def _forget(self, edit_id: int, record: bool = True) -> None:
        """Drop an edit's bank row, keys and record (inside a transaction); ``record``: list its id
        in ``removed`` (False for an edit that is rolled back, as if never made)."""
        row = self.layer.bank.edit_ids.index(edit_id)
        self.layer.bank.remove_row(row)
        self.keys.pop(edit_id)
        if self.layer.subject is not None:
            self.layer.subject.pop(edit_id)
        if self.layer.private is not None:
            self.layer.private.pop(edit_id)
        self._records.pop(edit_id, None)
        if record:
            self.removed.append(edit_id)

    def _store_mask(self, packed: torch.Tensor, request: EditRequest) -> tuple[int, int]:
        """Store the edit's mask (the caller records the edit); returns ``(edit id, bank row)``."""
        edit_id = self._next_id
        self._next_id += 1
        row = self.layer.bank.index_of(packed)
        if row is None:
            row = self.layer.bank.add(packed, edit_id)
        else:
            # The same mask again (e.g. the same prompt re-edited): the new edit owns the row.
            old = self.layer.bank.edit_ids[row]
            self.layer.bank.set_owner(row, edit_id)
            self._records.pop(old, None)
            self.removed.append(old)
            self.keys.pop(old)
            if self.layer.subject is not None:
                self.layer.subject.pop(old)
            if self.layer.private is not None:
                self.layer.private.pop(old)
        return edit_id, row

    def edit_many(self, requests, progress: bool = True, on_conflict: str | None = None,
                  on_unconverged: str | None = None, batch_size: int = 1) -> list[EditResult]:
        """Apply a stream of edits (``EditRequest``, dicts or pairs); every request is checked before
        the first edit starts.

        ``batch_size`` 1 edits one after another.  Under ``memory: "private"`` a larger batch trains
        that many edits in one optimisation, each row under its own edit's mask, then stores them as
        separate edits (:meth:`_edit_batch`); each batch is all or nothing like one edit.
        """
        from tqdm.auto import tqdm

        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1")
        if batch_size > 1 and self.config.other_questions > 0:
            raise ValueError("batch_size > 1 does not train other_questions yet: edit one by one (batch_size=1) "
                             "or set other_questions: 0")
        if batch_size > 1 and self.layer.private is None:
            raise ValueError("batch_size > 1 needs memory: private (in a shared memory an edit is trained "
                             "against the edits before it, one at a time)")
        policy, unconverged = self._policies(on_conflict, on_unconverged)
        requests = [self.check_request(r) for r in requests]
        results = []
        bar = tqdm(total=len(requests), desc="editing", unit="edit", disable=not progress)
        for start in range(0, len(requests), batch_size):
            chunk = requests[start: start + batch_size]
            if batch_size == 1:
                done = [self.edit(chunk[0].prompt, chunk[0].target, chunk[0].subject, policy, unconverged,
                                  aliases=chunk[0].aliases)]
            else:
                done = self._edit_batch(chunk, policy, unconverged)
            results.extend(done)
            bar.update(len(chunk))
            bar.set_postfix(loss=f"{max(r.loss for r in done):.3f}", steps=max(r.steps for r in done))
        bar.close()
        return results

    @_writes
    def _edit_batch(self, requests: list[EditRequest], policy: str, unconverged: str) -> list[EditResult]:
        """Several edits trained together on the scratch memory (memory private), stored apart.

        Each request is encoded, checked for conflicts (also with the requests before it in the
        batch: one superseded there is never trained and comes back with ``kept`` False) and gets
        its mask, before one joint optimisation; then every edit's block is stored and checked on
        its own.  ``on_unconverged="rollback"`` drops an edit whose block does not produce its target
        (the edits it superseded stay removed: ``replaced`` names them).  An exception or interrupt
        leaves the editor as before the batch.
        """
        start = time.perf_counter()
        with editing.EditTransaction(self):
            members: list[tuple[EditRequest, editing.EditInputs, int]] = []
            results: dict[int, EditResult] = {}
            for request in requests:
                inputs = editing.encode_edit(self, request)
                replaced = tuple(conflicts.find_conflicts(self, request)) if policy == "supersede" else ()
                for old in replaced:
                    self._forget(old)
                    if old in results:  # a request earlier in this batch: never trained
                        members = [m for m in members if m[2] != old]
                        results[old].kept = False
                edit_id, _ = self._store_mask(inputs.packed, request)
                for gone in [m[2] for m in members if m[2] not in self.layer.bank.edit_ids]:
                    members = [m for m in members if m[2] != gone]  # the same mask again: this one owns it
                    results[gone].kept = False
                if self.layer.subject is not None:
                    with self._nested.overriding(active=True):
                        self.layer.subject.add(edit_id, self._subject_keys(request))
                members.append((request, inputs, edit_id))
                results[edit_id] = EditResult(edit_id, request.prompt, request.target, 0, float("nan"), 0.0,
                                              replaced=replaced, converged=False, subject=request.subject,
                                              aliases=request.aliases)
            if members:
                joint = editing.joint_batch(self, [m[1] for m in members])
                rows = [self.layer.bank.edit_ids.index(m[2]) for m in members]
                with self.layer.training_passes(editing.input_augmentation(self.config)):
                    steps, blocks = editing.optimise_many(self, joint, rows, [m[1].cols for m in members],
                                                          [m[1].dense for m in members])
                with torch.no_grad():
                    for (_, inputs, edit_id), block in zip(members, blocks):
                        editing.keep_block(self, inputs, edit_id, block)
                    self.layer.memory.zero_()
                losses, hits = editing.routed_losses(self, joint, rows)
                for (_, _, edit_id), n_steps, loss, hit in zip(members, steps, losses, hits):
                    r = results[edit_id]
                    r.steps, r.loss, r.converged = n_steps, loss, hit
                    if not hit and unconverged == "rollback":
                        self._forget(edit_id, record=False)
                        r.edit_id, r.kept = None, False
                    else:
                        self._records[edit_id] = r
            self.calibrate_threshold()
        seconds = (time.perf_counter() - start) / max(len(requests), 1)
        for r in results.values():
            r.seconds = seconds
        return list(results.values())

    # ------------------------------------------------------------------ inference
    @_reads
    @torch.no_grad()
    def retrieve(self, prompts) -> list[Retrieval]:
        """For each prompt: the edit the memory would apply (or None) and the overlap score."""
        if isinstance(prompts, str):
            prompts = [prompts]
        route = self.route(prompts)
        ids = self.layer.bank.edit_ids
        return [Retrieval(ids[r] if r >= 0 else None, s) for r, s in zip(route.rows.tolist(), route.scores.tolist())]

    @_reads
    @torch.no_grad()
    def route(self, prompts) -> Route:
        """The :class:`Route` of each prompt (which stored edit its sequence reads, or none).

        Pass it back with ``editor.layer.using_route(route)`` (or ``layer(a, route=...)``) to run
        those sequences without routing again, e.g. from an inference stack's own scheduler.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        batch = build_batch(self.tokenizer, prompts, device=self.device)
        with self.layer.calls.overriding(eligible=None, pinned=None), self.disabled(), self.layer.capturing() as seen:
            # Routing reads only the layer input: the layers above it and the head are skipped.
            self.layer.run_until_input(self.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                       use_cache=False)
            eligible = self.layer.calls.get("eligible")
        return self.layer.route(seen[0], batch.prompt_mask, eligible)

    @_reads
    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int = 32, **kwargs) -> list[str]:
        """Greedy (by default) continuations of each prompt, batched with left padding."""
        single = isinstance(prompts, str)
        if single:
            prompts = [prompts]
        batch = build_batch(self.tokenizer, prompts, device=self.device)
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        if not kwargs["do_sample"]:
            # Greedy decoding: silence the sampling defaults some generation configs carry.
            kwargs.setdefault("temperature", None)
            kwargs.setdefault("top_p", None)
            kwargs.setdefault("top_k", None)
        with self.layer.calls.overriding():  # this call's route stays with this call
            out = self.model.generate(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
                **kwargs
            )
        texts = self.tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
        return texts[0] if single else texts

    # ------------------------------------------------------------------ persistence
    @_reads
    def save(self, path) -> None:
        """Write ``memoir_config.json`` + ``memoir_state.safetensors`` atomically into ``path``."""
        persist.save_editor(self, path)

    @classmethod
    def load(cls, model: nn.Module, tokenizer, path) -> "MemoirEditor":
        """Attach saved edits to ``model`` (the same base model they were made on; checked)."""
        return persist.load_editor(cls, model, tokenizer, path)

    # peft-style names for the same operations
    def save_pretrained(self, path) -> None:
        """:meth:`save` under peft's name."""
        self.save(path)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path, tokenizer=None) -> "MemoirEditor":
        """:meth:`load` under peft's name; ``tokenizer`` defaults to the one saved with ``model``'s weights."""
        if tokenizer is None:
            from transformers import AutoTokenizer

            source = getattr(getattr(model, "config", None), "_name_or_path", None)
            if not source:
                raise ValueError("from_pretrained: pass tokenizer= (the model records no folder to read one from)")
            tokenizer = AutoTokenizer.from_pretrained(source)
        return cls.load(model, tokenizer, path)

    def disable_adapter(self):
        """``with editor.disable_adapter():`` the unedited model inside the block (peft's name for
        :meth:`disabled`)."""
        return self.disabled()

    # ------------------------------------------------------------------ teardown
    def detach(self) -> nn.Module:
        """Remove the memory and restore the original projection; returns the plain model."""
        self._remove_routing()
        self.target.install(self.layer.base)
        return self.model

    def unload(self) -> nn.Module:
        """peft's name for :meth:`detach`: the base model with its original module back."""
        return self.detach()
