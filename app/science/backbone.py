"""The Cellpose backbone: building CPnet networks, raw maps from images, masks from maps.

This module and ``training`` are the only places that import cellpose. Everything else in CellFuse
talks about networks through the functions here.
"""

from __future__ import annotations

import torch
from cellpose.resnet_torch import CPnet

#: Cellpose 3's CPnet widths (nbase without the input channels). Models Cellpose itself can load.
FULL_WIDTHS: tuple[int, ...] = (32, 64, 128, 256)
#: A half-width CPnet: about 4x cheaper per step on a CPU; not loadable by Cellpose's own classes.
HALF_WIDTHS: tuple[int, ...] = (16, 32, 64, 128)
#: Cellpose feeds two channels (signal, optional nucleus); CellFuse models see one reporter and a
#: zero second channel, which keeps them loadable by Cellpose.
INPUT_CHANNELS = 2
#: Objects are rescaled to this diameter (pixels) before the network, as in Cellpose's cyto models.
DEFAULT_DIAM_MEAN = 30.0


def build_network(widths: tuple[int, ...] = FULL_WIDTHS, diam_mean: float = DEFAULT_DIAM_MEAN) -> CPnet:
    """A randomly initialised CPnet in eval mode on the CPU (no MKL-DNN: it breaks training after eval)."""
    net = CPnet(
        nbase=[INPUT_CHANNELS, *widths],
        nout=3,
        sz=3,
        mkldnn=False,
        max_pool=True,
        diam_mean=float(diam_mean),
    )
    net.eval()
    return net


def network_widths(net: torch.nn.Module) -> tuple[int, ...]:
    """The widths a CPnet was built with (read from its first downsampling block)."""
    return tuple(int(w) for w in net.nbase[1:])
