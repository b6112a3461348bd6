"""The upscaler deployment (Real-ESRGAN-class models through spandrel). Its image work lands with the
hires-fix/upscaler issue; the deployment is here so the application graph is complete."""

from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=2)
class Upscaler:
    def __init__(self, settings: dict):
        self.settings = settings

    def check_health(self) -> None:
        pass
