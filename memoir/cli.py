"""The ``memoir`` command line: ``demo``, ``edit``, ``inspect``, ``serve``, ``config``, ``info``, ``bench``
(+ ``eval`` / ``plot``)."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import textwrap
import time

# A handful of counterfactual edits the default model knows the true answer to (prompt, new
# answer, subject), each with a rephrasing that was never edited and that the unedited model also
# answers with the true fact; plus unrelated prompts that must keep their answers.
DEMO_EDITS = [
    ("The Eiffel Tower is located in the city of", "Rome", "Eiffel Tower",
     "Where is the Eiffel Tower? It stands in the city of"),
    ("The capital of Japan is", "Nairobi", "Japan", "The capital city of Japan is called"),
    ("Romeo and Juliet was written by", "Charles Dickens", "Romeo and Juliet",
     "Who wrote Romeo and Juliet? It was written by"),
    ("The Mona Lisa was painted by", "Vincent van Gogh", "Mona Lisa", "Who painted the Mona Lisa? It was painted by"),
]
DEMO_UNRELATED = [
    "Water is made of hydrogen and",
    "The Great Wall is located in",
    "The speed of light is about",
]
# Same wording as an edited prompt, another subject: they must keep the original answer.
DEMO_SIMILAR = ["The capital of France is", "Hamlet was written by"]
# A rephrasing with the subject misspelt, and the edit (index into DEMO_EDITS) it must reach.
DEMO_MISSPELT = [("Who wrote Romeo and Juleit? It was written by", 2)]


def _config_from_args(args):
    from memoir import MemoirConfig

    if getattr(args, "config", None):
        return MemoirConfig.load(args.config)
    return MemoirConfig.preset(args.preset)


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_demo(args) -> int:
    import torch

    from memoir import MemoirEditor, load_model

    torch.manual_seed(0)
    cols = shutil.get_terminal_size((110, 20)).columns
    t0 = time.perf_counter()
    print(f"Loading {args.model} ...", flush=True)
    model, tok = load_model(args.model)
    t_load = time.perf_counter() - t0
    config = _config_from_args(args)
    t0 = time.perf_counter()
    editor = MemoirEditor(model, tok, config)
    t_attach = time.perf_counter() - t0
    cfg = editor.config
    print(f"  loaded in {t_load:.1f}s; memory attached at {editor.target.qualified_name} "
          f"(k={cfg.top_k} of {editor.target.in_features} columns, tau={cfg.threshold}) in {t_attach:.1f}s")

    edits = DEMO_EDITS[: args.n_edits]
    rows = [(p, "edited") for p, _, _, _ in edits] + [(r, "rephrased") for _, _, _, r in edits]
    rows += [(p, "misspelt") for p, i in DEMO_MISSPELT if i < len(edits)]
    rows += [(p, "unrelated") for p in DEMO_UNRELATED] + [(p, "similar") for p in DEMO_SIMILAR]
    prompts = [p for p, _ in rows]
    before = editor.generate(prompts, max_new_tokens=args.max_new_tokens)

    print(f"\nApplying {len(edits)} counterfactual edits (each trains only its own {cfg.top_k} memory columns):")
    t0 = time.perf_counter()
    for p, target, subject, _ in edits:
        r = editor.edit(p, target, subject)
        print(f"  [{r.edit_id}] {p!r} -> {target!r}: {r.steps} steps, loss {r.loss:.3f}, {r.seconds:.1f}s", flush=True)
    t_edit = time.perf_counter() - t0
    if cfg.threshold_mode == "auto":
        print(f"  tau calibrated on the background texts: {editor.threshold:.3f}")

    t0 = time.perf_counter()
    after = editor.generate(prompts, max_new_tokens=args.max_new_tokens)
    routes = editor.retrieve(prompts)
    t_gen = time.perf_counter() - t0

    w = max(20, (cols - 28) // 3)
    print(f"\n{'kind':9s} {'prompt':{w}s} {'before':{w}s} {'after':{w}s} memory")
    for (prompt, kind), b, a, r in zip(rows, before, after, routes):
        fired = f"edit {r.edit_id} ({r.score:.2f})" if r.edit_id is not None else f"off ({r.score:.2f})"
        print(f"{kind:9s} {_short(prompt, w):{w}s} {_short(b, w):{w}s} {_short(a, w):{w}s} {fired}")
    def fired(kind):
        return sum(r.edit_id is not None for (_, k), r in zip(rows, routes) if k == kind), sum(
            k == kind for _, k in rows)

    (e_hit, e_n), (r_hit, r_n), (m_hit, m_n), (u_hit, u_n), (s_hit, s_n) = (
        fired(k) for k in ("edited", "rephrased", "misspelt", "unrelated", "similar"))
    print(textwrap.dedent(f"""
        The memory fired for {e_hit}/{e_n} edited, {r_hit}/{r_n} rephrased and {m_hit}/{m_n} misspelt prompts, for {u_hit}/{u_n}
        unrelated prompts (memory off: the original model's answer, bit for bit) and for {s_hit}/{s_n}
        prompts that reuse an edited prompt's wording with another subject (router: {cfg.router}; the
        mask router can confuse those with the edit, the subject router checks the subject).
        Timings: load {t_load:.1f}s, attach {t_attach:.1f}s, {len(edits)} edits {t_edit:.1f}s
        ({t_edit / max(1, len(edits)):.1f}s/edit), generate+retrieve for {len(prompts)} prompts {t_gen:.1f}s.
        """).rstrip())
    return 0


def read_requests(path: str) -> list:
    """The edit requests of a JSON list or JSONL file, each checked, or ``SystemExit`` naming the
    file line (JSONL) or list index (JSON) of the first bad one, before any model is loaded."""
    from memoir.types import EditRequest

    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
        located = [(f"item {i}", r) for i, r in enumerate(data)] if isinstance(data, list) else [("line 1", data)]
    except json.JSONDecodeError:
        located = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{number}: not JSON ({e.msg} at column {e.colno})") from None
    if not located:
        raise SystemExit(f"{path}: no edit requests (expected a JSON list or JSONL of {{prompt, target}} records)")
    requests = []
    for where, item in located:
        try:
            requests.append(EditRequest.coerce(item))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"{path}, {where}: {e}") from None
    return requests


def cmd_edit(args) -> int:
    """Apply edits from a JSON/JSONL file of {"prompt", "target"} and print generations."""
    from memoir import MemoirEditor, load_model

    requests = read_requests(args.requests)
    model, tok = load_model(args.model)
    editor = MemoirEditor(model, tok, _config_from_args(args))
    try:
        for i, r in enumerate(requests):  # model-dependent checks (special tokens, length), still before any edit
            try:
                editor.check_request(r)
            except ValueError as e:
                raise SystemExit(f"{args.requests}, request {i}: {e}") from None
        from tqdm.auto import tqdm

        results = []
        if args.batch_size < 1:
            raise SystemExit(f"--batch-size {args.batch_size}: must be >= 1")
        if args.batch_size > 1 and editor.layer.private is None:
            raise SystemExit("--batch-size > 1 needs memory: private (the smollm2 preset's layout)")
        try:
            bar = tqdm(total=len(requests), desc="editing", unit="edit", disable=args.quiet)
            for start in range(0, len(requests), args.batch_size):
                chunk = requests[start: start + args.batch_size]
                results.extend(editor.edit_many(chunk, progress=False, batch_size=len(chunk)) if len(chunk) > 1
                               else [editor.edit(chunk[0].prompt, chunk[0].target, chunk[0].subject,
                                                aliases=chunk[0].aliases)])
                bar.update(len(chunk))
            bar.close()
        except KeyboardInterrupt:
            print(f"interrupted after {len(results)} of {len(requests)} edits", file=sys.stderr)
            raise
    finally:
        if args.save and editor.edits():
            editor.save(args.save)
            print(f"saved {len(editor.edits())} edits to {args.save}", file=sys.stderr)
    outs = editor.generate([r.prompt for r in results], max_new_tokens=args.max_new_tokens)
    for r, out in zip(results, outs):
        print(json.dumps({"edit_id": r.edit_id, "prompt": r.prompt, "target": r.target, "steps": r.steps,
                          "loss": round(r.loss, 4), "converged": r.converged, "kept": r.kept, "disturbed": list(r.disturbed),
                          "seconds": round(r.seconds, 2), "generation": out}))
    return 0


def cmd_inspect(args) -> int:
    """Print what a saved memory holds (checked as a load checks it, without the model)."""
    from memoir.persist import describe

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    t, c, m = info["target"], info["config"], info["memory"]
    print(f"{info['path']}: {info['format']}, {len(info['edits'])} edits, {info['bytes'] / 1e6:.1f} MB, checks passed")
    print(f"  target   {t['name']} of a {t['model_type']} model ({t['in_features']} -> {t['out_features']}, "
          f"{t['dtype']})")
    print(f"  routing  router {c['router']}, top_k {c['top_k']}, threshold {c['threshold']} ({c['threshold_mode']})")
    print(f"  memory   {m['columns_written']} of {m['shape'][1]} columns written, norm {m['norm']:.3g}")
    if info["removed_edit_ids"]:
        print(f"  removed  {', '.join(map(str, info['removed_edit_ids']))}")
    cols = shutil.get_terminal_size((110, 20)).columns
    w = max(20, (cols - 40) // 2)
    for e in info["edits"]:
        flag = ("" if e["converged"] else "  (not converged)") + (
            f"  (disturbed {', '.join(map(str, e['disturbed']))})" if e["disturbed"] else "")
        print(f"  [{e['edit_id']}] {_short(e['prompt'], w)!r} -> {_short(e['target'], w)!r}: "
              f"{e['steps']} steps, loss {e['loss']:.3f}{flag}")
    return 0


def cmd_info(args) -> int:
    import torch

    from memoir import ops

    try:
        import memoir.kernels as kernels

        triton_ok = kernels.available()
    except Exception:  # pragma: no cover
        triton_ok = False
    print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                      "retrieval_backend": ops.backend(), "kernel_mode": ops.kernel_mode(),
                      "triton": triton_ok}, indent=2))
    return 0


def cmd_bench(args) -> int:
    from memoir import bench

    try:
        if args.vllm:
            result = bench.run_vllm(args.output)
            print(f"vLLM generation with the plugin: {result['ratio_memoir_vs_plain']:.3f}x plain vLLM's tokens/s; "
                  f"wrote {args.output}/vllm.json")
            return 0
        summary = bench.run(args.output, quick=args.quick, select=args.select)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"memoir bench: {e}", file=sys.stderr)
        return 1
    for group, rows in summary["groups"].items():
        for r in rows:
            for base, ratio in r.get("speedup_vs", {}).items():
                print(f"{group:40s} {r['name'][:60]:60s} {ratio:7.2f}x vs {base}")
    print(f"wrote {args.output}/bench.json, summary.json, summary.png")
    return 0


def cmd_serve(args) -> int:
    import os

    from memoir.integrations import vllm as plugin

    extra = args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args
    plugin.saved_target(args.edits)  # a wrong folder is named before a missing vLLM
    command = plugin.server_command(plugin.vllm_python(args.python), args.edits, args.model, args.host, args.port,
                                    args.max_model_len, int(args.kv_cache_gib * (1 << 30)), extra)
    if args.dry_run:
        print(" ".join(command))
        return 0
    print(f"memoir serve: {args.edits} on http://{args.host}:{args.port}/v1 (vLLM's OpenAI-compatible API)",
          flush=True)
    os.execv(command[0], command)  # vLLM owns the process from here (signals, exit status)


def cmd_config(args) -> int:
    from memoir.config import MemoirConfig, markdown_table, rewrite_table

    if args.write:
        rewrite_table(args.write)
        print(f"rewrote the configuration table in {args.write}")
    elif args.preset:
        print(MemoirConfig.preset(args.preset).to_yaml(), end="")
    else:
        print(markdown_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memoir", description="MEMOIR lifelong knowledge editing")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--model", default="smollm2", help="'smollm2', a local HF folder or a .gguf file")
        sp.add_argument("--preset", default="smollm2", help="shipped preset ('smollm2', 'reference')")
        sp.add_argument("--config", help="YAML/JSON MemoirConfig file (overrides --preset)")
        sp.add_argument("--max-new-tokens", type=int, default=10)

    d = sub.add_parser("demo", help="edit a few facts in the default model and show before/after")
    model_args(d)
    d.add_argument("--n-edits", type=int, default=len(DEMO_EDITS), choices=range(1, len(DEMO_EDITS) + 1))
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("edit", help="apply edits from a JSON/JSONL file of {prompt, target}")
    model_args(e)
    e.add_argument("requests", help="JSON list or JSONL of {\"prompt\": ..., \"target\": ...}")
    e.add_argument("--save", help="directory to save the edits to (reload with MemoirEditor.load)")
    e.add_argument("--batch-size", type=int, default=1, help="train this many edits together (memory private)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_edit)

    b = sub.add_parser("bench", help="the throughput suite (benchmarks/): JSON, ratios to baselines, a plot")
    b.add_argument("--quick", action="store_true", help="small sizes: a few minutes on a 2-core CPU")
    b.add_argument("--output", default="benchmarks/results/bench", help="folder for bench.json, summary.json/.png")
    b.add_argument("-k", dest="select", help="only the benchmarks matching this pytest -k expression")
    b.add_argument("--vllm", action="store_true",
                   help="instead: vLLM with the plugin vs plain vLLM (needs scripts/setup_vllm.sh), vllm.json")
    b.set_defaults(func=cmd_bench)

    v = sub.add_parser("serve", help="serve saved edits with vLLM's OpenAI-compatible HTTP server",
                       epilog="anything after -- goes to vLLM's server unchanged")
    v.add_argument("--edits", required=True, help="a folder written by MemoirEditor.save / memoir edit --save")
    v.add_argument("--model", default="smollm2", help="the model the edits were made on: 'smollm2' or a HF folder")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-model-len", type=int, default=2048, help="longest prompt + completion, in tokens")
    v.add_argument("--kv-cache-gib", type=float, default=1.0, help="memory for the KV cache")
    v.add_argument("--python", help="the Python with vLLM (default: this one, $MEMOIR_VLLM_PYTHON or .venv-vllm)")
    v.add_argument("--dry-run", action="store_true", help="print the vLLM command instead of running it")
    v.add_argument("vllm_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    v.set_defaults(func=cmd_serve)

    c = sub.add_parser("config", help="every MemoirConfig field (default, allowed values, meaning) or a preset")
    c.add_argument("--preset", help="print this shipped preset's fields as YAML")
    c.add_argument("--write", metavar="MARKDOWN", help="rewrite the generated table in this Markdown file")
    c.set_defaults(func=cmd_config)

    s = sub.add_parser("inspect", help="show what a saved memory holds (edits, target, routing), checked")
    s.add_argument("path", help="a folder written by MemoirEditor.save / memoir edit --save")
    s.add_argument("--json", action="store_true", help="print it as JSON")
    s.set_defaults(func=cmd_inspect)

    i = sub.add_parser("info", help="show which kernels serve retrieval and the memory")
    i.set_defaults(func=cmd_info)

    try:  # evaluation commands live in memoir.eval
        from memoir.eval.cli_eval import add_eval_parser, add_plot_parser

        add_eval_parser(sub)
        add_plot_parser(sub)
    except ImportError as exc:  # pragma: no cover
        logging.getLogger(__name__).debug("eval commands unavailable: %s", exc)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    try:
        return args.func(args) or 0
    except (FileNotFoundError, ValueError) as exc:
        print(f"memoir: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memoir: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
