"""``instant-runtime``: export (workstation), train / eval / plan / profiles (device).

Only ``export`` imports torch, and only when it runs. Process-wide settings (the allocator, the
onnxruntime arena, thread environment) are made here, once, at the edge.

Why one module (~600 lines): it is the whole command-line surface — one parser per command and
its handler side by side, so an option and its validation are read together; every handler is a
thin call into the library (``runtime.run``, ``runtime.budget``, ``export``). The fleet commands
live in ``runtime/fleet/cli.py``.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path

from devices.planner import budget_mb

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``, exit 2) instead of usage dumps."""

    def error(self, message: str):  # type: ignore[override]
        from .console import one_line

        self.exit(2, one_line(f"error: {message}; see `{self.prog} --help`") + "\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse's, an unknown option's error pointing to its command's --help (session
        47 probe: `eval --steps 3` was sent to `instant-runtime --help`)."""
        args = list(sys.argv[1:] if args is None else args)
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self
            for word in args:  # the leading command words: train, fleet client, ...
                subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
                if not subs or word not in subs[0].choices:
                    break
                parser = subs[0].choices[word]
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns


def _add_session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime intra-op threads (default: the profile's, else one per "
                        "core; 0: one per core; at most 4 per core)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="execution provider: cpu, cuda, or auto (the profile's providers that "
                        "this onnxruntime offers, else CPU)")


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", default=None,
                   help="whole-process memory budget, e.g. 256MB, 1.5GB, 512MiB")
    p.add_argument("--profile", default=None,
                   help="device profile: a name from `instant-runtime profiles`, 'auto', or a "
                        ".toml file (sets threads, and the budget when --budget is not given)")


class _DefaultData(str):
    """``--data`` left out: the built-in digits, told apart from ``--data digits`` (session 34
    probe: an image run's eval without --data was told digits did not fit, a dataset it never
    named)."""


def _add_data_args(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    p.add_argument("--data", default=None if default is None else _DefaultData(default),
                   help="built-in dataset (digits, mnist5k, rotten-tomatoes), an .npz, a "
                        ".csv/.tsv/.jsonl text file, or an image folder with one sub-folder "
                        "per class" + (f" (default: the built-in {default})" if default else ""))
    p.add_argument("--text-column", default="text",
                   help="text files: the text column/field (default text)")
    p.add_argument("--label-column", default="label",
                   help="text files: the label column/field (default label)")
    p.add_argument("--val", default=None,
                   help="held-out data (a file or folder like --data, same labels)")
    p.add_argument("--val-split", type=float, default=None,
                   help="hold out this fraction of --data (seeded by --seed)")


def _lengths_option(text: str) -> list[int] | None:
    """``export --lengths``: None (auto), [] (none) or the lengths."""
    from .errors import UserError

    if text.strip() in ("auto", ""):
        return None
    if text.strip() == "none":
        return []
    try:
        out = [int(v) for v in text.split(",")]
    except ValueError:
        out = []
    if not out or any(v < 1 for v in out):
        raise UserError(f"--lengths '{text}' is invalid: expected auto, none or comma-separated "
                        "positive token lengths, e.g. 32,48")
    return out


def _load_data(a, bundle, spec: str | None = None, class_names: list[str] | None = None,
               training: bool = True):
    from .data import load_data
    from .errors import UserError

    # (session 43 probe: --val without --data was told the built-in digits' split is fixed)
    without = _without_data(a) if spec is None and isinstance(a.data, _DefaultData) else None
    if without == "--val-split" and not 0 < a.val_split < 1:
        without = None  # (its own value's error first: load_data's)
    if without:
        raise UserError(f"{without} was given without --data, which it applies to (without "
                        f"--data the run reads the built-in '{a.data}', whose held-out split "
                        f"is fixed); pass --data with a file or folder of the model's data, or "
                        f"leave {without} out")
    trained = _run_data(a, bundle) if spec is None and isinstance(a.data, _DefaultData) \
        and getattr(a, "resume", False) else None
    if trained and trained != a.data:  # (session 47 probe: "training rows 1438 (this run: 1437)")
        raise UserError(_resume_without_data(trained))
    try:  # (a session-23 probe: accepted without a word)
        same = bool(a.val) and os.path.samefile(a.val, spec or a.data)
    except (OSError, TypeError, ValueError):
        same = False
    if same:
        print(f"note: --val {a.val} is the --data file itself: the held-out figures are on "
              "training rows", flush=True)
    try:
        return load_data(spec or a.data, bundle, text_column=a.text_column,
                         label_column=a.label_column, val=a.val, val_split=a.val_split,
                         seed=getattr(a, "seed", 0), class_names=class_names, training=training)
    except UserError as exc:
        if spec is None and isinstance(a.data, _DefaultData) and a.val is None \
                and a.val_split is None:  # (then the default's own fit: a --val error is not;
            # a resume of a run of other data was refused above: session 44 probe)
            raise UserError(f"no --data given, and the default, the built-in '{a.data}' "
                            f"dataset, does not fit this bundle ({exc}); pass --data with the "
                            "model's data (an .npz, a text file or an image folder)") from None
        raise


def _resume_without_data(trained: str) -> str:
    import shlex

    from .data import BUILTIN_DATASETS

    return (f"no --data given, and --resume reads the data from --data as the run did: it "
            f"trained on '{trained}'; pass --data {shlex.quote(trained)} (the same data"
            + (")" if trained in BUILTIN_DATASETS else ", with the run's --val-split or --val)"))


def _run_data(a, bundle) -> str | None:
    """The --data the run in ``--out`` recorded in its run.json (None: none readable)."""
    from .console import one_line
    from .run_folder import bundle_run, json_object

    try:
        out = Path(a.out) if a.out else bundle_run(bundle.path)
        data = json_object(out / "run.json").get("data")
    except Exception:  # noqa: BLE001 - a damaged run.json: the plain error
        return None
    return one_line(data)[:300] if isinstance(data, str) and data else None


def _without_data(a) -> str | None:
    """The first data option given that only applies to a --data file (None: none)."""
    for flag, value, default in (("--val", getattr(a, "val", None), None),
                                 ("--val-split", getattr(a, "val_split", None), None),
                                 ("--text-column", getattr(a, "text_column", "text"), "text"),
                                 ("--label-column", getattr(a, "label_column", "label"), "label")):
        if value != default:
            return flag
    return None


def _resumed_class_names(out: Path, bundle) -> list[str] | None:
    """The label map a run folder recorded (``--resume`` keeps the same class ids)."""
    from .run_folder import run_class_names

    return run_class_names(out, bundle)


def _run_seed(record: dict, where: Path) -> int:
    """The ``--seed`` the weights' run recorded (``record``: ``weights_record``, its run.json or
    a checkpoint's own; 0 when it has none).

    Raises:
        UserError: a seed that is not one ``train --seed`` takes (a tampered ``where``).
    """
    import json

    from .config import TrainConfig
    from .errors import UserError

    seed = record.get("seed", 0)
    try:
        TrainConfig(seed=seed)  # train's own check
    except UserError:
        raise UserError(f"{where}: seed {json.dumps(seed)[:40]} is not a non-negative "
                        f"integer; pass --seed N, or put back the run's own {where.name}") \
            from None
    return seed


def add_instant_args(p: argparse.ArgumentParser) -> None:
    """--mode and the INSTANT options of ``train`` and ``plan`` (``fleet client`` too): read
    back by :func:`instant_overrides`."""
    p.add_argument("--mode", default=None, choices=["instant", "vanilla"],
                   help="instant: INSTANT compressed backward; vanilla: exact (default instant, "
                        "vanilla for a bundle without INSTANT layers)")
    p.add_argument("--energy", type=float, default=None,
                   help="INSTANT energy threshold ε (default: the bundle's, 0.95 unless export "
                        "set it)")
    p.add_argument("--oversample", type=int, default=None,
                   help="INSTANT oversampling p (default: the bundle's, 0 unless export set it)")
    p.add_argument("--calib-every", type=int, default=None,
                   help="recalibrate every N steps (0: once; default: the bundle's, 50 unless "
                        "export set it)")
    p.add_argument("--calib-batches", type=int, default=None,
                   help="batches each calibration collects Grams over (default: the bundle's, 2 "
                        "unless export set it)")
    p.add_argument("--calib-samples", type=int, default=None,
                   help="samples per batch of the first calibration (default: the batch, or "
                        "fewer where fewer fill every Gram: at least 64)")
    p.add_argument("--max-rank", type=int, default=None, help="cap every INSTANT rank")
    p.add_argument("--rank-policy", default=None, choices=["energy", "budget"],
                   help="budget (default): ranks that minimise the gradient error under the "
                        "plan's memory and --flop-ratio; energy: the paper's ε rule (the default "
                        "when --energy or --oversample is given)")
    p.add_argument("--variance", type=float, default=None,
                   help="budget policy: the variance each compressed tensor keeps (default "
                        "0.99; layers below the FLOP cap's size start at exact ranks unless it "
                        "is given)")
    p.add_argument("--saved-ratio", type=float, default=None,
                   help="compressed activations at most this fraction of the exact ones' bytes "
                        "(any policy; default: as the plan's memory allows)")
    p.add_argument("--flop-ratio", type=float, default=None,
                   help="budget policy: backward FLOPs of the compressed layers as a fraction of "
                        "the exact backward (default 1.0: never more than exact, where those "
                        "layers' exact backward takes 1e8 FLOPs a micro-batch or more; 0: no cap; "
                        "at most 4)")


class _Version(argparse.Action):
    """``--version``, the installed package's (read only when asked: importlib.metadata costs
    ~2 MB at every start, a review)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("instant-runtime")
        except PackageNotFoundError:  # (a checkout that was never installed)
            ours = "(not installed)"
        print(f"instant-runtime {ours}")
        parser.exit(0)


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="instant-runtime", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser, metavar="COMMAND")

    e = sub.add_parser("export", help="trace a model into a training bundle (needs torch)")
    e.add_argument("--model", required=True,
                   help="built-in name (mlp, cnn, token-mlp, minilm-l6, efficientnet-lite0), "
                        "path/file.py:factory, or file.onnx")
    e.add_argument("--out", required=True, help="bundle directory to write")
    e.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    e.add_argument("--input-shape",
                   help="example input shape, batch first, e.g. 32,1,8,8 or 8,64:int64 "
                        "(';' between inputs)")
    e.add_argument("--npz", help="example inputs from an .npz (one array per input)")
    e.add_argument("--trainable", default="all",
                   help="all | last:N (last N top-level children) | comma-separated globs")
    e.add_argument("--loss", default="cross_entropy", choices=["cross_entropy", "mse", "bce"],
                   help="cross_entropy: a class per sample, token or pixel; mse: regression; "
                        "bce: binary cross-entropy on logits (an output made by a Sigmoid: "
                        "on its input), a 0/1 target per output element (multi-label or "
                        "one-logit binary classification)")
    e.add_argument("--class-axis", default="auto", choices=["auto", "1", "last"],
                   help="where a per-token/pixel cross_entropy output holds its classes: 1 "
                        "(torch's [N, classes, H, W]), last ([N, L, classes], [N, H, W, "
                        "classes]) or auto (from the --npz example's y, else 1 at rank 4+ and "
                        "last at rank 3)")
    e.add_argument("--instant-exclude", default=None,
                   help="comma-separated globs of layers INSTANT leaves exact (default: the "
                        "classifier head, and layers over one vector per sample whose Grams "
                        "outweigh what they save: the export notes them); 'none' compresses "
                        "every eligible layer")
    e.add_argument("--calib-every", type=int, default=None,
                   help="INSTANT default recorded in the bundle: recalibrate every N steps "
                        "(0: once; default 50)")
    e.add_argument("--calib-batches", type=int, default=None,
                   help="INSTANT default recorded in the bundle: batches per calibration "
                        "(default 2)")
    e.add_argument("--energy", type=float, default=None,
                   help="INSTANT default recorded in the bundle: energy threshold ε (default "
                        "0.95)")
    e.add_argument("--oversample", type=int, default=None,
                   help="INSTANT default recorded in the bundle: oversampling p (default 0)")
    e.add_argument("--output", default=None,
                   help="the model output to train (a model with several outputs)")
    e.add_argument("--head", type=int, default=None, metavar="CLASSES",
                   help="append a new trainable classifier with this many classes")
    e.add_argument("--pool", default=None, choices=["mean", "cls", "none"],
                   help="with --head: pool an [N, L, C] output over its tokens (mean, the "
                        "default, respects an attention-mask input) or take the first; none for "
                        "an [N, C] output")
    e.add_argument("--tokenizer", default=None,
                   help="tokenizer.json of a text model, copied into the bundle (automatic for "
                        "the built-in text models)")
    e.add_argument("--image-mean", default=None,
                   help="image models: per-channel mean after scaling pixels to [0, 1], e.g. "
                        "0.485,0.456,0.406 (default 0)")
    e.add_argument("--image-std", default=None,
                   help="image models: per-channel std, e.g. 0.229,0.224,0.225 (default 1)")
    e.add_argument("--saved-int8", action="store_true",
                   help="instant mode: save GELU inputs, softmax outputs, attention operands "
                        "and the compressed activations as int8 with per-row scales (a quarter "
                        "of the memory, so ranks under a budget can be ~4x higher; error <= "
                        "0.4 %% of each row's largest value)")
    e.add_argument("--no-prefix", action="store_true",
                   help="keep the training graphs whole: no separate frozen-prefix graph run "
                        "without padding (export/prefix.py; for comparisons)")
    e.add_argument("--lengths", default="auto", metavar="auto|none|N,N",
                   help="text models that take any length and mask their padding (with or "
                        "without --no-prefix): also build the training graphs at these shorter "
                        "token lengths, so micro-batches of short texts run there "
                        "(export/lengths.py; auto, the default: half and three quarters of the "
                        "model's length; none: the full length only)")
    e.add_argument("--classes", default=None,
                   help="class names in id order, comma-separated (kept with the model)")
    e.add_argument("--seed", type=int, default=None,
                   help="seeds torch before a model factory (path/file.py:factory) runs: "
                        "weights it draws at random are the same at each export (default 0; "
                        "built-in models are drawn with seed 0)")

    t = sub.add_parser("train", help="train a bundle on the device (no torch)")
    t.add_argument("bundle")
    _add_data_args(t)
    t.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    t.add_argument("--batch", type=int, default=32,
                   help="examples per optimizer step (default 32)")
    t.add_argument("--micro-batch", type=int, default=None,
                   help="split each batch (gradient accumulation keeps the effective batch); "
                        "with --budget, the largest micro-batch the plan may choose")
    t.add_argument("--lr", type=float, default=1e-3,
                   help="learning rate, constant for the run (default 1e-3)")
    t.add_argument("--weight-decay", type=float, default=None,
                   help="decay of every trainable tensor, biases and norms too (default 0.01 "
                        "for adamw, decoupled; 0 for sgd, added to the gradient)")
    t.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"],
                   help="adamw (betas 0.9, 0.999, eps 1e-8) or sgd (momentum 0.9, as "
                        "torch.optim.SGD); default adamw")
    add_instant_args(t)
    t.add_argument("--seed", type=int, default=0,
                   help="random seed (default 0)")
    t.add_argument("--out", default=None, help="output folder (default BUNDLE/run)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (default: refuse to mix two runs)")
    t.add_argument("--no-progress", action="store_true",
                   help="no progress bar (default: a bar on stderr)")
    t.add_argument("--eval-every", type=int, default=0,
                   help="evaluate the held-out split every N steps (default 0: before and after)")
    t.add_argument("--checkpoint-every", type=int, default=50,
                   help="write OUT/checkpoints/ every N steps (default 50; 0: only at the end)")
    t.add_argument("--stop-grace", type=float, default=30.0, metavar="SECONDS",
                   help="after SIGINT/SIGTERM/SIGHUP the step in progress has this long to end "
                        "(then a checkpoint, exit 128+signal); past it, or at a second signal, "
                        "the step is stopped and dropped (default 30; keep it below the kill "
                        "timeout of what stops the run, e.g. Kubernetes' "
                        "terminationGracePeriodSeconds)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the latest good checkpoint in OUT")
    t.add_argument("--init-from", default=None, metavar="WEIGHTS",
                   help="start a new run from trained weights (a run or fleet folder, a params "
                        ".npz or a checkpoint of this bundle), e.g. to go on training on new "
                        "data; the optimizer's state starts afresh")
    t.add_argument("--max-nonfinite", type=int, default=5,
                   help="stop after this many consecutive non-finite losses (each is skipped; "
                        "default 5)")
    _add_session_args(t)
    _add_budget_args(t)

    v = sub.add_parser("eval", help="evaluate a bundle's weights on data")
    v.add_argument("bundle")
    _add_data_args(v)
    v.add_argument("--weights", default=None,
                   help="a run folder (its params.npz, or its last checkpoint if it stopped "
                        "early), a params .npz or a checkpoint (default BUNDLE/run if present, "
                        "else the initial weights)")
    v.add_argument("--batch", type=int, default=32,
                   help="examples per pass (with --budget: at most this many)")
    v.add_argument("--seed", type=int, default=None,
                   help="--val-split's seed (default: the run's --seed, read from its run.json)")
    _add_session_args(v)
    _add_budget_args(v)

    pl = sub.add_parser("plan", help="per-layer INSTANT ranks, saved bytes, backward FLOPs, and "
                                     "with --budget the memory plan")
    pl.add_argument("bundle")
    _add_data_args(pl, default=None)
    pl.add_argument("--batch", type=int, default=32,
                    help="examples per optimizer step, as train's (default 32)")
    pl.add_argument("--micro-batch", type=int, default=None,  # (session 41 probe: refused)
                    help="with --budget, the largest micro-batch the plan may choose (as train's)")
    pl.add_argument("--seed", type=int, default=0,
                    help="the seed train will use: it draws the calibration rows and a "
                         "--val-split (default 0)")
    pl.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"],
                    help="the optimizer train will use (its state is part of the memory "
                         "planned; default adamw, as train's)")
    add_instant_args(pl)
    _add_session_args(pl)
    _add_budget_args(pl)

    sub.add_parser("profiles", help="list the device profiles and what each does here")

    from export.report import add_report_parser  # light: matplotlib loads only when it runs

    add_report_parser(sub)
    from .fleet.cli import add_fleet_parser  # light: Flower loads only when it runs

    add_fleet_parser(sub)

    xm = sub.add_parser("export-model",
                        help="write a standalone inference .onnx (+ .safetensors) with trained "
                             "weights baked in (needs onnx, not torch)")
    xm.add_argument("source", help="bundle directory or training run directory")
    xm.add_argument("--out", required=True, help=".onnx file to write")
    xm.add_argument("--overwrite", action="store_true", help="replace existing output files")
    xm.add_argument("--weights", default=None,
                    help="params .npz (default: the run's params.npz, else BUNDLE/run/params.npz, "
                         "else initial)")
    xm.add_argument("--bundle", default=None,
                    help="bundle directory, for a run directory not inside its bundle")
    return ap


