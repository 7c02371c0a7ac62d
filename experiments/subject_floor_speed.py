"""What the subject check's score floor costs with many stored edits, side by side in one run.

``SubjectKeys.scores(floor=t)`` first compares every query token with the first key of every key
group and scores exactly only the groups that can still reach ``t``.  Compared here, alternating
rounds on the same keys and queries:
- ``exact``: no floor, every key scored;
- ``per_call_bound``: the bound as first shipped (first keys gathered from all keys on every call,
  one batched einsum over padded query rows, padding masked);
- ``shipped``: ``SubjectKeys.scores`` as it is (first keys cached until the keys change, one matmul
  over the queries' own tokens only).
Shapes as a served batch of 8 prompts read as written and lower-cased (16 rows of 15 tokens, 11 of
them the prompt's own) against N edits of 2 key groups of 3 keys (the generation benchmark's banks).

    PYTHONPATH=. python experiments/subject_floor_speed.py [--edits 1000 10000]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch
import torch.nn.functional as F

from memoir.machine import machine_info
from memoir.subject_router import SubjectKeys

ROOT = pathlib.Path(__file__).resolve().parents[1]
D, ROWS, TOKENS, OWN = 576, 16, 15, 11


def per_call_bound(keys: SubjectKeys, states, own, bank_ids, floor):
    """The first bound: the same result, its first keys gathered and its rows padded on every call."""
    q = F.normalize(states - keys.mean, dim=-1)
    groups = keys.groups
    first = torch.ones_like(groups, dtype=torch.bool)
    first[1:] = groups[1:] != groups[:-1]
    starts = first.nonzero().squeeze(1)
    sizes = torch.diff(torch.cat([starts, starts.new_tensor([groups.shape[0]])]))
    lead = torch.einsum("bsd,gd->bsg", q, keys.keys[starts]).masked_fill(~own[..., None], -1.0).amax(dim=1)
    need = 1.0 - sizes.to(lead.dtype) * (1.0 - floor) - 1e-5
    keep = (lead >= need).any(dim=0).repeat_interleave(sizes)
    sub = SubjectKeys(D)
    sub.keys, sub.edit_ids, sub.groups, sub.mean = keys.keys[keep], keys.edit_ids[keep], keys.groups[keep], keys.mean
    return sub.scores(states, own, bank_ids)


def bank(n: int, g: torch.Generator) -> SubjectKeys:
    keys = SubjectKeys(D)
    keys.keys = F.normalize(torch.randn(6 * n, D, generator=g), dim=-1)
    keys.edit_ids = torch.arange(n).repeat_interleave(6)
    keys.groups = torch.arange(2 * n).repeat_interleave(3)
    return keys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--floor", type=float, default=0.95)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    result = {"machine": machine_info(), "floor": args.floor, "rows": ROWS, "tokens": TOKENS, "own_tokens": OWN,
              "edits": {}}
    for n in args.edits:
        keys = bank(n, g)
        ids = torch.arange(n)
        states = torch.randn(ROWS, TOKENS, D, generator=g)
        states[:, -3:] = keys.keys[torch.randint(0, 6 * n, (ROWS, 3), generator=g)]  # some groups pass
        own = torch.zeros(ROWS, TOKENS, dtype=torch.bool)
        own[:, TOKENS - OWN:] = True
        variants = {"exact": lambda: keys.scores(states, own, ids),
                    "per_call_bound": lambda: per_call_bound(keys, states, own, ids, args.floor),
                    "shipped": lambda: keys.scores(states, own, ids, floor=args.floor)}
        exact = variants["exact"]()
        for name in ("per_call_bound", "shipped"):
            got = variants[name]()
            assert torch.equal(got >= args.floor, exact >= args.floor), name
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(v) for name, v in times.items()}
        result["edits"][str(n)] = {"median_s": med,
                                   "speedup_vs_per_call_bound": med["per_call_bound"] / med["shipped"],
                                   "speedup_vs_exact": med["exact"] / med["shipped"]}
        print(n, json.dumps(result["edits"][str(n)]))
    dest = ROOT / "experiments/results/subject_floor_speed.json"
    dest.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
