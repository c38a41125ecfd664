"""Mask R-CNN for small, dense nuclei, built from explicit torchvision parts.

Why not ``torchvision.models.detection.maskrcnn_resnet50_fpn()`` with its defaults: those are
tuned for COCO photographs and fail quietly on microscopy fields.

- Anchors of 32–512 px: a nucleus is 8–60 px across, so most objects match no anchor at the
  0.7 IoU the RPN asks for and are never proposed. Here anchors are 8–128 px.
- 100 detections per image: a crowded field holds hundreds of nuclei; the rest are dropped
  without a warning. Here ``box_detections_per_img`` is at least 1000.
- ``min_size=800``: a 256 px crop is upscaled ×3 (nine times the compute, objects the model
  never sees at that size at test time), and a 2048 px field is downscaled. Here images stay at
  native resolution (``min_size=None``), so a nucleus has the same size in pixels in training,
  validation and prediction; large fields are tiled by the predictor instead.
- ImageNet mean/std: our inputs are per-image percentile-normalised to about [0, 1].
- BatchNorm with batch sizes of 2–4 on a CPU is noisy and frozen BatchNorm needs pretrained
  statistics; GroupNorm trains from scratch at any batch size.

The *cell preset* (``preset="cell"``) keeps the same structure with narrower parts (FPN 96 ch,
a 256-d box head, a two-conv mask head) so training fits in minutes on a laptop CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

BACKBONES = {"resnet18": resnet.resnet18, "resnet34": resnet.resnet34, "resnet50": resnet.resnet50}

# Width presets: "default" is torchvision's Mask R-CNN head sizes, "cell" is the CPU-friendly one.
PRESETS: dict[str, dict] = {
    "default": dict(fpn_channels=256, box_representation=1024, box_conv_layers=0, mask_layers=(256,) * 4, mask_dim=256),
    "cell": dict(fpn_channels=96, box_representation=256, box_conv_layers=0, mask_layers=(96, 96), mask_dim=96),
}


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide ``channels`` (a module-level function so it pickles)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ChannelsLastMaskPredictor(MaskRCNNPredictor):
    """torchvision's mask predictor (2× transposed convolution, then 1×1 class logits) run in
    channels-last memory format. On a CPU, oneDNN's transposed convolution is several times faster
    that way than on the default layout, and this layer runs on every detection: in a crowded
    1-megapixel field it cost as much as the whole backbone. Same parameters, same outputs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # weights in the layout their gradients come in: DDP's gradient buckets follow the
        # parameters' strides, and a mismatch costs a copy per step and a warning in every log
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