# ------------------------------------------------------------------------------ edge helpers
def _budget_and_profile(a):
    """Parse --budget / --profile once. Returns (budget bytes or None, profile or None)."""
    from devices import parse_size, resolve_profile

    from .config import check_budget
    from .memory import set_budget

    prof = resolve_profile(a.profile) if a.profile else None
    budget = parse_size(a.budget, "--budget") if a.budget is not None else (
        prof.default_budget if prof else None)
    check_budget(budget, a.budget, prof)
    set_budget(budget, (prof.name, prof.ram) if prof is not None else None,
               from_profile=a.budget is None and prof is not None)
    return budget, prof


def _session_config(a, prof, log=None):
    from .config import SessionConfig, profile_threads
    from .sessions import resolve_device

    threads = a.threads if a.threads is not None else profile_threads(prof)
    cfg = SessionConfig(threads=threads, device=a.device,
                        profile_providers=tuple(prof.execution_providers) if prof else None)
    device, line = resolve_device(cfg)
    if log is not None and (a.device != "cpu"):
        log(line)
    return cfg


def _calib_batch(tr, batch: int) -> int:
    """The first calibration's samples per batch, as ``train`` takes them."""
    from .calibrate import calibration_samples

    return calibration_samples(tr.bundle.layers, batch, tr.config.instant.calib_samples,
                               padded=tr.bundle.manifest.text is not None)


_INSTANT_OPTIONS = ("energy", "oversample", "calib_every", "calib_batches", "calib_samples",
                    "max_rank", "rank_policy", "variance", "saved_ratio", "flop_ratio")


