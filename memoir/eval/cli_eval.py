"""``memoir eval`` and ``memoir plot``: argparse registration for ``memoir.cli``.

    from memoir.eval.cli_eval import add_eval_parser, add_plot_parser
    add_eval_parser(subparsers); add_plot_parser(subparsers)   # each sets ``func(args) -> int``

Standalone: ``python -m memoir.eval.cli_eval eval ...`` / ``python -m memoir.eval.cli_eval plot ...``.

Config file (``--config cfg.yaml``): MemoirConfig fields at the top level, plus optional
``ft:`` and ``grace:`` sections (FTConfig / GraceConfig fields).  The baselines use MEMOIR's
layer and, unless their section says otherwise, MEMOIR's ``n_iter`` (same optimiser budget).
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

from memoir.atomic import write_text
from memoir.config import field_help
from memoir.eval.datasets import FORMATS

log = logging.getLogger(__name__)


def count(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="sequential editing benchmark (Rel/Gen/Loc, EasyEdit-style) for memoir / ft / grace",
        description="Apply the first N edits of a dataset one after another, then evaluate all of them.",
    )
    p.add_argument("--model", default="smollm2", help="'smollm2', a local HF model folder or a .gguf file")
    p.add_argument("--data", required=True, help="dataset JSON file")
    p.add_argument("--format", default="auto", choices=FORMATS, help="dataset format (default: detect)")
    p.add_argument("--n", type=count, default=None, help="number of edits (default: the whole file)")
    p.add_argument("--offset", type=count, default=0, help="skip this many records first")
    p.add_argument("--method", default="memoir", choices=("memoir", "ft", "grace"))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", default=None, help="YAML/JSON: MemoirConfig fields (+ optional ft:/grace: sections)")
    g.add_argument("--preset", default=None,
                   help="a shipped MemoirConfig preset ('smollm2', 'reference'); default: 'smollm2' for "
                        "--model smollm2, the reference config otherwise")
    p.add_argument("--layer", type=int, default=None, help="MEMOIR: " + field_help("layer"))
    p.add_argument("--n-iter", type=int, default=None, help="optimisation steps per edit, all methods (overrides)")
    p.add_argument("--threshold", type=float, default=None, help="MEMOIR: " + field_help("threshold"))
    p.add_argument("--threshold-mode", choices=("fixed", "auto"), default=None,
                   help="MEMOIR: " + field_help("threshold_mode"))
    p.add_argument("--on-conflict", choices=("keep", "supersede"), default=None,
                   help="MEMOIR: an edit repeating a stored edit's question keeps both (default here, as the "
                        "published protocol scores them) or supersedes the stored one (the editor's default)")
    p.add_argument("--no-subject", action="store_true",
                   help="give every edit without its record's subject (the subject router infers one)")
    p.add_argument("--ft-lr", type=float, default=None, help="FT-L Adam learning rate (default 5e-4)")
    p.add_argument("--grace-eps", type=float, default=None, help="GRACE initial deferral radius (default 1.0)")
    p.add_argument("--grace-lr", type=float, default=None, help="GRACE value learning rate (default 1.0)")
    p.add_argument("--eval-every", type=int, default=None, metavar="K",
                   help="also evaluate the edits made so far every K edits (forgetting curve)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per evaluation forward")
    p.add_argument("--edit-batch", type=int, default=1,
                   help="MEMOIR with memory private: train this many edits together (edit_many batch_size)")
    p.add_argument("--no-em", action="store_true", help="skip the generation exact-match metrics")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--output", required=True, help="results JSON path")
    p.add_argument("--checkpoint-every", type=int, default=25, metavar="K",
                   help="save the run's state to OUTPUT.partial/ after the pre-edit pass and every K edits, so "
                        "--resume can continue an interrupted run (0 = never; default 25)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run saved in OUTPUT.partial/ (same method, config and data)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pre-cache", default=None, metavar="DIR",
                   help="where the unedited model's pass is shared between runs on the same model, data and "
                        "batch size (default: $MEMOIR_CACHE or ~/.cache/memoir, then pre-edit/)")
    g.add_argument("--no-pre-cache", action="store_true", help="always recompute the unedited model's pass")
    p.set_defaults(func=cmd_eval)
    return p


def add_plot_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plot", help="plot eval results JSONs: metrics vs number of edits, per method")
    p.add_argument("results", nargs="+", help="results JSON files (from memoir eval)")
    p.add_argument("--output", required=True, help="image path (png/pdf/svg)")
    p.add_argument("--metrics", nargs="+", default=None, help="metrics to plot (default: those present)")
    p.add_argument("--curve", action="store_true", help="plot the eval-every forgetting curves instead")
    p.add_argument("--by-age", type=int, default=None, metavar="K",
                   help="plot each run's per-edit metrics against the edit's position (means over blocks of K "
                        "edits, oldest first): which edits a long stream forgets")
    p.set_defaults(func=cmd_plot)
    return p


def _load_configs(args):
    from memoir.baselines import FTConfig, GraceConfig
    from memoir.config import PRESET_DIR, MemoirConfig, read_mapping

    ft_data, grace_data = {}, {}
    told = False  # whether a config file chose on_conflict itself
    if args.config:
        data = read_mapping(args.config)
        ft_data = data.pop("ft", None) or {}
        grace_data = data.pop("grace", None) or {}
        mcfg = MemoirConfig.from_mapping(data, source=args.config)
        told = "on_conflict" in data
    elif args.preset:
        mcfg = MemoirConfig.preset(args.preset)
    elif args.model == "smollm2" and (PRESET_DIR / "smollm2.yaml").exists():
        mcfg = MemoirConfig.preset("smollm2")
    else:
        mcfg = MemoirConfig()
    # The published protocol scores every edit of the stream: conflicting edits are kept unless asked.
    overrides = {"on_conflict": args.on_conflict or (mcfg.on_conflict if told else "keep")}
    if args.layer is not None:
        overrides["layer"] = args.layer
    if args.n_iter is not None:
        overrides["n_iter"] = args.n_iter
    if args.threshold is not None:
        overrides["threshold"] = args.threshold
    if args.threshold_mode is not None:
        overrides["threshold_mode"] = args.threshold_mode
    mcfg = MemoirConfig.from_dict({**mcfg.to_dict(), **overrides})
    ft_data.setdefault("n_iter", mcfg.n_iter)
    grace_data.setdefault("n_iter", mcfg.n_iter)
    if args.n_iter is not None:
        ft_data["n_iter"] = grace_data["n_iter"] = args.n_iter
    if args.ft_lr is not None:
        ft_data["lr"] = args.ft_lr
    if args.grace_eps is not None:
        grace_data["eps"] = args.grace_eps
    if args.grace_lr is not None:
        grace_data["lr"] = args.grace_lr
    grace_data.setdefault("seed", args.seed)
    return mcfg, FTConfig.from_dict(ft_data), GraceConfig.from_dict(grace_data)


def cmd_eval(args) -> int:
    import torch

    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _eval(args, torch)
    finally:
        torch.set_num_threads(threads_before)


def _eval(args, torch) -> int:
    from memoir.eval.checkpoint import RunCheckpoint, default_path, has_checkpoint, run_fingerprint
    from memoir.eval.datasets import kind_of, load_records
    from memoir.eval.methods import build_method
    from memoir.eval.prepass import PrePassCache, model_digest, pass_key
    from memoir.eval.prepass import default_dir as prepass_dir
    from memoir.eval.runner import json_default, run_sequential
    from memoir.models import load_model

    if args.n is not None and args.n < 1:
        raise ValueError("--n must be >= 1")
    if args.eval_every is not None and args.eval_every < 1:
        raise ValueError("--eval-every must be >= 1")
    if args.checkpoint_every < 0:
        raise ValueError("--checkpoint-every must be >= 0")
    ckpt_path = default_path(args.output)
    if has_checkpoint(ckpt_path) and not args.resume:
        raise ValueError(f"{ckpt_path} holds an interrupted run of this output: pass --resume to continue it, "
                         "or delete that folder to start over")
    if args.resume and not has_checkpoint(ckpt_path):
        raise ValueError(f"--resume: no checkpoint at {ckpt_path}")
    torch.manual_seed(args.seed)
    records, fmt = load_records(args.data, args.format, args.n, args.offset)
    if args.n is not None and len(records) < args.n:
        log.warning("%s has only %d records after offset %d (asked for %d)", args.data, len(records), args.offset, args.n)
    mcfg, ftcfg, gcfg = _load_configs(args)
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    pre_cache = pre_key = None
    if not args.no_pre_cache:
        pre_cache = PrePassCache(args.pre_cache or prepass_dir())
        pre_key = pass_key(model_digest(model, tok), records, kind_of(fmt), args.batch_size)  # before editing
    method = build_method(args.method, model, tok, mcfg, ftcfg, gcfg)
    if args.edit_batch < 1 or (args.edit_batch > 1 and not hasattr(method, "edit_batch")):
        raise SystemExit(f"--edit-batch {args.edit_batch}: must be >= 1, and > 1 only for --method memoir")
    meta = {
        "model": args.model,
        "data": str(pathlib.Path(args.data)),
        "format": fmt,
        "offset": args.offset,
        "dtype": args.dtype,
        "seed": args.seed,
        "command": " ".join(sys.argv),
        "config_source": args.config or (f"preset:{args.preset}" if args.preset else "default"),
        "edit_batch": args.edit_batch,
        "subjects": not args.no_subject,
    }
    checkpoint = None
    if args.checkpoint_every or args.resume:
        checkpoint = RunCheckpoint(ckpt_path, {**run_fingerprint(method, records, kind_of(fmt), args.eval_every,
                                                                 not args.no_em), "edit_batch": args.edit_batch,
                                                "subjects": not args.no_subject})

    def on_checkpoint(done, n, edit_seconds):
        eta = f", ETA {(n - done) * edit_seconds / done / 60:.0f} min of edits" if done else ""
        print(f"checkpoint {ckpt_path}: {done}/{n} edits{eta}", file=sys.stderr, flush=True)

    # Denormal floats (e.g. in GRACE's value optimisation) slow CPU kernels by 10x or more.
    flushed = torch.set_flush_denormal(True)
    try:
        result = run_sequential(
            method, records, kind_of(fmt), eval_every=args.eval_every, em=not args.no_em,
            batch_size=args.batch_size, progress=not args.quiet, meta=meta, edit_batch=args.edit_batch,
            checkpoint=checkpoint, checkpoint_every=args.checkpoint_every, on_checkpoint=on_checkpoint,
            pre_cache=pre_cache, pre_key=pre_key, subjects=not args.no_subject,
        )
    finally:
        if flushed:
            torch.set_flush_denormal(False)
    out = pathlib.Path(args.output)
    write_text(out, json.dumps(result, indent=1, default=json_default))
    if checkpoint is not None:
        checkpoint.remove()
    print(format_summary(result))
    print(f"wrote {out}")
    return 0


def format_summary(result: dict) -> str:
    def f(v):
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    keys = ["rel", "gen", "loc", "rel_ppl", "rel_em", "gen_em", "mean", "route_rel", "route_gen", "route_loc_any",
            "gen_all", "route_gen_all", "nbr_spec", "nbr_fire"]
    parts = [f"{k}={f(result.get(k))}" for k in keys if k in result]
    return (
        f"{result['method']} on {pathlib.Path(result.get('data', '?')).name} ({result.get('format')}), "
        f"N={result['n_edits']}: " + " ".join(parts)
        + f" | edit {result['edit_seconds_total']:.1f}s ({result['edit_seconds_mean']:.2f}s/edit), eval {result['eval_seconds']:.1f}s"
    )


def cmd_plot(args) -> int:
    from memoir.eval.plot import plot_results

    path = plot_results(args.results, args.output, metrics=args.metrics, curve=args.curve, by_age=args.by_age)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="memoir-eval")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    add_plot_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
