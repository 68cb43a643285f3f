"""The segmentation network: MONAI's residual U-Net, 3D or 2D.

Three outputs (WT, TC, ET), each a sigmoid logit, as in the BraTS challenge's region-based
training. Normalisation is instance norm with affine parameters and no running statistics, so
Opacus accepts the model for DP-SGD and FedBN has per-site parameters to keep local.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedseg.data.case import MODALITIES, REGIONS

if TYPE_CHECKING:
    import torch.nn as nn

    from fedseg.config import FedsegConfig


def build_unet(cfg: FedsegConfig, in_channels: int = len(MODALITIES)) -> nn.Module:
    """Build the U-Net described by ``cfg`` (spatial dims, channels per level).

    Parameters
    ----------
    cfg:
        Configuration; uses ``spatial_dims``, ``base_channels`` and ``depth``.
    in_channels:
        Number of input modalities (4 by default; fewer for modality ablations).

    Returns
    -------
    torch.nn.Module
        A ``monai.networks.nets.UNet`` with ``len(REGIONS)`` output channels.
    """
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=in_channels,
        out_channels=len(REGIONS),
        channels=cfg.channels,
        strides=(2,) * (len(cfg.channels) - 1),
        num_res_units=2,
        norm=("instance", {"affine": True}),
    )