def note_unused_instant(a, layers: bool) -> None:
    """Say which INSTANT options given are not read: ``--mode vanilla``, or a bundle without
    an INSTANT layer (``layers`` False) that trains exactly (session 38 and 41 probes: taken
    without a word)."""
    given = [f"--{k.replace('_', '-')}" for k in _INSTANT_OPTIONS if getattr(a, k, None)
             is not None]
    if given and (a.mode == "vanilla" or a.mode is None and not layers):
        why = ("--mode vanilla trains exactly" if a.mode else
               "the bundle has no INSTANT layer, so it trains exactly")
        print(f"note: {why}; {', '.join(given)} {'is' if len(given) == 1 else 'are'} not used",
              flush=True)


def instant_overrides(a, layers: bool = True) -> dict:
    """``InstantConfig.from_bundle``'s keyword arguments from the options of
    :func:`add_instant_args`, once they are known to ask for one rank policy.

    Raises:
        UserError: an option of one policy with the other policy asked for.
    """
    policy = a.rank_policy
    eps = "--energy" if a.energy is not None else "--oversample" if a.oversample is not None \
        else None
    if policy is None and eps:
        policy = "energy"  # an explicit ε or p asks for the energy rule
    if policy == "energy" and a.flop_ratio is not None:  # (session 38 probe: taken silently;
        # a note, not a refusal: runs that gave it resume with it, as their checkpoints record)
        print("note: --flop-ratio caps the budget rank policy's ranks; this run uses the energy "
              "policy, which does not read it", flush=True)
    if (policy == "energy" and a.variance is not None) or (policy == "budget" and eps):
        from .errors import UserError  # (session 27 probe: the other policy's option ignored)

        raise UserError(f"{'--variance' if policy == 'energy' else eps} sets the "
                        f"{'budget' if policy == 'energy' else 'energy'} rank policy's ranks, "
                        f"and this run uses the {policy} policy"
                        + (f" ({eps} asks for it)" if a.rank_policy is None else "")
                        + "; leave one of them out")
    many, batch = getattr(a, "calib_samples", None), getattr(a, "batch", None)
    if many and batch and many > batch and a.mode != "vanilla" and layers:  # (session 41:
        print(f"note: --calib-samples {many} is more than --batch {batch}: a calibration "
              f"batch holds the {batch} samples of a batch (calibrate.calibration_samples)",
              flush=True)  # probe: taken silently)
    note_unused_instant(a, layers)
    return dict(energy=a.energy, oversample=a.oversample, calib_every=a.calib_every,
                calib_batches=a.calib_batches, max_rank=a.max_rank,
                calib_samples=getattr(a, "calib_samples", None), rank_policy=policy,
                flop_ratio=a.flop_ratio, variance=a.variance, saved_ratio=a.saved_ratio,
                flop_cap_min=0.0 if a.flop_ratio is not None else None)  # an explicit cap binds


def _train_config(a, bundle, prof, optim=None):
    from .config import InstantConfig, OptimConfig, TrainConfig

    instant = InstantConfig.from_bundle(bundle.manifest.instant.settings,
                                        **instant_overrides(a, bool(bundle.layers)))
    if a.mode == "instant" and not bundle.layers:  # (the default trains it exactly)
        from .errors import UserError

        # (session 50 probe: the way out "re-export it with --instant-exclude" added no layer
        # to a model whose weights INSTANT's rules do not take)
        raise UserError(f"--mode instant: bundle '{bundle.path}' has no INSTANT layer (modes: "
                        f"{', '.join(bundle.modes)}); pass --mode vanilla or leave --mode out "
                        "(its export's notes name the layers it left exact and why)")
    return TrainConfig(mode=a.mode or "instant", optim=optim or OptimConfig(), instant=instant,
                       session=_session_config(a, prof, log=print), seed=getattr(a, "seed", 0))


def _plan(trainer, data, batch: int, budget: int | None, micro: int | None, log):
    from .budget import run_plan  # (imported when a command plans: numpy, onnxruntime)

    return run_plan(trainer, data, batch, budget, micro, log)


# ------------------------------------------------------------------------------ commands
def _not_bundle_files(folder: Path) -> list[str]:
    """Names in a bundle folder that its manifest does not list (sorted): a run folder, a fleet
    folder, anything of the user's. A manifest that cannot be read lists nothing."""
    import json

    try:
        listed = json.loads((folder / "manifest.json").read_text()).get("files", {})
        listed = {str(f).split("/")[0] for f in listed} if isinstance(listed, (dict, list)) \
            else set()
    except (OSError, ValueError, AttributeError, RecursionError):
        listed = None  # a damaged bundle: its folders at least are not the bundle's files
    def left_lock(e: Path) -> bool:  # a fleet client that never trained left only its lock
        try:
            return e.is_dir() and not e.is_symlink() and \
                {c.name for c in e.iterdir()} <= {".fleet-lock"}
        except OSError:
            return False

    return sorted(e.name for e in folder.iterdir() if e.name != "manifest.json"
                  and (e.name not in listed if listed is not None else e.is_dir())
                  and not left_lock(e))


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) during a command that cleans up on KeyboardInterrupt (exit 143,
    129)."""

    signum = signal.SIGTERM

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.signum = signum


def _term_as_interrupt():
    """SIGTERM and SIGHUP raise :class:`Terminated` (the previous handlers are returned, None
    off the main thread): a command's ``finally`` runs, as for Ctrl-C (a probe's four killed
    exports left four hidden half-written bundles beside --out; a session 48 probe's SIGHUP,
    a closed ssh session, left one)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def raise_terminated(signum, frame):
        _TERM_SEEN.append(signum)  # (an exception raised inside an import's lock callback or a
        raise Terminated(signum)  # finalizer is printed and dropped: ``check_terminated``
        # sees it)

    previous = sys.unraisablehook

    def quiet(unraisable) -> None:  # the dropped Terminated is not printed as a traceback
        if not isinstance(unraisable.exc_value, Terminated):
            previous(unraisable)

    sys.unraisablehook = quiet
    return {s: signal.signal(s, raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)
            if s != signal.SIGHUP or signal.getsignal(s) is not signal.SIG_IGN}  # (nohup)


_TERM_SEEN: list[int] = []


def check_terminated() -> None:
    """Raise :class:`Terminated` where a SIGTERM came whose exception Python dropped (a fresh
    clone's test: SIGTERM during an import ended in "Exception ignored", the export went on and
    exited 0)."""
    if _TERM_SEEN:
        raise Terminated(_TERM_SEEN[0])


def _print_line(line: str) -> None:
    """A success line on stdout, its control characters escaped (a session 35 probe: a path
    with an escape sequence reached the terminal, one with a newline split the line)."""
    from .console import one_line

    print(one_line(line))


def _check_export_out(out: Path, overwrite: bool) -> None:
    """``export --out``: new or empty; with --overwrite, a bundle holding nothing but its own
    files. Checked before the export and again just before the new bundle is moved in.

    Raises:
        UserError: anything else at ``out``.
    """
    from contract import UserError, bundle_in_use

    if not (out.exists() and any(out.iterdir()) if out.is_dir() else out.exists()
            or out.is_symlink()):
        return
    if not overwrite:
        raise UserError(f"--out '{out}' already exists; pass --overwrite to replace it, or "
                        "another --out")
    if out.is_symlink() or not (out / "manifest.json").is_file():
        raise UserError(f"--out '{out}' exists and is not a bundle; refusing to replace it "
                        "(remove it yourself, or pass another --out)")
    if bundle_in_use(out):  # (session 46 probe: replaced under a run, which then could not be used)
        raise UserError(f"--out '{out}' is a bundle that a running train, eval or fleet process "
                        "of this machine reads; --overwrite would replace it under that run "
                        "(which could then be neither evaluated nor resumed): wait for it to "
                        "end, or pass another --out")
    extra = _not_bundle_files(out)
    if extra:  # BUNDLE/run is train's default --out: its checkpoints would be deleted
        raise UserError(f"--out '{out}' holds more than a bundle ({', '.join(extra[:3])}"
                        f"{', ...' if len(extra) > 3 else ''}: training runs or your files), "
                        "which --overwrite would delete; move them out of it first, or "
                        "pass another --out")


