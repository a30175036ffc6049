"""The checks of transformers' common model tests (`ModelTesterMixin`, 5.x), written out for every MACRL class:
initialisation of every tensor and buffer (fresh, on missing keys, on the meta device), the float32 modules of a
half-precision load, frozen parameters across save/load, output capture (tuples, counts, attention backends),
gradient checkpointing, training, save/load round trips.

(transformers' own `tests/` are not in its wheel, so the checks are written here, on real Fashion-MNIST images; where
one is transformers' test almost line for line, its docstring names it.)
"""

import copy
import inspect
import re

import pytest
import torch
from safetensors import safe_open
from accelerate import init_empty_weights
from transformers import AttentionInterface, AutoModel, AutoModelForPreTraining
from transformers.initialization import no_init_weights
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from macrl import MACRLBackbone, MACRLForImageClassification, MACRLForPreTraining, MACRLModel
from macrl.modeling_macrl import sincos_position_embedding

CLASSES = [MACRLModel, MACRLForPreTraining, MACRLForImageClassification, MACRLBackbone]
ids = [cls.__name__ for cls in CLASSES]
NUM_VISIBLE = int(49 * (1 - 0.75))  # tiny config: 7x7 patches, mask ratio 0.75


@pytest.fixture
def config(tiny_config):
    return tiny_config(num_labels=10, out_indices=[1, 2], queue_size=8)


def _inputs(cls, pixels):
    """The forward arguments of `cls` for `pixels`; the pre-training model gets fixed masking noise."""
    if cls is MACRLForPreTraining:
        noise = torch.rand(pixels.shape[0], 49, generator=torch.Generator().manual_seed(0))
        return {"pixel_values": pixels, "noise": noise}
    return {"pixel_values": pixels}


MAIN_OUTPUT = {
    MACRLModel: "last_hidden_state",
    MACRLForPreTraining: "logits",
    MACRLForImageClassification: "logits",
    MACRLBackbone: "feature_maps",
}


