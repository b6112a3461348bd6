"""Property-based run (schemathesis) against the service's own OpenAPI schema: whatever a client sends,
valid or not, the service never answers 5xx. Bounded: a fixed number of examples per operation.

503 with Retry-After on job submission is the designed back-pressure answer (the test config allows only a
few queued jobs), not a failure. Every accepted job is cancelled at once so the fuzzing does not pile up work.
"""

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.serve.conftest import PORT

BASE_URL = f"http://127.0.0.1:{PORT}"


def header(response, name: str) -> str:
    value = response.headers.get(name.lower()) or response.headers.get(name) or ""
    return value[0] if isinstance(value, list) else value


def check_case(case) -> None:
    response = case.call(base_url=BASE_URL, timeout=60)
    status = response.status_code
    back_pressure = status == 503 and case.method == "POST" and header(response, "Retry-After")
    assert status < 500 or back_pressure, f"{case.method} {case.formatted_path} -> {status}: {response.text[:500]}"
    assert header(response, "content-type").startswith("application/json")
    if case.method == "POST" and status == 200:
        httpx.delete(f"{BASE_URL}/queue/{response.json()['job_id']}", timeout=30)


def test_no_input_gives_a_server_error(service):
    schema = schemathesis.openapi.from_url(f"{BASE_URL}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 11  # every route of the API, DELETE /queue included
    for operation in operations:
        bounded = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                           suppress_health_check=list(HealthCheck))  # fmt: skip
        bounded(given(case=operation.as_strategy())(check_case))()
