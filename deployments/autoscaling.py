"""Autoscaling a generator family on its queue in the job store, not on requests in flight.

Jobs wait in the job store's fair queue and a family's replicas are given only what they have room for, so
Serve's default policy (ongoing requests per replica) no longer sees the demand. `QueueDepthPolicy` scales a
family to `ceil((images waiting + images dispatched) / target_images_per_replica)` replicas, from the figures
every replica of the family reports (`record_autoscaling_stats` in deployments/generators.py: the same
family-wide figures from the store on each), and never below what the requests in flight need at that target
(the Refiner's hand-offs from SDXL jobs reach it as requests, not through the queue). Serve applies
`min_replicas`, `max_replicas` and the delays around it. From zero replicas there is nobody to report: the
ingress sends the family one request, which waits at its handle, and Serve's cold start brings up the first
replica for it.

Configured in serve_config.yaml (`autoscaling_config.policy`). This module imports nothing of the project:
Serve's controller unpickles the policy by value, where the project's packages may not be importable.
"""

import math


class QueueDepthPolicy:
    """Replicas for the images the family has waiting and dispatched, `target_images_per_replica` each."""

    def __init__(self, target_images_per_replica: float = 8.0):
        if target_images_per_replica <= 0:
            raise ValueError("target_images_per_replica must be above 0")
        self.target = float(target_images_per_replica)

    def __call__(self, ctx) -> tuple[int, dict]:
        reported = ctx.aggregated_metrics or {}
        waiting = reported.get("waiting_images") or {}
        dispatched = reported.get("dispatched_images") or {}
        if not waiting and not dispatched:  # no replica has reported (none is up, or they are starting)
            if ctx.current_num_replicas == 0:
                return (1 if ctx.total_num_requests > 0 else 0), {}
            return ctx.current_num_replicas, {}
        images = max(waiting.values(), default=0.0) + max(dispatched.values(), default=0.0)
        requests = ctx.total_num_requests  # ongoing and queued at handles: jobs and hand-offs
        return max(math.ceil(images / self.target), math.ceil(requests / self.target)), {"images": images}
