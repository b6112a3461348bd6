"""Inpainting as A1111 does it: the mask's preparation, what the masked area starts from, and the paste back.

1. `plan_inpainting` (no model needed) reads the mask (white = repaint; in an RGBA file with transparency, the
   alpha channel), thresholds it, inverts it on request and blurs it by `mask_blur` px. "Whole picture" then
   works at the request's size; "Only masked" (`inpaint_full_res`) crops the masked region plus padding, grown
   to the request's aspect ratio, and repaints that crop at the request's size. "fill" paints the masked area
   with its surroundings' colours first.
2. `inpaint_arguments` (pipelines/inpaint_pipeline.py, which the engine alone imports: it needs torch) gives
   diffusers' inpainting pipeline (for ordinary and 9-channel inpainting checkpoints alike) each job's mask,
   and for "latent noise" / "latent nothing" the start latents A1111 uses.
3. `paste_back` puts the repainted image (or crop) over the input and lays the input's own pixels over it
   wherever the blurred mask is not white: outside the blurred mask the result is exactly the input, whatever
   the checkpoint (diffusers' pipelines do not do that by themselves).

This module is pure data and PIL: the request schemas import `InpaintingFill` from it, and the ingress replica
imports the schemas, so it never imports torch (tests/unit/test_ingress_imports.py).
"""

from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageFilter, ImageOps

InpaintingFill = Literal[0, 1, 2, 3]
# A1111's "Masked content" values, by `inpainting_fill`.
MASKED_CONTENT = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
GRAY = (128, 128, 128)  # what A1111 conditions inpainting checkpoints on where nothing is known (0 in [-1, 1])


@dataclass(frozen=True)
class InpaintPlan:
    """One job's inpainting, resolved before any model work."""

    mask: Image.Image  # "L" at the job's width x height: the blurred mask the model repaints (white)
    overlay: Image.Image  # "RGBA" at the result's size: the input, opaque where it is kept
    paste_box: tuple[int, int, int, int] | None  # "Only masked": where the repainted crop goes in the result
    fill: InpaintingFill
    blur: int
    padding: int
    inverted: bool = False

    def infotext_params(self) -> dict:
        """A1111's keys for it, written only where A1111 writes them (`Masked content` when it is not
        "original", `Mask blur` when there is one)."""
        return {
            "Mask blur": self.blur or None,
            "Mask mode": "Inpaint not masked" if self.inverted else None,
            "Inpaint area": "Only masked" if self.paste_box else None,
            "Masked area padding": self.padding if self.paste_box else None,
            "Masked content": MASKED_CONTENT[self.fill] if self.fill != 1 else None,
        }


def binary_mask(mask: Image.Image) -> Image.Image:
    """White where the mask is lighter than mid-gray; an RGBA mask with transparency uses its alpha (opaque =
    repaint), as A1111 reads masks drawn in its own editor."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        mask = mask.getchannel("A")
    return mask.convert("L").point(lambda value: 255 if value > 128 else 0)


def plan_inpainting(
    image: Image.Image,
    mask: Image.Image,
    width: int,
    height: int,
    *,
    blur: int,
    invert: bool,
    fill: InpaintingFill,
    full_res: bool,
    padding: int,
    warnings: list[str],
) -> tuple[Image.Image, InpaintPlan]:
    """The image the model starts from (width x height) and the plan, from the input image and its mask at
    the input's own size. The result has the request's size ("Whole picture") or the input's ("Only masked",
    as in A1111)."""
    if mask.size != image.size:
        warnings.append(f"the mask is {mask.width}x{mask.height} and the image {image.width}x{image.height}; the "
                        f"mask was resized to the image")  # fmt: skip
        mask = mask.resize(image.size, Image.Resampling.LANCZOS)
    mask = binary_mask(mask)
    if invert:
        mask = ImageOps.invert(mask)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    if mask.getbbox() is None:
        warnings.append("the mask has no white pixel (nothing to repaint): the result is the input image")
    box = crop_box(mask, padding, width, height) if full_res else None
    if box is None:
        model_mask = mask.resize((width, height), Image.Resampling.LANCZOS)
        start = image.resize((width, height), Image.Resampling.LANCZOS)
        # A1111 keeps the input only where the blurred mask is below half: the seam blends over half the blur.
        kept = ImageOps.invert(model_mask.point(lambda value: min(255, value * 2)))
        overlay = start.convert("RGBA")
    else:
        model_mask = mask.crop(box).resize((width, height), Image.Resampling.LANCZOS)
        start = image.crop(box).resize((width, height), Image.Resampling.LANCZOS)
        kept = ImageOps.invert(mask)
        overlay = image.convert("RGBA")
    overlay.putalpha(kept)
    if fill != 1:  # A1111 fills for the latent modes too (the inpainting checkpoints' conditioning sees it)
        start = fill_masked(start, model_mask)
    return start, InpaintPlan(model_mask, overlay, box, fill, blur, padding, invert)


def crop_box(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """ "Only masked": the masked pixels' bounding box plus `padding`, grown around its centre to the aspect
    ratio of width x height (the growth rounded down, as A1111) and kept inside the image (so the crop is
    not distorted when it is resized). None for an empty mask."""
    found = mask.getbbox()
    if found is None:
        return None
    x1, y1, x2, y2 = found
    x1, y1 = max(x1 - padding, 0), max(y1 - padding, 0)
    x2, y2 = min(x2 + padding, mask.width), min(y2 + padding, mask.height)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grown(y1, y2, int((x2 - x1) * height / width), mask.height)
    else:
        x1, x2 = _grown(x1, x2, int((y2 - y1) * width / height), mask.width)
    return x1, y1, x2, y2


def _grown(start: int, end: int, wanted: int, limit: int) -> tuple[int, int]:
    """[start, end) grown to `wanted` around its centre, shifted back inside [0, limit), clipped to it."""
    extra = wanted - (end - start)
    start, end = start - extra // 2, end + extra - extra // 2
    if end > limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, min(end - start, limit)
    return start, end


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """`inpainting_fill` 0 ("fill"): the masked area painted with the colours around it, by layering ever less
    blurred copies of the unmasked pixels (A1111's method), so the model starts from plausible colours."""
    kept = image.convert("RGBA")
    kept.putalpha(ImageOps.invert(mask))
    premultiplied = kept.convert("RGBa")  # blurring premultiplied colours does not bleed masked pixels in
    filled = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = premultiplied.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            filled.alpha_composite(layer)
    return filled.convert("RGB")


def paste_back(generated: Image.Image, plan: InpaintPlan) -> Image.Image:
    """The repainted image over the input: the crop back in its place ("Only masked"), then the input's
    pixels laid over it where the mask keeps them."""
    if plan.paste_box is None:
        result = generated.convert("RGBA")
    else:
        x1, y1, x2, y2 = plan.paste_box
        result = Image.new("RGBA", plan.overlay.size)
        result.paste(generated.convert("RGBA").resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
    result.alpha_composite(plan.overlay)
    return result.convert("RGB")


def __getattr__(name: str):
    """`from pipelines.inpaint import inpaint_arguments` still works (the diffusers call moved to
    pipelines/inpaint_pipeline.py); it imports torch only when it is asked for."""
    if name in ("inpaint_arguments", "is_inpaint_pipeline"):
        from pipelines import inpaint_pipeline

        return getattr(inpaint_pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
