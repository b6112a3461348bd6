"""The application builder's arguments: typos and nonsense limits are errors, not silent defaults."""

import pytest
from pydantic import ValidationError

from deployments.app import AppArgs


def test_unknown_argument_is_rejected():
    with pytest.raises(ValidationError, match="max_queued_job"):
        AppArgs(max_queued_job=3)


def test_limits_must_be_positive():
    with pytest.raises(ValidationError, match="max_queued_jobs"):
        AppArgs(max_queued_jobs=0)
    assert AppArgs().max_queued_jobs == 64