def _cmd_export(a) -> int:
    old = _term_as_interrupt()  # a SIGTERM or SIGHUP too removes the half-written bundle
    try:
        return _export(a)
    finally:
        for s, handler in (old or {}).items():  # (None: a handler not set from Python)
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def _export(a) -> int:
    import shutil
    import tempfile

    from contract import InstantSettings, UserError, drop_dead_staging
    from export import export_bundle

    out = Path(a.out)
    if out.is_symlink():  # written through the link, as train's --out is (a session 35 probe:
        out = Path(os.path.realpath(out))  # the link was replaced by a folder of its own)
    _check_export_out(out, a.overwrite)
    exclude = None
    if a.instant_exclude is not None:
        exclude = [] if a.instant_exclude == "none" else a.instant_exclude.split(",")
    base = InstantSettings()
    from contract.schema import load as load_typed

    raw = {"energy": base.energy if a.energy is None else a.energy,
           "oversample": base.oversample if a.oversample is None else a.oversample,
           "calib_every": base.calib_every if a.calib_every is None else a.calib_every,
           "calib_batches": base.calib_batches if a.calib_batches is None else a.calib_batches}
    for key, value in raw.items():  # (a manifest holds no larger number: session 47 probe,
        if isinstance(value, int) and value > 2**53:  # refused after the whole export)
            raise UserError(f"--{key.replace('_', '-')} {value} is invalid: at most 2**53"
                            + ("; a count that large means never: pass e.g. 1000000000"
                               if key == "calib_every" else ""))
    try:
        settings = load_typed(InstantSettings, raw, "export options")
    except UserError as exc:  # (said as the option: a session 45 probe read "field 'energy'")
        said = re.sub(r"export options: field '(\w+)': (.*), got (.*) \(\w+\)",
                      lambda m: f"--{m[1].replace('_', '-')} {m[3]} is invalid: {m[2]}", str(exc))
        raise UserError(said.replace("; re-export the bundle", "")) from None

    def floats(text: str | None, flag: str) -> list[float] | None:
        if text is None:
            return None
        try:
            return [float(v) for v in text.split(",")]
        except ValueError:
            raise UserError(f"{flag} '{text}' is invalid: expected comma-separated numbers, "
                            "e.g. 0.485,0.456,0.406") from None

    for flag, value in (("--classes", a.classes), ("--lengths", a.lengths)):
        if value is not None and not value.strip():  # (accepted as "none given": a probe's)
            raise UserError(f"{flag} '' is empty; give its values, or leave {flag} out")
    classes = a.classes.split(",") if a.classes else None
    if classes is not None and (any(not c.strip() for c in classes)
                                or len(set(classes)) != len(classes)):
        raise UserError(f"--classes '{a.classes[:80]}' holds an empty or repeated name: give one "
                        "distinct name per class, in class-id order, e.g. --classes neg,pos")
    lengths = _lengths_option(a.lengths)
    # written next to --out and moved in place once complete: a failed export (a bad option
    # found late, an unsupported op) leaves an existing bundle as it was
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        drop_dead_staging(out, "export.")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name[:100]}.export.{os.getpid()}.",
                                    dir=out.parent))
    except OSError as exc:
        raise UserError(f"cannot write to '{out.parent}': {exc.strerror or exc}; pass another "
                        "--out") from None
    notes: list[str] = []
    try:
        from export.model_inputs import seed_factories

        seed_factories(a.seed or 0)  # (session 39: each export of a factory drew other weights)
        try:
            export_bundle(a.model, tmp, input_shape=a.input_shape, npz=a.npz,
                          trainable=a.trainable, loss=a.loss, instant_exclude=exclude,
                          settings=settings, output=a.output, head=a.head, pool=a.pool,
                          tokenizer=a.tokenizer,
                          image_mean=floats(a.image_mean, "--image-mean"),
                          image_std=floats(a.image_std, "--image-std"),
                          class_names=classes,
                          saved_int8=a.saved_int8, split=not a.no_prefix,
                          lengths=lengths, notes=notes, class_axis=a.class_axis)
        except OSError as exc:
            import errno

            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise UserError(f"cannot write the bundle to '{out}': {exc.strerror}; free space "
                            "there or pass another --out (nothing was replaced)") from None
        from contract import read_manifest

        read_manifest(tmp / "manifest.json")  # what the runtime will read
        mask = os.umask(0o22)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # (mkdtemp's 0700: other accounts could not read it)
        check_terminated()
        # checked again: a folder made at --out while the export ran (a run that trained the
        # old bundle into BUNDLE/run meanwhile, a file of the user's) is never replaced
        _check_export_out(out, a.overwrite)
        old = None
        if out.exists() or out.is_symlink():  # set aside, replaced, then dropped: no moment
            old = Path(tempfile.mkdtemp(prefix=f".{out.name[:100]}.old.", dir=out.parent))
            try:  # without a bundle at --out
                os.replace(out, old / "bundle")
            except BaseException:
                old.rmdir()
                raise
        try:
            os.replace(tmp, out)
        except BaseException:  # an error, or a signal between the two renames
            if old is not None:
                os.replace(old / "bundle", out)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    path = out
    m = read_manifest(path / "manifest.json")
    prefix = ""
    if m.prefix is not None:
        prefix = (f"; frozen prefix graph ({', '.join(m.prefix.outputs)}"
                  f"{', runs without padding' if m.text and m.text.any_length else ''})")
    if m.text is not None and m.text.lengths:
        prefix += f"; training graphs also at {', '.join(map(str, m.text.lengths))} tokens"
    _print_line(f"bundle written to {path}: {len(m.params)} trainable tensors, "
                f"{len(m.instant.layers)} INSTANT layers, modes {', '.join(m.modes)}{prefix}")
    for line in notes + _unused_export_options(a, m) + _shared_params(path, m):
        print(line)
    return 0


def _unused_export_options(a, m) -> list[str]:
    """A note per export option given that this export did not read (a session 43 probe: taken
    without a word)."""
    lines = []
    factory = ":" in a.model and a.model.rsplit(":", 1)[0].endswith(".py")
    if a.seed is not None and not factory:
        lines.append(f"note: --seed seeds a model factory (path/file.py:factory) before it draws "
                     f"its weights; '{a.model}' is not one, so it is not used")
    if a.saved_int8 and not m.instant.layers:
        lines.append("note: --saved-int8 stores INSTANT layers' saved activations as int8; this "
                     "bundle has no INSTANT layer, so it is not used")
    return lines


def _shared_params(path: Path, m) -> list[str]:
    """A note per trainable tensor that several nodes of one op type read: it trains as one
    tensor. Deliberate sharing trains so; an exporter that merges equal tensors (torch's dynamo
    exporter does, e.g. two freshly initialised LayerNorms) ties separate parameters that way."""
    import onnx

    from contract import names

    g = onnx.load(str(path / m.graphs[names.INFER].forward), load_external_data=False).graph
    params = {p.name for p in m.params}
    readers: dict[str, list[str]] = {}
    for node in g.node:
        if node.op_type in ("Slice", "Split", "Gather", "Shape", "Size"):
            continue  # reads a part, or only the shape (an unrolled GRU slices its B in two)
        for t in set(node.input) & params:
            readers.setdefault(t, []).append(node.op_type)
    out = []
    # an ONNX file's exporter may have merged equal tensors; a PyTorch model was exported here
    # (TorchScript), where a tensor read twice is the model's own sharing
    from_file = str(m.source).lower().endswith(".onnx")
    for t, ops in sorted(readers.items()):
        for op in sorted(set(ops)):
            if ops.count(op) > 1:
                out.append(f"note: trainable tensor '{t}' is read by {ops.count(op)} {op} nodes "
                           "and trains as one shared tensor"
                           + ("; if the model has separate parameters there, the exporter "
                              "merged equal tensors (torch: export with dynamo=False)"
                              if from_file else " (the model shares it)"))
    return out


def _init_from(a, bundle, out: Path) -> tuple[Path | None, Path | None, str | None]:
    """``train --init-from``: (the weights file to start from, its run folder, what run.json
    records: the path given, resolved). A ``--resume`` of a run with a checkpoint reads none
    (the checkpoint holds its weights; the source run may have gone on or gone since); one
    without (killed before its first checkpoint) starts again from the same --init-from.

    Raises:
        UserError: an empty or unreadable --init-from, or one that is not the run's own.
    """
    from .checkpoint import has_checkpoints
    from .errors import UserError
    from .run_folder import json_object

    ran = a.resume and (out / "run.json").is_file()
    was = json_object(out / "run.json").get("init_from") if ran else None
    was = was if isinstance(was, str) else None
    if ran and has_checkpoints(out / "checkpoints"):
        if a.init_from is not None:
            print(f"note: --init-from is not read: the run in '{out}' resumes from its "
                  "checkpoint")
        return None, None, was
    if a.init_from is not None and not a.init_from.strip():
        raise UserError("--init-from '' is empty; pass a run folder, a params .npz or a "
                        "checkpoint of this bundle")
    given = os.path.realpath(a.init_from) if a.init_from is not None else None
    if ran and given != was:  # (started again: from the weights it started from)
        raise UserError(f"--out '{out}' holds a run that started from "
                        + (f"'{was[:300]}' (--init-from)" if was else
                           "the bundle's initial weights") + "; resume it with "
                        + ("that --init-from" if was else "no --init-from")
                        + ", or start a new run with another --out")
    if given is None:
        return None, None, None
    init, _, init_dir, _ = trained_source(bundle, Path(a.init_from), "--init-from")
    print(f"starting from the weights in '{_shown(init)}' (--init-from)", flush=True)  # (was
    # not said)
    return init, init_dir, given


def _cmd_train(a) -> int:
    from contract import hold_bundle

    from .bundle import open_bundle
    from .checkpoint import CheckpointWriteError, TrainingInterrupted
    from .config import OptimConfig, RunConfig
    from .errors import UserError
    from .run import FinalWriteError, RunFinished, RunFolder, finished_already, run_identity, train
    from .trainer import Trainer

    budget, prof = _budget_and_profile(a)
    optim = OptimConfig(name=a.optimizer, lr=a.lr, weight_decay=a.weight_decay)
    run_cfg = RunConfig(steps=a.steps, batch=a.batch, micro_batch=a.micro_batch,
                        eval_every=a.eval_every, checkpoint_every=a.checkpoint_every,
                        resume=a.resume, overwrite=a.overwrite,
                        max_nonfinite=a.max_nonfinite, budget=budget, progress=not a.no_progress,
                        new_log=True, stop_grace=a.stop_grace)
    bundle = open_bundle(a.bundle)
    hold_bundle(bundle.path)  # (an export --overwrite of it is refused while this runs)
    cfg = _train_config(a, bundle, prof, optim)
    if a.out is not None and not a.out.strip():  # '' is not "the default": it would be the cwd
        from .errors import UserError

        raise UserError("--out '' is empty; pass a folder for the run, or leave --out out for "
                        "BUNDLE/run")
    from .run_folder import bundle_run

    out = Path(a.out) if a.out is not None else bundle_run(bundle.path)
    init, init_dir, started = _init_from(a, bundle, out)
    names_of = out if a.resume and (out / "run.json").is_file() else init_dir  # the numbering
    if names_of is out:
        from .checkpoint import bundle_ids, bundle_sha256
        from .run_folder import check_same_bundle

        check_same_bundle(out, (bundle_sha256(bundle), *bundle_ids(bundle.path)),
                          str(bundle.path))
    data = _load_data(a, bundle, class_names=_resumed_class_names(names_of, bundle)  # the
                      if names_of is not None else None)  # weights were trained in
    if a.eval_every and getattr(data, "test", None) is None:  # (session 41 probe: silent)
        print(f"note: --eval-every {a.eval_every}: '{a.data}' has no held-out rows to evaluate; "
              "pass --val FILE or --val-split F", flush=True)
    trainer = Trainer(bundle, cfg, weights=init,
                      way_out="pass another --init-from (a run folder or its params.npz)")
    trainer.resuming = bool(run_cfg.resume)
    trainer.started_from = a.init_from if init is not None else None
    from .data import label_map

    identity = run_identity(trainer, a.data, run_cfg, label_map(data, bundle), a.val_split,
                            _split_rows(data, a.val_split))
    if started is not None:
        identity["init_from"] = started
    from .run_files import data_realpath

    if (path := data_realpath(a.data)) is not None:  # (eval run elsewhere, or the path
        identity["data_path"] = path  # written otherwise)
    folder = RunFolder(out, identity)
    from .console import say, say_err

    ok = False
    folder.prepare(run_cfg.resume, run_cfg.overwrite)
    try:  # (nothing between: a signal here raises TrainingInterrupted once a checkpoint exists)
        if run_cfg.resume:  # (a finished run's resume ran every planning probe first)
            finished_already(out, run_cfg.steps, trainer, data, run_cfg.batch)
        trainer.use_plan(_plan(trainer, data, run_cfg.batch, budget, run_cfg.micro_batch,
                               say))
        trainer.open_sessions()
        summary = train(trainer, data, run_cfg, out)
        ok = True
    except RunFinished as exc:  # the folder as it was
        ok = True
        from .run import FINISHED

        FINISHED.append(os.path.realpath(out))  # (a signal now: "it had finished", not --resume)
        say(str(exc))
        return 0
    except TrainingInterrupted as exc:  # checkpointed: the new run stands and can be resumed
        # without a checkpoint of its own it has nothing to resume from: it is undone like a
        # failed run, and an --overwrite puts the previous run back (session 28 probe: a second
        # SIGTERM in the first step deleted the run it replaced)
        ok = exc.checkpoint is not None
        folder.finish(ok, keep_aside=True)  # (session 43 probe: SIGTERM after step 1 of an
        # --overwrite dropped the finished run it replaced without a word)
        say_err(str(exc) + (f"; the previous run in '{out}' is back in place"
                            if folder.restored else
                            f"; the run it replaces stays in '{folder.kept_aside}' until this "
                            "one is resumed (move its files back instead to keep it)"
                            if folder.kept_aside is not None else ""))
        return exc.exit_code
    except FinalWriteError as exc:  # (a session 35 probe: an --overwrite put the old run back
        # and the line sent the user to this run's removed checkpoint)
        ok = exc.checkpoint is not None  # all its steps are in it: the new run stands
        raise
    except CheckpointWriteError as exc:
        folder.finish(False)
        if folder.restored:  # the checkpoint it names was this run's, now removed
            way = ("free space, then run the same command again"
                   if exc.way == "free space, then --resume" else exc.way)  # (nothing to resume)
            raise UserError(f"{exc.what}; this run's files were removed and the previous run "
                            f"in '{out}' is back in place; {way}") from None
        if exc.way.endswith(" with --overwrite") and not out.exists():  # (its stub removed:
            raise UserError(f"{exc.what}; {exc.last}; "  # no --overwrite is asked for then,
                            f"{exc.way.removesuffix(' with --overwrite')}") from None  # s48)
        raise
    finally:
        folder.finish(ok)  # a failed --overwrite run puts the old run back
        if folder.restored:  # (an interrupt's line must not offer its checkpoints as this run's)
            _RESTORED.append(out)
    say("\n".join(summary.lines(trainer)))
    if summary.budget and summary.peak_rss > summary.budget:  # (a probe saw it only in the
        say_err(f"warning: this run passed its budget: peak {summary.peak_rss / 1e6:.1f} MB "
                f"over --budget {budget_mb(summary.budget)} MB; its results are kept; please "
                "report it with the bundle and the command")  # summary's middle, exit 0)
    return 0


