"""The pytest configuration's gates: our own deprecation warnings fail a test, others' do not."""

import warnings

import pytest


@pytest.mark.parametrize("module", ["app", "app.science.metrics", "workers.tasks", "models_zoo.registry"])
def test_a_deprecation_warning_from_our_code_is_an_error(module):
    with pytest.raises(DeprecationWarning):
        warnings.warn_explicit("old API", DeprecationWarning, "ours.py", 1, module=module)


@pytest.mark.parametrize("module", ["starlette.testclient", "application", "celery.app"])
def test_a_third_party_deprecation_warning_is_ignored(module):
    with warnings.catch_warnings(record=True) as caught:
        # catch_warnings(record=True) keeps the active filters; "ignore" drops the warning before recording.
        warnings.warn_explicit("old API", DeprecationWarning, "theirs.py", 1, module=module)
    assert caught == []
