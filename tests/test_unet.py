"""U-Net shapes, padding and channel handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellrcnn.models.unet import UNet
from cellrcnn.modules.unet_module import UNetModule, encode_batch


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(37, 53), (64, 64), (5, 70)])
def test_output_shapes_for_odd_sizes(channels, size):
    torch.manual_seed(0)
    net = UNet(in_channels=channels, depth=3, base_width=8).eval()
    with torch.no_grad():
        out = net(torch.rand(2, channels, *size))
    assert out["logits"].shape == (2, 3, *size)
    assert out["distance"].shape == (2, 1, *size)
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["distance"]).all()


def test_output_does_not_depend_on_batch_mates():
    """GroupNorm normalises per sample: validation batches of one give training-time outputs."""
    torch.manual_seed(0)
    net = UNet(in_channels=1, depth=2, base_width=8).eval()
    x = torch.rand(1, 1, 30, 30)
    with torch.no_grad():
        single = net(x)["logits"]
        batch = net(torch.cat([x, torch.rand(1, 1, 30, 30)]))["logits"][:1]
    torch.testing.assert_close(single, batch)


def test_width_depth_and_errors():
    net = UNet(in_channels=3, depth=2, base_width=4, norm_groups=8)
    assert net.size_multiple == 4
    assert net.encoders[-1][0].out_channels == 16
    with pytest.raises(ValueError, match="in_channels must be 1 or 3"):
        UNet(in_channels=2)
    with pytest.raises(ValueError, match=r"B×3×H×W"):
        net(torch.rand(1, 1, 8, 8))


def test_channels_last_weights_give_default_layout_outputs():
    """The U-Net keeps its weights channels-last; a default-layout copy of the same weights (an
    older checkpoint) loads into it, keeps the fast layout, and gives the same outputs."""
    torch.manual_seed(0)
    fast = UNet(in_channels=1, depth=2, base_width=8).eval()
    weight = fast.encoders[1][0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    plain = UNet(in_channels=1, depth=2, base_width=8).eval().to(memory_format=torch.contiguous_format)
    plain.load_state_dict({k: v.contiguous() for k, v in fast.state_dict().items()})
    fast.load_state_dict(plain.state_dict())
    assert fast.encoders[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 1, 37, 45)
    with torch.no_grad():
        a, b = plain(x), fast(x)
    for key in ("logits", "distance"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)


def test_gradients_reach_the_first_layer():
    net = UNet(in_channels=3, depth=2, base_width=4)
    out = net(torch.rand(2, 3, 17, 19))
    (out["logits"].mean() + out["distance"].mean()).backward()
    assert net.encoders[0][0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- the LightningModule


def touching_squares_sample(channels: int = 3):
    """A 32×40 image with two touching bright squares and their Target."""
    from cellrcnn.data.masks import masks_to_boxes_xyxy
    from cellrcnn.data.target import make_target

    masks = np.zeros((2, 32, 40), np.uint8)
    masks[0, 8:22, 4:18] = 1
    masks[1, 10:24, 18:32] = 1
    image = np.repeat((0.1 + 0.8 * masks[0] + 0.6 * masks[1])[None], channels, 0).astype(np.float32)
    target = make_target(masks_to_boxes_xyxy(masks), np.ones(2), masks, np.ones(2, bool), image_id=1)
    return torch.from_numpy(image), target


def small_module(**kw) -> UNetModule:
    net = {"in_channels": 3, "depth": 2, "base_width": 8}
    return UNetModule(net=net, coco_metrics=False, log_images=0, **kw)


def test_training_overfits_one_image_and_then_separates_its_two_squares():
    torch.manual_seed(0)
    module = small_module()
    image, target = touching_squares_sample()
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    history = []
    for _ in range(50):
        losses = module.compute_losses([image], [target])
        assert set(losses) == {"loss_class", "loss_dice", "loss_distance"}
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[10] < 0.8 * history[0] and history[-1] < 0.1 * history[0]
    pred = module.predict_instances([image])[0]
    assert len(pred["scores"]) == 2
    gt = target["masks"].bool()
    for m in pred["masks"].bool():
        ious = (gt & m).sum((1, 2)) / (gt | m).sum((1, 2))
        assert ious.max() > 0.8


def test_box_only_images_are_ignored_and_channels_matched():
    module = small_module()
    image, target = touching_squares_sample(channels=1)  # 1-channel image into a 3-channel net
    target["has_mask"][:] = False
    losses = module.compute_losses([image], [target])
    assert all(v.item() == 0.0 for v in losses.values())
    x, classes, _ = encode_batch([image, image[:, :20, :30]], [target, target], channels=3)
    assert x.shape == (2, 3, 32, 40) and (classes == -100).all()


def test_predict_instances_contract():
    module = small_module(postprocess={"min_size": 1})
    images = [torch.rand(3, 37, 45), torch.rand(1, 20, 21)]
    preds = module.predict_instances(images)
    assert module.training  # restored
    for image, pred in zip(images, preds, strict=True):
        n = len(pred["scores"])
        assert pred["masks"].dtype == torch.uint8 and pred["masks"].shape == (n, *image.shape[-2:])
        assert pred["boxes"].dtype == torch.float32 and pred["boxes"].shape == (n, 4)
        assert pred["scores"].dtype == torch.float32 and pred["labels"].dtype == torch.int64


def test_fast_dev_run_and_checkpoint_round_trip(tmp_path):
    import lightning as L

    from cellrcnn.data.datamodule import collate
    from cellrcnn.modules.base import load_module

    torch.manual_seed(0)
    module = small_module()
    data = [touching_squares_sample()] * 2
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=collate)
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, loader, loader)
    assert "val/dsb_score" in trainer.callback_metrics
    assert "train/loss_class" in trainer.callback_metrics
    trainer.save_checkpoint(tmp_path / "unet.ckpt")
    rebuilt = load_module(tmp_path / "unet.ckpt")
    assert isinstance(rebuilt, UNetModule) and rebuilt.net.depth == 2
    image = data[0][0]
    torch.testing.assert_close(rebuilt(image[None])["logits"], module.eval()(image[None])["logits"])


def test_hydra_experiment_builds_the_unet():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from cellrcnn.config import CONF_DIR as conf

    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfg = compose("train", overrides=["experiment=synthetic_unet"])
    assert cfg.name == "synthetic_unet" and cfg.data.synthetic is not None
    module = instantiate(cfg.model)
    assert isinstance(module, UNetModule)
    assert module.net.in_channels == cfg.data.channels and module.net.encoders[0][0].out_channels == 16
    assert module.hparams["postprocess"]["seed_method"] == "hmaxima"


def test_flip_tta_averages_the_flipped_outputs():
    torch.manual_seed(0)
    module = UNetModule(net={"in_channels": 1, "base_width": 8, "depth": 2}).eval()
    module.precision = "float32"  # exact arithmetic, to compare with the flips computed here
    image = torch.rand(1, 24, 40)
    probs, dist = module.predict_maps(image, tta=True)
    expected_p, expected_d = 0.0, 0.0
    with torch.no_grad():
        for dims in ([], [-1], [-2], [-2, -1]):
            out = module.net(torch.flip(image[None], dims))
            expected_p = expected_p + torch.flip(out["logits"].softmax(1), dims)[0]
            expected_d = expected_d + torch.flip(out["distance"].sigmoid(), dims)[0, 0]
    assert np.allclose(probs, expected_p.numpy() / 4, atol=1e-6)
    assert np.allclose(dist, expected_d.numpy() / 4, atol=1e-6)
    plain, _ = module.predict_maps(image)
    assert not np.allclose(plain, probs)  # a random net is not flip-invariant: the average differs
    assert UNetModule(net={"in_channels": 1, "base_width": 8, "depth": 2}, tta=True).hparams["tta"] is True


def test_views_in_threads_equal_views_one_after_the_other(monkeypatch):
    """On a CPU with two or more threads the flipped views run in parallel threads; the maps are
    those of the sequential loop, in float32 and bfloat16 alike."""
    from cellrcnn.models import unet

    torch.manual_seed(0)
    net = UNetModule(net={"in_channels": 1, "base_width": 8, "depth": 2}).net.eval()
    image = torch.rand(1, 40, 56)
    threads = torch.get_num_threads()
    parallel = {}
    try:
        torch.set_num_threads(2)
        assert unet._views_in_parallel(image, 4)
        for bf16 in (False, True):
            parallel[bf16] = unet.predict_maps(net, image, flips=4, bf16=bf16)
            with monkeypatch.context() as m:
                m.setattr(unet, "_views_in_parallel", lambda x, flips: False)
                sequential = unet.predict_maps(net, image, flips=4, bf16=bf16)
            for a, b in zip(parallel[bf16], sequential, strict=True):  # up to summation order
                np.testing.assert_allclose(a, b, atol=1e-5 if not bf16 else 1e-3)
        torch.set_num_threads(1)  # threads=1: one core, the views one after the other
        assert not unet._views_in_parallel(image, 4)
    finally:
        torch.set_num_threads(threads)
    assert np.abs(parallel[True][0] - parallel[False][0]).max() > 1e-4  # the threads ran in bfloat16
    assert not unet._views_in_parallel(image, 1)


def test_a_forked_process_predicts_with_views_in_threads():
    """A process forked after the parent ran its view threads (data loader workers, converters)
    starts its own instead of waiting on the parent's, which do not exist in the child."""
    import multiprocessing

    from cellrcnn.models import unet

    torch.manual_seed(0)
    net = UNetModule(net={"in_channels": 1, "base_width": 8, "depth": 2}).net.eval()
    image = torch.rand(1, 32, 32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = unet.predict_maps(net, image, flips=4)[0]  # the parent's view threads exist now
        with multiprocessing.get_context("fork").Pool(1) as pool:
            got = pool.apply_async(unet.predict_maps, (net, image, 4)).get(timeout=60)[0]
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bfloat16_inference_stays_close_to_float32():
    """bfloat16 autocast changes the arithmetic of the convolutions only: the probabilities it
    gives stay within a few hundredths of float32's (its accuracy on real images is measured by
    bench/predict_speed.py)."""
    torch.manual_seed(0)
    module = UNetModule(net={"in_channels": 1, "base_width": 8, "depth": 2}).eval()
    image = torch.rand(1, 40, 56)
    module.precision = "float32"
    exact, exact_d = module.predict_maps(image, tta=True)
    module.precision = "bfloat16"
    fast, fast_d = module.predict_maps(image, tta=True)
    assert fast.dtype == np.float32 and fast.shape == exact.shape
    assert np.abs(fast - exact).max() < 0.05 and np.abs(fast_d - exact_d).max() < 0.05
    assert not np.array_equal(fast, exact)  # it did run in bfloat16
    with pytest.raises(ValueError, match="precision"):
        module.precision = "half"
        module.predict_maps(image)


def test_tta_takes_a_number_of_views():
    """tta=2 averages the image and its half-turn; True is all four views, False one."""
    from cellrcnn.models.unet import flip_count

    torch.manual_seed(0)
    module = UNetModule(net={"in_channels": 1, "base_width": 8, "depth": 2}).eval()
    module.precision = "float32"
    image = torch.rand(1, 24, 40)
    probs, _ = module.predict_maps(image, tta=2)
    with torch.no_grad():
        a = module.net(image[None])["logits"].softmax(1)[0]
        b = torch.flip(module.net(torch.flip(image[None], [-2, -1]))["logits"].softmax(1)[0], [-2, -1])
    np.testing.assert_allclose(probs, ((a + b) / 2).numpy(), atol=1e-6)
    assert [flip_count(v) for v in (True, False, 1, 2, 4)] == [4, 1, 1, 2, 4]
    with pytest.raises(ValueError, match="number of views"):
        flip_count(5)