def trained_source(bundle, weights: Path | None, flag: str):
    """(weights file, run folder it was picked from, its run's folder, what the run recorded)
    for ``flag`` (``eval --weights``, ``train --init-from``): a run's or a fleet's folder (its
    params.npz, or its last checkpoint where it stopped early), a checkpoints/latest pointer,
    a params .npz or a checkpoint.

    Raises:
        UserError: nothing readable there, or another bundle's tensors.
    """
    from .errors import UserError
    from .export_model import run_of_checkpoints, trained_weights
    from .run_files import weights_record
    from .run_folder import check_run_links

    run_src = None
    if weights is not None and run_of_checkpoints(weights) != weights:
        weights = weights / "latest"  # a run's checkpoints folder: its newest (session 49 probe:
        # "a folder without params.npz or a checkpoint" of a folder of checkpoints)
    if weights is not None and weights.is_dir():  # a run's (or a fleet's) folder
        run_src = weights
        weights = trained_weights(weights, flag)
        if (run_src / "manifest.json").is_file() and weights.name == "params.npz" and \
                weights.parent == run_src:  # (session 43 probe: taken without a word)
            print(f"note: {flag} '{run_src}' is a bundle folder: its weights are those it "
                  "was exported with, not trained by this runtime; pass a run folder (or its "
                  "params.npz) for trained weights", file=sys.stderr)
    elif weights is not None and weights.name == "latest" and weights.parent.name == "checkpoints":
        from .checkpoint import newest_intact  # the newest checkpoint that reads whole

        newest = newest_intact(weights.parent)  # (session 30 probe: "re-export the bundle")
        if newest is None:
            raise UserError(f"'{weights}' names no checkpoint that exists; pass the run folder "
                            f"or one of its checkpoints/ckpt-*.npz as {flag}")
        weights = newest[1]
    if weights is not None and not weights.is_file():
        raise UserError(f"weights file '{weights}' "
                        + ("is not a regular file; pass a .npz file or a run folder"
                           if weights.exists() else "not found; " + _weights_way(weights, flag)))
    # the label map the weights were trained with (their run's run.json): labels read from the
    # data alone would number a file's classes afresh (a file holding only class "2" read as
    # class 0, its accuracy 0.000 for a model that is right); a checkpoint's run is one up
    run_dir = None if weights is None else (
        weights.parent.parent if weights.parent.name == "checkpoints" else weights.parent)
    if run_dir is not None:
        check_run_links(run_dir)
    # what the run recorded (a checkpoint copied out of its run folder: its own seed and hash)
    record = {} if weights is None else weights_record(weights, run_dir)
    _check_trained_bundle(record, bundle, run_dir, weights, flag)
    return weights, run_src, run_dir, record


def _cmd_eval(a) -> int:
    from contract import hold_bundle
    from devices.planner import Plan

    from .bundle import open_bundle
    from .config import OptimConfig, TrainConfig
    from .errors import UserError
    from .export_model import run_weights
    from .memory import peak_rss
    from .run_folder import bundle_run, json_object
    from .sessions import use_arena
    from .trainer import Trainer

    if not 1 <= a.batch <= 1 << 24:  # as train's --batch
        raise UserError(f"--batch {str(a.batch)[:20]} is invalid: must be 1 to {1 << 24}")
    budget, prof = _budget_and_profile(a)
    src = Path(a.bundle)
    if a.weights is None and src.is_dir() and not (src / "manifest.json").exists() and any(
            (src / f).exists() for f in ("params.npz", "summary.json", "checkpoints")):
        from .export_model import resolve_source  # a run's folder, as export-model takes it

        # (a session 44 probe: refused, "pass the bundle"; session 46: eval has no --bundle)
        found, _ = resolve_source(src, way=lambda own: f"pass its bundle: `instant-runtime eval "
                                  f"{own} --weights {src}`")
        print(f"note: '{_shown(src)}' is a run's folder: evaluating its weights with its "
              f"bundle {_shown(found.path.resolve())}", flush=True)
        a.weights, a.bundle = str(src), str(found.path)
    bundle = open_bundle(a.bundle)
    hold_bundle(bundle.path)
    run_src = None  # the run folder the weights were picked from
    weights = Path(a.weights) if a.weights else None
    if weights is None and bundle_run(bundle.path).is_dir():
        run_src = bundle.path / "run"
        weights = run_weights(run_src)
    weights, src, run_dir, record = trained_source(bundle, weights, "--weights")
    run_src = src or run_src
    # --val-split holds out the rows the run held out: its seed, unless --seed says otherwise
    if a.seed is not None and a.val_split is None:  # (a session 43 probe: taken silently)
        print("note: --seed draws --val-split's held-out rows; without --val-split it is not "
              "used", flush=True)
    seed_given = a.seed is not None
    if a.seed is None:  # (the seed only draws a --val-split)
        a.seed = 0 if run_dir is None or a.val_split is None else _run_seed(
            record, run_dir / "run.json" if "seed" in json_object(run_dir / "run.json")
            else weights)
    TrainConfig(seed=a.seed)  # as train's --seed
    data = _load_data(a, bundle, class_names=_resumed_class_names(run_dir, bundle)
                      if run_dir is not None else None, training=False)
    # SGD with momentum: one buffer a tensor (the gradient adds into it), the least any
    # optimizer allocates; evaluation never steps
    for attempt in range(3):
        try:
            trainer = Trainer(bundle, TrainConfig(mode="vanilla", optim=OptimConfig(name="sgd"),
                                                  session=_session_config(a, prof,
                                                                          log=print)),
                              Plan(eval_micro_batch=a.batch), weights=weights, evaluating=True)
            break
        except UserError:
            # a run still training replaced that checkpoint with a newer one while this read
            # it (a probe: 40 % of evals at --checkpoint-every 1 said "re-export the bundle")
            if run_src is None or weights is None or weights.exists() or attempt == 2:
                raise
            weights = run_weights(run_src) or weights
    target = data.test if data.test is not None else data
    _note_held_out(run_dir, a, data.test is not None, _split_rows(data, a.val_split), data.test)
    if run_dir is not None and weights is not None and a.val is None and \
            not (run_dir / "run.json").exists() and not (run_dir / "summary.json").exists():
        _note_checkpoint_held_out(weights, a, data, seed_given)
    if budget is None:
        use_arena(None)
    else:  # its probes run evaluation passes (a training step's plan took micro-batch 1 where
        # evaluation fits 7: a session-23 probe's eval took 147 s under a budget, now 8.3 s)
        trainer.eval_only = True
        trainer.use_plan(_plan(trainer, data, a.batch, budget, None, print))
    loss, acc = _evaluate_shrinking(trainer, target, a.batch, budget is not None)
    which = "held-out" if data.test is not None else "all"
    print(f"{which} examples: {len(target)}, loss "  # (a diverged run's 1e33: not 34 digits)
          + (f"{loss:.4f}" if abs(loss) < 1e6 else f"{loss:.4g}")
          + (f", accuracy {acc:.3f}" if acc is not None else "")
          + f" (weights: {_shown(weights or 'initial')}; peak RSS {peak_rss() / 1e6:.1f} MB)")
    peak = peak_rss()
    if budget is not None and peak > budget:  # (as train says it: session 30 probe)
        from .console import say_err

        say_err(f"warning: this evaluation passed its budget: peak {peak / 1e6:.1f} MB "
                f"over --budget {budget_mb(budget)} MB; please report it with the bundle and the "
                "command")
    return 0