def _assert_initialised(model, config):
    """Every parameter and buffer holds an initialised value: finite, no value above 1e4, MAE's init where it is
    deterministic (fixed positions, zero biases, unit LayerNorms) and inside the xavier bound for the patch
    projection (PyTorch's default conv init has a non-zero bias, uninitialised memory anything)."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all() and tensor.abs().max() <= 1e4, name
    grid = config.image_size // config.patch_size
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            weight = module.weight.reshape(module.weight.shape[0], -1)  # [D, C*p*p]
            bound = (6 / (weight.shape[0] + weight.shape[1])) ** 0.5
            assert weight.abs().max() <= bound and weight.std() > bound / 4, name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm1d)) and module.weight is not None:
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        if isinstance(module, torch.nn.BatchNorm1d):
            assert torch.equal(module.running_mean, torch.zeros_like(module.running_mean)), name
            assert torch.equal(module.running_var, torch.ones_like(module.running_var)), name
        if isinstance(module, MACRLForPreTraining) and config.queue_size:
            torch.testing.assert_close(module.queue.norm(dim=1), torch.ones(config.queue_size))
        if isinstance(module, MACRLModel):
            torch.testing.assert_close(module.pos_embed, sincos_position_embedding(grid, config.hidden_size))
            assert 0.5 * config.initializer_range < module.cls_token.std() < 2 * config.initializer_range, name


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_fresh_model_initialises_every_tensor(cls, config):
    torch.manual_seed(0)
    _assert_initialised(cls(config), config)


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_missing_keys_are_initialised(cls, config):
    """`from_pretrained` of an empty checkpoint: every tensor is a missing key, made on the meta device and then
    initialised by `_init_weights` at its leaf."""
    torch.manual_seed(0)
    model = cls.from_pretrained(None, config=config, state_dict={})
    _assert_initialised(model, config)
    if cls is MACRLForPreTraining:
        for main, momentum in model._branch_pairs():
            assert all(torch.equal(a, b) for a, b in zip(main.state_dict().values(), momentum.state_dict().values()))


def test_classifier_init_follows_initializer_range(tiny_config):
    stds = []
    for initializer_range in (0.2, 0.02):
        torch.manual_seed(0)
        classifier = MACRLForImageClassification(tiny_config(num_labels=10, initializer_range=initializer_range))
        stds.append(classifier.classifier.weight.std().item())
        assert torch.equal(classifier.classifier.bias, torch.zeros(10))
    assert stds[0] == pytest.approx(0.2, rel=0.2) and stds[1] == pytest.approx(0.02, rel=0.2)


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_builds_on_the_meta_device(cls, config):
    """Big-model loading (`device_map`, empty-weight init) builds the model on the meta device first."""
    with torch.device("meta"):
        model = cls(config)
    assert {tensor.device.type for tensor in model.state_dict().values()} == {"meta"}
    with init_empty_weights():
        assert {param.device.type for param in cls(config).parameters()} == {"meta"}


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_init_weights_can_init_buffers(cls, config):
    """transformers' `test_init_weights_can_init_buffers`: a model built on the meta device, moved to the CPU and
    initialised (`init_weights`, what `device_map` / big-model loading does) has exactly the buffers of a model whose
    `__init__` ran without initialisation: the fixed sin-cos positions, the MoCo queue and its pointer, BatchNorm
    statistics."""
    with no_init_weights():
        from_init = cls(copy.deepcopy(config))
    with torch.device("meta"):
        from_meta = cls(copy.deepcopy(config))
    from_meta.to_empty(device="cpu")
    from_meta.init_weights()
    buffers, meta_buffers = dict(from_init.named_buffers()), dict(from_meta.named_buffers())
    assert sorted(buffers) == sorted(meta_buffers)
    assert [name for name, buffer in buffers.items() if not torch.equal(buffer, meta_buffers[name])] == []
    if cls is MACRLForPreTraining:
        assert {"macrl.pos_embed", "decoder.decoder_pos_embed", "queue", "queue_ptr"} <= buffers.keys()


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_all_tensors_are_parameter_or_buffer(cls, config, fashion_images):
    """transformers' `test_all_tensors_are_parameter_or_buffer`: built on the meta device, moved and initialised, the
    model runs (no tensor was left behind as a plain attribute on the meta device)."""
    with torch.device("meta"):
        model = cls(copy.deepcopy(config)).eval()
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        model(**_inputs(cls, fashion_images[0][:2]))


def _matches(names, parameter: str) -> bool:
    """transformers' test of a `_keep_in_fp32_modules*` entry against a parameter name."""
    return any(re.search(rf"(?:^|\.){name}(?:\.|$)", parameter) for name in names)


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_keep_in_fp32_modules_exist(cls, config):
    """transformers' `test_keep_in_fp32_modules_exist`: every name in `_keep_in_fp32_modules_strict` is a module (or
    parameter) of the model; a regular expression there is not."""
    model = cls(copy.deepcopy(config))
    names = model._keep_in_fp32_modules_strict
    assert names and not model._keep_in_fp32_modules
    state_dict_names = model.state_dict().keys()
    assert [name for name in names if not any(_matches([name], key) for key in state_dict_names)] == []


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_keep_in_fp32_modules(cls, config, tmp_path, fashion_images):
    """transformers' `test_keep_in_fp32_modules`: loaded in float16 or bfloat16, exactly the parameters the strict
    list names are float32 (the encoder's final norm; in the pre-training model the decoder's too), every other one
    has the dtype asked for, and the model runs."""
    torch.manual_seed(0)
    cls(copy.deepcopy(config)).save_pretrained(tmp_path)
    for dtype in (torch.float16, torch.bfloat16):
        model = cls.from_pretrained(tmp_path, dtype=dtype)
        names = model._keep_in_fp32_modules_strict
        float32 = set()
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            assert tensor.dtype == (torch.float32 if _matches(names, name) else dtype), name
            if tensor.dtype == torch.float32:
                float32.add(name.removeprefix("macrl."))
        expected = {"norm.weight", "norm.bias"}
        if cls is MACRLForPreTraining:
            expected |= {"momentum_encoder.norm.weight", "momentum_encoder.norm.bias"}
            expected |= {"decoder.decoder_norm.weight", "decoder.decoder_norm.bias"}
        assert float32 == expected
        inputs = {k: v.to(dtype) for k, v in _inputs(cls, fashion_images[0][:2]).items()}
        with torch.no_grad():
            model.eval()(**inputs)


