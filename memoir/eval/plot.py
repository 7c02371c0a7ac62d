"""Plot ``memoir eval`` results: each metric vs number of edits, one line per (method and config, dataset)."""
from __future__ import annotations

import hashlib
import json
import pathlib
from collections import Counter, defaultdict

DEFAULT_METRICS = ("rel", "gen", "loc", "mean", "rel_ppl", "rel_em", "gen_em")
LABELS = {
    "rel": "Rel (token acc)",
    "gen": "Gen (token acc / OOD acc)",
    "loc": "Loc (agreement)",
    "mean": "mean(Rel, Gen, Loc)",
    "rel_ppl": "Rel PPL (lower is better)",
    "rel_em": "Rel generation EM",
    "gen_em": "Gen generation EM",
}


def load_results(paths) -> list[dict]:
    out = []
    for p in paths:
        data = json.loads(pathlib.Path(p).read_text())
        if not isinstance(data, dict) or "method" not in data or "n_edits" not in data:
            raise ValueError(f"{p}: not a memoir eval results file")
        data["_path"] = str(p)
        out.append(data)
    return out


def _config_digest(r: dict) -> str:
    config = dict(r.get("config") or {})
    config.pop("threshold_final", None)
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:6]


def _config_name(r: dict) -> str | None:
    """Where a MEMOIR run's config came from (``preset smollm2``, ``smollm2_energy90``); None otherwise."""
    source = str(r.get("config_source") or "default")
    if source == "default" or r["method"] != "memoir":
        return None  # baselines take their own defaults; the MEMOIR preset does not apply to them
    if source.startswith("preset:"):
        return f"preset {source.split(':', 1)[1]}"
    return pathlib.Path(source).stem


def run_label(r: dict) -> str:
    """``method`` plus where its config came from: ``memoir (smollm2_energy90)``, ``memoir (preset smollm2)``."""
    name = _config_name(r)
    return r["method"] if name is None else f"{r['method']} ({name})"


def series(results: list[dict], curve: bool = False):
    """``{(run label, dataset): [(n_edits, summary dict), ...]}`` sorted by n_edits.

    Runs are grouped by method *and* config, so variants of one method (and results of a preset that
    changed between runs) are separate lines, and a label shared by different configs gets the
    config's short hash.
    """
    by_config = defaultdict(list)
    for r in results:
        by_config[(r["method"], pathlib.Path(r.get("data", "?")).stem, _config_digest(r))].append(r)
    labels = {}
    for key, runs in by_config.items():
        name = _config_name(runs[0])
        labels[key] = key[0] if name is None else f"{key[0]} ({name})"
    clashes = Counter((labels[key], key[1]) for key in by_config)
    groups = defaultdict(list)
    for (method, dataset, digest), runs in by_config.items():
        label = labels[(method, dataset, digest)]
        key = (f"{label} #{digest}" if clashes[(label, dataset)] > 1 else label, dataset)
        for r in runs:
            if curve:
                groups[key + (pathlib.Path(r["_path"]).stem,)].extend((c["n_edits"], c) for c in r.get("curve") or [])
            else:
                groups[key].append((r["n_edits"], r))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in groups.items() if v}


AGE_METRICS = ("rel", "gen", "loc", "rel_ppl", "ood_acc", "rel_em", "gen_em")


def age_profile(result: dict, block: int) -> list[tuple[float, dict]]:
    """Per-record metrics of one run averaged over blocks of ``block`` consecutive edits.

    ``[(position of the block's middle edit, {metric: mean, "mean": ...}), ...]``, oldest edit first:
    after N sequential edits, how well the edits made early are kept compared with the recent ones.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    records = result.get("records") or []
    if not records:
        raise ValueError(f"{result.get('_path', 'result')}: no per-edit records to profile")
    out = []
    for start in range(0, len(records), block):
        chunk = records[start : start + block]
        point = {}
        for m in AGE_METRICS:
            vals = [r[m] for r in chunk if isinstance(r.get(m), (int, float))]
            point[m] = sum(vals) / len(vals) if vals else None
        present = [point[k] for k in ("rel", "gen", "loc") if point[k] is not None]
        point["mean"] = sum(present) / len(present) if present else None
        out.append((start + (len(chunk) - 1) / 2, point))
    return out


def plot_results(paths, output, metrics=None, curve: bool = False, by_age: int | None = None) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    results = load_results(paths)
    if by_age:
        if curve:
            raise ValueError("--curve and --by-age are two different x axes: pick one")
        data = {}
        for r in results:  # one line per file: the same method at two N profiles differently
            key = (run_label(r), pathlib.Path(r.get("data", "?")).stem, f"N={r['n_edits']}")
            data[key] = age_profile(r, by_age)
    else:
        data = series(results, curve)
    if not data:
        raise ValueError("nothing to plot" + (" (no eval-every curves in these files)" if curve else ""))
    present = [m for m in (metrics or DEFAULT_METRICS)
               if any(pt.get(m) is not None for pts in data.values() for _, pt in pts)]
    if not present:
        raise ValueError(f"none of the metrics {metrics or DEFAULT_METRICS} is present in the results")
    cols = min(3, len(present))
    rows = (len(present) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    one_dataset = len({key[1] for key in data}) == 1  # then the legend need not repeat it
    for ax, m in zip(axes.flat, present):
        for key, pts in sorted(data.items()):
            xs = [n for n, pt in pts if pt.get(m) is not None]
            ys = [pt[m] for n, pt in pts if pt.get(m) is not None]
            if xs:
                ax.plot(xs, ys, marker="o", label=" / ".join(k for j, k in enumerate(key) if not (one_dataset and j == 1)))
        ax.set_title(LABELS.get(m, m))
        ax.set_xlabel(f"edit position, oldest first (means over {by_age} edits), after all N" if by_age
                      else "edits made" if curve else "number of sequential edits N")
        ns = sorted({n for pts in data.values() for n, _ in pts if n > 0})
        if ns and not curve and not by_age:
            # log scale, ticked at the Ns that were run (matplotlib's 3x10^2-style minor labels collide)
            ax.set_xscale("log")
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.xaxis.set_minor_formatter(NullFormatter())
        if m != "rel_ppl":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(labels) - 1) // 3), 1, 1))
    output = pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output
