"""What a decode failure may say: one line built from a fixed vocabulary, never a file's bytes.

A DICOM header is free text written by the archive: any string element may hold a patient's
name or id, and decoders quote what they refuse (pydicom's ``Unsupported (0028,1056) VOI LUT
Function value 'PIDSECRET'``), list every plugin they tried over several lines, or turn bytes
misread as a header into an element tag. A reason for ``errors.csv`` is therefore built here
from: the stage that failed, the keyword of the element the decoder named (from pydicom's data
dictionary, looked up by tag, keyword or name; never the tag itself, which may be pixel bytes
read as a header), and the kind of fault. A codec's own explanation of a broken compressed
stream (libjpeg's error code, "failed to read the header") is kept, with quoted text, tags and
any word that occurs in the file's bytes removed, so that the cause still fits on the line.

The same holds for a header's coded elements that rows keep (Modality, ImageLaterality,
ViewPosition): only values from the standard's lists below pass (:func:`header_code`).

Pure functions (no Ray); :func:`quiet_decoders` keeps the decoders' own warnings and log lines,
which quote header values too, off the console and out of the worker logs.
"""
from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

#: the elements the decoder reads (pixel module, LUTs, palettes, transfer syntax): a decoder's
#: message naming one of these by keyword or by its dictionary name is attributed to it
DECODER_KEYWORDS = (
    "TransferSyntaxUID", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "NumberOfFrames", "PixelData",
    "FloatPixelData", "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "LUTDescriptor", "LUTData",
    "ModalityLUTType", "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
    "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData", "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData", "SpecificCharacterSet",
)

# first match wins: "unsupported" before "invalid" (pydicom says "Unsupported ... value"),
# a length mismatch before "missing" (pydicom's "... is missing N bytes" is a short buffer)
_FAULT_KINDS = (
    (re.compile(r"unsupported|unknown|not supported|no (available|suitable) (plugin|decoder|handler)|"
                r"not (yet )?implemented|unable to decode pixel data with", re.I), "unsupported value"),
    (re.compile(r"length|insufficient|truncat|not enough|too (short|long)|exceed|mismatch|does(n't| not) match|"
                r"missing \d+ bytes|bytes? (of|are) (padding|excess)|end of (file|data|buffer)|than expected|"
                r"fewer|bytes of pixel data", re.I),
     "its size does not match the header"),
    (re.compile(r"missing|required|absent|not found|not present|no .{0,40} element|no suitable", re.I), "missing"),
    (re.compile(r"invalid|must be|greater than|less than|out of range|not allowed|cannot be|negative|"
                r"non-?finite|could not convert|not a (valid )?number", re.I), "invalid value"),
)
_TAG = re.compile(r"\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)|\b([0-9A-Fa-f]{8})\b")
_QUOTED = re.compile(r"""(b?'[^']*'|b?"[^"]*")""")
_QUOTED_INT = re.compile(r"'(-?\d{1,6})'")
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
_TOKEN = re.compile(r"[^\s:;,()<>\[\]{}'\"=]{4,}")
#: codec failures: pydicom lists each plugin's exception on its own line after this header
_PLUGIN_LINE = re.compile(r"^\s*([\w-]{2,24}):\s+(.+)$")


@lru_cache(maxsize=1)
def _names() -> dict[str, str]:
    """Lower-case keyword and dictionary name -> keyword, for the decoder's elements."""
    from pydicom.datadict import dictionary_description, tag_for_keyword

    out: dict[str, str] = {}
    for kw in DECODER_KEYWORDS:
        out[kw.lower()] = kw
        if tag_for_keyword(kw) is not None:
            out[dictionary_description(tag_for_keyword(kw)).lower()] = kw
    # pydicom names the palette module, not an element: its first required element stands for it
    out["palette color lookup table"] = "RedPaletteColorLookupTableDescriptor"
    return out


def _keyword_of_tag(group: str, element: str) -> str:
    from pydicom.datadict import keyword_for_tag

    return keyword_for_tag(int(group + element, 16)) or "an unknown element"


def named_elements(text: str) -> list[str]:
    """The element keywords a decoder's message names: by tag (a tag outside the data
    dictionary becomes "an unknown element": it may be file bytes misread as a header), by
    keyword or by dictionary name. Only keywords from pydicom's dictionary come out."""
    found: list[str] = []
    for m in _TAG.finditer(text):
        if m.group(3):  # an 8-digit hex word counts only where pydicom prints tags that way
            continue
        found.append(_keyword_of_tag(m.group(1), m.group(2)))
    lowered = text.lower()
    # longest first, so "Window Center & Width Explanation" style names do not split
    for name in sorted(_names(), key=len, reverse=True):
        if re.search(rf"(?<![a-z]){re.escape(name)}(?![a-z])", lowered):
            found.append(_names()[name])
            lowered = lowered.replace(name, " ")
    return list(dict.fromkeys(found))


def fault_kind(exc: BaseException) -> str:
    """The kind of fault a decoder's exception reports, from a fixed list (never its text)."""
    text = str(exc)
    for pattern, kind in _FAULT_KINDS:
        if pattern.search(text):
            return kind
    return f"unreadable ({type(exc).__name__})"


