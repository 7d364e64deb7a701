"""served_model_path: the one answer to "which model file does the service load" (service start-up,
``python -m service calibrate``, ``python -m service gallery``), fp16 variants served from the cache."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from service.config import Settings
from service.model.contract import FP16_KEYS, file_digest, read_contract, write_contract
from service.model.serving import served_model_path, serving_variant_path
from tests.server import REPO


def _settings(model: Path | None, cache: Path, precision: str = "fp32") -> Settings:
    return Settings(model=model, model_cache_dir=cache, precision=precision)


def test_fp32_serves_the_configured_model(default_model, tmp_path):
    assert served_model_path(_settings(default_model, tmp_path)) == default_model
    assert served_model_path(_settings(default_model.parent, tmp_path)) == default_model  # a directory
    with pytest.raises(FileNotFoundError):
        served_model_path(_settings(tmp_path / "missing.onnx", tmp_path))
    assert not list(tmp_path.iterdir())  # nothing made for fp32


@pytest.fixture(scope="module")
def cached(default_model, tmp_path_factory) -> tuple[Path, Path]:
    """(source model, model cache) after one fp16 start-up made the variant."""
    cache = tmp_path_factory.mktemp("cache")
    src = tmp_path_factory.mktemp("src") / "mine" / "model.onnx"
    src.parent.mkdir()
    shutil.copy(default_model, src)
    shutil.copy(default_model.with_name("model.onnx.face.json"), src.with_name("model.onnx.face.json"))
    made = served_model_path(_settings(src, cache, "fp16"))
    assert made == serving_variant_path(src, cache) == cache / "mine-fp16" / "model.onnx"
    return src, cache


def test_fp16_variant_carries_the_fp16_keys_of_its_source(cached):
    src, cache = cached
    variant = read_contract(serving_variant_path(src, cache))
    assert set(FP16_KEYS) <= set(variant.extra)
    assert variant.extra["face.fp16_source_sha256"] == file_digest(src)
    assert variant.model_id == read_contract(src).model_id + "-fp16"


def test_a_cached_variant_is_served_without_the_conversion_tool(cached):
    """What the container does at start: the variant made at build time is loaded, and neither the fp16
    tool nor onnxconverter-common is imported (they are build tooling)."""
    src, cache = cached
    code = (
        "import json, sys\n"
        "from service.config import Settings\n"
        "from service.model.serving import served_model_path\n"
        f"path = served_model_path(Settings(model={str(src)!r}, model_cache_dir={str(cache)!r}, precision='fp16'))\n"
        "print(json.dumps([str(path), 'service.model.fp16' in sys.modules, 'onnxconverter_common' in sys.modules]))\n"
    )
    before = serving_variant_path(src, cache).stat().st_mtime_ns
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    path, tool_imported, converter_imported = json.loads(run.stdout.strip().splitlines()[-1])
    assert path == str(serving_variant_path(src, cache))
    assert not tool_imported and not converter_imported
    assert serving_variant_path(src, cache).stat().st_mtime_ns == before


def test_a_variant_of_a_changed_source_is_made_again(cached, tmp_path):
    src, cache = cached
    changed = tmp_path / "mine" / "model.onnx"  # same name, so the same cache entry
    changed.parent.mkdir()
    proto = onnx.load(str(src))
    write_contract(proto, dataclasses.replace(read_contract(src), threshold=0.3))
    onnx.save(proto, str(changed))
    served = served_model_path(_settings(changed, cache, "fp16"))
    assert served == serving_variant_path(src, cache)
    remade = read_contract(served)
    assert remade.threshold == 0.3 and remade.extra["face.fp16_source_sha256"] == file_digest(changed)


def test_an_fp16_model_is_served_as_it_is(cached):
    src, cache = cached
    variant = serving_variant_path(src, cache)
    assert served_model_path(_settings(variant, cache / "elsewhere", "fp16")) == variant
    assert not (cache / "elsewhere").exists()
