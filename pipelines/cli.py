"""`diffusion-api`: the image engine from the command line (no Ray needed).

Errors are one line on stderr and a non-zero exit code, never a traceback.
"""

import argparse
import base64
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from pipelines.errors import DiffusionAPIError

# `img2img --masked-content`: A1111's "Masked content" names -> `inpainting_fill`
MASKED_CONTENT_CHOICES = {"fill": 0, "original": 1, "latent-noise": 2, "latent-nothing": 3}
OUTPUT_TYPES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp", ".avif": "avif", ".gif": "gif"}
# request field -> command-line flag, for error messages
FLAGS = {
    "prompt": "--prompt", "negative_prompt": "--negative-prompt", "steps": "--steps", "cfg_scale": "--cfg-scale",
    "width": "--width", "height": "--height", "model": "--model", "sampler_name": "--sampler",
    "scheduler_type": "--scheduler-type", "seed": "--seed", "clip_skip": "--clip-skip",
    "jpeg_quality": "--quality", "image": "--image", "denoising_strength": "--denoising-strength", "loras": "--lora",
    "hires.upscaler": "--upscaler", "vae": "--vae", "mask": "--mask", "mask_blur": "--mask-blur",
    "inpainting_fill": "--masked-content", "inpaint_full_res_padding": "--padding", "controlnet": "--controlnet",
    "distilled_cfg_scale": "--distilled-cfg-scale",
}  # fmt: skip


