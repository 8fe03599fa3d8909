"""Which series is FLAIR, T1, T1ce or T2: from the series' names (SeriesDescription,
ProtocolName, SequenceName; the file name for NIfTI: BraTS 2021/2023 names and common
aliases), then from the contrast-agent tag and the sequence parameters (TR, TE, TI, inversion
recovery), with the user's overrides (``--flair 5``, ``--t1ce "t1 post"``, ``--t2 t2.nii.gz``)
first. Every decision carries its reason, for the table ``ingest`` prints and ``ingest.json``
keeps. A series that is none of the four, or a sequence claimed by two series, stops the case
with one line that names the series and the option that settles it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from brats_cggm import MODALITIES
from brats_cggm.errors import InconsistentCase
from brats_cggm.raw.series import Series

#: the ``ingest`` option that names each sequence
OPTIONS = {m: f"--{m}" for m in MODALITIES}

# Name rules, tried in order on the lower-cased names with separators as spaces. A contrast
# word turns a T1 into a T1ce; FLAIR is tried before T2 (a "t2 flair" is FLAIR).
_FLAIR = re.compile(r"\b(flair|t2f|fla|tirm|dark ?fluid|darkfluid)\b")
_T2 = re.compile(r"\b(t2|t2w|t2wi|t2 tse|tse t2|t2 frfse|t2 fse|t2 space)\b|\bt2(?=[a-z])(?!(star|f|\*))")
_NOT_T2 = re.compile(r"\b(t2\*|t2 ?star|swi|swan|gre t2|t2 gre|dwi|adc|trace|perfusion|dsc)\b|t2\*")
_T1 = re.compile(r"\b(t1|t1w|t1n|t1wi|mprage|mp rage|spgr|fspgr|bravo|tfl|t1 se|se t1|vibe|mpr)\b|\bt1(?=[a-z])")
_T1CE = re.compile(r"\b(t1ce|t1c|t1gd|t1 gd|t1 ?post|t1\+c|t1 \+ c)\b|t1c\b|t1\+c")
_CONTRAST = re.compile(r"(\+c\b|\+ ?gd|\bc\+|\bgd\b|\bgad|gado|\bpost\b|\bpost ?contrast|\bcontrast|\bce\b|\bkm\b|\bpostgd|dotarem|gadavist|multihance|magnevist|prohance|clariscan)")
_PRE = re.compile(r"\b(pre|pre ?contrast|native|nativ|ohne km|without)\b")
_OTHER = re.compile(r"\b(dwi|adc|trace|diff|diffusion|dti|swi|swan|perf|perfusion|dsc|dce|asl|mra|tof|loc|localizer|localiser|scout|survey|b0|fieldmap|field map|mip|cbf|cbv|mtt)\b")


@dataclass(frozen=True)
class Decision:
    """One series' identification: the sequence (None: none of the four) and why."""

    series: Series
    sequence: str | None
    reason: str

    def row(self) -> dict[str, str]:
        return {"series": self.series.label, "sequence": self.sequence or "-", "reason": self.reason}


def _words(text: str) -> str:
    return " ".join(re.sub(r"[_\-.,;:/()\[\]]+", " ", text.lower()).split())


def _names(series: Series) -> str:
    if series.kind == "nifti":
        name = re.sub(r"\.nii(\.gz)?$", "", series.files[0].name, flags=re.IGNORECASE)
        return _words(name)
    header = series.header
    return _words(" ".join(filter(None, (series.description, header.get("protocol", ""), header.get("sequence_name", "")))))


def from_names(series: Series) -> tuple[str | None, str]:
    """The sequence its names say (``None`` when they say none of the four), and why."""
    text = _names(series)
    if not text:
        return None, "no name"
    if _OTHER.search(text) and not (_FLAIR.search(text) or _T1.search(text) or _T1CE.search(text)):
        return None, f"name '{text}' names another kind of series"
    if _FLAIR.search(text):
        return "flair", f"name '{text}'"
    if _T1CE.search(text):
        return "t1ce", f"name '{text}'"
    if _T1.search(text):
        if _CONTRAST.search(text) and not _PRE.search(text):
            return "t1ce", f"name '{text}' (T1 with contrast)"
        if series.header.get("contrast_agent"):
            return "t1ce", f"name '{text}' and a contrast agent in the header"
        return "t1", f"name '{text}'"
    if _T2.search(text) and not _NOT_T2.search(text):
        return "t2", f"name '{text}'"
    return None, f"name '{text}' is none of the four"


