"""MemoirEditor: attach a MEMOIR memory to a HuggingFace causal LM, edit it, query it."""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from memoir import editing, persist
from memoir.background import background_statistics, default_background_texts
from memoir.batching import build_batch
from memoir.config import MemoirConfig
from memoir.layer import MemoirLayer
from memoir.models import Target, locate_target
from memoir.preserve import KeyStore
from memoir.replay import keep_logits
from memoir.route import Route
from memoir.routing import PromptRouting
from memoir.tophash import make_permutation
from memoir.types import EditRequest, EditResult, Retrieval

__all__ = ["MemoirEditor", "EditRequest", "EditResult", "Retrieval", "default_background_texts"]

log = logging.getLogger(__name__)

TEMPLATE_SEEDS = ("I", "You", "Because", "Yes", "Q: ")
TEMPLATE_LENGTHS = (5, 10)


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
    ):
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.model = model
        self.tokenizer = tokenizer
        target = locate_target(model, None if config is None else config.layer)
        if isinstance(target.module, MemoirLayer):
            raise ValueError(f"{target.qualified_name} already carries a MEMOIR memory")
        self.config = (config or MemoirConfig()).resolve(target.num_layers, target.in_features)
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
            threshold=1.0 if self.config.threshold == "auto" else self.config.threshold,
            aggregation=self.config.aggregation,
            feature_scaling=self.config.feature_scaling,
            permutation=make_permutation(target.in_features, self.config.seed),
            background_mean=mean,
            background_std=std,
        )
        target.install(self.layer)
        self._install_routing()
        self._templates: list[str] | None = None
        self.edits: dict[int, EditRequest] = {}
        self._next_id = 0
        # threshold "auto": the masks of the background texts calibrate tau against the bank.
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
        """The retrieval threshold tau in force (calibrated after every edit under ``"auto"``)."""
        return self.layer.threshold

    @torch.no_grad()
    def background_masks(self, batch_size: int = 16) -> torch.Tensor:
        """Packed TopHash masks ``[T, W]`` of the background texts (computed once, frozen model)."""
        if self._background_masks is None:
            packed = []
            texts = self._background_texts
            with self.disabled(), self._capture_input() as seen:
                for i in range(0, len(texts), batch_size):
                    batch = build_batch(self.tokenizer, texts[i : i + batch_size], device=self.device)
                    seen.clear()
                    self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                               **keep_logits(self.model, 1))
                    acts = seen[0].reshape(*batch.input_ids.shape, -1)
                    packed.append(self.layer.query_masks(acts, batch.prompt_mask)[2])
            self._background_masks = torch.cat(packed)
        return self._background_masks

    def calibrate_threshold(self) -> float:
        """Under ``threshold: auto`` set tau just above the best overlap any background text reaches.

        Background texts stand for unrelated prompts: a query that overlaps the bank no more than
        they do should get the unedited model.  The bound rises with the bank (more chances of a
        chance overlap), so it is recomputed after every edit.  Fixed thresholds are left alone.
        """
        if self.config.threshold != "auto":
            return self.layer.threshold
        if len(self.layer.bank) == 0:
            self.layer.threshold = 1.0
        else:
            scores, _ = self.layer.bank.best_match(self.background_masks().to(self.device), 0.0)
            self.layer.threshold = min(1.0, float(scores.max()) + self.config.threshold_margin)
        return self.layer.threshold

    def _capture_input(self):
        """Collect the edited layer's inputs of the passes inside the block (this thread only)."""
        return self.layer.capturing()

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

    # ------------------------------------------------------------------ enable / disable
    def disable(self) -> None:
        """Switch the memory off: the model behaves exactly as the unedited one."""
        self.layer.enabled = False

    def enable(self) -> None:
        self.layer.enabled = True

    # ------------------------------------------------------------------ editing
    def edit(self, prompt: str, target: str) -> EditResult:
        """Write one fact: after this, ``prompt`` (and its rephrasings) continue with ``target``.

        All or nothing: if the edit fails or is interrupted, memory, bank, keys and records are
        exactly as before (:class:`memoir.editing.EditTransaction`).
        """
        request = EditRequest.coerce({"prompt": prompt, "target": target})
        start = time.perf_counter()
        inputs = editing.encode_edit(self, request)
        owners_before = self.layer.column_usage() if self.config.column_protection > 0 else None
        with editing.EditTransaction(self) as txn:
            edit_id, row = self._store_mask(inputs.packed, request)  # drops the keys of an edit it replaces
            preserved, basis = editing.preservation_basis(self, inputs, txn)
            transforms = editing.gradient_transforms(self.config, self.layer.memory, inputs, owners_before, basis)
            steps, loss = editing.optimise(self, inputs, row, transforms)
            if inputs.keys is not None:
                self.keys.add(edit_id, inputs.keys)
            self.calibrate_threshold()
        return EditResult(edit_id, request.prompt, request.target, steps, loss, time.perf_counter() - start,
                          tuple(preserved))

    def _store_mask(self, packed: torch.Tensor, request: EditRequest) -> tuple[int, int]:
        """Record the edit and its mask; returns ``(edit id, bank row)``."""
        edit_id = self._next_id
        self._next_id += 1
        row = self.layer.bank.index_of(packed)
        if row is None:
            row = self.layer.bank.add(packed, edit_id)
        else:
            # The same mask again (e.g. the same prompt re-edited): the new edit owns the row.
            old = self.layer.bank.edit_ids[row]
            self.layer.bank.set_owner(row, edit_id)
            self.edits.pop(old, None)
            self.keys.pop(old)
        self.edits[edit_id] = request
        return edit_id, row

    def edit_many(self, requests, progress: bool = True) -> list[EditResult]:
        """Apply a stream of edits one after another (``EditRequest``, dicts or pairs)."""
        from tqdm.auto import tqdm

        requests = [EditRequest.coerce(r) for r in requests]
        results = []
        bar = tqdm(requests, desc="editing", unit="edit", disable=not progress)
        for r in bar:
            results.append(self.edit(r.prompt, r.target))
            bar.set_postfix(loss=f"{results[-1].loss:.3f}", steps=results[-1].steps)
        return results

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def retrieve(self, prompts) -> list[Retrieval]:
        """For each prompt: the edit the memory would apply (or None) and the overlap score."""
        if isinstance(prompts, str):
            prompts = [prompts]
        route = self.route(prompts)
        ids = self.layer.bank.edit_ids
        return [Retrieval(ids[r] if r >= 0 else None, s) for r, s in zip(route.rows.tolist(), route.scores.tolist())]

    @torch.no_grad()
    def route(self, prompts) -> Route:
        """The :class:`Route` of each prompt (which stored edit its sequence reads, or none).

        Pass it back with ``editor.layer.using_route(route)`` (or ``layer(a, route=...)``) to run
        those sequences without routing again, e.g. from an inference stack's own scheduler.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        batch = build_batch(self.tokenizer, prompts, device=self.device)
        with self.disabled(), self._capture_input() as seen:  # routing reads only the layer input
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                       **keep_logits(self.model, 1))
        return self.layer.route(seen[0], batch.prompt_mask)

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
    def save(self, path) -> None:
        """Write ``memoir_config.json`` + ``memoir_state.safetensors`` atomically into ``path``."""
        persist.save_editor(self, path)

    @classmethod
    def load(cls, model: nn.Module, tokenizer, path) -> "MemoirEditor":
        """Attach saved edits to ``model`` (the same base model they were made on; checked)."""
        return persist.load_editor(cls, model, tokenizer, path)

    # ------------------------------------------------------------------ teardown
    def detach(self) -> nn.Module:
        """Remove the memory and restore the original projection; returns the plain model."""
        self._remove_routing()
        self.target.install(self.layer.base)
        return self.model