class CliError(Exception):
    """A user error: printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise CliError(message)


def _settings():
    from pipelines.settings import Settings

    return Settings.from_env()


def _catalog():
    return _catalog_for(_settings())


def cmd_demo_models(args) -> None:
    from pipelines.demo import (
        create_demo_controlnets,
        create_demo_embeddings,
        create_demo_loras,
        create_demo_models,
        create_demo_upscaler,
        create_demo_vae,
    )
    from pipelines.demo_adapters import create_demo_annotators, create_demo_ip_adapters
    from pipelines.demo_flow import create_demo_modules

    settings = _settings()
    models_dir = Path(args.models_dir) if args.models_dir else settings.models_dir
    loras_dir = Path(args.loras_dir) if args.loras_dir else settings.loras_dir
    upscalers_dir = Path(args.upscalers_dir) if args.upscalers_dir else settings.upscalers_dir
    written = create_demo_models(models_dir, overwrite=args.force)
    written += create_demo_loras(loras_dir, overwrite=args.force)
    written += create_demo_upscaler(upscalers_dir, overwrite=args.force)
    written += create_demo_vae(Path(args.vaes_dir) if args.vaes_dir else settings.vaes_dir, overwrite=args.force)
    embeddings_dir = Path(args.embeddings_dir) if args.embeddings_dir else settings.embeddings_dir
    written += create_demo_embeddings(embeddings_dir, overwrite=args.force)
    written += create_demo_controlnets(settings.controlnet_dir, overwrite=args.force)
    written += create_demo_ip_adapters(settings.ipadapter_dir, settings.clip_vision_dir, overwrite=args.force)
    written += create_demo_annotators(settings.annotators_dir, overwrite=args.force)
    written += create_demo_modules(Path(args.vaes_dir) if args.vaes_dir else settings.vaes_dir,
                                        settings.text_encoder_dir, overwrite=args.force)  # fmt: skip
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(
            "demo models, LoRAs, upscaler, VAE, embeddings, ControlNets, IP-Adapters and the depth annotator already "
            "present (use --force to rewrite them)"
        )


def cmd_vaes(args) -> None:
    from pipelines.vaes import VaeLibrary

    settings = _settings()
    found = VaeLibrary(settings).available()
    if not found:
        print(f"no VAEs in {settings.vaes_dir}; run 'diffusion-api demo-models' or add .safetensors files")
        return
    width = max(len(vae.name) for vae in found)
    print(f"{'NAME':<{width}}  PATH")
    for vae in found:
        print(f"{vae.name:<{width}}  {vae.path}")


def cmd_embeddings(args) -> None:
    from pipelines.embeddings import EmbeddingLibrary

    settings = _settings()
    found = EmbeddingLibrary(settings).available()
    if not found:
        print(f"no embeddings in {settings.embeddings_dir}; run 'diffusion-api demo-models' or add files")
        return
    width = max(len(item.name) for item in found)
    print(f"{'NAME':<{width}}  FAMILY")
    for item in found:
        print(f"{item.name:<{width}}  {item.family}")


def cmd_loras(args) -> None:
    from pipelines.loras import LoraLibrary

    settings = _settings()
    found = LoraLibrary(settings).available()
    if not found:
        print(f"no LoRAs in {settings.loras_dir}; run 'diffusion-api demo-models' or add .safetensors files")
        return
    width = max(len(lora.name) for lora in found)
    print(f"{'NAME':<{width}}  SCALE  FAMILY")
    for lora in found:
        print(f"{lora.name:<{width}}  {1.0:<5}  {lora.family}")


def cmd_lora_check(args) -> None:
    """Every model x every LoRA (or the ones named), checked by loading; prints the report."""
    from pipelines.generate import ImageEngine
    from pipelines.lora_check import check_all, format_report
    from pipelines.loras import LORA_SUFFIXES

    settings = _settings()
    if args.lora_dir:
        folder = Path(args.lora_dir)
        if not folder.is_dir():
            raise CliError(f"argument --lora-dir: no such folder {args.lora_dir!r}")
        settings = settings.model_copy(update={"loras_dir": folder})
    engine = ImageEngine(_catalog_for(settings), max_loaded_models=1)
    library = engine.loras  # reads settings.loras_dir, the --lora-dir folder when given
    if args.lora:
        path = Path(args.lora)
        if not path.is_file() or path.suffix.lower() not in LORA_SUFFIXES:
            raise CliError(f"argument --lora: not a LoRA file ({', '.join(LORA_SUFFIXES)}): {args.lora!r}")
        loras = [library.file(path)]
    else:
        loras = library.available()
    models = [engine.catalog.resolve(args.model)] if args.model else engine.catalog.list_models()
    if not loras or not models:
        raise CliError(f"nothing to check: {len(models)} models, {len(loras)} LoRAs (in {settings.loras_dir})")
    print(f"checking {len(models)} models x {len(loras)} LoRAs by loading each pair...", file=sys.stderr, flush=True)
    report = format_report(check_all(engine, models, loras))
    print(report, end="")
    if args.output:
        Path(args.output).write_text(report, encoding="utf-8")
        print(f"report written to {args.output}", file=sys.stderr)


def cmd_upscale(args) -> None:
    from PIL import Image, UnidentifiedImageError

    from pipelines.models import select_device
    from pipelines.upscalers import UpscalerLibrary

    file_type = _output_type(args.output)
    if not 1.0 <= args.scale <= 8.0:
        raise CliError(f"argument --scale: must be between 1 and 8, got {args.scale}")
    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, UnidentifiedImageError) as error:
        raise CliError(f"argument IMAGE: cannot read an image from {args.image!r}: {error}") from error
    library = UpscalerLibrary(_settings(), device=select_device()[0])
    width, height = round(image.width * args.scale), round(image.height * args.scale)
    result = library.upscale(image, args.upscaler, width, height)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    result.save(output, format={"jpg": "JPEG"}.get(file_type, file_type.upper()))
    print(f"wrote {output} ({result.width}x{result.height})")


def _catalog_for(settings):
    from pipelines.catalog import ModelCatalog

    return ModelCatalog(settings)


def cmd_models(args) -> None:
    models = _catalog().list_models()
    if not models:
        print(f"no models in {_settings().models_dir}; run 'diffusion-api demo-models'")
        return
    width = max(len(m.label) for m in models)
    name_width = max(len(m.name) for m in models)
    print(f"{'LABEL':<{width}}  {'NAME':<{name_width}}  FAMILY")
    for model in models:
        print(f"{model.label:<{width}}  {model.name:<{name_width}}  {model.family}"
              + ("  (inpainting)" if model.inpainting else ""))  # fmt: skip


def _output_type(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_TYPES:
        raise CliError(f"argument --output: unknown image extension {suffix or '(none)'!r}; use one of "
                       f"{', '.join(OUTPUT_TYPES)}")  # fmt: skip
    return OUTPUT_TYPES[suffix]


def _request_fields(args) -> dict:
    fields = {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
        "cfg_scale": args.cfg_scale, "distilled_cfg_scale": args.distilled_cfg_scale, "width": args.width,
        "height": args.height, "model": args.model,
        "sampler_name": args.sampler, "scheduler_type": args.scheduler_type, "seed": args.seed,
        "clip_skip": args.clip_skip, "jpeg_quality": args.quality, "loras": _lora_flags(args.lora),
        "vae": args.vae, "controlnet": _controlnet_flags(args.controlnet),
    }  # fmt: skip
    return {key: value for key, value in fields.items() if value is not None}


CONTROLNET_NUMBERS = ("weight", "guidance_start", "guidance_end", "threshold_a", "threshold_b")


def _controlnet_flags(values: list[str] | None) -> list[dict] | None:
    """`--controlnet model=NAME,image=FILE[,module=canny][,weight=0.8][,...]`: one unit per flag, any field of
    the native unit (`image` is a file path; given again, an IP-Adapter unit's further reference images)."""
    if not values:
        return None
    units = []
    for value in values:
        unit: dict = {}
        for part in value.split(","):
            key, sep, text = part.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key:
                raise CliError(f"argument --controlnet: expected key=value pairs separated by commas, got {value!r}")
            if key == "image":
                try:
                    image = base64.b64encode(Path(text).read_bytes()).decode("ascii")
                except OSError as error:
                    raise CliError(f"argument --controlnet: cannot read image {text!r}: {error.strerror}") from error
                earlier = unit.get("image")
                unit["image"] = image if earlier is None else [*([earlier] if isinstance(earlier, str) else earlier),
                                                               image]  # fmt: skip
            elif key in CONTROLNET_NUMBERS or key == "processor_res":
                try:
                    unit[key] = int(text) if key == "processor_res" else float(text)
                except ValueError:
                    raise CliError(f"argument --controlnet: {key} must be a number, got {text!r}") from None
            elif key == "pixel_perfect":
                unit[key] = text.strip().lower() in ("1", "true", "yes", "on")
            else:
                unit[key] = text
        units.append(unit)
    return units


def _lora_flags(values: list[str] | None) -> list[dict] | None:
    if not values:
        return None
    loras = []
    for value in values:
        name, _, scale = value.rpartition(":") if ":" in value else (value, "", "")
        try:
            loras.append({"name": name, "scale": float(scale) if scale else 1.0})
        except ValueError:
            raise CliError(f"argument --lora: expected NAME or NAME:SCALE, got {value!r}") from None
    return loras


def _generate(args, mode: str) -> None:
    from pipelines.generate import ImageEngine
    from pipelines.images import encode_base64
    from pipelines.infotext import encode_image
    from pipelines.schemas import Img2ImgRequest, Txt2ImgRequest

    file_type = _output_type(args.output)
    fields = _request_fields(args)
    if mode == "img2img":
        try:
            fields["image"] = encode_base64(Path(args.image).read_bytes())
        except OSError as error:
            raise CliError(f"argument --image: cannot read {args.image!r}: {error.strerror}") from error
        if args.denoising_strength is not None:
            fields["denoising_strength"] = args.denoising_strength
        if args.mask:
            try:
                fields["mask"] = encode_base64(Path(args.mask).read_bytes())
            except OSError as error:
                raise CliError(f"argument --mask: cannot read {args.mask!r}: {error.strerror}") from error
            fields.update(mask_blur=args.mask_blur, inpainting_fill=MASKED_CONTENT_CHOICES[args.masked_content],
                          inpainting_mask_invert=args.invert_mask, inpaint_full_res=args.only_masked,
                          inpaint_full_res_padding=args.padding)  # fmt: skip
        request = Img2ImgRequest(**fields)
    else:
        request = Txt2ImgRequest(**fields)
    engine = ImageEngine(_catalog())
    result = engine.generate(request)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(encode_image(result.image, file_type, result.infotext, request.jpeg_quality))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {output} ({result.width}x{result.height}, seed {result.seed}, "
          f"{result.generation_time_sec:.2f}s)")  # fmt: skip


def cmd_infotext(args) -> None:
    from pipelines.infotext import read_infotext

    try:
        data = Path(args.image).read_bytes()
    except OSError as error:
        raise CliError(f"argument IMAGE: cannot read {args.image!r}: {error.strerror}") from error
    text = read_infotext(data)
    if text is None:
        raise CliError(f"{args.image}: no generation parameters found in the image")
    print(text)


# Ray Serve's high-throughput mode (Ray's own switches, documented for production in the README): HAProxy
# in front instead of the Python proxy actor, direct replica-to-replica gRPC, user code on the replica's main
# event loop. It cuts the CPU an HTTP request costs several times over (bench/RESULTS.md).
# The replicas' gRPC accepts messages up to 4 MiB by default: images handed between deployments (an upscaled
# 2048x2048 image is 12 MiB, an img2img input up to `max_request_bytes`) need more.
SERVE_ENVIRONMENT = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                     "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(512 * 2**20)}  # fmt: skip


def cmd_serve(args) -> None:
    """Runs `serve run` on the local config in the foreground, as a child it supervises: SIGTERM, SIGINT
    (Ctrl-C) or SIGHUP stop the service and every process it started, HAProxy and Ray's included
    (pipelines/serve_supervisor.py). A start first stops a stale HAProxy an earlier crash left."""
    import os
    import shutil

    from pipelines import serve_supervisor as supervisor
    from pipelines.settings import PROJECT_ROOT

    config = Path(args.config) if args.config else PROJECT_ROOT / "configs" / "serve_local.yaml"
    if not config.is_file():
        raise CliError(f"argument --config: no such file {str(config)!r}")
    if args.stop_timeout <= 0:
        raise CliError(f"argument --stop-timeout: must be positive, got {args.stop_timeout:g}")
    serve_cli = shutil.which("serve", path=os.path.dirname(sys.executable)) or shutil.which("serve")
    if serve_cli is None:
        raise CliError("the Ray Serve CLI ('serve') is not installed; run 'make install'")
    environment = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **SERVE_ENVIRONMENT, **os.environ}
    environment.update(supervisor.haproxy_environment(environment))
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    # A cluster of its own: without an address, `serve run` would join the last `ray start` cluster of the
    # machine (and stop Serve there on Ctrl-C). RAY_ADDRESS still names a cluster to deploy to.
    local = not environment.get("RAY_ADDRESS")
    argv = [serve_cli, "run", *(["--address", "local"] if local else []), str(config)]
    folder, config_name = supervisor.haproxy_config(environment)
    lock = supervisor.ServiceLock(folder)
    try:
        if local:  # on RAY_ADDRESS's cluster, HAProxy runs on its nodes
            lock.acquire()
            supervisor.clear_stale_haproxies(folder, config_name, _say)
            supervisor.check_ports(supervisor.service_ports(config, environment))
    except supervisor.ServiceStartError as error:
        lock.release()
        raise CliError(str(error)) from None
    try:
        print(f"starting the service from {config} (Ctrl-C stops it)", flush=True)
        code = supervisor.supervise(argv, environment, PROJECT_ROOT, haproxy_folder=folder,
                                    haproxy_config_name=config_name, stop_timeout_s=args.stop_timeout,
                                    notify=_say)  # fmt: skip
    finally:
        lock.release()
    if code is None:
        _say("the service stopped")
    elif code != 0:
        raise CliError(f"the service stopped: 'serve run' exited with {code} (see its messages above)")


