"""Valid JSON that a database cannot store, or that cannot be read back, is a 422 naming the field,
on SQLite and on PostgreSQL; a refused request commits nothing, and the listings keep working."""

from __future__ import annotations

import pytest

from app.settings import Settings
from tests.reliability.conftest import make_client
from tests.service.conftest import FAST_JOB_TIMINGS, make_embedded_settings

JSON = {"content-type": "application/json"}


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_settings(request, tmp_path) -> Settings:
    if request.param == "sqlite":
        return make_embedded_settings(tmp_path)
    from app.migrations import upgrade

    url = request.getfixturevalue("pg_url")
    settings = Settings(data_dir=tmp_path / "data", database_url=url, **FAST_JOB_TIMINGS)
    upgrade(url)
    return settings


def _deep(n: int) -> str:
    return '{"a": ' * n + "1" + "}" * n


DATASET = '{{"name": "d", "cell_line": "L", "channels": ["R"], {extra}}}'
BAD_DATASETS = {
    "deep-256": ('"acquisition": ' + _deep(256), "acquisition"),
    "deep-9": ('"acquisition": ' + _deep(9), "acquisition"),
    "nan": ('"acquisition": {"x": NaN}', "acquisition.x"),
    "infinity": ('"acquisition": {"x": -Infinity}', "acquisition.x"),
    "1e400": ('"acquisition": {"x": [1, 1e400]}', "acquisition.x[1]"),
    "huge-int": ('"acquisition": {"x": 1' + "0" * 30 + "}", "acquisition.x"),
    "nul-value": ('"acquisition": {"x": "a\\u0000b"}', "acquisition.x"),
    "nul-key": ('"acquisition": {"a\\u0000": 1}', "acquisition (a key)"),
    "surrogate-value": ('"acquisition": {"x": "\\ud800"}', "acquisition.x"),
    "surrogate-key": ('"acquisition": {"\\udfff": 1}', "acquisition"),
    "nul-notes": ('"notes": "a\\u0000"', "notes"),
    "surrogate-notes": ('"notes": "\\ud800x"', "notes"),
    "too-large": ('"acquisition": {"x": "' + "y" * 70_000 + '"}', "acquisition"),
}


def test_unstorable_json_is_a_422_naming_the_field_and_commits_nothing(any_db_settings):
    client, _ = make_client(any_db_settings, run_reaper=False)
    assert client.post("/api/v1/cell-lines", json={"name": "L"}).status_code == 201
    assert client.post("/api/v1/reporters", json={"name": "R"}).status_code == 201
    for case, (extra, field) in BAD_DATASETS.items():
        response = client.post("/api/v1/datasets", content=DATASET.format(extra=extra), headers=JSON)
        assert response.status_code == 422, (case, response.status_code, response.text[:300])
        assert response.headers["content-type"].startswith("application/problem+json")
        assert field in response.json()["detail"], (case, response.json()["detail"])
        listing = client.get("/api/v1/datasets")
        assert listing.status_code == 200 and listing.json() == [], case
    # A sensible nested acquisition is stored and read back.
    good = {"microscope": {"objective": {"magnification": 40, "na": 0.95}}, "pixel_size_um": 0.16, "note": "é ✓ 𝄞"}
    response = client.post(
        "/api/v1/datasets", json={"name": "d", "cell_line": "L", "channels": ["R"], "acquisition": good}
    )
    assert response.status_code == 201, response.text
    assert client.get("/api/v1/datasets").json()[0]["acquisition"] == good


@pytest.mark.parametrize(
    "method,path,body,field",
    [
        ("POST", "/api/v1/cell-lines", '{"name": "X", "species": "a\\u0000"}', "species"),
        ("POST", "/api/v1/cell-lines", '{"name": "X", "tissue": "\\ud800"}', "tissue"),
        ("POST", "/api/v1/reporters", '{"name": "X", "notes": "\\u0000"}', "notes"),
        ("POST", "/api/v1/keys", '{"name": "k\\u0000", "role": "instrument"}', "name"),
        ("PUT", "/api/v1/aliases/L/R/nuclei/production", '{"version_id": 1, "reason": "x\\u0000"}', "reason"),
        ("PUT", "/api/v1/aliases/L/R/nuclei/production", '{"version_id": 1, "reason": "\\udc00"}', "reason"),
        ("GET", "/api/v1/models?cell_line=%00", None, "query.cell_line"),
        ("GET", "/api/v1/resolve?cell_line=L&channels=R%00", None, "query.channels"),
        ("GET", "/api/v1/aliases?cell_line=a%00b", None, "query.cell_line"),
        ("PUT", "/api/v1/channel-sets/L%00/nuclei", '{"channels": ["R"]}', "path.cell_line"),
    ],
)
def test_nul_and_surrogates_anywhere_are_a_422(any_db_settings, method, path, body, field):
    client, _ = make_client(any_db_settings, run_reaper=False)
    response = client.request(method, path, content=body, headers=JSON if body else {})
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"]
    assert client.get("/api/v1/cell-lines").status_code == 200
    assert client.get("/api/v1/keys").status_code == 200


def test_nul_in_a_form_field_is_a_422(any_db_settings):
    import numpy as np

    from app.science.image_files import image_to_tiff_bytes

    client, _ = make_client(any_db_settings, run_reaper=False)
    assert client.post("/api/v1/cell-lines", json={"name": "L"}).status_code == 201
    assert client.post("/api/v1/reporters", json={"name": "R"}).status_code == 201
    assert client.post("/api/v1/datasets", json={"name": "d", "cell_line": "L", "channels": ["R"]}).status_code == 201
    image = image_to_tiff_bytes(np.ones((1, 32, 32), np.uint16))
    response = client.post("/api/v1/datasets/1/images", data={"plate": "p\x00"}, files={"image": ("a.tif", image)})
    assert response.status_code == 422 and "form.plate" in response.json()["detail"], response.text
    assert client.get("/api/v1/datasets/1").json()["images"] == []
