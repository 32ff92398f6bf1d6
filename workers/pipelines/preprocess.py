"""Preprocessing recipes inside jobs: per-plate illumination profiles and plate-level percentiles.

A fine-tune fixes a recipe (``app.job_params.PreprocessingRecipe``) and records on the model card
what it fitted; segmentation applies each channel's model's recipe (or the request's override) to
the plate it is given: a BaSiC flatfield estimated from the plate's own fields (stored as an
``IlluminationProfile`` row), or a stored profile, and percentiles over the plate's fields.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from sqlalchemy import select

from app.job_params import PreprocessingRecipe, recipe_from_card, training_profile_from_card
from app.models import IlluminationProfile
from workers.runner import JobContext, JobFailed

log = logging.getLogger(__name__)

#: BaSiC on a large plate: a seeded sample of this many fields is enough for a flatfield.
MAX_PROFILE_FIELDS = 64


class CardedModel(Protocol):
    """A channel's model as preprocessing sees it: a zoo version or a base model, by its card."""

    @property
    def card(self) -> dict[str, Any] | None: ...


def recipe_of(version: CardedModel) -> PreprocessingRecipe:
    return recipe_from_card(version.card)


def training_profile_id(version: CardedModel) -> int | None:
    return (training_profile_from_card(version.card) or {}).get("id")


def load_profile(ctx: JobContext, profile_id: int, channel_name: str, shape: tuple[int, int]):
    """One channel of a stored profile, checked against the field size."""
    from app.science.preprocessing import PreprocessingError, channel_of, illumination_from_tiff

    row = ctx.session.get(IlluminationProfile, profile_id)
    if row is None:
        raise JobFailed(f"illumination profile {profile_id} no longer exists")
    if channel_name not in row.channels:
        raise JobFailed(
            f"illumination profile {profile_id} has no channel {channel_name!r} (it has {', '.join(row.channels)})"
        )
    if (row.height, row.width) != tuple(shape):
        raise JobFailed(
            f"illumination profile {profile_id} is {row.height}×{row.width} but the fields are {shape[0]}×{shape[1]}"
        )
    try:
        model = illumination_from_tiff(ctx.blobs.read_bytes(row.blob_sha256), method=row.method)
    except (KeyError, PreprocessingError) as exc:
        raise JobFailed(f"illumination profile {profile_id} cannot be read: {exc}") from None
    return channel_of(model, row.channels.index(channel_name)), {
        "id": row.id,
        "sha256": row.blob_sha256,
        "source": row.source,
        "method": row.method,
    }


def estimate_profiles(
    ctx: JobContext,
    channel_stacks: dict[str, list[np.ndarray]],
    *,
    darkfield: bool,
    name: str,
    inputs: dict[str, Any],
    dataset_id: int | None = None,
):
    """BaSiC per channel over the given single-channel fields; stored as one profile row.

    -> ({channel: (1, Y, X) IlluminationModel}, reference for provenance)
    """
    from app.science.preprocessing import (
        IlluminationModel,
        PreprocessingError,
        fit_basic,
        illumination_to_tiff,
    )

    names = sorted(channel_stacks)
    earlier = ctx.session.scalar(
        select(IlluminationProfile).where(IlluminationProfile.job_id == ctx.job_id, IlluminationProfile.name == name)
    )
    if earlier is not None and earlier.channels == names:  # a re-run of this job: the same profile
        from app.science.preprocessing import channel_of, illumination_from_tiff

        stored = illumination_from_tiff(ctx.blobs.read_bytes(earlier.blob_sha256), method=earlier.method)
        return (
            {channel: channel_of(stored, k) for k, channel in enumerate(names)},
            {"id": earlier.id, "sha256": earlier.blob_sha256, "source": "estimated", "method": earlier.method},
        )
    flats, darks, models = [], [], {}
    for channel in names:
        fields = channel_stacks[channel]
        if len({f.shape for f in fields}) != 1:
            raise JobFailed(
                f"per-plate illumination correction needs fields of one size; channel {channel!r} has "
                f"{sorted({f.shape for f in fields})}"
            )
        if len(fields) > MAX_PROFILE_FIELDS:
            pick = np.random.default_rng(0).choice(len(fields), MAX_PROFILE_FIELDS, replace=False)
            fields = [fields[i] for i in sorted(pick)]
        try:
            model = fit_basic([f[np.newaxis] for f in fields], get_darkfield=darkfield)
        except PreprocessingError as exc:
            raise JobFailed(f"illumination profile of channel {channel!r}: {exc}") from None
        models[channel] = model
        flats.append(model.flatfield[0])
        darks.append(model.darkfield[0] if model.darkfield is not None else np.zeros_like(model.flatfield[0]))
    stacked = IlluminationModel(
        flatfield=np.stack(flats), darkfield=np.stack(darks) if darkfield else None, method="basic"
    )
    blob = ctx.blobs.put_bytes(illumination_to_tiff(stacked))
    height, width = stacked.flatfield.shape[1:]
    row = IlluminationProfile(
        name=name,
        source="estimated",
        method="basic",
        channels=names,
        height=int(height),
        width=int(width),
        has_darkfield=darkfield,
        blob_sha256=blob.sha256,
        inputs=inputs,
        summary=stacked.summary(),
        dataset_id=dataset_id,
        job_id=ctx.job_id,
    )
    ctx.session.add(row)
    ctx.session.commit()
    return models, {"id": row.id, "sha256": blob.sha256, "source": "estimated", "method": "basic"}