class NativeResolutionTransform(GeneralizedRCNNTransform):
    """Normalise and batch images without resizing them (see the module docstring for why)."""

    def resize(self, image: torch.Tensor, target: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        return image, target


def _resnet_body(backbone: str, in_channels: int, norm: str, weights_path: str | None) -> nn.Module:
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
    norm_layer = group_norm if norm == "group" else nn.BatchNorm2d
    if norm not in ("group", "batch"):
        raise ValueError(f"norm must be 'group' or 'batch', got {norm!r}")
    # zero_init_residual: each residual block starts as the identity, which trains from scratch faster.
    body = BACKBONES[backbone](weights=None, norm_layer=norm_layer, zero_init_residual=weights_path is None)
    if weights_path is not None:
        state = torch.load(Path(weights_path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        missing, unexpected = body.load_state_dict(state, strict=False)
        if len(missing) > 2 or unexpected:  # fc.* may be absent from a feature-extractor checkpoint
            raise ValueError(f"{weights_path}: not a {backbone} state dict (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if in_channels != 3:
        old = body.conv1
        conv1 = nn.Conv2d(in_channels, old.out_channels, kernel_size=7, stride=2, padding=3, bias=False)
        with torch.no_grad():  # keep pretrained filters meaningful: sum over RGB for a grey input
            conv1.weight.copy_(old.weight.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels)
        body.conv1 = conv1
    return body


def build_maskrcnn(
    num_classes: int = 2,
    in_channels: int = 3,
    backbone: str = "resnet50",
    preset: str = "default",
    backbone_weights: str | None = None,
    norm: str = "group",
    returned_layers: Sequence[int] = (1, 2, 3, 4),
    fpn_channels: int | None = None,
    mask_channels: int | None = None,
    anchor_sizes: Sequence[int] = (8, 16, 32, 64, 128),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    anchor_scales: int = 1,
    min_size: int | None = None,
    max_size: int = 4096,
    image_mean: float = 0.5,
    image_std: float = 0.25,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_train: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_batch_size_per_image: int = 256,
    rpn_positive_fraction: float = 0.5,
    rpn_nms_thresh: float = 0.7,
    box_batch_size_per_image: int = 256,
    box_positive_fraction: float = 0.25,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 1000,
    roi_sampling_ratio: int = 2,
) -> MaskRCNN:
    """Build a Mask R-CNN for nuclei.

    Args:
        num_classes: classes including background (2 for a single "nucleus" class).
        in_channels: 1 (grey) or 3 (RGB) input channels; images are float C×H×W in about [0, 1].
        backbone: resnet18, resnet34 or resnet50, all layers trainable (no frozen stages).
        preset: "default" (torchvision widths) or "cell" (narrow FPN and heads, fast on a CPU).
        backbone_weights: a local ResNet state-dict file; ``None`` trains from scratch (nothing is
            downloaded, ever).
        norm: "group" (GroupNorm everywhere, default) or "batch" (BatchNorm in the ResNet only).
        returned_layers: ResNet stages feeding the FPN; (1, 2, 3) drops the stride-32 stage,
            which nuclei rarely need. One anchor size per FPN level plus the max-pool level.
        fpn_channels: override the preset's FPN width (also the RPN and RoI feature width).
        mask_channels: override the width of every mask-head conv: the mask head runs on every
            positive RoI at 14×14 and costs as much as the backbone at the preset's width.
        anchor_sizes: anchor side in pixels per FPN level (finest first).
        anchor_scales: anchor sizes per octave on each level: ``s * 2**(k / anchor_scales)``,
            k = 0..anchor_scales-1 (RetinaNet uses 3). With one, a nucleus between two levels'
            sizes or off the stride grid rarely finds an anchor the RPN counts as positive (IoU
            0.7): 10 % of the mixed training nuclei do, against 40 % with three
            (``bench/maskrcnn_limits.py``).
        min_size: ``None`` keeps native resolution; an int resizes like torchvision (shorter side).
        image_mean, image_std: per-channel normalisation of the [0, 1] input.
        rpn_*, box_*: the torchvision RPN and RoI-head parameters (proposal counts, sampling).
        roi_sampling_ratio: RoIAlign samples per bin side; its backward pass is a large share of a
            CPU training step, 1 is about twice as fast as 2.

    Returns:
        A ``torchvision.models.detection.MaskRCNN``; in eval mode it returns per image ``boxes``
        N×4 xyxy (pixels), ``labels`` N, ``scores`` N and ``masks`` N×1×H×W probabilities.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    widths = dict(PRESETS[preset])
    if fpn_channels is not None:
        widths["fpn_channels"] = fpn_channels
    if mask_channels is not None:
        widths["mask_layers"] = (mask_channels,) * len(widths["mask_layers"])
        widths["mask_dim"] = mask_channels
    out_ch = widths["fpn_channels"]
    head_norm = group_norm if norm == "group" else None

    body = _resnet_body(backbone, in_channels, norm, backbone_weights)
    stage_ch = [body.inplanes // 8 * 2**i for i in range(4)]  # inplanes is the last stage's width
    returned_layers = sorted(returned_layers)
    backbone_fpn = BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(i) for i, k in enumerate(returned_layers)},
        in_channels_list=[stage_ch[k - 1] for k in returned_layers],
        out_channels=out_ch,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=head_norm,
    )
    # Channels-last weights make every backbone and FPN activation channels-last: on a CPU,
    # oneDNN's convolutions are faster in that layout and PyTorch's max-pooling is several times
    # faster (the stem max-pool of a 1 MP field: 182 -> 39 ms on one core). Measured
    # on the trained cell preset: a 1 MP field 1429 -> 1072 ms (bench/speed.py); a training step on
    # 256² crops is unchanged. The RPN and RoI heads stay on the default layout, where they are
    # faster. Checkpoints are unaffected (same values).
    backbone_fpn.to(memory_format=torch.channels_last)
    n_levels = len(returned_layers) + 1  # + the max-pool level
    if anchor_scales < 1:
        raise ValueError(f"anchor_scales must be at least 1, got {anchor_scales}")
    if len(anchor_sizes) < n_levels:
        raise ValueError(f"{n_levels} FPN levels need {n_levels} anchor sizes, got {list(anchor_sizes)}")
    anchors = AnchorGenerator(
        sizes=tuple(tuple(round(float(s) * 2 ** (k / anchor_scales), 1) for k in range(anchor_scales))
                    for s in anchor_sizes[:n_levels]),
        aspect_ratios=(tuple(float(a) for a in aspect_ratios),) * n_levels,
    )
    rpn_head = RPNHead(out_ch, anchors.num_anchors_per_location()[0])

    feature_names = [str(i) for i in range(len(returned_layers))]
    box_roi_pool = MultiScaleRoIAlign(featmap_names=feature_names, output_size=7, sampling_ratio=roi_sampling_ratio)
    if widths["box_conv_layers"]:
        box_head = FastRCNNConvFCHead(
            (out_ch, 7, 7), [out_ch] * widths["box_conv_layers"], [widths["box_representation"]], norm_layer=head_norm
        )
    else:
        box_head = TwoMLPHead(out_ch * 7 * 7, widths["box_representation"])
    mask_roi_pool = MultiScaleRoIAlign(featmap_names=feature_names, output_size=14, sampling_ratio=roi_sampling_ratio)
    mask_head = MaskRCNNHeads(out_ch, list(widths["mask_layers"]), 1, norm_layer=head_norm)

    model = MaskRCNN(
        backbone_fpn,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_nms_thresh=rpn_nms_thresh,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        rpn_positive_fraction=rpn_positive_fraction,
        box_roi_pool=box_roi_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(widths["box_representation"], num_classes),
        box_score_thresh=box_score_thresh,
        box_nms_thresh=box_nms_thresh,
        box_detections_per_img=box_detections_per_img,
        box_batch_size_per_image=box_batch_size_per_image,
        box_positive_fraction=box_positive_fraction,
        mask_roi_pool=mask_roi_pool,
        mask_head=mask_head,
        mask_predictor=ChannelsLastMaskPredictor(widths["mask_layers"][-1], widths["mask_dim"], num_classes),
    )
    mean, std = [float(image_mean)] * in_channels, [float(image_std)] * in_channels
    if min_size is None:
        model.transform = NativeResolutionTransform(1, max_size, mean, std)
    else:
        model.transform = GeneralizedRCNNTransform(min_size, max_size, mean, std)
    return model


@torch.no_grad()
def detect(model: MaskRCNN, images: Sequence[torch.Tensor], bf16: bool = False) -> list[dict[str, torch.Tensor]]:
    """Run ``model`` (in eval mode) on ``images`` without pasting masks into the full frame.

    ``bf16``: the backbone and feature pyramid, most of the arithmetic, under bfloat16 autocast
    (on a CPU with AVX512-BF16/AMX about 3x faster there; see
    :func:`cellrcnn.models.precision.native_bf16`); the RPN and RoI heads always in float32.

    Returns per image ``boxes`` (in the input image's pixels), ``scores``, ``labels`` and
    ``mask_probs`` (N×1×M×M mask-head probabilities in box coordinates). torchvision's own
    forward pastes every mask into a float image of the full frame (N×H×W float32: 1.2 GB and
    most of the inference time for 300 nuclei on a 1024² field); :func:`paste_masks` does it per box.
    """
    from torchvision.models.detection.transform import resize_boxes

    original_sizes = [tuple(im.shape[-2:]) for im in images]
    batch, _ = model.transform(list(images))
    with torch.autocast(batch.tensors.device.type, dtype=torch.bfloat16, enabled=bf16):
        features = model.backbone(batch.tensors)
    if bf16:  # the heads take float32 features
        features = type(features)((name, f.float()) for name, f in features.items())
    proposals, _ = model.rpn(batch, features)
    detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
    for det, size, original in zip(detections, batch.image_sizes, original_sizes, strict=True):
        det["boxes"] = resize_boxes(det["boxes"], size, original)
        det["mask_probs"] = det.pop("masks", None)
    return detections


def _box_masks(mask_probs: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], threshold: float):
    """Yield ``(index, (y0, y1, x0, x1), crop)`` per detection: its binary mask inside its box
    (and the half mask cell around it) clipped to the frame.

    The mask head learns targets cut from each annotated mask by ``roi_align(aligned=False)``
    over the box (torchvision's ``project_masks_on_boxes``): its cell ``i`` of ``M`` holds the
    image at ``x0 + (i + 0.5) * w / M``, pixel ``x`` sitting at coordinate ``x``. Pasting
    samples the probabilities bilinearly at exactly those coordinates, the inverse of how the
    targets were made. torchvision's ``paste_masks_in_image`` instead rounds each box to whole
    pixels and stretches a padded mask over it: a round trip of the annotated masks of DSB2018's
    held-out images through a 28×28 grid then keeps a mean IoU of 0.78 for nuclei under 12 px
    and 0.91 for 12–24 px, against 0.998 and 0.999 here (``bench/maskrcnn_limits.py``).
    """
    from torch.nn import functional as F

    if len(mask_probs) == 0:
        return
    height, width = size
    m = mask_probs.shape[-1]
    for i, (prob, (x0, y0, x1, y1)) in enumerate(zip(mask_probs, boxes.tolist(), strict=True)):
        bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)  # as roi_align(aligned=False) clamps a box
        # pixels whose sample point lies within a cell of the grid (beyond it the zero padding wins)
        cx0, cx1 = max(math.floor(x0 - bw / m), 0), min(math.ceil(x1 + bw / m) + 1, width)
        cy0, cy1 = max(math.floor(y0 - bh / m), 0), min(math.ceil(y1 + bh / m) + 1, height)
        if cx1 <= cx0 or cy1 <= cy0:
            continue  # box entirely outside the image
        gx = (torch.arange(cx0, cx1, dtype=torch.float32) - x0) * (2.0 / bw) - 1.0  # grid_sample's [-1, 1]
        gy = (torch.arange(cy0, cy1, dtype=torch.float32) - y0) * (2.0 / bh) - 1.0
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
        crop = F.grid_sample(prob[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        yield i, (cy0, cy1, cx0, cx1), crop[0, 0] > threshold


def paste_masks(
    mask_probs: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], threshold: float = 0.5
) -> torch.Tensor:
    """Binary N×H×W uint8 masks from N×1×M×M box-relative probabilities, sampled where the mask
    head's training targets were (see :func:`_box_masks`) and written only around each box (no N
    full-frame float images, unlike torchvision's ``paste_masks_in_image``)."""
    out = torch.zeros((len(mask_probs), *size), dtype=torch.uint8)
    for i, (y0, y1, x0, x1), crop in _box_masks(mask_probs, boxes, size, threshold):
        out[i, y0:y1, x0:x1] = crop.to(torch.uint8).cpu()
    return out


def paste_label_image(
    mask_probs: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor, size: tuple[int, int], threshold: float = 0.5
) -> np.ndarray:
    """H×W int32 label image (detection ``i`` is label ``i + 1``) where overlaps go to the higher
    score: ``masks_to_label_image(paste_masks(...), scores)`` without the N×H×W masks.

    Every pixel holds its highest-scoring detection, so the label image of any stricter score
    threshold ``t`` is this one with the labels scoring below ``t`` set to 0."""
    labels = np.zeros(size, dtype=np.int32)
    order = np.argsort(scores.cpu().numpy(), kind="stable")  # paint low to high: the best ends on top
    masks = {i: (box, crop) for i, box, crop in _box_masks(mask_probs, boxes, size, threshold)}
    for i in order:
        if int(i) in masks:
            (y0, y1, x0, x1), crop = masks[int(i)]
            labels[y0:y1, x0:x1][crop.cpu().numpy()] = i + 1
    return labels
