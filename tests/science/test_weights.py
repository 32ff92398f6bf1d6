"""Model files: bit-exact safetensors round trip, sha256 and exact-key checks, Cellpose interchange."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from app.science.backbone import FULL_WIDTHS, HALF_WIDTHS, build_network, network_widths
from app.science.weights import (
    CellposeCompatibilityError,
    ModelCard,
    WeightsError,
    WeightsIntegrityError,
    WeightsMismatchError,
    architecture_of,
    export_cellpose,
    import_cellpose_file,
    load_model,
    save_model,
)

TINY = (8, 16, 32, 64)
REPO_ROOT = Path(__file__).resolve().parents[2]


def _trained_looking(widths=TINY, seed=0, diam_mean=30.0) -> torch.nn.Module:
    """A net with non-trivial weights and BatchNorm statistics (not the default init)."""
    torch.manual_seed(seed)
    net = build_network(widths, diam_mean=diam_mean)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if tensor.is_floating_point() and "diam" not in name:
                tensor.add_(torch.randn_like(tensor) * 0.01)
            elif name.endswith("num_batches_tracked"):
                tensor.fill_(123)
        net.diam_labels.fill_(17.25)
    return net


def _card(net, **overrides) -> ModelCard:
    fields = dict(
        name="hela-tfeb-nuclei",
        version="v3",
        architecture=architecture_of(net),
        diameter=17.25,
        reporter="TFEB-GFP",
        cell_line="HeLa",
        object="nuclei",
        metrics={"f1@0.5": 0.8},
    )
    fields.update(overrides)
    return ModelCard(**fields)


def test_round_trip_is_bit_exact(tmp_path):
    net = _trained_looking()
    saved = save_model(net, _card(net), tmp_path / "weights", "m-v3", card_directory=tmp_path / "cards")
    assert saved.weights_path == tmp_path / "weights" / "m-v3.safetensors"
    assert saved.card_path == tmp_path / "cards" / "m-v3.json"
    loaded, card = load_model(saved.weights_path)  # card found in ../cards/
    original, restored = net.state_dict(), loaded.state_dict()
    assert list(original) == list(restored)
    for name in original:
        assert original[name].dtype == restored[name].dtype, name
        assert torch.equal(original[name], restored[name]), name
    assert network_widths(loaded) == TINY
    assert card.weights_sha256 == saved.sha256 and card.reporter == "TFEB-GFP"
    assert card.metrics == {"f1@0.5": 0.8} and card.diam_mean == 30.0
    x = torch.rand(1, 2, 64, 64)
    with torch.no_grad():
        assert torch.equal(net.eval()(x)[0], loaded(x)[0])


def test_card_json_round_trip_keeps_unknown_fields():
    net = build_network(TINY)
    card = _card(net, size_model={"coefficients": [0.5], "style_mean": [0.0], "log_offset": 0.1, "diam_mean": 30.0})
    data = json.loads(card.to_json())
    data["added_by_a_newer_version"] = {"x": 1}
    restored = ModelCard.from_json(json.dumps(data))
    assert restored.size_model == card.size_model and restored.created_at == card.created_at
    assert restored.extra == {"added_by_a_newer_version": {"x": 1}}
    with pytest.raises(WeightsError, match="architecture type"):
        ModelCard.from_dict({**data, "architecture": {"type": "unet", "widths": [1, 2]}})
    with pytest.raises(WeightsError, match="required"):
        ModelCard.from_dict({"name": "x"})


def test_corrupted_or_replaced_file_is_rejected(tmp_path):
    net = _trained_looking()
    saved = save_model(net, _card(net), tmp_path, "m")
    data = bytearray(saved.weights_path.read_bytes())
    data[-100] ^= 0x01  # one flipped bit in a weight
    saved.weights_path.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="corrupted"):
        load_model(saved.weights_path)
    with pytest.raises(WeightsIntegrityError):
        load_model(saved.weights_path, card=ModelCard.from_json(saved.card_path.read_text()))


def test_expected_sha256_is_checked(tmp_path):
    net = _trained_looking()
    saved = save_model(net, _card(net), tmp_path, "m")
    load_model(saved.weights_path, expected_sha256=saved.sha256.upper())
    with pytest.raises(WeightsIntegrityError, match="expected sha256"):
        load_model(saved.weights_path, expected_sha256="0" * 64)


def test_truncated_file_without_card_is_rejected(tmp_path):
    net = _trained_looking()
    saved = save_model(net, _card(net), tmp_path, "m")
    saved.card_path.unlink()
    saved.weights_path.write_bytes(saved.weights_path.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="safetensors"):
        load_model(saved.weights_path)


def test_keys_are_checked_exactly(tmp_path):
    state = {k: v.clone() for k, v in _trained_looking().state_dict().items()}
    missing = dict(state)
    del missing["output.2.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsMismatchError, match=r"1 missing: output\.2\.bias"):
        load_model(tmp_path / "missing.safetensors")
    extra = {**state, "head.extra.weight": torch.zeros(3)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(WeightsMismatchError, match=r"1 unexpected: head\.extra\.weight"):
        load_model(tmp_path / "extra.safetensors")
    wrong_shape = {**state, "output.2.bias": torch.zeros(4)}
    save_file(wrong_shape, str(tmp_path / "shape.safetensors"))
    with pytest.raises(WeightsMismatchError, match="wrong shape"):
        load_model(tmp_path / "shape.safetensors")


def test_card_widths_must_match_the_file(tmp_path):
    net = _trained_looking()
    saved = save_model(net, _card(net), tmp_path, "m")
    wrong = _card(net, architecture={"type": "cellpose-cpnet", "widths": list(HALF_WIDTHS), "nchan": 2, "nout": 3})
    with pytest.raises(WeightsMismatchError, match="widths"):
        load_model(saved.weights_path, card=wrong)
    with pytest.raises(WeightsMismatchError, match="widths"):
        save_model(net, wrong, tmp_path, "n")


def test_a_file_without_card_gets_a_minimal_one(tmp_path):
    net = _trained_looking()
    path = tmp_path / "user-model.safetensors"
    save_file(dict(net.state_dict()), str(path))
    loaded, card = load_model(path)
    assert card.name == "user-model" and card.widths == TINY and card.diameter == pytest.approx(17.25)


def test_export_refuses_widths_cellpose_cannot_load(tmp_path):
    with pytest.raises(CellposeCompatibilityError, match="full-width"):
        export_cellpose(build_network(HALF_WIDTHS), tmp_path / "half")


def test_import_cellpose_file_infers_widths(tmp_path):
    half = _trained_looking(HALF_WIDTHS, diam_mean=17.0)
    torch.save(half.state_dict(), tmp_path / "half_model")
    imported = import_cellpose_file(tmp_path / "half_model")
    assert network_widths(imported) == HALF_WIDTHS and float(imported.diam_mean) == 17.0
    assert all(torch.equal(a, b) for a, b in zip(half.state_dict().values(), imported.state_dict().values()))
    torch.save({"W2": torch.zeros(1), **half.state_dict()}, tmp_path / "cp4")
    with pytest.raises(CellposeCompatibilityError, match="Cellpose 4"):
        import_cellpose_file(tmp_path / "cp4")
    (tmp_path / "junk").write_bytes(b"not a model")
    with pytest.raises(WeightsError, match="not a Cellpose 3 weights file"):
        import_cellpose_file(tmp_path / "junk")


_CELLPOSE_CHECK = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from cellpose import models  # imported after CELLPOSE_LOCAL_MODELS_PATH was set by the parent
model = models.CellposeModel(gpu=False, pretrained_model=sys.argv[1], mkldnn=False)
x = torch.from_numpy(np.load(sys.argv[2]))
model.net.eval()
with torch.no_grad():
    y, style = model.net(x)[:2]
np.save(sys.argv[3], y.numpy()); np.save(sys.argv[4], style.numpy())
print(float(model.diam_mean), float(model.diam_labels))
"""


