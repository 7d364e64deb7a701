"""Which models a service serves: FACE_MODELS / --model NAME=PATH parsing, and the registry's refusals."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from harness.models import tiny_model
from service.__main__ import settings_from_args
from service.config import ModelConfigError, Settings, parse_model_specs
from service.model.registry import ModelRegistry, ServedModel
from service.model.runtime import EmbeddingModel


def test_model_specs_are_name_path_pairs_in_order():
    assert [n for n, _ in parse_model_specs(["b=/m/b.onnx", " a = /m/a "])] == ["b", "a"]
    for bad in (["x"], ["=p"], ["A=p"], ["a b=p"], ["a="], ["a=p", "a=q"], ["-a=p"]):
        with pytest.raises(ModelConfigError):
            parse_model_specs(bad)


def test_settings_take_models_or_one_model_never_both(tmp_path):
    assert Settings(models="x=/a,y=/b").served_models()[0][0] == "x"
    assert Settings().served_models() == [("default", None)]
    with pytest.raises(ValidationError, match="not both"):
        Settings(models="x=/a", model=tmp_path)
    with pytest.raises(ValidationError, match="twice"):
        Settings(models="x=/a,x=/b")


def test_command_line_model_flags():
    assert [n for n, _ in settings_from_args(["--model", "a=/x", "--model", "b=/y"]).served_models()] == ["a", "b"]
    assert settings_from_args(["--model", "/m/model.onnx"]).served_models()[0][0] == "default"
    with pytest.raises(SystemExit):
        settings_from_args(["--model", "a=/x", "--model", "/y"])


def test_registry_refuses_one_model_under_two_names(tmp_path):
    settings = Settings(data_dir=tmp_path)
    first = tiny_model(tmp_path / "a.onnx")
    same = tiny_model(tmp_path / "b.onnx")  # the same contract: the same model id
    other = tiny_model(tmp_path / "c.onnx", name="other")
    served = [ServedModel(name, EmbeddingModel(path, settings), None, settings)  # type: ignore[arg-type]
              for name, path in (("a", first), ("b", same), ("c", other))]
    with pytest.raises(ModelConfigError, match="same model"):
        ModelRegistry(served[:2])
    registry = ModelRegistry([served[0], served[2]])
    assert registry.default.name == "a" and registry.names() == ["a", "c"]
    assert registry.by_model_id("other@1").name == "c" and registry.get("c").dim == 64
    with pytest.raises(KeyError):
        registry.get("b")
