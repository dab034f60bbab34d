"""No malformed request gets a 5xx: schemathesis against the app's own OpenAPI (through ASGI,
positive and negative cases), and hypothesis on raw paths, query strings and headers.

Cases are sent with valid credentials part of the time so the handlers behind authentication
see the generated input too. Examples are bounded (``MAX_EXAMPLES`` per operation and mode) so
the file runs in well under two minutes on two cores.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from query_api.app import create_app
from schemas.plans import PLANS
from tests.integration.test_query_api import TINY, World, basic, bearer, load_worlds, make_settings

pytestmark = pytest.mark.clickhouse

FUZZ_ADMIN_TOKEN = "mt_admin_fuzz-" + "z" * 32
MAX_EXAMPLES = 15  # per operation and generation mode: 30 per operation in all
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


class FuzzEnv:
    def __init__(self, app: Any, client: TestClient, world: World, foreign: World) -> None:
        self.app = app
        self.client = client
        self.world = world
        self.foreign = foreign

    def credentials(self, path: str) -> list[dict[str, str]]:
        """Valid credentials for the endpoint at ``path`` (and some of the wrong kind)."""
        s = self.world.secrets
        token = bearer(s["token_alice"])
        key = bearer(s["key_root"])
        if path.startswith("/api/v1/workspaces/") or path.startswith("/v1/workstations/"):
            return [token, bearer(s["token_expired"]), key]
        if path.startswith("/v2/quota-usages/"):
            return [basic(s["email_alice"], s["member_alice"]), basic("x@y.z", s["member_alice"]), token]
        if path.startswith("/api/v1/usage"):
            return [{"Authorization": f"Token {s['key_root']}"}, key, token]
        if path.startswith("/admin/"):
            return [bearer(FUZZ_ADMIN_TOKEN), key, token]
        return [key, bearer(s["member_alice"])]


@pytest.fixture
def fuzz(clickhouse: tuple[Any, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[FuzzEnv]:
    client, database = clickhouse
    monkeypatch.setitem(PLANS, TINY.tier, TINY)
    a, b = load_worlds(client, database, datetime.now(UTC))
    app = create_app(make_settings(database, query_cache_ttl_s=5.0, admin_token=FUZZ_ADMIN_TOKEN), client)
    with TestClient(app, raise_server_exceptions=False) as tc:
        yield FuzzEnv(app, tc, a, b)


def _operations(app: Any) -> list[Any]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]


def test_schemathesis_no_server_errors(fuzz: FuzzEnv) -> None:
    operations = _operations(fuzz.app)
    assert {op.path for op in operations} >= {
        "/api/v1/workspaces/{id}/stats",
        "/v2/quota-usages/contracts/{CONTRACT_ID}",
        "/v2/quota-usages/workspaces/{WORKSPACE_ID}",
        "/v1/workstations/{id}/usage",
        "/v1/workspace/usage",
        "/api/v1/usage/",
        "/api/v1/meters/{slug}/query",
    }
    failures: list[str] = []
    for op in operations:
        statuses: list[int] = []
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _runner(op, mode, fuzz.credentials(op.path), failures, statuses)()
        # The generated input did reach the handlers behind authentication.
        assert any(s not in (401, 429) for s in statuses), (op.path, statuses)
    assert not failures, failures


def _runner(
    op: Any, mode: GenerationMode, creds: list[dict[str, str]], failures: list[str], statuses: list[int]
) -> Any:
    @FUZZ_SETTINGS
    @given(case=op.as_strategy(generation_mode=mode), pick=st.integers(0, len(creds)))
    def run(case: Any, pick: int) -> None:
        headers = dict(case.headers or {})
        if pick < len(creds):  # else: whatever schemathesis generated
            headers.update(creds[pick])
        case.headers = headers
        response = case.call()
        statuses.append(response.status_code)
        if response.status_code >= 500:
            failures.append(
                f"{op.method.upper()} {op.path}: {response.status_code} for {case.as_curl_command()}"
            )
        assert response.status_code < 500
        if response.status_code >= 400:
            body = response.json()  # every error is JSON
            assert isinstance(body, dict) and body

    return run


# ---- hypothesis on raw paths, query strings and headers -------------------------------------------

_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]),
    max_size=40,
)
_HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
_PARAMS = (
    "period",
    "granularity",
    "date_from",
    "date_to",
    "workspace_id",
    "datastream_id",
    "page",
    "page_size",
    "from",
    "to",
    "window",
    "tz",
    "group_by",
    "filter_subject",
)
_TEMPLATES = (
    "/api/v1/workspaces/{}/stats",
    "/v2/quota-usages/contracts/{}",
    "/v2/quota-usages/workspaces/{}",
    "/v1/workstations/{}/usage",
    "/v1/workspace/usage",
    "/api/v1/usage/",
    "/api/v1/meters/{}/query",
)
_INTERESTING = (
    "week",
    "2026-02",
    "2026-13",
    "0000-01",
    "9999-12",
    "daily",
    "monthly",
    "2026-02-29",
    "2024-02-29",
    "0001-01-01",
    "9999-12-31",
    "-1",
    "0",
    "1",
    "101",
    "99999999999999999999",
    "MINUTE",
    "DAY",
    "MONTH",
    "UTC",
    "Asia/Kolkata",
    "Europe/Berlin",
    "2026-01-01T00:00:00Z",
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-12:00",
    "workspace_id",
    "task_type",
    "NaN",
    "%00",
    "\x00",
    "' OR 1=1 --",
    "{tenant:String}",
    "ä",
    "",
)


# About MAX_EXAMPLES * 2 requests per endpoint, like the schemathesis test.
@settings(FUZZ_SETTINGS, max_examples=MAX_EXAMPLES * 2 * len(_TEMPLATES))
@given(data=st.data())
def test_hypothesis_paths_queries_headers(fuzz: FuzzEnv, data: st.DataObject) -> None:
    w, foreign = fuzz.world, fuzz.foreign
    template = data.draw(st.sampled_from(_TEMPLATES), label="template")
    ids = [
        w.ids["root"],
        w.ids["contract"],
        w.ids["ws1"],
        foreign.ids["root"],
        foreign.ids["ws1"],
        "gateway_requests",
        "ci_step_memory_mib_seconds",
        "datastream_unique_rows",
    ]
    segment = data.draw(
        st.one_of(st.sampled_from(ids), _TEXT, st.sampled_from(_INTERESTING)), label="segment"
    )
    path = template.format(quote(segment, safe="")) if "{}" in template else template
    values = st.one_of(st.sampled_from(_INTERESTING), _TEXT, st.sampled_from(ids))
    query = data.draw(st.lists(st.tuples(st.sampled_from(_PARAMS), values), max_size=6), label="query")
    creds = [h["Authorization"] for h in fuzz.credentials(template)]
    auth = data.draw(
        st.one_of(
            st.sampled_from(creds),
            _HEADER_TEXT,
            st.builds(lambda s: "Bearer " + s, _HEADER_TEXT),
            st.builds(lambda s: "Basic " + s, _HEADER_TEXT),
            st.none(),
        ),
        label="authorization",
    )
    headers = {"Authorization": auth} if auth is not None else {}
    extra = data.draw(
        st.dictionaries(
            st.sampled_from(["Accept", "X-Forwarded-For", "Content-Type", "Range"]), _HEADER_TEXT, max_size=2
        ),
        label="headers",
    )
    headers.update(extra)
    method = data.draw(st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "OPTIONS"]), label="method")
    response = fuzz.client.request(method, path, params=query, headers=headers)
    assert response.status_code < 500, (method, path, query, response.status_code, response.text)
    if method != "HEAD" and response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/json")


def test_random_query_strings(fuzz: FuzzEnv) -> None:
    """Raw, unencoded junk in the query string (the URL parser's problem, not ours: still no 5xx)."""
    rng = random.Random(7)
    key = fuzz.credentials("/api/v1/usage/")[0]
    junk = "".join(c for c in string.printable if c.isprintable() and c not in "# ")
    for template in _TEMPLATES:
        path = template.format(fuzz.world.ids["root"]) if "{}" in template else template
        for _ in range(10):
            raw = "".join(rng.choice(junk) for _ in range(rng.randint(0, 60)))
            response = fuzz.client.get(f"{path}?{raw}", headers=key)
            assert response.status_code < 500, (path, raw, response.text)
