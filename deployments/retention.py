"""Retention: removing finished jobs past the retention time, or beyond each owner's count, with their files.

No caller's jobs make another's go (the count is per owner), and never-started cancelled jobs go first. Files
go from the output storage before their records, so a file is never left without a record naming it.
"""

import json
import logging
import time
from pathlib import Path

from deployments.job_db import TERMINAL_STATES
from deployments.job_records import image_fields
from pipelines.storage import OutputStorage, is_url

logger = logging.getLogger("ray.serve")
_TERMINAL = ", ".join(f"'{state.value}'" for state in TERMINAL_STATES)


def prune_finished(db, outputs: OutputStorage | None, keep_seconds: float, keep_count: int, limit: int) -> int:
    """Deletes finished jobs older than `keep_seconds`, and each owner's beyond `keep_count`, never-started
    cancelled ones first; their images, stored inputs and staged files go from the output storage first, then
    their records (a file that cannot be deleted now is logged). At most `limit` jobs per call, so a backlog is
    worked through a bounded step at a time. Returns how many went."""
    cutoff = time.time() - keep_seconds
    never_started = "CASE WHEN state = 'cancelled' AND started IS NULL THEN 1 ELSE 0 END"
    rows = db.execute(
        f"SELECT job_id, result, inputs FROM (SELECT job_id, result, inputs, updated, ROW_NUMBER() OVER "
        f"(PARTITION BY owner ORDER BY {never_started}, updated DESC) AS kept FROM jobs "
        f"WHERE state IN ({_TERMINAL})) AS finished WHERE kept > ? OR updated < ? LIMIT ?",
        (keep_count, cutoff, limit),
    )
    for job_id, result, inputs in rows:
        stored = image_fields(json.loads(result) if result else {})
        files = [*(stored.get("output_paths") or []), *(stored.get("staged_paths") or []),
                 *(json.loads(inputs) if inputs else {}).values()]  # fmt: skip
        for output in files:
            if Path(output).name.startswith(job_id):  # only files named after the job
                _delete_file(outputs, job_id, output)
    db.executemany("DELETE FROM jobs WHERE job_id = ?", [(job_id,) for job_id, _, _ in rows])
    return len(rows)


def _delete_file(outputs: OutputStorage | None, job_id: str, location: str) -> None:
    """One file of a pruned job, and the staged files of its attempts that never recorded them (a replica
    lost mid-save); a failure is logged and retention goes on."""
    try:
        if outputs is not None:
            outputs.delete(location)  # only under the storage's root
            outputs.delete_staged(location)
        elif not is_url(location):
            Path(location).unlink(missing_ok=True)
    except Exception:
        logger.warning("retention: could not delete %s of job %s", location, job_id, exc_info=True)