@pytest.mark.slow
def test_exported_file_loads_in_cellpose_with_identical_outputs(tmp_path):
    net = _trained_looking(FULL_WIDTHS, diam_mean=30.0)
    path = export_cellpose(net, tmp_path / "cellfuse_export")
    x = np.random.default_rng(0).random((1, 2, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = {
        **os.environ,
        "CELLPOSE_LOCAL_MODELS_PATH": str(tmp_path / "cellpose_models"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _CELLPOSE_CHECK,
            str(path),
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
            str(tmp_path / "s.npy"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    diam_mean, diam_labels = map(float, done.stdout.split()[-2:])
    assert diam_mean == 30.0 and diam_labels == pytest.approx(17.25)
    with torch.no_grad():
        y, style = net.eval()(torch.from_numpy(x))[:2]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), y.numpy())
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), style.numpy())
    # And back: a Cellpose file imports into CellFuse unchanged.
    back = import_cellpose_file(path)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), back.state_dict().values()))


def test_shipped_base_loads_verified_and_is_documented():
    from app.science.pretrain import v3_split_ids
    from app.science.size_model import SizeModel

    weights = REPO_ROOT / "models_zoo" / "weights" / "cellfuse-base-w16-v3.safetensors"
    net, card = load_model(weights)  # sha256 checked against models_zoo/cards/cellfuse-base-w16-v3.json
    assert network_widths(net) == HALF_WIDTHS and card.architecture["widths"] == list(HALF_WIDTHS)
    # v3 continued v2 on 317 DSB2018 images (+ shrunken copies) and synthetic reporter fields.
    assert card.weights_sha256 and card.object == "nuclei" and card.parent == "cellfuse-base-w16:v2"
    assert card.metrics["heldout_dsb2018"]["f1"] > 0.8 and card.metrics["heldout_dsb2018"]["n_images"] == 48
    assert card.metrics["heldout_synthetic_plate"]["f1"] > 0.5
    tables = [table["rows"] for key, table in card.metrics.items() if key.startswith("zero_shot")]
    pairs = {(r["rescale"], r["diameter"]) for rows in tables for r in rows}
    assert {(1.0, "true"), (1.0, "default")} <= pairs and any(mode == "estimated" for _, mode in pairs)
    test_ids, val_ids = v3_split_ids()
    assert card.training["test_images"] == test_ids and card.training["val_images"] == val_ids
    assert len(test_ids) == 48 and not set(test_ids) & set(val_ids)
    # Every base carries its size model (Cellpose 3's style regression), for the net's style width.
    size_model = SizeModel.from_dict(card.size_model)
    assert size_model.style_dim == HALF_WIDTHS[-1] and size_model.n_train > 100
    assert "BBBC038" in card.attribution
    assert weights.stat().st_size < 8 * 2**20
    assert all(t.dtype in (torch.float32, torch.int64) for t in net.state_dict().values())
    assert (REPO_ROOT / "models_zoo" / "BASE_MODEL.md").is_file()
    # One base file in the repository (keep it small).
    assert len(list((REPO_ROOT / "models_zoo" / "weights").glob("*.safetensors"))) == 1
