"""Gateway claims of docs/gateway.md checked end to end (issue 15): real r-nacos, two real pods, the real gateway jar.

    client (API key or JWT) ──▶ gateway ──lb://model-service (Nacos)──▶ pod A | pod B
                                                                       (1 running + 0 waiting each)

1. JWT callers (`llm-gateway.jwt.*`, HS256): a valid token is served and billed to its `sub` (access log,
   token metric, a budget per subject, shared by every token of that subject); an expired token, a token signed
   with another secret or one whose claims were altered gets 401 `invalid_api_key` in OpenAI's shape;
2. every attempt refused: with both pods full (one long stream each, sent to the pods directly), a request
   through the gateway is tried on the pods `1 + resilience.retries` times and the client gets the last pod's
   own 429 (`server_overloaded`) with its `Retry-After`, not a gateway 503.

The pods are real: with `--max-running-requests 1 --max-waiting-requests 0`, one running stream makes a pod
refuse every other request at admission, deterministically, so no stub pod is needed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import time

import httpx
import pytest
from conftest import GATEWAY_JAR, assert_openai_error, metric_sum, need_jar, start_gateway, start_pods
from nacos_fixtures import start_seeded_rnacos, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

INTERNAL_KEY = "internal-claims-key"
MODEL = "smollm2-135m-instruct"
KEYS = {"ops": ("sk-ops-claims", 0, 0)}  # name: (key, requests/min, tokens/min); 0 = unlimited
JWT_SECRET = "claims-test-hs256-secret-of-32-bytes-or-more"
JWT_TOKENS_PER_MINUTE = 20  # one short answer (a ~35-token prompt + up to 8 tokens) overdraws a subject
RETRIES = 2  # resilience.retries (the default, set explicitly: the test counts the attempts)


def chat(max_tokens: int = 8, stream: bool = False, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0, "max_tokens": max_tokens, "stream": stream, **extra}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_hs256(secret: str = JWT_SECRET, **claims) -> str:
    """A compact HS256 JWS (RFC 7515/7519), written out here so the test does not trust a JWT library's defaults."""
    signing_input = f"{_b64url(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}." \
                    f"{_b64url(json.dumps(claims).encode())}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64url(signature)}"


def valid_claims(sub: str, **extra) -> dict:
    now = int(time.time())
    return {"sub": sub, "iat": now, "exp": now + 600, **extra}


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def nacos(tmp_path_factory):
    need_jar(GATEWAY_JAR)
    server = start_seeded_rnacos(tmp_path_factory, "claims")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pods(nacos, tmp_path_factory):
    """Two pods that take one request each and queue none: a second request is a 429 at admission."""
    servers = start_pods(tmp_path_factory.mktemp("claims-pods"), nacos, 2,
                         "--max-running-requests", "1", "--max-waiting-requests", "0",
                         env={"MODEL_SERVICE_API_KEY": INTERNAL_KEY, "MODEL_SERVICE_THREADS": "1"})
    yield servers
    for srv in servers:
        srv.stop()


@pytest.fixture(scope="module")
def gateway(nacos, pods, tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("claims-gw"), nacos.address, INTERNAL_KEY, KEYS,
                       "--llm-gateway.jwt.enabled=true",
                       f"--llm-gateway.jwt.hmac-secret={JWT_SECRET}",
                       "--llm-gateway.jwt.requests-per-minute=0",
                       f"--llm-gateway.jwt.tokens-per-minute={JWT_TOKENS_PER_MINUTE}",
                       f"--llm-gateway.resilience.retries={RETRIES}")
    yield gw
    gw.stop()

