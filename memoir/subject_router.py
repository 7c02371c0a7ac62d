"""Subject verification for routing (``router: subject``): an edit is eligible for a query only when
the query mentions the edit's subject, judged from hidden states, not from strings.

Keys of an edit: the hidden states, at an early layer ``L``, of every token of the edit's subject in
``PREFIX + prompt``, minus the mean token state of background texts there; one group of keys per
form of the subject (as given, lower-cased).  Score of a query for a group: the mean over the
group's keys of the best cosine between that key and any token of ``PREFIX + query`` (one partial
forward through the first ``L`` layers at the prompt pass); an edit scores its best group.  Every
subject token must be found, so subjects sharing only a last word ("1983 World Snooker
Championship", "United Rugby Championship") stay apart, while a mean, unlike a minimum, forgives
one changed token (a typo, a possessive).  Query and key texts are both tokenised as ``PREFIX + text``,
so a subject at the start of a prompt gets the same tokens as a subject mid-sentence.  The neutral
``PREFIX`` matters too: without it the subject of a prompt often sits on the first tokens, whose
states are dominated by the attention sink (experiments/subject_key_probe.py,
experiments/subject_tokens_probe.py measure these choices on the public files).

Among the eligible edits (score >= ``subject_threshold``) the memory layer picks the one with the
largest TopHash mask overlap, so two edits about one subject are told apart by their relation, and
switches it on only when that overlap reaches ``threshold``.  Only the prompt is searched for the
subject: in a teacher-forced ``prompt + target`` pass the target tokens are not part of the query.
"""
from __future__ import annotations

import inspect
import weakref

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from memoir.state import GrowingBuffers

PREFIX = "Here is a question. "


class _Stop(Exception):
    pass


def token_states(model, layers, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states after decoder layer ``layer - 1`` (``hidden_states[layer]``): ``[B, S, d]``.

    Runs only the first ``layer`` decoder layers (a forward hook stops the pass there).
    """
    kwargs = {}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    return _run_to(model, layers, layer, input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)


class PrefixedStates:
    """``(states [B, S, d], own [B, S])`` of ``PREFIX + text`` at the subject layer for a batch of
    texts, as :func:`prefixed_batch` + :func:`token_states` compute them, but with the prefix's
    keys and values computed once and reused: the prefix is a third to a half of a short prompt's
    tokens, and causal attention makes its states independent of the text after it.  The texts'
    tokens are right padded after the shared prefix.  A model whose forward takes no
    cache / ``position_ids``, or a text whose tokens do not start with the prefix's
    own tokens, takes the plain pass."""

    def __init__(self, model, layers, layer: int, tokenizer):
        self.model, self.layers, self.layer, self.tokenizer = model, layers, layer, tokenizer
        params = inspect.signature(model.forward).parameters
        # transformers renamed ``past_key_values`` to ``cache``; either carries the prefix.
        self.cache_arg = next((a for a in ("cache", "past_key_values") if a in params), None)
        self.usable = self.cache_arg is not None and "position_ids" in params
        self._prefix_ids: list[int] | None = None
        self._kv = None  # per layer below the subject layer: (keys, values) of the prefix, batch 1

    def __call__(self, texts: list[str], device=None):
        enc = self.tokenizer([PREFIX + t for t in texts], return_offsets_mapping=True) if self.usable else None
        if enc is None or not all(self._starts_with_prefix(ids, offs, device)
                                  for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])):
            ids, attn, own = prefixed_batch(self.tokenizer, texts, device)
            return token_states(self.model, self.layers, self.layer, ids, attn), own
        p = len(self._prefix_ids)
        rows = [ids[p:] for ids in enc["input_ids"]]
        ends = [[b for _, b in offs[p:]] for offs in enc["offset_mapping"]]
        width = max(1, max(len(r) for r in rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        own = torch.tensor([[e >= len(PREFIX) for e in row] + [False] * (width - len(row)) for row in ends],
                           dtype=torch.bool, device=device)
        b = len(texts)
        attention = torch.cat([torch.ones((b, p), dtype=mask.dtype, device=device), mask], dim=1)
        positions = torch.arange(p, p + width, device=device).expand(b, -1)
        cache = DynamicCache()
        for i, (k, v) in enumerate(self._kv):
            cache.update(k.expand(b, *k.shape[1:]).contiguous(), v.expand(b, *v.shape[1:]).contiguous(), i)
        states = _run_to(self.model, self.layers, self.layer, input_ids=ids, attention_mask=attention,
                         position_ids=positions, use_cache=True, **{self.cache_arg: cache})
        return states, own

    def _starts_with_prefix(self, ids: list[int], offsets, device) -> bool:
        """Whether a prefixed text's tokens are the prefix's own, then the text's only."""
        prefix = self._prefix(device)
        return ids[: len(prefix)] == prefix and (len(ids) == len(prefix) or offsets[len(prefix)][1] >= len(PREFIX))

    def _prefix(self, device) -> list[int]:
        if self._kv is None:
            # The prefix's tokens as they start a prefixed text (the trailing space joins the text's
            # first word): those ending before the text.
            enc = self.tokenizer(PREFIX + "x", return_offsets_mapping=True)
            ids = [i for i, (_, end) in zip(enc["input_ids"], enc["offset_mapping"]) if end < len(PREFIX)]
            cache = DynamicCache()
            t = torch.tensor([ids], device=device)
            _run_to(self.model, self.layers, self.layer, input_ids=t, attention_mask=torch.ones_like(t),
                    position_ids=torch.arange(len(ids), device=device)[None], use_cache=True, **{self.cache_arg: cache})
            self._kv = [_layer_kv(cache, i) for i in range(self.layer)]
            self._prefix_ids = ids
        return self._prefix_ids


def _layer_kv(cache, i: int):
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


def _run_to(model, layers, layer: int, **inputs) -> torch.Tensor:
    """The output of decoder layer ``layer - 1`` for ``model(**inputs)``, the layers above not run."""
    seen = []

    def grab(module, args, output):
        seen.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = layers[layer - 1].register_forward_hook(grab)
    try:
        with torch.no_grad():
            model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"decoder layer {layer - 1} did not run")
    return seen[0].float()


