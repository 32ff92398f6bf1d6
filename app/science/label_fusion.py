"""Label-fusion baselines: fuse K per-channel INSTANCE segmentations into one.

Flow Fusion averages network maps before any mask exists; the classical alternative segments every
channel on its own and fuses the K label images afterwards. That happens in two steps here:

1. **Foreground fusion** on the binary masks (object vs background) of the K raters:

   - ``staple``: STAPLE (Warfield, Zou & Wells, IEEE TMI 2004) via SimpleITK's
     ``STAPLEImageFilter``: EM estimate of each rater's sensitivity/specificity and a per-pixel
     foreground probability, thresholded at ``threshold`` (0.5).
   - ``voting``: pixel-wise majority vote via SimpleITK's ``LabelVotingImageFilter``; ties (an
     even split) go to background.
   - ``simple``: SIMPLE (Langerak et al., "Label fusion in atlas-based segmentation using a
     selective and iterative method for performance level estimation", IEEE TMI 29(12), 2010),
     written here: start from the majority vote; score every rater against the current consensus
     by Dice; drop raters scoring below ``mean - alpha * sd`` of the scores (or below a fixed
     ``min_dice``); recompute the consensus as a vote weighted by the Dice scores; repeat until no
     rater is dropped (or ``max_iter``).
   - ``majority_voting``: majority voting in patches. The field is cut into ``patch_size`` squares
     (16 x 16); in each patch the rater whose foreground agrees best with the others there (highest
     summed Dice to the other raters, i.e. the majority's representative) is copied. Unlike
     pixel voting this keeps one rater's coherent object outlines inside each patch.

2. **Instance recovery** (documented, the same for every method): label images carry identities
   that binary fusion loses. Each rater's instances are shrunk to their cores (pixels whose
   distance to the instance's edge is at least ``marker_fraction`` of the instance's largest such
   distance); pixels of the fused foreground where at least half of the raters that have an
   object there have its core (or at least ``marker_votes`` raters, when given) form the markers
   (connected components). Each rater's instance belongs to the marker it overlaps most, and each fused
   foreground pixel takes the marker that most raters' instances there belong to (so the raters'
   own boundaries between touching objects survive). A seeded watershed
   (``skimage.segmentation.watershed``) on the negated distance transform of the fused
   foreground, restricted to it, gives the remaining foreground pixels to these seeds; fused
   foreground components that received no marker become instances of their own; objects below
   ``min_size`` pixels are dropped. Touching objects stay apart because each rater's cores are.

>>> import numpy as np
>>> rater = np.zeros((8, 12), np.int32); rater[1:7, 1:5] = 1; rater[1:7, 6:11] = 2
>>> fused = fuse_labels([rater, rater, rater], "voting", min_size=1)
>>> int(fused.max()), bool(((fused > 0) == (rater > 0)).all())
(2, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries, relabel_sequential, watershed

#: Every fusion a field can be segmented with; ``flow_fusion`` fuses maps, the others labels.
FUSION_METHODS: tuple[str, ...] = ("flow_fusion", "staple", "simple", "voting", "majority_voting")
#: The methods ``fuse_labels`` implements.
LABEL_FUSION_METHODS: tuple[str, ...] = ("staple", "simple", "voting", "majority_voting")

_METHOD_PARAMS: dict[str, frozenset[str]] = {
    "staple": frozenset({"threshold"}),
    "voting": frozenset(),
    "simple": frozenset({"alpha", "min_dice", "max_iter", "tolerance"}),
    "majority_voting": frozenset({"patch_size"}),
}
_RECOVERY_PARAMS = frozenset({"marker_fraction", "marker_votes", "min_size"})


class LabelFusionError(ValueError):
    """Per-channel label images or fusion settings that cannot be fused."""


@dataclass(frozen=True)
class SimpleResult:
    """SIMPLE's consensus foreground, which raters survived and their final Dice weights."""

    foreground: np.ndarray
    kept: tuple[int, ...]
    weights: tuple[float, ...]
    iterations: int


