"""The agent's request-head parser: whatever bytes come, a head, "not complete yet" or a
BadRequest with a status, never another exception; a well-formed request reads back as sent,
however it is split; each refusal names what was wrong."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from probes.agent.httphead import (
    BODY_LIMIT,
    HEAD_LIMIT,
    MAX_HEADERS,
    BadRequest,
    Head,
    parse_head,
    query_params,
)

pytestmark = pytest.mark.agent

TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ",
                min_size=1, max_size=12)
VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=30)
PARAM = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


def outcome(buf: bytes) -> Head | BadRequest | None:
    try:
        return parse_head(buf)
    except BadRequest as exc:
        return exc


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=HEAD_LIMIT + 64))
@example(b"GET / HTTP/1.1\nHost: a\n\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n")
def test_any_bytes_give_a_head_none_or_a_bad_request(data: bytes) -> None:
    got = outcome(data)
    if isinstance(got, BadRequest):
        assert got.status in (400, 413, 431, 501, 505) and str(got)
    elif isinstance(got, Head):
        assert 0 < got.size <= len(data) and data[got.size - 4:got.size] == b"\r\n\r\n"
        assert 0 <= got.content_length <= BODY_LIMIT
    else:
        assert len(data) <= HEAD_LIMIT  # never waits for more beyond the limit


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, str, str, dict[str, str], dict[str, str]]:
    method = draw(st.sampled_from(["GET", "HEAD", "POST"]))
    path = "/" + draw(st.text(alphabet="abcdefghij-/._~", max_size=10))
    params = draw(st.dictionaries(PARAM, PARAM, max_size=4))
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items())
    names = draw(st.lists(TOKEN, max_size=MAX_HEADERS - 1, unique_by=str.lower))
    headers = {n: draw(VALUE) for n in names if n.lower() not in
               ("host", "content-length", "transfer-encoding", "connection")}
    lines = [f"{method} {path}{'?' + query if query else ''} HTTP/1.1", "Host: agent:9470",
             *(f"{n}:{draw(st.sampled_from(['', ' ', '  ']))}{v}" for n, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), method, path, params, headers


@settings(max_examples=200, deadline=None)
@given(requests(), st.data())
def test_a_well_formed_request_reads_back_however_it_is_split(
        request: tuple[bytes, str, str, dict[str, str], dict[str, str]],
        data: st.DataObject) -> None:
    raw, method, path, params, headers = request
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert parse_head(raw[:cut]) is None  # not complete yet: wait for more
    head = parse_head(raw + b"GET /next HTTP/1.1\r\n")  # the next request does not spill in
    assert head is not None and head.size == len(raw)
    assert (head.method, head.path, head.keep_alive, head.content_length) == (method, path,
                                                                             True, 0)
    assert query_params(head.query) == params
    for name, value in headers.items():
        assert head.headers[name.lower()] == value.strip()


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab=&+%2Fc3é", max_size=30))
def test_query_params_read_as_the_first_of_each_name(query: str) -> None:
    first: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        first.setdefault(name, value)
    assert query_params(query) == first


@pytest.mark.parametrize(("raw", "status", "says"), [
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"x" * HEAD_LIMIT, 431, "longer than 8192"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * MAX_HEADERS + b"\r\n", 431,
     "More than 32"),
    (b"GET / HTTP/1.1\nHost: a\n\n", 400, "CRLF"),
    (b"GET /  HTTP/1.1\r\nHost: a\r\n\r\n", 400, "request line"),
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "request line"),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, "2.0"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, "Host"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "Host"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX : y\r\n\r\n", 400, "Bad header line"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n z\r\n\r\n", 400, "Bad header line"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: y\x00\r\n\r\n", 400, "Bad characters in header 'X'"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 501,
     "Transfer-Encoding"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400,
     "Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 65537\r\n\r\n", 413, "65536"),
])
def test_refusals_name_what_is_wrong(raw: bytes, status: int, says: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_head(raw)
    assert caught.value.status == status and says in str(caught.value)


def test_connection_close_and_http_1_0() -> None:
    def alive(raw: bytes) -> bool:
        head = parse_head(raw)
        assert head is not None
        return head.keep_alive

    assert alive(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert not alive(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n")
    assert not alive(b"GET / HTTP/1.0\r\n\r\n")
    assert alive(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
