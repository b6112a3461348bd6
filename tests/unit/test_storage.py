"""The output storage (pipelines/storage.py) on a local folder and on fsspec URLs (`file://` and fsspec's
in-memory file system, both real fsspec file systems), and retention deleting through it."""

import pytest

from deployments.jobs import JobStore
from pipelines.storage import MissingImageError, OutputStorage, StorageError


@pytest.mark.parametrize("kind", ["folder", "file-url", "memory-url"])
def test_save_read_delete(tmp_path, kind):
    location = {"folder": str(tmp_path / "out"), "file-url": (tmp_path / "out").as_uri(),
                "memory-url": f"memory://bucket-{tmp_path.name}/images"}[kind]  # fmt: skip
    storage = OutputStorage(location)
    first = storage.save("a" * 32, 0, "png", b"first")
    second = storage.save("a" * 32, 1, "png", b"second")
    assert first.endswith(f"/{'a' * 32}.png") and second.endswith(f"/{'a' * 32}-1.png")
    assert first.startswith(location if kind != "memory-url" else "memory:///bucket-")
    assert storage.read(first) == b"first" and storage.read(second) == b"second"
    storage.delete(first)
    storage.delete(first)  # already gone: fine
    with pytest.raises(MissingImageError, match="no longer"):
        storage.read(first)
    assert storage.available()


def test_writes_leave_no_temporary_files_and_nothing_outside_the_root_is_read(tmp_path):
    storage = OutputStorage(tmp_path / "out")
    stored = storage.save("b" * 32, 0, "jpg", b"x" * 1000)
    assert [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()] == [f"{'b' * 32}.jpg"]
    (tmp_path / "secret.txt").write_text("no")
    for outside in (str(tmp_path / "secret.txt"), stored.replace("/out/", "/out/../"), "/etc/passwd"):
        with pytest.raises(MissingImageError):
            storage.read(outside)


def test_unknown_protocols_and_missing_packages_are_clear(tmp_path):
    with pytest.raises(StorageError, match="nope"):
        OutputStorage("nope://bucket/x")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(StorageError, match="s3fs"):
            OutputStorage("s3://bucket/prefix")


def test_retention_deletes_pruned_jobs_images_from_the_storage(tmp_path):
    location = (tmp_path / "images").as_uri()
    storage = OutputStorage(location)
    store = JobStore(str(tmp_path / "jobs.sqlite3"), keep_finished_seconds=3600, keep_finished_count=1,
                     outputs=location)  # fmt: skip
    kept_by_others = storage.save("c" * 32, 0, "png", b"not a job's")
    paths = {}
    for job_id in ("d" * 32, "e" * 32):
        store.create(job_id, "txt2img", {"prompt": "x"}, [])
        paths[job_id] = [storage.save(job_id, index, "png", b"img") for index in range(2)]
        store.complete_many([(job_id, {"output_paths": paths[job_id] + [kept_by_others]}, [])])
    assert store.prune() == 1  # the older job
    with pytest.raises(MissingImageError):
        storage.read(paths["d" * 32][1])
    assert storage.read(paths["e" * 32][0]) == b"img"
    assert storage.read(kept_by_others) == b"not a job's"  # not named after the pruned job: left alone


@pytest.mark.parametrize("kind", ["folder", "memory-url"])
def test_two_attempts_of_a_job_stage_apart_and_only_the_recorded_one_is_promoted(tmp_path, kind):
    location = {"folder": str(tmp_path / "out"), "memory-url": f"memory://stage-{tmp_path.name}/images"}[kind]
    storage = OutputStorage(location)
    job_id = "c" * 32
    lost_staged, final = storage.stage(job_id, 0, "png", b"lost attempt", token="attempt1")
    kept_staged, same_final = storage.stage(job_id, 0, "png", b"taken over", token="attempt2")
    assert final == same_final and lost_staged != kept_staged
    assert storage.read_recorded(final, kept_staged) == b"taken over"  # recorded done, not yet moved
    storage.promote(kept_staged, final)
    storage.delete(lost_staged)  # the attempt the store did not record removes only its own file
    assert storage.read_recorded(final, kept_staged) == b"taken over"
    assert storage.read(final) == b"taken over"
    with pytest.raises(MissingImageError):
        storage.read(lost_staged)
    with pytest.raises(MissingImageError):
        storage.promote(lost_staged, final)


def test_input_images_are_stored_apart_from_outputs(tmp_path):
    storage = OutputStorage(tmp_path / "out")
    stored = storage.save_input("d" * 32, "mask", "png", b"mask bytes")
    assert "/inputs/" in stored and stored.endswith(f"/{'d' * 32}-mask.png")
    assert storage.read(stored) == b"mask bytes"


def test_retention_removes_the_staged_files_of_attempts_no_record_names(tmp_path):
    store = JobStore(str(tmp_path / "jobs.sqlite3"), keep_finished_count=0, outputs=str(tmp_path / "out"))
    storage = OutputStorage(tmp_path / "out")
    job_id = "e" * 32
    storage.stage(job_id, 0, "png", b"lost attempt", token="lost")  # its replica died before recording it
    staged, final = storage.stage(job_id, 0, "png", b"recorded", token="kept")
    storage.promote(staged, final)
    store.create(job_id, "txt2img", {}, [])
    store.complete_many([(job_id, {"output_paths": [final]}, [])])
    assert store.prune() == 1
    assert [path for path in (tmp_path / "out").rglob("*") if path.is_file()] == []
