"""MMA of Yang et al., "MMA: Multi-Modal Adapter for Vision-Language Models" (CVPR'24), as its released code
(ZjjConan/Multi-Modal-Adapter) trains it [code]. Not the seed's MMA (Seputis et al., :mod:`xmx.methods.mma`), which
adapts frozen output features: this one adds adapters *inside* both encoders.

For every block l in ``layers`` (1-based, 5..12 by default) of each tower m ∈ {text, image}, with x_l the block input
and a frozen block ``x_{l+1} = x_l + attn(ln_1(x_l)) + mlp(ln_2(·))``:

    h      = ReLU(D_m^l · ln_1(x_l) + d)                 # modality-specific down projection  W_m → 32
    h      = ReLU(S^l · h + s)                           # the shared projection, one per layer, both modalities
    a_m^l  = U_m^l · h + u                               # modality-specific up projection    32 → W_m
    x_{l+1} = frozen_block(x_l) + σ · a_m^l              # σ = 0.001 (ADAPTER_SCALE of the release's configs)

The release scales gradients around the branch [code]: the branch input's gradient is multiplied by σ and the branch
output's by 1/σ, so the adapter weights see unscaled gradients while the residual stream sees σ times the branch's.
Linear layers start from kaiming_normal (fan_out, ReLU) with zero biases. Text prompts: ``a photo of a {}.``
(TEXT_CTX_INIT "a photo of a"); logits ``exp(logit_scale)·⟨norm(v), norm(t_c)⟩``; text features are recomputed through
the adapted text tower every step and once per label set in evaluation (new classes included).

Recipe [code]: SGD lr 0.0015 (momentum 0.9, weight decay 5e-4: Dassl's defaults), cosine over 5 epochs (stepped per
epoch, no warm-up), batch 16 (ImageNet 128), fp16 autocast ("amp"), RandomResizedCrop + flip, final weights tested.
Trainable parameters for ViT-B/16: 8 × (33,312 text + 49,952 image + 1,056 shared) = 674,560.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from xmx.backbones.lora import tower_blocks
from xmx.errors import XmxError
from xmx.methods._training import EncoderMethod


class _GradScale(torch.autograd.Function):
    """Identity forward; gradient multiplied by ``scale`` (the release's ``gradient_scale_layer``)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _init(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return module


def _branch(width: int, dim: int) -> nn.Module:
    return _init(nn.Sequential(OrderedDict([("down", nn.Sequential(nn.Linear(width, dim), nn.ReLU())),
                                            ("up", nn.Linear(dim, width))])))


class YangAdapters(nn.Module):
    """The adapters of every adapted layer: ``text[l]`` (W_text → dim → W_text), ``visual[l]`` (W_image → dim →
    W_image) and ``shared[l]`` (dim → dim, ReLU), keyed by the 1-based layer number."""

    def __init__(self, text_width: int, image_width: int, layers: list[int], dim: int = 32, scale: float = 0.001):
        super().__init__()
        self.layers, self.dim, self.scale = list(layers), int(dim), float(scale)
        self.text = nn.ModuleDict({str(l): _branch(text_width, dim) for l in layers})
        self.visual = nn.ModuleDict({str(l): _branch(image_width, dim) for l in layers})
        self.shared = nn.ModuleDict({str(l): _init(nn.Sequential(nn.Linear(dim, dim), nn.ReLU())) for l in layers})

    def branch(self, tower: str, layer: int, ln_1: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """σ · a_m^l for block input ``x`` [N, L, W] of ``tower`` (``text`` | ``vision``)."""
        own = (self.text if tower == "text" else self.visual)[str(layer)]
        y = ln_1(_GradScale.apply(x, self.scale))
        y = own.up(self.shared[str(layer)](own.down(y))) * self.scale
        return _GradScale.apply(y, 1.0 / self.scale)


def attach_yang_adapters(model: nn.Module, adapters: YangAdapters) -> list:
    """Forward hooks on the blocks of both towers of an open_clip CLIP ``model``: each adapted block's output gets
    ``+ σ·a_m^l(x_l)``. Returns the hook handles (``handle.remove()`` detaches)."""
    handles = []
    for tower in ("text", "vision"):
        blocks = tower_blocks(model, tower, what="MMA-Yang")
        if max(adapters.layers) > len(blocks):
            raise XmxError(f"MMA-Yang: method.layers={adapters.layers} go past the {len(blocks)} blocks of the "
                           f"{tower} tower; pick layers within 1..{len(blocks)}")
        for layer in adapters.layers:
            blk = blocks[layer - 1]

            def hook(module, args, kwargs, output, tower=tower, layer=layer):
                x = args[0] if args else kwargs["q_x"]
                return output + adapters.branch(tower, layer, module.ln_1, x).to(output.dtype)

            handles.append(blk.register_forward_hook(hook, with_kwargs=True))
    return handles


class MMAYangMethod(EncoderMethod):
    """MMA of Yang et al. (CVPR'24), module docstring; keys mirror the release's ``TRAINER.MMADAPTER`` config."""

    label = "MMA-Yang"
    adapts_text = True

    def __init__(self, layers=(5, 12), dim: int = 32, scale: float = 0.001, batch_size_by_dataset: dict | None = None,
                 **kwargs):
        """``batch_size_by_dataset``: the release's per-dataset batch (ImageNet 128); the config resolves
        ``batch_size`` from it."""
        layers = list(layers)
        if len(layers) != 2 or not all(isinstance(v, int) for v in layers) or not 1 <= layers[0] <= layers[1]:
            raise XmxError(f"method.layers={layers}: give [first, last] 1-based block numbers, first ≥ 1 (the "
                           "release's ADAPTER_START/END: [5, 12])")
        if int(dim) <= 0:
            raise XmxError(f"method.dim={dim}: the adapter width must be a positive integer (release: 32)")
        if not float(scale) > 0:
            raise XmxError(f"method.scale={scale}: the residual scale must be positive (release: 0.001)")
        super().__init__(**kwargs)
        self.yang_config = dict(layers=list(range(layers[0], layers[1] + 1)), dim=int(dim), scale=float(scale))

    def adapt(self, backbone):
        m = backbone.model
        widths = [tower_blocks(m, t, what="MMA-Yang")[0].ln_1.normalized_shape[0] for t in ("text", "vision")]
        self.adapters = YangAdapters(*widths, **self.yang_config)
        self._hooks = attach_yang_adapters(m, self.adapters)
        return []

    def extra_results(self) -> dict:
        return {**super().extra_results(), **self.yang_config}
