"""Gradient flow: per-layer gradient norms of plain and residual networks at depths 20/56/110.

    python experiments/gradient_flow.py --quick        # depths 20 and 44, 0 and 3 steps, digits: ~30 s on 2 CPU cores
    python experiments/gradient_flow.py                # depths 20/56/110, 0 and 100 steps (CIFAR-10 if prepared)

Tests the article's claim that deep plain networks suffer from vanishing gradients and
shortcuts cure it. For each network, the L2 norm of the loss gradient with respect to each
conv/linear kernel (forward order: stem conv, each block's conv1/conv2, head) is measured
on one fixed batch of training images (BatchNorm in train mode, as in training) at
initialisation and after each ``--k`` SGD steps of the library's training step. The
optimiser is the paper's (``cifar10_resnet20`` recipe: SGD lr 0.1, momentum 0.9, weight
decay 1e-4, batch 128) on whichever dataset runs. What the numbers show is printed. Measured
here: with BatchNorm, a deep plain network's gradient does not vanish towards the input at
initialisation, it *grows* (explodes) layer after layer, while a ResNet's stays within a
narrow band; a few SGD steps later the huge first updates have inflated the plain net's
early weights and their gradients, relative to the weights, have collapsed (vanished).

Writes ``gradient_flow.{csv,json}`` (one row per model, step and layer),
``gradient_flow_summary.{csv,json}`` (first/last conv layer, head, spread) and
``gradient_flow.png`` / ``gradient_flow_ratio.png`` (gradient norm, and gradient norm over
weight norm, against layer index) into ``--outdir``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # `common` sits beside the scripts, however a script is loaded
    sys.path.insert(0, _HERE)
from common import cmdline, report, runs  # noqa: E402
from common.gradient_flow import gradient_flow, summarize_gradient_flow  # noqa: E402

# Depth 44: the shallowest plain net whose first-layer gradient at initialisation is far above 10x its
# ResNet's (plain-32's is only about 10x), the margin the tests assert.
QUICK = {"depths": [20, 44], "k": [0, 3], "batch_size": 16}


def parse(argv):
    p = cmdline.experiment_parser(__doc__, "gradient_flow", "depths 20/44, a few steps, digits (used by the tests)",
                                  batch_help="batch for the SGD steps and the probe (default 128)")
    p.add_argument("--depths", type=int, nargs="+", default=None, help="depths (6n+2), default 20 56 110")
    p.add_argument("--k", type=int, nargs="+", default=None, help="SGD steps after which to measure (0 = init); "
                                                                   "default 0 100")
    p.add_argument("--recipe", default="cifar10_resnet20", help="recipe giving optimiser and schedule")
    p.add_argument("--seed", type=int, default=0)
    args, overrides = cmdline.parse_experiment_args(p, argv, QUICK,
                                                    {"depths": [20, 56, 110], "k": [0, 100], "batch_size": 128})
    args.k = sorted(set(args.k))
    return args, overrides


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, user_overrides = parse(argv)
    dataset, note = runs.experiment_dataset(args)
    out = Path(args.outdir)
    print(f"gradient flow: {args.recipe} optimiser on {dataset}, depths {args.depths}, measured after "
          f"{args.k} steps, batch {args.batch_size}; machine: {runs.machine()}")

    rows = []
    for depth in args.depths:
        for kind in ("plain", "resnet"):
            model = f"{kind}{depth}"
            got = gradient_flow(model, dataset=dataset, steps=args.k, recipe=args.recipe,
                                batch_size=args.batch_size, seed=args.seed, data_dir=args.data_dir,
                                extra_overrides=user_overrides)
            rows += [{"kind": "plain" if kind == "plain" else "residual", "depth": depth, **r} for r in got]
            print(f"  {model}: " + "; ".join(
                f"step {s['step']}: first conv {s['first_conv_grad']:.3g}, last conv {s['last_conv_grad']:.3g}, "
                f"spread {s['max_over_min']:.3g}x" for s in summarize_gradient_flow(got)))
    summary = summarize_gradient_flow(rows)
    by = {(s["model"], s["step"]): s for s in summary}

    findings = {}
    for depth in args.depths:
        for step in args.k:
            p, r = by[(f"plain{depth}", step)], by[(f"resnet{depth}", step)]
            findings[f"depth{depth}_step{step}"] = {
                "first_conv_plain_over_resnet": p["first_conv_grad"] / r["first_conv_grad"],
                "first_conv_ratio_plain_over_resnet": p["first_conv_ratio"] / r["first_conv_ratio"],
                "spread_plain": p["max_over_min"], "spread_resnet": r["max_over_min"],
                "plain_first_conv_vanishes": bool(p["first_over_last"] < 0.1),
                "plain_first_conv_explodes": bool(p["first_over_last"] > 10),
            }

    cmd = cmdline.command_line("gradient_flow.py", argv)
    meta = {"command": cmd, "machine": runs.machine(), "dataset": dataset, "note": note, "recipe": args.recipe,
            "batch_size": args.batch_size, "steps": args.k, "seed": args.seed, "quick": args.quick,
            "user_overrides": user_overrides, "findings": findings,
            "grad_norm": "L2 norm of d(mean cross-entropy)/d(kernel) on one fixed, unaugmented training batch, "
            "BatchNorm in train mode"}
    written = report.write_table(rows, out / "gradient_flow", meta=meta)
    written += report.write_table(summary, out / "gradient_flow_summary", meta=meta)

    colors = dict(zip(args.depths, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
    for key, fname, ylabel in (("grad_norm", "gradient_flow.png", "||dL/dW|| (log)"),
                               ("ratio", "gradient_flow_ratio.png", "||dL/dW|| / ||W|| (log)")):
        panels = []
        for step in args.k:
            series = []
            for depth in args.depths:
                for kind, style in (("plain", {"ls": "--"}), ("resnet", {"ls": "-"})):
                    sel = [r for r in rows if r["model"] == f"{kind}{depth}" and r["step"] == step]
                    label = f"{'plain' if kind == 'plain' else 'ResNet'}-{depth}"
                    series.append(report.Series(label, [r["index"] for r in sel], [r[key] for r in sel],
                                                {"color": colors[depth], "lw": 1.4, **style}))
            panels.append(("at initialisation" if step == 0 else f"after {step} SGD steps", series))
        written.append(report.plot_lines(
            out / fname, panels, xlabel="layer (stem conv = 1, ..., head = last)", ylabel=ylabel, logy=True,
            suptitle=f"per-layer gradient norms on {dataset} (dashed: plain, solid: ResNet)"))

    print(f"\n{'model':10s} {'step':>5s} {'first conv':>11s} {'last conv':>10s} {'head':>9s} {'first/last':>11s} "
          f"{'max/min':>10s} {'|W| first':>10s} {'|g|/|W| first':>14s}")
    for s in summary:
        print(f"{s['model']:10s} {s['step']:5d} {s['first_conv_grad']:11.3g} {s['last_conv_grad']:10.3g} "
              f"{s['head_grad']:9.3g} {s['first_over_last']:11.3g} {s['max_over_min']:10.3g} "
              f"{s['first_conv_weight']:10.3g} {s['first_conv_ratio']:14.3g}")
    for name, f in findings.items():
        trend = ("grows towards the input (explodes)" if f["plain_first_conv_explodes"] else
                 "shrinks towards the input (vanishes)" if f["plain_first_conv_vanishes"] else
                 "stays within 10x from last to first layer")
        print(f"{name}: plain gradient {trend}; first conv plain/ResNet: gradient "
              f"{f['first_conv_plain_over_resnet']:.3g}x, gradient/weight {f['first_conv_ratio_plain_over_resnet']:.3g}x; "
              f"spread plain {f['spread_plain']:.3g}x vs ResNet {f['spread_resnet']:.3g}x")
    report.report_written(written)
    return {"rows": rows, "summary": summary, "findings": findings, "files": [str(p) for p in written],
            "dataset": dataset}


if __name__ == "__main__":
    main()
