"""A1111's ControlNet extension payload as native units (pipelines/a1111_controlnet.py), read as leniently as
the extension reads real clients' payloads."""

import pytest

from pipelines.a1111 import to_native
from pipelines.a1111_schemas import A1111Img2ImgRequest, A1111Txt2ImgRequest
from pipelines.errors import InvalidRequestError


def mapped(units: list, kind=A1111Txt2ImgRequest, script: str = "controlnet", **fields):
    request = kind(prompt="a cat", alwayson_scripts={script: {"args": units}}, **fields)
    return to_native(request, "demo-sd15")


def test_webuiapis_unit_dict_becomes_a_native_unit():
    webuiapi_unit = {"image": "aGk=", "mask": None, "module": "canny", "model": "demo-sd15-canny [2fa19545]",
                     "weight": 0.8, "resize_mode": "Resize and Fill", "low_vram": False, "processor_res": 512,
                     "threshold_a": 64, "threshold_b": 64, "guidance_start": 0.1, "guidance_end": 0.9,
                     "control_mode": 0, "pixel_perfect": False, "hr_option": "Both", "enabled": True}  # fmt: skip
    result = mapped([webuiapi_unit], script="ControlNet")
    (unit,) = result.native.controlnet
    assert (unit.model, unit.module, unit.image, unit.weight) == ("demo-sd15-canny [2fa19545]", "canny", "aGk=", 0.8)
    assert (unit.resize_mode, unit.control_mode, unit.guidance_start, unit.guidance_end) == (
        "Resize and Fill", "Balanced", 0.1, 0.9)  # fmt: skip
    assert result.save_detected_maps == [True] and not any("alwayson_scripts" in w for w in result.warnings)
    assert not any("field(s) not used" in warning for warning in result.warnings)  # webuiapi's fields are all read


def test_legacy_names_integers_strings_and_missing_enabled_are_read_as_the_extension_reads_them():
    legacy = {"input_image": "aGk=", "model": "demo-sd15-canny", "guidance": "0.6", "lowvram": True,
              "resize_mode": 0, "control_mode": "2", "hr_option": 1, "weight": "1.5",
              "pixel_perfect": "true"}  # fmt: skip
    (unit,) = mapped([legacy]).native.controlnet
    assert (unit.image, unit.guidance_end, unit.resize_mode, unit.control_mode, unit.hr_option, unit.weight) == (
        "aGk=", 0.6, "Just Resize", "ControlNet is more important", "Low res only", 1.5)  # fmt: skip
    assert unit.pixel_perfect is True
    old_mode = mapped([{"model": "demo-sd15-canny", "image": "aGk=", "resize_mode": "Envelope (Outer Fit)"}])
    assert old_mode.native.controlnet[0].resize_mode == "Resize and Fill"


def test_disabled_model_less_and_empty_image_units_are_handled_as_the_extension_does():
    result = mapped([{"enabled": False, "model": "demo-sd15-canny"}, {"model": "None", "image": "aGk="},
                     {"model": "demo-sd15-canny", "image": ""}], kind=A1111Img2ImgRequest,
                    init_images=["aGk="])  # fmt: skip
    (unit,) = result.native.controlnet  # the third: no image of its own (img2img: the init image)
    assert unit.image is None and any("unit 1 has no model" in warning for warning in result.warnings)
    images = mapped([{"model": "demo-sd15-canny", "image": {"image": "aGk=", "mask": "bWFzaw=="}},
                     {"model": "demo-sd15-canny", "image": ["aGk=", "b3RoZXI="]}])  # fmt: skip
    assert [unit.image for unit in images.native.controlnet] == ["aGk=", "aGk="]
    no_maps = mapped([{"model": "demo-sd15-canny", "image": "aGk=", "save_detected_map": False}])
    assert no_maps.save_detected_maps == [False]
    assert mapped([]).native.controlnet == [] and mapped([]).save_detected_maps == []  # webuiapi's empty args


def test_values_the_native_api_refuses_are_4xx_and_other_scripts_still_warn():
    with pytest.raises(InvalidRequestError) as refused:
        mapped([{"model": "demo-sd15-canny", "image": "aGk=", "weight": 7}])
    assert "controlnet.0.weight" in refused.value.message
    with pytest.raises(InvalidRequestError):
        mapped(["not a unit"])
    with pytest.raises(InvalidRequestError):
        to_native(A1111Txt2ImgRequest(prompt="x", alwayson_scripts={"controlnet": {"args": "a unit"}}), "demo-sd15")
    request = A1111Txt2ImgRequest(prompt="x", alwayson_scripts={"ADetailer": {"args": [False]},
                                                                "controlnet": {"args": []}})  # fmt: skip
    assert any("alwayson_scripts" in warning for warning in to_native(request, "demo-sd15").warnings)


def test_webuiapis_default_thresholds_are_fitted_to_the_modules_sliders_with_a_warning():
    webuiapi_like = {"model": "demo-sd15-canny", "image": "aGk=", "module": "tile_resample", "threshold_a": 64,
                     "threshold_b": 64, "processor_res": -5, "advanced_weighting": [1.0],
                     "mask": "bWFzaw=="}  # fmt: skip
    result = mapped([webuiapi_like])
    (unit,) = result.native.controlnet
    assert (unit.threshold_a, unit.threshold_b, unit.processor_res) == (8.0, 64.0, -1)
    assert any("threshold_a 64 is outside Down Sampling Rate's 1-8; 8 was used" in w for w in result.warnings)
    assert any("'advanced_weighting'" in w for w in result.warnings) and any(
        "mask is not used" in w for w in result.warnings
    )
