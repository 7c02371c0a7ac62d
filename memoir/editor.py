"""MemoirEditor: attach a MEMOIR memory to a HuggingFace causal LM, edit it, query it."""
from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memoir.batching import Batch, build_batch
from memoir.config import MemoirConfig
from memoir.layer import MemoirLayer
from memoir.models import Target, locate_target
from memoir.ops import overlap_counts
from memoir.preserve import KeyStore, project_out
from memoir.replay import capture_below, contiguous_head, keep_logits, replaying_below
from memoir.route import Route
from memoir.routing import PromptRouting
from memoir.tophash import make_permutation

log = logging.getLogger(__name__)

TEMPLATE_SEEDS = ("I", "You", "Because", "Yes", "Q: ")
TEMPLATE_LENGTHS = (5, 10)


@dataclass
class EditRequest:
    prompt: str
    target: str

    @classmethod
    def coerce(cls, item) -> "EditRequest":
        if isinstance(item, EditRequest):
            return item
        if isinstance(item, dict):
            missing = [k for k in ("prompt", "target") if not isinstance(item.get(k), str) or not item.get(k).strip()]
            if missing:
                raise ValueError(f"edit request {item!r} lacks a non-empty {' and '.join(missing)}")
            return cls(item["prompt"], item["target"])
        if isinstance(item, (tuple, list)) and len(item) == 2:
            return cls(str(item[0]), str(item[1]))
        raise TypeError(f"cannot read an edit request from {type(item).__name__}: {item!r}")


@dataclass
class EditResult:
    edit_id: int
    prompt: str
    target: str
    steps: int
    loss: float
    seconds: float
    preserved: tuple[int, ...] = ()  # earlier edits whose keys this edit's update left unchanged


@dataclass
class Retrieval:
    edit_id: int | None
    score: float


