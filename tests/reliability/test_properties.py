"""Property-based tests: the image reader never fails with anything but ImageReadError, and no JSON
body posted to any endpoint that takes a request schema causes a server error."""

from __future__ import annotations

import io
import json
import types
import typing
from typing import Any

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from app.api import schemas
from app.science.image_files import ImageReadError, image_to_tiff_bytes, labels_to_tiff_bytes, read_image, read_labels
from tests.reliability.conftest import make_client, seed_minimal_zoo
from tests.service.conftest import make_embedded_settings

BOUNDED = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _read_both(data: bytes) -> None:
    for reader in (read_image, read_labels):
        try:
            result = reader(data, max_pixels=1_000_000)
        except ImageReadError as error:
            assert str(error)  # a message a person can act on, never empty
        else:
            array = result if isinstance(result, np.ndarray) else result.data
            assert isinstance(array, np.ndarray) and array.size > 0


@BOUNDED
@given(st.binary(max_size=2048))
def test_reader_on_arbitrary_bytes(data):
    _read_both(data)


@BOUNDED
@given(st.sampled_from([b"II*\x00", b"MM\x00*", b"II+\x00\x08\x00\x00\x00"]), st.binary(max_size=1024))
def test_reader_on_bytes_with_a_tiff_signature(magic, rest):
    _read_both(magic + rest)


def _valid_tiffs() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [
        image_to_tiff_bytes(rng.integers(0, 4000, (2, 24, 20), dtype=np.uint16), ["GFP", "RFP"]),
        labels_to_tiff_bytes(rng.integers(0, 5, (20, 24))),
        _imwrite(rng.random((3, 16, 16), dtype=np.float32), imagej=True),
        _imwrite(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), photometric="rgb", compression="lzw"),
        _imwrite(rng.integers(0, 255, (64, 64), dtype=np.uint8), tile=(16, 16), compression="zlib"),
    ]


def _imwrite(data: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, data, **kwargs)
    return buffer.getvalue()


VALID_TIFFS = _valid_tiffs()


@BOUNDED
@given(
    st.sampled_from(range(len(VALID_TIFFS))),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=12),
    st.integers(0, 100),
)
def test_reader_on_corrupted_valid_tiffs(which, flips, truncate_percent):
    """Flip bytes anywhere in real TIFFs (headers, tags, compressed strips) and cut them short."""
    data = bytearray(VALID_TIFFS[which])
    for position, value in flips:
        data[position % len(data)] = value
    if truncate_percent < 30:
        data = data[: max(1, len(data) * truncate_percent // 30)]
    _read_both(bytes(data))


DTYPES = [
    np.uint8,
    np.uint16,
    np.uint32,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.float16,
    np.float32,
    np.float64,
    np.bool_,
    np.complex64,
]


@st.composite
def small_arrays(draw) -> np.ndarray:
    ndim = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    size = int(np.prod(shape))
    if dtype.kind == "b":
        values = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    elif dtype.kind in "fc":
        values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=16), min_size=size, max_size=size))
    else:
        info = np.iinfo(dtype)
        values = draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=size, max_size=size))
    return np.array(values, dtype=dtype).reshape(shape)


@BOUNDED
@given(
    small_arrays(),
    st.sampled_from(
        [
            {},
            {"imagej": True},
            {"ome": True},
            {"compression": "zlib"},
            {"photometric": "minisblack"},
            {"planarconfig": "separate"},
        ]
    ),
)
def test_reader_on_arbitrary_small_arrays_written_as_tiff(array, options):
    try:
        data = _imwrite(array, **options)
    except Exception:  # noqa: BLE001 - tifffile cannot write this combination; nothing to read
        assume(False)
    _read_both(data)
    try:
        image = read_image(data)
    except ImageReadError:
        return
    # What is accepted comes back as (C, Y, X) with every value intact.
    assert image.data.ndim == 3 and image.data.size == array.size
    if array.dtype != np.float16:
        assert np.array_equal(np.sort(image.data.ravel()), np.sort(array.ravel()))


def _axes(data: bytes) -> str:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            return tif.series[0].axes
    except Exception:  # noqa: BLE001 - tifffile itself cannot parse it: the reader must refuse it
        return ""


def test_repeated_axis_letters_are_an_image_read_error():
    data = _imwrite(np.zeros((1, 1, 1), np.uint8))
    assert _axes(data) == "XYX"
    with pytest.raises(ImageReadError):
        read_image(data)


