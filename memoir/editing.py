"""One edit, in parts that read alone: encode the prompt, protect earlier edits, train, all or nothing.

* :func:`encode_edit`: the rows (prompt under each context template + target), one frozen pass
  that yields the edit's TopHash mask, the edited layer's inputs, the output to replay below it
  and the preservation keys;
* :class:`EditTransaction`: snapshots everything an edit may change (memory, bank, keys, edit
  records, threshold, next id) and restores all of it if the edit fails or is interrupted;
* :func:`preservation_basis`: the directions inside the edit's columns that it must not write
  along (keys of conflicting neighbours, energy of the stored keys);
* :func:`gradient_transforms`: the ordered list of in-place changes to the memory gradient
  (column protection, decay of the active columns, projection, clipping);
* :func:`optimise`: the training loop over the memory, every row routed to the edit's own mask;
  it stops at the first non-finite value (:class:`EditDiverged`) and reports the kept memory's loss;
* :func:`joint_batch`, :func:`optimise_many`, :func:`routed_losses`: several edits trained together
  on the scratch memory (``memory: private``), each row under its own edit's mask.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from memoir.batching import Batch, build_batch, pad_rows, prompt_ids
from memoir.ops import overlap_counts
from memoir.preserve import project_out
from memoir.replay import capture_below, contiguous_head, keep_logits, replaying_below
from memoir.route import Route
from memoir.tophash import prompt_features
from memoir.types import EditRecords, EditRequest

GradTransform = Callable[[torch.Tensor], None]  # changes the memory gradient in place


@dataclass
class EditInputs:
    """What one frozen pass over the edit's rows tells the edit."""

    batch: Batch
    cols: torch.Tensor  # [k] memory columns of the edit's mask
    dense: torch.Tensor  # [D] bool mask
    packed: torch.Tensor  # [W] packed mask
    replay_output: object  # output of the layer below the edited one (None: full forward)
    keys: torch.Tensor | None  # [P, D] layer inputs predicting the target tokens, masked (or None)
    question: torch.Tensor | None = None  # [D] question key of the bare prompt (:func:`question_keys`)
    others: "OtherQuestions | None" = None  # other questions about the subject to leave unchanged