def prefixed_batch(tokenizer, texts: list[str], device=None):
    """``PREFIX + text`` for each text, tokenised together and left padded: ``(ids, attention, own)``,
    ``own`` marking the tokens of the text itself."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer([PREFIX + t for t in texts], padding=True, return_offsets_mapping=True,
                        return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    attn = enc["attention_mask"]
    own = (enc["offset_mapping"][..., 1] >= len(PREFIX)) & attn.bool()
    return enc["input_ids"].to(device), attn.to(device), own.to(device)


def row_texts(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
    """The text of each row's attended tokens (special tokens dropped)."""
    return tokenizer.batch_decode([ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)],
                                  skip_special_tokens=True)


class SubjectKeys(GrowingBuffers):
    """Subject keys of the stored edits (module state): ``keys [K, d]`` float32, ``edit_ids [K]``, the
    key group of each key ``groups [K]`` (one group per form of an edit's subject), and the background
    token mean ``mean [d]`` at the key layer."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("keys", torch.zeros((0, dim)))
        self.register_buffer("edit_ids", torch.zeros((0,), dtype=torch.int64))
        self.register_buffer("groups", torch.zeros((0,), dtype=torch.int64))
        self.register_buffer("mean", torch.zeros(dim))
        self._lead_cache = None  # (weak refs to the keys and groups it was built from, lead keys, sizes)
        self._order_cache = None  # (weak ref to the bank ids it was built from, their version, order, sorted)

    def __len__(self) -> int:
        return self.keys.shape[0]

    def add(self, edit_id: int, groups: list[torch.Tensor]) -> None:
        """Add one edit's key groups, each ``[m, d]`` (the states of one form of its subject)."""
        start = int(self.groups.max()) + 1 if len(self) else 0
        dev = self.keys.device
        keys = torch.cat([g.float().to(dev) for g in groups])
        keys = F.normalize(keys - self.mean, dim=-1)
        ids = torch.full((keys.shape[0],), int(edit_id), dtype=torch.int64, device=dev)
        group = torch.cat([torch.full((g.shape[0],), start + j, dtype=torch.int64, device=dev)
                           for j, g in enumerate(groups)])
        self.keys = torch.cat([self.keys, keys])
        self.edit_ids = torch.cat([self.edit_ids, ids])
        self.groups = torch.cat([self.groups, group])

    def pop(self, edit_id: int) -> None:
        keep = self.edit_ids != int(edit_id)
        self.keys, self.edit_ids, self.groups = self.keys[keep], self.edit_ids[keep], self.groups[keep]

    def snapshot(self):
        return self.keys, self.edit_ids, self.groups

    def restore(self, snapshot) -> None:
        self.keys, self.edit_ids, self.groups = snapshot

    def scores(self, states: torch.Tensor, own: torch.Tensor, bank_ids: torch.Tensor,
               floor: float | None = None) -> torch.Tensor:
        """``[B, N]``: per query and bank row, the best group score of the row's edit (-1: no keys).

        With ``floor``, only scores that reach it are exact (the others may read -1): a group's score
        is the mean of its ``m`` keys' best cosines, each at most 1, so it can reach ``floor`` only if
        every key, its first one too, reaches ``1 - m (1 - floor)``; groups whose first key does not
        are skipped, which spares most of the work with many stored edits."""
        b, n = states.shape[0], bank_ids.shape[0]
        dev = states.device
        out = torch.full((b, n), -1.0, device=dev)
        if len(self) == 0 or n == 0:
            return out
        q = F.normalize(states - self.mean.to(dev), dim=-1)  # [B, S, d]
        keys, groups, edit_ids = self.keys.to(dev), self.groups.to(dev), self.edit_ids.to(dev)
        if floor is not None:
            keep = self._possible(q[own], floor).to(dev)
            keys, groups, edit_ids = keys[keep], groups[keep], edit_ids[keep]
            if keys.shape[0] == 0:
                return out
        sim = torch.einsum("bsd,kd->bsk", q, keys)
        sim = sim.masked_fill(~own[..., None], -1.0).amax(dim=1)  # [B, K]: best query token per key
        uniq, inv = torch.unique(groups, return_inverse=True)
        per_group = torch.zeros((b, uniq.shape[0]), device=dev).index_add_(1, inv, sim)
        per_group = per_group / torch.bincount(inv, minlength=uniq.shape[0]).to(per_group)
        group_edit = torch.zeros(uniq.shape[0], dtype=torch.int64, device=dev).scatter_(0, inv, edit_ids)
        # Group -> bank row by a sorted lookup (edit ids are unique in the bank; O(G log N), no [G, N]
        # table); groups of edits no longer stored drop out.
        order, sorted_ids = self._sorted_bank(bank_ids.to(dev))
        pos = torch.searchsorted(sorted_ids, group_edit).clamp_max(n - 1)
        found = sorted_ids[pos] == group_edit
        rows = order[pos][found]
        return out.scatter_reduce(1, rows[None].expand(b, -1), per_group[:, found], "amax")

    def _sorted_bank(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(order, ids[order])`` of the bank's edit ids, sorted once per ids tensor: the bank replaces
        the tensor when it changes, and an in-place change (its version counter) rebuilds too."""
        cache = self._order_cache
        if cache is None or cache[0]() is not ids or cache[1] != ids._version:
            order = ids.argsort()
            cache = (weakref.ref(ids), ids._version, order, ids[order])
            self._order_cache = cache
        return cache[2], cache[3]

    def _lead(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lead [G, d], sizes [G])``: the first key and the key count of every group (keys of a group
        are stored next to each other), rebuilt only when the keys or groups tensors are replaced.
        ``lead`` is in :func:`_prefilter_dtype`: the prefilter reads every group's lead key for every
        prompt, so with many stored edits it is bound by memory traffic, which bfloat16 halves."""
        cache = self._lead_cache
        if cache is None or cache[0]() is not self.keys or cache[1]() is not self.groups:
            groups = self.groups
            first = torch.ones_like(groups, dtype=torch.bool)
            first[1:] = groups[1:] != groups[:-1]
            starts = first.nonzero().squeeze(1)
            sizes = torch.diff(torch.cat([starts, starts.new_tensor([groups.shape[0]])]))
            lead = self.keys[starts].to(_prefilter_dtype(self.keys.device)).contiguous()
            cache = (weakref.ref(self.keys), weakref.ref(self.groups), lead, sizes)
            self._lead_cache = cache
        return cache[2], cache[3]

    def _possible(self, tokens: torch.Tensor, floor: float) -> torch.Tensor:
        """``[K]`` bool: the keys of groups whose first key reaches the bound a score of ``floor`` needs
        for some query token (``tokens [T, d]``, normalised: every query's own tokens together)."""
        lead, sizes = self._lead()
        tokens = tokens.to(lead.device)
        # Never skip a group that passes: the slack covers float32 rounding, or bfloat16's (both
        # inputs and the product rounded to 8 significant bits: a cosine of unit vectors moves by
        # at most 2 * 2^-8 + 2^-9 < 0.01).
        slack = 1e-5 if lead.dtype == torch.float32 else 0.02
        need = 1.0 - sizes.to(tokens.dtype) * (1.0 - floor) - slack
        possible = ((lead @ tokens.T.to(lead.dtype)).float() >= need[:, None]).any(dim=1)  # [G]
        return possible.repeat_interleave(sizes)


def _prefilter_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where its matmul is native (CUDA; CPUs with AVX-512, where oneDNN runs it), else float32."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu":
        supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            if supported is not None and supported():
                return torch.bfloat16
        except RuntimeError:  # a torch build without oneDNN
            pass
    return torch.float32


def subject_positions(tokenizer, prompt: str, subject: str | None) -> tuple[list[int], list[int]]:
    """Token ids of ``PREFIX + prompt`` and the positions of the subject's tokens in them.

    Empty positions when there is no subject or it is not in the prompt: the caller falls back to
    the prompt tokens least like any background token (``MemoirEditor._specific_tokens``).
    """
    text = PREFIX + prompt
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if not subject:
        return ids, []
    at = text.find(subject, len(PREFIX))
    if at < 0:
        at = text.lower().find(subject.lower(), len(PREFIX))
    if at < 0:
        return ids, []
    end = at + len(subject)
    return ids, [j for j, (a, b) in enumerate(offsets) if a < end and b > at]
