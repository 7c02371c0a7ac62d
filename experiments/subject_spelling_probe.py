"""How often does the spelling index (``memoir.spelling``) name the right edit, and how often a wrong one?

Index: the subjects of every edit of a public file (CounterFact ROME format or ZsRE), no model run
(the tokenizer only, for the token-count test).  Queries:
- every paraphrase (ZsRE: rephrase) with its subject rewritten: ``verbatim``, ``upper``, ``lower``,
  and four typos of the longest subject word (of 4+ letters): ``swap`` (two inner letters),
  ``drop`` (an inner letter left out), ``double`` (an inner letter doubled), ``replace`` (an inner
  letter replaced by the next one in the alphabet); ``acronym`` for subjects of 3+ capitalised words;
  ``common_alias`` (the first other name in memoir/data/aliases.txt) for subjects listed there;
- every neighbourhood prompt (CounterFact: same relation, other subject) and every locality prompt
  (ZsRE: NQ questions): they should name no edit.
Reported: the share of rewritten queries naming their own edit, the share of neighbourhood /
locality prompts naming any edit (``fire``), with and without the token-count test, and the time
per query.

    PYTHONPATH=. python experiments/subject_spelling_probe.py --output experiments/results/subject_spelling_probe.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

from memoir import spelling
from memoir.eval.datasets import load_records
from transformers import AutoTokenizer

from memoir.models import cache_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = {
    "counterfact": (ROOT.parent / "shared/data/counterfact/counterfact_portability_gpt4.public.json",
                    "counterfact_rome"),
    "zsre": (ROOT.parent / "shared/data/zsre/zsre_mend_eval_portability_gpt4.public.json", "zsre"),
}


def _inner(word: str, change) -> str:
    i = len(word) // 2 - 1
    return change(word, i)


TYPOS = {
    "swap": lambda w, i: w[:i] + w[i + 1] + w[i] + w[i + 2:],
    "drop": lambda w, i: w[:i] + w[i + 1:],
    "double": lambda w, i: w[:i + 1] + w[i] + w[i + 1:],
    "replace": lambda w, i: w[:i] + ("a" if w[i] == "z" else chr(ord(w[i].lower()) + 1)) + w[i + 1:],
}


def rewrites(subject: str) -> dict[str, str]:
    out = {"verbatim": subject, "upper": subject.upper(), "lower": subject.lower()}
    words = subject.split()
    longest = max(range(len(words)), key=lambda i: len(words[i]))
    if len(words[longest]) >= 4 and words[longest].isalpha():
        for kind, change in TYPOS.items():
            changed = list(words)
            changed[longest] = _inner(words[longest], change)
            out[kind] = " ".join(changed)
    short = spelling.acronym(subject)
    if short:
        out["acronym"] = short
    others = spelling.common_aliases(subject)
    if others:
        out["common_alias"] = others[0]
    return out


def probe(name: str, tokenizer, guard: bool) -> dict:
    path, fmt = DATA[name]
    records, _ = load_records(path, fmt)
    index = spelling.SpellingIndex(tokenizer if guard else None)
    for i, r in enumerate(records):
        index.add(i, r.extra["subject"])
    reached: dict[str, list[bool]] = {}
    wrong: dict[str, list[bool]] = {}
    start, queries = time.perf_counter(), 0
    for i, r in enumerate(records):
        subject = r.extra["subject"]
        for para in r.paraphrases or [r.rephrase]:
            if subject not in para:
                continue
            for kind, form in rewrites(subject).items():
                named = index.named(para.replace(subject, form))
                queries += 1
                reached.setdefault(kind, []).append(i in named)
                wrong.setdefault(kind, []).append(bool(named - {i}))
    unrelated = [n for r in records for n in (r.neighbours or [r.loc_prompt])]
    fired = [bool(index.named(n)) for n in unrelated]
    seconds = time.perf_counter() - start
    return {
        "edits": len(records), "forms": len(index),
        "own_edit_named": {k: round(sum(v) / len(v), 4) for k, v in reached.items()},
        "other_edit_named": {k: round(sum(v) / len(v), 4) for k, v in wrong.items()},
        "queries_per_form": {k: len(v) for k, v in reached.items()},
        "unrelated_prompts": len(unrelated), "unrelated_fire": round(sum(fired) / len(fired), 4),
        "unrelated_fired_examples": [n for n, f in zip(unrelated, fired) if f][:15],
        "ms_per_query": round(1000 * seconds / (queries + len(unrelated)), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", default=str(ROOT / "experiments/results/subject_spelling_probe.json"))
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m-instruct")
    out = {name: {("token_test" if guard else "no_token_test"): probe(name, tokenizer, guard)
                  for guard in (True, False)} for name in DATA}
    pathlib.Path(args.output).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
