"""torchvision's ``MultiScaleRoIAlign`` with RoIAlign split over torch's intra-op threads on CPU.

torchvision's CPU RoIAlign kernels (forward and backward) run on one thread: in a ViLD training
step on 2 cores, ``_roi_align_backward`` alone was 25% of the step with the second core idle
(bench/vild_step.py). The RoIs are split into one chunk per thread, each chunk runs the same
torchvision kernel in a worker thread (the kernels release the GIL), and the chunks' outputs are
concatenated (forward: every RoI's output is bit-identical to the one-thread kernel's) or summed
(backward: the feature-map gradient, equal up to float summation order). Elsewhere (CUDA, one
thread, tracing) it is torchvision's module unchanged.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import poolers

_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_LOCK = threading.Lock()


def _pool(n: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _LOCK:
        if _POOL is None or _POOL_SIZE != n:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL, _POOL_SIZE = ThreadPoolExecutor(n, thread_name_prefix="roi_align"), n
        return _POOL


class _SplitRoIAlign(torch.autograd.Function):
    """``torchvision.ops.roi_align`` with the RoIs in ``parts`` chunks on worker threads."""

    @staticmethod
    def forward(ctx, x, rois, spatial_scale: float, output_size: tuple[int, int], sampling_ratio: int, aligned: bool, parts: int):
        ctx.save_for_backward(rois)
        ctx.args = (spatial_scale, output_size, sampling_ratio, aligned, parts, tuple(x.shape))
        x = x.detach()  # worker threads do not inherit the no-grad mode of this forward
        op = torch.ops.torchvision.roi_align
        chunks = rois.tensor_split(parts)
        outs = _pool(parts).map(lambda r: op(x, r, spatial_scale, output_size[0], output_size[1], sampling_ratio, aligned), chunks)
        return torch.cat(list(outs))

    @staticmethod
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        spatial_scale, output_size, sampling_ratio, aligned, parts, (B, C, H, W) = ctx.args
        op = torch.ops.torchvision._roi_align_backward
        grad = grad.contiguous()

        def one(g, r):
            return op(g, r, spatial_scale, output_size[0], output_size[1], B, C, H, W, sampling_ratio, aligned)

        grads = list(_pool(parts).map(one, grad.tensor_split(parts), rois.tensor_split(parts)))
        total = grads[0]
        for g in grads[1:]:
            total += g
        return total, None, None, None, None, None, None


def roi_align(x: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool = False) -> torch.Tensor:
    """``torchvision.ops.roi_align(x, rois (K, 5), ...)``, split over the intra-op threads on CPU."""
    parts = min(torch.get_num_threads(), len(rois))
    if x.device.type != "cpu" or parts < 2 or torchvision._is_tracing():
        return torchvision.ops.roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return _SplitRoIAlign.apply(x, rois, float(spatial_scale), tuple(output_size), int(sampling_ratio), bool(aligned), parts)


class ThreadedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` (same arguments, same state dict) whose RoIAlign is :func:`roi_align`."""

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        x_filtered = poolers._filter_input(x, self.featmap_names)
        if x_filtered[0].device.type != "cpu" or torch.get_num_threads() < 2 or torchvision._is_tracing():
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = poolers._setup_scales(x_filtered, image_shapes, self.canonical_scale, self.canonical_level)
        rois = poolers._convert_to_roi_format(boxes)
        if len(x_filtered) == 1:
            return roi_align(x_filtered[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        # torchvision's _multiscale_roi_align: each RoI pooled from the level its size maps to
        levels = self.map_levels(boxes)
        result = x_filtered[0].new_zeros((len(rois), x_filtered[0].shape[1]) + tuple(self.output_size))
        for level, (feature, scale) in enumerate(zip(x_filtered, self.scales)):
            idx = torch.where(levels == level)[0]
            result[idx] = roi_align(feature, rois[idx], self.output_size, scale, self.sampling_ratio).to(result.dtype)
        return result
