"""Mask R-CNN builder, module losses (box-only targets, non-finite loss), schedule and overlays."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from cellrcnn.data.masks import masks_to_boxes_xyxy
from cellrcnn.models.maskrcnn import NativeResolutionTransform, build_maskrcnn
from cellrcnn.modules import MaskRCNNModule
from cellrcnn.modules.base import OPTIM_DEFAULTS, lr_factor
from cellrcnn.viz import FN_COLOR, FP_COLOR, TP_COLOR, overlay_tp_fp_fn

TINY = {"backbone": "resnet18", "preset": "cell", "returned_layers": [1, 2, 3], "fpn_channels": 32,
        "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 32,
        "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100, "box_detections_per_img": 50}


def disks(n: int = 3, size: int = 64, channels: int = 3, seed: int = 0):
    """An image with n bright disks of radius 6 and its Target (known boxes and masks)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = []
    for _ in range(n):
        cy, cx = rng.integers(10, size - 10, 2)
        masks.append(((yy - cy) ** 2 + (xx - cx) ** 2 < 36).astype(np.uint8))
    masks = np.stack(masks) if masks else np.zeros((0, size, size), np.uint8)
    image = torch.from_numpy(masks.max(0, initial=0).astype(np.float32))[None].repeat(channels, 1, 1)
    target = {"boxes": torch.from_numpy(masks_to_boxes_xyxy(masks)).float(), "labels": torch.ones(n, dtype=torch.int64),
              "masks": torch.from_numpy(masks), "has_mask": torch.ones(n, dtype=torch.bool), "image_id": seed}
    return image, target


@pytest.mark.parametrize("backbone,preset", [("resnet18", "cell"), ("resnet34", "cell"), ("resnet50", "default")])
def test_build_parts_for_nuclei(backbone, preset):
    model = build_maskrcnn(backbone=backbone, preset=preset)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # GroupNorm throughout
    assert any(isinstance(m, nn.GroupNorm) for m in model.backbone.fpn.modules())
    assert all(p.requires_grad for p in model.parameters())  # no frozen stages
    assert model.roi_heads.detections_per_img >= 1000  # the stock 100 truncates crowded fields
    assert [s[0] for s in model.rpn.anchor_generator.sizes] == [8, 16, 32, 64, 128]
    assert model.backbone.out_channels == (256 if preset == "default" else 96)


def test_channels_last_mask_predictor_equals_torchvision():
    """Same parameter names (old checkpoints load) and the same logits as MaskRCNNPredictor,
    forward and backward."""
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    from cellrcnn.models.maskrcnn import ChannelsLastMaskPredictor

    torch.manual_seed(0)
    plain, fast = MaskRCNNPredictor(16, 8, 2), ChannelsLastMaskPredictor(16, 8, 2)
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(5, 16, 14, 14, requires_grad=True)
    a, b = plain(x), fast(x)
    assert b.shape == (5, 2, 28, 28) and b.is_contiguous()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    grad_a = torch.autograd.grad(a.square().sum(), x)[0]
    grad_b = torch.autograd.grad(b.square().sum(), x)[0]
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-5)


