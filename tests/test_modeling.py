"""The MACRL model: shapes, masking, losses, gradients, the momentum branch and the MAE / MoCo v3 reductions."""

import math

import pytest
import torch
import torch.nn.functional as F

from macrl import MACRLForImageClassification, MACRLForPreTraining, MACRLModel
from macrl.modeling_macrl import pool_tokens


def test_encoder_shapes_and_pooling(tiny_config, fashion_images):
    pixels, _ = fashion_images
    for pooling in ("cls", "mean"):
        model = MACRLModel(tiny_config(pooling=pooling)).eval()
        out = model(pixels[:4], output_hidden_states=True)
        assert out.last_hidden_state.shape == (4, 1 + 49, 32)
        assert out.pooler_output.shape == (4, 32)
        assert len(out.hidden_states) == 1 + 2
        expected = out.last_hidden_state[:, 0] if pooling == "cls" else out.last_hidden_state[:, 1:].mean(1)
        torch.testing.assert_close(out.pooler_output, expected)


def test_pool_tokens_names_an_unknown_pooling():
    tokens = torch.arange(24.0).reshape(1, 3, 8)  # [N, 1 + L, D]
    torch.testing.assert_close(pool_tokens(tokens, "mean"), tokens[:, 1:].mean(1))
    with pytest.raises(ValueError, match="pooling must be 'cls' or 'mean', got 'max'"):
        pool_tokens(tokens, "max")


def test_encoder_is_deterministic_and_unmasked(tiny_config, fashion_images):
    pixels, _ = fashion_images
    model = MACRLModel(tiny_config()).eval()
    first, second = model(pixels[:4]), model(pixels[:4])
    assert torch.equal(first.pooler_output, second.pooler_output)
    assert first.last_hidden_state.shape[1] == 1 + 49  # every patch is encoded


def test_interpolate_pos_encoding_accepts_other_sizes(tiny_config, fashion_images):
    pixels, _ = fashion_images
    model = MACRLModel(tiny_config()).eval()
    big = F.interpolate(pixels[:2], size=(36, 36), mode="bilinear")
    out = model(big, interpolate_pos_encoding=True)
    assert out.last_hidden_state.shape == (2, 1 + 81, 32)
    with pytest.raises(ValueError, match="36x36 does not match the model's 28x28"):
        model(big)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(2, 3, 28, 28), "has 3 channels but the model expects 1"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "floating-point"),
        (torch.full((2, 1, 28, 28), float("nan")), "NaN"),
        (torch.zeros(1, 28, 28), r"must have shape \(batch_size, 1, 28, 28\), got \(1, 28, 28\)"),
    ],
)
def test_bad_pixel_values_are_named(tiny_config, bad, message):
    with pytest.raises(ValueError, match=message):
        MACRLModel(tiny_config())(bad)


def test_noise_makes_masking_deterministic_and_exact(tiny_config, fashion_images):
    pixels, _ = fashion_images
    model = MACRLForPreTraining(tiny_config(mask_ratio=0.75)).eval()
    noise = torch.rand(8, 49, generator=torch.Generator().manual_seed(0))
    first = model(pixels[:8], noise=noise)
    second = model(pixels[:8], noise=noise)
    assert torch.equal(first.mask, second.mask) and torch.equal(first.logits, second.logits)
    assert torch.equal(first.loss, second.loss)
    # exactly int(49 * 0.25) = 12 patches stay visible in each image: the 12 with the smallest noise
    assert first.mask.sum(1).tolist() == [49 - 12] * 8
    visible = first.mask == 0
    assert torch.equal(visible, noise <= noise.sort(dim=1).values[:, 11:12])
    assert first.logits.shape == (8, 49, 16)
    assert first.ids_restore.shape == (8, 49)
    other = model(pixels[:8], noise=torch.rand(8, 49))
    assert not torch.equal(first.mask, other.mask)


def test_patchify_roundtrip_and_layout(tiny_config, fashion_images):
    pixels, _ = fashion_images
    model = MACRLForPreTraining(tiny_config())
    patches = model.patchify(pixels[:2])
    assert patches.shape == (2, 49, 16)
    torch.testing.assert_close(patches[0, 1].reshape(4, 4), pixels[0, 0, :4, 4:8])  # second patch of the top row
    assert torch.equal(model.unpatchify(patches), pixels[:2])


