"""The sequential (lifelong) editing protocol and its results JSON.

1. Pre-edit pass with the unedited model: the Loc argmax snapshot of every record's locality
   answer, and the "pre" Rel/Gen scores.
2. Apply the N edits one after another (tqdm bar with ETA); with ``eval_every=K`` the edits
   made so far are evaluated every K edits (forgetting curve, stored under ``curve``).
3. Evaluate all N records with the final model.

Metrics per dataset kind (see ``memoir.eval.datasets.FORMAT_KIND``):

* ``qa`` (ZsRE, KnowEdit, CounterFact): ``rel``/``gen`` = teacher-forced token accuracy of the
  target after the edit / rephrase prompt; ``loc`` = argmax agreement with the pre-edit model on
  the locality answer; ``rel_em``/``gen_em`` = greedy-generation exact match.
* ``ppl`` (hallucination): ``rel_ppl`` = mean over edits of exp(mean target NLL) (lower is
  better), ``loc``; ``rel`` (token accuracy) is reported too; no ``gen``.
* ``ood`` (temporal): ``rel`` = token accuracy of the target passage, ``gen`` = ``ood_acc`` =
  fraction of the OOD-rephrase passage's tokens with probability > 0.8 (EasyEdit ``OOD_PPL``),
  ``loc``; ``rel_ppl`` too.

``mean`` = mean of ``rel``, ``gen``, ``loc`` where present.  Routing diagnostics (which edit
each probe was routed to; MEMOIR and GRACE only): ``route_rel`` / ``route_gen`` = fraction of
edit / rephrase prompts routed to their own edit, ``route_loc_any`` = fraction of locality
prompts routed to some edit.
"""
from __future__ import annotations

import pathlib
import time

from memoir.eval import metrics
from memoir.eval.datasets import EditRecord
from memoir.machine import machine_info

SUMMARY_KEYS = ("rel", "gen", "loc", "rel_ppl", "ood_acc", "rel_em", "gen_em", "route_rel", "route_gen", "route_loc_any",
                "gen_all", "route_gen_all", "nbr_spec", "nbr_fire")
# Greedy tokens compared on each neighbourhood prompt (specificity: the continuation is unchanged).
NEIGHBOUR_TOKENS = 8


def json_default(obj):
    """``json.dumps(default=...)`` for results and checkpoints: tensor/NumPy values and paths."""
    if isinstance(obj, pathlib.Path):
        return str(obj)
    if hasattr(obj, "item"):
        try:
            return obj.item()  # scalars (and one-element arrays)
        except (ValueError, RuntimeError):
            return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class _Routes:
    """Collects per-row routing decisions after each forward of a metric driver."""

    def __init__(self, method, n: int):
        self.method, self.values = method, [None] * n
        self.used = False

    def __call__(self, idx):
        routes = self.method.routes()
        if routes is not None:
            self.used = True
            for i, r in zip(idx, routes):
                self.values[i] = r


def _loc_items(records):
    return [i for i, r in enumerate(records) if r.loc_prompt is not None and r.loc_answer is not None]


def loc_snapshot(method, records: list[EditRecord], batch_size: int = metrics.DEFAULT_BATCH_SIZE) -> dict[int, list[int]]:
    """Pre-edit argmax tokens on each record's locality answer: ``{record index: [token ids]}``."""
    items = _loc_items(records)
    scores = metrics.teacher_forced(
        method, [records[i].loc_prompt for i in items], [records[i].loc_answer for i in items], batch_size
    )
    return {i: s.argmax for i, s in zip(items, scores)}