def _check_trained_bundle(record: dict, bundle, run_dir: Path | None,
                          weights: Path | None, flag: str = "--weights") -> None:
    """Weights trained on another bundle (an outside probe: ``eval`` loaded the tensors whose
    names matched and scored a re-exported bundle, or a bundle training fewer tensors, without
    a word): refused where the weights do not hold exactly this bundle's trained tensors; said
    in a warning where they do (an export of the same model again differs in its manifest's
    time stamp alone; ``export-model --bundle`` takes such a bundle too).

    Raises:
        UserError: another bundle's tensors.
    """
    from .console import say_err
    from .errors import UserError
    from .export_model import other_bundle, own_bundle
    from .run_files import trained_shapes

    want = record.get("bundle_sha256")
    if run_dir is not None and not isinstance(want, str):
        # a fleet server's folder records its model's signature (session 46 probe: a fleet of
        # the whole mlp was read into a bundle training one layer)
        from .fleet.local import model_signature
        from .run_folder import json_object

        sig = json_object(run_dir / "summary.json").get("signature")
        if isinstance(sig, str) and sig not in (model_signature(bundle),
                                                model_signature(bundle, before_45=True)):
            raise UserError(f"'{run_dir}' holds a fleet's weights for another model than "
                            f"'{bundle.path}' (other trainable tensors, inputs, loss, frozen "
                            f"weights or tokenizer); pass the bundle the fleet trained, or "
                            f"another {flag}")
    if run_dir is None or not isinstance(want, str) or (
            why := other_bundle(bundle.path, want, run_dir, weights)) is None:
        return
    own = own_bundle(run_dir, want)
    own_text = f"its own bundle, '{own}'" if own else "the bundle it was trained on"
    held = trained_shapes(weights)
    scoring = flag == "--weights"
    verb = "evaluate it" if scoring else "go on from it"  # (train --init-from)
    other = [f"'{p.name}' {list(held[p.name])} there, {list(p.shape)} here"
             for p in bundle.params if p.name in held and held[p.name] is not None
             and tuple(held[p.name]) != tuple(p.shape)]
    if other:  # (session 46 probe: a bundle exported again with another --head "fit", then
        # its run.json's class_names were blamed)
        raise UserError(f"{why}, and its trained tensors have other shapes ({other[0]}: "
                        f"exported again with another --head or --classes?); {verb} with "
                        f"{own_text}, or train a run of this one")
    if set(held) == {p.name for p in bundle.params}:
        say_err(f"warning: {why}; its trained tensors fit this bundle and are "
                + ("scored" if scoring else "trained on") + " with this bundle's frozen "
                f"weights, which may not be the run's: {verb} with {own_text}, to "
                + ("score the run as it trained" if scoring else "keep the run's model"))
        return
    raise UserError(f"{why}, and its trained tensors are not this bundle's; {verb} with "
                    f"{own_text}, or train a run of this one")


def _split_rows(data, val_split: float | None) -> int:
    """The rows of --data: its training rows, and those a --val-split held out of it (a
    --val file's are not counted: only a split's draw depends on them)."""
    return len(data) + (len(data.test) if data.test is not None and val_split is not None
                        else 0)


def _note_held_out(run_dir: Path | None, a, split: bool, rows: int, test=None) -> None:
    """A line where ``eval`` scores rows a run trained on as if held out: all of the data a run
    held part of out with --val-split (an outside probe read "all examples: 60, accuracy
    1.000", its training rows included), a --val-split other than the run's own (another
    fraction or seed; a run that held out a --val file, or nothing, trained on all of it), or
    the run's own --val-split of a file that has since gained or lost rows (a session-36 probe:
    60 rows appended, 74 of 167 "held-out" rows had been trained on)."""
    from .run_folder import json_object

    run = json_object(run_dir / "run.json") if run_dir is not None else {}
    if run_dir is not None and not run and not (run_dir / "run.json").exists():
        run = json_object(run_dir / "summary.json")  # a fleet client's records its data too
        run = run if "data" in run else {}
    if isinstance(a.data, _DefaultData) and isinstance(run.get("data"), str) \
            and run["data"] != a.data:  # (session 41 probe: scored digits, without a word)
        print(f"note: the run in {_shown(run_dir)} trained on '{_shown(run['data'][:300])}'; without --data "
              f"these figures are of the built-in {_shown(a.data)}: pass --data (and the run's --val "
              "or --val-split) to score it on its own data", flush=True)
    if run_dir is None or a.val is not None or (split and a.val_split is None):
        return
    frac, seed = run.get("val_split"), run.get("seed")
    same = isinstance(run.get("data"), str) and (
        run["data"] == a.data or Path(run["data"]).resolve() == Path(a.data).resolve())
    if isinstance(run.get("data_path"), str) and os.path.exists(a.data) \
            and os.path.exists(run["data_path"]):  # (session 47 probe: eval from another
        same = run["data_path"] == os.path.realpath(a.data)  # folder was silent; a run moved
        # with its data, the path gone, is told apart by the name as before: a review)
    if seed is None:  # (an older run.json: the seed eval resolved, a checkpoint's or 0)
        seed = a.seed
    was = run.get("rows")
    if (same and split and isinstance(frac, float) and (frac, seed) == (a.val_split, a.seed)
            and isinstance(was, int) and was != rows):
        print(f"note: the run in {_shown(run_dir)} held out --val-split {frac:g} of {_shown(a.data)} when it "
              f"held {was} rows; it holds {rows} now, so the rows held out here are another "
              "draw, some of them trained on: score the run on rows it never saw (--val FILE "
              "in place of --val-split)")
        return
    if (same and split and isinstance(frac, float) and (frac, seed) == (a.val_split, a.seed)
            and test is not None and _other_held_out(run_dir, test)):
        print(f"note: the run in {_shown(run_dir)} held out --val-split {frac:g} of {_shown(a.data)}, and the "
              "rows held out here are not those (the file changed since: other rows, labels or "
              "order), so some of them were trained on: score the run on rows it never saw "
              "(--val FILE in place of --val-split)")  # (session 47 probe: the rows shuffled
        return  # in place, 0.977 "held-out" for 0.961, without a word)
    if not same or split and isinstance(frac, float) and (frac, seed) == (a.val_split, a.seed):
        return
    if not split and isinstance(frac, float):
        print(f"note: the run in {_shown(run_dir)} held out {frac:g} of {_shown(a.data)} (--val-split {frac:g})"
              f" and trained on the rest; these figures include those rows: pass --val-split "
              f"{frac:g} to score the held-out rows only")
    elif split and isinstance(frac, float):
        print(f"note: the run in {_shown(run_dir)} held out --val-split {frac:g} --seed {seed} of "
              f"{_shown(a.data)}, not --val-split {a.val_split:g} --seed {a.seed}: some of these "
              f"held-out rows were trained on; pass --val-split {frac:g} and leave --seed out "
              "to score the run's held-out rows only")
    elif split:
        summary = json_object(run_dir / "summary.json")  # (none yet: a run stopped early)
        val = summary.get("test_loss") is not None
        print(f"note: the run in {_shown(run_dir)} trained on all of {_shown(a.data)} (it held out "
              + ("a --val file" if val else "none of it" if summary else "a --val file or none")
              + f"): the rows --val-split {a.val_split:g} holds out here were trained on; "
              + ("pass that file with --val in place of --val-split to score the run's "
                 "held-out rows" if val else "score it on "
                 + ("" if summary else "its --val file, if it had one, or on ")
                 + "data it never saw (--val FILE in place of --val-split)"))


def _shown(value) -> str:
    """A path or name as a line shows it: control characters escaped (session 47 probe: eval
    printed a run folder's newline and ESC raw, as train does not)."""
    from .console import one_line

    return one_line(str(value))


def _note_checkpoint_held_out(weights: Path, a, data, seed_given: bool) -> None:
    """A line where ``eval`` of a checkpoint copied out of its run folder (no run.json to
    compare with) scores rows its run trained on as held out: the checkpoint records the
    fingerprints of its run's training rows and held-out rows (session 49 probe: "held-out
    accuracy 0.932" for 0.892, most of those rows trained on, without a word)."""
    from .run import data_fingerprint
    from .run_files import checkpoint_meta

    run = checkpoint_meta(weights).get("run")
    trained, held = (run.get("data"), run.get("val")) if isinstance(run, dict) else (None, None)
    if not isinstance(trained, str) or not isinstance(held, str):
        return  # (a plain .npz, or a checkpoint written before the fingerprints)
    if a.val_split is not None and data_fingerprint(data) != trained:
        print(f"note: the run that wrote {_shown(weights)} trained on other rows than those "
              f"--val-split {a.val_split:g}" + (f" --seed {a.seed}" if seed_given else "")
              + " leaves here (another fraction, seed or file): some of these held-out rows "
              "may have been trained on; score its own held-out rows (its --val-split"
              + (", and --seed left out: the checkpoint's seed is taken" if seed_given else "")
              + ", or its --val file)")
    elif data.test is None and held and data_fingerprint(data) not in (held, trained):
        print(f"note: the run that wrote {_shown(weights)} held rows out and trained on "
              f"{run.get('n')} others; if these came from that file, these figures include "
              "rows it trained on: pass its --val-split (or score its --val file) for the "
              "held-out rows only")


def _other_held_out(run_dir: Path, test) -> bool:
    """Whether the held-out rows ``test`` differ from those the run in ``run_dir`` held out, by
    the fingerprint its newest checkpoint recorded (False where it recorded none)."""
    from .checkpoint import newest_checkpoint
    from .run import data_fingerprint
    from .run_files import checkpoint_meta

    newest = newest_checkpoint(run_dir / "checkpoints")
    run = checkpoint_meta(newest[1]).get("run") if newest is not None else None
    val = run.get("val") if isinstance(run, dict) else None
    return isinstance(val, str) and bool(val) and val != data_fingerprint(test)


