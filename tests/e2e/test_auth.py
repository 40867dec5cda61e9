"""Authentication (JWT bearer tokens), role checks, and `orderd token`."""

import json
import subprocess
import time
import uuid

import grpc
import pytest

import orderd_e2e as e2e
from orderd_e2e import pb, expect_error

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


def _claims(secret, **over):
    now = int(time.time())
    c = {"sub": "e2e-auth", "roles": ["admin"], "iat": now, "exp": now + 600,
         "iss": e2e.ISSUER, "aud": e2e.AUDIENCE}
    for k, v in over.items():
        if v is None:
            c.pop(k)
        else:
            c[k] = v
    return c


def _hs256(secret, **over):
    return e2e.jwt_encode({"alg": "HS256", "typ": "JWT"}, _claims(secret, **over), secret)


def _tampered(secret):
    """A customer token whose claims were edited to admin, signature kept."""
    good = _hs256(secret, roles=["customer"])
    h, _, s = good.split(".")
    forged = e2e.b64url(__import__("json").dumps(_claims(secret)).encode())
    return "%s.%s.%s" % (h, forged, s)


# name -> authorization header value (None = no header), from the server's secret
BAD_AUTH = {
    "no-header": lambda s: None,
    "empty-bearer": lambda s: "Bearer ",
    "garbage": lambda s: "Bearer garbage",
    "two-parts": lambda s: "Bearer abc.def",
    "not-bearer-scheme": lambda s: "Basic dXNlcjpwYXNz",
    "token-without-scheme": lambda s: _hs256(s),
    "expired": lambda s: "Bearer " + _hs256(s, iat=int(time.time()) - 7200,
                                             exp=int(time.time()) - 3600),
    "no-exp": lambda s: "Bearer " + _hs256(s, exp=None),
    "wrong-secret": lambda s: "Bearer " + _hs256("not-the-secret-" + s),
    "tampered-claims": lambda s: "Bearer " + _tampered(s),
    "alg-none": lambda s: "Bearer " + e2e.jwt_encode({"alg": "none", "typ": "JWT"},
                                                     _claims(s), None),
    "alg-none-signed": lambda s: "Bearer " + e2e.jwt_encode({"alg": "none", "typ": "JWT"},
                                                            _claims(s), s),
    "alg-HS512": lambda s: "Bearer " + e2e.jwt_encode({"alg": "HS512", "typ": "JWT"},
                                                      _claims(s), s, "sha512"),
    "alg-RS256-hmac-signed": lambda s: "Bearer " + e2e.jwt_encode(
        {"alg": "RS256", "typ": "JWT"}, _claims(s), s),
    "wrong-iss": lambda s: "Bearer " + _hs256(s, iss="someone-else"),
    "no-iss": lambda s: "Bearer " + _hs256(s, iss=None),
    "wrong-aud": lambda s: "Bearer " + _hs256(s, aud="billing"),
    "no-aud": lambda s: "Bearer " + _hs256(s, aud=None),
    "no-roles": lambda s: "Bearer " + _hs256(s, roles=None),
    "empty-roles": lambda s: "Bearer " + _hs256(s, roles=[]),
    "no-sub": lambda s: "Bearer " + _hs256(s, sub=None),
}


@pytest.mark.parametrize("name", sorted(BAD_AUTH))
def test_bad_credentials_are_unauthenticated(orderd, name):
    value = BAD_AUTH[name](orderd.secret)
    md = [] if value is None else [("authorization", value)]
    req = pb.GetProductRequest(product_id=orderd.pid("widget"))
    expect_error(lambda: orderd.api.call("GetProduct", req, None, metadata=md), UNAUTH)


def test_the_reference_token_is_accepted(orderd):
    # The positive control for the table above: same claims, properly signed.
    req = pb.GetProductRequest(product_id=orderd.pid("widget"))
    md = [("authorization", "Bearer " + _hs256(orderd.secret))]
    assert orderd.api.call("GetProduct", req, None, metadata=md).product_id == req.product_id


def test_authentication_comes_before_validation(orderd):
    # An empty (invalid) request without a token: the caller learns nothing but 401.
    expect_error(lambda: orderd.api.call("PlaceOrder", pb.PlaceOrderRequest(), None), UNAUTH)
    expect_error(lambda: orderd.api.call("GetOrder", pb.GetOrderRequest(order_id="x"), None),
                 UNAUTH)


# ---------------------------------------------------------------------------------------
# roles

ALLOWED = {
    "PlaceOrder": {"customer", "service", "admin"},
    "GetOrder": {"customer", "service", "admin"},
    "ListOrders": {"customer", "service", "admin"},
    "CancelOrder": {"customer", "service", "admin"},
    "ConfirmPayment": {"customer", "service", "admin"},
    "UpdateOrderStatus": {"service", "admin"},
    "UpsertProduct": {"admin"},
    "GetProduct": {"customer", "service", "admin"},
}