def from_parameters(series: Series) -> tuple[str | None, str]:
    """The sequence TR/TE/TI and the contrast tag say (spin-echo and gradient-echo rules of thumb)."""
    h = series.header
    tr, te, ti = h.get("repetition_time_ms"), h.get("echo_time_ms"), h.get("inversion_time_ms")
    if tr is None or te is None:
        return None, "no TR/TE in the header"
    inversion = "IR" in str(h.get("scanning_sequence", "")).upper().split("\\") or (ti is not None and ti > 0)
    said = f"TR {tr:g} ms, TE {te:g} ms" + (f", TI {ti:g} ms" if ti else "")
    if inversion and ti is not None and ti >= 1500 and te >= 60:
        return "flair", f"{said}: fluid-suppressed inversion recovery"
    if te >= 60 and tr >= 1500:
        return "t2", f"{said}: long TR and TE"
    if te <= 30 and (tr <= 1000 or (inversion and ti is not None and ti < 1500)):
        if h.get("contrast_agent"):
            return "t1ce", f"{said} and a contrast agent: T1-weighted after contrast"
        return "t1", f"{said}: T1-weighted, no contrast agent in the header"
    return None, f"{said}: no rule"


def _matches(series: Series, wanted: str) -> bool:
    wanted_l = wanted.strip().lower()
    if series.number is not None and wanted_l == str(series.number):
        return True
    candidates = {series.description.lower(), series.source.lower(), series.files[0].name.lower()}
    folder = tuple(part for part in wanted_l.replace("\\", "/").split("/") if part)
    parts = tuple(series.source.lower().replace("\\", "/").split("/"))
    return wanted_l in candidates or (bool(folder) and parts[:len(folder)] == folder)


def identify(case_id: str, series: Sequence[Series], overrides: Mapping[str, str] | None = None,
             skip: Sequence[str] = ()) -> tuple[dict[str, Series], list[Decision]]:
    """``{sequence: series}`` for the sequences found, and the table of every decision.

    ``overrides`` maps a sequence to a series number, description or path (relative to the
    case); ``skip`` lists series to leave out the same way (a folder leaves out all it holds)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    unknown = sorted(set(overrides) - set(MODALITIES))
    if unknown:
        raise InconsistentCase(case_id, f"unknown sequence(s) {', '.join(unknown)}")
    decisions: list[Decision] = []
    for item in series:
        if any(_matches(item, s) for s in skip):
            decisions.append(Decision(item, None, "left out (--skip)"))
            continue
        forced = [m for m, wanted in overrides.items() if _matches(item, wanted)]
        if len(forced) > 1:
            raise InconsistentCase(case_id, f"{item.label} is named by {', '.join(OPTIONS[m] for m in forced)}")
        if forced:
            decisions.append(Decision(item, forced[0], f"{OPTIONS[forced[0]]}"))
            continue
        sequence, reason = from_names(item)
        if sequence is None and item.kind == "dicom" and not reason.endswith("another kind of series"):
            by_parameters, why = from_parameters(item)
            if by_parameters is not None:
                sequence, reason = by_parameters, why
            else:
                reason = f"{reason}; {why}"
        decisions.append(Decision(item, sequence, reason))
    for sequence, wanted in overrides.items():
        if not any(d.reason == OPTIONS[sequence] for d in decisions):
            names = "; ".join(s.label for s in series)
            raise InconsistentCase(case_id, f"{OPTIONS[sequence]} {wanted!r} matches no series (the case holds: {names})")
    unidentified = [d for d in decisions if d.sequence is None and d.reason != "left out (--skip)"]
    if unidentified:
        d = unidentified[0]
        hint = f"--skip {d.series.number if d.series.number is not None else d.series.source}"
        raise InconsistentCase(case_id, f"{d.series.label} is not identified as FLAIR, T1, T1ce or T2 ({d.reason}): "
                                        f"name it with --flair/--t1/--t1ce/--t2 or leave it out with {hint}")
    chosen: dict[str, Series] = {}
    for d in decisions:
        if d.sequence is None:
            continue
        if d.sequence in chosen:
            first = chosen[d.sequence]
            raise InconsistentCase(case_id, f"two series look like {d.sequence.upper()}: {first.label} and {d.series.label}; "
                                            f"choose one with {OPTIONS[d.sequence]} and leave the other out with --skip")
        chosen[d.sequence] = d.series
    if not chosen:
        raise InconsistentCase(case_id, "no FLAIR, T1, T1ce or T2 series found")
    return {m: chosen[m] for m in MODALITIES if m in chosen}, decisions
