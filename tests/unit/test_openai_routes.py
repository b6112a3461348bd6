"""The OpenAI door's routes over a real job service without Serve (tests/unit/test_routes.py's app and store,
API keys on): OpenAI's error shape and statuses, the model listing, answers in OpenAI's shape, and the signed
image links. The door with the real `openai` SDK against the running service is tests/serve/test_openai_http.py."""

import base64
import io
import json
import time
from urllib.parse import parse_qs, urlsplit

from PIL import Image

from tests.unit.test_routes import as_, client  # noqa: F401 (the fixture)

PROMPT = {"prompt": "a lighthouse", "size": "64x64", "steps": 2, "seed": 3}


def test_a_generation_answers_in_openais_shape_with_the_job_id_in_a_header(client):  # noqa: F811
    answer = client.post("/v1/images/generations", json={**PROMPT, "n": 1}, headers=as_("alice"))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"created", "data", "background", "output_format", "quality", "size", "usage"}
    assert body["size"] == "64x64" and body["quality"] == "medium" and body["output_format"] == "png"
    (image,) = body["data"]
    assert set(image) == {"b64_json", "revised_prompt"} and image["revised_prompt"] == "a lighthouse"
    assert base64.b64decode(image["b64_json"]) == b"\x89PNG sent back"  # what the generator sent back
    job_id = answer.headers["X-Job-Id"]
    status = client.get(f"/queue/{job_id}", headers=as_("alice")).json()
    assert status["state"] == "done" and status["payload"]["steps"] == 2 and status["payload"]["width"] == 64
    listed = client.get("/queue", headers=as_("alice")).json()["jobs"]
    assert [job["door"] for job in listed if job["job_id"] == job_id] == ["openai"]
    assert client.get(f"/queue/{job_id}", headers=as_("bob")).status_code == 404


def test_bad_parameters_are_400s_in_openais_shape_naming_the_parameter(client):  # noqa: F811
    cases = [
        ({**PROMPT, "size": "65x64"}, "size", "invalid_value"),
        ({**PROMPT, "size": "4096x4096"}, "size", "invalid_value"),
        ({**PROMPT, "n": 0}, "n", "invalid_value"),
        ({**PROMPT, "bogus": 1}, "bogus", "unknown_parameter"),
        ({"size": "64x64"}, "prompt", "missing_required_parameter"),
        ({**PROMPT, "output_format": "gif"}, "output_format", "invalid_value"),
        ({**PROMPT, "steps": 0}, "steps", "invalid_value"),
    ]
    for body, param, code in cases:
        answer = client.post("/v1/images/generations", json=body, headers=as_("alice"))
        assert answer.status_code == 400, (body, answer.text)
        error = answer.json()["error"]
        assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), error
        assert error["message"]
    unknown = client.post("/v1/images/generations", json={**PROMPT, "model": "dall-e-3"}, headers=as_("alice"))
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found" and "demo-sd15" in unknown.json()["error"]["message"]
    no_key = client.post("/v1/images/generations", json=PROMPT)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    not_json = client.post("/v1/images/generations", content=b"prompt=x", headers={
        **as_("alice"), "Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert not_json.status_code == 415 and "error" in not_json.json()


def test_models_are_listed_and_found_by_name_or_label(client):  # noqa: F811
    listed = client.get("/v1/models", headers=as_("bob")).json()
    assert listed["object"] == "list"
    ids = {model["id"] for model in listed["data"]}
    assert "demo-sd15" in ids and all(model["object"] == "model" for model in listed["data"])
    found = client.get("/v1/models/Demo SD1.5", headers=as_("bob"))
    assert found.status_code == 200 and found.json()["id"] == "Demo SD1.5"
    missing = client.get("/v1/models/gpt-image-1", headers=as_("bob"))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_url_answers_are_signed_links_that_work_without_a_key_until_they_expire(client):  # noqa: F811
    answer = client.post("/v1/images/generations", json={**PROMPT, "response_format": "url"}, headers=as_("alice"))
    assert answer.status_code == 200, answer.text
    (image,) = answer.json()["data"]
    assert set(image) == {"url", "revised_prompt"} and image["url"].startswith("http://testserver/v1/images/files/")
    link = urlsplit(image["url"])
    # The fake generator names a file it never wrote: the link is accepted, the storage has no such image.
    assert client.get(f"{link.path}?{link.query}").status_code == 404
    query = parse_qs(link.query)
    later = int(query["expires"][0]) + 10
    forged = client.get(link.path, params={"expires": later, "signature": query["signature"][0]})
    assert forged.status_code == 403 and forged.json()["error"]["param"] == "signature"
    services = client.app.state.services
    secret = client.portal.call(services.jobs.link_secret, None)
    expired = services.links.url(secret, "http://testserver", link.path.split("/")[4], 0, "png", now=time.time() - 7200)
    expired_link = urlsplit(expired)
    refused = client.get(f"{expired_link.path}?{expired_link.query}")
    assert refused.status_code == 403 and "expired" in refused.json()["error"]["message"]


def test_the_schema_documents_openais_errors_and_no_422_on_the_openai_door(client):  # noqa: F811
    schema = client.get("/openapi.json", headers=as_("alice")).json()
    operations = {(path, method): operation for path, item in schema["paths"].items() if path.startswith("/v1/")
                  for method, operation in item.items()}  # fmt: skip
    assert ("/v1/images/generations", "post") in operations and ("/v1/images/edits", "post") in operations
    for operation in operations.values():
        assert "422" not in operation["responses"]
        assert operation["tags"] == ["OpenAI-compatible API"]
    generation = operations[("/v1/images/generations", "post")]
    assert generation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError")
    assert "security" not in operations[("/v1/images/files/{job_id}/{name}", "get")]


def test_a_streamed_edit_ends_with_its_completed_event_and_a_form_error_names_the_field(client):  # noqa: F811
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "teal").save(buffer, format="PNG")
    files = {"image": ("in.png", buffer.getvalue(), "image/png")}
    form = {"prompt": "a door", "stream": "true", "steps": "2", "seed": "4"}
    with client.stream("POST", "/v1/images/edits", data=form, files=files, headers=as_("alice")) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in answer.iter_lines() if line]
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [event["type"] for event in events] == ["image_edit.completed"]
    assert base64.b64decode(events[0]["b64_json"]) == b"\x89PNG sent back" and events[0]["size"] == "64x64"
    bad = client.post("/v1/images/edits", data={**form, "mask_blur": "9999"}, files=files, headers=as_("alice"))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "mask_blur"
    missing = client.post("/v1/images/edits", data={"prompt": "a door"}, headers=as_("alice"))
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "image"


