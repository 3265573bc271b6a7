"""``instant-runtime``: export (workstation), train / eval / plan / profiles (device).

Only ``export`` imports torch, and only when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _add_session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads")
    p.add_argument("--arena", action="store_true",
                   help="enable onnxruntime's CPU memory arena (faster, higher peak)")


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", default=None,
                   help="whole-process memory budget, e.g. 256MB, 1.5GB, 512MiB")
    p.add_argument("--profile", default=None,
                   help="device profile: a name from `instant-runtime profiles`, 'auto', or a "
                        ".toml file (sets threads, and the budget when --budget is not given)")


def _budget_and_profile(a):
    """Parse --budget / --profile once, at the CLI edge. Returns (budget bytes or None, threads)."""
    from devices import parse_size, resolve_profile

    prof = resolve_profile(a.profile) if a.profile else None
    budget = parse_size(a.budget) if a.budget else (prof.default_budget if prof else None)
    if prof is not None and budget is not None and budget > prof.ram:
        from .errors import UserError

        raise UserError(f"budget {budget / 1e6:.0f} MB exceeds the {prof.ram / 1e6:.0f} MB of RAM "
                        f"of profile '{prof.name}'")
    threads = a.threads or (prof.default_threads if prof else 0)
    return budget, threads


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="instant-runtime", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("export", help="trace a model into a training bundle (needs torch)")
    e.add_argument("--model", required=True,
                   help="built-in name (mlp, cnn, token-mlp), path/file.py:factory, or file.onnx")
    e.add_argument("--out", required=True, help="bundle directory to write")
    e.add_argument("--input-shape", help="example input shape, batch first, e.g. 32,1,8,8")
    e.add_argument("--npz", help="example inputs from an .npz (one array per input)")
    e.add_argument("--trainable", default="all",
                   help="all | last:N (last N top-level children) | comma-separated globs")
    e.add_argument("--loss", default="cross_entropy", choices=["cross_entropy", "mse"])
    e.add_argument("--instant-exclude", default=None,
                   help="comma-separated globs of layers INSTANT leaves exact (default: the "
                        "classifier head); 'none' compresses every eligible layer")
    e.add_argument("--calib-every", type=int, default=50)
    e.add_argument("--calib-batches", type=int, default=5)
    e.add_argument("--energy", type=float, default=0.95)
    e.add_argument("--oversample", type=int, default=0)

    t = sub.add_parser("train", help="train a bundle on the device (no torch)")
    t.add_argument("bundle")
    t.add_argument("--data", default="digits", help="built-in dataset name or .npz file")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--micro-batch", type=int, default=None,
                   help="split each batch (gradient accumulation keeps the effective batch)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    t.add_argument("--mode", default="instant", choices=["instant", "vanilla"])
    t.add_argument("--energy", type=float, default=None, help="INSTANT energy threshold ε")
    t.add_argument("--oversample", type=int, default=None, help="INSTANT oversampling p")
    t.add_argument("--calib-every", type=int, default=None)
    t.add_argument("--calib-batches", type=int, default=None)
    t.add_argument("--max-rank", type=int, default=None, help="cap every INSTANT rank")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="output folder (default BUNDLE/run)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--checkpoint-every", type=int, default=50,
                   help="write OUT/checkpoints/ every N steps (0: only at the end)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the latest good checkpoint in OUT")
    t.add_argument("--max-nonfinite", type=int, default=5,
                   help="stop after this many consecutive non-finite losses (each is skipped)")
    _add_session_args(t)
    _add_budget_args(t)

    v = sub.add_parser("eval", help="evaluate a bundle's weights on data")
    v.add_argument("bundle")
    v.add_argument("--data", default="digits")
    v.add_argument("--weights", default=None,
                   help="params .npz (default BUNDLE/run/params.npz if present, else initial)")
    v.add_argument("--batch", type=int, default=256)
    _add_session_args(v)

    pl = sub.add_parser("plan", help="per-layer INSTANT ranks, saved bytes and backward FLOPs")
    pl.add_argument("bundle")
    pl.add_argument("--data", default=None, help="calibrate on this data to show real ranks")
    pl.add_argument("--batch", type=int, default=32)
    pl.add_argument("--mode", default="instant", choices=["instant", "vanilla"])
    _add_session_args(pl)
    _add_budget_args(pl)

    sub.add_parser("profiles", help="list the built-in device profiles")

    xm = sub.add_parser("export-model",
                        help="write a standalone inference .onnx (+ .safetensors) with trained "
                             "weights baked in (needs onnx, not torch)")
    xm.add_argument("source", help="bundle directory or training run directory")
    xm.add_argument("--out", required=True, help=".onnx file to write")
    xm.add_argument("--weights", default=None,
                    help="params .npz (default: the run's params.npz, else BUNDLE/run/params.npz, "
                         "else initial)")
    xm.add_argument("--bundle", default=None,
                    help="bundle directory, for a run directory not inside its bundle")
    return ap


def _cmd_export(a) -> int:
    from export import export_bundle

    exclude = None
    if a.instant_exclude is not None:
        exclude = [] if a.instant_exclude == "none" else a.instant_exclude.split(",")
    path = export_bundle(a.model, a.out, input_shape=a.input_shape, npz=a.npz,
                         trainable=a.trainable, loss=a.loss, instant_exclude=exclude,
                         calib_every=a.calib_every, calib_batches=a.calib_batches,
                         energy=a.energy, oversample=a.oversample)
    import json

    m = json.loads((path / "manifest.json").read_text())
    print(f"bundle written to {path}: {len(m['params'])} trainable tensors, "
          f"{len(m['instant']['layers'])} INSTANT layers, modes "
          f"{', '.join(k for k in m['graphs'] if k != 'infer')}")
    return 0


def _cmd_train(a) -> int:
    from .bundle import open_bundle
    from .data import load_data
    from .run import RunConfig, train
    from .trainer import SessionConfig, Trainer

    budget, threads = _budget_and_profile(a)
    bundle = open_bundle(a.bundle)
    data = load_data(a.data, bundle)
    trainer = Trainer(bundle, mode=a.mode, optimizer=a.optimizer, lr=a.lr,
                      weight_decay=a.weight_decay, micro_batch=a.micro_batch,
                      session=SessionConfig(threads=threads, arena=a.arena),
                      energy=a.energy, oversample=a.oversample, calib_every=a.calib_every,
                      calib_batches=a.calib_batches, max_rank=a.max_rank, seed=a.seed)
    out = Path(a.out) if a.out else bundle.path / "run"
    from .checkpoint import TrainingInterrupted

    try:
        summary = train(trainer, data, RunConfig(steps=a.steps, batch=a.batch, seed=a.seed,
                                                 out=out, progress=not a.no_progress,
                                                 budget=budget,
                                                 checkpoint_every=a.checkpoint_every,
                                                 resume=a.resume,
                                                 max_nonfinite=a.max_nonfinite), bundle)
    except TrainingInterrupted as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    print("\n".join(summary.lines(trainer)))
    return 0


def _cmd_eval(a) -> int:
    from .bundle import open_bundle
    from .data import load_data
    from .memory import peak_rss
    from .trainer import SessionConfig, Trainer

    bundle = open_bundle(a.bundle)
    data = load_data(a.data, bundle)
    weights = Path(a.weights) if a.weights else None
    if weights is None and (bundle.path / "run" / "params.npz").is_file():
        weights = bundle.path / "run" / "params.npz"
    if weights is not None and not weights.is_file():
        from .errors import UserError

        raise UserError(f"weights file '{weights}' not found")
    trainer = Trainer(bundle, mode="vanilla", weights=weights,
                      session=SessionConfig(threads=a.threads, arena=a.arena))
    target = data.test if data.test is not None else data
    loss, acc = trainer.evaluate(target, a.batch)
    which = "held-out" if data.test is not None else "all"
    print(f"{which} examples: {len(target)}, loss {loss:.4f}"
          + (f", accuracy {acc:.3f}" if acc is not None else "")
          + f" (weights: {weights or 'initial'}; peak RSS {peak_rss() / 1e6:.1f} MB)")
    return 0


def _cmd_plan(a) -> int:
    from .accounting import format_table, layer_costs
    from .bundle import open_bundle

    budget, threads = _budget_and_profile(a)
    bundle = open_bundle(a.bundle)
    if budget is not None:
        from .budget import plan_for_budget, print_plan
        from .data import load_data
        from .trainer import SessionConfig, Trainer

        data = load_data(a.data or "digits", bundle)
        tr = Trainer(bundle, mode=a.mode, session=SessionConfig(threads=threads, arena=a.arena))
        plan = plan_for_budget(tr, data, min(a.batch, len(data)), budget)
        print_plan(plan, tr)
        return 0
    ranks: dict = {}
    if a.data and bundle.layers:
        import numpy as np

        from .data import load_data
        from .trainer import SessionConfig, Trainer

        data = load_data(a.data, bundle)
        tr = Trainer(bundle, mode="instant", session=SessionConfig(threads=threads,
                                                                  arena=a.arena))
        tr.calibrate(data, min(a.batch, len(data)), np.random.default_rng(0))
        ranks = tr.ranks()
    if not bundle.layers:
        print("no INSTANT layers in this bundle (no trainable Linear / 1x1 Conv besides the head)")
        return 0
    print(f"INSTANT layers of {bundle.path} "
          + ("(ranks from calibration on " + a.data + ")" if ranks else
             "(full rank: pass --data to calibrate)"))
    print(format_table(layer_costs(bundle.layers, ranks)))
    return 0


def _cmd_profiles(a) -> int:
    from devices import format_size, list_profiles

    for p in list_profiles():
        print(f"{p.name:<18} {p.arch:<8} RAM {format_size(p.ram):>10}  {p.cores:>2} cores  "
              f"budget {format_size(p.default_budget):>10}  {', '.join(p.execution_providers)}")
    return 0


def _cmd_export_model(a) -> int:
    from .export_model import export_model

    r = export_model(a.source, a.out, weights=a.weights, bundle=a.bundle)
    print(f"model written to {r.onnx_path} ({r.params} trained tensors from {r.weights})"
          + (f", external data {r.external_data}" if r.external_data else ""))
    if r.safetensors_path:
        print(f"torch weights written to {r.safetensors_path}")
    else:
        print("note: safetensors is not installed; skipped the .safetensors file "
              "(pip install safetensors)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from devices import ProfileError

    from .errors import UserError

    handlers = {"export": _cmd_export, "train": _cmd_train, "eval": _cmd_eval,
                "plan": _cmd_plan, "profiles": _cmd_profiles,
                "export-model": _cmd_export_model}
    try:
        return handlers[args.cmd](args)
    except (UserError, ProfileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ == "ExportError":
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
