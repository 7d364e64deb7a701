"""``python -m exporter``: train, export, evaluate and embed face-embedding models.

Each command logs progress to stderr and prints one JSON summary on stdout, so scripts can parse it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger("exporter")

TRAIN_EPILOG = """config keys (set in the YAML file or as KEY=VALUE overrides):
{keys}

examples:
  python -m exporter train --config exporter/configs/celeba299_mbv2_cpu.yaml
  python -m exporter train --config exporter/configs/arc_res50.yaml train_dir=/data/celeba/images epochs=20
"""


def _setup_logging(verbose: bool) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # absl (TF's logger) reports every checkpoint shard at INFO
    logging.getLogger("absl").setLevel(logging.WARNING)


T = TypeVar("T", bound="DataclassInstance")


def _emit(result: dict) -> None:
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)  # before importing TensorFlow: bad configs fail fast
    from .train import train

    run_dir = train(cfg, resume=not args.restart)
    _emit({"run_dir": str(run_dir), "summary": json.loads((run_dir / "train_summary.json").read_text())})
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import load_distill_config

    cfg = load_distill_config(args.config, args.overrides)  # before importing TensorFlow: bad configs fail fast
    from .distill import distill

    result = distill(cfg, resume=not args.restart)
    _emit({"run_dir": str(result.run_dir), "steps": result.steps, "seconds": round(result.seconds, 1),
           "final_loss": result.final_loss, "teacher": result.teacher})
    return 0


def _options(cls: type[T], args: argparse.Namespace) -> T:
    """An options dataclass from the parsed flags of the same names (flags a command lacks keep their defaults)."""
    import dataclasses

    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def cmd_export(args: argparse.Namespace) -> int:
    from .export import ExportOptions, export_model

    _emit(export_model(args.source, args.output, _options(ExportOptions, args)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate, then write what was asked for: the ROC plot, the threshold into the model, the JSON."""
    from .evaluate import (
        EvaluateOptions,
        evaluate_model,
        make_embedder,
        plot_report,
        write_report,
        write_threshold_into,
    )

    if args.write_threshold and not str(args.model).endswith(".onnx"):
        raise ValueError("--write-threshold needs an ONNX model")
    embedder = make_embedder(args.model, args.config, args.overrides)
    report = evaluate_model(embedder, args.pairs, _options(EvaluateOptions, args), source=args.model)
    if args.roc:
        report.roc_png = str(plot_report(report, args.roc, args.compare))
    if args.write_threshold:
        write_threshold_into(args.model, report.best_threshold, report.threshold_source, report.impostor_tail,
                             report.quality)
        report.threshold_written = str(args.model)
    if args.output:
        write_report(report, args.output)
    _emit(report.to_dict())
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from .evaluate import embed_files

    result = embed_files(model=args.model, inputs=args.inputs, output=args.output, config=args.config,
                         overrides=args.overrides, flip=args.flip, batch_size=args.batch_size,
                         flip_mode=args.flip_mode)
    _emit(result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from service.model.fp16 import MIN_COSINE as MIN_COSINE_FP16

    from .config import field_help

    parser = argparse.ArgumentParser(
        prog="python -m exporter",
        description="Train an ArcFace face-embedding model in TensorFlow 2, export its embedding branch to "
                    "ONNX with the face.* contract the service reads, and evaluate models on LFW-style pairs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (fit() or GradientTape loop), with resume",
                       description="Train per a YAML config plus KEY=VALUE overrides. Outputs (checkpoints, "
                                   "TensorBoard logs, final weights, config) go to <output_root>/<name>; rerunning "
                                   "the same command resumes from the latest checkpoint.",
                       epilog=TRAIN_EPILOG.format(keys=field_help()), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (ours or an arcface-tf2 configs/*.yaml)")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints and start over")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. epochs=3 batch_size=32")
    p.set_defaults(func=cmd_train)

    from .distill import DistillConfig

    p = sub.add_parser("distill", help="train a student to reproduce an ONNX teacher's embeddings",
                       description="Distil any ONNX face model the service can load (default: the service's default "
                                   "model) into a TF2 student (MobileNetV2 or ResNet-50 + embedding head) on aligned "
                                   "crops and/or photos (aligned by the service's detector). Teacher embeddings of "
                                   "every view (clean, augmented, mirrored) are computed once and cached in the run "
                                   "directory. Rerunning the same command resumes. The run directory exports with "
                                   "'python -m exporter export RUN'.",
                       epilog="config keys (YAML or KEY=VALUE):\n" + field_help(DistillConfig) + "\n\nexample:\n"
                              "  python -m exporter distill --config exporter/configs/distill_sface_mbv2_cpu.yaml",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML distillation config")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints and start over")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. steps=100 crops=[dir]")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("export", help="embedding branch -> ONNX with the face.* contract, parity-checked",
                       description="Export the embedding branch of a trained model to ONNX (opset 17, dynamic batch "
                                   "named 'batch', NCHW float32 input), write the face.* contract into its metadata, "
                                   "and check parity TF vs onnxruntime on real faces: the export fails if the minimum "
                                   "cosine is below --min-cosine. Optionally also writes an fp16 variant.")
    p.add_argument("source", help="our run directory (runs/<name>) or an arcface-tf2 checkpoint (prefix, .index or dir)")
    p.add_argument("--output", "-o", required=True, help="ONNX file to write (the fp16 variant gets .fp16.onnx)")
    p.add_argument("--config", help="YAML config for an arcface-tf2 checkpoint (e.g. its arc_mbv2.yaml)")
    p.add_argument("--threshold", type=float, help="verify cosine threshold to write (else --threshold-from or calibration)")
    p.add_argument("--threshold-from", help="evaluation JSON whose best_threshold to write")
    p.add_argument("--calibrate-pairs", help="pairs.txt (images in its folder's images/) to calibrate the threshold on now")
    p.add_argument("--identify-threshold", type=float, help="optional 1:N threshold to write")
    p.add_argument("--parity-faces", help="folder of aligned faces for the parity check (default: tests/fixtures/faces)")
    p.add_argument("--parity-count", type=int, default=32, help="faces used for parity (default 32)")
    p.add_argument("--min-cosine", type=float, default=0.99999, help="parity bar, TF vs ONNX (default 0.99999)")
    p.add_argument("--fp16", action="store_true", help="also write an fp16 variant (float32 inputs/outputs)")
    p.add_argument("--fp16-min-cosine", type=float, default=MIN_COSINE_FP16,
                   help="parity bar for the fp16 variant, fp32 vs fp16 with fp16 rounding emulated "
                   f"(default {MIN_COSINE_FP16}, the service's)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17 or 18; tf2onnx does not support 21)")
    p.add_argument("--input-name", default="input", help="graph input name (default 'input')")
    p.add_argument("--model-name", help="face.model_name (default from the config)")
    p.add_argument("--model-version", help="face.model_version (default from the config)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (e.g. mean=0 std=255)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="LFW 10-fold verification, TAR@FAR, ROC, calibrated threshold",
                       description="Evaluate a model on a pairs.txt protocol (LFW View 2 format): 10-fold accuracy "
                                   "mean/std with and without flip-averaging, TAR at FAR 1e-3 and 1e-4, the best "
                                   "threshold as a cosine. MODEL is an ONNX file (preprocessed by its face.* contract) "
                                   "or a TF source (run directory or arcface-tf2 checkpoint). Writes JSON and an ROC PNG.")
    p.add_argument("model", help="ONNX file, run directory, or arcface-tf2 checkpoint")
    p.add_argument("--pairs", required=True, help="pairs.txt; images are read from <its folder>/images unless --images")
    p.add_argument("--images", help="image root: <root>/<Identity>/<Identity>_NNNN.jpg")
    p.add_argument("--config", help="YAML config for an arcface-tf2 checkpoint")
    p.add_argument("--output", "-o", help="JSON to write (default: print only)")
    p.add_argument("--roc", help="ROC curve PNG to write")
    p.add_argument("--label", help="name for the model in the JSON and plot")
    p.add_argument("--compare", action="append", default=[], metavar="JSON",
                   help="an earlier evaluation JSON to draw on the same ROC plot (repeatable)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit-folds", type=int, help="only the first N folds (quick checks)")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="skip the flip-averaged figures (halves the time; the threshold never uses them)")
    p.add_argument("--flip-mode", choices=("normalised", "raw"), default="normalised",
                   help="flip-averaging: sum of L2-normalised embeddings (default) or of raw ones "
                   "(arcface-tf2's and insightface's evaluation)")
    p.add_argument("--write-threshold", action="store_true",
                   help="write the calibrated threshold into the ONNX file's face.threshold (ONNX models only)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for TF sources")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("embed", help="embeddings of aligned face images to a .npy file",
                       description="Embed aligned 112x112 face images (files or folders) with an ONNX or TF model; "
                                   "writes an N x D float32 .npy of L2-normalised embeddings and a .txt of file names.")
    p.add_argument("model", help="ONNX file, run directory, or arcface-tf2 checkpoint")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--output", "-o", required=True, help=".npy file to write")
    p.add_argument("--config", help="YAML config for an arcface-tf2 checkpoint")
    p.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--flip-mode", choices=("normalised", "raw"), default="normalised",
                   help="flip-averaging: sum of L2-normalised embeddings (default) or of raw ones "
                   "(arcface-tf2's and insightface's evaluation)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for TF sources (repeatable)")
    p.set_defaults(func=cmd_embed)
    return parser


# commands whose trailing KEY=VALUE positionals are config overrides
OVERRIDE_COMMANDS = {"train", "distill", "export", "evaluate"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, plus KEY=VALUE overrides anywhere after the command (``export CKPT -o x.onnx mean=0``).

    argparse fills a ``nargs="*"`` positional the first time it reaches it (right after the source),
    so overrides typed after an option would be "unrecognized arguments"; they are collected here.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in OVERRIDE_COMMANDS:
        late = [item for item in extra if "=" in item and not item.startswith("-")]
        args.overrides = [*(args.overrides or []), *late]
        extra = [item for item in extra if item not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging(args.verbose)
    from .config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