def evaluate(method, records: list[EditRecord], kind: str, pre_loc: dict | None = None, *, em: bool = True,
             batch_size: int = metrics.DEFAULT_BATCH_SIZE, positions: list[int] | None = None,
             pre_nbr: dict | None = None) -> list[dict]:
    """Per-record metrics for ``records`` with the method's current model.

    ``positions[i]`` is record i's position in the edit stream (for routing diagnostics).
    ``pre_nbr`` (``{record index: [greedy token ids per neighbourhood prompt]}`` of the unedited
    model) turns on neighbourhood specificity; every row of a ``qa`` run carries ``nbr_ids``, the
    continuations this pass produced (the pre-edit pass's become ``pre_nbr``).
    """
    n = len(records)
    positions = list(range(n)) if positions is None else positions
    rows = [{} for _ in range(n)]

    # Rel (token accuracy + target NLL), routed from the edit prompt.
    routes = _Routes(method, n)
    rel = metrics.teacher_forced(method, [r.prompt for r in records], [r.target for r in records], batch_size,
                                 on_batch=routes)
    for i, s in enumerate(rel):
        rows[i]["rel"] = s.acc
        if kind in ("ppl", "ood"):
            rows[i]["rel_ppl"] = s.ppl
            rows[i]["rel_nll"] = s.nll
        if routes.used:
            rows[i]["route_rel"] = routes.values[i]

    # Gen: paraphrase token accuracy (qa) or OOD accuracy of the rephrase passage (ood).
    gi = [i for i, r in enumerate(records) if r.rephrase is not None]
    if gi and kind != "ppl":
        routes = _Routes(method, len(gi))
        if kind == "ood":
            vals = metrics.ood_scores(method, [records[i].rephrase for i in gi], batch_size, on_batch=routes)
            for j, i in enumerate(gi):
                rows[i]["gen"] = vals[j]
                rows[i]["ood_acc"] = vals[j]
        else:
            gen = metrics.teacher_forced(method, [records[i].rephrase for i in gi], [records[i].target for i in gi],
                                         batch_size, on_batch=routes)
            for j, i in enumerate(gi):
                rows[i]["gen"] = gen[j].acc
        if routes.used:
            for j, i in enumerate(gi):
                rows[i]["route_gen"] = routes.values[j]

    # Loc: agreement with the pre-edit argmax on the locality answer.
    if pre_loc is not None:
        li = [i for i in _loc_items(records) if i in pre_loc]
        routes = _Routes(method, len(li))
        post = metrics.teacher_forced(method, [records[i].loc_prompt for i in li], [records[i].loc_answer for i in li],
                                      batch_size, on_batch=routes)
        for j, i in enumerate(li):
            rows[i]["loc"] = metrics.agreement(pre_loc[i], post[j].argmax)
            if routes.used:
                rows[i]["route_loc"] = routes.values[j]

    if kind == "qa":
        _paraphrases_and_neighbours(method, records, rows, positions, pre_nbr, batch_size)

    # Generation exact match (short-answer datasets only).
    if em and kind == "qa":
        out = metrics.generation_em(method, [r.prompt for r in records], [r.target for r in records], batch_size)
        for i, (ok, text) in enumerate(out):
            rows[i]["rel_em"], rows[i]["rel_output"] = float(ok), text
        if gi:
            out = metrics.generation_em(method, [records[i].rephrase for i in gi], [records[i].target for i in gi],
                                        batch_size)
            for j, i in enumerate(gi):
                rows[i]["gen_em"], rows[i]["gen_output"] = float(out[j][0]), out[j][1]
    for i, row in enumerate(rows):
        row["position"] = positions[i]
    return rows


def _paraphrases_and_neighbours(method, records, rows, positions, pre_nbr, batch_size) -> None:
    """Gen over every paraphrase (``gen_all``, ``route_gen_all``) and, per neighbourhood prompt,
    whether it fires an edit (``nbr_fire``) and keeps its unedited continuation (``nbr_spec``)."""
    extra = [(i, p) for i, r in enumerate(records) for p in r.paraphrases[1:]]  # the first is the rephrase
    accs = {i: [row["gen"]] for i, row in enumerate(rows) if "gen" in row}
    own = {i: [row["route_gen"] == positions[i]] for i, row in enumerate(rows) if "route_gen" in row}
    if extra:
        routes = _Routes(method, len(extra))
        scores = metrics.teacher_forced(method, [p for _, p in extra], [records[i].target for i, _ in extra],
                                        batch_size, on_batch=routes)
        for j, (i, _) in enumerate(extra):
            accs.setdefault(i, []).append(scores[j].acc)
            if routes.used:
                own.setdefault(i, []).append(routes.values[j] == positions[i])
    for i, values in accs.items():
        rows[i]["gen_all"] = metrics.mean(values)
    for i, values in own.items():
        rows[i]["route_gen_all"] = metrics.mean(float(v) for v in values)
    items = [(i, p) for i, r in enumerate(records) for p in r.neighbours]
    if not items:
        return
    routes = _Routes(method, len(items))
    conts = metrics.continuations(method, [p for _, p in items], NEIGHBOUR_TOKENS, batch_size, on_batch=routes)
    per: dict[int, list] = {}
    for j, (i, _) in enumerate(items):
        per.setdefault(i, []).append(j)
    for i, js in per.items():
        rows[i]["nbr_ids"] = [conts[j] for j in js]
        if routes.used:
            rows[i]["nbr_fire"] = metrics.mean(float(routes.values[j] is not None) for j in js)
        if pre_nbr is not None and i in pre_nbr:
            rows[i]["nbr_spec"] = metrics.mean(float(c == p) for c, p in zip(rows[i]["nbr_ids"], pre_nbr[i]))