def _probe_request(orderd, method):
    """A request each method answers without an auth error when the role may call it."""
    missing = str(uuid.uuid4())
    return {
        "PlaceOrder": orderd.place_request([(orderd.pid("widget"), 1)],
                                           customer_id="e2e-role-probe"),
        "GetOrder": pb.GetOrderRequest(order_id=missing),
        "ListOrders": pb.ListOrdersRequest(page_size=1),
        "CancelOrder": pb.CancelOrderRequest(order_id=missing, reason="probe"),
        "ConfirmPayment": pb.ConfirmPaymentRequest(
            order_id=missing, provider=pb.PAYMENT_PROVIDER_LOCAL, payment_reference="x"),
        "UpdateOrderStatus": pb.UpdateOrderStatusRequest(
            order_id=missing, status=pb.ORDER_STATUS_SHIPPED),
        "UpsertProduct": pb.UpsertProductRequest(product=pb.Product(
            product_id=e2e.unique("e2e-role"), name="Role probe", unit_price_minor=1,
            currency="EUR", active=True)),
        "GetProduct": pb.GetProductRequest(product_id=orderd.pid("widget")),
    }[method]


@pytest.mark.parametrize("role", ["customer", "service", "admin"])
@pytest.mark.parametrize("method", sorted(ALLOWED))
def test_role_matrix(orderd, method, role):
    caller = orderd.caller(e2e.unique("e2e-" + role), [role])
    req = _probe_request(orderd, method)
    if role == "customer" and method == "PlaceOrder":
        req.customer_id = ""
    try:
        orderd.call(method, req, caller)
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
    if role in ALLOWED[method]:
        assert code not in (DENIED, UNAUTH, grpc.StatusCode.INTERNAL,
                            grpc.StatusCode.UNIMPLEMENTED), (method, role, code)
    else:
        assert code == DENIED, (method, role, code)


def test_customer_cannot_change_order_status(orderd, customer):
    o = orderd.place(customer, [(orderd.pid("widget"), 1)])
    paid = orderd.call("ConfirmPayment", pb.ConfirmPaymentRequest(
        order_id=o.order.order_id, provider=pb.PAYMENT_PROVIDER_LOCAL,
        payment_reference=o.payment.reference), customer)
    expect_error(lambda: orderd.call("UpdateOrderStatus", pb.UpdateOrderStatusRequest(
        order_id=paid.order_id, status=pb.ORDER_STATUS_SHIPPED), customer), DENIED)
    assert orderd.get(customer, paid.order_id) == paid


@pytest.mark.parametrize("role", ["customer", "service"])
def test_only_admin_changes_the_catalogue(orderd, role):
    caller = orderd.caller(e2e.unique("e2e-" + role), [role])
    pid = e2e.unique("e2e-denied")
    req = pb.UpsertProductRequest(product=pb.Product(
        product_id=pid, name="Sneaky", unit_price_minor=1, currency="EUR", active=True))
    expect_error(lambda: orderd.call("UpsertProduct", req, caller), DENIED)
    # and an existing product is not changed either
    req.product.product_id = orderd.pid("widget")
    expect_error(lambda: orderd.call("UpsertProduct", req, caller), DENIED)
    assert orderd.call("GetProduct", pb.GetProductRequest(product_id=orderd.pid("widget")),
                       orderd.admin) == orderd.products["widget"]
    expect_error(lambda: orderd.call("GetProduct", pb.GetProductRequest(product_id=pid),
                                     orderd.admin), grpc.StatusCode.NOT_FOUND)


# ---------------------------------------------------------------------------------------
# `orderd token`


def _cli_token(orderd, *args):
    r = e2e.run_cli(["token"] + list(args), orderd.env, timeout=60)
    assert r.returncode == 0, "orderd token %s -> %d\n%s%s" % (args, r.returncode, r.stdout,
                                                               r.stderr)
    token = r.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token, \
        "stdout must be just the token, got %r" % r.stdout
    return token


@pytest.mark.parametrize("ttl,seconds", [("1h", 3600), ("15m", 900), ("30s", 30),
                                         (None, 900)])