def default_background_texts() -> list[str]:
    text = importlib.resources.files("memoir").joinpath("data/background.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


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
            mean, std = self._cached_background(background_texts or default_background_texts())
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

    def _cached_background(self, texts: list[str]):
        """Background statistics, cached per (base weight, target, texts) under the user cache dir."""
        import hashlib

        from safetensors.torch import load_file, save_file

        from memoir.models import cache_dir
        from memoir.persist import weight_fingerprint

        key = hashlib.sha256(
            "\n".join([weight_fingerprint(self.target.module.weight), self.target.qualified_name, *texts]).encode()
        ).hexdigest()[:32]
        path = cache_dir() / "background" / f"{key}.safetensors"
        if path.exists():
            try:
                state = load_file(str(path))
                return state["mean"], state["std"]
            except Exception as exc:  # a damaged cache entry is recomputed
                log.warning("ignoring unreadable background cache %s: %s", path, exc)
        mean, std = self._background_stats(texts)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({"mean": mean.cpu().contiguous(), "std": std.cpu().contiguous()}, str(tmp))
            tmp.replace(path)
        except OSError as exc:
            log.warning("could not cache background statistics in %s: %s", path, exc)
        return mean, std

    @torch.no_grad()
    def _background_stats(self, texts: list[str], batch_size: int = 16):
        """Mean and std over texts of each text's mean edited-layer input (frozen base model)."""
        if not texts:
            raise ValueError("background_texts is empty")
        feats = []
        seen = []
        handle = self.target.module.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
        try:
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True)
                enc = {k: v.to(self.model.device) for k, v in enc.items()}
                seen.clear()
                self.model(**enc, use_cache=False)
                w = enc["attention_mask"].float()
                acts = seen[0].float().reshape(*w.shape, -1)
                feats.append(torch.einsum("bs,bsd->bd", w, acts) / w.sum(1, keepdim=True))
        finally:
            handle.remove()
        feats = torch.cat(feats)
        std = feats.std(dim=0) if len(feats) > 1 else torch.ones_like(feats[0])
        return feats.mean(dim=0), std.clamp_min(1e-6)

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
        """Write one fact: after this, ``prompt`` (and its rephrasings) continue with ``target``."""
        request = EditRequest.coerce({"prompt": prompt, "target": target})
        start = time.perf_counter()
        cfg = self.config
        rows = [tpl.format(request.prompt) for tpl in self.context_templates()]
        batch = build_batch(self.tokenizer, rows, request.target, device=self.device)

        # One frozen pass: the edit's mask (from row 0's prompt) and the input of the edit layer.
        with torch.no_grad(), self.disabled(), self._capture_input() as seen, \
                capture_below(self.target, enabled=not cfg.full_forward) as replay_output:
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                       **keep_logits(self.model, 1))
        acts = seen[0].reshape(*batch.input_ids.shape, -1)
        cols, dense, packed = self.layer.query_masks(acts[:1], batch.prompt_mask[:1])
        owners_before = self.layer.column_usage() if self.config.column_protection > 0 else None
        keys, preserved, basis = None, [], None
        if cfg.preserve_neighbours > 0 or cfg.preserve_energy > 0:
            # Keys: the bare prompt row's inputs at the positions that predict the target tokens.
            positions = batch.target_mask[0, 1:].nonzero().squeeze(1)
            keys = acts[0, positions].float() * dense[0].to(acts.device, torch.float32)
        bank_before = (self.layer.bank.words, self.layer.bank.edit_ids, dict(self.edits),
                       self.keys.snapshot(), self.layer.bank.snapshot())
        memory = self.layer.memory
        # Only these columns (plus whole-matrix weight decay) change: enough to undo a failed edit.
        saved = memory.detach()[:, cols[0]].clone() if cfg.decay_scope != "all" else memory.detach().clone()
        edit_id = self._store_mask(packed[0], request)  # drops the keys of an edit it replaces
        try:
            if keys is not None:
                max_rank = max(1, int(cfg.preserve_max_rank * self.layer.top_k))
                if cfg.preserve_neighbours > 0:
                    preserved = self.keys.neighbours(keys.mean(0), cols[0], cfg.preserve_neighbours,
                                                     self._conflicting_edits(packed[0], bank_before))
                    preserved, basis = self.keys.within_rank(preserved, cols[0], max_rank)
                if cfg.preserve_energy > 0 and len(bank_before[1]) >= cfg.preserve_energy_after:
                    used = 0 if basis is None else basis.shape[1]
                    extra = self.keys.principal_directions(cols[0], cfg.preserve_energy, max_rank - used, basis)
                    if extra is not None:
                        basis = extra if basis is None else torch.cat([basis, extra.to(basis)], dim=1)
            row = self.layer.bank.edit_ids.index(edit_id)
            steps, loss = self._optimise(batch, dense[0], row, replay_output[0] if replay_output else None,
                                         owners_before, cols[0], basis)
            if keys is not None:
                self.keys.add(edit_id, keys)
            self.calibrate_threshold()
        except BaseException:  # interrupted or failed: leave the memory and bank as they were
            with torch.no_grad():
                if cfg.decay_scope != "all":
                    memory[:, cols[0]] = saved
                else:
                    memory.copy_(saved)
            self.layer.bank.restore(bank_before[4])
            self.edits = bank_before[2]
            self.keys.restore(bank_before[3])
            raise
        return EditResult(edit_id, request.prompt, request.target, steps, loss, time.perf_counter() - start,
                          tuple(preserved))

    def _conflicting_edits(self, packed: torch.Tensor, bank_before) -> list[int] | None:
        """Earlier edits whose masks share >= ``preserve_min_overlap`` of the new mask's columns."""
        gate = float(self.config.preserve_min_overlap)
        words, edit_ids = bank_before[0], bank_before[1]
        if gate <= 0:
            return None
        if not edit_ids:
            return []
        shared = overlap_counts(packed[None].to(words.device), words)[0].float() / self.layer.top_k
        return [edit_ids[i] for i in (shared >= gate).nonzero().flatten().tolist()]

    def _store_mask(self, packed: torch.Tensor, request: EditRequest) -> int:
        edit_id = self._next_id
        self._next_id += 1
        row = self.layer.bank.index_of(packed)
        if row is None:
            self.layer.bank.add(packed, edit_id)
        else:
            # The same mask again (e.g. the same prompt re-edited): the new edit owns the row.
            old = self.layer.bank.edit_ids[row]
            self.layer.bank.set_owner(row, edit_id)
            self.edits.pop(old, None)
            self.keys.pop(old)
        self.edits[edit_id] = request
        return edit_id

    def _optimise(self, batch: Batch, mask: torch.Tensor, row: int, replay_output, owners_before=None, cols=None,
                  basis=None):
        cfg = self.config
        memory = self.layer.memory
        decay = cfg.weight_decay if cfg.decay_scope == "all" else 0.0
        opt = torch.optim.SGD([memory], lr=cfg.lr, weight_decay=decay)
        n_target = int(batch.target_mask[0].sum())
        # Every row ends with the same target tokens (left padding), so only the last
        # n_target + 1 positions' logits are needed; the full_forward path computes all of them
        # like the reference loop does.
        labels = batch.input_ids[:, -n_target:]
        keep = {} if cfg.full_forward else keep_logits(self.model, n_target + 1)
        grad_scale = None
        if owners_before is not None:
            grad_scale = 1.0 / (1.0 + cfg.column_protection * owners_before.to(memory.device, memory.dtype))
            if cfg.column_protection_mode == "relative":
                grad_scale = grad_scale / grad_scale[cols].mean()
        if basis is not None:
            basis = basis.to(memory.device, memory.dtype)
        steps, prev, loss_value = 0, None, float("nan")
        memory.requires_grad_(True)
        # Every row of the edit batch reads the edit's own (already stored) mask.
        train_route = Route.to_row(row, batch.input_ids.shape[0], memory.device)
        # Tiny gradients into a zero-initialised memory are denormal floats, which run many
        # times slower on x86 CPUs; flush them to zero while editing (torch has no getter, so
        # the setting is switched back off afterwards).
        flushing = memory.device.type == "cpu" and torch.set_flush_denormal(True)
        try:
            with replaying_below(self.target, replay_output), contiguous_head(self.model), torch.enable_grad(), \
                    self.layer.using_route(train_route):
                for _ in range(cfg.n_iter):
                    logits = self.model(
                        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **keep
                    ).logits
                    logits = logits[:, -(n_target + 1) : -1]
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
                    loss_value = loss.detach().item()
                    if (
                        cfg.early_stop
                        and prev is not None
                        and abs(loss_value - prev) <= cfg.early_stop_delta
                        and loss_value <= cfg.early_stop_loss
                    ):
                        break
                    prev = loss_value
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if grad_scale is not None:
                        memory.grad.mul_(grad_scale)
                    if cfg.decay_scope == "active" and cfg.weight_decay > 0:
                        memory.grad.add_(memory.detach() * mask.to(memory.dtype), alpha=cfg.weight_decay)
                    if basis is not None:  # last, so decay and protection are projected too
                        g = memory.grad
                        g[:, cols] = project_out(g[:, cols], basis)
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_([memory], cfg.grad_clip)
                    opt.step()
                    steps += 1
        finally:
            if flushing:
                torch.set_flush_denormal(False)
            memory.requires_grad_(False)
            memory.grad = None
        return steps, loss_value

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
        from memoir.persist import save_editor

        save_editor(self, path)

    @classmethod
    def load(cls, model: nn.Module, tokenizer, path) -> "MemoirEditor":
        """Attach saved edits to ``model`` (the same base model they were made on; checked)."""
        from memoir.persist import load_editor

        return load_editor(cls, model, tokenizer, path)

    # ------------------------------------------------------------------ teardown
    def detach(self) -> nn.Module:
        """Remove the memory and restore the original projection; returns the plain model."""
        self._remove_routing()
        self.target.install(self.layer.base)
        return self.model
