"""A plain U-Net whose outputs separate touching nuclei.

Output representation (why two heads):

- ``logits`` B×3×H×W: background / interior / boundary classes. The boundary class marks the
  one-pixel inner edge of every object, so two touching nuclei are divided by a two-pixel band of
  boundary (one from each side) and their interiors are disconnected. A 2-class foreground map
  cannot express that split; the 3-class map is the DSB 2018 / Caicedo et al. (2019) baseline.
- ``distance`` B×1×H×W (raw, pass through a sigmoid): the distance to the object edge divided
  by the object's own maximum, so it is 1 at every object's centre and falls to 0 at its edge,
  whatever the object's size. Seeds are taken where it is high, which keeps one seed per object
  even when a thin or blurry boundary prediction fails to cut two interiors apart, and the
  watershed floods down this map (see :mod:`cellrcnn.models.postprocess`).

Inputs of any H×W are padded (reflect) to a multiple of ``2**depth`` and the outputs are
cropped back, so validation on full images of odd sizes needs no care from the caller.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 3  # background, interior, boundary
BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2


def _groups(channels: int, max_groups: int) -> int:
    """Largest group count <= max_groups that divides ``channels`` (GroupNorm requires it)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class ConvBlock(nn.Sequential):
    """(3×3 conv -> GroupNorm -> ReLU) twice; GroupNorm because CPU batches are small (2-8)."""

    def __init__(self, in_ch: int, out_ch: int, norm_groups: int = 8) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(out_ch, norm_groups), out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(out_ch, norm_groups), out_ch),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net with a 3-class head and a normalised distance head.

    Args:
        in_channels: 1 (grayscale) or 3 (RGB / replicated grayscale).
        depth: number of 2× down-samplings; inputs are padded to a multiple of ``2**depth``.
        base_width: channels of the first level, doubled at every level below.
        norm_groups: GroupNorm groups (reduced to a divisor of the channel count).
        dropout: dropout probability at the bottleneck (0 disables it).
    """

    def __init__(
        self,
        in_channels: int = 3,
        depth: int = 4,
        base_width: int = 32,
        norm_groups: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.in_channels = in_channels
        self.depth = depth
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList([ConvBlock(in_channels, widths[0], norm_groups)])
        self.encoders.extend(ConvBlock(widths[i], widths[i + 1], norm_groups) for i in range(depth))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        # bilinear up-sampling + 1×1 conv instead of transposed convs: no checkerboard artefacts
        self.ups = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], 1) for i in reversed(range(depth)))
        self.decoders = nn.ModuleList(
            ConvBlock(2 * widths[i], widths[i], norm_groups) for i in reversed(range(depth))
        )
        self.class_head = nn.Conv2d(widths[0], NUM_CLASSES, 1)
        self.distance_head = nn.Conv2d(widths[0], 1, 1)
        # Channels-last weights make the activations channels-last: on a CPU oneDNN's convolutions
        # and PyTorch's max-pooling are faster in that layout (measured at width 16: a training
        # step 1.25x, a 1 MP prediction 1.5x). Loaded state dicts keep this layout.
        self.to(memory_format=torch.channels_last)

    @property
    def size_multiple(self) -> int:
        """Inputs are padded internally to a multiple of this many pixels."""
        return 2**self.depth

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        m = self.size_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph == 0 and pw == 0:
            return x, (h, w)
        # reflect keeps image statistics at the border; it needs the pad to be smaller than the side
        mode = "reflect" if ph < h and pw < w else "replicate"
        return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: B×C×H×W float (C = ``in_channels``), any H, W.

        Returns ``logits`` B×3×H×W (background, interior, boundary) and ``distance``
        B×1×H×W raw scores (sigmoid gives the normalised distance in [0, 1]).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects B×{self.in_channels}×H×W input, got shape {tuple(x.shape)}")
        x, (h, w) = self._pad(x)
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = self.dropout(skips.pop())
        for up, dec in zip(self.ups, self.decoders, strict=True):
            skip = skips.pop()
            # the 1×1 conv before the up-sampling, not after: both are linear per pixel and the
            # bilinear weights sum to 1, so the result is the same, but half the channels are
            # up-sampled and the conv runs at a quarter of the pixels (a tenth of inference time)
            x = F.interpolate(up(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = dec(torch.cat([skip, x], dim=1))
        return {
            "logits": self.class_head(x)[..., :h, :w],
            "distance": self.distance_head(x)[..., :h, :w],
        }


def match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """C×H×W -> channels×H×W: grayscale is repeated, RGB is averaged to gray."""
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1:
        return image.expand(channels, -1, -1)
    if channels == 1:
        return image.mean(dim=0, keepdim=True)
    raise ValueError(f"cannot feed a {image.shape[0]}-channel image to a {channels}-channel U-Net")


# test-time augmentation: the image, its half-turn (both flips), then its left-right and up-down
# flips; ``tta=2`` takes the first two, which differ the most
FLIPS = ((), (-2, -1), (-1,), (-2,))


def flip_count(tta: bool | int) -> int:
    """Views averaged for a ``tta`` setting: True all of :data:`FLIPS`, False 1, an integer itself."""
    if isinstance(tta, bool):
        return len(FLIPS) if tta else 1
    if not 1 <= int(tta) <= len(FLIPS):
        raise ValueError(f"tta must be true, false or a number of views 1..{len(FLIPS)}, got {tta}")
    return int(tta)


# On a CPU the views run two at a time in threads: within one view the small and memory-bound
# layers (GroupNorm, concatenation, up-sampling) leave a core idle. On two cores, 4 views of a 512²
# image took 0.29 s instead of 0.82 s, of a 1024² image 1.36 s instead of 2.23 s, and with another
# process on one core 0.64 s instead of 0.83 s (512²). The second view's activations cost memory
# (1024²: 0.69 GB instead of 0.32 GB), which the U-Net's tile size bounds
# (cellrcnn.inference.predictor.UNetPredictor).
VIEW_THREADS = 2
_view_pool: ThreadPoolExecutor | None = None
_view_pool_lock = threading.Lock()  # a service predicts from several threads


def _view_threads() -> ThreadPoolExecutor:
    global _view_pool
    with _view_pool_lock:
        if _view_pool is None:
            _view_pool = ThreadPoolExecutor(VIEW_THREADS, thread_name_prefix="cellrcnn-view")
        return _view_pool


def _forget_view_threads() -> None:  # a forked process (data loader workers) has none of them
    global _view_pool, _view_pool_lock
    _view_pool, _view_pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_view_threads)


def _views_in_parallel(x: torch.Tensor, flips: int) -> bool:
    # threads=1 means one core; a GPU queues its kernels asynchronously anyway
    return x.device.type == "cpu" and flips > 1 and torch.get_num_threads() > 1


def _view(net: UNet, x: torch.Tensor, dims: tuple[int, ...], bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and distance of one flipped view, flipped back (a flip is its own inverse)."""
    # inference mode and autocast are per thread: set here, where the view runs
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = net((torch.flip(x, dims) if dims else x).contiguous(memory_format=torch.channels_last))
    p, d = out["logits"].float().softmax(dim=1)[0], out["distance"].float().sigmoid()[0]
    return (torch.flip(p, dims), torch.flip(d, dims)) if dims else (p, d)


