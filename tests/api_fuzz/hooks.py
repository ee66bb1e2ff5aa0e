"""Schemathesis checks of the Understudy admin API, loaded by tests/api_fuzz.rs through
SCHEMATHESIS_HOOKS (see tests/api_fuzz/schemathesis.toml for the built-in checks)."""

import json
import os

import schemathesis

# Operations of a keyed balancer that only the controller, signing with the balancer's key, may
# use: anonymous calls must all be refused.
KEYED_BALANCER_GUARDED = (
    "/api/v1/balancers/{service}/config",
    "/api/v1/balancers/{service}/stats",
    "/api/v1/balancers/{service}/config-key",
)


@schemathesis.check
def error_is_json_with_message(ctx, response, case):
    """Every 4xx/5xx answer is a JSON object whose `error` is a non-empty string (CONTRACT.md)."""
    if response.status_code < 400 or case.method.upper() == "HEAD":
        return None
    content_type = ";".join(response.headers.get("content-type", []))
    if not content_type.startswith("application/json"):
        raise AssertionError(
            f"{response.status_code} answered with Content-Type {content_type!r}, not "
            f"application/json: {response.content[:200]!r}"
        )
    try:
        body = json.loads(response.content)
    except ValueError as e:
        raise AssertionError(f"{response.status_code} body is not JSON ({e}): {response.content[:200]!r}")
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, str) or not error:
        raise AssertionError(f"{response.status_code} body has no `error` string: {body!r}")
    return None


@schemathesis.check
def keyed_balancer_refuses_anonymous(ctx, response, case):
    """A keyed balancer fuzzed without its key (UNDERSTUDY_FUZZ_KEYED_BALANCER=1, set by
    tests/api_fuzz.rs) never answers 2xx to a config or stats read, a config push or a key
    rotation: nothing unsigned gets through."""
    if os.environ.get("UNDERSTUDY_FUZZ_KEYED_BALANCER") != "1":
        return None
    if case.operation.path in KEYED_BALANCER_GUARDED and 200 <= response.status_code < 300:
        raise AssertionError(
            f"{case.method} {case.formatted_path} answered {response.status_code} without the "
            f"balancer's key: {response.content[:200]!r}"
        )
    return None
