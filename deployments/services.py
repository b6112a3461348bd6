"""What the routers use, built once per ingress replica: the job service, the installed libraries, the output
storage and the Upscaler deployment. Routers reach it through the `services` dependency, never through a
module global (Serve may ship the app to a replica by value)."""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from ray import serve

from deployments.image_links import ImageLinks
from deployments.job_service import JobService, Libraries
from deployments.submissions import Arrivals
from pipelines.settings import Settings
from pipelines.storage import OutputStorage


@dataclass
class Services:
    settings: Settings
    libraries: Libraries
    jobs: JobService
    storage: OutputStorage
    upscaler: object  # the Upscaler deployment's handle (the A1111 API's extras)
    store_label: str  # where the job store is, for /health (a PostgreSQL URL without its password)
    arrivals: Arrivals  # submissions received and not yet handed over (a burst a generator may batch)
    links: ImageLinks = ImageLinks(ttl_s=3600.0)  # the OpenAI door's signed image links


def services(request: Request) -> Services:
    """The replica's services: those the app was given (a test's app.state), else the Serve replica's own."""
    given = getattr(request.app.state, "services", None)
    return given if given is not None else serve.get_replica_context().servable_object.services


ServicesDep = Annotated[Services, Depends(services)]
