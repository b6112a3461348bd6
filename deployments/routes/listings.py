"""What is installed: checkpoints and their aliases, LoRAs, upscalers, VAEs, embeddings, samplers; what each model
family takes. Folders are read on every request (in a worker thread), so a file dropped in is listed at once."""

import asyncio

from fastapi import APIRouter

from deployments.contract import documented_errors
from deployments.services import ServicesDep
from pipelines.families import FAMILIES
from pipelines.samplers import sampler_names, schedule_type_names
from pipelines.schemas import (
    EmbeddingInfo,
    EmbeddingsResponse,
    FamiliesResponse,
    LoraInfo,
    LorasResponse,
    ModelAlias,
    ModelAliasesResponse,
    ModelInfo,
    ModelsResponse,
    SamplingMethodsResponse,
    UpscalerInfo,
    UpscalersResponse,
    VaeInfo,
    VaesResponse,
    family_info,
)
from pipelines.upscalers import LATENT_MODES, RESIZE_MODES

router = APIRouter()
ERRORS = documented_errors(401, 503)


@router.get("/models", response_model=ModelsResponse, responses=ERRORS)
async def models(services: ServicesDep) -> ModelsResponse:
    entries = await asyncio.to_thread(services.libraries.catalog.list_models)
    return ModelsResponse(
        models=[ModelInfo(name=e.name, label=e.label, family=e.family, inpainting=e.inpainting,
                          max_size=e.max_size) for e in entries]
    )  # fmt: skip


@router.get("/families", response_model=FamiliesResponse, responses=ERRORS)
async def families() -> FamiliesResponse:
    """What each model family's jobs take (samplers, schedule types, size multiple) and default to, so a client
    can build a request for the model it picked (`family` in GET /models)."""
    return FamiliesResponse(families=[family_info(family) for family in FAMILIES.values()])


@router.get("/models/aliases", response_model=ModelAliasesResponse, responses=ERRORS)
async def model_aliases(services: ServicesDep) -> ModelAliasesResponse:
    pairs = await asyncio.to_thread(services.libraries.catalog.aliases)
    models = [ModelAlias(name=name, label=label) for label, name in pairs]
    return ModelAliasesResponse(models=models, message=f"{len(models)} model aliases")


@router.get("/loras", response_model=LorasResponse, responses=ERRORS)
async def list_loras(services: ServicesDep) -> LorasResponse:
    found = await asyncio.to_thread(services.libraries.loras.available)
    return LorasResponse(loras=[LoraInfo(name=lora.name, scale=1.0, family=lora.family) for lora in found])


@router.get("/upscalers", response_model=UpscalersResponse, responses=ERRORS)
async def list_upscalers(services: ServicesDep) -> UpscalersResponse:
    files = await asyncio.to_thread(services.libraries.upscalers.available)
    listed = [UpscalerInfo(name=name, path="internal") for name in (*LATENT_MODES, *RESIZE_MODES)]
    listed += [UpscalerInfo(name=item.name, path=str(item.path)) for item in files]
    return UpscalersResponse(upscalers=listed)


@router.get("/vaes", response_model=VaesResponse, responses=ERRORS)
async def list_vaes(services: ServicesDep) -> VaesResponse:
    found = await asyncio.to_thread(services.libraries.vaes.available)
    return VaesResponse(vaes=[VaeInfo(name=vae.name, path=str(vae.path)) for vae in found])


@router.get("/embeddings", response_model=EmbeddingsResponse, responses=ERRORS)
async def list_embeddings(services: ServicesDep) -> EmbeddingsResponse:
    found = await asyncio.to_thread(services.libraries.embeddings.available)
    return EmbeddingsResponse(embeddings=[EmbeddingInfo(name=item.name, family=item.family) for item in found])


@router.get("/sampling_methods", response_model=SamplingMethodsResponse, responses=ERRORS)
async def sampling_methods() -> SamplingMethodsResponse:
    return SamplingMethodsResponse(sampling_methods=sampler_names(), scheduler_types=schedule_type_names())