def question_keys(layer, acts: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` unit vectors: each row's layer input at its last prompt token (the position that
    predicts the answer), de-centred and scaled as the layer's TopHash features are."""
    last = prompt_features(acts, span, "last").float()
    return F.normalize((last - layer.background_mean.to(last.device)) / layer.background_std.to(last.device), dim=-1)


@torch.no_grad()
def encode_edit(editor, request: EditRequest) -> EditInputs:
    """Tokenise the edit's rows and run the frozen model once over them."""
    cfg = editor.config
    rows = [tpl.format(request.prompt) for tpl in editor.context_templates()]
    batch = build_batch(editor.tokenizer, rows, request.target, device=editor.device)
    with capture_below(editor.target, enabled=not editor.full_forward) as replay_output:
        acts = editor.layer_inputs(batch)  # the unedited model, no routing for this pass
    # The mask comes from row 0: the bare prompt, without a context template.
    cols, dense, packed = editor.layer.query_masks(acts[:1], batch.prompt_mask[:1])
    keys = None
    if (cfg.preserve_neighbours > 0 or cfg.preserve_energy > 0) and cfg.memory == "shared":
        positions = batch.target_mask[0, 1:].nonzero().squeeze(1)
        keys = acts[0, positions].float() * dense[0].to(acts.device, torch.float32)
    question = question_keys(editor.layer, acts[:1], batch.prompt_mask[:1])[0] if cfg.other_questions > 0 else None
    return EditInputs(batch, cols[0], dense[0], packed[0], replay_output[0] if replay_output else None, keys,
                      question)


@dataclass
class OtherQuestions:
    """Other questions about an edit's subject, trained beside the edit's rows in one batch."""

    prompts: list[str]
    batch: Batch  # the edit's rows, then the other questions (prompt only), left padded together
    replay_output: object  # output of the layer below the edited one for that batch (None: full forward)
    reference: torch.Tensor  # [n, V] the unedited model's next-token log-probabilities of the questions
    n_edit_rows: int  # the edit's rows come first


def edit_rows(batch: Batch) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, target ids)`` of each row of a batch (padding dropped)."""
    return [(batch.input_ids[r][batch.prompt_mask[r]].tolist(), batch.input_ids[r][batch.target_mask[r]].tolist())
            for r in range(batch.input_ids.shape[0])]


@torch.no_grad()
def other_questions(editor, request: EditRequest, inputs: EditInputs) -> OtherQuestions | None:
    """``other_questions`` relation wordings about the request's subject that its training keeps
    unchanged (None: off, or an edit without a subject).

    The wordings whose question key is most like the edit prompt's (``other_questions_skip`` of them)
    may ask the same relation in other words, so they are never used; the rest are drawn at random,
    seeded by the config seed and the prompt, so an edit made again trains the same ones.  One frozen
    pass over the edit's rows and the questions gives the replay and the questions' reference."""
    cfg = editor.config
    if cfg.other_questions <= 0 or not request.subject or inputs.question is None:
        return None
    templates, keys = editor.relation_question_keys()
    order = (keys @ inputs.question.to(keys.device)).argsort(descending=True).tolist()
    allowed = sorted(order[cfg.other_questions_skip:])
    if not allowed:
        return None
    seed = cfg.seed * 1_000_003 + int.from_bytes(hashlib.sha256(request.prompt.encode()).digest()[:4], "little")
    pick = torch.randperm(len(allowed), generator=torch.Generator().manual_seed(seed))[: cfg.other_questions]
    prompts = [templates[allowed[i]].format(request.subject) for i in sorted(pick.tolist())]
    rows = edit_rows(inputs.batch)
    batch = pad_rows(rows + [(prompt_ids(editor.tokenizer, q), []) for q in prompts], editor.tokenizer,
                     editor.device)
    with editor.disabled(), editor.layer.using_route(Route.unrouted(len(batch.input_ids), editor.device)), \
            capture_below(editor.target, enabled=not editor.full_forward) as replay_output:
        logits = editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                              **keep_logits(editor.model, 1)).logits[len(rows):, -1]
    return OtherQuestions(prompts, batch, replay_output[0] if replay_output else None,
                          F.log_softmax(logits.float(), dim=-1), len(rows))


def row_scales(cfg, others: OtherQuestions, private: bool, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the memory reads in a joint batch: the edit's rows as they train (``train_input_scale``),
    the other questions as a query's prompt pass will read the stored block (``block_gain``, memory
    private)."""
    n = others.batch.input_ids.shape[0]
    scale = torch.full((n,), float(cfg.train_input_scale), device=device)
    scale[others.n_edit_rows:] = float(cfg.block_gain) if private else 1.0
    return lambda a: a * scale.to(a.dtype).reshape(-1, *([1] * (a.dim() - 1)))


def other_questions_drift(logits: torch.Tensor, others: OtherQuestions) -> torch.Tensor:
    """Mean KL(unedited || edited) of the other questions' next token, from the joint batch's logits
    ``[rows, positions, V]`` (the questions' rows last, their next token at the last position)."""
    edited = F.log_softmax(logits[others.n_edit_rows:, -1].float(), dim=-1)
    return F.kl_div(edited, others.reference, log_target=True, reduction="batchmean")


class EditTransaction:
    """``with EditTransaction(editor):`` the block's changes to the editor stick only if it finishes.

    Memory, bank and keys are snapshotted whole (bank and key tensors are replaced, never
    modified in place, so holding them is the snapshot; the memory is copied), along with the
    edit records, the threshold in force and the next edit id.
    """

    def __init__(self, editor):
        self.editor = editor

    def __enter__(self) -> "EditTransaction":
        ed, layer = self.editor, self.editor.layer
        self.memory = layer.memory.detach().clone()
        self.bank = layer.bank.snapshot()
        self.keys = layer.keys.snapshot()
        self.subject = layer.subject.snapshot() if layer.subject is not None else None
        self.private = layer.private.snapshot() if layer.private is not None else None
        self.records = EditRecords(ed._records)
        self.removed = list(ed.removed)
        self.threshold = layer.threshold
        self.next_id = ed._next_id
        return self

    @property
    def bank_words(self) -> torch.Tensor:
        """The bank as it was before the edit."""
        return self.bank[0]

    @property
    def bank_ids(self) -> list[int]:
        return self.bank[1].tolist()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.rollback()
        return False

    def rollback(self) -> None:
        ed, layer = self.editor, self.editor.layer
        with torch.no_grad():
            layer.memory.copy_(self.memory)
        layer.memory.grad = None
        layer.bank.restore(self.bank)
        layer.keys.restore(self.keys)
        if self.subject is not None:
            layer.subject.restore(self.subject)
        if self.private is not None:
            layer.private.restore(self.private)
        ed._records = self.records
        ed.removed = self.removed
        layer.threshold = self.threshold
        ed._next_id = self.next_id


def conflicting_edits(packed: torch.Tensor, bank_words: torch.Tensor, bank_ids: list[int], top_k: int,
                      gate: float) -> list[int] | None:
    """Stored edits whose masks share >= ``gate`` of the new mask's columns (None: no gate)."""
    if gate <= 0:
        return None
    if not bank_ids:
        return []
    shared = overlap_counts(packed[None].to(bank_words.device), bank_words)[0].float() / top_k
    return [bank_ids[i] for i in (shared >= gate).nonzero().flatten().tolist()]


def preservation_basis(editor, inputs: EditInputs, txn: EditTransaction):
    """``(preserved edit ids, orthonormal basis [k, r] or None)``: what the edit must leave unchanged.

    Exactly preserved neighbours first (the stored edits with conflicting masks whose keys align
    most with the new one), then the leading directions of all stored keys' energy inside the
    edit's columns; together at most ``preserve_max_rank * k`` directions.
    """
    cfg, keys = editor.config, editor.keys
    if inputs.keys is None:
        return [], None
    max_rank = max(1, int(cfg.preserve_max_rank * editor.layer.top_k))
    preserved, basis = [], None
    if cfg.preserve_neighbours > 0:
        candidates = conflicting_edits(inputs.packed, txn.bank_words, txn.bank_ids, editor.layer.top_k,
                                       float(cfg.preserve_min_overlap))
        preserved = keys.neighbours(inputs.keys.mean(0), inputs.cols, cfg.preserve_neighbours, candidates)
        preserved, basis = keys.within_rank(preserved, inputs.cols, max_rank)
    if cfg.preserve_energy > 0 and len(txn.bank_ids) >= cfg.preserve_energy_after:
        used = 0 if basis is None else basis.shape[1]
        extra = keys.principal_directions(inputs.cols, cfg.preserve_energy, max_rank - used, basis)
        if extra is not None:
            basis = extra if basis is None else torch.cat([basis, extra.to(basis)], dim=1)
    return preserved, basis


def gradient_transforms(cfg, memory: torch.nn.Parameter, inputs: EditInputs, owners_before: torch.Tensor | None,
                        basis: torch.Tensor | None) -> list[GradTransform]:
    """The in-place changes to the memory gradient, in the order they apply."""
    transforms: list[GradTransform] = []
    if owners_before is not None:  # prefer columns fewer earlier edits own
        scale = 1.0 / (1.0 + cfg.column_protection * owners_before.to(memory.device, memory.dtype))
        if cfg.column_protection_mode == "relative":
            scale = scale / scale[inputs.cols].mean()
        transforms.append(lambda g: g.mul_(scale))
    if cfg.decay_scope == "active" and cfg.weight_decay > 0:  # decay the edit's own columns only
        active = inputs.dense.to(memory.device, memory.dtype)
        transforms.append(lambda g: g.add_(memory.detach() * active, alpha=cfg.weight_decay))
    if basis is not None:  # last before clipping, so decay and protection are projected too
        q, cols = basis.to(memory.device, memory.dtype), inputs.cols

        def project(g):
            g[:, cols] = project_out(g[:, cols], q)
        transforms.append(project)
    transforms.append(lambda g: torch.nn.utils.clip_grad_norm_([memory], cfg.grad_clip))  # grad_clip > 0 always
    return transforms


def overlapping_edits(packed: torch.Tensor, bank_words: torch.Tensor, bank_ids: list[int], m: int) -> list[int]:
    """The ``m`` stored edits whose masks share most columns with ``packed`` (ties: older first)."""
    if m <= 0 or not bank_ids:
        return []
    shared = overlap_counts(packed[None].to(bank_words.device), bank_words)[0].tolist()
    order = sorted(range(len(bank_ids)), key=lambda i: (-shared[i], i))
    return [bank_ids[i] for i in order[:m] if shared[i] > 0]


@torch.no_grad()
def still_reached(editor, edit_ids: list[int]) -> list[bool]:
    """Whether each stored edit's bare prompt still predicts its target, teacher-forced and routed
    to its own bank row (one batched pass)."""
    if not edit_ids:
        return []
    records = [editor._records[i] for i in edit_ids]
    rows = [editor.layer.bank.edit_ids.index(i) for i in edit_ids]
    batch = build_batch(editor.tokenizer, [r.prompt for r in records], [r.target for r in records],
                        device=editor.device)
    route = Route(torch.tensor(rows, dtype=torch.int64, device=editor.device),
                  torch.ones(len(rows), device=editor.device))
    with editor.layer.using_route(route):
        logits = editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    labels = batch.labels[:, 1:]
    hit = (logits[:, :-1].argmax(-1) == labels) | (labels == -100)
    return hit.all(dim=1).tolist()


@torch.no_grad()
def teacher_forced(editor, inputs: EditInputs, row: int) -> tuple[float, bool]:
    """``(loss over the edit's rows, whether row 0 predicts every target token)`` as the editor
    stands, every row routed to bank row ``row``."""
    batch, model = inputs.batch, editor.model
    n_target = int(batch.target_mask[0].sum())
    labels = batch.input_ids[:, -n_target:]
    route = Route.to_row(row, batch.input_ids.shape[0], editor.device)
    # The layers below the edit are frozen: their output from the edit's own frozen pass is replayed.
    with editor.layer.using_route(route), replaying_below(editor.target, inputs.replay_output), contiguous_head(model):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                       **keep_logits(model, n_target + 1)).logits[:, -(n_target + 1): -1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
    return float(loss), bool((logits[0].argmax(-1) == labels[0]).all())


def input_augmentation(cfg) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the memory reads while an edit trains (``train_input_scale``), or None for the layer
    input as it is."""
    scale = cfg.train_input_scale
    return None if scale == 1.0 else (lambda a: a * scale)


def keep_block(editor, inputs: EditInputs, edit_id: int, block: torch.Tensor) -> None:
    """Store an edit's trained block ``[out, k]`` as its private block: with the config's gain and
    the length of its target (how many decode steps need it)."""
    editor.layer.private.add(edit_id, inputs.cols, editor.config.block_gain * block,
                             int(inputs.batch.target_mask[0].sum()))


def store_private(editor, inputs: EditInputs, edit_id: int, row: int, training: Training) -> Training:
    """Under memory "private": move the block the edit trained on the scratch memory into its own
    factors, empty the scratch, and report the loss and convergence of the block as stored."""
    memory = editor.layer.memory
    with torch.no_grad():
        keep_block(editor, inputs, edit_id, memory[:, inputs.cols.to(memory.device)])
        memory.zero_()
    loss, converged = teacher_forced(editor, inputs, row)
    return Training(training.steps, loss, converged)


class EditDiverged(FloatingPointError):
    """An edit's training produced a non-finite loss or memory; the editor was rolled back."""


@dataclass
class Training:
    """What the training loop left: the kept memory's loss and whether it produces the target."""

    steps: int
    loss: float  # teacher-forced loss of the memory as kept (after the last step)
    converged: bool  # row 0 (the bare prompt) predicts every target token, teacher-forced


@contextlib.contextmanager
def trainable(memory: torch.nn.Parameter):
    """The memory takes gradients inside the block, and never afterwards.

    Tiny gradients into a zero-initialised memory are denormal floats, which run many times
    slower on x86 CPUs; they are flushed to zero meanwhile (torch has no getter, so the setting
    is switched back off afterwards).
    """
    memory.requires_grad_(True)
    flushing = memory.device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(False)
        memory.requires_grad_(False)
        memory.grad = None


def optimise(editor, inputs: EditInputs, row: int, transforms: list[GradTransform]) -> Training:
    """SGD on the memory with every row routed to bank row ``row``.

    Raises :class:`EditDiverged` as soon as the loss or the memory stops being finite (the
    caller's transaction restores the memory), so a non-finite value is never kept.
    """
    cfg, model, memory = editor.config, editor.model, editor.layer.memory
    others = inputs.others
    # With other questions, one batch holds the edit's rows and then the questions.
    batch, replay = (inputs.batch, inputs.replay_output) if others is None else (others.batch, others.replay_output)
    n_rows = inputs.batch.input_ids.shape[0]
    decay = cfg.weight_decay if cfg.decay_scope == "all" else 0.0
    opt = torch.optim.SGD([memory], lr=cfg.lr, weight_decay=decay)
    n_target = int(inputs.batch.target_mask[0].sum())
    # Every row ends with the same target tokens (left padding), so only the last n_target + 1
    # positions' logits are needed; full_forward computes all of them as the reference loop does.
    labels = batch.input_ids[:n_rows, -n_target:]
    keep = {} if editor.full_forward else keep_logits(model, n_target + 1)
    route = Route.to_row(row, batch.input_ids.shape[0], memory.device)
    reads = contextlib.nullcontext() if others is None else \
        editor.layer.training_passes(row_scales(cfg, others, editor.layer.private is not None, memory.device))
    steps, prev = 0, None
    with trainable(memory):
        with replaying_below(editor.target, replay), contiguous_head(model), torch.enable_grad(), \
                editor.layer.using_route(route), reads:
            # n_iter steps, then one more forward: the loss reported is that of the memory kept.
            while True:
                full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                             **keep).logits
                logits = full[:n_rows, -(n_target + 1): -1]
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
                loss_value, drift_value = loss.detach().item(), 0.0
                if others is not None:
                    drift = other_questions_drift(full, others)
                    drift_value = drift.detach().item()
                    loss = loss + cfg.other_questions_weight * drift
                if not (math.isfinite(loss_value) and math.isfinite(drift_value)):
                    raise EditDiverged(f"the edit diverged: loss {loss_value} (other questions {drift_value}) after "
                                       f"{steps} steps (lr={cfg.lr}, grad_clip={cfg.grad_clip}); nothing was kept")
                # Early stop reads the edit's own loss; the other questions' drift need only be tolerable.
                if steps == cfg.n_iter or (cfg.early_stop and prev is not None
                                           and abs(loss_value - prev) <= cfg.early_stop_delta
                                           and loss_value <= cfg.early_stop_loss
                                           and drift_value <= cfg.other_questions_tolerance):
                    break
                prev = loss_value
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for transform in transforms:
                    transform(memory.grad)
                opt.step()
                steps += 1
                if not bool(torch.isfinite(memory).all()):
                    raise EditDiverged(f"the edit diverged: non-finite memory after step {steps} "
                                       f"(lr={cfg.lr}, grad_clip={cfg.grad_clip}); nothing was kept")
            converged = bool((logits[0].argmax(-1) == labels[0]).all())
    return Training(steps, loss_value, converged)


# ---------------------------------------------------------------------------- batched editing
@dataclass
class JointBatch:
    """The rows of several edits in one batch: edit ``e`` owns rows ``owner == e``."""

    batch: Batch
    owner: torch.Tensor  # [rows] index of the edit each row belongs to
    replay_output: object  # output of the layer below the edited one (None: full forward)
    n_target: int  # the longest target, in tokens
    first: torch.Tensor  # [E] each edit's first row (its bare prompt)


@torch.no_grad()
def joint_batch(editor, inputs: list[EditInputs]) -> JointBatch:
    """Every row of every edit, left padded to one length, and one frozen pass for the replay."""
    rows, owner = [], []
    for e, one in enumerate(inputs):
        mine = edit_rows(one.batch)
        rows.extend(mine)
        owner.extend([e] * len(mine))
    device = editor.device
    batch = pad_rows(rows, editor.tokenizer, device)
    with capture_below(editor.target, enabled=not editor.full_forward) as replay_output:
        editor.layer_inputs(batch)
    first = [owner.index(e) for e in range(len(inputs))]
    return JointBatch(batch, torch.tensor(owner, device=device), replay_output[0] if replay_output else None,
                      int(batch.target_mask.sum(dim=1).max()), torch.tensor(first, device=device))


def per_edit_losses(logits: torch.Tensor, joint: JointBatch, n_edits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean target cross-entropy per edit [E], whether each edit's first row predicts all its
    target tokens [E])`` from the logits of the last ``n_target + 1`` positions."""
    labels = joint.batch.labels[:, -joint.n_target:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                         reduction="none", ignore_index=-100).view(labels.shape)
    valid = (labels != -100).float()
    per_row, count = (ce * valid).sum(dim=1), valid.sum(dim=1)
    losses = torch.zeros(n_edits, device=ce.device).index_add_(0, joint.owner, per_row)
    losses = losses / torch.zeros(n_edits, device=ce.device).index_add_(0, joint.owner, count)
    hit = ((logits.argmax(-1) == labels) | (labels == -100)).all(dim=1)
    return losses, hit[joint.first]


def _take_rows(output, idx: torch.Tensor, n_rows: int):
    """The rows ``idx`` of a captured layer output (a tensor, or a tuple holding batch tensors)."""
    if isinstance(output, torch.Tensor):
        return output[idx] if output.dim() > 0 and output.shape[0] == n_rows else output
    if isinstance(output, (tuple, list)):
        return type(output)(_take_rows(x, idx, n_rows) for x in output)
    return output


def _rows_of(joint: JointBatch, edits: list[int]) -> JointBatch:
    """The part of ``joint`` that belongs to ``edits`` (renumbered 0..len(edits)-1, in that order)."""
    idx = torch.cat([(joint.owner == e).nonzero().squeeze(1) for e in edits])
    owner = torch.cat([torch.full(((joint.owner == e).sum(),), j, device=joint.owner.device)
                       for j, e in enumerate(edits)])
    b = joint.batch
    batch = Batch(b.input_ids[idx], b.attention_mask[idx], b.prompt_mask[idx], b.target_mask[idx])
    first = torch.tensor([int((owner == j).nonzero()[0]) for j in range(len(edits))], device=owner.device)
    return JointBatch(batch, owner, _take_rows(joint.replay_output, idx, len(joint.owner)), joint.n_target, first)


def optimise_many(editor, joint: JointBatch, bank_rows: list[int], cols: list[torch.Tensor],
                  dense: list[torch.Tensor]) -> tuple[list[int], list[torch.Tensor]]:
    """SGD on the scratch memory for several edits at once, each row under its own edit's mask.

    The loss is the sum of the edits' mean losses, so each edit's columns get the gradient they
    would get alone; the norm clip grows with sqrt(edits) for the same reason (masks mostly do not
    overlap).  An edit leaves the batch as soon as it meets the early-stop rule (or after
    ``n_iter`` steps): its block ``memory[:, cols]`` is taken then, and its rows stop costing
    compute.  Returns ``(steps per edit, block per edit)``; non-finite values raise
    :class:`EditDiverged`.
    """
    cfg, model, memory = editor.config, editor.model, editor.layer.memory
    opt = torch.optim.SGD([memory], lr=cfg.lr, weight_decay=cfg.weight_decay if cfg.decay_scope == "all" else 0.0)
    keep = {} if editor.full_forward else keep_logits(model, joint.n_target + 1)
    n_edits = len(bank_rows)
    steps_of, blocks = [0] * n_edits, [None] * n_edits
    active, prev, step = list(range(n_edits)), {}, 0
    with trainable(memory):
        while active:
            part = _rows_of(joint, active)
            rows = torch.tensor([bank_rows[e] for e in active], dtype=torch.int64, device=memory.device)
            route = Route(rows[part.owner.to(memory.device)], torch.ones(len(part.owner), device=memory.device))
            decay = torch.stack([dense[e] for e in active]).any(dim=0).to(memory.device, memory.dtype)
            clip = cfg.grad_clip * math.sqrt(len(active))
            batch = part.batch
            with replaying_below(editor.target, part.replay_output), contiguous_head(model), torch.enable_grad(), \
                    editor.layer.using_route(route):
                while True:
                    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                                   **keep).logits[:, -(joint.n_target + 1): -1]
                    losses, _ = per_edit_losses(logits, part, len(active))
                    values = losses.detach().tolist()
                    if not all(math.isfinite(v) for v in values):
                        raise EditDiverged(f"a batched edit diverged after {step} steps (lr={cfg.lr}); "
                                           "nothing was kept")
                    done = [e for e, v in zip(active, values)
                            if step == cfg.n_iter or (cfg.early_stop and e in prev and v <= cfg.early_stop_loss
                                                      and abs(v - prev[e]) <= cfg.early_stop_delta)]
                    if done:
                        with torch.no_grad():
                            for e in done:
                                steps_of[e], blocks[e] = step, memory[:, cols[e].to(memory.device)].clone()
                        active = [e for e in active if e not in done]
                        break  # the rest go on without these rows
                    prev.update(zip(active, values))
                    opt.zero_grad(set_to_none=True)
                    losses.sum().backward()
                    if cfg.decay_scope == "active" and cfg.weight_decay > 0:
                        memory.grad.add_(memory.detach() * decay, alpha=cfg.weight_decay)
                    torch.nn.utils.clip_grad_norm_([memory], clip)
                    opt.step()
                    step += 1
                    if not bool(torch.isfinite(memory).all()):
                        raise EditDiverged(f"a batched edit diverged: non-finite memory after step {step}; "
                                           "nothing was kept")
    return steps_of, blocks


@torch.no_grad()
def routed_losses(editor, joint: JointBatch, bank_rows: list[int]) -> tuple[list[float], list[bool]]:
    """Per edit, the loss and convergence of its stored block (every row routed to its edit)."""
    model = editor.model
    rows = torch.tensor(bank_rows, dtype=torch.int64, device=editor.device)[joint.owner]
    with editor.layer.using_route(Route(rows, torch.ones(len(rows), device=editor.device))):
        logits = model(input_ids=joint.batch.input_ids, attention_mask=joint.batch.attention_mask, use_cache=False,
                       **keep_logits(model, joint.n_target + 1)).logits[:, -(joint.n_target + 1): -1]
    losses, hit = per_edit_losses(logits, joint, len(bank_rows))
    return losses.tolist(), hit.tolist()
