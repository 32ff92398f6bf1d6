"""One vocabulary: the enums that the science core and the state machine define for themselves
must say exactly what app.vocabulary says."""

from app import vocabulary
from app.jobs import FINAL_STATUSES, JobStatus
from app.science.label_fusion import FUSION_METHODS


def test_job_statuses_are_one_list():
    assert tuple(s.value for s in JobStatus) == vocabulary.JOB_STATUSES
    assert FINAL_STATUSES < set(vocabulary.JOB_STATUSES)


def test_fusion_methods_are_one_list():
    assert vocabulary.METHODS == FUSION_METHODS
