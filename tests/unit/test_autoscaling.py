"""QueueDepthPolicy's decisions on the contexts Serve gives it (built here as plain objects: the policy reads
only these fields; Serve's own wrapper adds the bounds, delays and the cold start around it)."""

from types import SimpleNamespace

from deployments.autoscaling import QueueDepthPolicy


def context(replicas: int, waiting: float | None = None, dispatched: float = 0.0, requests: float = 0.0):
    metrics = {} if waiting is None else {"waiting_images": {"r1": waiting}, "dispatched_images": {"r1": dispatched}}
    return SimpleNamespace(aggregated_metrics=metrics, current_num_replicas=replicas, total_num_requests=requests)


def test_replicas_follow_the_images_in_the_queue_and_the_requests_in_flight():
    policy = QueueDepthPolicy(target_images_per_replica=8)
    assert policy(context(1, waiting=12, dispatched=8))[0] == 3  # 20 images, 8 each
    assert policy(context(3, waiting=0, dispatched=0))[0] == 0  # idle: Serve keeps min_replicas and its delays
    assert policy(context(1, waiting=0, dispatched=0, requests=9))[0] == 2  # hand-offs arrive as requests
    assert policy(context(0))[0] == 0 and policy(context(0, requests=1))[0] == 1  # none up: nobody reports
    assert policy(context(2))[0] == 2  # starting replicas have not reported yet: no change