def test_channels_last_backbone_loads_and_predicts_like_the_default_layout():
    """The backbone runs channels-last; a state dict saved from default-layout weights loads into
    it (older checkpoints) and gives the same detections."""
    torch.manual_seed(0)
    fast = build_maskrcnn(in_channels=1, **TINY).eval()
    conv = fast.backbone.body.layer1[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    plain = build_maskrcnn(in_channels=1, **TINY).eval()
    plain.backbone.to(memory_format=torch.contiguous_format)
    plain.load_state_dict({k: v.contiguous() for k, v in fast.state_dict().items()})
    fast.load_state_dict(plain.state_dict())
    assert fast.backbone.body.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    fast.roi_heads.score_thresh = plain.roi_heads.score_thresh = 0.0
    image, _ = disks(4, 96, channels=1)
    with torch.no_grad():
        a, b = plain([image])[0], fast([image])[0]
    assert len(a["scores"]) > 0 and a["boxes"].shape == b["boxes"].shape
    torch.testing.assert_close(b["scores"], a["scores"], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(b["boxes"], a["boxes"], rtol=1e-3, atol=1e-2)


def test_native_resolution_and_one_channel():
    model = build_maskrcnn(in_channels=1, **TINY).eval()
    assert isinstance(model.transform, NativeResolutionTransform)
    assert model.backbone.body.conv1.in_channels == 1
    images, _ = model.transform([torch.rand(1, 96, 80), torch.rand(1, 50, 70)])
    assert images.image_sizes == [(96, 80), (50, 70)]  # not rescaled (torchvision would scale to 800)
    assert images.tensors.shape[-2:] == (96, 96)  # padded to a multiple of 32


def test_resize_when_min_size_given():
    model = build_maskrcnn(min_size=128, max_size=512, **TINY).eval()
    images, _ = model.transform([torch.rand(3, 64, 64)])
    assert images.image_sizes == [(128, 128)]


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="resnet101"):
        build_maskrcnn(backbone="resnet101")


def test_losses_and_predict_instances_contract():
    torch.manual_seed(0)
    module = MaskRCNNModule(net=TINY, score_threshold=0.0)
    image, target = disks()
    losses = module.compute_losses([image], [target])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    module.eval()
    (pred,) = module.predict_instances([image[:, :60, :50]])
    n = len(pred["scores"])
    assert pred["masks"].dtype == torch.uint8 and pred["masks"].shape == (n, 60, 50)
    assert pred["boxes"].dtype == torch.float32 and pred["boxes"].shape == (n, 4)
    assert pred["labels"].dtype == torch.int64 and pred["scores"].dtype == torch.float32
    assert set(pred["masks"].unique().tolist()) <= {0, 1}


def _mask_grads(module):
    heads = module.net.roi_heads
    return [p.grad for p in (*heads.mask_head.parameters(), *heads.mask_predictor.parameters())]


def test_box_only_targets_do_not_train_the_mask_head():
    torch.manual_seed(0)
    module = MaskRCNNModule(net=TINY)
    image, target = disks()
    box_only = {**target, "masks": torch.zeros_like(target["masks"]), "has_mask": torch.zeros(3, dtype=torch.bool)}
    losses = module.compute_losses([image], [box_only])
    assert losses["loss_mask"].item() == 0.0
    sum(losses.values()).backward()
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in _mask_grads(module))
    assert torch.count_nonzero(module.net.roi_heads.box_predictor.cls_score.weight.grad) > 0
    assert module.net.roi_heads.mask_roi_pool is not None  # mask branch restored for inference

    # a batch mixing both kinds: the mask loss equals that of the masked image alone, halved
    module.zero_grad()
    torch.manual_seed(1)
    mixed = module.compute_losses([image, image], [target, box_only])["loss_mask"]
    torch.manual_seed(1)
    alone = module.compute_losses([image], [target])["loss_mask"]
    assert mixed.item() == pytest.approx(alone.item() / 2, rel=1e-5)


def test_non_finite_loss_stops_with_named_components():
    module = MaskRCNNModule(net=TINY)
    image, target = disks()
    image[:] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite training loss.*loss_classifier=nan"):
        module.training_step(([image], [target]), 0)


def test_lr_schedule_known_values():
    cfg = {**OPTIM_DEFAULTS, "warmup_steps": 10, "warmup_start_factor": 0.0, "min_lr_ratio": 0.0}
    assert lr_factor(0, 110, cfg) == 0.0
    assert lr_factor(5, 110, cfg) == pytest.approx(0.5)
    assert lr_factor(10, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.5)  # cosine half-way
    assert lr_factor(110, 110, cfg) == pytest.approx(0.0, abs=1e-12)
    step = {**cfg, "schedule": "step", "milestones": (0.5, 0.9), "gamma": 0.1}
    assert [lr_factor(s, 100, step) for s in (20, 50, 95)] == pytest.approx([1.0, 0.1, 0.01])
    assert lr_factor(10**6, 100, {**cfg, "schedule": "constant"}) == 1.0
    with pytest.raises(ValueError, match="linear"):
        lr_factor(50, 100, {**cfg, "schedule": "linear"})
    assert math.isfinite(lr_factor(50, 10, cfg))  # past the end: stays at the floor
    # a wall-time budget alone (no step count): the elapsed share of it decides
    assert lr_factor(10**6, math.inf, cfg) == 1.0
    assert lr_factor(10**6, math.inf, cfg, time_fraction=0.5) == pytest.approx(0.5)
    assert lr_factor(5, math.inf, cfg, time_fraction=0.5) == pytest.approx(0.5)  # warm-up first


