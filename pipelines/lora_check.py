"""The LoRA compatibility report: every model x every LoRA, checked by loading the LoRA into the model.

Each pair gets the service's own pre-job check (family, then every targeted layer's shape against the
model's configs) and then a real `load_lora_weights` into the loaded model; a pair is compatible only when
both pass. The report's layout follows the API spec's sample.
"""

import datetime
import logging
from dataclasses import dataclass

from pipelines.catalog import ModelEntry
from pipelines.generate import ImageEngine
from pipelines.loras import LoraFile, LoraUse

RULE = "=" * 80


@dataclass
class PairResult:
    model: ModelEntry
    lora: LoraFile
    compatible: bool
    reason: str | None


def check_pair(engine: ImageEngine, model: ModelEntry, lora: LoraFile) -> PairResult:
    reason = engine.loras.check(lora, model)
    loaded = engine.load(model)
    use = LoraUse(lora=lora, scale=1.0, short_hash=engine.loras.short_hash(lora))
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.CRITICAL)  # a failed load is the expected outcome for many pairs
    try:
        with loaded.lock:
            loaded.unload_adapter(use.adapter_name)  # a job may have cached it: load it afresh
            load_error = loaded.load_adapter(use)
            loaded.unload_adapter(use.adapter_name)
    finally:
        diffusers_logger.setLevel(level)
    if reason is None and load_error is not None:
        reason = f"loading it into the model failed: {load_error}"
    return PairResult(model=model, lora=lora, compatible=reason is None, reason=reason)


def check_all(engine: ImageEngine, models: list[ModelEntry], loras: list[LoraFile], progress=None) -> list[PairResult]:
    results = []
    for model in models:
        for lora in loras:
            results.append(check_pair(engine, model, lora))
            if progress is not None:
                progress(results[-1])
        engine.unload(model.name)
    return results


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def format_report(results: list[PairResult], now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now()
    compatible = sum(result.compatible for result in results)
    lines = [
        RULE,
        "COMPREHENSIVE LoRA COMPATIBILITY REPORT",
        RULE,
        f"Generated: {now:%Y-%m-%d %H:%M:%S}",
        f"Total Tests: {len(results)}",
        f"Compatible: {compatible}",
        f"Incompatible: {len(results) - compatible}",
        f"Success Rate: {_percent(compatible, len(results))}",
        "",
        "SUMMARY BY MODEL:",
        "-" * 40,
    ]
    by_model: dict[str, list[PairResult]] = {}
    for result in results:
        by_model.setdefault(result.model.label, []).append(result)
    for label, pairs in by_model.items():
        good = sum(pair.compatible for pair in pairs)
        lines.append(f"{label}: {good}/{len(pairs)} ({_percent(good, len(pairs))})")
    for label, pairs in by_model.items():
        lines += ["", f"MODEL: {label}", "=" * 60]
        good = [pair for pair in pairs if pair.compatible]
        bad = [pair for pair in pairs if not pair.compatible]
        if good:
            lines.append("✓ COMPATIBLE LoRAs:")
            lines += [f"  • {pair.lora.name}" for pair in good]
        if bad:
            if good:
                lines.append("")
            lines.append("✗ INCOMPATIBLE LoRAs:")
            for pair in bad:
                lines += [f"  • {pair.lora.name}", f"    Reason: {pair.reason}"]
    return "\n".join(lines) + "\n"