@torch.inference_mode()
def predict_maps(net: UNet, image: torch.Tensor, flips: int = 1, bf16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One C×H×W image -> class probabilities (3×H×W) and normalised distance (H×W), float32 numpy.

    Args:
        net: a :class:`UNet` in eval mode.
        flips: average over this many of :data:`FLIPS` (1: none; 4: all). On a CPU the views run
            :data:`VIEW_THREADS` at a time (a batch of them is no faster and needs all their
            memory at once); each output is flipped back and averaged.
        bf16: run the network under bfloat16 autocast (convolutions in bfloat16, normalisation
            and the outputs in float32): on CPUs with AVX512-BF16/AMX about 3x faster than float32;
            see :func:`cellrcnn.models.precision.native_bf16`.
    """
    if not 1 <= flips <= len(FLIPS):
        raise ValueError(f"flips must be 1..{len(FLIPS)}, got {flips}")
    x = image.unsqueeze(0).to(torch.float32)
    if _views_in_parallel(x, flips):
        views = list(_view_threads().map(lambda dims: _view(net, x, dims, bf16), FLIPS[:flips]))
    else:
        views = [_view(net, x, dims, bf16) for dims in FLIPS[:flips]]
    probs = sum(p for p, _ in views) / flips
    dist = sum(d for _, d in views) / flips
    return probs.cpu().numpy(), dist[0].cpu().numpy()