def test_tp_fp_fn_colours():
    gt = np.zeros((20, 30), np.int64)
    gt[2:8, 2:8] = 1  # found
    gt[12:18, 2:8] = 2  # missed
    pred = np.zeros_like(gt)
    pred[2:8, 2:8] = 1  # true positive
    pred[2:8, 20:26] = 2  # false positive
    rgb = overlay_tp_fp_fn(np.zeros((1, 20, 30), np.float32), gt, pred)
    assert tuple(rgb[2, 4]) == TP_COLOR and tuple(rgb[2, 22]) == FP_COLOR and tuple(rgb[12, 4]) == FN_COLOR
    assert tuple(rgb[15, 5]) == (0, 0, 0)  # a missed object is outlined, not filled
    assert tuple(rgb[10, 15]) == (0, 0, 0)  # background untouched


def _disk_masks(size, specs):
    yy, xx = np.mgrid[: size[0], : size[1]]
    return torch.from_numpy(np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r for cy, cx, r in specs]).astype(np.uint8))


def test_paste_masks_inverts_the_mask_heads_training_targets():
    """Annotated masks cut into 28×28 targets as torchvision trains the mask head, then pasted
    back: nearly lossless for nuclei of every size, and closer than torchvision's own paste."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes

    from cellrcnn.data.masks import masks_to_boxes_xyxy
    from cellrcnn.models.maskrcnn import paste_masks

    size = (64, 96)
    masks = _disk_masks(size, [(10.3, 12.6, 3.2), (30.5, 40.2, 6.1), (32, 75, 15.4), (58, 5, 8)])  # the last cut by the frame
    boxes = torch.as_tensor(masks_to_boxes_xyxy(masks.numpy()), dtype=torch.float32)
    targets = project_masks_on_boxes(masks, boxes, torch.arange(len(masks)), 28)[:, None]

    def iou(a, b):
        a, b = a.bool(), b.bool()
        return ((a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1)).numpy()

    ours = iou(paste_masks(targets, boxes, size, 0.4), masks)
    theirs = iou(paste_masks_in_image(targets, boxes, size)[:, 0] > 0.4, masks)
    assert ours.min() > 0.97, ours
    assert ours[0] > theirs[0] + 0.1 and (ours >= theirs - 0.005).all(), (ours, theirs)


def test_paste_masks_edges():
    from cellrcnn.models.maskrcnn import paste_masks

    ones = torch.ones(3, 1, 28, 28)
    size = (48, 64)
    boxes = torch.tensor([[10.0, 12, 20, 30], [-8, 40, 6, 60], [20.5, 20.5, 21.2, 21.4]])
    # a full mask over a box: the pixels at its edge coordinates sample half a cell of mask and
    # half of the zero padding (0.5), the ones inside it 1
    for threshold, expected in ((0.5, (13, 29, 11, 19)), (0.4, (12, 30, 10, 20))):
        ys, xs = np.nonzero(paste_masks(ones[:1], boxes[:1], size, threshold)[0].numpy())
        assert (ys.min(), ys.max(), xs.min(), xs.max()) == expected
    masks = paste_masks(ones, boxes, size, 0.4)
    assert masks.dtype == torch.uint8 and masks.shape == (3, *size)
    ys, xs = np.nonzero(masks[1].numpy())  # partly outside the frame: clipped to it
    assert xs.min() == 0 and xs.max() == 6 and ys.max() == 47
    assert masks[2].sum() > 0  # a sub-pixel box keeps its pixel
    # a box entirely outside the frame gives an empty mask; no detections, no masks
    assert paste_masks(ones[:1], torch.tensor([[70.0, 70, 90, 90]]), size).sum() == 0
    assert paste_masks(ones[:0], torch.zeros(0, 4), size).shape == (0, *size)


def test_predict_instances_equals_torchvision_forward():
    """``predict_instances`` (detect + per-box paste) gives torchvision's own forward's detections
    (its masks are pasted differently: see test_paste_masks_inverts_the_mask_heads_training_targets)."""
    torch.manual_seed(0)
    module = MaskRCNNModule(net=TINY, score_threshold=0.0)
    module.precision = "float32"  # as torchvision's forward
    image, _ = disks()
    module.eval()
    with torch.no_grad():
        reference = module.net([image])[0]
    pred = module.predict_instances([image])[0]
    assert len(pred["scores"]) == len(reference["scores"]) > 0
    assert torch.allclose(pred["boxes"], reference["boxes"])
    assert torch.equal(pred["labels"], reference["labels"]) and torch.allclose(pred["scores"], reference["scores"])
    assert pred["masks"].shape == reference["masks"][:, 0].shape and pred["masks"].dtype == torch.uint8


def test_paste_label_image_equals_painted_masks():
    from cellrcnn.data.masks import masks_to_label_image
    from cellrcnn.models.maskrcnn import paste_label_image, paste_masks

    gen = torch.Generator().manual_seed(1)
    probs = torch.rand(4, 1, 28, 28, generator=gen)
    boxes = torch.tensor([[10.0, 12, 40, 30], [20, 15, 45, 35], [0, 0, 15, 9], [30, 20, 50, 40]])  # overlapping
    scores = torch.tensor([0.9, 0.95, 0.5, 0.7])
    labels = paste_label_image(probs, boxes, scores, (48, 64), 0.5)
    expected = masks_to_label_image(paste_masks(probs, boxes, (48, 64), 0.5).numpy(), scores.numpy())
    assert np.array_equal(labels, expected)
    # a stricter score threshold: the same image with the weaker labels removed
    keep = scores >= 0.8
    strict = masks_to_label_image(paste_masks(probs[keep], boxes[keep], (48, 64), 0.5).numpy(), scores[keep].numpy())
    kept = np.concatenate([[False], keep.numpy()])
    relabel = np.concatenate([[0], np.cumsum(keep.numpy()) * keep.numpy()])  # old label -> new label
    assert np.array_equal(relabel[labels * kept[labels]], strict)


def test_anchor_scales_per_octave():
    from cellrcnn.models.maskrcnn import build_maskrcnn

    one = build_maskrcnn(**TINY)
    three = build_maskrcnn(**{**TINY, "anchor_scales": 3})
    assert one.rpn.anchor_generator.sizes[0] == (8.0,)
    assert three.rpn.anchor_generator.sizes[:2] == ((8.0, 10.1, 12.7), (16.0, 20.2, 25.4))
    assert three.rpn.head.cls_logits.out_channels == 3 * one.rpn.head.cls_logits.out_channels == 9
    with pytest.raises(ValueError, match="anchor_scales"):
        build_maskrcnn(**{**TINY, "anchor_scales": 0})


def test_bf16_runs_the_backbone_only():
    """``detect(bf16=True)``: the backbone and pyramid under bfloat16 autocast, the RPN and RoI
    heads on float32 features."""
    from cellrcnn.models.maskrcnn import build_maskrcnn, detect

    net = build_maskrcnn(**TINY).eval()
    seen = {}
    net.backbone.body.layer1.register_forward_hook(lambda m, i, o: seen.__setitem__("backbone", o.dtype))
    net.rpn.head.register_forward_hook(lambda m, i, o: seen.__setitem__("rpn", i[0][0].dtype))
    net.roi_heads.mask_head.register_forward_hook(lambda m, i, o: seen.__setitem__("mask_head", o.dtype))
    image, _ = disks()
    detect(net, [image], bf16=True)
    assert seen["backbone"] == torch.bfloat16 and seen["rpn"] == torch.float32
    assert seen.get("mask_head", torch.float32) == torch.float32
    detect(net, [image], bf16=False)
    assert seen["backbone"] == torch.float32