def test_loads_with_a_device_map(tmp_path, config):
    torch.manual_seed(0)
    model = MACRLForPreTraining(config)
    model.save_pretrained(tmp_path)
    loaded = MACRLForPreTraining.from_pretrained(tmp_path, device_map="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert _trainable(loaded) == _trainable(model)


def _trainable(model):
    return {name for name, param in model.named_parameters() if param.requires_grad}


def test_frozen_stays_frozen_after_save_and_load(tmp_path, tiny_config, fashion_images):
    torch.manual_seed(0)
    model = MACRLForPreTraining(tiny_config())
    model.save_pretrained(tmp_path)
    loaded = MACRLForPreTraining.from_pretrained(tmp_path)
    assert _trainable(loaded) == _trainable(model) and _trainable(model)
    assert _trainable(AutoModelForPreTraining.from_pretrained(tmp_path)) == _trainable(model)
    assert not any(name.startswith("momentum_") for name in _trainable(loaded))
    assert sum(p.numel() for p in loaded.parameters() if p.requires_grad) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    # the fixed positions are buffers (never trainable) and still in the weights file, under timm's names
    assert {"macrl.pos_embed", "decoder.decoder_pos_embed"} <= dict(loaded.named_buffers()).keys()
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        assert {"macrl.pos_embed", "decoder.decoder_pos_embed", "momentum_encoder.pos_embed"} <= set(weights.keys())
    # a training step after the load moves the main branch only
    optimizer = torch.optim.SGD([p for p in loaded.parameters() if p.requires_grad], lr=0.1)
    momentum_before = [t.clone() for t in loaded.momentum_encoder.state_dict().values()]
    loaded.train()(fashion_images[0][:8]).loss.backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(momentum_before, loaded.momentum_encoder.state_dict().values()))


def test_warm_start_from_an_encoder_folder(tmp_path, tiny_config):
    """`MACRLForPreTraining.from_pretrained(<encoder folder>)`: the encoder's weights in the main branch, a momentum
    branch equal to the main one and frozen, the decoder and heads initialised."""
    config = tiny_config()
    torch.manual_seed(0)
    encoder = MACRLModel(config)
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(torch.randn_like(param) * 0.1)  # not what a fresh init would give
    encoder.save_pretrained(tmp_path)
    model, info = MACRLForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not [key for key in info["missing_keys"] if key.startswith("macrl.")]
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(model.macrl.state_dict()[name], tensor), name
    for main, momentum in model._branch_pairs():
        for (name, a), b in zip(main.state_dict().items(), momentum.state_dict().values()):
            assert torch.equal(a, b), name
    assert _trainable(model) == _trainable(MACRLForPreTraining(config))
    _assert_initialised(model.decoder, config)


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_save_and_load_give_the_same_outputs(cls, config, tmp_path, fashion_images):
    torch.manual_seed(0)
    model = cls(config).eval()
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    inputs = _inputs(cls, fashion_images[0][:4])
    with torch.no_grad():
        expected, actual = model(**inputs).to_tuple(), loaded(**inputs).to_tuple()
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual):
        for x, y in zip(a, b) if isinstance(a, tuple) else [(a, b)]:
            assert torch.equal(x, y)


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_hidden_states_and_attentions(cls, config, fashion_images):
    """`output_hidden_states`: num_hidden_layers + 1 states; `output_attentions`: one `[batch, heads, tokens, tokens]`
    softmax per block, also under the default sdpa (that call is computed eagerly) and with the config's flags."""
    model = cls(config).eval()
    assert model.config._attn_implementation == "sdpa"
    inputs = _inputs(cls, fashion_images[0][:3])
    tokens = 1 + (NUM_VISIBLE if cls is MACRLForPreTraining else 49)
    with torch.no_grad():
        plain = model(**inputs)
        output = model(**inputs, output_hidden_states=True, output_attentions=True)
    assert plain.hidden_states is None and plain.attentions is None
    assert len(output.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (3, tokens, config.hidden_size) for h in output.hidden_states)
    assert len(output.attentions) == config.num_hidden_layers
    for attention in output.attentions:
        assert attention.shape == (3, config.num_attention_heads, tokens, tokens)
        torch.testing.assert_close(attention.sum(-1), torch.ones(3, config.num_attention_heads, tokens))
    key = MAIN_OUTPUT[cls]
    torch.testing.assert_close(output[key], plain[key], rtol=1e-5, atol=1e-5)

    flagged_config = config.__class__.from_dict(config.to_dict())
    flagged_config.output_hidden_states = flagged_config.output_attentions = True  # transformers picks eager then
    flagged = cls(flagged_config)
    assert flagged.config._attn_implementation == "eager"
    with torch.no_grad():
        output = flagged.eval()(**inputs)
    assert len(output.hidden_states) == config.num_hidden_layers + 1
    assert len(output.attentions) == config.num_hidden_layers


