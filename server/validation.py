"""Request limits and checks; every rejection names the field and what is wrong with it."""

from __future__ import annotations

from dataclasses import dataclass

from model_format.features import EncodedRequest, FeatureError
from scoring.v1 import scoring_pb2
from server.model import LoadedModel


class InvalidRequest(ValueError):
    """Answered with INVALID_ARGUMENT; the message is shown to the caller."""


@dataclass(frozen=True)
class RequestLimits:
    """Explicit size limits, all in UTF-8 bytes. A message over `max_message_bytes` is refused by gRPC
    itself with RESOURCE_EXHAUSTED before it reaches the servicer."""

    max_query_bytes: int = 4096
    max_title_bytes: int = 16384
    max_site_bytes: int = 256
    max_industry_bytes: int = 256
    max_ner_tags: int = 32
    max_ner_tag_bytes: int = 128
    max_batch_items: int = 256
    max_stream_inflight: int = 256  # ScoreStream: items read and not yet answered, per stream
    max_message_bytes: int = 4 * 1024 * 1024
    max_version: int = 10**18


def _check_text(field: str, value: str, limit: int) -> None:
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise InvalidRequest(f"{field} is {size} bytes; the limit is {limit}")


def validate_and_encode(req: scoring_pb2.ScoreRequest, model: LoadedModel, limits: RequestLimits) -> EncodedRequest:
    """Checks a request against the limits and the model, and encodes it."""
    query, title, site, industry, ner = req.query, req.title, req.site, req.industry, tuple(req.ner)
    if not query.strip():
        raise InvalidRequest("query is empty or blank")
    _check_text("query", query, limits.max_query_bytes)
    _check_text("title", title, limits.max_title_bytes)
    _check_text("site", site, limits.max_site_bytes)
    _check_text("industry", industry, limits.max_industry_bytes)
    if len(ner) > limits.max_ner_tags:
        raise InvalidRequest(f"ner has {len(ner)} tags; the limit is {limits.max_ner_tags}")
    for i, tag in enumerate(ner):
        _check_text(f"ner[{i}]", tag, limits.max_ner_tag_bytes)
    check_srcids(list(req.srcids), model)
    try:
        return model.features.encode(query, title or None, site or None, ner, industry or None)
    except FeatureError as exc:
        raise InvalidRequest(str(exc)) from exc


def check_srcids(srcids: list[int], model: LoadedModel) -> None:
    if not srcids:
        return
    unknown = [s for s in srcids if s not in model.srcid_index]
    if unknown:
        shown = ", ".join(str(s) for s in unknown[:5])
        raise InvalidRequest(f"srcids not in {model.name} v{model.version}: {shown}"
                             + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    if len(set(srcids)) != len(srcids):
        raise InvalidRequest("srcids lists a srcid more than once")


def check_version_field(version: int, limits: RequestLimits) -> None:
    if version < 0 or version > limits.max_version:
        raise InvalidRequest(f"version must be 0 (serving) or a positive version number, got {version}")