def summarise(rows: list[dict], edits: list[dict] | None = None) -> dict:
    """Means over the per-edit rows; ``edits`` (what each edit returned, in stream order) tells which
    edits later ones superseded."""
    out = {}
    for key in ("rel", "gen", "loc", "rel_ppl", "ood_acc", "rel_em", "gen_em", "gen_all", "route_gen_all",
                "nbr_spec", "nbr_fire"):
        out[key] = metrics.mean(r.get(key) for r in rows)
    if any("route_rel" in r for r in rows):
        out["route_rel"] = metrics.mean(float(r["route_rel"] == r["position"]) for r in rows if "route_rel" in r)
        out["route_gen"] = metrics.mean(float(r["route_gen"] == r["position"]) for r in rows if "route_gen" in r)
        out["route_loc_any"] = metrics.mean(float(r["route_loc"] is not None) for r in rows if "route_loc" in r)
    out["mean"] = metrics.mean([out[k] for k in ("rel", "gen", "loc")])
    out["n"] = len(rows)
    # on_conflict "supersede": an edit a later one replaced no longer answers with its own target, so
    # the edits still stored are also scored on their own (``*_live``).
    gone = {p for e in edits or [] for p in e.get("replaced", [])}
    if gone:
        live = [r for r in rows if r.get("position") not in gone]
        out["n_superseded"] = len(gone)
        for key in ("rel", "gen", "rel_em", "gen_em"):
            out[f"{key}_live"] = metrics.mean(r.get(key) for r in live)
    return out


