"""Checkpoint files and model names."""

from __future__ import annotations


import pytest
import torch

from rnca_cli import checkpoint
from rnca_cli.checkpoint import load_checkpoint, save_checkpoint
from rnca_cli.errors import CheckpointError
from rnca_cli.model import RNCA, ModelConfig

from conftest import tiny_model


def test_round_trip_rebuilds_an_identical_model(tmp_path):
    model = tiny_model(seed=3, image_channels=3)
    path = checkpoint.save_checkpoint(tmp_path / "m.pt", model, {"data": "rings", "iterations": 7})
    loaded, provenance = checkpoint.load_checkpoint(path)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert provenance["data"] == "rings" and provenance["iterations"] == 7
    assert provenance["rnca_version"] and provenance["created"]
    image, mask = torch.rand(1, 3, 8, 8), torch.rand(1, 8, 8)
    same = [m(image, mask, 4, torch.Generator().manual_seed(0)) for m in (model, loaded)]
    assert torch.equal(*same)


def test_checkpoint_is_plain_data_loadable_with_weights_only(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "m.pt", tiny_model())
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "rnca-checkpoint" and payload["format_version"] == 1
    assert ModelConfig.from_dict(payload["config"]).channels == 4


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_file_needing_unpickling_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "rnca-checkpoint", "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"evil.pt: refused: the file needs unsafe unpickling"):
        checkpoint.load_checkpoint(path)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [
        (b"plain text, no torch here", "not a PyTorch checkpoint"),
        ({"weights": torch.zeros(2)}, "not an rnca checkpoint"),
        ({"format": "rnca-checkpoint", "format_version": 99}, "format version 99 is not supported"),
        ({"format": "rnca-checkpoint", "format_version": 1, "config": {}}, "missing 'state_dict'"),
        (
            {"format": "rnca-checkpoint", "format_version": 1, "config": {"channels": 4}, "state_dict": {}},
            "cannot rebuild the model",
        ),
    ],
)
def test_non_rnca_files_are_refused_with_a_message(tmp_path, content, message):
    path = tmp_path / "other.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as info:
        checkpoint.load_checkpoint(path)
    assert str(path) in str(info.value)


def test_resolve_model_by_path_and_errors(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "m.pt", RNCA(ModelConfig(channels=2, hidden=4)))
    assert checkpoint.resolve_model(str(path)) == path
    with pytest.raises(CheckpointError, match="no such model file"):
        checkpoint.resolve_model(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="not a model file nor a shipped model name"):
        checkpoint.resolve_model("no-such-name")


def test_shipped_default_model_resolves_and_loads():
    names = checkpoint.available_models()
    assert checkpoint.DEFAULT_MODEL in names
    model = checkpoint.load_model(checkpoint.DEFAULT_MODEL)
    assert model.config.channels == 16 and not model.training
    assert model.provenance["iterations"] > 0


def test_weights_are_verified_against_their_digest(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", tiny_model())
    payload = torch.load(path, weights_only=True)
    assert len(payload["weights_sha256"]) == 64
    payload["state_dict"]["fc2.bias"][0] += 1.0  # damage one weight, keep the stored digest
    torch.save(payload, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match="damaged.pt: damaged: the weights do not match the digest"):
        load_checkpoint(tmp_path / "damaged.pt")


def test_non_finite_weights_are_refused(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    path = save_checkpoint(tmp_path / "nan.pt", model)
    with pytest.raises(CheckpointError, match="nan.pt: refused: weight fc2.weight holds NaN or infinite values"):
        load_checkpoint(path)


def test_the_shipped_model_carries_a_digest():
    from rnca_cli.checkpoint import read_checkpoint, resolve_model

    assert len(read_checkpoint(resolve_model("rings"))["weights_sha256"]) == 64


def test_a_failed_checkpoint_write_is_one_line_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """A full disk makes torch.save raise a RuntimeError from its zip writer; the old file stays."""
    import torch

    from rnca_cli.errors import OutputError

    target = save_checkpoint(tmp_path / "m.pt", tiny_model())
    before = target.read_bytes()

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputError, match=r"m\.pt: cannot write the checkpoint \(is the disk full\?"):
        save_checkpoint(target, tiny_model(seed=1))
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_export_drops_the_training_state_and_keeps_the_model(tmp_path):
    model = tiny_model(seed=2)
    run = save_checkpoint(tmp_path / "last.pt", model, {"iterations": 5}, training={"pool": torch.zeros(64, 64, 64)},
                          refine={"min_size": 7})
    out = checkpoint.export_model(run, tmp_path / "model.pt")
    payload = checkpoint.read_checkpoint(out)
    assert "training" not in payload and payload["refine"] == {"min_size": 7}
    assert out.stat().st_size < run.stat().st_size / 10
    loaded, provenance = load_checkpoint(out)
    assert provenance["iterations"] == 5
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    from rnca_cli.errors import OutputError

    with pytest.raises(OutputError, match="model.pt: already exists"):
        checkpoint.export_model(run, out)


@pytest.mark.parametrize("name", sorted(checkpoint.available_models()))
def test_shipped_models_are_small_and_hold_no_training_state(name):
    path = checkpoint.available_models()[name]
    assert "training" not in checkpoint.read_checkpoint(path)
    assert path.stat().st_size < 200_000