def test_reconstruction_loss_is_l1_on_masked_patches(tiny_config, fashion_images):
    pixels, _ = fashion_images
    noise = torch.rand(4, 49)
    for loss_name, norm_pix in (("l1", False), ("l2", False), ("l1", True)):
        model = MACRLForPreTraining(
            tiny_config(contrastive_weight=0.0, reconstruction_loss=loss_name, norm_pix_loss=norm_pix)
        ).eval()
        out = model(pixels[:4], noise=noise)
        target = model.patchify(pixels[:4])
        if norm_pix:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        error = (out.logits - target).abs() if loss_name == "l1" else (out.logits - target) ** 2
        expected = (error.mean(-1) * out.mask).sum() / out.mask.sum()
        torch.testing.assert_close(out.reconstruction_loss, expected)
        torch.testing.assert_close(out.loss, expected)


def test_mae_reduction_runs_no_contrastive_part(tiny_config, fashion_images):
    pixels, _ = fashion_images
    model = MACRLForPreTraining(tiny_config(contrastive_weight=0.0)).train()
    calls = []
    for module in (model.projector, model.predictor, model.momentum_encoder, model.momentum_projector):
        module.register_forward_hook(lambda *args: calls.append(1))
    out = model(pixels[:8], pixels[:8].flip(-1))
    assert calls == []
    assert out.contrastive_loss.item() == 0.0
    out.loss.backward()
    assert all(p.grad is None for p in model.projector.parameters())
    assert model.macrl.blocks[0].attn.qkv.weight.grad is not None


def _moco_v3_reference(model, x1, x2, temperature):
    """MoCo v3's `forward` (moco/builder.py) written out: q = predictor(projector(encoder(x))), k from momentum."""

    def contrast(q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = q @ k.T / temperature
        return F.cross_entropy(logits, torch.arange(q.shape[0])) * 2 * temperature

    q1 = model.predictor(model.projector(model.macrl(x1).pooler_output))
    q2 = model.predictor(model.projector(model.macrl(x2).pooler_output))
    with torch.no_grad():
        k1 = model.momentum_projector(model.momentum_encoder(x1).pooler_output)
        k2 = model.momentum_projector(model.momentum_encoder(x2).pooler_output)
    return contrast(q1, k2) + contrast(q2, k1)


def test_moco_v3_reduction_matches_reference(tiny_config, fashion_images):
    pixels, _ = fashion_images
    config = tiny_config(reconstruction_weight=0.0, mask_ratio=0.0, symmetric_loss=True, temperature=0.2)
    model = MACRLForPreTraining(config).eval()  # eval: BatchNorm uses running stats, same in both computations
    x1, x2 = pixels[:8], pixels[8:16]
    decoder_calls = []
    model.decoder.register_forward_hook(lambda *args: decoder_calls.append(1))
    out = model(x1, x2)
    assert decoder_calls == []
    assert out.reconstruction_loss.item() == 0.0
    torch.testing.assert_close(out.loss, _moco_v3_reference(model, x1, x2, 0.2))


def test_info_nce_prefers_matching_pairs():
    from macrl.contrastive_loss import info_nce_loss

    q = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    assert info_nce_loss(q, q.clone(), 0.2) < info_nce_loss(q, q.roll(1, dims=0), 0.2)
    # a perfectly separated batch approaches 0; the loss is scaled by 2 tau as in MoCo v3
    assert info_nce_loss(torch.eye(8) * 10, torch.eye(8) * 10, 0.05) < 1e-3
    uniform = info_nce_loss(torch.ones(4, 8), torch.ones(4, 8), 0.5)
    torch.testing.assert_close(uniform, torch.tensor(math.log(4) * 2 * 0.5))


def test_gradients_reach_main_branch_only(tiny_config, fashion_images):
    pixels, _ = fashion_images
    model = MACRLForPreTraining(tiny_config()).train()
    out = model(pixels[:8], pixels[8:16])
    out.loss.backward()
    momentum_modules = (model.momentum_encoder, model.momentum_projector)
    for module in momentum_modules:
        for name, param in module.named_parameters():
            assert not param.requires_grad and param.grad is None, name
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(model.get_parameter(n).grad is not None for n in trained)
    assert not any(n.startswith("momentum_") for n in trained)
    # the fixed sin-cos positions are not trained
    assert not model.macrl.pos_embed.requires_grad and not model.decoder.decoder_pos_embed.requires_grad


def test_momentum_update_is_the_ema(tiny_config):
    """The momentum branch starts as a copy of the main branch; each update moves every parameter (frozen main ones
    too, as MoCo v3's frozen patch projection) by the cosine-scheduled EMA, keeps the buffers, and stands still at
    the end of the schedule."""
    model = MACRLForPreTraining(tiny_config(momentum=0.9))
    assert model.momentum_at(0.0) == pytest.approx(0.9)
    assert model.momentum_at(0.5) == pytest.approx(1 - 0.1 * (math.cos(math.pi * 0.5) + 1) / 2)
    assert model.momentum_at(1.0) == pytest.approx(1.0)
    for p_main, p_momentum in zip(model.macrl.parameters(), model.momentum_encoder.parameters()):
        assert torch.equal(p_main, p_momentum)
    model.macrl.patch_embed.requires_grad_(False)  # a frozen main parameter
    with torch.no_grad():
        for param in model.macrl.parameters():
            param.add_(1.0)
    before = {name: tensor.clone() for name, tensor in model.momentum_encoder.state_dict().items()}
    m = model.update_momentum_branch(0.0)
    assert m == pytest.approx(0.9)
    after = model.momentum_encoder.state_dict()
    for name, main in model.macrl.named_parameters():
        torch.testing.assert_close(after[name], m * before[name] + (1 - m) * main, msg=name)
    assert torch.equal(after["pos_embed"], model.macrl.pos_embed)  # a buffer: not averaged
    frozen = [p.clone() for p in model.momentum_projector.parameters()]
    model.update_momentum_branch(1.0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.momentum_projector.parameters()))