def test_recorded_hidden_states_are_the_blocks_inputs_and_outputs(config, fashion_images):
    """What `_can_record_outputs` records: the first block's input (the embeddings), then every block's output
    before the final norm; in the pre-training model the main encoder's on the strong view only (not the decoder's
    blocks, the momentum encoder's or a symmetric loss's second pass), whatever the config's flags."""
    pixels = fashion_images[0][:3]
    model = MACRLModel(config).eval()
    with torch.no_grad():
        output = model(pixels, output_hidden_states=True)
        embeddings = model.patch_embed(pixels) + model.pos_embed[:, 1:]
    torch.testing.assert_close(output.hidden_states[0][:, 1:], embeddings)
    torch.testing.assert_close(model.norm(output.hidden_states[-1]), output.last_hidden_state)
    for block, before, after in zip(model.blocks, output.hidden_states, output.hidden_states[1:]):
        torch.testing.assert_close(block(before), after)

    symmetric = config.__class__.from_dict({**config.to_dict(), "symmetric_loss": True})
    symmetric.output_hidden_states = symmetric.output_attentions = True  # eager attention, records everywhere asked
    pretraining = MACRLForPreTraining(symmetric).eval()
    with torch.no_grad():
        output = pretraining(**_inputs(MACRLForPreTraining, pixels))
    assert len(output.hidden_states) == config.num_hidden_layers + 1
    assert len(output.attentions) == config.num_hidden_layers
    assert {h.shape[1] for h in output.hidden_states} == {1 + NUM_VISIBLE}


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_forward_takes_transformers_kwargs(cls):
    """`**kwargs: Unpack[TransformersKwargs]`, where transformers' tests look for `output_attentions` (their
    `_can_output_attn`), and no hand-threaded flags in the signature."""
    parameters = inspect.signature(cls.forward).parameters
    assert not {"output_hidden_states", "output_attentions", "return_dict"} & parameters.keys()
    assert "output_attentions" in parameters["kwargs"].annotation.__args__[0].__annotations__


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_return_dict_false_gives_the_same_values_as_a_tuple(cls, config, fashion_images):
    model = cls(config).eval()
    inputs = _inputs(cls, fashion_images[0][:2])
    tuple_config = copy.deepcopy(config)
    tuple_config.return_dict = False
    tuple_model = cls(tuple_config).eval()
    tuple_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        as_dict = model(**inputs, output_hidden_states=True)
        as_tuple = model(**inputs, output_hidden_states=True, return_dict=False)
        from_config = tuple_model(**inputs, output_hidden_states=True)
    for output in (as_tuple, from_config):
        assert type(output) is tuple and len(output) == len(as_dict.to_tuple())
        for a, b in zip(as_dict.to_tuple(), output):
            for x, y in zip(a, b) if isinstance(a, tuple) else [(a, b)]:
                assert torch.equal(x, y)