def _check_raters(per_channel_labels: Sequence[np.ndarray]) -> list[np.ndarray]:
    raters = [np.asarray(labels) for labels in per_channel_labels]
    if not raters:
        raise LabelFusionError("no per-channel segmentations to fuse: give at least one label image")
    shape = raters[0].shape
    for index, labels in enumerate(raters):
        if labels.ndim != 2:
            raise LabelFusionError(f"segmentation {index} must be a 2-D label image, got shape {labels.shape}")
        if labels.shape != shape:
            raise LabelFusionError(
                f"segmentation {index} has shape {labels.shape}, segmentation 0 has {shape}: "
                "all channels of a field must have the same size"
            )
        if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
            raise LabelFusionError(f"segmentation {index} must hold integer labels, got dtype {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise LabelFusionError(f"segmentation {index} has negative labels; 0 is background, objects are 1, 2, ...")
    return raters


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


# ---------------------------------------------------------------------------------------------
# Foreground fusion
# ---------------------------------------------------------------------------------------------


def staple_foreground(binaries: Sequence[np.ndarray], threshold: float = 0.5) -> np.ndarray:
    """STAPLE (SimpleITK) foreground probability >= ``threshold``."""
    if not 0.0 < threshold <= 1.0:
        raise LabelFusionError(f"STAPLE threshold must be in (0, 1], got {threshold}")
    if not any(b.any() for b in binaries):
        return np.zeros(binaries[0].shape, bool)  # STAPLE's EM is undefined (NaN) without foreground
    images = [sitk.GetImageFromArray(b.astype(np.uint8)) for b in binaries]
    staple = sitk.STAPLEImageFilter()
    staple.SetForegroundValue(1.0)
    probability = np.nan_to_num(sitk.GetArrayFromImage(staple.Execute(*images)), nan=0.0)
    return probability >= threshold


def voting_foreground(binaries: Sequence[np.ndarray]) -> np.ndarray:
    """Pixel majority vote (SimpleITK ``LabelVotingImageFilter``); ties -> background."""
    images = [sitk.GetImageFromArray(b.astype(np.uint8)) for b in binaries]
    voting = sitk.LabelVotingImageFilter()
    voting.SetLabelForUndecidedPixels(0)
    return sitk.GetArrayFromImage(voting.Execute(*images)) == 1


def simple_foreground(
    binaries: Sequence[np.ndarray],
    alpha: float = 1.0,
    min_dice: float | None = None,
    max_iter: int = 10,
    tolerance: float = 0.1,
) -> SimpleResult:
    """SIMPLE (Langerak et al., IEEE TMI 2010): iterative, Dice-weighted voting that drops poor raters.

    A rater is dropped when its Dice to the consensus is below ``mean - alpha * sd`` of the
    remaining raters' scores, or below ``min_dice`` when that is given. At least one rater stays.
    Our addition for few raters: a rater within ``tolerance`` Dice of the best one is never dropped
    (with 3-5 channels the sd of near-equal scores is tiny, and the rule alone would discard a
    rater whose outlines are one pixel thinner: Dice ~0.9 on 20-pixel objects).
    """
    if alpha < 0 or max_iter < 1:
        raise LabelFusionError(f"SIMPLE needs alpha >= 0 and max_iter >= 1, got alpha={alpha}, max_iter={max_iter}")
    stack = np.stack([b.astype(bool) for b in binaries])
    kept = list(range(len(stack)))
    weights = np.ones(len(stack))
    consensus = stack.sum(axis=0) * 2 > len(stack)
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - the count is returned after the loop
        scores = np.array([_dice(stack[i], consensus) for i in kept])
        limit = float(min_dice) if min_dice is not None else scores.mean() - alpha * scores.std()
        limit = min(limit, scores.max() - tolerance)
        survivors = [i for i, s in zip(kept, scores) if s >= limit] or [kept[int(np.argmax(scores))]]
        weights = np.array([s for i, s in zip(kept, scores) if i in survivors])
        dropped = len(survivors) < len(kept)
        kept = survivors
        if weights.sum() <= 0:
            weights = np.ones(len(kept))
        vote = np.tensordot(weights, stack[kept].astype(np.float64), axes=1)
        new_consensus = vote * 2 > weights.sum()
        converged = not dropped and np.array_equal(new_consensus, consensus)
        consensus = new_consensus
        if converged:
            break
    return SimpleResult(consensus, tuple(kept), tuple(float(w) for w in weights), iterations)


def patch_majority_foreground(binaries: Sequence[np.ndarray], patch_size: int = 16) -> np.ndarray:
    """Per ``patch_size`` square, copy the rater that agrees best (summed Dice) with the others."""
    if patch_size < 1:
        raise LabelFusionError(f"patch_size must be >= 1 pixel, got {patch_size}")
    stack = np.stack([b.astype(bool) for b in binaries])
    k, ly, lx = stack.shape
    fused = np.zeros((ly, lx), bool)
    for y0 in range(0, ly, patch_size):
        for x0 in range(0, lx, patch_size):
            patch = stack[:, y0 : y0 + patch_size, x0 : x0 + patch_size].reshape(k, -1)
            sums = patch.sum(axis=1)
            overlap = patch.astype(np.int32) @ patch.T.astype(np.int32)
            denominator = sums[:, None] + sums[None, :]
            dice = np.where(denominator > 0, 2.0 * overlap / np.maximum(denominator, 1), 1.0)
            agreement = dice.sum(axis=1) - np.diag(dice)
            best = int(np.argmax(agreement))  # ties: the first such rater
            fused[y0 : y0 + patch_size, x0 : x0 + patch_size] = stack[best, y0 : y0 + patch_size, x0 : x0 + patch_size]
    return fused


# ---------------------------------------------------------------------------------------------
# Instance recovery
# ---------------------------------------------------------------------------------------------


def instance_cores(labels: np.ndarray, marker_fraction: float = 0.5) -> np.ndarray:
    """Boolean cores of each instance: distance to its own edge >= fraction x its largest distance."""
    labels = np.asarray(labels)
    if not labels.any():
        return np.zeros(labels.shape, bool)
    # Touching instances share no edge pixels once their inner boundaries are removed.
    inside = (labels > 0) & ~find_boundaries(labels, mode="inner")
    distance = ndi.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
    compact, _, _ = relabel_sequential(labels.astype(np.int64))
    largest = np.zeros(int(compact.max()) + 1)
    np.maximum.at(largest, compact.ravel(), distance.ravel())
    cores = (compact > 0) & (distance >= marker_fraction * largest[compact]) & (distance > 0)
    # An instance too thin to have an inside keeps all its pixels as its core.
    thin = (compact > 0) & (largest[compact] == 0)
    return cores | thin


def _vote_instances(markers: np.ndarray, n_markers: int, raters: Sequence[np.ndarray]) -> np.ndarray:
    """Each pixel takes the marker that most raters' instances there belong to (0: no rater says).

    A rater's instance belongs to the marker it overlaps most. Voting on whole instances keeps the
    raters' own boundaries between touching objects; identical raters give their instances back.
    """
    best = np.zeros(markers.shape, np.int32)
    if n_markers == 0:
        return best
    assigned = np.zeros((len(raters), *markers.shape), np.int32)
    for r, labels in enumerate(raters):
        compact = relabel_sequential(np.asarray(labels).astype(np.int64))[0]
        n_ids = int(compact.max())
        if n_ids == 0:
            continue
        both = (compact > 0) & (markers > 0)
        table = np.bincount(
            compact[both] * (n_markers + 1) + markers[both], minlength=(n_ids + 1) * (n_markers + 1)
        ).reshape(n_ids + 1, n_markers + 1)
        owner = np.where(table.max(axis=1) > 0, table.argmax(axis=1), 0)
        owner[0] = 0
        assigned[r] = owner[compact]
    best_count = np.zeros(markers.shape, np.int32)
    for candidate in assigned:
        count = (assigned == candidate).sum(axis=0)
        better = (candidate > 0) & (count > best_count)
        best[better] = candidate[better]
        best_count[better] = count[better]
    return best


def recover_instances(
    foreground: np.ndarray,
    raters: Sequence[np.ndarray],
    *,
    marker_fraction: float = 0.5,
    marker_votes: int | None = None,
    min_size: int = 15,
) -> np.ndarray:
    """Instances inside a fused ``foreground`` from the raters' instance cores (see module notes)."""
    if not 0.0 <= marker_fraction < 1.0:
        raise LabelFusionError(f"marker_fraction must be in [0, 1), got {marker_fraction}")
    foreground = np.asarray(foreground, bool)
    if not foreground.any():
        return np.zeros(foreground.shape, np.int32)
    if marker_votes is not None and not 1 <= int(marker_votes) <= len(raters):
        raise LabelFusionError(
            f"marker_votes must be between 1 and {len(raters)} (the raters used), got {marker_votes}"
        )
    core_votes = np.zeros(foreground.shape, np.int32)
    object_votes = np.zeros(foreground.shape, np.int32)
    for labels in raters:
        core_votes += instance_cores(labels, marker_fraction)
        object_votes += np.asarray(labels) > 0
    if marker_votes is None:
        # At least half of the raters that see an object here see its core: an object only some
        # channels show still gets a marker, a stray object of one rater inside another's does not.
        seeds_here = (core_votes >= 1) & (2 * core_votes >= object_votes)
    else:
        seeds_here = core_votes >= int(marker_votes)
    markers, n_markers = ndi.label(seeds_here & foreground)
    seeds = _vote_instances(markers, n_markers, raters) * foreground
    distance = ndi.distance_transform_edt(foreground)
    labels = watershed(-distance, seeds, mask=foreground) if seeds.any() else np.zeros(foreground.shape, np.int64)
    # Fused foreground that no marker reached (an object too few raters had) is an object itself.
    orphans, n_orphans = ndi.label(foreground & (labels == 0))
    if n_orphans:
        labels = np.where(orphans > 0, orphans + labels.max(), labels)
    if min_size > 0:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        labels = np.where(small[labels], 0, labels)
    return relabel_sequential(labels.astype(np.int32))[0].astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def fuse_labels(per_channel_labels: Sequence[np.ndarray], method: str, **params) -> np.ndarray:
    """Fuse K per-channel instance segmentations (Y, X) into one int32 label image.

    ``method`` is one of ``LABEL_FUSION_METHODS``; ``params`` are the method's own settings
    (``threshold`` for staple; ``alpha``, ``min_dice``, ``max_iter``, ``tolerance`` for simple; ``patch_size``
    for majority_voting) and the instance-recovery settings ``marker_fraction``, ``marker_votes``
    and ``min_size``.
    """
    if method not in FUSION_METHODS:
        raise LabelFusionError(f"unknown fusion method {method!r}; valid methods: {', '.join(FUSION_METHODS)}")
    if method == "flow_fusion":
        raise LabelFusionError(
            "flow_fusion fuses network maps, not label images: use app.science.flow_fusion.flow_fusion "
            f"(or segment_field); label-fusion methods: {', '.join(LABEL_FUSION_METHODS)}"
        )
    allowed = _METHOD_PARAMS[method] | _RECOVERY_PARAMS
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise LabelFusionError(f"{method} does not take {', '.join(unknown)}; it takes: {', '.join(sorted(allowed))}")
    raters = _check_raters(per_channel_labels)
    binaries = [labels > 0 for labels in raters]
    method_params = {name: value for name, value in params.items() if name in _METHOD_PARAMS[method]}
    recovery_params = {name: value for name, value in params.items() if name in _RECOVERY_PARAMS}
    used = raters
    if method == "staple":
        foreground = staple_foreground(binaries, **method_params)
    elif method == "voting":
        foreground = voting_foreground(binaries)
    elif method == "simple":
        result = simple_foreground(binaries, **method_params)
        foreground = result.foreground
        used = [raters[i] for i in result.kept]  # dropped raters do not seed instances either
    else:
        foreground = patch_majority_foreground(binaries, **method_params)
    return recover_instances(foreground, used, **recovery_params)
