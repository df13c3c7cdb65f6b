"""The shape of the code: the rule imports no engine, engines import no other engine, and a new
engine is one class and one line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from rnca_cli import engines, inference
from rnca_cli.engines import Engine
from rnca_cli.engines.reference import ReferenceEngine
from rnca_cli.model import RNCA, ModelConfig

PACKAGE = Path(engines.__file__).resolve().parents[1]
ENGINE_MODULES = ("reference", "sparse", "fused")


def imported_modules(path: Path) -> set[str]:
    """The modules a file imports, relative ones resolved against its package (``rnca_cli.x``)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # from . import x
    return found


def test_the_rule_imports_no_engine_and_no_kernel():
    imports = imported_modules(PACKAGE / "model.py")
    assert not {m for m in imports if m.startswith(("rnca_cli.engines", "rnca_cli.kernels", "rnca_cli._fused"))}


@pytest.mark.parametrize("name", ENGINE_MODULES)
def test_engines_do_not_import_each_other(name):
    imports = imported_modules(PACKAGE / "engines" / f"{name}.py")
    others = {f"rnca_cli.engines.{other}" for other in ENGINE_MODULES if other != name}
    assert not imports & others


def test_only_the_kernel_wrappers_touch_the_compiled_module():
    users = [p.name for p in PACKAGE.rglob("*.py") if "rnca_cli._fused" in imported_modules(p)]
    assert users == ["kernels.py"]


class CudaPlaceholder(Engine):
    """What a new CUDA engine starts as: one class, delegating to the reference until it has kernels."""

    name = "cuda-placeholder"

    def unavailable(self, device, dtype, model):
        return None if device.type == "cuda" else "runs on CUDA devices only"

    def rollout(self, model, image, mask, steps, seeds, origin=(0, 0), stats=None, precision="fp32"):
        return ReferenceEngine().rollout(model, image, mask, steps, seeds, origin, stats, precision)

    def training_inputs(self, model, image):
        return ReferenceEngine().training_inputs(model, image)

    def train_step(self, model, state, inputs, noise, t):
        return ReferenceEngine().train_step(model, state, inputs, noise, t)


def test_a_new_engine_is_one_class_and_one_line(monkeypatch):
    monkeypatch.setattr(engines, "ENGINES", list(engines.engines()))
    model = RNCA(ModelConfig(channels=4, hidden=8))
    cpu_choice = engines.select_engine(torch.device("cpu"), torch.float32, model)
    engines.register(CudaPlaceholder(), first=True)  # the one line
    assert engines.select_engine(torch.device("cuda"), torch.float32, model).name == "cuda-placeholder"
    assert engines.select_engine(torch.device("cpu"), torch.float32, model) is cpu_choice  # CPUs unaffected
    assert any(line.startswith("cuda-placeholder: unavailable: runs on CUDA devices only") for line in engines.describe())
    image, mask = torch.rand(1, 1, 20, 20), (torch.rand(1, 20, 20) > 0.5).float()
    seeds = torch.tensor([3])
    ours = inference.rollout(model, image, mask, 5, seeds, engine=CudaPlaceholder())
    assert torch.equal(ours, inference.rollout(model, image, mask, 5, seeds, engine="reference"))


def test_an_unknown_or_unfit_engine_is_a_usage_error(monkeypatch):
    from rnca_cli.errors import UsageError

    model = RNCA(ModelConfig(channels=4, hidden=8))
    with pytest.raises(UsageError, match="engine 'warp': expected one of fused, sparse, reference"):
        engines.select_engine(torch.device("cpu"), torch.float32, model, "warp")
    monkeypatch.setenv("RNCA_ENGINE", "reference")
    with pytest.raises(UsageError, match="engine 'reference' cannot run this rollout: runs float32 only"):
        engines.select_engine(torch.device("cpu"), torch.bfloat16, model)
