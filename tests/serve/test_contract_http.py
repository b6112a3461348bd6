"""The contract in /openapi.json against what the service answers: documented statuses and their error body,
enums built from the code's tables, strict types, 405 with every method of the path, 415 for non-JSON."""

import pytest

from pipelines.samplers import accepted_sampler_names, accepted_schedule_types
from pipelines.schemas import FILE_TYPES, JOB_ID_PATTERN
from pipelines.upscalers import LATENT_MODES
from tests.serve.conftest import wait_for_job


@pytest.fixture(scope="module")
def schema(client) -> dict:
    return client.get("/openapi.json").json()


def test_every_operation_documents_its_error_answers_with_one_body(schema):
    expected = {
        ("get", "/hello"): {"200", "503"},
        ("get", "/"): {"200", "503"},
        ("get", "/metrics"): {"200", "401", "503"},
        ("get", "/health"): {"200", "401", "503"},
        ("post", "/txt2img"): {"200", "400", "401", "404", "413", "415", "422", "429", "503"},
        ("post", "/img2img"): {"200", "400", "401", "404", "413", "415", "422", "429", "503"},
        ("get", "/queue/{job_id}"): {"200", "401", "404", "422", "500", "503"},
        ("get", "/queue/{job_id}/image"): {"200", "401", "404", "409", "422", "500", "503"},
        ("get", "/queue/{job_id}/events"): {"200", "401", "404", "422", "503"},
        ("delete", "/queue/{job_id}"): {"200", "401", "404", "409", "422", "503"},
    }
    for (method, path), codes in expected.items():
        responses = schema["paths"][path][method]["responses"]
        assert set(responses) == codes, (method, path)
        for code in codes - {"200"}:
            body = responses[code]["content"]["application/json"]["schema"]
            assert body == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, code)
    image = schema["paths"]["/queue/{job_id}/image"]["get"]["responses"]["200"]["content"]
    assert set(image) == {"image/png", "image/jpeg", "image/webp", "image/avif", "image/gif"}
    busy = schema["paths"]["/txt2img"]["post"]["responses"]["429"]
    assert busy["headers"]["Retry-After"]["required"] is True


def test_closed_sets_are_the_codes_own_tables(schema):
    request = schema["components"]["schemas"]["Txt2ImgRequest"]["properties"]
    assert request["sampler_name"]["enum"] == accepted_sampler_names()
    assert request["scheduler_type"]["anyOf"][0]["enum"] == accepted_schedule_types()
    assert request["fileType"]["enum"] == list(FILE_TYPES)
    upscaler = schema["components"]["schemas"]["HiresConfig"]["properties"]["upscaler"]
    assert upscaler["anyOf"][0]["enum"] == list(LATENT_MODES)
    image = schema["components"]["schemas"]["Img2ImgRequest"]["properties"]["image"]
    assert image["format"] == "image-base64"
    job_id, wait_s, include = schema["paths"]["/queue/{job_id}"]["get"]["parameters"]
    assert job_id["schema"]["pattern"] == JOB_ID_PATTERN
    assert (wait_s["in"], wait_s["schema"]["minimum"], wait_s["schema"]["maximum"]) == ("query", 0, 30)
    assert include["in"] == "query" and include["schema"]["anyOf"][0] == {"$ref": "#/components/schemas/StatusInclude"}
    assert schema["components"]["schemas"]["StatusInclude"]["enum"] == ["inputs"]
    events = schema["paths"]["/queue/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert set(events) == {"text/event-stream"}


@pytest.mark.parametrize(
    ("sampler_name", "scheduler_type", "infotext"),
    [("k_euler_a", None, "Sampler: Euler a"), ("DPM++ 3M SDE Exponential", None, "Schedule type: Exponential"),
     ("UniPC", "SGM Uniform", "Schedule type: SGM Uniform"), ("LMS Karras", "default", "Schedule type: Karras")],
)  # fmt: skip
def test_aliases_and_older_names_of_the_enums_run(client, sampler_name, scheduler_type, infotext):
    body = {"prompt": "x", "steps": 3, "width": 64, "height": 64, "sampler_name": sampler_name,
            "scheduler_type": scheduler_type}  # fmt: skip
    job = wait_for_job(client, client.post("/txt2img", json=body).json()["job_id"])
    assert job["state"] == "done" and infotext in job["infotext"], job


def test_method_not_allowed_lists_every_method_of_the_path(client):
    response = client.request("OPTIONS", f"/queue/{'0' * 32}")
    assert response.status_code == 405
    assert response.headers["Allow"] == "DELETE, GET"
    assert response.json()["status"] == "error" and "OPTIONS is not allowed" in response.json()["error"]
    put = client.put("/txt2img", json={"prompt": "x"})
    assert put.status_code == 405 and put.headers["Allow"] == "POST"


def test_a_body_that_is_not_json_is_415(client):
    response = client.post(
        "/txt2img", content=b"prompt=x", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 415
    assert response.json()["status"] == "error" and "application/json" in response.json()["error"]
    charset = client.post("/txt2img", content=b'{"prompt": "x", "steps": 2, "width": 64, "height": 64}',
                          headers={"Content-Type": "application/json; charset=utf-8"})  # fmt: skip
    assert charset.status_code == 200
    client.delete(f"/queue/{charset.json()['job_id']}")


def test_a_body_that_is_not_text_is_400(client):
    response = client.post("/txt2img", content=b"\xff\xfe{", headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["status"] == "error" and "cannot be read as JSON" in response.json()["error"]


def test_unknown_fields_are_ignored_and_named_in_the_warnings(client):
    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "cfg": 3, "fileType": "png", "file_type": "webp",
            "hires": {"enabled": False, "sharpness": 2}}  # fmt: skip
    job = wait_for_job(client, client.post("/txt2img", json=body).json()["job_id"])
    assert job["state"] == "done" and job["file_type"] == "png"
    assert "unknown field(s) ignored: 'cfg', 'file_type', 'hires.sharpness'" in job["warnings"]
    assert "cfg" not in job["payload"] and job["payload"]["fileType"] == "png"


def test_a_whole_number_written_as_a_float_is_an_integer(client):
    response = client.post("/txt2img", json={"prompt": "x", "steps": 2.0, "width": 64.0, "height": 64, "seed": 7.0})
    assert response.status_code == 200, response.text
    job = wait_for_job(client, response.json()["job_id"])
    assert job["state"] == "done" and job["seed"] == 7 and job["payload"]["steps"] == 2