def test_orderd_token_mints_what_the_server_accepts(orderd, ttl, seconds):
    sub = e2e.unique("e2e-cli-admin")
    args = ["--subject", sub, "--role", "admin"] + (["--ttl", ttl] if ttl else [])
    token = _cli_token(orderd, *args)
    header = __import__("json").loads(e2e.b64url_decode(token.split(".")[0]))
    claims = e2e.jwt_claims(token)
    assert header["alg"] == "HS256"
    assert claims["sub"] == sub
    assert claims["roles"] == ["admin"]
    assert claims["exp"] - claims["iat"] == seconds
    assert abs(claims["iat"] - time.time()) < 120
    assert claims["iss"] == e2e.ISSUER
    assert claims["aud"] in (e2e.AUDIENCE, [e2e.AUDIENCE])
    pid = e2e.unique("e2e-cli")
    p = orderd.api.call("UpsertProduct", pb.UpsertProductRequest(product=pb.Product(
        product_id=pid, name="Minted", unit_price_minor=5, currency="EUR", active=True)), token)
    assert p.product_id == pid


def test_orderd_token_customer_role(orderd):
    sub = e2e.unique("e2e-cli-cust")
    token = _cli_token(orderd, "--subject", sub, "--role", "customer", "--ttl", "1h")
    o = orderd.api.call("PlaceOrder", orderd.place_request([(orderd.pid("widget"), 1)]), token)
    assert o.order.customer_id == sub
    expect_error(lambda: orderd.api.call("UpsertProduct", pb.UpsertProductRequest(
        product=orderd.products["widget"]), token), DENIED)


def test_orderd_token_refuses_an_unknown_role(orderd):
    r = e2e.run_cli(["token", "--subject", "x", "--role", "superuser"], orderd.env)
    assert r.returncode != 0, "minted a token for an unknown role: %r" % r.stdout
    assert r.stdout.strip() == ""


# ---------------------------------------------------------------------------------------
# RS256, on an instance of its own configured with a public key file


def _openssl(*args, data=None):
    r = subprocess.run(["openssl"] + list(args), input=data, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout


def _rs256(key_path, claims, alg="RS256"):
    h = e2e.b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    c = e2e.b64url(json.dumps(claims).encode())
    sig = _openssl("dgst", "-sha256", "-sign", key_path, data=(h + "." + c).encode())
    return "%s.%s.%s" % (h, c, e2e.b64url(sig))


@pytest.fixture(scope="module")
def rs256_server(orderd, tmp_path_factory):
    d = tmp_path_factory.mktemp("rs256")
    key, other = str(d / "key.pem"), str(d / "other.pem")
    for k in (key, other):
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", k)
    pub = str(d / "pub.pem")
    _openssl("pkey", "-in", key, "-pubout", "-out", pub)
    env = dict(orderd.env)
    env["ORDERD_AUTH_RS256_PUBLIC_KEY_FILE"] = pub
    srv = e2e.Orderd(env, orderd.logdir, "orderd-rs256").start()
    try:
        srv.wait_health(e2e.health_pb2.HealthCheckResponse.SERVING, timeout=20)
    except BaseException:
        srv.kill()
        raise
    yield srv, key, other, pub
    rc = srv.stop(timeout=15)
    assert rc == 0, "rs256 instance: exit %s after SIGTERM\n%s" % (rc, srv.log_tail())


def test_rs256_tokens_from_the_configured_key_are_accepted(orderd, rs256_server):
    srv, key, other, pub = rs256_server
    api = e2e.Api(srv.channel)
    req = pb.GetProductRequest(product_id=orderd.pid("widget"))
    good = _rs256(key, _claims(orderd.secret, roles=["customer"]))
    assert api.call("GetProduct", req, good).product_id == req.product_id
    # HS256 with the secret keeps working next to it.
    assert api.call("GetProduct", req, _hs256(orderd.secret)).product_id == req.product_id
    # Another key, edited claims, an expired token, or the public key used as an HMAC
    # secret (the classic RS256 -> HS256 confusion) are all refused.
    bad = {
        "other-key": _rs256(other, _claims(orderd.secret)),
        "expired": _rs256(key, _claims(orderd.secret, exp=int(time.time()) - 3600)),
        "edited": good.split(".")[0] + "." + e2e.b64url(json.dumps(
            _claims(orderd.secret, roles=["admin"])).encode()) + "." + good.split(".")[2],
        "hs256-with-public-key": e2e.jwt_encode({"alg": "HS256", "typ": "JWT"},
                                                _claims(orderd.secret),
                                                open(pub, "rb").read()),
    }
    for name, token in bad.items():
        err = expect_error(lambda: api.call("GetProduct", req, token), UNAUTH)
        assert err is not None, name


def test_rs256_is_refused_where_no_key_is_configured(orderd, rs256_server):
    _, key, _, _ = rs256_server
    req = pb.GetProductRequest(product_id=orderd.pid("widget"))
    token = _rs256(key, _claims(orderd.secret))
    expect_error(lambda: orderd.api.call("GetProduct", req, token), UNAUTH)