# ---------------------------------------------------------------------------------------- 1. JWT callers
def test_jwt_caller_is_served_and_billed_to_its_subject(gateway):
    jwt_tokens_before = metric_sum(gateway.prometheus(), "llm_gateway_tokens_total", caller="jwt")
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(),
                   headers=bearer(jwt_hs256(**valid_claims("jwt-alice"))), timeout=120)
    assert r.status_code == 200, r.text
    used = r.json()["usage"]["total_tokens"]
    assert used > JWT_TOKENS_PER_MINUTE, r.json()["usage"]

    # billed to the subject: the access log and the token metric name it, with the answer's real usage
    # (the access line is written when the exchange has ended, which may be just after the client got the answer)
    line = wait_for(lambda: next((entry for entry in gateway.access_log() if entry.get("caller") == "jwt-alice"),
                                 None), 10, message="the access log line of jwt-alice's answer")
    assert line["auth"] == "jwt" and line["status"] == 200 and line["total_tokens"] == used, line
    # the token metric counts JWT subjects under one caller tag, "jwt" (subjects are unbounded, key names are not)
    assert metric_sum(gateway.prometheus(), "llm_gateway_tokens_total", caller="jwt") - jwt_tokens_before == used

    # The subject's budget is spent, whichever token it comes with; GET /v1/models reserves no tokens, so it
    # checks the token budget without spending it. Another subject has its own budget.
    other_token_same_subject = jwt_hs256(**valid_claims("jwt-alice", jti="second"))
    r = httpx.get(f"{gateway.url}/v1/models", headers=bearer(other_token_same_subject), timeout=30)
    error = assert_openai_error(r, 429)
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"
    assert int(r.headers["Retry-After"]) >= 1
    r = httpx.get(f"{gateway.url}/v1/models", headers=bearer(jwt_hs256(**valid_claims("jwt-bob"))), timeout=30)
    assert r.status_code == 200, r.text


def test_jwt_models_claim_limits_the_models(gateway):
    token = jwt_hs256(**valid_claims("jwt-carol", models=["some-other-model"]))
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(), headers=bearer(token), timeout=30)
    assert assert_openai_error(r, 403)["code"] == "model_not_allowed"


def test_expired_or_forged_jwt_gets_401_in_openai_shape(gateway):
    now = int(time.time())
    valid = jwt_hs256(**valid_claims("jwt-dave"))
    header, payload, signature = valid.split(".")
    altered = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    altered["sub"] = "ops"
    bad = {
        # an hour past exp: well beyond the 60 s clock skew
        "expired": jwt_hs256(sub="jwt-dave", iat=now - 7200, exp=now - 3600),
        "signed with another secret": jwt_hs256("another-secret-that-is-32-bytes-long!!", **valid_claims("jwt-dave")),
        "claims altered after signing": f"{header}.{_b64url(json.dumps(altered).encode())}.{signature}",
        "no exp": jwt_hs256(sub="jwt-dave", iat=now),
    }
    for case, token in bad.items():
        r = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(), headers=bearer(token), timeout=30)
        error = assert_openai_error(r, 401)
        assert error["code"] == "invalid_api_key", (case, error)
        assert r.headers.get("WWW-Authenticate", "").startswith("Bearer"), (case, r.headers)
    # the valid token of the same subject is served: the refusals above are about the tokens
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(max_tokens=2), headers=bearer(valid), timeout=120)
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------- 2. every attempt refused
def test_every_pod_refusing_gives_the_last_pods_429_and_retry_after(gateway, pods):
    # Fill both pods: one long stream each, sent to the pod directly (ignore_eos: it runs until we close it).
    with contextlib.ExitStack() as held:
        for pod in pods:
            client = held.enter_context(httpx.Client(timeout=httpx.Timeout(120, connect=5)))
            response = held.enter_context(client.stream(
                "POST", f"{pod.base_url}/v1/chat/completions", headers=bearer(INTERNAL_KEY),
                json=chat(max_tokens=4000, stream=True, ignore_eos=True)))
            assert response.status_code == 200
        for pod in pods:
            wait_for(lambda: pod.metric("model_service_num_requests_running") == 1, 30, interval=0.1,
                     message=f"pod {pod.http_port} full")
        refused_before = [pod.metric("model_service_requests_rejected_total", reason="queue_full")
                          for pod in pods]

        r = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(), headers=bearer(KEYS["ops"][0]),
                       timeout=60)

        refused = [pod.metric("model_service_requests_rejected_total", reason="queue_full") - before
                   for pod, before in zip(pods, refused_before)]
        # both pods were still full (their streams were running), so every attempt met a full pod
        assert all(pod.metric("model_service_num_requests_running") == 1 for pod in pods)
    # leaving the block closed the streams: the pods cancel the requests of a client that left

    # the pod's own answer, passed through: its status, error object and Retry-After (a pod sends 1)
    error = assert_openai_error(r, 429)
    assert (error["type"], error["code"]) == ("rate_limit_error", "server_overloaded"), error
    assert "at capacity" in error["message"], error
    assert r.headers.get("Retry-After") == "1", r.headers
    # tried 1 + retries times, on both pods (a retry prefers a pod this request has not tried)
    assert sum(refused) == 1 + RETRIES and all(n >= 1 for n in refused), refused

    for pod in pods:
        wait_for(lambda: pod.metric("model_service_num_requests_running") == 0, 30,
                 message=f"pod {pod.http_port} free again")
