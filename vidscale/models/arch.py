"""The two Real-ESRGAN network architectures as torch modules.

Parameter names follow BasicSR's ``rrdbnet_arch.py`` and Real-ESRGAN's ``srvgg_arch.py`` exactly, so
the official state dicts load with ``strict=True`` and ``detect`` can reason about their keys.
Activations are not in-place: the modules are only ever traced for conversion, where in-place ops buy
nothing and can confuse graph capture.
"""

import torch
from torch import nn
from torch.nn import functional as F

# ESRGAN scales residuals by 0.2 before adding them back; the trained weights depend on this constant.
_RESIDUAL_SCALE = 0.2
_LRELU_SLOPE = 0.2
# Output scale -> pixel-unshuffle factor applied before conv_first (the body always upsamples by 4).
RRDB_UNSHUFFLE = {4: 1, 2: 2, 1: 4}


def _conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, 1, 1)


class ResidualDenseBlock(nn.Module):
    """Five densely connected convolutions; each sees the block input and all earlier outputs."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.conv1 = _conv3x3(num_feat, num_grow_ch)
        self.conv2 = _conv3x3(num_feat + num_grow_ch, num_grow_ch)
        self.conv3 = _conv3x3(num_feat + 2 * num_grow_ch, num_grow_ch)
        self.conv4 = _conv3x3(num_feat + 3 * num_grow_ch, num_grow_ch)
        self.conv5 = _conv3x3(num_feat + 4 * num_grow_ch, num_feat)
        self.lrelu = nn.LeakyReLU(_LRELU_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * _RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks inside one more scaled residual."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rdb3(self.rdb2(self.rdb1(x)))
        return out * _RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """ESRGAN / Real-ESRGAN generator (RealESRGAN_x4plus, RealESRGAN_x4plus_anime_6B, ...).

    The network always upsamples its features by 4. Real-ESRGAN's x2 and x1 models get their scale by
    first folding 2x2 or 4x4 pixel blocks into channels, which is why their input height and width must
    be multiples of 2 or 4.
    """

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 4,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
    ) -> None:
        super().__init__()
        if scale not in RRDB_UNSHUFFLE:
            raise ValueError(f"RRDBNet supports scale 1, 2 or 4, not {scale}")
        self.scale = scale
        unshuffle = RRDB_UNSHUFFLE[scale]
        self.conv_first = _conv3x3(num_in_ch * unshuffle * unshuffle, num_feat)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = _conv3x3(num_feat, num_feat)
        self.conv_up1 = _conv3x3(num_feat, num_feat)
        self.conv_up2 = _conv3x3(num_feat, num_feat)
        self.conv_hr = _conv3x3(num_feat, num_feat)
        self.conv_last = _conv3x3(num_feat, num_out_ch)
        self.lrelu = nn.LeakyReLU(_LRELU_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unshuffle = RRDB_UNSHUFFLE[self.scale]
        # F.pixel_unshuffle orders channels as c * r * r + i * r + j, the same as BasicSR's own helper.
        feat = F.pixel_unshuffle(x, unshuffle) if unshuffle > 1 else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))



def _activation(act_type: str, num_feat: int) -> nn.Module:
    if act_type == "prelu":
        return nn.PReLU(num_parameters=num_feat)
    if act_type == "relu":
        return nn.ReLU()
    if act_type == "leakyrelu":
        # Real-ESRGAN's compact net uses 0.1 here, unlike the 0.2 of RRDBNet.
        return nn.LeakyReLU(0.1)
    raise ValueError(f"unknown act_type {act_type!r} (prelu, relu, leakyrelu)")


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact VGG-style network (realesr-animevideov3, realesr-general-x4v3).

    All convolutions run at input resolution; the last one produces ``upscale**2`` sub-pixels per
    output channel, and the network only learns the residual over a nearest-neighbour upscale.
    ``body`` alternates conv and activation, so convolutions sit at even indices.
    """

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_conv: int = 16,
        upscale: int = 4,
        act_type: str = "prelu",
    ) -> None:
        super().__init__()
        self.upscale = upscale
        self.body = nn.ModuleList()
        self.body.append(_conv3x3(num_in_ch, num_feat))
        self.body.append(_activation(act_type, num_feat))
        for _ in range(num_conv):
            self.body.append(_conv3x3(num_feat, num_feat))
            self.body.append(_activation(act_type, num_feat))
        self.body.append(_conv3x3(num_feat, num_out_ch * upscale * upscale))
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        base = F.interpolate(x, scale_factor=self.upscale, mode="nearest")
        return self.upsampler(out) + base
