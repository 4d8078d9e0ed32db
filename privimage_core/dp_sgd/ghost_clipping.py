"""Per-example clipping without per-example gradients: book-keeping (BK)
ghost clipping (Bu, Wang, Zha & Karypis, "Differentially private
optimization on large model at small cost", ICML 2023; ghost norms after
Goodfellow 2015 and Li et al. 2022).

For a layer with output z = W a (a convolution is the same after unfold,
with T positions), example i's weight gradient is G_i = sum_t g_it a_it^T
where g = dL_i/dz. Two things are needed from it, never G_i itself:

1. its squared norm. "Ghost": ||G_i||^2 = <a_i^T a_i, g_i^T g_i> (two T x T
   Gram matrices, cost ~ T^2 (d + p)); "instantiated": form G_i (cost
   ~ T p d) and square it. Per layer the cheaper one is used (Bu et al.'s
   mixed rule): at the small UNet's 7x7 level T = 49 against p d = 147k.
2. the clipped sum sum_i c_i G_i, c_i = min(1, C / ||G_i||): for a ghost
   layer an ordinary weight gradient with g scaled by c_i per example (the
   framework's own conv / matmul kernel); for an instantiated layer the
   c-weighted sum of the G_i already formed for its norm.

One forward and one backward for the output gradients only (autograd skips
the weight-gradient kernels: only the layer outputs are asked for) replace
vmap's [B, P] per-example gradients (450 MB per 64 images for the small
preset). Noise multiplicity: an example's k rows are one example's
positions (T' = k T), so the norm is that of the k-draw mean gradient, as
the accountant assumes.

Opacus still adds the noise, accounts, handles virtual steps and DDP: the
clipped sum goes to ``p.grad`` for Opacus's DPOptimizerFastGradientClipping
(the optimizer of its own ghost mode), which adds N(0, sigma^2 C^2) once per
logical step and divides by the expected batch size.

Supported layers: Conv2d (zero padding, any stride / dilation, groups 1),
Linear, Embedding (no padding_idx), GroupNorm, each parameter owned by one
layer; anything else is refused (``unsupported_parameters``;
grad_sample_mode "auto" then uses vmap). A layer may run several times per
forward if each call's rows are example-major (a GAN discriminator on reals
and fakes); that layout is checked against vmap on random inputs before a
stage trains (dp_finetune.check_clipper). A layer's output must not be
modified in place (checked).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from privimage_core.models.ema import unwrap

SUPPORTED = (nn.Conv2d, nn.Linear, nn.Embedding, nn.GroupNorm)


def unsupported_parameters(model: nn.Module) -> list[str]:
    """Names of trainable parameters that book-keeping clipping cannot handle
    (with the reason): it sums per-layer squared norms, so a parameter must
    belong to exactly one supported layer whose gradient it computes exactly."""
    bad = []
    owners: dict[int, int] = {}
    for _, m in unwrap(model).named_modules(remove_duplicate=False):
        for _, p in m.named_parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for mname, m in unwrap(model).named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            why = None
            if not (isinstance(m, SUPPORTED) and pname in ("weight", "bias")):
                why = f"a {type(m).__name__} parameter"
            elif isinstance(m, nn.Conv2d) and (m.groups != 1 or isinstance(m.padding, str)
                                               or m.padding_mode != "zeros"):
                why = "grouped, 'same'-string or non-zero padding"
            elif isinstance(m, nn.Embedding) and (m.padding_idx is not None or m.sparse
                                                  or m.scale_grad_by_freq
                                                  or m.max_norm is not None):
                # max_norm renormalises the looked-up rows in place in the forward
                why = "padding_idx, sparse, scale_grad_by_freq or max_norm"
            elif owners[id(p)] > 1:
                # tied weights: the example's gradient is the SUM of the
                # layers' parts, whose norm the per-layer sum would undercount
                why = "shared by several layers"
            if why:
                bad.append(f"{f'{mname}.' if mname else ''}{pname} ({why})")
    return bad


class _Layer:
    """One layer's book-keeping for a physical batch: the input and output of
    each call in the forward (a GAN discriminator runs on the reals, then on
    each fake draw: B rows per call, row i of every call belonging to example
    i, so the calls are more rows of the same examples, as Opacus's hooks
    sum them)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.versions: list[int] = []

    def clear(self) -> None:
        self.inputs, self.outputs, self.versions = [], [], []

    def rows(self, tensors: list[torch.Tensor], b: int) -> torch.Tensor:
        """The calls' tensors as one [B * r, ...] example-major batch."""
        for t in tensors:
            if t.shape[0] % b:
                raise RuntimeError(f"{type(self.module).__name__} ran on {t.shape[0]} rows for a "
                                   f"batch of {b} examples; book-keeping clipping needs each "
                                   "call's rows to be example-major (use grad_sample_mode vmap)")
        if len(tensors) == 1:
            return tensors[0]
        parts = [t.reshape(b, -1, *t.shape[1:]) for t in tensors]
        return torch.cat(parts, dim=1).reshape(-1, *tensors[0].shape[1:])


