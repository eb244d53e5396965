"""Graph dumps through ``Int8LtConfig(dump_dir=...)`` and ``INT8FX_DUMP``."""

import torch

import int8fx
from examples.toy_models import MLP


def test_dump_dir_option_writes_before_after_and_layers(tmp_path):
    torch._dynamo.reset()
    backend = int8fx.int8lt(inner="eager", dump_dir=str(tmp_path))
    with torch.no_grad():
        torch.compile(MLP(), backend=backend)(torch.randn(2, 32))
    text = {path.name: path.read_text() for path in tmp_path.iterdir()}
    before = next(v for k, v in text.items() if "before" in k)
    after = next(v for k, v in text.items() if "after" in k)
    assert "aten.addmm" in before and "int8fx.int8_linear" not in before
    assert "int8fx.int8_linear" in after and "aten.addmm" not in after
    assert any("up" in v and "down" in v for k, v in text.items() if "layers" in k)


def test_env_var_names_the_dump_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("INT8FX_DUMP", str(tmp_path))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(MLP(), backend=int8fx.int8lt(inner="eager"))(torch.randn(2, 32))
    assert any("after" in path.name for path in tmp_path.iterdir())
