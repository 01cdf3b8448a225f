"""Property-based: 10,000 generated requests over real gRPC. Valid ones always get scores; invalid ones
get INVALID_ARGUMENT or NOT_FOUND naming the problem; nothing crashes, hangs or goes uncounted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from scoring.v1 import scoring_pb2, scoring_pb2_grpc
from server.validation import RequestLimits
from tests.helpers import build_small_model
from tests.server_harness import ServerProcess, run_server, scrape

SRCIDS = [1000, 1001, 1002, 1003]
LIMITS = RequestLimits()
EXAMPLES = 10_000

# Text that exercises the tokenizer and the size checks: control characters and NUL, emoji, mixed
# scripts, full-width and odd whitespace, and now and then something far over a limit.
_pieces = st.sampled_from([*"北京旅游攻略感冒药 abcXYZ019", "\x00", "\x01", "\x1f", "\u3000", "\u200b", "\t", "\n",
                           "🙂", "👩\u200d👩\u200d👧", "ß", "é", "Ω", "Я", "ع", "한", "\ufeff", "\U0010ffff", "iPhone"])
small_text = st.one_of(st.lists(_pieces, max_size=30).map("".join), st.text(max_size=20))
huge_text = st.builds(lambda c, n: c * n, st.sampled_from(["查", "a", " ", "🙂"]), st.integers(1000, 6000))
texts = st.one_of(small_text, small_text, small_text, huge_text)


@st.composite
def requests(draw: st.DrawFn) -> scoring_pb2.ScoreRequest:
    req = scoring_pb2.ScoreRequest(query=draw(texts))
    for field in ("title", "site", "industry"):
        if draw(st.booleans()):
            setattr(req, field, draw(st.one_of(texts, st.sampled_from(["baidu.com", "旅游", "LOC", ""]))))
    req.ner.extend(draw(st.lists(st.one_of(st.sampled_from(["LOC", "PER", "loc", " ORG ", "nope"]), small_text),
                                 max_size=40)))
    req.srcids.extend(draw(st.lists(st.one_of(st.sampled_from(SRCIDS), st.integers(-2**63, 2**63 - 1)), max_size=6)))
    req.model = draw(st.sampled_from(["", "", "", "tiny", "other", "../x"]))
    req.version = draw(st.one_of(st.just(0), st.just(0), st.just(1), st.integers(-2**63, 2**63 - 1)))
    req.request_id = draw(st.text(max_size=10))
    return req


def _size(s: str) -> int:
    return len(s.encode("utf-8"))


def expected_problems(req: scoring_pb2.ScoreRequest, tokenizer: Tokenizer) -> list[tuple[grpc.StatusCode, str]]:
    """The documented rules, written independently of the server's code."""
    inv, nf = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    problems = []
    if req.version < 0 or req.version > LIMITS.max_version:
        problems.append((inv, "version must be"))
    if req.model not in ("", "tiny"):
        problems.append((nf, "is not loaded"))
    if req.version > 1:
        problems.append((nf, "is not loaded"))
    if not req.query.strip():
        problems.append((inv, "query is empty or blank"))
    for field, limit in (("query", LIMITS.max_query_bytes), ("title", LIMITS.max_title_bytes),
                         ("site", LIMITS.max_site_bytes), ("industry", LIMITS.max_industry_bytes)):
        if _size(getattr(req, field)) > limit:
            problems.append((inv, f"{field} is"))
    if len(req.ner) > LIMITS.max_ner_tags:
        problems.append((inv, "ner has"))
    if any(_size(t) > LIMITS.max_ner_tag_bytes for t in req.ner):
        problems.append((inv, "ner["))
    if any(s not in SRCIDS for s in req.srcids):
        problems.append((inv, "srcids not in"))
    elif len(set(req.srcids)) != len(req.srcids):
        problems.append((inv, "more than once"))
    if req.query.strip() and not tokenizer.encode(req.query, add_special_tokens=False).ids:
        problems.append((inv, "no tokens"))
    return problems


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_repo")
    build_small_model(root, version=1, srcids=SRCIDS)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    with run_server(repo, "--max-queue-delay-ms", "0") as srv:
        yield srv


def test_generated_requests(server: ServerProcess, repo: Path) -> None:
    tokenizer = Tokenizer.from_file(str(repo / "tiny" / "1" / "tokenizer.json"))
    seen = {"sent": 0, "ok": 0, "rejected": 0}
    before = scrape(server)
    with grpc.insecure_channel(server.target) as channel:
        stub = scoring_pb2_grpc.ScorerStub(channel)  # type: ignore[no-untyped-call]

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(requests())
        def check(req: scoring_pb2.ScoreRequest) -> None:
            problems = expected_problems(req, tokenizer)
            seen["sent"] += 1
            try:
                resp = stub.Score(req, timeout=10)
            except grpc.RpcError as err:
                seen["rejected"] += 1
                assert problems, f"valid request refused: {err.code()} {err.details()} {req!r}"[:2000]
                details = err.details() or ""
                assert any(err.code() == code and needle in details for code, needle in problems), \
                    f"{err.code()} {details!r} does not match {problems}"[:2000]
                return
            seen["ok"] += 1
            assert not problems, f"invalid request answered: {problems} {req!r}"[:2000]
            assert set(resp.scores) == (set(req.srcids) or set(SRCIDS))
            assert all(0.0 <= v <= 1.0 for v in resp.scores.values())
            assert resp.version == 1

        check()
    assert seen["sent"] >= EXAMPLES and seen["ok"] > 1000 and seen["rejected"] > 1000, seen
    assert server.proc.poll() is None, "the server must still be running"
    after = scrape(server)

    def total(prefix: str) -> float:
        return sum(v for k, v in after.items() if k.startswith(prefix)) - \
            sum(v for k, v in before.items() if k.startswith(prefix))

    assert total("model_pv_total") == seen["sent"]
    assert total("model_lost_total") == seen["rejected"]


def test_oversized_message_is_refused_by_the_transport(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = scoring_pb2_grpc.ScorerStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(scoring_pb2.ScoreRequest(query="x", title="y" * (LIMITS.max_message_bytes + 1)), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Score(scoring_pb2.ScoreRequest(query="still alive"), timeout=10).version == 1
