"""WWW-Authenticate challenge and token response parsing."""

from __future__ import annotations

import pytest

from snapshotter.fetcher.auth import Challenge, parse_challenges, parse_token_response


def test_bearer_with_quoted_params_sorted_first() -> None:
    found = parse_challenges(
        [
            'Basic realm="x"',
            'Bearer realm="https://auth.example/token",'
            'service="reg, the \\"best\\"",scope=repository:a/b:pull',
            "Negotiate abc",
        ]
    )
    assert found == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.example/token",
                "service": 'reg, the "best"',
                "scope": "repository:a/b:pull",
            },
        ),
        Challenge("basic", {"realm": "x"}),
    ]


def test_token_response() -> None:
    tok = parse_token_response(b'{"token": "t", "expires_in": 100}', now=1000.0)
    assert tok.value == "t" and tok.expires_at == 1090.0
    tok = parse_token_response(b'{"access_token": "secret-token"}', now=0.0)
    assert tok.value == "secret-token" and tok.expires_at == 54.0  # default lifetime 60s, renewed early
    assert "secret-token" not in repr(tok)
    for bad in (b"[]", b"nope", b'{"token": ""}'):
        with pytest.raises(ValueError):
            parse_token_response(bad, now=0.0)
