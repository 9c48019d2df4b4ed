"""An API key covers every registered route except the explicit allow-list (health and the static page)."""

import httpx
import pytest
from liveserver import MODEL_NAME
from starlette.routing import Route

from ultrafuser.serve.app import OPEN_PATHS

KEY = "sk-test-0123456789abcdef"


@pytest.fixture
def keyed(make_server):
    return make_server(api_key=KEY)


def _routes(app):
    out = []
    for r in app.routes:
        assert isinstance(r, Route), f"unexpected route type {type(r).__name__} at {getattr(r, 'path', '?')}"
        for m in sorted(r.methods - {"HEAD"}):
            out.append((m, r.path.replace("{model_id:path}", MODEL_NAME)))
    return out


def test_allow_list_is_exactly_health():
    assert OPEN_PATHS == {"/health"}


def test_every_route_but_the_allow_list_needs_the_key(keyed):
    routes = _routes(keyed.app)
    paths = {p for _, p in routes}
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/"} <= paths
    with httpx.Client(base_url=keyed.url, timeout=30) as c:
        for method, path in routes:
            body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi",
                    "max_tokens": 1}
            if path == "/v1/chat/completions":
                body.pop("prompt")
            elif path == "/v1/completions":
                body.pop("messages")
            kw = {"json": body} if method == "POST" else {}
            none = c.request(method, path, **kw)
            wrong = c.request(method, path, headers={"Authorization": "Bearer " + KEY[:-1] + "X"}, **kw)
            short = c.request(method, path, headers={"Authorization": "Bearer"}, **kw)
            basic = c.request(method, path, headers={"Authorization": "Basic " + KEY}, **kw)
            right = c.request(method, path, headers={"Authorization": "Bearer " + KEY}, **kw)
            if path in OPEN_PATHS:
                assert none.status_code == 200, (method, path)
            else:
                for r in (none, wrong, short, basic):
                    assert r.status_code == 401, (method, path, r.status_code)
                    assert r.json()["error"]["code"] == "invalid_api_key"
                    assert r.headers["www-authenticate"] == "Bearer"
                    assert KEY not in r.text
            assert right.status_code == 200, (method, path, right.text)
        # paths that are not routes do not reveal themselves without the key
        assert c.get("/v1/secret").status_code == 401
        assert c.get("/v1/secret", headers={"Authorization": "Bearer " + KEY}).status_code == 404


def test_openai_client_with_and_without_key(keyed):
    openai = pytest.importorskip("openai")
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
    r = good.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].message.role == "assistant"
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_key_comparison_is_constant_time():
    import inspect

    from ultrafuser.serve import app as app_module

    src = inspect.getsource(app_module.APIKeyMiddleware)
    assert "hmac.compare_digest(" in src  # on SHA-256 digests: neither content nor length leaks through timing
    assert "token ==" not in src and "== token" not in src and "digest ==" not in src and "== self.digest" not in src
