"""
auth.py as pure units: token extraction, JWT verification with pinned
algorithms, key sets, API keys, roles and forwarded claims.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from wsgateway.auth.credentials import check_roles, claim_headers, extract_token, roles_of
from wsgateway.auth.identity import AuthFailed, Identity, UnknownKey
from wsgateway.auth.keys import KeySet, parse_api_keys
from wsgateway.auth.verifier import Authenticator, TokenVerifier, api_key_identity
from wsgateway.config.auth import AuthConfig

SECRET = "s" * 32
HS = AuthConfig(algorithms=("HS256",), secret=SECRET)


def mint(claims: dict[str, Any] | None = None, key: Any = SECRET, alg: str = "HS256", **headers: Any) -> str:
    body = {"sub": "alice", "exp": int(time.time()) + 300}
    body.update(claims or {})
    return jwt.encode(body, key, algorithm=alg, headers=headers or None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def jwk_of(key: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    algo = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
    jwk = json.loads(algo.to_jwk(key.public_key()))
    jwk["kid"] = kid
    if alg:
        jwk["alg"] = alg
    return jwk


def refused(verifier: TokenVerifier, token: str) -> AuthFailed:
    with pytest.raises(AuthFailed) as info:
        verifier.verify(token)
    assert info.value.status == 401
    return info.value


# -- extraction -------------------------------------------------------------


def test_bearer_header_wins_and_bearer_subprotocols_never_go_upstream() -> None:
    token, source, rest = extract_token(
        {"authorization": "Bearer abc.def.ghi"}, "access_token=q", ["bearer.xyz", "chat"], HS
    )
    assert (token, source, rest) == ("abc.def.ghi", "header", ("chat",))


def test_subprotocol_then_query() -> None:
    assert extract_token({}, "access_token=q", ["chat", "bearer.t1"], HS) == ("t1", "subprotocol", ("chat",))
    assert extract_token({}, "a=1&access_token=q2", ["chat"], HS) == ("q2", "query", ("chat",))


def test_other_schemes_and_empty_values_are_no_token() -> None:
    assert extract_token({"authorization": "Basic dTpw"}, "", [], HS) == (None, None, ())
    assert extract_token({"authorization": "Bearer   "}, "access_token=", ["bearer."], HS) == (None, None, ())


def test_query_and_subprotocol_can_be_switched_off() -> None:
    cfg = AuthConfig(algorithms=("HS256",), secret=SECRET, query_param="", subprotocol_prefix="")
    assert extract_token({}, "access_token=q", ["bearer.t"], cfg) == (None, None, ("bearer.t",))


# -- JWT verification -------------------------------------------------------


def test_valid_hs256_token_gives_identity() -> None:
    exp = int(time.time()) + 100
    ident = TokenVerifier(HS).verify(mint({"exp": exp, "roles": ["admin"], "scope": "read write"}))
    assert ident.subject == "alice"
    assert ident.expires == exp
    assert ident.roles == {"admin", "read", "write"}
    assert ident.kind == "jwt"


@pytest.mark.parametrize(
    ("claims", "why"),
    [
        # seconds from now, taken when the test runs (not when it is collected:
        # a long suite would otherwise reach the "future" nbf first)
        ({"exp": -100}, "token expired"),
        ({"nbf": +100}, "token not yet valid"),
        ({"exp": None}, "required claim missing"),
    ],
)
def test_time_claims(claims: dict[str, Any], why: str) -> None:
    now = int(time.time())
    body = {"sub": "alice", "exp": now + 300,
            **{k: (now + v if v is not None else None) for k, v in claims.items()}}
    body = {k: v for k, v in body.items() if v is not None}
    token = jwt.encode(body, SECRET, algorithm="HS256")
    assert refused(TokenVerifier(AuthConfig(algorithms=("HS256",), secret=SECRET, leeway=0)), token).why == why


def test_leeway_admits_a_just_expired_token() -> None:
    cfg = AuthConfig(algorithms=("HS256",), secret=SECRET, leeway=30)
    assert TokenVerifier(cfg).verify(mint({"exp": int(time.time()) - 10})).subject == "alice"


def test_issuer_and_audience_are_checked_only_when_set() -> None:
    cfg = AuthConfig(algorithms=("HS256",), secret=SECRET, issuer="https://idp", audience="gw")
    v = TokenVerifier(cfg)
    assert v.verify(mint({"iss": "https://idp", "aud": "gw"})).subject == "alice"
    assert refused(v, mint({"iss": "https://evil", "aud": "gw"})).why == "wrong issuer"
    assert refused(v, mint({"iss": "https://idp", "aud": "other"})).why == "wrong audience"
    assert refused(v, mint({"aud": "gw"})).why == "required claim missing"
    # no audience configured: a token that names one is still fine
    assert TokenVerifier(HS).verify(mint({"aud": "anything"})).subject == "alice"


def test_wrong_secret_and_garbage() -> None:
    v = TokenVerifier(HS)
    assert refused(v, mint(key="t" * 32)).why == "bad signature"
    assert refused(v, "not-a-token").why == "malformed token"
    assert refused(v, mint()[:-3]).why in ("bad signature", "malformed token")


def test_alg_none_is_never_accepted() -> None:
    token = b64(b'{"alg":"none","typ":"JWT"}') + "." + b64(json.dumps({"sub": "x", "exp": 2**31}).encode()) + "."
    assert refused(TokenVerifier(HS), token).why == "algorithm not allowed"


def test_algorithms_are_pinned() -> None:
    # an HS512 token against an HS256-only gateway, same secret
    token = mint(key="s" * 64, alg="HS512")
    assert refused(TokenVerifier(AuthConfig(algorithms=("HS256",), secret="s" * 64)), token).why == "algorithm not allowed"


def test_hs256_signed_with_the_rsa_public_key_is_refused() -> None:
    key = rsa_key()
    pem = public_pem(key)
    verifier = TokenVerifier(AuthConfig(algorithms=("RS256",), public_key_file="x"), public_key=key.public_key())
    assert verifier.verify(mint(key=key, alg="RS256")).subject == "alice"
    # PyJWT refuses to sign with a PEM as HMAC key, so the forgery is made by hand
    forged = _hs256_with_raw_key(pem)
    assert refused(verifier, forged).why == "algorithm not allowed"


def _hs256_with_raw_key(key: bytes) -> str:
    import hmac

    head = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps({"sub": "mallory", "exp": 2**31}).encode())
    sig = hmac.new(key, head.encode(), hashlib.sha256).digest()
    return head + "." + b64(sig)


def test_no_algorithms_means_no_jwts() -> None:
    assert refused(TokenVerifier(AuthConfig(algorithms=())), mint()).why == "JWTs are not accepted here"


# -- key sets -----------------------------------------------------------------


def test_keyset_picks_by_kid_and_refuses_unknown_kids() -> None:
    a, b = rsa_key(), rsa_key()
    keys = KeySet({"keys": [jwk_of(a, "a"), jwk_of(b, "b")]})
    v = TokenVerifier(AuthConfig(algorithms=("RS256",), jwks_file="x"), keys=keys)
    assert v.verify(mint(key=a, alg="RS256", kid="a")).subject == "alice"
    assert v.verify(mint(key=b, alg="RS256", kid="b")).subject == "alice"
    assert refused(v, mint(key=a, alg="RS256", kid="b")).why == "bad signature"
    with pytest.raises(UnknownKey):
        v.verify(mint(key=a, alg="RS256", kid="c"))
    with pytest.raises(UnknownKey):
        v.verify(mint(key=a, alg="RS256"))  # two keys: a kid is needed


def test_keyset_binds_alg_to_key_type() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    r = rsa_key()
    keys = KeySet({"keys": [jwk_of(ec_key, "e"), jwk_of(r, "r", alg="RS256"),
                            {"kty": "oct", "kid": "o", "k": b64(b"s" * 32)}]})
    v = TokenVerifier(AuthConfig(algorithms=("RS256", "RS384", "ES256"), jwks_file="x"), keys=keys)
    assert v.verify(mint(key=ec_key, alg="ES256", kid="e")).subject == "alice"
    # an RSA token naming the EC key
    assert refused(v, mint(key=r, alg="RS256", kid="e")).why == "algorithm does not fit the key"
    # the JWK says RS256; an RS384 token may not use it
    assert refused(v, mint(key=r, alg="RS384", kid="r")).why == "algorithm does not fit the key"
    # symmetric keys in a key set are ignored altogether
    with pytest.raises(UnknownKey):
        v.verify(mint(key=r, alg="RS256", kid="o"))


def test_single_key_set_needs_no_kid() -> None:
    a = rsa_key()
    v = TokenVerifier(AuthConfig(algorithms=("RS256",), jwks_file="x"), keys=KeySet({"keys": [jwk_of(a, "a")]}))
    assert v.verify(mint(key=a, alg="RS256")).subject == "alice"


# -- the authenticator ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_kid_triggers_one_refresh() -> None:
    a, b = rsa_key(), rsa_key()
    cfg = AuthConfig(algorithms=("RS256",), jwks_url="https://idp/jwks")
    verifier = TokenVerifier(cfg)
    calls: list[int] = []

    async def refresh() -> bool:
        calls.append(1)
        verifier.keys = KeySet({"keys": [jwk_of(a, "a"), jwk_of(b, "b")]})
        return True

    auth = Authenticator(cfg, verifier, refresh_keys=refresh)
    creds = auth.credentials({"authorization": "Bearer " + mint(key=b, alg="RS256", kid="b")}, "", [])
    ident = await auth.identify(creds, "required")
    assert ident is not None and ident.subject == "alice" and calls == [1]
    # still unknown after the refresh: 401
    creds = auth.credentials({"authorization": "Bearer " + mint(key=b, alg="RS256", kid="zz")}, "", [])
    with pytest.raises(AuthFailed) as info:
        await auth.identify(creds, "required")
    assert (info.value.status, info.value.why, len(calls)) == (401, "unknown key id", 2)


@pytest_twisted.ensureDeferred
async def test_refresh_refused_by_rate_limit_gives_401() -> None:
    cfg = AuthConfig(algorithms=("RS256",), jwks_url="https://idp/jwks")

    async def refresh() -> bool:
        return False

    auth = Authenticator(cfg, TokenVerifier(cfg), refresh_keys=refresh)
    creds = auth.credentials({"authorization": "Bearer " + mint(key=rsa_key(), alg="RS256", kid="a")}, "", [])
    with pytest.raises(AuthFailed) as info:
        await auth.identify(creds, "required")
    assert info.value.why == "unknown key id"


@pytest_twisted.ensureDeferred
async def test_modes() -> None:
    auth = Authenticator(HS, TokenVerifier(HS))
    none = auth.credentials({}, "", [])
    assert await auth.identify(none, "none") is None
    assert await auth.identify(none, "optional") is None
    with pytest.raises(AuthFailed):
        await auth.identify(none, "required")
    # a bad token is refused even where a token is optional
    bad = auth.credentials({"authorization": "Bearer x.y.z"}, "", [])
    with pytest.raises(AuthFailed):
        await auth.identify(bad, "optional")


# -- API keys -------------------------------------------------------------------


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_api_keys_file_and_lookup() -> None:
    keys = parse_api_keys(f"# service keys\n{sha('k1')} billing admin ops\n\n{sha('k2').upper()} reports  # ro\n")
    ident = api_key_identity(keys, "k1")
    assert (ident.subject, ident.roles, ident.kind, ident.expires) == ("billing", {"admin", "ops"}, "api_key", None)
    assert ident.claims == {"sub": "billing", "roles": ["admin", "ops"]}
    assert api_key_identity(keys, "k2").roles == frozenset()
    with pytest.raises(AuthFailed) as info:
        api_key_identity(keys, sha("k1"))  # the hash itself is not a key
    assert info.value.status == 401


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("k1 billing\n", "line 1: the first field must be the key's SHA-256"),
        (f"{sha('a')}\n", "line 1: an identity must follow"),
        (f"{sha('a')} x\n{sha('a')} y\n", "line 2: this hash appears twice"),
    ],
)
def test_api_keys_file_errors_never_quote_the_line(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_api_keys(text)
    assert str(info.value).startswith(message)
    assert "k1" not in str(info.value) and sha("a") not in str(info.value)


@pytest_twisted.ensureDeferred
async def test_api_key_header_goes_before_tokens() -> None:
    cfg = AuthConfig(algorithms=("HS256",), secret=SECRET, api_key_header="X-API-Key")
    auth = Authenticator(cfg, TokenVerifier(cfg), parse_api_keys(f"{sha('k1')} svc writer\n"))
    assert auth.credential_headers == {"x-api-key"}
    ident = await auth.identify(auth.credentials({"x-api-key": "k1", "authorization": "Bearer junk"}, "", []), "required")
    assert ident is not None and ident.subject == "svc"
    with pytest.raises(AuthFailed):
        await auth.identify(auth.credentials({"x-api-key": "nope"}, "", []), "optional")
    # never from the query string
    assert auth.credentials({}, "x-api-key=k1&X-API-Key=k1", []).api_key is None


# -- roles and claims -------------------------------------------------------------


def ident(claims: dict[str, Any]) -> Identity:
    return Identity(claims.get("sub"), claims, roles_of(claims), None, "jwt")


def test_roles() -> None:
    assert roles_of({"roles": "a b", "scope": "c"}) == {"a", "b", "c"}
    assert roles_of({"roles": ["a", 3], "scope": ["d"]}) == {"a", "d"}
    check_roles(ident({"roles": ["a"]}), [])
    check_roles(ident({"scope": "x y"}), ["y", "z"])
    with pytest.raises(AuthFailed) as info:
        check_roles(ident({"roles": ["a"]}), ["admin"])
    assert info.value.status == 403
    with pytest.raises(AuthFailed) as info:
        check_roles(None, ["admin"])
    assert info.value.status == 401


def test_claim_headers() -> None:
    headers = claim_headers(
        ident({"sub": "u1", "roles": ["a", "b"], "n": 3, "ok": True, "obj": {"b": 1, "a": [2]}}),
        (("sub", "X-User-Id"), ("roles", "X-User-Roles"), ("n", "X-N"), ("ok", "X-Ok"), ("obj", "X-Obj"),
         ("missing", "X-Missing")),
    )
    assert headers == {"X-User-Id": "u1", "X-User-Roles": "a,b", "X-N": "3", "X-Ok": "true",
                       "X-Obj": '{"a":[2],"b":1}'}
    assert claim_headers(None, (("sub", "X-User-Id"),)) == {}


def test_keyset_rejects_a_non_jwks_document() -> None:
    with pytest.raises(ValueError):
        KeySet({"nokeys": []})


def test_claim_headers_encode_beyond_printable_ascii() -> None:
    headers = claim_headers(ident({"sub": "Åsa 100%", "name": "a\r\nX-Evil: 1"}),
                            (("sub", "X-User-Id"), ("name", "X-Name")))
    assert headers == {"X-User-Id": "%C3%85sa 100%25", "X-Name": "a%0D%0AX-Evil: 1"}