def _evaluate_shrinking(trainer, data, batch: int, budgeted: bool):
    """``trainer.evaluate`` at the plan's evaluation micro-batch, repeated at half of it while a
    pass runs into a budget's arena cap (as ``train`` repeats a step); without a budget the
    machine itself ran out, which ends in the CLI's out-of-memory line."""
    from dataclasses import replace

    from .trainer import ArenaExhausted

    while True:
        m = trainer.plan.eval_micro_batch or batch
        try:
            return trainer.evaluate(data, m)
        except ArenaExhausted as exc:
            if not budgeted or m <= 1:
                raise
            trainer.use_plan(replace(trainer.plan, eval_micro_batch=m // 2))
            print(f"budget: the arena cap was reached at evaluation micro-batch {m}; repeating "
                  f"at {m // 2} ({exc})")


def _cmd_plan(a) -> int:
    from .accounting import format_table, layer_costs
    from .bundle import open_bundle
    from .calibrate import calibration_rng
    from .checkpoint import warn_kept
    from .config import OptimConfig
    from .errors import UserError
    from .trainer import Trainer

    if not 1 <= a.batch <= 1 << 24:  # as train's --batch
        raise UserError(f"--batch {str(a.batch)[:20]} is invalid: must be 1 to {1 << 24}")
    from .config import RunConfig

    RunConfig(batch=a.batch, micro_batch=a.micro_batch)  # --micro-batch checked as train's
    budget, prof = _budget_and_profile(a)
    if a.micro_batch is not None and budget is None:
        print("note: --micro-batch caps the micro-batch a --budget's plan chooses; without a "
              "budget it changes nothing here", flush=True)
    bundle = open_bundle(a.bundle)
    cfg = _train_config(a, bundle, prof, OptimConfig(name=a.optimizer))
    fl = bundle.manifest.flops
    # a GPU's figure where the run goes to it on that device; with --device cpu its CPU's
    # (session 49 probe: a Jetson Nano's GPU figure, 8x its CPU's, for a run on the CPU)
    has_gpu = prof is not None and any(p in prof.execution_providers for p in (
        "CUDAExecutionProvider", "TensorrtExecutionProvider"))
    gpu = a.device == "cuda" or a.device == "auto" and has_gpu
    rate = prof.gflops if prof else None
    where = (" GPU's" if gpu else " CPU's") if has_gpu else ""
    if prof is not None and not gpu and (has_gpu or not rate):  # a run on its CPU
        rate = prof.cpu_gflops
        if not rate and prof.gflops and fl.get("forward"):  # (a GPU's figure: not this run's)
            print(f"note: no step estimate on {prof.name} for a --device cpu run: its profile "
                  "gives its GPU's speed only (add cpu_gflops to a profile of your own)")
    if rate and fl.get("forward"):
        exact = a.batch * (fl["forward"] + 2 * fl.get("trainable_forward", 0))
        secs = exact / (rate * 1e9)  # (session 47 probe: "0.00 s" for 6 GFLOP, and
        shown = f"{secs:.2f} s" if secs >= 0.01 else f"{secs * 1e3:.2g} ms"  # INSTANT said to
        print(f"estimated step on {prof.name} at batch {a.batch}: {shown} with an exact "  # be
              f"backward ({exact / 1e9:.3g} GFLOP at its{where} {rate:g} GFLOP/s"  # cheaper
              + ("; INSTANT's compressed backward and its calibrations are not estimated)"
                 if bundle.layers else ")"))  # always)
    if not a.data and (unread := _without_data(a)):
        print(f"note: {unread} is not read without --data (the data it applies to)",
              flush=True)
    if budget is not None and not a.data and a.budget is None and prof is not None:
        print(f"note: profile '{prof.name}' gives a budget of {budget / 1e6:.0f} MB: pass "
              "--data (the data you will train on) to plan the run under it")
        return 0
    if budget is not None:
        if not a.data:
            raise UserError("plan with a budget measures the run itself: pass --data (the data "
                            "you will train on)")
        data = _load_data(a, bundle)
        tr = Trainer(bundle, cfg)
        from . import run  # noqa: F401 - train's code loaded: the plan measures train's base
        plan = _plan(tr, data, min(a.batch, len(data)), budget, a.micro_batch, print)
        if tr.mode == "instant":
            from .run import ShrinkGuard

            tr.use_plan(plan)
            tr.train_batch = min(a.batch, len(data))
            ShrinkGuard(tr, print).run(lambda: tr.calibrate(
                data, _calib_batch(tr, min(a.batch, len(data))), calibration_rng(a.seed)),
                calibration=True)
            warn_kept(tr)
            print(tr.cost_table())
        return 0
    ranks: dict = {}
    rows = 1
    if a.data:
        from .budget import MIN_FACTOR, estimate_minimum, largest_read

        data = _load_data(a, bundle)
        probe_tr = Trainer(bundle, cfg)  # (its mode: vanilla where no layer is INSTANT's)
        probe_tr.train_batch = min(a.batch, len(data))
        need = estimate_minimum(probe_tr, data, min(a.batch, len(data)))
        if need:
            # reading the largest image is planned, not measured (session 46 probe: "measured
            # 313 MB" where no process passed 163 MB, 192 MB of it for a 4000x4000 PNG)
            read, at_one = largest_read(data)[0], f"{need / MIN_FACTOR / 1e6:.0f} MB"
            said = (f"{at_one} at micro-batch 1: {read / 1e6:.0f} MB planned for reading the "
                    "largest image, the rest measured by probes" if read >= 1e6 else
                    f"probes at micro-batch 1 measured {at_one}")
            print(f"smallest --budget for this run (batch {min(a.batch, len(data))}, "
                  f"{probe_tr.mode}): about {math.ceil(need / 1e6)}MB ({said}, x "
                  f"{MIN_FACTOR:g} for what they may miss: a budget between the two may fit, a "
                  "refusal says so)")
    if a.data and bundle.layers and cfg.mode == "instant":  # (session 43 probe: --mode vanilla
        from .sessions import use_arena  # --energy 0.9 said --energy unused, then ranked by it)

        use_arena(None)
        tr = Trainer(bundle, cfg)
        tr.train_batch = min(a.batch, len(data))
        tr.calibrate(data, _calib_batch(tr, min(a.batch, len(data))), calibration_rng(a.seed))
        warn_kept(tr)
        ranks, rows = tr.ranks(), tr.rank_rows
    if not bundle.layers:
        print("no INSTANT layers in this bundle: it has no trainable Linear / 1x1 Conv besides "
              "the head, or the export left them exact (its notes say which and why)")
        return 0
    print(f"INSTANT layers of {bundle.path} "
          + ("(ranks from calibration on " + a.data + ")" if ranks else
             "(--mode vanilla: trained exactly, at full rank)" if cfg.mode == "vanilla" else
             "(full rank: pass --data to calibrate)"))
    print(tr.cost_table() if ranks else format_table(layer_costs(bundle.layers, ranks, rows)))
    return 0


OPEN_FILES = 1024  # asked for, up to the hard limit: sessions, mapped weights, probes' pipes
OPEN_FILES_MIN = 16  # below it a command fails somewhere (a probe: at 6-8; runs at 10 or more)


def _enough_open_files() -> None:
    """Raise the soft limit on open files toward ``OPEN_FILES`` (as far as the hard limit
    allows); refuse where even the hard limit is below ``OPEN_FILES_MIN`` (an outside probe under
    ``ulimit -n 6`` to ``8``: errors that blamed the bundle or the path, and an empty
    ``checkpoints`` folder left behind).

    Raises:
        UserError: too few open files allowed.
    """
    import resource

    from .errors import UserError

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < OPEN_FILES_MIN:
        raise UserError(f"this process may open only {soft} files at once (its hard limit, "
                        f"ulimit -Hn, is {hard}), too few for a command (fewer than "
                        f"{OPEN_FILES_MIN}): raise the hard limit where the command is started "
                        f"(the shell's ulimit -n {OPEN_FILES}, the container's or service's "
                        "settings) and run it again")


def _open_files_way() -> str:
    """The way out of EMFILE (an outside probe under ``ulimit -n 7``: "check the path, the
    permissions and the free space")."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    more = 2 * soft if hard == resource.RLIM_INFINITY else min(2 * soft, hard)
    return (f"this process may open {soft} files at once, too few for this command: "
            + (f"run it with more (ulimit -n {more})" if more > soft else
               "that is its hard limit (ulimit -Hn); raise it where the command is started")
            + " and run the command again")


def _cmd_profiles(a) -> int:
    """Each profile and what it does on this machine: threads, budget, the device it would
    train on with this onnxruntime build, its speed figure."""
    import platform

    import onnxruntime as ort

    from devices import format_size, list_profiles

    from .config import SessionConfig
    from .sessions import resolve_device

    have = ort.get_available_providers()
    here = platform.machine()
    print(f"this machine: {here}, {os.cpu_count()} cores, onnxruntime {ort.__version__} with "
          f"{', '.join(have)}")
    from .config import profile_threads

    for p in list_profiles():
        if p.name == "null":  # the tests' do-nothing profile: no device's
            continue
        cfg = SessionConfig(device="auto", profile_providers=tuple(p.execution_providers))
        device, _ = resolve_device(cfg, have)
        speed = f"{p.gflops:g} GFLOP/s" if p.gflops else "no speed figure"
        note = "" if p.arch == {"amd64": "x86_64"}.get(here.lower(), here.lower()) else \
            f" (an {p.arch} board)"
        here_threads = profile_threads(p)
        threads = f"{p.default_threads:>2}" + (f" (here {here_threads})"
                                              if here_threads != p.default_threads else "")
        providers = "/".join(x.replace("ExecutionProvider", "") for x in p.execution_providers)
        print(f"{p.name:<18} RAM {format_size(p.ram):>10}  budget "
              f"{format_size(p.default_budget):>10}  threads {threads}  "
              f"--device auto -> {device.upper():<4} lists {providers}; {speed}{note}")
    return 0


def _cmd_export_model(a) -> int:
    from .export_model import export_model

    r = export_model(a.source, a.out, weights=a.weights, bundle=a.bundle, overwrite=a.overwrite)
    untrained = r.weights.name == "params.npz" and (r.weights.parent / "manifest.json").is_file()
    _print_line(f"model written to {r.onnx_path} ({r.params} "  # (a session 35 probe: "trained")
                + (f"untrained tensors: the bundle's initial weights, {r.weights}" if untrained
                   else f"trained tensors from {r.weights}")
                + ")"
                + (f", external data {r.external_data}" if r.external_data else ""))
    if r.bundle_from_run:  # (a run folder from elsewhere may name any bundle)
        from .export_model import run_of_checkpoints

        run = run_of_checkpoints(Path(a.source))  # (a fleet's folder: its summary.json, s49)
        record = run / "run.json" if (run / "run.json").is_file() else run / "summary.json"
        _print_line(f"bundle: {os.path.normpath(r.bundle_from_run)}, as {record} names it "
                    "(--bundle DIR picks another)")
    if r.labels_path:
        _print_line(f"class names written to {r.labels_path}")
    if r.preprocess_path:
        _print_line(f"image preprocessing written to {r.preprocess_path} (the model takes "
                    "normalised pixels: docs/examples/classify_image.py shows the steps)")
    if r.tokenizer_path:
        _print_line(f"tokenizer written to {r.tokenizer_path}")
    if r.safetensors_path:
        _print_line(f"torch weights written to {r.safetensors_path}")
        if r.packed:
            print(f"note: {len(r.packed)} of its tensors ({', '.join(r.packed[:3])}"
                  f"{', ...' if len(r.packed) > 3 else ''}) are a recurrent layer's weights in "
                  "ONNX's packed layout (peepholes, or shapes torch's GRU/LSTM do not have), "
                  "not torch's weight_ih_l0 & co.: load_state_dict skips them; run the .onnx")
        if r.from_onnx_file:  # (a probe loaded such a file into its torch module: BN twice)
            print("note: this bundle came from an .onnx file, so the .safetensors holds that "
                  "file's tensors under its names; an exporter may have changed them (torch "
                  "folds BatchNorm into the conv before it, e.g. 'stem.weight' and a new "
                  "'stem.bias'), so they load into the original torch module only where it "
                  "kept them: check load_state_dict's missing and unexpected keys, or run the "
                  ".onnx")
    else:
        print("note: safetensors is not installed; skipped the .safetensors file "
              "(pip install safetensors)")
    if r.onnx_path.suffix.lower() != ".onnx":  # (session 39 probe: the examples and most
        print(f"note: '{r.onnx_path.name}' has no .onnx suffix; docs/examples and most tools "
              "look for MODEL.onnx: pass --out NAME.onnx")  # tools look for it)
    return 0


def _cmd_fleet(a) -> int:
    from .fleet.cli import cmd_fleet

    return cmd_fleet(a)


HANDLERS = {"export": _cmd_export, "train": _cmd_train, "eval": _cmd_eval, "plan": _cmd_plan,
            "profiles": _cmd_profiles, "export-model": _cmd_export_model, "fleet": _cmd_fleet}


_INTERRUPTED: list[bool] = []
_RESTORED: list[Path] = []  # train --overwrite put the previous run back (_interrupted says so)


def _on_sigint(signum, frame) -> None:
    _INTERRUPTED.append(True)
    raise KeyboardInterrupt


def _negative_values_attached(argv: list[str]) -> list[str]:
    """``--budget -5MB`` as ``--budget=-5MB``: argparse reads a value that starts with '-' and
    is not a plain number as the next option ("expected one argument"); attached, it reaches
    the option's own check, whose message names the problem."""
    out: list[str] = []
    for arg in argv:
        if (out and out[-1].startswith("--") and "=" not in out[-1] and len(arg) > 1
                and arg[0] == "-" and (arg[1].isdigit() or arg[1] == ".")):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


# options whose empty value means something (export's lists: nothing excluded, no names)
# and the columns: a CSV column whose header is blank, a JSONL key ""
_EMPTY_OK = {"instant_exclude", "classes", "trainable", "lengths", "output", "text_column",
             "label_column"}


def check_not_empty(args: argparse.Namespace) -> None:
    """An option given as '' (an unset shell variable, ``--weights "$RUN"``) is an error: it
    was silently ignored (session 23 probe: ``eval --weights ''`` evaluated the initial
    weights, exit 0) or read as the current folder."""
    from contract import UserError

    for dest, value in vars(args).items():
        if dest == "out" and getattr(args, "cmd", "") == "train":
            continue  # its own message (_cmd_train) says what the default is
        if isinstance(value, str) and not value.strip() and dest not in _EMPTY_OK:
            positional = dest in ("source", "run") or (
                dest == "bundle" and getattr(args, "cmd", "") != "export-model")
            given = repr(value)[:20]  # (' ' said as '': session 47 probe)
            if positional:
                raise UserError(f"the {dest} argument is empty ({given} was given); pass its "
                                "path")
            # a required option has no default to fall back on (a session 43 probe)
            required = dest in ("model", "server") or (
                dest == "data" and getattr(args, "fleet_cmd", "") == "client") or (
                dest == "out" and getattr(args, "cmd", "") in ("export", "export-model"))
            raise UserError(f"--{dest.replace('_', '-')} is empty ({given} was given); pass a "
                            "value"
                            + ("" if required else ", or leave the option out for its default"))


def _error_line(line: str) -> None:
    """The command's one error line on stderr; a stalled pipe drops it after 1 s rather than
    hold the process (runtime/console.py)."""
    from .console import Unblocking, one_line

    Unblocking(sys.stderr, 1.0).write(one_line(line) + "\n")


def _weights_way(weights: Path, flag: str) -> str:
    """The way out for weights that do not exist: a checkpoint a run no longer keeps (it keeps
    its newest few) names those it has; else what the option takes (session 39 probe: a bare
    "not found")."""
    kept = []
    if weights.parent.name == "checkpoints" and weights.parent.is_dir():
        kept = sorted(p.name for p in weights.parent.glob("ckpt-*.npz"))[-3:]
    if kept:
        return (f"the run keeps only its newest checkpoints ({', '.join(kept)}); pass one of "
                f"them, or the run folder, as {flag}")
    return f"pass a run folder, its params.npz or one of its checkpoints as {flag}"


def _finished_run(args) -> bool:
    """Whether a ``train`` that a signal stopped had already finished: its newest checkpoint is
    of its last step and its params.npz and summary.json are written (session 39 probe: a
    Ctrl-C as a finished run exited said "interrupted ... continue with --resume", which then
    said there was nothing to resume). Says so in one line; the command succeeded."""
    if getattr(args, "cmd", None) != "train" or _RESTORED:
        return False
    try:
        from .checkpoint import newest_checkpoint
        from .run import FINISHED, _params_current
        from .run_folder import bundle_run

        out = Path(args.out) if args.out else bundle_run(Path(args.bundle))
        newest = newest_checkpoint(out / "checkpoints")
        done = os.path.realpath(out) in FINISHED and newest is not None and \
            newest[0] == args.steps and _params_current(out, args.steps)
    except Exception:  # noqa: BLE001 - not known: the interrupted line
        return False
    if done:
        print(f"a stop signal came as the run ended; it had finished its {args.steps} steps "
              f"(weights: {out / 'params.npz'})", file=sys.stderr)
    return done


def _interrupted(args) -> str:
    """The line a run stopped at once ends with (a second signal, or one outside the loop):
    for ``train``, the run folder's newest checkpoint and how to go on (session 27 probe: a
    bare "interrupted" after a double Ctrl-C)."""
    newest, began = None, False
    if _RESTORED:
        return (f"interrupted; this run was undone and the previous run in "
                f"'{_RESTORED[-1]}' is back in place (--overwrite replaces it only once the "
                "new run ends or checkpoints and stops on one signal)")
    if getattr(args, "cmd", None) == "train":
        try:
            from .checkpoint import newest_checkpoint
            from .run import STARTED
            from .run_folder import bundle_run

            out = Path(args.out) if args.out else bundle_run(Path(args.bundle))
            newest = newest_checkpoint(out / "checkpoints")
            began = os.path.realpath(out) in STARTED  # (stopped once its steps had begun)
        except Exception:  # noqa: BLE001 - the line comes out whatever the folder holds
            newest = None
    if newest and getattr(args, "overwrite", False) and not began:  # (session 46 probe: the
        # old run's checkpoint was offered, and --resume then refused its other options)
        return f"interrupted before training began; '{out}' is as it was"
    if newest:
        return (f"interrupted; the run's newest checkpoint is {newest[1]}: continue from it "
                "with --resume")
    return ("interrupted before the run's first checkpoint, so nothing of it can be resumed "
            "(one Ctrl-C lets the step in progress end and checkpoints it)" if began
            else "interrupted")  # (session 39 probe: a bare "interrupted", 9 steps lost)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # probes fork; no Rust thread pool
    import signal

    # a path or class name the terminal's encoding cannot show (LANG=C, an ASCII pipe, an
    # undecodable byte) is printed escaped, never a UnicodeEncodeError after the run's work
    # lines leave at once (a line left in a buffer is written at exit, where a stalled pipe
    # would hold the process: runtime/console.py)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace", line_buffering=True)
        except (AttributeError, ValueError, OSError):
            pass

    # Ctrl-C while a C extension initialises surfaces as that import's error (e.g. "ImportError:
    # initialization failed"): remember that SIGINT came, so any exception after it exits 130.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    args = None
    try:
        args = _parser().parse_args(_negative_values_attached(
            sys.argv[1:] if argv is None else list(argv)))
        from contract import UserError
        from devices import ProfileError

        from .memory import tune_malloc

        tune_malloc()
        if args.cmd in ("train", "eval", "plan"):  # (until a run folder or the training loop
            _term_as_interrupt()  # takes the signals over: SIGTERM while the data was read or
        try:                      # tokenised ended the process without a word, session 30 probe)
            _enough_open_files()
            check_not_empty(args)
            handler = HANDLERS.get(args.cmd) or args.handler
            return handler(args)
        except (UserError, ProfileError) as exc:
            _error_line(f"error: {exc}")
            return 2
        except BrokenPipeError:
            return 1
        except OSError as exc:  # a path the OS refuses (name too long, permissions, no space)
            name = str(exc.filename) if exc.filename else ""
            where = f" '{name}'" if name else ""
            if len(name) > 200:  # (session 47 probe: a 5,000-character path said whole)
                where = f" '{name[:80]}...{name[-80:]}' ({len(name):,} characters)"
            _error_line(f"error: {exc.strerror or exc}{where}; " + (
                _open_files_way() if exc.errno == errno.EMFILE else
                "a file or folder name takes at most 255 bytes and a whole path 4,096: pass a "
                "shorter path" if exc.errno == errno.ENAMETOOLONG else
                "check the path, the permissions and the free space"))
            return 2
        except MemoryError as exc:
            _error_line(f"error: out of memory ({str(exc)[:160] or 'an allocation failed'}); ask "
                        "for smaller sizes (shapes, --batch, --micro-batch) or give a --budget "
                        "(a larger one if you gave one)")
            return 2
        except RecursionError:
            print("error: an input file is nested too deeply to read (a JSON/TOML structure); "
                  "pass a flat file", file=sys.stderr)
            return 2
        except RuntimeError as exc:  # Python 3.11's Path.resolve() on a symbolic link loop
            if not str(exc).startswith("Symlink loop"):
                raise
            _error_line(f"error: {exc}: a symbolic link that leads back to itself; remove it or "
                        "pass another path")
            return 2
        finally:  # the command's bundle is free for an export once it ends (a process may go on)
            from contract import release_bundles

            release_bundles()
    except KeyboardInterrupt as exc:
        if _finished_run(args):
            return 0
        print(_interrupted(args), file=sys.stderr)
        return 128 + int(getattr(exc, "signum", signal.SIGINT))
    except BrokenPipeError:
        return 1
    except Exception:
        if _INTERRUPTED or _TERM_SEEN:  # a signal's exception dropped, and what it broke failed
            if _finished_run(args):
                return 0
            print(_interrupted(args), file=sys.stderr)
            return 128 + int(_TERM_SEEN[0]) if _TERM_SEEN else 130
        raise
    except BaseException as exc:  # a stop signal's TrainingInterrupted where no command took it
        from .checkpoint import TrainingInterrupted

        if not isinstance(exc, TrainingInterrupted):
            raise
        print(str(exc), file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
