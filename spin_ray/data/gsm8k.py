"""GSM8K answer extraction: our numeric rule and lm-evaluation-harness's strict and flexible rules."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation, localcontext

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")

# lm-evaluation-harness, tasks/gsm8k/gsm8k.yaml (version 3.0): the two answer filters and the
# normalisation its exact_match applies to prediction and target alike (ignore_case: true).
HARNESS_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
HARNESS_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
HARNESS_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))
HARNESS_INVALID = "[invalid]"  # what the harness's regex filter returns when nothing matches


def normalise_number(text: str) -> str | None:
    """'$1,200.50' -> '1200.5', '18.00' -> '18', '-3' -> '-3'; None when it is not a number."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    # normalize() writes 100 as 1E+2, and rounds to the context's precision (28 digits): a model's 60-digit
    # answer must stay itself; format "f" writes plain digits
    with localcontext() as context:
        context.prec = max(28, len(cleaned))
        return format(value.normalize(), "f")


def final_answer(text: str | None) -> str | None:
    """Our rule: the number after the last '####', compared by value; without a marker, the last number in
    the text (small models often state the answer without the marker)."""
    if text is None:
        return None
    if "####" in text:
        numbers = _NUMBER.findall(text.rsplit("####", 1)[1])
        return normalise_number(numbers[0]) if numbers else None
    numbers = _NUMBER.findall(text)
    return normalise_number(numbers[-1]) if numbers else None


def has_answer_format(text: str | None) -> bool:
    """Whether an answer ends the GSM8K way: a last line '#### <number>'."""
    if not text:
        return False
    last = text.strip().rsplit("\n", 1)[-1].strip()
    return re.fullmatch(r"####\s*-?\$?[\d,]*\.?\d+\.?", last) is not None


def _harness_normalise(text: str) -> str:
    for pattern in HARNESS_IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def harness_strict(text: str | None) -> str:
    """lm-eval's strict-match filter: the first '#### <number>' (as written), else '[invalid]'."""
    match = HARNESS_STRICT.search(text or "")
    return match.group(1) if match else HARNESS_INVALID


def harness_flexible(text: str | None) -> str:
    """lm-eval's flexible-extract filter: the last number-like run in the text, else '[invalid]'."""
    matches = HARNESS_FLEXIBLE.findall(text or "")
    if not matches:
        return HARNESS_INVALID
    return next(group for group in matches[-1] if group)


def harness_match(extracted: str, human_answer: str) -> bool:
    """lm-eval's exact_match on GSM8K: both sides lose ',', '$', everything up to '#### ' and a trailing
    '.', then compare as lower-case strings ('18.00' does not equal '18' there, unlike our rule)."""
    return _harness_normalise(extracted) == _harness_normalise(human_answer)
