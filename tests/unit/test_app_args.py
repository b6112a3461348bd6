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


def test_engine_and_warm_up_arguments_are_checked():
    args = AppArgs(torch_threads=-2, dtype="bfloat16", speed={"channels_last": True},
                   warmup=[{"model": "Demo SD1.5", "batch_sizes": [1, 4]}])  # fmt: skip
    assert args.speed.channels_last and args.warmup[0].width == 512
    for bad in ({"speed": {"chanels_last": True}}, {"dtype": "float8"}, {"warmup": [{"model": "x", "width": 65}]},
                {"warmup": [{"modle": "x"}]}):  # fmt: skip
        with pytest.raises(ValidationError):
            AppArgs(**bad)


def test_outputs_dir_may_be_an_fsspec_url_for_the_images(tmp_path, monkeypatch):
    from deployments.app import build_app
    from pipelines.settings import Settings
    from pipelines.storage import StorageError

    url = (tmp_path / "shared").as_uri()
    app = build_app({"outputs_dir": url})
    ingress_settings = Settings(**app._bound_deployment.init_kwargs["settings"])
    assert ingress_settings.outputs_url == url and ingress_settings.outputs_location == url
    assert ingress_settings.outputs_dir == Settings.from_env().outputs_dir  # the job database stays local
    monkeypatch.setenv("DIFFUSION_API_OUTPUTS_DIR", url)
    assert Settings.from_env().outputs_location == url
    with pytest.raises(StorageError, match="nope"):
        build_app({"outputs_dir": "nope://bucket/images"})


def test_job_store_is_a_sqlite_path_or_a_reachable_postgresql_url(tmp_path, monkeypatch, postgres_url):
    from deployments.app import build_app

    def store_of(app) -> str:
        return app._bound_deployment.init_kwargs["job_database"]

    assert store_of(build_app({"job_store": str(tmp_path / "j.sqlite3")})) == str(tmp_path / "j.sqlite3")
    assert store_of(build_app({"job_database": str(tmp_path / "old-name.sqlite3")})).endswith("old-name.sqlite3")
    monkeypatch.setenv("DIFFUSION_API_JOB_STORE", postgres_url)
    assert store_of(build_app()) == postgres_url  # reached, its schema created
    with pytest.raises(ValueError, match="a SQLite file path or a postgresql:// URL"):
        build_app({"job_store": "mysql://db/jobs"})
    down = postgres_url.rsplit(":", 1)[0].replace("postgres@", "postgres:secret@") + ":1/jobs"
    with pytest.raises(
        ValueError, match=r"job_store postgresql://postgres:\*\*\*@127.0.0.1:1/jobs: cannot use it"
    ) as refused:
        build_app({"job_store": down})
    assert "secret" not in str(refused.value)