def _say(message: str) -> None:
    print(f"diffusion-api: {message}", file=sys.stderr, flush=True)


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model name or label (see 'diffusion-api models')")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--cfg-scale", type=float, help="absent: the model family's (7; FLUX.1 1; SD 3.5 4.5)")
    parser.add_argument("--distilled-cfg-scale", type=float, help="FLUX.1 dev's guidance embedding (absent: 3.5)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--sampler", help="A1111 sampler name, e.g. 'DPM++ 2M' or 'Euler a'")
    parser.add_argument("--scheduler-type", help="schedule type, e.g. karras, exponential, automatic")
    parser.add_argument("--seed", type=int, help="-1 or absent: random")
    parser.add_argument("--clip-skip", type=int)
    parser.add_argument("--quality", type=int, help="jpg/webp/avif quality (1-100)")
    parser.add_argument("--lora", action="append", metavar="NAME[:SCALE]", help="apply a LoRA (repeatable)")
    parser.add_argument("--vae", help="a VAE (see 'diffusion-api vaes'); default: the model's own")
    parser.add_argument(
        "--controlnet", action="append", metavar="model=NAME,image=FILE[,module=canny,...]",
        help="a ControlNet or IP-Adapter unit (repeatable): its fields as key=value, image=FILE again for more "
        "references (README 'ControlNet and IP-Adapter')",
    )  # fmt: skip
    parser.add_argument("--output", required=True, help="output file; .png .jpg .webp .avif .gif")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusion-api", description="Stable Diffusion image engine and service.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser("demo-models", help="write the tiny random-weight demo models")
    demo.add_argument("--models-dir", help="target folder (default: stable_diffusion/models)")
    demo.add_argument("--loras-dir", help="target folder for the demo LoRAs (default: stable_diffusion/loras)")
    demo.add_argument(
        "--upscalers-dir", help="target folder for the demo upscaler (default: stable_diffusion/upscalers)"
    )
    demo.add_argument("--vaes-dir", help="target folder for the demo VAE (default: stable_diffusion/vae)")
    demo.add_argument("--embeddings-dir", help="target folder for the demo embeddings (default: "
                      "stable_diffusion/embeddings)")  # fmt: skip
    demo.add_argument("--force", action="store_true", help="rewrite models that exist")
    demo.set_defaults(handler=cmd_demo_models)

    commands.add_parser("models", help="list installed models: label, name, family").set_defaults(handler=cmd_models)
    commands.add_parser("loras", help="list installed LoRAs: name, scale, family").set_defaults(handler=cmd_loras)
    commands.add_parser("vaes", help="list installed VAEs: name, path").set_defaults(handler=cmd_vaes)
    commands.add_parser("embeddings", help="list installed embeddings: name, family").set_defaults(
        handler=cmd_embeddings
    )

    check = commands.add_parser("lora-check", help="LoRA compatibility report (loads every model x LoRA pair)")
    check.add_argument("--model", help="one model (name or label); default: every model")
    check.add_argument("--lora", help="one LoRA file (any path)")
    check.add_argument("--lora-dir", help="check the LoRAs in this folder instead of stable_diffusion/loras")
    check.add_argument("--output", help="also write the report to this file")
    check.set_defaults(handler=cmd_lora_check)

    txt2img = commands.add_parser("txt2img", help="generate an image from a prompt")
    _add_generation_flags(txt2img)
    txt2img.set_defaults(handler=lambda args: _generate(args, "txt2img"))

    img2img = commands.add_parser("img2img", help="generate an image from an image and a prompt")
    _add_generation_flags(img2img)
    img2img.add_argument("--image", required=True, help="input image file")
    img2img.add_argument("--denoising-strength", type=float)
    img2img.add_argument("--mask", help="inpainting: mask image file (white = repaint)")
    img2img.add_argument("--mask-blur", type=int, default=4, help="mask edge blur in px (default 4)")
    img2img.add_argument("--masked-content", choices=list(MASKED_CONTENT_CHOICES), default="original",
                         help="what the masked area starts from (default original)")  # fmt: skip
    img2img.add_argument("--invert-mask", action="store_true", help="repaint the black part of the mask")
    img2img.add_argument(
        "--only-masked",
        action="store_true",
        help="repaint only the masked region (plus --padding) at the full size, then paste it back",
    )
    img2img.add_argument("--padding", type=int, default=32, help="--only-masked: px around the mask (default 32)")
    img2img.set_defaults(handler=lambda args: _generate(args, "img2img"))

    infotext = commands.add_parser("infotext", help="print the A1111 parameters embedded in an image")
    infotext.add_argument("image", metavar="IMAGE")
    infotext.set_defaults(handler=cmd_infotext)

    upscale = commands.add_parser("upscale", help="upscale an image with an upscaler model (ESRGAN family)")
    upscale.add_argument("image", metavar="IMAGE")
    upscale.add_argument("--upscaler", required=True, help="file name in stable_diffusion/upscalers")
    upscale.add_argument("--scale", type=float, default=4.0, help="final size factor (default 4)")
    upscale.add_argument("--output", required=True, help="output file; .png .jpg .webp .avif .gif")
    upscale.set_defaults(handler=cmd_upscale)

    serve = commands.add_parser("serve", help="start the HTTP service on the local config (Ctrl-C stops it)")
    serve.add_argument("--config", help="Serve config file (default: configs/serve_local.yaml)")
    serve.add_argument("--stop-timeout", type=float, default=15.0, metavar="SECONDS",
                       help="on SIGTERM/Ctrl-C, how long Ray may take to shut down in order before its "
                            "processes are stopped (default 15)")  # fmt: skip
    serve.set_defaults(handler=cmd_serve)
    return parser


def _validation_message(error: ValidationError) -> str:
    first = error.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else "input"
    return f"argument {FLAGS.get(name, name)}: {first['msg']} (got {first.get('input')!r})"


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        args.handler(args)
        return 0
    except CliError as error:
        message = str(error)
    except ValidationError as error:
        message = _validation_message(error)
    except DiffusionAPIError as error:
        field = error.field or ""
        flag = "--controlnet" if field.startswith("controlnet") else FLAGS.get(field, error.field)
        message = f"argument {flag}: {error.message}" if flag else error.message
    except KeyboardInterrupt:
        message = "interrupted"
    print(f"diffusion-api: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
