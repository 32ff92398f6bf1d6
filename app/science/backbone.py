"""The Cellpose backbone: building CPnet networks, raw maps from images, masks from maps.

This module and ``training`` are the only places that import cellpose. Everything else in CellFuse
talks about networks through the functions here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from cellpose import dynamics, transforms
from cellpose.resnet_torch import CPnet

from app.science.device import autocast, module_device

#: Cellpose 3's CPnet widths (nbase without the input channels). Models Cellpose itself can load.
FULL_WIDTHS: tuple[int, ...] = (32, 64, 128, 256)
#: A half-width CPnet: about 4x cheaper per step on a CPU; not loadable by Cellpose's own classes.
HALF_WIDTHS: tuple[int, ...] = (16, 32, 64, 128)
#: Cellpose feeds two channels (signal, optional nucleus); CellFuse models see one reporter and a
#: zero second channel, which keeps them loadable by Cellpose.
INPUT_CHANNELS = 2
#: Objects are rescaled to this diameter (pixels) before the network, as in Cellpose's cyto models.
DEFAULT_DIAM_MEAN = 30.0


def build_network(
    widths: tuple[int, ...] = FULL_WIDTHS,
    diam_mean: float = DEFAULT_DIAM_MEAN,
    nchan: int = INPUT_CHANNELS,
    device: torch.device | str | None = None,
) -> CPnet:
    """A randomly initialised CPnet in eval mode, on ``device`` (default the CPU).

    No MKL-DNN: it breaks training after eval. ``nchan`` input channels: 2 ([reporter, zeros]) for
    the zoo's per-reporter models, K for a joint model that sees all K reporters of a field at once
    (``joint_network``).
    """
    net = CPnet(
        nbase=[int(nchan), *widths],
        nout=3,
        sz=3,
        mkldnn=False,
        max_pool=True,
        diam_mean=float(diam_mean),
    )
    net.eval()
    if device is not None and torch.device(device).type != "cpu":
        net = net.to(device)
    return net


def network_widths(net: torch.nn.Module) -> tuple[int, ...]:
    """The widths a CPnet was built with (read from its first downsampling block)."""
    return tuple(int(w) for w in net.nbase[1:])


def network_input_channels(net: torch.nn.Module) -> int:
    """How many input channels a CPnet takes (2 for the zoo's models, K for a joint model)."""
    return int(net.nbase[0])


#: Tensors of a CPnet whose first axis (BatchNorm) or second axis (conv) runs over input channels.
_INPUT_BATCHNORM = ("downsample.down.res_down_0.conv.conv_0.0.", "downsample.down.res_down_0.proj.0.")
_INPUT_CONVS = ("downsample.down.res_down_0.conv.conv_0.2.weight", "downsample.down.res_down_0.proj.1.weight")


def joint_network(base: torch.nn.Module, n_channels: int) -> CPnet:
    """A CPnet that takes ``n_channels`` reporters at once, started from a single-reporter ``base``.

    Every tensor is copied except the input layers, which are "inflated": each new input channel
    gets the base's reporter-channel BatchNorm statistics and 1/K of its first-layer kernels, so
    the joint net starts out seeing the mean of the K normalised reporters through the base.
    """
    if n_channels < 1:
        raise BackboneInputError(f"a joint model needs at least one channel, got {n_channels}")
    net = build_network(network_widths(base), diam_mean=diam_mean_of(base), nchan=n_channels)
    state = {name: tensor.detach().clone() for name, tensor in base.state_dict().items()}
    for name, tensor in list(state.items()):
        if name.startswith(_INPUT_BATCHNORM) and tensor.ndim == 1:
            state[name] = tensor[:1].repeat(n_channels)
        elif name in _INPUT_CONVS:
            state[name] = (tensor[:, :1] / n_channels).repeat(1, n_channels, 1, 1)
    net.load_state_dict(state, strict=True)
    net.eval()
    return net


# ----------------------------------------------------------------------------------------------
# Inference: images -> raw maps -> masks
# ----------------------------------------------------------------------------------------------


class BackboneInputError(ValueError):
    """An image, diameter or normalisation that the backbone cannot work with."""


@dataclass(frozen=True)
class Normalization:
    """How one channel's intensities are mapped so that 0 ~ background and 1 ~ bright signal.

    By default each image is scaled between its own 1st and 99th percentiles (Cellpose's default).
    Give ``low`` and ``high`` (both) to use fixed values instead, e.g. the 1st/99th percentiles of
    a whole dataset computed upstream, which keeps dim fields dim. Only the reporter is scaled:
    the second network channel stays zero, as in training (Cellpose's own ``eval`` with
    ``lowhigh`` would shift its zero channel to -low / (high - low)).

    >>> Normalization().cellpose_params()["percentile"]
    [1.0, 99.0]
    >>> Normalization(low=100.0, high=4000.0).cellpose_params()["lowhigh"]
    [100.0, 4000.0]
    """

    lower_percentile: float = 1.0
    upper_percentile: float = 99.0
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise BackboneInputError(
                f"normalisation percentiles must satisfy 0 <= lower < upper <= 100, got "
                f"lower={self.lower_percentile}, upper={self.upper_percentile}"
            )
        if (self.low is None) != (self.high is None):
            raise BackboneInputError("give both 'low' and 'high' for a fixed normalisation, or neither")
        if self.low is not None and not float(self.high) > float(self.low):  # type: ignore[arg-type]
            raise BackboneInputError(f"fixed normalisation needs high > low, got low={self.low}, high={self.high}")

    def cellpose_params(self) -> dict:
        """A complete, fresh keyword dict for ``cellpose.transforms.normalize_img``.

        Complete and fresh on every call because Cellpose mutates its module-level default dict in
        place: relying on it would let one call's settings leak into the next.
        """
        return {
            "normalize": True,
            "norm3D": True,
            "invert": False,
            "lowhigh": None if self.low is None else [float(self.low), float(self.high)],  # type: ignore[arg-type]
            "percentile": [float(self.lower_percentile), float(self.upper_percentile)],
            "sharpen_radius": 0,
            "smooth_radius": 0,
            "tile_norm_blocksize": 0,
            "tile_norm_smooth3D": 1,
        }


@dataclass(frozen=True)
class ChannelMaps:
    """One channel's network output at the input's resolution.

    ``maps`` is float32 (3, Y, X): [flow_y, flow_x, cellprob_logit] exactly as Cellpose's
    ``eval(compute_masks=False)`` returns them (flows ~ 5 x unit vectors, logit threshold 0);
    ``style`` is the unit-norm style vector (D,), D = the net's last width.
    """

    maps: np.ndarray
    style: np.ndarray

    @property
    def flows(self) -> np.ndarray:
        """(2, Y, X) flow field [flow_y, flow_x]."""
        return self.maps[:2]

    @property
    def cellprob(self) -> np.ndarray:
        """(Y, X) cell-probability logit."""
        return self.maps[2]


def diam_mean_of(net: torch.nn.Module) -> float:
    """The diameter (pixels) objects were rescaled to during training."""
    return float(net.diam_mean.detach().cpu().numpy()[0])


def diam_labels_of(net: torch.nn.Module) -> float:
    """The mean object diameter of the training labels (Cellpose's default inference diameter)."""
    return float(net.diam_labels.detach().cpu().numpy()[0])


def _rescale_factor(net: torch.nn.Module, diameter: float | None) -> float:
    """diam_mean / diameter, as Cellpose's ``eval``: objects are resized to the training size."""
    if diameter is None or diameter == 0:
        diameter = diam_labels_of(net)
    diameter = float(diameter)
    if not np.isfinite(diameter) or diameter < 0:
        raise BackboneInputError(f"object diameter must be a positive number of pixels, got {diameter}")
    return diam_mean_of(net) / diameter


def _check_image(image: np.ndarray, ndim: int, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != ndim:
        raise BackboneInputError(f"{what} must have {ndim} dimensions, got shape {image.shape}")
    if image.shape[-1] < 2 or image.shape[-2] < 2:
        raise BackboneInputError(f"{what} is too small to segment: shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool) or np.iscomplexobj(image):
        raise BackboneInputError(f"{what} must hold real numbers, got dtype {image.dtype}")
    return image


def _normalize_channels(stack_yxk: np.ndarray, normalization: Normalization) -> np.ndarray:
    """Normalise a (Y, X, K) float32 stack of reporter channels in one Cellpose call."""
    return transforms.normalize_img(stack_yxk, axis=-1, **normalization.cellpose_params())


def _resize_yxc(stack_yxc: np.ndarray, rescale: float) -> np.ndarray:
    """Resize a (Y, X, C) stack by ``rescale`` with Cellpose's own rounding (int(L * rsz))."""
    out = transforms.resize_image(stack_yxc, rsz=rescale)
    return out if out.ndim == 3 else out[..., np.newaxis]  # cv2 drops a single channel axis


def _resize_to(stack_yxc: np.ndarray, ly: int, lx: int) -> np.ndarray:
    out = transforms.resize_image(stack_yxc, Ly=ly, Lx=lx)
    return out if out.ndim == 3 else out[..., np.newaxis]


def _with_zero_channel(reporter_yx: np.ndarray) -> np.ndarray:
    """(2, Y, X): the reporter and the zero second channel our models are trained with."""
    out = np.zeros((INPUT_CHANNELS, *reporter_yx.shape), np.float32)
    out[0] = reporter_yx
    return out


def _forward(
    net: torch.nn.Module, batch: np.ndarray, channels_last: bool = False, precision: str = "fp32"
) -> tuple[np.ndarray, np.ndarray]:
    """Run the net on a float32 (B, 2, Y, X) batch on the net's device, in ``precision``.

    Returns float32 ((B, 3, Y, X) maps, (B, D) styles) on the host.
    """
    device = module_device(net)
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)  # the copy overlaps the queued kernels
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device, precision):
        y, style = net(x)[:2]
    return y.float().cpu().numpy(), style.float().cpu().numpy()


def _run_tiled(
    net: torch.nn.Module,
    padded: np.ndarray,
    *,
    bsize: int,
    tile_overlap: float,
    batch_size: int,
    channels_last: bool = False,
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """Cellpose's tiled pass (as ``core.run_net``) on one padded (2, Y, X) image, any CPnet width."""
    tiles, ysub, xsub, ly, lx = transforms.make_tiles(padded, bsize=bsize, augment=False, tile_overlap=tile_overlap)
    ny, nx, nchan, tly, tlx = tiles.shape
    tiles = tiles.reshape(ny * nx, nchan, tly, tlx)
    outputs, styles = [], []
    for start in range(0, tiles.shape[0], batch_size):
        y, style = _forward(net, tiles[start : start + batch_size], channels_last=channels_last, precision=precision)
        outputs.append(y)
        styles.append(style)
    y_all = np.concatenate(outputs)
    maps = transforms.average_tiles(y_all, ysub, xsub, ly, lx)[:, : padded.shape[-2], : padded.shape[-1]]
    style = np.concatenate(styles).sum(axis=0)
    style /= (style**2).sum() ** 0.5
    return maps, style


def predict_maps_joint(
    net: torch.nn.Module,
    image: np.ndarray,
    *,
    diameter: float | None,
    normalization: Normalization = Normalization(),
) -> ChannelMaps:
    """Maps of a joint model (``joint_network``) for a whole (K, Y, X) field, untiled.

    Each reporter is normalised on its own (as for the per-reporter models), the stack is rescaled
    by diam_mean / diameter, padded as Cellpose pads, run once, and the maps resized back.
    """
    image = _check_image(image, 3, "a multi-channel field (channels, Y, X)")
    k, ly0, lx0 = image.shape
    if network_input_channels(net) != k:
        raise BackboneInputError(f"the joint model takes {network_input_channels(net)} channels, the field has {k}")
    rescale = _rescale_factor(net, diameter)
    stack = _normalize_channels(np.ascontiguousarray(image.transpose(1, 2, 0), dtype=np.float32), normalization)
    if rescale != 1.0:
        stack = _resize_yxc(stack, rescale)
    ly, lx = stack.shape[:2]
    ypad1, ypad2, xpad1, xpad2 = transforms.get_pad_yx(ly, lx)
    padded = np.pad(stack.transpose(2, 0, 1), ((0, 0), (ypad1, ypad2), (xpad1, xpad2)))
    y, styles = _forward(net, padded[np.newaxis].astype(np.float32))
    maps = _unpad(y[0], (ypad1, ypad2, xpad1, xpad2))
    if rescale != 1.0:
        maps = _resize_to(np.ascontiguousarray(maps.transpose(1, 2, 0)), ly0, lx0).transpose(2, 0, 1)
    return ChannelMaps(maps=np.ascontiguousarray(maps, dtype=np.float32), style=styles[0].astype(np.float32))


def _pad_for_net(resized_yx: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Zero-pad to a multiple of 16 plus a margin, as Cellpose does; returns (2, Y', X') and pads."""
    ly, lx = resized_yx.shape
    ypad1, ypad2, xpad1, xpad2 = transforms.get_pad_yx(ly, lx)
    padded = np.pad(_with_zero_channel(resized_yx), ((0, 0), (ypad1, ypad2), (xpad1, xpad2)))
    return padded, (ypad1, ypad2, xpad1, xpad2)


def _unpad(maps: np.ndarray, pads: tuple[int, int, int, int]) -> np.ndarray:
    ypad1, ypad2, xpad1, xpad2 = pads
    return maps[:, ypad1 : maps.shape[-2] - ypad2, xpad1 : maps.shape[-1] - xpad2]


def predict_maps(
    net: torch.nn.Module,
    image: np.ndarray,
    *,
    diameter: float | None,
    normalization: Normalization = Normalization(),
    tile: bool = True,
    bsize: int = 224,
    tile_overlap: float = 0.1,
    batch_size: int = 8,
    precision: str = "fp32",
) -> ChannelMaps:
    """Raw maps of one (Y, X) reporter image: Cellpose's own pipeline with a width-agnostic forward.

    Normalise (``transforms.normalize_img``), rescale by diam_mean / diameter, zero-pad
    (``get_pad_yx``), run the net in 224-pixel tiles averaged with Cellpose's taper
    (``make_tiles`` / ``average_tiles``) or, with ``tile=False``, in one untiled pass, crop, and
    resize the maps back to the input size. With ``tile=True`` the result equals
    ``CellposeModel.eval(image, channels=[0, 0], diameter=diameter, compute_masks=False)``.
    ``diameter=None`` uses the net's ``diam_labels``. The net runs on its own device;
    ``precision`` other than fp32 gives up that equality for speed (``app.science.device``).
    """
    image = _check_image(image, 2, "a single-channel image")
    rescale = _rescale_factor(net, diameter)
    ly0, lx0 = image.shape
    normalized = _normalize_channels(image.astype(np.float32)[..., np.newaxis], normalization)
    if rescale != 1.0:
        # Resized with the zero second channel alongside, as Cellpose does: OpenCV's result for a
        # 1-channel array differs in the last bit from the same channel inside a 2-channel array.
        with_zero = np.concatenate([normalized, np.zeros_like(normalized)], axis=-1)
        resized = _resize_yxc(with_zero, rescale)[..., 0]
    else:
        resized = normalized[..., 0]
    padded, pads = _pad_for_net(resized)
    if tile:
        maps, style = _run_tiled(
            net, padded, bsize=bsize, tile_overlap=tile_overlap, batch_size=batch_size, precision=precision
        )
    else:
        y, styles = _forward(net, padded[np.newaxis], precision=precision)
        maps, style = y[0], styles[0]
    maps = _unpad(maps, pads)
    if rescale != 1.0:
        maps = _resize_to(np.ascontiguousarray(maps.transpose(1, 2, 0)), ly0, lx0).transpose(2, 0, 1)
    return ChannelMaps(maps=np.ascontiguousarray(maps, dtype=np.float32), style=style.astype(np.float32))


#: Whether the multi-channel fast path runs convolutions in channels-last (NHWC) layout; measured
#: on the 2-core CPU here (see ``app/benchmarks/fused.py``). The tiled single-channel path keeps
#: the default layout so that it reproduces Cellpose's ``eval`` bit for bit.
FAST_PATH_CHANNELS_LAST = True


def _per_channel(value, k: int, what: str) -> list:
    """Broadcast one value to K channels, or check a per-channel sequence has length K."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value] * k
    values = list(value)
    if len(values) != k:
        raise BackboneInputError(f"got {len(values)} {what} for an image with {k} channels")
    return values


@dataclass(frozen=True)
class ChannelPlan:
    """How the K channels of a field go through their nets: per-channel net, rescale factor and
    normalisation, and the groups of channels sharing a rescale factor (resized together)."""

    nets: tuple[torch.nn.Module, ...]
    rescales: tuple[float, ...]
    norms: tuple[Normalization, ...]
    groups: tuple[tuple[int, ...], ...]

    @property
    def n_channels(self) -> int:
        return len(self.nets)


def plan_channels(
    nets: Sequence[torch.nn.Module],
    n_channels: int,
    *,
    diameter: float | None | Sequence[float | None],
    normalizations: Normalization | Sequence[Normalization] | None = None,
) -> ChannelPlan:
    """Check one net, diameter and normalisation per channel and group channels by rescale factor."""
    nets = list(nets)
    k = n_channels
    if len(nets) != k:
        raise BackboneInputError(f"got {len(nets)} networks for a field with {k} channels: give one per channel")
    diameters = _per_channel(diameter, k, "diameters")
    norms = _per_channel(Normalization() if normalizations is None else normalizations, k, "normalisations")
    for norm in norms:
        if not isinstance(norm, Normalization):
            raise BackboneInputError(f"normalisations must be Normalization records, got {type(norm).__name__}")
    rescales = [_rescale_factor(net, d) for net, d in zip(nets, diameters)]
    groups = tuple(tuple(c for c in range(k) if rescales[c] == r) for r in dict.fromkeys(rescales))
    return ChannelPlan(tuple(nets), tuple(rescales), tuple(norms), groups)


@dataclass
class PreparedField:
    """A field normalised, resized and padded for its nets (host memory, float32).

    ``padded[g]`` is (n_g, 2, Y', X') for the channels ``plan.groups[g]``; ``pads[g]`` its padding.
    """

    shape: tuple[int, int, int]
    padded: list[np.ndarray]
    pads: list[tuple[int, int, int, int]]
    outputs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # per group: maps, styles

    @property
    def batch_key(self) -> tuple:
        """Fields with equal keys can share a network batch."""
        return tuple(p.shape for p in self.padded)


def prepare_field(image: np.ndarray, plan: ChannelPlan) -> PreparedField:
    """Normalise (one Cellpose call per distinct normalisation), resize (one OpenCV call per
    rescale group) and pad a (K, Y, X) field for ``plan``'s nets. CPU only: runs beside the nets."""
    image = _check_image(image, 3, "a multi-channel field (channels, Y, X)")
    k, ly0, lx0 = image.shape
    if k != plan.n_channels:
        raise BackboneInputError(f"got {plan.n_channels} networks for a field with {k} channels: give one per channel")
    # One (Y, X, K) float32 copy of the field; normalised in place per group of equal settings.
    # Always a copy: for K = 1 the transpose is already "contiguous" to numpy, so ascontiguousarray
    # would return a view and the in-place normalisation would overwrite the caller's field.
    stack = np.array(image.transpose(1, 2, 0), dtype=np.float32, order="C", copy=True)
    for norm in dict.fromkeys(plan.norms):
        same = [c for c in range(k) if plan.norms[c] == norm]
        stack[..., same] = _normalize_channels(np.ascontiguousarray(stack[..., same]), norm)
    padded_groups, pads_groups = [], []
    for idx in plan.groups:
        rescale = plan.rescales[idx[0]]
        group = np.ascontiguousarray(stack[..., list(idx)])
        resized = _resize_yxc(group, rescale) if rescale != 1.0 else group
        padded_list, pads = [], (0, 0, 0, 0)
        for j in range(len(idx)):
            padded, pads = _pad_for_net(resized[..., j])
            padded_list.append(padded)
        padded_groups.append(np.stack(padded_list))
        pads_groups.append(pads)
    return PreparedField((k, ly0, lx0), padded_groups, pads_groups)


def forward_fields(
    fields: Sequence[PreparedField],
    plan: ChannelPlan,
    *,
    channels_last: bool | None = None,
    precision: str = "fp32",
    checkpoint: Callable[[], None] | None = None,
) -> None:
    """One untiled network pass per (rescale group, net) over *all* ``fields`` at once.

    Channels that share a net, of every field given, form one batch: the weights are read once per
    batch and a GPU gets enough work to fill it. The fields must share ``batch_key``. Fills each
    field's ``outputs``. ``checkpoint`` is called after each pass (a job's cancellation point).
    """
    if channels_last is None:
        channels_last = FAST_PATH_CHANNELS_LAST
    if len({f.batch_key for f in fields}) > 1:
        raise BackboneInputError("fields batched together must have the same shape")
    for prepared in fields:
        prepared.outputs = []
    for g, idx in enumerate(plan.groups):
        n = len(idx)
        field_maps: list[list] = [[None] * n for _ in fields]
        field_styles: list[list] = [[None] * n for _ in fields]
        # Channels sharing a net run as one batch: one set of weights read per pass.
        for net_id in dict.fromkeys(id(plan.nets[c]) for c in idx):
            members = [j for j, c in enumerate(idx) if id(plan.nets[c]) == net_id]
            net = plan.nets[idx[members[0]]]
            batch = np.concatenate([f.padded[g][members] for f in fields])
            y, s = _forward(net, batch, channels_last=channels_last, precision=precision)
            for i in range(len(fields)):
                for b, j in enumerate(members):
                    field_maps[i][j] = y[i * len(members) + b]
                    field_styles[i][j] = s[i * len(members) + b]
            if checkpoint is not None:
                checkpoint()
        for i, prepared in enumerate(fields):
            prepared.outputs.append((np.stack(field_maps[i]), np.stack(field_styles[i])))


def _forward_tiled(
    prepared: PreparedField,
    plan: ChannelPlan,
    *,
    bsize: int,
    tile_overlap: float,
    batch_size: int,
    channels_last: bool,
    precision: str,
    checkpoint: Callable[[], None] | None = None,
) -> None:
    prepared.outputs = []
    for g, idx in enumerate(plan.groups):
        maps, styles = [], []
        for j, c in enumerate(idx):
            m, s = _run_tiled(
                plan.nets[c],
                prepared.padded[g][j],
                bsize=bsize,
                tile_overlap=tile_overlap,
                batch_size=batch_size,
                channels_last=channels_last,
                precision=precision,
            )
            maps.append(m)
            styles.append(s)
            if checkpoint is not None:
                checkpoint()
        prepared.outputs.append((np.stack(maps), np.stack(styles)))


def finish_field(prepared: PreparedField, plan: ChannelPlan) -> list[ChannelMaps]:
    """Crop the padding and resize each group's maps back to the field's size (CPU)."""
    k, ly0, lx0 = prepared.shape
    if len(prepared.outputs) != len(plan.groups):
        raise BackboneInputError("the field has not been through its networks yet (forward_fields)")
    maps_out: list[np.ndarray | None] = [None] * k
    styles_out: list[np.ndarray | None] = [None] * k
    for g, idx in enumerate(plan.groups):
        group_maps, group_styles = prepared.outputs[g]
        pads = prepared.pads[g]
        cropped = np.stack([_unpad(group_maps[j], pads) for j in range(len(idx))])  # (n, 3, Yr, Xr)
        if plan.rescales[idx[0]] != 1.0:
            n = len(idx)
            yxc = np.ascontiguousarray(cropped.reshape(n * 3, *cropped.shape[-2:]).transpose(1, 2, 0))
            cropped = _resize_to(yxc, ly0, lx0).transpose(2, 0, 1).reshape(n, 3, ly0, lx0)
        for j, c in enumerate(idx):
            maps_out[c] = np.ascontiguousarray(cropped[j], dtype=np.float32)
            styles_out[c] = group_styles[j]
    return [
        ChannelMaps(maps=m, style=np.asarray(s, np.float32))  # type: ignore[arg-type]
        for m, s in zip(maps_out, styles_out)
    ]


def predict_maps_multi(
    nets: Sequence[torch.nn.Module],
    image: np.ndarray,
    *,
    diameter: float | None | Sequence[float | None],
    normalizations: Normalization | Sequence[Normalization] | None = None,
    tile: bool = False,
    bsize: int = 224,
    tile_overlap: float = 0.1,
    batch_size: int = 8,
    channels_last: bool | None = None,
    precision: str = "fp32",
    checkpoint: Callable[[], None] | None = None,
) -> list[ChannelMaps]:
    """Raw maps of every channel of a (K, Y, X) field, channel k through ``nets[k]``.

    The fast path for a field: channels that share a normalisation are normalised in one Cellpose
    call, channels that share a rescale factor are resized (and their maps resized back) in one
    OpenCV call, and channels that share both the net and the rescale factor go through the net as
    one batch. Untiled by default: one pass over the padded image pushes ~1.7x fewer pixels
    through the net than Cellpose's 10 %-overlap tiles for a 512 x 512 field. ``diameter`` and
    ``normalizations`` are one value for all channels or one per channel. The nets run on their
    own device in ``precision``. ``checkpoint`` is called after each network pass (a job's
    cancellation point between channels).

    With ``tile=True``, ``channels_last=False`` and fp32 each channel matches ``predict_maps`` to
    float rounding (exactly when no rescale is needed: OpenCV rounds a K-channel resize differently).
    """
    image = _check_image(image, 3, "a multi-channel field (channels, Y, X)")
    plan = plan_channels(nets, image.shape[0], diameter=diameter, normalizations=normalizations)
    if channels_last is None:
        channels_last = FAST_PATH_CHANNELS_LAST
    prepared = prepare_field(image, plan)
    if tile:
        _forward_tiled(
            prepared,
            plan,
            bsize=bsize,
            tile_overlap=tile_overlap,
            batch_size=batch_size,
            channels_last=channels_last,
            precision=precision,
            checkpoint=checkpoint,
        )
    else:
        forward_fields([prepared], plan, channels_last=channels_last, precision=precision, checkpoint=checkpoint)
    return finish_field(prepared, plan)


def default_niter(diameter: float, diam_mean: float) -> float:
    """Dynamics steps for objects of ``diameter`` pixels: 200 x diameter / diam_mean, as ``eval``.

    Written as Cellpose writes it (1 / rescale * 200, truncated to an integer by Cellpose).
    """
    return 1.0 / (float(diam_mean) / float(diameter)) * 200


def min_size_for(min_size: int, diameter: float, diam_mean: float) -> int:
    """``min_size`` (pixels at the training scale) in the input's pixels, for objects of ``diameter``.

    Cellpose removes masks under 15 input pixels whatever the object size; for nuclei of 5 px
    (area ~20 px) that cut-off removes real objects. Read at the training scale (objects of
    ``diam_mean``), the cut-off shrinks by (diameter / diam_mean)^2 for smaller objects and stays
    Cellpose's for larger ones. Chosen on the v3 base's validation images rescaled 0.5x-2x (pooled
    F1 at true diameters 0.791 -> 0.794, +0.012 at 0.5x); held out, 0.863 -> 0.869 at 0.5x and no
    change from 1x up (``models_zoo/BASE_MODEL.md``).

    >>> min_size_for(15, 10.0, 30.0), min_size_for(15, 30.0, 30.0), min_size_for(15, 60.0, 30.0)
    (2, 15, 15)
    """
    if min_size <= 0:
        return int(min_size)
    scale = min(1.0, float(diameter) / float(diam_mean)) ** 2
    return max(1, int(round(min_size * scale)))


def masks_from_maps(
    maps: ChannelMaps | np.ndarray,
    *,
    diameter: float,
    diam_mean: float,
    flow_threshold: float | None = 0.4,
    cellprob_threshold: float = 0.0,
    min_size: int = 15,
    niter: float | None = None,
    max_size_fraction: float = 0.4,
    device: torch.device | str | None = None,
    min_size_at_training_scale: bool = True,
) -> np.ndarray:
    """Instance labels (Y, X) int32 from maps at full resolution, as Cellpose's ``eval`` does.

    ``eval`` resamples the maps to the input size before the dynamics (``resample=True``), so the
    dynamics run at full resolution with ``niter = 200 * diameter / diam_mean`` and no resize of
    the masks. ``flow_threshold`` None or 0 turns the flow-error quality check off. ``device``
    (default the CPU) is where Cellpose follows the flows and checks the flow errors.
    ``min_size`` is read at the training scale (``min_size_for``); ``min_size_at_training_scale``
    False keeps Cellpose's literal pixels, and with it the result equals ``eval``'s masks.
    """
    arr = maps.maps if isinstance(maps, ChannelMaps) else np.asarray(maps)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise BackboneInputError(f"maps must be (3, Y, X) [flow_y, flow_x, cellprob], got shape {arr.shape}")
    if not (diameter and diameter > 0 and diam_mean and diam_mean > 0):
        raise BackboneInputError(f"diameter and diam_mean must be positive, got {diameter} and {diam_mean}")
    arr = arr.astype(np.float32, copy=False)
    if niter is None or niter == 0:
        niter = default_niter(diameter, diam_mean)
    masks = dynamics.resize_and_compute_masks(
        arr[:2],
        arr[2],
        niter=niter,
        cellprob_threshold=cellprob_threshold,
        flow_threshold=flow_threshold,
        interp=True,
        min_size=min_size_for(min_size, diameter, diam_mean) if min_size_at_training_scale else min_size,
        max_size_fraction=max_size_fraction,
        resize=None,
        device=torch.device("cpu") if device is None else torch.device(device),
    )
    return np.asarray(masks, dtype=np.int32)


def masks_for_flow_thresholds(
    maps: ChannelMaps | np.ndarray,
    *,
    diameter: float,
    diam_mean: float,
    flow_thresholds: Sequence[float | None],
    cellprob_threshold: float = 0.0,
    min_size: int = 15,
    niter: float | None = None,
    max_size_fraction: float = 0.4,
    min_size_at_training_scale: bool = True,
) -> list[np.ndarray]:
    """``masks_from_maps`` for several flow-error thresholds at the price of one reconstruction.

    Cellpose runs the dynamics first and drops masks whose flow error exceeds the threshold
    afterwards, so the dynamics and the flow errors are computed once here and each threshold only
    filters; every result equals ``masks_from_maps(..., flow_threshold=t)``. Threshold searches
    (``fusion_fitting``) are built on this.
    """
    from cellpose import metrics as cp_metrics
    from cellpose import utils as cp_utils

    arr = maps.maps if isinstance(maps, ChannelMaps) else np.asarray(maps)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise BackboneInputError(f"maps must be (3, Y, X) [flow_y, flow_x, cellprob], got shape {arr.shape}")
    if not (diameter and diameter > 0 and diam_mean and diam_mean > 0):
        raise BackboneInputError(f"diameter and diam_mean must be positive, got {diameter} and {diam_mean}")
    arr = arr.astype(np.float32, copy=False)
    if niter is None or niter == 0:
        niter = default_niter(diameter, diam_mean)
    if min_size_at_training_scale:
        min_size = min_size_for(min_size, diameter, diam_mean)
    raw = dynamics.compute_masks(
        arr[:2],
        arr[2],
        niter=niter,
        cellprob_threshold=cellprob_threshold,
        flow_threshold=0,
        interp=True,
        max_size_fraction=max_size_fraction,
        device=torch.device("cpu"),
    )
    raw = np.asarray(raw)
    errors = cp_metrics.flow_error(raw, arr[:2], torch.device("cpu"))[0] if raw.max() > 0 else np.zeros(0)
    out = []
    for threshold in flow_thresholds:
        masks = raw.copy()
        if threshold is not None and threshold > 0 and masks.max() > 0:
            bad = 1 + np.flatnonzero(errors > threshold)
            masks[np.isin(masks, bad)] = 0
        masks = cp_utils.fill_holes_and_remove_small_masks(masks, min_size=min_size)
        out.append(np.asarray(masks, dtype=np.int32))
    return out