# ------------------------------------------------------------------------------------------------
# Request schemas: random JSON never causes a 500
# ------------------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def _for_annotation(annotation: Any) -> st.SearchStrategy:
    """Values of roughly the right type (so requests get past the first field), mixed with any JSON."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _for_model(annotation)
    if origin is typing.Literal:
        return st.sampled_from(args) | JSON
    if origin in (typing.Union, types.UnionType):
        return st.one_of([_for_annotation(a) for a in args])
    if origin is list:
        return st.lists(_for_annotation(args[0]) if args else JSON, max_size=10) | JSON
    if origin is dict or annotation is Any:
        return st.dictionaries(st.text(max_size=10), JSON, max_size=4) | JSON
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans() | JSON
    if annotation is int:
        return st.integers(-(2**64), 2**64) | st.integers(0, 5) | JSON
    if annotation is float:
        return st.floats(allow_nan=False, allow_infinity=False) | JSON
    if annotation is str:
        return st.text(max_size=200) | st.sampled_from(["L", "R", "GFP", "version:1", "version:x", "nuclei"]) | JSON
    return JSON


def _for_model(model: type[BaseModel]) -> st.SearchStrategy:
    fields = {name: _for_annotation(info.annotation) for name, info in model.model_fields.items()}
    return st.fixed_dictionaries({}, optional=fields) | st.fixed_dictionaries(fields)


# Every request schema and where it is posted.
ENDPOINTS: dict[type[BaseModel], tuple[str, str]] = {
    schemas.NoopJobIn: ("POST", "/api/v1/jobs/noop"),
    schemas.CellLineIn: ("POST", "/api/v1/cell-lines"),
    schemas.ReporterIn: ("POST", "/api/v1/reporters"),
    schemas.AliasIn: ("PUT", "/api/v1/aliases/L/R/nuclei/production"),
    schemas.ChannelSetIn: ("PUT", "/api/v1/channel-sets/L/nuclei"),
    schemas.DatasetIn: ("POST", "/api/v1/datasets"),
    schemas.FinetuneIn: ("POST", "/api/v1/jobs/finetune"),
    schemas.SegmentDatasetIn: ("POST", "/api/v1/jobs/segment-dataset"),
    schemas.EvaluateIn: ("POST", "/api/v1/jobs/evaluate"),
    schemas.SelectChannelsIn: ("POST", "/api/v1/jobs/select-channels"),
    schemas.ApiKeyIn: ("POST", "/api/v1/keys"),
    schemas.PretrainISLIn: ("POST", "/api/v1/jobs/pretrain-isl"),
    schemas.SelfTrainIn: ("POST", "/api/v1/jobs/self-train"),
}


def test_every_request_schema_is_covered():
    request_models = {
        obj
        for obj in vars(schemas).values()
        if isinstance(obj, type) and issubclass(obj, schemas.StrictModel) and obj is not schemas.StrictModel
    }
    nested = {
        schemas.FinetuneParams,
        schemas.SegmentParams,
        schemas.SegmentRequest,
        schemas.FieldMeta,
        schemas.ISLParams,
        schemas.SelfTrainParams,
    }  # inside others / a form field
    assert request_models - nested <= set(ENDPOINTS), request_models - nested - set(ENDPOINTS)


@pytest.fixture(scope="module")
def seeded_client(tmp_path_factory):
    """An API with a cell line L, a reporter R and a dataset 1, so requests can get past lookups."""
    settings = make_embedded_settings(tmp_path_factory.mktemp("props"))
    client, _ = make_client(settings, run_reaper=False)
    seed_minimal_zoo(client)
    return client


def _check(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["detail"]


@pytest.mark.slow
@pytest.mark.parametrize("model", list(ENDPOINTS), ids=lambda m: m.__name__)
def test_random_json_never_causes_a_server_error(seeded_client, model):
    method, path = ENDPOINTS[model]

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=_for_model(model) | JSON)
    def run(body):
        _check(seeded_client.request(method, path, json=body))

    run()


@pytest.mark.slow
def test_random_segment_requests_never_cause_a_server_error(seeded_client):
    tiff = image_to_tiff_bytes(np.ones((1, 16, 16), np.uint16))

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=_for_model(schemas.SegmentRequest) | JSON, raw=st.booleans(), text=st.text(max_size=50))
    def run(body, raw, text):
        request = text if raw else json.dumps(body)
        _check(
            seeded_client.post(
                "/api/v1/jobs/segment", data={"request": request}, files={"files": ("f.tif", tiff, "image/tiff")}
            )
        )

    run()


@pytest.mark.slow
def test_non_json_bodies_are_problems(seeded_client):
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        raw=st.binary(max_size=300),
        content_type=st.sampled_from(
            ["application/json", "text/plain", "multipart/form-data", "multipart/form-data; boundary=x", ""]
        ),
        endpoint=st.sampled_from(sorted(ENDPOINTS.values())),
    )
    def run(raw, content_type, endpoint):
        method, path = endpoint
        _check(seeded_client.request(method, path, content=raw, headers={"content-type": content_type}))

    run()


def test_a_reader_bug_on_an_upload_is_a_422_not_a_500(seeded_client):
    """The (1, 1, 1) TIFF above trips the reader; the API still answers with a problem."""
    data = _imwrite(np.zeros((1, 1, 1), np.uint8))
    response = seeded_client.post("/api/v1/datasets/1/images", files={"image": ("odd.tif", data)})
    assert response.status_code == 422 and "odd.tif" in response.json()["detail"]
    good = image_to_tiff_bytes(np.ones((1, 16, 16), np.uint16))
    response = seeded_client.post(
        "/api/v1/datasets/1/images", files={"image": ("a.tif", good), "nuclei": ("m.tif", data)}
    )
    assert response.status_code == 422 and "mask" in response.json()["detail"]
