"""`macrl-convert onnx`: model.onnx and model.pt2 with a dynamic batch (and height and width where the model computes
its positions for any grid), each checked against eager with onnxruntime and `torch.export.load`."""

import importlib.util
import json

import pytest
import torch

from macrl import MACRLImageProcessor, MACRLModel
from macrl.convert import main

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")),
    reason="onnx, onnxscript and onnxruntime are not installed (pip install macrl[test])",
)


@pytest.fixture
def encoder_folder(tmp_path, tiny_config):
    torch.manual_seed(0)
    config = tiny_config()
    MACRLModel(config).save_pretrained(tmp_path / "encoder")
    MACRLImageProcessor.from_model_config(config).save_pretrained(tmp_path / "encoder")
    return tmp_path / "encoder"


def _onnx_session(path):
    import onnx
    import onnxruntime

    inputs = onnx.load(str(path)).graph.input
    dims = [dim.dim_param or dim.dim_value for dim in inputs[0].type.tensor_type.shape.dim]
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]), dims


def _assert_runs_like_eager(folder, encoder, sizes, interpolate: bool):
    session, _ = _onnx_session(folder / "model.onnx")
    program = torch.export.load(folder / "model.pt2").module()
    for batch, height, width in sizes:
        pixels = torch.randn(batch, 1, height, width, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = encoder(pixels, interpolate_pos_encoding=interpolate)
            tokens, pooled = program(pixels)
        torch.testing.assert_close(tokens, expected.last_hidden_state)
        torch.testing.assert_close(pooled, expected.pooler_output)
        tokens, pooled = session.run(None, {"pixel_values": pixels.numpy()})
        torch.testing.assert_close(torch.from_numpy(tokens), expected.last_hidden_state, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(pooled), expected.pooler_output, rtol=1e-4, atol=1e-5)


def test_onnx_and_pt2_with_a_dynamic_batch(encoder_folder, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["onnx", str(encoder_folder), str(out), "--fixed-size"]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["model.onnx", "model.pt2", "preprocessor_config.json"]
    err = capsys.readouterr().err
    for name in ("model.onnx", "model.pt2"):  # the largest difference of each file is printed
        assert f"{out / name}: largest difference from eager" in err
        assert f"{name} at batch 3, 28x28: last_hidden_state: allclose (max |diff|" in err
    _, dims = _onnx_session(out / "model.onnx")
    assert isinstance(dims[0], str) and dims[1:] == [1, 28, 28]  # a named (dynamic) batch, the model's size
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"height": 28, "width": 28}
    _assert_runs_like_eager(out, MACRLModel.from_pretrained(encoder_folder).eval(), [(1, 28, 28), (5, 28, 28)], False)


def test_onnx_and_pt2_with_a_dynamic_height_and_width(encoder_folder, tmp_path, capsys):
    out = tmp_path / "onnx"
    code = main(["onnx", str(encoder_folder), str(out)])
    err = capsys.readouterr().err
    assert code == 0, err.strip().splitlines()[-1]
    assert "model.onnx at batch 3, 32x36: last_hidden_state: allclose" in err  # checked at a second, non-square size
    _, dims = _onnx_session(out / "model.onnx")
    assert all(isinstance(dim, str) for dim in (dims[0], dims[2], dims[3])) and dims[1] == 1
    sizes = [(1, 28, 28), (2, 16, 40), (3, 56, 28)]
    _assert_runs_like_eager(out, MACRLModel.from_pretrained(encoder_folder).eval(), sizes, True)


def test_bad_source_is_one_line(tmp_path, capsys):
    assert main(["onnx", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"macrl-convert onnx: error: {tmp_path / 'nowhere'}: model folder not found"
    )
    assert not (tmp_path / "out").exists()
    assert main(["onnx", str(tmp_path), str(tmp_path / "out"), "--push-to-hub", "me/x"]) == 2  # no Hub push of ONNX
    assert "unrecognized arguments: --push-to-hub" in capsys.readouterr().err


@pytest.mark.slow  # a second export: what a failed check leaves behind
def test_a_failed_check_writes_nothing(encoder_folder, tmp_path, capsys):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an older export")
    assert main(["onnx", str(encoder_folder), str(out), "--fixed-size", "--atol", "0", "--rtol", "0"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("macrl-convert onnx: error: model.onnx at batch 2, 28x28: last_hidden_state: max |a - b|")
    assert [path.name for path in out.iterdir()] == ["model.onnx"] and (out / "model.onnx").read_bytes() == (
        b"an older export"
    )