def _pair(cls, config, first: str, second: str):
    torch.manual_seed(0)
    # each its own copy of the config: `_from_config` sets the implementation on the config it is given
    a = cls._from_config(copy.deepcopy(config), attn_implementation=first).eval()
    b = cls._from_config(copy.deepcopy(config), attn_implementation=second).eval()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_eager_and_sdpa_agree(cls, config, fashion_images):
    eager, sdpa = _pair(cls, config, "eager", "sdpa")
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    inputs = _inputs(cls, fashion_images[0][:4])
    with torch.no_grad():
        a, b = eager(**inputs, output_hidden_states=True), sdpa(**inputs, output_hidden_states=True)
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    key = MAIN_OUTPUT[cls]
    for x, y in zip(a[key], b[key]) if cls is MACRLBackbone else [(a[key], b[key])]:
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_attn_implementation_picks_the_function_that_runs(tiny_config, fashion_images):
    """Every block calls the function registered under the model's `attn_implementation` (transformers'
    AttentionInterface), encoder and decoder alike, and `set_attn_implementation` switches it."""
    calls = []

    def counting_sdpa(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("macrl_counting_sdpa", counting_sdpa)
    config = tiny_config()
    model = MACRLForPreTraining._from_config(config, attn_implementation="macrl_counting_sdpa").eval()
    with torch.no_grad():
        model(fashion_images[0][:2])
    # main encoder, decoder and momentum encoder
    assert calls == ["MACRLAttention"] * (2 * config.num_hidden_layers + config.decoder_num_hidden_layers)
    calls.clear()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        model(fashion_images[0][:2])
    assert calls == [] and model.macrl.blocks[0].attn.config._attn_implementation == "sdpa"


@pytest.mark.slow  # flex attention on a CPU compiles a kernel first (minutes here)
@pytest.mark.parametrize("cls", [MACRLModel, MACRLForPreTraining], ids=["MACRLModel", "MACRLForPreTraining"])
def test_eager_and_flex_attention_agree(cls, config, fashion_images):
    eager, flex = _pair(cls, config, "eager", "flex_attention")
    inputs = _inputs(cls, fashion_images[0][:4])
    with torch.no_grad():  # torch's flex attention has no backward on a CPU
        a, b = eager(**inputs, output_hidden_states=True), flex(**inputs, output_hidden_states=True)
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(cls, config, fashion_images):
    pixels, labels = fashion_images
    torch.manual_seed(0)
    model = cls(config).train()
    buffers = {name: tensor.clone() for name, tensor in model.named_buffers()}  # the queue, BatchNorm statistics

    def loss_and_grads():
        model.zero_grad()
        model.load_state_dict(buffers, strict=False)  # both passes see the same negatives
        if cls is MACRLForImageClassification:
            loss = model(pixels[:4], labels=labels[:4]).loss
        elif cls is MACRLForPreTraining:
            loss = model(**_inputs(cls, pixels[:4])).loss
        else:
            output = model(pixels[:4])
            features = output.feature_maps if cls is MACRLBackbone else [output.pooler_output]
            loss = sum(t.square().mean() for t in features)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference_loss, reference_grads = loss_and_grads()
    model.gradient_checkpointing_enable()  # transformers >= 5.20 also calls it activation_checkpointing_enable
    assert model.is_gradient_checkpointing and all(block.gradient_checkpointing for block in model.get_submodule(
        "blocks" if cls in (MACRLModel, MACRLBackbone) else "macrl.blocks"))
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, reference_loss)
    assert grads.keys() == reference_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], msg=name)


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_training_backward_reaches_every_trainable_parameter(cls, config, fashion_images):
    pixels, labels = fashion_images
    model = cls(config).train()
    if cls is MACRLForImageClassification:
        loss = model(pixels[:8], labels=labels[:8]).loss
    elif cls is MACRLForPreTraining:
        loss = model(pixels[:8], pixels[8:16].flip(-1)).loss
    elif cls is MACRLBackbone:
        loss = sum(f.square().mean() for f in model(pixels[:8]).feature_maps)
    else:
        # the CLS token and the last norm reach a loss on every token; a pooled loss would leave patches out
        loss = model(pixels[:8]).last_hidden_state.square().mean()
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_built_from_the_config_alone(cls, config):
    """Modules get everything from the config: two models built after the same seed are equal, and Auto classes
    build them from a config."""
    torch.manual_seed(0)
    first = cls(config)
    torch.manual_seed(0)
    second = cls._from_config(config)
    assert first.state_dict().keys() == second.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert isinstance(first.get_input_embeddings(), torch.nn.Module)
    assert first.get_input_embeddings().proj.weight.shape == (config.hidden_size, config.num_channels, 4, 4)
    assert type(AutoModel.from_config(config)) is MACRLModel