def redact(text: str, data: bytes | None = None) -> str:
    """Remove from one decoder message what may come from the file: quoted text (replaced by
    its length), element tags (replaced by the keyword), object addresses, and any word of
    four or more characters that occurs in ``data`` (the file's bytes)."""
    text = _QUOTED.sub(lambda m: f"<{len(m.group(0)) - 2} chars>", text)
    text = _OBJECT_REPR.sub("<stream>", text)
    text = _TAG.sub(lambda m: _keyword_of_tag(m.group(1), m.group(2)) if m.group(1) else "<hex>", text)
    if data:
        def from_file(m: re.Match) -> str:
            word = m.group(0)
            if word.lower() in _names():
                return word
            try:
                inside = word.encode("utf-8") in data or word.encode("utf-16-le") in data
            except UnicodeEncodeError:  # a surrogate cannot be in any encoded header
                inside = False
            return "<from the file>" if inside else word
        text = _TOKEN.sub(from_file, text)
    return " ".join(text.split())


def codec_cause(exc: BaseException, data: bytes | None = None, *, limit: int = 200) -> str | None:
    """One line of what each codec said about a compressed stream it could not decode, or None
    when the exception is not pydicom's "raised by all available plugins" list."""
    lines = str(exc).strip().splitlines()
    if len(lines) < 2 or "plugin" not in lines[0].lower():
        return None
    # a quoted integer in a codec's message is its error code (libjpeg's '-1038'), not a value
    lines = [_QUOTED_INT.sub(r"\1", line) for line in lines]
    causes = [f"{m.group(1)}: {redact(m.group(2), data)}" for m in map(_PLUGIN_LINE.match, lines[1:]) if m]
    if not causes:
        return None
    text = "; ".join(causes)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_fault(exc: BaseException, data: bytes | None = None) -> str:
    """The reason for a decoder's exception on a file: ``<keywords>: <kind of fault>``, plus the
    codec's cause for a compressed stream it could not decode. One line; the exception's own
    text contributes only dictionary keywords and redacted codec messages."""
    cause = codec_cause(exc, data)
    if cause is not None:
        return f"codec failed: {cause}"
    keywords = named_elements(str(exc))
    kind = fault_kind(exc)
    where = ", ".join(keywords[:3]) if keywords else "an element the decoder did not name"
    return f"{where}: {kind}"


@contextmanager
def quiet_decoders(names: tuple[str, ...] = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "PIL")
                   ) -> Iterator[list[warnings.WarningMessage]]:
    """Silence the decoders' warnings and log lines for the block (they quote header values,
    e.g. ``Invalid value for VR UI: '<a patient id>'``, and Ray copies a worker's stderr to
    the driver's console and its log files). Yields the caught warnings, to be counted only."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # child loggers (pydicom.pixels.*) inherit the level
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


#: DICOM Modality defined terms (PS3.3 C.7.3.1.1.1, current and retired): a reason or warning
#: names a file's modality only when it is one of these, since the element is free text
MODALITIES = frozenset(
    "AR ASMT AU BDUS BI BMD CD CF CP CR CS CT DD DF DG DM DOC DS DX EC ECG EPS ES FA FID FS GM HC HD IO IOL IVOCT "
    "IVUS KER KO LEN LP LS MA MG MR MS NM OAM OCT OP OPM OPR OPT OPTBSV OPTENF OPV OSS OT PLAN POS PR PT PX REG RESP "
    "RF RG RTDOSE RTIMAGE RTPLAN RTRECORD RTSTRUCT RWV SEG SM SMR SR SRF ST STAIN TEXTUREMAP TG US VA VF XA XAPS XC"
    .split())


def shown_modality(value: str | None) -> str:
    """A header's Modality as a reason or warning may show it: a defined term, ``missing``,
    or ``not a DICOM modality code`` (the value itself is never repeated)."""
    if not value:
        return "missing"
    return value if value in MODALITIES else "not a DICOM modality code"


# ------------------------------------------------------------------ header codes kept in rows
# A header's coded elements reach the Parquet rows and every later output (scores, exam
# tables), but the elements are free text: an archive may have written a name into them. Only
# values from the standard's fixed lists are kept; anything else becomes None.

#: ImageLaterality (0020,0062) enumerated values (PS3.3 C.8.11.7 / C.7.6.2: R, L, U unpaired,
#: B both); Laterality (0020,0060) allows R and L only, a subset
LATERALITIES = frozenset({"R", "L", "B", "U"})

#: CID 4014 "View for Mammography": the ACR MQCM 1999 abbreviations the standard lists beside
#: each code (PS3.16), plus XCC (exaggerated cranio-caudal, BI-RADS), which older archives write
_VIEWS = ("CC", "MLO", "ML", "LM", "LMO", "FB", "SIO", "ISO", "XCC", "XCCL", "XCCM")
#: CID 4015 "View Modifier for Mammography": abbreviations that replace a view (cleavage,
#: axillary tail, tangential), a prefix (magnification, spot compression) or a suffix (rolled
#: lateral/medial/inferior/superior, implant displaced, nipple in profile, anterior
#: compression, infra-mammary fold, axillary tissue)
_VIEW_REPLACEMENTS = ("CV", "AT", "TAN")
_VIEW_PREFIXES = ("", "M", "S", "MS", "SM")
_VIEW_SUFFIXES = ("", "RL", "RM", "RI", "RS", "ID", "NP", "AC", "IMF", "AX")
#: the ViewPosition values a row keeps: every view with its modifiers, a finite set built from
#: the lists above (so no free text can match it)
MAMMO_VIEWS = frozenset(
    [p + v + s for p in _VIEW_PREFIXES for v in _VIEWS for s in _VIEW_SUFFIXES] + list(_VIEW_REPLACEMENTS))


def header_code(value: str | None, codes: frozenset[str]) -> str | None:
    """A header element's value as a row may keep it: upper-cased and stripped, when it is one
    of ``codes``; otherwise None (the value itself goes nowhere)."""
    if value is None:
        return None
    code = str(value).strip().upper()
    return code if code in codes else None