@dataclass
class ChannelPrep:
    """What one channel goes through before its model (for one object)."""

    recipe: PreprocessingRecipe
    recipe_source: str  # "model card" | "request"
    profile: Any = None  # (1, Y, X) IlluminationModel or None
    profile_ref: dict[str, Any] | None = None
    percentiles: tuple[float, float] | None = None

    def record(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.model_dump(mode="json"),
            "recipe_source": self.recipe_source,
            "illumination_profile": self.profile_ref,
            "percentiles": None if self.percentiles is None else list(self.percentiles),
        }


@dataclass
class PlatePreprocessing:
    """Per (object, channel): the prepared input. ``inputs`` turns a raw field into network input."""

    preps: dict[tuple[str, str], ChannelPrep] = field(default_factory=dict)

    def inputs(self, obj: str, plan_channels: list[str], image: np.ndarray, channels: list[str]):
        """-> ((K, Y, X) float32 stack, [Normalization per channel])"""
        from app.science.backbone import Normalization

        stack, norms = [], []
        for name in plan_channels:
            prep = self.preps[(obj, name)]
            plane = image[channels.index(name)].astype(np.float32)
            if prep.profile is not None:
                plane = prep.profile.apply(plane[np.newaxis])[0]
            stack.append(plane)
            if prep.percentiles is not None and prep.percentiles[1] > prep.percentiles[0]:
                norms.append(Normalization(low=prep.percentiles[0], high=prep.percentiles[1]))
            else:
                norms.append(
                    Normalization(
                        lower_percentile=prep.recipe.lower_percentile, upper_percentile=prep.recipe.upper_percentile
                    )
                )
        return np.stack(stack), norms

    def record(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for (obj, name), prep in self.preps.items():
            out.setdefault(obj, {})[name] = prep.record()
        return out


def plan_plate_preprocessing(
    ctx: JobContext,
    versions: Mapping[str, Mapping[str, CardedModel]],
    override: PreprocessingRecipe | None,
    n_fields: int,
    read_fields: Callable[[], Iterable[np.ndarray]],
    channels: list[str],
    on_progress: Callable[[str], None],
) -> PlatePreprocessing:
    """Fit what the recipes of a plate's channel models need on the plate itself.

    ``versions``: object -> channel -> the model version used; ``read_fields`` yields the raw
    (C, Y, X) fields (read once more here, so a 96-field plate is not held in memory twice).
    """
    preps = {
        (obj, name): ChannelPrep(override or recipe_of(v), "request" if override else "model card")
        for obj, by_channel in versions.items()
        for name, v in by_channel.items()
    }
    need_basic = {
        name: prep.recipe.darkfield for (_obj, name), prep in preps.items() if prep.recipe.illumination == "per-plate"
    }
    need_percentiles = any(prep.recipe.normalization == "per-plate" for prep in preps.values())
    if not need_basic and not need_percentiles and not any(p.recipe.illumination == "profile" for p in preps.values()):
        return PlatePreprocessing(preps)

    stacks: dict[str, list[np.ndarray]] = {}
    shape = None
    if need_basic or need_percentiles:
        on_progress(f"preprocessing: reading {n_fields} field(s) for the plate's profiles and percentiles")
        wanted = sorted({name for (_obj, name) in preps})
        for image in read_fields():
            shape = image.shape[1:]
            for name in wanted:
                stacks.setdefault(name, []).append(image[channels.index(name)].astype(np.float32))

    estimated: dict[str, Any] = {}
    if need_basic:
        from app.science.preprocessing import MIN_PROFILE_FIELDS

        if n_fields >= MIN_PROFILE_FIELDS:
            on_progress(f"preprocessing: estimating illumination profiles ({', '.join(sorted(need_basic))})")
            models, ref = estimate_profiles(
                ctx,
                {name: stacks[name] for name in need_basic},
                darkfield=any(need_basic.values()),
                name=f"plate of job {ctx.job_id}",
                inputs={"fields": n_fields, "channels": sorted(need_basic)},
            )
            estimated = {name: (model, ref) for name, model in models.items()}
    for (obj, name), prep in preps.items():
        if prep.recipe.illumination == "per-plate":
            if name in estimated:
                prep.profile, prep.profile_ref = estimated[name]
            else:  # a plate too small to estimate on: the profile the model was trained with
                trained = training_profile_id(versions[obj][name])
                if trained is None or shape is None:
                    raise JobFailed(
                        f"the {obj} model of {name!r} corrects illumination per plate, but this plate has "
                        f"{n_fields} field(s) (at least {MIN_PROFILE_FIELDS} are needed to estimate a "
                        "profile) and the model has no training profile; send more fields or give "
                        "preprocessing.illumination='profile' with an uploaded flat-field"
                    )
                prep.profile, prep.profile_ref = load_profile(ctx, trained, name, shape)
                prep.profile_ref = {**prep.profile_ref, "used_because": "plate too small to estimate"}
        elif prep.recipe.illumination == "profile":
            first = next(iter(read_fields()), None) if shape is None else None
            field_shape = shape if shape is not None else (first.shape[1:] if first is not None else (0, 0))
            prep.profile, prep.profile_ref = load_profile(ctx, prep.recipe.profile_id, name, field_shape)
        if prep.recipe.normalization == "per-plate":
            from app.science.preprocessing import plate_percentiles

            planes = stacks[name]
            if prep.profile is not None:
                planes = [prep.profile.apply(p[np.newaxis])[0] for p in planes]
            prep.percentiles = plate_percentiles(
                [p[np.newaxis] for p in planes], prep.recipe.lower_percentile, prep.recipe.upper_percentile
            )[0]
    return PlatePreprocessing(preps)


def dataset_preprocessing(
    ctx: JobContext, recipe: PreprocessingRecipe, channel_name: str, planes: list[np.ndarray], dataset_id: int
) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any], bool]:
    """Fit a fine-tune's recipe on all of its dataset's images of one channel.

    -> (prepare: raw (Y, X) plane -> network-ready float32 plane, the card record, whether the
    prepared planes are already normalised (then training must not normalise them per image)).
    """
    from app.science.preprocessing import MIN_PROFILE_FIELDS, plate_percentiles

    profile, ref = None, None
    if recipe.illumination == "per-plate":
        if len(planes) < MIN_PROFILE_FIELDS:
            raise JobFailed(
                f"the dataset has {len(planes)} image(s); per-plate illumination correction needs at "
                f"least {MIN_PROFILE_FIELDS} to estimate a profile"
            )
        models, ref = estimate_profiles(
            ctx,
            {channel_name: planes},
            darkfield=recipe.darkfield,
            name=f"dataset {dataset_id} ({channel_name})",
            inputs={"fields": len(planes), "dataset_id": dataset_id},
            dataset_id=dataset_id,
        )
        profile = models[channel_name]
    elif recipe.illumination == "profile":
        profile, ref = load_profile(ctx, recipe.profile_id, channel_name, planes[0].shape)

    def correct(plane: np.ndarray) -> np.ndarray:
        plane = np.asarray(plane, np.float32)
        return plane if profile is None else profile.apply(plane[np.newaxis])[0]

    percentiles = None
    if recipe.normalization == "per-plate":
        percentiles = plate_percentiles(
            [correct(p)[np.newaxis] for p in planes], recipe.lower_percentile, recipe.upper_percentile
        )[0]
    low, high = percentiles if percentiles is not None else (0.0, 1.0)
    span = high - low if high > low else 1.0

    def prepare(plane: np.ndarray) -> np.ndarray:
        corrected = correct(plane)
        return corrected if percentiles is None else ((corrected - low) / span).astype(np.float32)

    record = {
        "recipe": recipe.model_dump(mode="json"),
        "illumination_profile": ref,
        "percentiles": None if percentiles is None else list(percentiles),
    }
    return prepare, record, percentiles is not None


def dataset_plate_preprocessing(
    ctx: JobContext, ds: Any, versions: Mapping[str, Mapping[str, CardedModel]], channels: list[str]
) -> PlatePreprocessing:
    """Each model's own recipe fitted on a labelled dataset, for evaluation and channel selection.

    Fitted on every image of the dataset, as the fine-tune fits its recipe: a model's scores then
    come from the inputs it was trained on (the fine-tune's own test score, an evaluation of the
    same split and the fusion fitted for it agree), not from Cellpose's per-image scaling.
    """
    from workers.pipelines.common import read_field

    images = list(ds.images)
    return plan_plate_preprocessing(
        ctx,
        versions,
        None,
        len(images),
        lambda: (read_field(ctx, im.image_sha256) for im in images),
        channels,
        on_progress=lambda stage: ctx.progress(stage, None, force=True),
    )