def test_loss_falls_over_twenty_steps(tiny_config, fashion_images):
    torch.manual_seed(0)
    pixels, _ = fashion_images
    model = MACRLForPreTraining(tiny_config()).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    noise = torch.rand(32, 49, generator=torch.Generator().manual_seed(1))
    weak = pixels[:32].flip(-1)
    losses = []
    for step in range(20):
        out = model(pixels[:32], weak, noise=noise)
        assert torch.isfinite(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.update_momentum_branch(step / 20)
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_queue_adds_negatives_and_rolls(tiny_config, fashion_images):
    pixels, _ = fashion_images
    model = MACRLForPreTraining(tiny_config(queue_size=12)).train()
    before = model.queue.clone()
    model(pixels[:8])
    assert model.queue_ptr.item() == 8
    assert not torch.equal(model.queue[:8], before[:8]) and torch.equal(model.queue[8:], before[8:])
    model(pixels[8:16])
    assert model.queue_ptr.item() == 4  # wrapped around
    torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(12))


def test_classifier_loss_and_shapes(tiny_config, fashion_images):
    pixels, labels = fashion_images
    model = MACRLForImageClassification(tiny_config(num_labels=10))
    out = model(pixels[:8], labels=labels[:8])
    assert out.logits.shape == (8, 10)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels[:8]))


def test_checkpoints_with_a_momentum_decoder_still_load(tiny_config, tmp_path):
    """Earlier versions built a momentum decoder that no loss read; their folders load, its weights left behind."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = MACRLForPreTraining(tiny_config())
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert not any(key.startswith("momentum_decoder.") for key in weights)
    weights.update({f"momentum_decoder.{k[len('decoder.'):]}": v.clone() for k, v in weights.items() if k.startswith("decoder.")})
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = MACRLForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert not hasattr(loaded, "momentum_decoder")


def _attention_ops(model, pixels, *, autocast: bool, backward: bool) -> set[str]:
    """The attention kernels one forward (and backward) of `model` runs on the CPU, by the profiler's op names."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.set_grad_enabled(backward):
            loss = model(pixels, pixels).loss
        if backward:
            loss.backward()
    return {event.key for event in prof.key_averages() if "attention" in event.key or event.key == "aten::bmm"}


def test_cpu_training_in_bf16_runs_attention_eagerly(tiny_config, fashion_images):
    """sdpa's CPU flash kernel has a slow half-precision backward (benchmarks/results/attention-cpu.md): a bf16
    training step on a CPU computes attention eagerly, while fp32 steps and no-grad forwards keep sdpa."""
    pixels = fashion_images[0][:8]
    model = MACRLForPreTraining(tiny_config(attn_implementation="sdpa")).train()
    assert model.config._attn_implementation == "sdpa"
    training_bf16 = _attention_ops(model, pixels, autocast=True, backward=True)
    assert "aten::bmm" in training_bf16
    assert not any("flash_attention_for_cpu_backward" in op for op in training_bf16)
    # the momentum branch's forward needs no gradient: sdpa's fast forward stays
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in training_bf16
    fp32_training = _attention_ops(model, pixels, autocast=False, backward=True)
    assert any("flash_attention_for_cpu_backward" in op for op in fp32_training)
    assert "aten::bmm" not in _attention_ops(model, pixels, autocast=True, backward=False)
