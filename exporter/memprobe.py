"""Peak memory of an export, stage by stage: ``python -m exporter.memprobe --backbone ResNet50``.

Builds an untrained embedding model of the given backbone (the weights' values do not change the
memory), saves it as a run directory and exports it as ``python -m exporter export`` would, reading
the process's peak resident set (``VmHWM`` in /proc/self/status) after each stage. The peak is reset
between stages (writing 5 to /proc/self/clear_refs), so each figure is that stage's own peak.
Prints one JSON object; ``-o`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Stages:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.start = time.monotonic()

    def mark(self, name: str) -> None:
        self.rows.append({"stage": name, "peak_mb": round(_status_kb("VmHWM") / 1024),
                          "rss_mb": round(_status_kb("VmRSS") / 1024),
                          "seconds": round(time.monotonic() - self.start, 1)})
        _reset_peak()
        self.start = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exporter.memprobe", description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="ResNet50", choices=("ResNet50", "MobileNetV2"))
    parser.add_argument("--fp16", action="store_true", help="also make and check the fp16 variant")
    parser.add_argument("--tf2onnx-graph-copies", action="store_true",
                        help="convert as before issue 14 (tf2onnx's default: a graph copy per optimizer), "
                        "for the before/after comparison")
    parser.add_argument("--output", "-o", help="JSON file to write")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    stages = Stages()
    import tensorflow as tf  # noqa: F401

    from .backbones import build_embedding_model
    from .checkpoints import save_run
    from .config import load_config
    from .export import ExportOptions, export_model

    stages.mark("import tensorflow")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"backbone={args.backbone}", f"output_root={tmp}", "name=probe",
                                 "model_name=memprobe", "model_version=probe"])
        model = build_embedding_model(cfg, imagenet_weights=False)
        save_run(cfg.output_dir, cfg, model, ["x"])
        del model
        stages.mark("build and save model")
        options = ExportOptions(threshold=0.3, fp16=args.fp16, fp16_min_cosine=0.0,
                                tf2onnx_graph_copies=args.tf2onnx_graph_copies)
        result = export_model(cfg.output_dir, Path(tmp) / "m.onnx", options, stage_hook=stages.mark)
        stages.mark("after export")
    report = {"backbone": args.backbone, "fp16": args.fp16, "tf2onnx_graph_copies": args.tf2onnx_graph_copies,
              "machine": platform.node(), "cpus": os.cpu_count(),
              "python": sys.version.split()[0], "onnx_bytes": result["bytes"],
              "peak_mb_overall": max(r["peak_mb"] for r in stages.rows), "stages": stages.rows,
              "note": "2-core CPU shared with other work (times are contended); peak_mb is VmHWM per stage"}
    text = json.dumps(report, indent=1)
    sys.stdout.write(text + "\n")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
