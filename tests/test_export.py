"""Compiled and exported MACRL models: `torch.compile(fullgraph=True)`, `torch.export` for the three model classes and
with dynamic batch, height and width, and ONNX (the dynamo exporter, run with onnxruntime), each equal to the eager
model; and the eager-only NaN check."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from macrl import MACRLBackbone, MACRLForImageClassification, MACRLForPreTraining, MACRLModel

HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))


def _model_and_inputs(cls, tiny_config, pixels):
    torch.manual_seed(0)
    model = cls(tiny_config(num_labels=10)).eval()
    kwargs = {"noise": torch.rand(pixels.shape[0], 49, generator=torch.Generator().manual_seed(0))}
    return model, (kwargs if cls is MACRLForPreTraining else {})


def _assert_same_outputs(actual, expected):
    expected = {key: value for key, value in expected.items() if value is not None}
    assert list(actual.keys()) == list(expected.keys())
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_compile_fullgraph_has_no_graph_break(tiny_config, fashion_images):
    """fullgraph=True raises on any graph break, such as a check that reads the values of `pixel_values`. The eager
    backend traces the same graph as inductor without generating code (the inductor run is the slow test below)."""
    pixels = fashion_images[0][:4]
    model, _ = _model_and_inputs(MACRLModel, tiny_config, pixels)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        _assert_same_outputs(compiled(pixels, output_hidden_states=True), model(pixels, output_hidden_states=True))


@pytest.mark.slow  # inductor code generation takes minutes on two CPU cores
def test_compile_fullgraph_with_inductor(tiny_config, fashion_images):
    pixels = fashion_images[0][:4]
    model, _ = _model_and_inputs(MACRLModel, tiny_config, pixels)
    with torch.no_grad():
        _assert_same_outputs(torch.compile(model, fullgraph=True)(pixels), model(pixels))


@pytest.mark.parametrize("cls", [MACRLModel, MACRLForImageClassification, MACRLForPreTraining])
def test_torch_export_equals_eager(cls, tiny_config, fashion_images):
    pixels = fashion_images[0][:4]
    model, kwargs = _model_and_inputs(cls, tiny_config, pixels)
    program = torch.export.export(model, (pixels,), kwargs=kwargs)
    with torch.no_grad():
        _assert_same_outputs(program.module()(pixels, **kwargs), model(pixels, **kwargs))


def _export_any_size(model, pixels):
    """`torch.export` with a dynamic batch, height and width (multiples of the patch size: `4 * grid`)."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    grid_height = torch.export.Dim("grid_height", min=2, max=256)
    grid_width = torch.export.Dim("grid_width", min=2, max=256)
    patch = model.config.patch_size
    return torch.export.export(
        model,
        (pixels,),
        kwargs={"interpolate_pos_encoding": True},
        dynamic_shapes={
            "pixel_values": {0: batch, 2: patch * grid_height, 3: patch * grid_width},
            "interpolate_pos_encoding": None,
        },
    )


def _sized(pixels, height, width):
    return F.interpolate(pixels, size=(height, width), mode="bilinear")


# (the backbone's export takes as long again; it runs with the slow tests)
@pytest.mark.parametrize(
    "cls", [MACRLModel, pytest.param(MACRLBackbone, marks=pytest.mark.slow)], ids=["MACRLModel", "MACRLBackbone"]
)
def test_exported_model_takes_any_batch_height_and_width(cls, tiny_config, fashion_images):
    """One program for every batch size and image size: the positions are computed for the grid of the input
    (fixed sin-cos), so the exported model equals the eager one at the traced size, at another batch and square size,
    and on non-square images; with registers."""
    pixels = fashion_images[0]
    torch.manual_seed(0)
    model = cls(tiny_config(num_register_tokens=2, out_indices=[1, 2])).eval()
    program = _export_any_size(model, pixels[:2])
    for batch in (pixels[:1], _sized(pixels[:7], 36, 36), _sized(pixels[:3], 16, 44)):
        with torch.no_grad():
            actual = program.module()(batch, interpolate_pos_encoding=True)
            expected = model(batch, interpolate_pos_encoding=True)
        if cls is MACRLBackbone:
            grid = (batch.shape[2] // 4, batch.shape[3] // 4)
            assert [tuple(f.shape[2:]) for f in actual.feature_maps] == [grid, grid]
            actual, expected = dict(enumerate(actual.feature_maps)), dict(enumerate(expected.feature_maps))
        _assert_same_outputs(actual, expected)


def test_value_check_is_eager_only(tiny_config, fashion_images):
    """NaN pixels raise a ValueError in eager mode on the CPU; an exported program has no value check in it."""
    model, _ = _model_and_inputs(MACRLModel, tiny_config, fashion_images[0])
    nan = torch.full((2, 1, 28, 28), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        model(nan)
    program = torch.export.export(model, (fashion_images[0][:2],))
    assert torch.isnan(program.module()(nan).pooler_output).all()
    with pytest.raises(ValueError, match="has 3 channels"):  # shape checks stay in compiled code
        torch.compile(model, backend="eager")(torch.zeros(2, 3, 28, 28))


@pytest.mark.skipif(not HAS_ONNX, reason="onnx, onnxscript and onnxruntime are not installed (pip install macrl[test])")
def test_onnx_export_equals_eager(tiny_config, fashion_images, tmp_path):
    import onnxruntime

    pixels = fashion_images[0][:4]
    model, _ = _model_and_inputs(MACRLModel, tiny_config, pixels)
    path = tmp_path / "macrl.onnx"
    torch.onnx.export(
        model,
        (pixels,),
        path,
        dynamo=True,
        input_names=["pixel_values"],
        output_names=["last_hidden_state", "pooler_output"],
        dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1, max=1024)}},
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (pixels, fashion_images[0][4:11]):
        tokens, pooled = session.run(None, {"pixel_values": batch.numpy()})
        with torch.no_grad():
            expected = model(batch)
        torch.testing.assert_close(torch.from_numpy(tokens), expected.last_hidden_state, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(pooled), expected.pooler_output, rtol=1e-4, atol=1e-5)
