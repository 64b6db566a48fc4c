"""``python -m engine ...``: everything the app does, from a terminal.

Each subcommand is one engine call plus formatting. User errors (EngineError) print one line on
stderr and exit 2; ``--json`` prints exactly one JSON document on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from engine.errors import EngineError
from engine.registry import DEFAULT_MODEL


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def cmd_models(args: argparse.Namespace) -> int:
    from engine.catalog import search

    entries = search(args.filter or "", source=args.source, packaged_only=args.packaged)
    if args.json:
        _print_json([e.to_dict() for e in entries])
        return 0
    for e in entries:
        tag = "  [packaged weights]" if e.packaged else ""
        print(f"{e.name:<48} {e.family:<20} {_human(e.params):>8}{tag}")
    print(f"{len(entries)} models", file=sys.stderr)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from engine.anatomy import summarize
    from engine.models import create_model

    handle = create_model(args.model, weights=args.weights, num_classes=args.num_classes,
                          check_output=False)
    size = args.input_size or handle.spec.input_size[-1]
    summary = summarize(handle.module, (3, size, size), max_depth=args.depth)
    if args.json:
        data = summary.to_dict()
        data.update(model=handle.spec.name, spec=handle.spec.to_dict())
        _print_json(data)
        return 0
    print(f"{handle.spec.name}  weights={handle.spec.weights}  head={handle.spec.head}")
    print(f"{'module':<50} {'type':<24} {'params':>10} {'trainable':>10}  output")
    for row in summary.rows:
        label = ("  " * row.depth) + (row.name.rsplit(".", 1)[-1] if row.name else "(model)")
        print(f"{label:<50} {row.type:<24} {row.params:>10,} {row.trainable:>10,}  {row.output_shape}")
    print(f"input {summary.input_shape} -> output {summary.output_shape}")
    print(f"total params {summary.total_params:,}  trainable {summary.trainable_params:,}  "
          f"buffer elements {summary.total_buffers:,}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from engine.infer import predict_files
    from engine.models import create_model

    handle = create_model(args.model, weights=args.weights)
    results = predict_files(handle, args.images, top_k=args.top_k)
    if args.json:
        _print_json([r.to_dict() for r in results])
    else:
        for r in results:
            if r.error:
                print(f"{r.file}: ERROR {r.error}")
                continue
            print(r.file)
            for t in r.topk or []:
                print(f"  {t.prob:6.1%}  {t.label}  (#{t.index})")
    return 1 if any(r.error for r in results) else 0


def cmd_freeze(args: argparse.Namespace) -> int:
    from engine.freeze import FreezePlan, apply_plan
    from engine.models import create_model
    from engine.stages import model_stages

    handle = create_model(args.model, weights=args.weights, num_classes=args.num_classes,
                          check_output=False)
    extra = {"bn_policy": args.bn, "head_lr": args.head_lr, "backbone_lr_ratio": args.backbone_lr_ratio,
             "stage_lr_decay": args.stage_lr_decay}
    plan = FreezePlan.parse(args.strategy, **extra)
    if plan.strategy == "custom":
        plan = FreezePlan.custom(stages=_split(args.stages), patterns=_split(args.patterns), **extra)
    report = apply_plan(handle.module, model_stages(handle.module, handle.spec.head), plan)
    if args.json:
        data = report.to_dict()
        data["model"] = handle.spec.name
        _print_json(data)
        return 0
    print(f"{handle.spec.name}: {plan.strategy}, BN in frozen stages: {plan.bn_policy}")
    print(f"{'stage':<34} {'params':>12} {'trainable':>12} {'lr':>10} {'BN fixed':>9}")
    for row in report.stages:
        lr = f"{row.lr:.2e}" if row.lr else "frozen"
        print(f"{row.name:<34} {row.params:>12,} {row.trainable:>12,} {lr:>10} {row.bn_fixed:>4}/{row.bn_layers}")
    print(f"trainable {report.trainable_params:,} of {report.total_params:,} "
          f"({report.trainable_pct:.1f}%), frozen BN layers: {len(report.frozen_bn)}")
    return 0


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """MODEL, --weights (none: structure does not depend on weights), --num-classes, --json."""
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--weights", default="none",
                   help="packaged|hub|none|PATH (shapes and counts do not depend on weights)")
    p.add_argument("--num-classes", type=int, help="replace the head with one of this size")
    p.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine",
                                     description="Transfer-learning workbench engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list/search the model catalog (timm + torchvision)")
    p.add_argument("--filter", default="", help="substring of the name or family")
    p.add_argument("--source", choices=["timm", "torchvision"])
    p.add_argument("--packaged", action="store_true", help="only models with offline weights")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("summary", help="module tree, parameter counts and output shapes")
    _add_model_args(p)
    p.add_argument("--input-size", type=int, help="square input size (default: the model's)")
    p.add_argument("--depth", type=int, help="only list modules up to this depth")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("freeze", help="apply a freeze plan and report what trains")
    _add_model_args(p)
    p.add_argument("--strategy", default="feature-extraction",
                   help="feature-extraction | full | last-n:N | custom")
    p.add_argument("--stages", help="custom: comma-separated stage names that train")
    p.add_argument("--patterns", help="custom: comma-separated globs of parameter names that train")
    p.add_argument("--bn", default="freeze", choices=["freeze", "adapt", "train"],
                   help="BatchNorm in frozen stages")
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--backbone-lr-ratio", type=float, default=0.1)
    p.add_argument("--stage-lr-decay", type=float, default=1.0)
    p.set_defaults(func=cmd_freeze)

    p = sub.add_parser("predict", help="top-k classes for images")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--weights", default="packaged", help="packaged|hub|none|PATH")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