def test_without_a_model_a_call_runs_on_the_service_wide_default_model(client):  # noqa: F811
    services = client.app.state.services
    client.portal.call(services.jobs.set_default_model, "demo-sd15-single", "model")
    answer = client.post("/v1/images/generations", json=PROMPT, headers=as_("alice"))
    assert answer.status_code == 200, answer.text
    payload = client.get(f"/queue/{answer.headers['X-Job-Id']}", headers=as_("alice")).json()["payload"]
    assert payload["model"] == "demo-sd15-single"


def test_nulls_are_openais_defaults_and_broken_json_names_no_parameter(client):  # noqa: F811
    nulls = {"n": None, "quality": None, "response_format": None, "output_format": None, "stream": None,
             "partial_images": None, "background": None, "moderation": None, "output_compression": None}  # fmt: skip
    answer = client.post("/v1/images/generations", json={**PROMPT, **nulls}, headers=as_("alice"))
    assert answer.status_code == 200 and len(answer.json()["data"]) == 1, answer.text
    broken = client.post("/v1/images/generations", content=b'{"prompt": "x",', headers={
        **as_("alice"), "Content-Type": "application/json"})  # fmt: skip
    assert broken.status_code == 400
    assert broken.json()["error"]["param"] is None and broken.json()["error"]["code"] == "invalid_json"


def test_edits_and_variations_are_documented_as_multipart_forms_and_ended_jobs_say_do_not_retry(client):  # noqa: F811
    schema = client.get("/openapi.json", headers=as_("alice")).json()
    for path in ("/v1/images/edits", "/v1/images/variations"):
        assert list(schema["paths"][path]["post"]["requestBody"]["content"]) == ["multipart/form-data"]
    generation = schema["paths"]["/v1/images/generations"]["post"]["responses"]
    assert "x-should-retry" in generation["409"]["headers"] and "x-should-retry" in generation["500"]["headers"]