def _trainable(p) -> bool:
    return p is not None and p.requires_grad


def _tokens(t: torch.Tensor, b: int) -> torch.Tensor:
    """[B*k, ..., C] rows -> [B, k*..., C]: an example's k rows and all its
    positions become one example's tokens (the row order is example-major)."""
    return t.reshape(b, -1, t.shape[-1])


def _ghost_cheaper(t: int, d: int, p: int) -> bool:
    """Bu et al.'s rule: two T x T Gram matrices (T^2 (d + p)) against forming
    the p x d per-example gradient (T p d)."""
    return t * (d + p) < p * d


def _gram_dot(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """<a a^T, g g^T> per example: the ghost norm. The elementwise products
    have both signs; summing them in float64 keeps cancellation from moving
    the norm (a crafted float32 case was off by 6%)."""
    aa, gg = torch.bmm(a, a.transpose(1, 2)), torch.bmm(g, g.transpose(1, 2))
    return (aa.double() * gg.double()).sum((1, 2)).to(g.dtype)


def _sq_norm(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example ||sum_t g_t a_t^T||^2 for a [B, T, d], g [B, T, p], by the
    cheaper of the ghost identity and instantiation."""
    if _ghost_cheaper(a.shape[1], a.shape[2], g.shape[2]):
        return _gram_dot(a, g)
    return torch.bmm(g.transpose(1, 2), a).pow(2).sum((1, 2))


def _conv_patches(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """[N, T, kh*kw*C]: the input patches each output position's weights see,
    columns in any fixed order (only their Gram matrix is used). Stride 1:
    stacked shifted channels-last views, faster than F.unfold
    (benchmarks/bench_ghost_kernels.py)."""
    if m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0):
        return x.flatten(2).transpose(1, 2)
    if m.stride != (1, 1):
        return F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding,
                        stride=m.stride).transpose(1, 2)
    (kh, kw), (ph, pw), (dh, dw) = m.kernel_size, m.padding, m.dilation
    ho, wo = x.shape[2] + 2 * ph - dh * (kh - 1), x.shape[3] + 2 * pw - dw * (kw - 1)
    xp = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)
    cols = [xp[:, i * dh:i * dh + ho, j * dw:j * dw + wo, :] for i in range(kh) for j in range(kw)]
    return torch.stack(cols, dim=3).reshape(x.shape[0], ho * wo, -1)


def _conv_sq_norm(m: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, b: int, k: int):
    """(per-example squared norm of a convolution's weight gradient [B], the
    per-example gradients [B, *weight.shape] where they were formed, else
    None). Ghost (Gram matrices of the unfolded input and of the output
    gradient) where T (d + p) < p d; else instantiated by the framework's
    grouped-convolution weight-gradient kernel, one group per example (an
    example's k rows are that group's batch, so they are summed), and kept:
    the clipped sum is a weighted sum of them instead of a second
    weight-gradient pass (Bu et al.'s mixed ghost clipping). The kernels
    were chosen by per-layer and whole-step timings
    (benchmarks/bench_ghost_kernels.py, benchmarks/bench_dp_step.py)."""
    t = g.shape[2] * g.shape[3] * k
    p, d = m.out_channels, m.in_channels * m.kernel_size[0] * m.kernel_size[1]
    if _ghost_cheaper(t, d, p):
        a = _tokens(_conv_patches(m, x), b)                          # [B, kT, d]
        gt = _tokens(g.flatten(2).transpose(1, 2), b)                # [B, kT, p]
        return _gram_dot(a, gt), None

    def per_group(z):  # [B*k, C, H, W] -> [k, B*C, H, W]: one group per example
        return z.reshape(b, k, *z.shape[1:]).transpose(0, 1).reshape(k, -1, *z.shape[2:])
    per = torch.nn.grad.conv2d_weight(per_group(x), (b * p, m.in_channels, *m.kernel_size),
                                      per_group(g), m.stride, m.padding, m.dilation,
                                      groups=b).reshape(b, *m.weight.shape)
    return per.reshape(b, -1).pow(2).sum(1), per


def _norms_and_sum(m: nn.Module, x: torch.Tensor, g: torch.Tensor, b: int):
    """(per-example squared norm [B] of this layer's parameters, a function
    c -> {param: clipped sum} to call once the clip factors are known), from
    the layer's input ``x`` and output gradient ``g`` over B * k rows."""
    k = x.shape[0] // b  # rows per example (_Layer.rows checked the division)
    # a frozen weight or bias is neither in the norm nor in the update
    w_on, b_on = _trainable(m.weight), _trainable(getattr(m, "bias", None))
    zero = torch.zeros(b, dtype=g.dtype, device=g.device)
    if isinstance(m, nn.Conv2d):
        sq, per = _conv_sq_norm(m, x, g, b, k) if w_on else (zero, None)
        gb = g.sum((2, 3)).reshape(b, k, -1).sum(1)                  # [B, p] bias gradients
        if b_on:
            sq = sq + gb.pow(2).sum(1)

        def clipped(c):
            out = {}
            if w_on and per is not None:
                out[m.weight] = torch.einsum("b,b...->...", c, per)
            elif w_on:
                gc = g * c.repeat_interleave(k)[:, None, None, None]
                out[m.weight] = torch.nn.grad.conv2d_weight(x, m.weight.shape, gc, m.stride,
                                                            m.padding, m.dilation, m.groups)
            if b_on:
                out[m.bias] = c @ gb
            return out
        return sq, clipped
    if isinstance(m, nn.Linear):
        a, gt = _tokens(x, b), _tokens(g, b)                         # [B, k*..., d], [B, k*..., p]
        sq = _sq_norm(a, gt) if w_on else zero
        if b_on:
            sq = sq + gt.sum(1).pow(2).sum(1)

        def clipped(c):
            gc = gt * c[:, None, None]
            out = {}
            if w_on:
                out[m.weight] = gc.reshape(-1, gc.shape[-1]).t() @ a.reshape(-1, a.shape[-1])
            if b_on:
                out[m.bias] = gc.sum((0, 1))
            return out
        return sq, clipped
    if isinstance(m, nn.Embedding):
        idx = x.reshape(b, -1)                                       # [B, k*...]
        gt = _tokens(g, b)                                           # [B, k*..., dim]
        same = (idx[:, :, None] == idx[:, None, :]).to(g.dtype)     # rows sharing an index
        sq = (same * torch.bmm(gt, gt.transpose(1, 2))).sum((1, 2))

        def clipped(c):
            w = torch.zeros_like(m.weight)
            w.index_add_(0, idx.reshape(-1), (gt * c[:, None, None]).reshape(-1, gt.shape[-1]))
            return {m.weight: w}
        return sq, clipped
    if isinstance(m, nn.GroupNorm):  # per-channel scale and shift of the normalised input
        n, ch = g.shape[0], g.shape[1]
        per_ch = (g * F.group_norm(x, m.num_groups, eps=m.eps)).reshape(n, ch, -1).sum(2)
        gw = per_ch.reshape(b, k, -1).sum(1)                         # [B, C]
        gb = g.reshape(n, ch, -1).sum(2).reshape(b, k, -1).sum(1)
        parts = [(p, per) for p, per, on in ((m.weight, gw, w_on), (m.bias, gb, b_on)) if on]
        sq = sum((per.pow(2).sum(1) for _, per in parts), zero)

        def clipped(c):
            return {p: c @ per for p, per in parts}
        return sq, clipped
    raise TypeError(f"unsupported layer {type(m).__name__}")


class BookKeepingClipper:
    """Hooks on a model's parametrised layers; ``clipped_grad`` leaves
    sum_i min(1, C/||g_i||) g_i in every trainable ``p.grad``."""

    def __init__(self, model: nn.Module):
        bad = unsupported_parameters(model)
        if bad:
            raise ValueError(f"finetune.grad_sample_mode 'ghost' cannot clip {', '.join(bad[:4])}"
                             f"{' ...' if len(bad) > 4 else ''} (supported: Conv2d, Linear, "
                             "Embedding, GroupNorm); use grad_sample_mode vmap")
        self.model = unwrap(model)
        self.layers: list[_Layer] = []
        self._recording = False
        for m in self.model.modules():
            if isinstance(m, SUPPORTED) and any(p.requires_grad for p in m.parameters(False)):
                layer = _Layer(m)
                m.register_forward_hook(self._hook(layer))
                self.layers.append(layer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _hook(self, layer: _Layer):
        def hook(module, inputs, output):
            if self._recording:
                layer.inputs.append(inputs[0].detach())
                layer.outputs.append(output)
                # an in-place op on the output later would make its recorded
                # gradient that of another tensor: checked in clipped_grad
                layer.versions.append(output._version)
        return hook

    def clipped_grad(self, per_example_loss, b: int, max_grad_norm: float) -> torch.Tensor:
        """``per_example_loss()`` runs the model's forward and returns the
        per-example losses [B] (an example's k draws as k consecutive rows).
        Leaves the clipped sum in every ``p.grad``; returns the per-example
        gradient norms before clipping."""
        for p in self.params:
            p.grad = torch.zeros_like(p)
        if b == 0:  # an empty Poisson batch: the optimizer still steps (noise only)
            return torch.zeros(0)
        self._recording = True
        try:
            loss = per_example_loss()
            used = [l for l in self.layers if l.outputs]
            for layer in used:
                if [o._version for o in layer.outputs] != layer.versions:
                    raise RuntimeError(f"the output of a {type(layer.module).__name__} was "
                                       "modified in place after the layer ran; book-keeping "
                                       "clipping needs it unchanged (make that op out of place, "
                                       "or use grad_sample_mode vmap)")
            outs = [o for l in used for o in l.outputs]
            grads = iter(torch.autograd.grad(loss.sum(), outs, allow_unused=True))
            sq = torch.zeros(b, dtype=loss.dtype, device=loss.device)
            finish = []
            for layer in used:
                gs = [next(grads) for _ in layer.outputs]
                gs = [torch.zeros_like(o) if g is None else g for g, o in zip(gs, layer.outputs)]
                s, fn = _norms_and_sum(layer.module, layer.rows(layer.inputs, b),
                                       layer.rows(gs, b), b)
                sq = sq + s
                finish.append(fn)
        finally:  # never keep a batch's graph or activations past this call
            self._recording = False
            for layer in self.layers:
                layer.clear()
        norms = sq.clamp_min(0).sqrt()
        # Opacus's clip factor (DPOptimizer.clip_and_accumulate)
        c = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for fn in finish:
            for p, gsum in fn(c).items():
                p.grad += gsum
        return norms.detach()