def run_sequential(method, records: list[EditRecord], kind: str, *, eval_every: int | None = None,
                   em: bool = True, batch_size: int = metrics.DEFAULT_BATCH_SIZE, progress: bool = True,
                   meta: dict | None = None, checkpoint=None, checkpoint_every: int = 0,
                   on_checkpoint=None, pre_cache=None, pre_key: str | None = None, edit_batch: int = 1,
                   subjects: bool = True) -> dict:
    """Run the whole protocol; returns the results dict (JSON-serialisable).

    ``checkpoint`` (a :class:`memoir.eval.checkpoint.RunCheckpoint`): when it exists the run resumes
    from it; it is written after the pre-edit pass, every ``checkpoint_every`` edits and after the
    last edit.  ``on_checkpoint(done, n, edit_seconds)`` is called after each write (progress lines).
    ``pre_cache`` (a :class:`memoir.eval.prepass.PrePassCache`) with ``pre_key``: the unedited model's
    pass is read from it when an earlier run stored it, and stored there otherwise.
    ``edit_batch`` > 1 trains that many records together (``method.edit_batch``); curve points and
    checkpoints then fall on the first batch end at or after each multiple.
    ``subjects=False`` gives every edit without its record's subject (the router infers one).
    """
    from tqdm.auto import tqdm

    if not records:
        raise ValueError("no records to edit")
    n = len(records)
    t0 = time.perf_counter()
    elapsed_before, resumed_at, pre_reused = 0.0, [], False
    state = checkpoint.load(method) if checkpoint is not None and checkpoint.exists() else None
    if state is not None:
        pre_loc = {int(k): v for k, v in state["pre_loc"].items()}
        pre_nbr = {int(k): v for k, v in state.get("pre_nbr", {}).items()}
        pre_rows, pre_seconds = state["pre_rows"], state["pre_seconds"]
        pre_reused = state.get("pre_reused", False)
        edit_rows, curve, curve_seconds = state["edit_rows"], state["curve"], state["curve_seconds"]
        elapsed_before, resumed_at = state["elapsed"], state["resumed_at"] + [len(state["edit_rows"])]
    else:
        cached = pre_cache.load(pre_key) if pre_cache is not None else None
        if cached is not None:
            pre_loc, pre_rows, pre_nbr = cached["pre_loc"], cached["pre_rows"], cached["pre_nbr"]
            pre_reused = True
        else:
            pre_loc = loc_snapshot(method, records, batch_size)
            pre_rows = evaluate(method, records, kind, None, em=False, batch_size=batch_size)
            pre_nbr = {i: row.pop("nbr_ids") for i, row in enumerate(pre_rows) if "nbr_ids" in row}
            if pre_cache is not None:
                pre_cache.save(pre_key, pre_loc, pre_rows, time.perf_counter() - t0, pre_nbr)
        pre_seconds = time.perf_counter() - t0
        edit_rows, curve, curve_seconds = [], [], 0.0

    def save():
        if checkpoint is None:
            return
        checkpoint.save(method, {
            "pre_loc": {str(k): v for k, v in pre_loc.items()}, "pre_rows": pre_rows, "pre_seconds": pre_seconds,
            "pre_nbr": {str(k): v for k, v in pre_nbr.items()},
            "pre_reused": pre_reused, "edit_rows": edit_rows, "curve": curve, "curve_seconds": curve_seconds,
            "elapsed": elapsed_before + time.perf_counter() - t0, "resumed_at": resumed_at,
        })
        if on_checkpoint is not None:
            on_checkpoint(len(edit_rows), n, sum(r["seconds"] for r in edit_rows))

    if state is None:
        save()  # the pre-edit pass alone is ~15 CPU-minutes for the whole ZsRE file
    bar = tqdm(total=n, initial=len(edit_rows), desc=f"editing ({method.name})", unit="edit", disable=not progress)
    while len(edit_rows) < n:
        done = len(edit_rows)
        if edit_batch > 1:
            infos = method.edit_batch(records[done: done + edit_batch], range(done, min(done + edit_batch, n)),
                                      subjects=subjects)
        else:
            rec = records[done]
            infos = [method.edit(rec.prompt, rec.target, done, subject=rec.extra.get("subject") if subjects else None)]
        edit_rows.extend(infos)
        bar.update(len(infos))
        bar.set_postfix(loss=f"{infos[-1]['loss']:.3f}", steps=infos[-1]["steps"])
        now = len(edit_rows)

        def crossed(every):  # a multiple of `every` lies in (done, now]
            return bool(every) and now // every > done // every
        if crossed(eval_every) and now < n:
            tc = time.perf_counter()
            sub = evaluate(method, records[:now], kind, pre_loc, em=False, batch_size=batch_size, pre_nbr=pre_nbr)
            curve.append({"n_edits": now, **summarise(sub, edit_rows)})
            curve_seconds += time.perf_counter() - tc
        if checkpoint_every and (crossed(checkpoint_every) or now == n):
            save()
    bar.close()
    edit_seconds = sum(r["seconds"] for r in edit_rows)

    t1 = time.perf_counter()
    rows = evaluate(method, records, kind, pre_loc, em=em, batch_size=batch_size, pre_nbr=pre_nbr)
    for row in rows:
        row.pop("nbr_ids", None)  # compared with the unedited ones above; too bulky for the result file
    eval_seconds = time.perf_counter() - t1
    summary = summarise(rows, edit_rows)
    if eval_every:
        curve.append({"n_edits": n, **{k: v for k, v in summary.items()}})

    per_edit = []
    for i, (rec, row, pre, ed) in enumerate(zip(records, rows, pre_rows, edit_rows)):
        entry = {
            "index": rec.extra.get("index", i),
            "prompt": rec.prompt,
            "target": rec.target,
            "rephrase": rec.rephrase,
            "loc_prompt": rec.loc_prompt,
            "loc_answer": rec.loc_answer,
            "edit": ed,
            **{k: v for k, v in row.items() if k != "position"},
            "pre_rel": pre.get("rel"),
            "pre_gen": pre.get("gen"),
        }
        if "rel_ppl" in pre:
            entry["pre_rel_ppl"] = pre["rel_ppl"]
        if "loc_skipped" in rec.extra:
            entry["loc_skipped"] = rec.extra["loc_skipped"]
        per_edit.append(entry)

    result = dict(meta or {})
    result.update({
        "method": method.name,
        "n_edits": n,
        "kind": kind,
        **{k: summary.get(k) for k in SUMMARY_KEYS if summary.get(k) is not None or k in ("rel", "gen", "loc", "rel_em", "gen_em")},
        "mean": summary["mean"],
        "pre": summarise(pre_rows),
        "edit_seconds_total": edit_seconds,
        "edit_seconds_mean": edit_seconds / n,
        "edit_steps_mean": sum(r["steps"] for r in edit_rows) / n,
        "eval_seconds": eval_seconds,
        "pre_eval_seconds": pre_seconds,
        "pre_eval_reused": pre_reused,  # the unedited pass came from the pre-edit cache (an earlier run)
        "curve_eval_seconds": curve_seconds,
        "wall_seconds": elapsed_before + time.perf_counter() - t0,
        "resumed_at": resumed_at,  # edits already done at each resume ([] = ran in one go)
        "layer": method.layer_index,
        "module": method.module_name,
        "config": method.config_dict(),
        "machine": machine_info(),
        "eval_every": eval_every,
        "curve": curve,
        "records": per_edit,
    })
    return result
