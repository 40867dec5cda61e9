"""Tests of the fake payment providers themselves, over real HTTP (urllib).

Run: /usr/bin/python3 -m pytest tests/fakes -q
"""

import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import fake_paypal  # noqa: E402
import fake_stripe  # noqa: E402

KEY = "sk_test_fake"


# ---- HTTP helpers ---------------------------------------------------------------
class Resp:
    def __init__(self, status, headers, raw):
        self.status, self.headers, self.raw = status, headers, raw
        try:
            self.json = json.loads(raw) if raw else None
        except ValueError:
            self.json = None

    def header(self, name):
        return self.headers.get(name)


def call(method, url, data=None, headers=None, timeout=10):
    body = data.encode() if isinstance(data, str) else data
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Resp(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Resp(e.code, e.headers, e.read())


def ctl(base, path, obj=None, method=None):
    data = json.dumps(obj).encode() if obj is not None else None
    r = call(method or ("POST" if obj is not None else "GET"), base + path, data,
             {"Content-Type": "application/json"})
    assert r.status == 200, (path, r.status, r.raw)
    return r.json


# ---- Stripe -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stripe_server():
    srv = fake_stripe.FakeStripe(key=KEY)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def st(stripe_server):
    ctl(stripe_server.base_url, "/_fake/reset", {})
    return stripe_server.base_url


def sreq(base, method, path, params=None, key=KEY, idem=None, version="2024-06-20", timeout=10):
    headers = {"Stripe-Version": version}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if idem:
        headers["Idempotency-Key"] = idem
    data = None
    if method == "POST":
        data = urllib.parse.urlencode(params or [], doseq=True)
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif params:
        path += "?" + urllib.parse.urlencode(params, doseq=True)
    return call(method, base + path, data, headers, timeout)


PI = [("amount", "2500"), ("currency", "usd"), ("metadata[order_id]", "ord-1"),
      ("automatic_payment_methods[enabled]", "true"), ("description", "order ord-1")]


def test_stripe_auth_and_version_recorded(st):
    r = sreq(st, "GET", "/v1/payment_intents/pi_x", key=None)
    assert r.status == 401 and r.json["error"]["type"] == "invalid_request_error"
    r = sreq(st, "GET", "/v1/payment_intents/pi_x", key="sk_test_wrong_key_1234")
    assert r.status == 401
    assert r.json["error"]["message"].startswith("Invalid API Key provided: ")
    assert "sk_test_wrong_key_1234" not in r.json["error"]["message"]  # masked like Stripe
    reqs = ctl(st, "/_fake/requests")
    assert [x["headers"]["stripe-version"] for x in reqs] == ["2024-06-20", "2024-06-20"]
    assert [x["status"] for x in reqs] == [401, 401]


def test_stripe_create_payment_intent(st):
    r = sreq(st, "POST", "/v1/payment_intents", PI)
    assert r.status == 200, r.raw
    pi = r.json
    assert re.fullmatch(r"pi_[A-Za-z0-9]{24}", pi["id"])
    assert re.fullmatch(re.escape(pi["id"]) + r"_secret_[A-Za-z0-9]+", pi["client_secret"])
    assert pi["object"] == "payment_intent" and pi["status"] == "requires_payment_method"
    assert (pi["amount"], pi["amount_received"], pi["currency"]) == (2500, 0, "usd")
    assert pi["metadata"] == {"order_id": "ord-1"} and pi["latest_charge"] is None
    assert pi["livemode"] is False and pi["last_payment_error"] is None and isinstance(pi["created"], int)
    assert r.header("Request-Id").startswith("req_")
    rec = ctl(st, "/_fake/requests")[-1]
    assert rec["form"]["metadata"] == {"order_id": "ord-1"}
    assert rec["form"]["automatic_payment_methods"] == {"enabled": "true"}
    got = sreq(st, "GET", f"/v1/payment_intents/{pi['id']}")
    assert got.status == 200 and got.json == pi


@pytest.mark.parametrize("params,param", [
    ([("amount", "abc"), ("currency", "usd")], "amount"),
    ([("amount", "0"), ("currency", "usd")], "amount"),
    ([("amount", "123456789"), ("currency", "usd")], "amount"),
    ([("amount", "10"), ("currency", "usd")], "amount"),   # below Stripe's USD minimum
    ([("amount", "1000"), ("currency", "us")], "currency"),
    ([("currency", "usd")], "amount"),
    ([("amount", "1000"), ("currency", "usd"), ("bogus", "1")], "bogus"),
])
def test_stripe_create_validation(st, params, param):
    r = sreq(st, "POST", "/v1/payment_intents", params)
    assert r.status == 400
    assert r.json["error"]["type"] == "invalid_request_error" and r.json["error"]["param"] == param


def test_stripe_idempotent_replay(st):
    a = sreq(st, "POST", "/v1/payment_intents", PI, idem="key-1")
    b = sreq(st, "POST", "/v1/payment_intents", PI, idem="key-1")
    assert a.status == b.status == 200
    assert a.json == b.json
    assert a.header("Idempotent-Replayed") is None and b.header("Idempotent-Replayed") == "true"
    pis = [x for x in ctl(st, "/_fake/requests")]
    assert len(pis) == 2
    # other parameters with the same key
    c = sreq(st, "POST", "/v1/payment_intents", PI[:1] + [("currency", "eur")] + PI[2:], idem="key-1")
    assert c.status == 400 and c.json["error"]["type"] == "idempotency_error"
    assert "same parameters" in c.json["error"]["message"]
    # same key on another endpoint
    d = sreq(st, "POST", f"/v1/payment_intents/{a.json['id']}/cancel", [], idem="key-1")
    assert d.status == 400 and d.json["error"]["type"] == "idempotency_error"
    assert sreq(st, "GET", f"/v1/payment_intents/{a.json['id']}").json["status"] == "requires_payment_method"


def test_stripe_validation_errors_are_not_stored(st):
    bad = sreq(st, "POST", "/v1/payment_intents", [("amount", "x"), ("currency", "usd")], idem="key-v")
    assert bad.status == 400
    good = sreq(st, "POST", "/v1/payment_intents", PI, idem="key-v")
    assert good.status == 200 and good.header("Idempotent-Replayed") is None


def test_stripe_concurrent_same_key_is_409(st):
    ctl(st, "/_fake/fail", {"mode": "slow", "seconds": 1.0, "path": "/v1/payment_intents", "count": 1})
    first = {}
    t = threading.Thread(target=lambda: first.update(r=sreq(st, "POST", "/v1/payment_intents", PI, idem="key-c")))
    t.start()
    time.sleep(0.3)
    second = sreq(st, "POST", "/v1/payment_intents", PI, idem="key-c")
    t.join()
    assert second.status == 409 and second.json["error"]["type"] == "idempotency_error"
    assert first["r"].status == 200
    third = sreq(st, "POST", "/v1/payment_intents", PI, idem="key-c")
    assert third.header("Idempotent-Replayed") == "true" and third.json["id"] == first["r"].json["id"]


def test_stripe_decline_402_and_replay(st):
    params = PI + [("payment_method", "pm_card_chargeDeclinedInsufficientFunds"), ("confirm", "true"),
                   ("off_session", "true")]
    r = sreq(st, "POST", "/v1/payment_intents", params, idem="key-d")
    assert r.status == 402
    e = r.json["error"]
    assert (e["type"], e["code"], e["decline_code"]) == ("card_error", "card_declined", "insufficient_funds")
    assert e["message"] == "Your card has insufficient funds."
    pi = e["payment_intent"]
    assert pi["status"] == "requires_payment_method"
    assert pi["last_payment_error"]["decline_code"] == "insufficient_funds"
    got = sreq(st, "GET", f"/v1/payment_intents/{pi['id']}")
    assert got.status == 200 and got.json["last_payment_error"]["code"] == "card_declined"
    again = sreq(st, "POST", "/v1/payment_intents", params, idem="key-d")
    assert again.status == 402 and again.header("Idempotent-Replayed") == "true"
    assert again.json["error"]["payment_intent"]["id"] == pi["id"]


@pytest.mark.parametrize("pm,status,code,decline", [
    ("pm_card_chargeDeclined", 402, "card_declined", "generic_decline"),
    ("pm_card_authenticationRequired", 402, "authentication_required", "authentication_required"),
])
def test_stripe_test_cards(st, pm, status, code, decline):
    r = sreq(st, "POST", "/v1/payment_intents", PI + [("payment_method", pm), ("confirm", "true"),
                                                      ("off_session", "true")])
    assert r.status == status and r.json["error"]["code"] == code and r.json["error"]["decline_code"] == decline


def test_stripe_success_and_expand(st):
    r = sreq(st, "POST", "/v1/payment_intents", PI + [("payment_method", "pm_card_visa"), ("confirm", "true")])
    assert r.status == 200 and r.json["status"] == "succeeded" and r.json["amount_received"] == 2500
    ch_id = r.json["latest_charge"]
    assert ch_id.startswith("ch_")
    g = sreq(st, "GET", f"/v1/payment_intents/{r.json['id']}", [("expand[]", "latest_charge")])
    ch = g.json["latest_charge"]
    assert ch["id"] == ch_id and ch["object"] == "charge" and ch["paid"] is True and ch["refunded"] is False
    assert ch["metadata"] == {"order_id": "ord-1"} and ch["payment_intent"] == r.json["id"]
    assert ch["receipt_url"].startswith("https://pay.stripe.com/receipts/") and ch["status"] == "succeeded"
    p = sreq(st, "POST", "/v1/payment_intents", PI + [("payment_method", "pm_card_processing"), ("confirm", "true")])
    assert p.json["status"] == "processing"


def test_stripe_unknown_intent_404(st):
    r = sreq(st, "GET", "/v1/payment_intents/pi_doesnotexist")
    assert r.status == 404
    assert r.json["error"]["code"] == "resource_missing" and r.json["error"]["param"] == "intent"
    assert sreq(st, "GET", "/v1/nothing").status == 404


def test_stripe_cancel(st):
    pi = sreq(st, "POST", "/v1/payment_intents", PI).json
    r = sreq(st, "POST", f"/v1/payment_intents/{pi['id']}/cancel", [("cancellation_reason", "abandoned")])
    assert r.status == 200 and r.json["status"] == "canceled" and r.json["cancellation_reason"] == "abandoned"
    again = sreq(st, "POST", f"/v1/payment_intents/{pi['id']}/cancel")
    assert again.status == 400 and again.json["error"]["code"] == "payment_intent_unexpected_state"
    ok = sreq(st, "POST", "/v1/payment_intents", PI + [("payment_method", "pm_card_visa"), ("confirm", "true")]).json
    r = sreq(st, "POST", f"/v1/payment_intents/{ok['id']}/cancel")
    assert r.status == 400 and r.json["error"]["code"] == "payment_intent_unexpected_state"
    assert r.json["error"]["message"].startswith(
        "You cannot cancel this PaymentIntent because it has a status of succeeded.")


def test_stripe_refunds(st):
    pi = sreq(st, "POST", "/v1/payment_intents", PI).json
    r = sreq(st, "POST", "/v1/refunds", [("payment_intent", pi["id"])])
    assert r.status == 400 and "does not have a successful charge" in r.json["error"]["message"]
    ctl(st, "/_fake/pay", {"id": pi["id"]})
    part = sreq(st, "POST", "/v1/refunds", [("payment_intent", pi["id"]), ("amount", "1000"),
                                            ("reason", "requested_by_customer"), ("metadata[order_id]", "ord-1")])
    assert part.status == 200, part.raw
    re_ = part.json
    assert re_["object"] == "refund" and re_["status"] == "succeeded" and re_["amount"] == 1000
    assert re_["payment_intent"] == pi["id"] and re_["charge"].startswith("ch_") and re_["currency"] == "usd"
    too_much = sreq(st, "POST", "/v1/refunds", [("payment_intent", pi["id"]), ("amount", "2000")])
    assert too_much.status == 400 and too_much.json["error"]["param"] == "amount"
    assert "greater than unrefunded amount" in too_much.json["error"]["message"]
    rest = sreq(st, "POST", "/v1/refunds", [("payment_intent", pi["id"])])
    assert rest.status == 200 and rest.json["amount"] == 1500
    ch = sreq(st, "GET", f"/v1/charges/{re_['charge']}").json
    assert ch["amount_refunded"] == 2500 and ch["refunded"] is True
    twice = sreq(st, "POST", "/v1/refunds", [("payment_intent", pi["id"])])
    assert twice.status == 400 and twice.json["error"]["code"] == "charge_already_refunded"

    # Listing: newest first, by payment_intent, limited.
    other = sreq(st, "POST", "/v1/payment_intents", PI).json
    ctl(st, "/_fake/pay", {"id": other["id"]})
    sreq(st, "POST", "/v1/refunds", [("payment_intent", other["id"])])
    lst = sreq(st, "GET", "/v1/refunds?payment_intent=%s&limit=1" % pi["id"])
    assert lst.status == 200 and lst.json["object"] == "list" and lst.json["has_more"] is True
    assert [x["id"] for x in lst.json["data"]] == [rest.json["id"]]
    both = sreq(st, "GET", "/v1/refunds?payment_intent=%s" % pi["id"]).json["data"]
    assert [x["id"] for x in both] == [rest.json["id"], re_["id"]]
    assert sreq(st, "GET", "/v1/refunds?limit=0").status == 400


def test_stripe_failure_injection(st):
    ctl(st, "/_fake/fail", {"mode": "500", "count": 2, "path": "/v1/payment_intents", "method": "POST"})
    for _ in range(2):
        r = sreq(st, "POST", "/v1/payment_intents", PI, idem="key-f")
        assert r.status == 500 and r.json["error"]["type"] == "api_error"
        assert r.header("Stripe-Should-Retry") == "true"
    ok = sreq(st, "POST", "/v1/payment_intents", PI, idem="key-f")
    assert ok.status == 200 and ok.header("Idempotent-Replayed") is None  # failures had no side effect
    objs = [x for x in ctl(st, "/_fake/requests") if x["path"] == "/v1/payment_intents"]
    assert [x["status"] for x in objs] == [500, 500, 200] and objs[0]["injected"] == "500"
    ctl(st, "/_fake/fail", {"mode": "429", "count": 1})
    assert sreq(st, "GET", "/v1/payment_intents/" + ok.json["id"]).status == 429
    ctl(st, "/_fake/fail", {"mode": "409", "count": 1, "method": "GET"})
    r = sreq(st, "GET", "/v1/payment_intents/" + ok.json["id"])
    assert r.status == 409 and r.json["error"]["code"] == "lock_timeout"
    ctl(st, "/_fake/fail", {"mode": "reset", "count": 1})
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        sreq(st, "GET", "/v1/payment_intents/" + ok.json["id"])
    ctl(st, "/_fake/fail", {"mode": "timeout", "count": 1, "seconds": 3})
    with pytest.raises((socket.timeout, TimeoutError, urllib.error.URLError)):
        sreq(st, "GET", "/v1/payment_intents/" + ok.json["id"], timeout=0.5)
    assert sreq(st, "GET", "/v1/payment_intents/" + ok.json["id"]).status == 200


def test_timeout_is_interrupted_by_stop():
    srv = fake_stripe.FakeStripe(key=KEY)
    srv.start()
    ctl(srv.base_url, "/_fake/fail", {"mode": "timeout"})
    out = {}

    def slow():
        try:
            out["r"] = sreq(srv.base_url, "GET", "/v1/payment_intents/pi_x", timeout=20)
        except Exception as e:  # connection dropped by stop()
            out["e"] = e
    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)
    t0 = time.time()
    srv.stop()
    t.join(10)
    assert not t.is_alive() and time.time() - t0 < 5 and "e" in out


def test_stripe_pay_controls(st):
    pi = sreq(st, "POST", "/v1/payment_intents", PI).json
    failed = ctl(st, "/_fake/pay_failed", {"id": pi["id"], "decline_code": "insufficient_funds"})
    assert failed["status"] == "requires_payment_method"
    assert failed["last_payment_error"]["decline_code"] == "insufficient_funds"
    paid = ctl(st, "/_fake/pay", {"id": pi["id"]})
    assert paid["status"] == "succeeded" and paid["amount_received"] == 2500 and paid["latest_charge"]
    assert ctl(st, f"/_fake/objects/{paid['latest_charge']}")["object"] == "charge"


def test_stripe_event_signature(st):
    pi = sreq(st, "POST", "/v1/payment_intents", PI).json
    ctl(st, "/_fake/pay", {"id": pi["id"]})
    secret = "whsec_test_123"
    ev = ctl(st, "/_fake/event", {"type": "payment_intent.succeeded", "id": pi["id"], "secret": secret,
                                  "timestamp": 1700000000})
    body = ev["body"].encode()
    t, v1 = ev["signature"].split(",")
    assert t == "t=1700000000"
    expected = hmac.new(secret.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert v1 == "v1=" + expected
    assert ev["signature"] == fake_stripe.sign(secret, body, 1700000000)
    event = json.loads(body)
    assert re.fullmatch(r"evt_[A-Za-z0-9]{24}", event["id"]) and event["object"] == "event"
    assert event["type"] == "payment_intent.succeeded" and event["livemode"] is False
    assert event["data"]["object"]["status"] == "succeeded" and event["api_version"]
    tampered = ctl(st, "/_fake/event", {"type": "payment_intent.succeeded", "id": pi["id"], "secret": secret,
                                        "timestamp": 1700000000, "tamper": True})
    assert tampered["signature"] != fake_stripe.sign(secret, tampered["body"], 1700000000)
    other = ctl(st, "/_fake/event", {"type": "payment_intent.succeeded", "id": pi["id"], "secret": secret})
    assert json.loads(other["body"])["id"] != event["id"]
    replay = ctl(st, "/_fake/event", {"type": "payment_intent.succeeded", "id": pi["id"], "secret": secret,
                                      "event_id": event["id"]})
    assert json.loads(replay["body"])["id"] == event["id"]
    sreq(st, "POST", "/v1/refunds", [("payment_intent", pi["id"])])
    cr = json.loads(ctl(st, "/_fake/event", {"type": "charge.refunded", "id": pi["id"], "secret": secret})["body"])
    assert cr["data"]["object"]["object"] == "charge" and cr["data"]["object"]["refunded"] is True


# ---- Stripe customers and saved payment methods ------------------------------------
def new_customer(base, *params):
    r = sreq(base, "POST", "/v1/customers", list(params))
    assert r.status == 200, r.raw
    return r.json["id"]


def attach(base, pm, cus):
    r = sreq(base, "POST", f"/v1/payment_methods/{pm}/attach", [("customer", cus)])
    assert r.status == 200, r.raw
    return r.json["id"]


def charge_saved(base, pm, cus=None, idem=None):
    params = PI + [("payment_method", pm), ("confirm", "true"), ("off_session", "true")]
    return sreq(base, "POST", "/v1/payment_intents", params + ([("customer", cus)] if cus else []), idem=idem)


def intents(srv):
    with srv.lock:
        return [o["id"] for o in srv.objects.values() if o["object"] == "payment_intent"]


def test_stripe_create_and_get_customer(st):
    r = sreq(st, "POST", "/v1/customers", [("email", "ada@example.com"), ("name", "Ada"),
                                           ("description", "shopper 7"), ("metadata[user_id]", "u-7")])
    assert r.status == 200, r.raw
    cus = r.json
    assert re.fullmatch(r"cus_[A-Za-z0-9]{14}", cus["id"]) and cus["object"] == "customer"
    assert (cus["email"], cus["name"], cus["description"]) == ("ada@example.com", "Ada", "shopper 7")
    assert cus["metadata"] == {"user_id": "u-7"} and cus["livemode"] is False and isinstance(cus["created"], int)
    assert sreq(st, "GET", f"/v1/customers/{cus['id']}").json == cus
    bare = sreq(st, "POST", "/v1/customers").json
    assert (bare["email"], bare["name"], bare["description"], bare["metadata"]) == (None, None, None, {})
    missing = sreq(st, "GET", "/v1/customers/cus_x")
    assert missing.status == 404
    assert missing.json["error"] == {"type": "invalid_request_error", "code": "resource_missing",
                                     "doc_url": "https://stripe.com/docs/error-codes/resource-missing",
                                     "message": "No such customer: 'cus_x'", "param": "id"}
    bogus = sreq(st, "POST", "/v1/customers", [("phone", "1")])
    assert bogus.status == 400 and bogus.json["error"]["code"] == "parameter_unknown"
    assert bogus.json["error"]["param"] == "phone"
    pm = attach(st, "pm_card_visa", cus["id"])
    ctl(st, "/_fake/reset", {})
    assert sreq(st, "GET", f"/v1/customers/{cus['id']}").status == 404
    assert sreq(st, "GET", f"/v1/payment_methods/{pm}").status == 404


def test_stripe_attach_mints_a_payment_method(st):
    cus = new_customer(st)
    r = sreq(st, "POST", "/v1/payment_methods/pm_card_visa/attach", [("customer", cus)])
    assert r.status == 200, r.raw
    pm = r.json
    assert re.fullmatch(r"pm_[A-Za-z0-9]{24}", pm["id"]) and pm["id"] != "pm_card_visa"
    assert (pm["object"], pm["type"], pm["customer"], pm["livemode"]) == ("payment_method", "card", cus, False)
    assert (pm["card"]["brand"], pm["card"]["last4"]) == ("visa", "4242") and isinstance(pm["created"], int)
    assert sreq(st, "GET", f"/v1/payment_methods/{pm['id']}").json == pm
    again = attach(st, "pm_card_visa", cus)
    assert again != pm["id"]  # every use of a test id is a new PaymentMethod
    declined = sreq(st, "POST", "/v1/payment_methods/pm_card_chargeDeclined/attach", [("customer", cus)]).json
    ev = json.loads(ctl(st, "/_fake/event", {"type": "payment_method.attached", "id": pm["id"]})["body"])
    assert ev["data"]["object"] == pm
    assert declined["card"]["last4"] == "0002" and declined["customer"] == cus
    loose = sreq(st, "GET", "/v1/payment_methods/pm_card_mastercard")
    assert loose.status == 200 and loose.json["id"].startswith("pm_") and loose.json["id"] != "pm_card_mastercard"
    assert loose.json["customer"] is None and loose.json["card"]["brand"] == "mastercard"
    unknown = sreq(st, "GET", "/v1/payment_methods/pm_nope")
    assert unknown.status == 404 and unknown.json["error"]["code"] == "resource_missing"


def test_stripe_attach_validation(st):
    a, b = new_customer(st), new_customer(st)
    r = sreq(st, "POST", "/v1/payment_methods/pm_card_visa/attach", [])
    assert r.status == 400
    e = r.json["error"]
    assert (e["type"], e["code"], e["param"]) == ("invalid_request_error", "parameter_missing", "customer")
    r = sreq(st, "POST", "/v1/payment_methods/pm_card_visa/attach", [("customer", "cus_x")])
    assert r.status == 400
    e = r.json["error"]
    assert (e["type"], e["code"], e["param"]) == ("invalid_request_error", "resource_missing", "customer")
    assert e["message"] == "No such customer: 'cus_x'"
    r = sreq(st, "POST", "/v1/payment_methods/pm_nope/attach", [("customer", a)])
    assert r.status == 404 and r.json["error"]["code"] == "resource_missing"
    r = sreq(st, "POST", "/v1/payment_methods/pm_card_visa/attach", [("customer", a), ("bogus", "1")])
    assert r.status == 400 and r.json["error"]["code"] == "parameter_unknown"
    pm = attach(st, "pm_card_visa", a)
    taken = sreq(st, "POST", f"/v1/payment_methods/{pm}/attach", [("customer", b)], idem="key-att")
    assert taken.status == 400 and taken.json["error"]["type"] == "invalid_request_error"
    assert taken.json["error"]["message"] == ("The payment method you provided has already been attached "
                                              "to a customer.")
    again = sreq(st, "POST", f"/v1/payment_methods/{pm}/attach", [("customer", b)], idem="key-att")
    assert again.status == 400 and again.header("Idempotent-Replayed") == "true"
    assert sreq(st, "GET", f"/v1/payment_methods/{pm}").json["customer"] == a
    same = sreq(st, "POST", f"/v1/payment_methods/{pm}/attach", [("customer", a)])
    assert same.status == 200 and same.json["id"] == pm and same.json["customer"] == a


@pytest.mark.parametrize("test_pm,status,outcome", [
    ("pm_card_visa", 200, "succeeded"),
    ("pm_card_processing", 200, "processing"),
    ("pm_card_chargeDeclined", 402, "generic_decline"),
    ("pm_card_chargeDeclinedInsufficientFunds", 402, "insufficient_funds"),
    ("pm_card_authenticationRequired", 402, "authentication_required"),
])
def test_stripe_saved_card_behaves_like_its_test_id(st, test_pm, status, outcome):
    cus = new_customer(st)
    pm = attach(st, test_pm, cus)
    r = charge_saved(st, pm, cus)
    assert r.status == status, r.raw
    if status == 200:
        pi = r.json
        assert pi["status"] == outcome
    else:
        e = r.json["error"]
        assert e["type"] == "card_error" and e["decline_code"] == outcome
        assert e["payment_method"]["id"] == pm and e["payment_method"]["customer"] == cus
        pi = e["payment_intent"]
        assert pi["status"] == "requires_payment_method"
        assert pi["last_payment_error"]["decline_code"] == outcome
    assert pi["customer"] == cus
    assert sreq(st, "GET", f"/v1/payment_intents/{pi['id']}").json["customer"] == cus
    if pi["latest_charge"]:
        assert sreq(st, "GET", f"/v1/charges/{pi['latest_charge']}").json["payment_method"] == pm


def test_stripe_saved_card_without_customer_refused(st, stripe_server):
    cus = new_customer(st)
    pm = attach(st, "pm_card_visa", cus)
    r = charge_saved(st, pm, idem="key-nocus")
    assert r.status == 400
    assert r.json["error"] == {"type": "invalid_request_error", "param": "customer",
                               "message": "The provided PaymentMethod belongs to a Customer: pass the ID "
                                          "of that Customer in the customer parameter."}
    assert intents(stripe_server) == []
    retry = charge_saved(st, pm, idem="key-nocus")  # nothing was stored under the key
    assert retry.status == 400 and retry.header("Idempotent-Replayed") is None
    unconfirmed = sreq(st, "POST", "/v1/payment_intents", PI + [("payment_method", pm)])
    assert unconfirmed.status == 400 and unconfirmed.json["error"]["param"] == "customer"
    assert intents(stripe_server) == []


def test_stripe_saved_card_wrong_customer_refused(st, stripe_server):
    owner, other = new_customer(st), new_customer(st)
    pm = attach(st, "pm_card_visa", owner)
    r = charge_saved(st, pm, other, idem="key-wrong")
    assert r.status == 400
    e = r.json["error"]
    assert (e["type"], e["code"], e["param"]) == ("invalid_request_error", "resource_missing", "payment_method")
    assert e["message"] == (f"The customer does not have a payment method with the ID {pm}. "
                            "The payment method must be attached to the customer.")
    assert intents(stripe_server) == []
    ok = charge_saved(st, pm, owner, idem="key-wrong-2")
    assert ok.status == 200 and ok.json["status"] == "succeeded" and ok.json["customer"] == owner


@pytest.mark.parametrize("pm", ["saved", "pm_card_visa", None])
def test_stripe_unknown_customer_refused(st, stripe_server, pm):
    if pm == "saved":
        pm = attach(st, "pm_card_visa", new_customer(st))
    params = PI + [("customer", "cus_x")] + ([("payment_method", pm), ("confirm", "true")] if pm else [])
    r = sreq(st, "POST", "/v1/payment_intents", params, idem="key-unk")
    assert r.status == 400
    assert r.json["error"] == {"type": "invalid_request_error", "code": "resource_missing",
                               "doc_url": "https://stripe.com/docs/error-codes/resource-missing",
                               "message": "No such customer: 'cus_x'", "param": "customer"}
    assert intents(stripe_server) == []
    fixed = sreq(st, "POST", "/v1/payment_intents", [x for x in params if x[0] != "customer"], idem="key-unk")
    assert fixed.header("Idempotent-Replayed") is None  # the failure stored nothing
    assert fixed.status == (400 if pm and not pm.startswith("pm_card_") else 200)


def test_stripe_test_ids_unchanged_with_or_without_customer(st):
    cus = new_customer(st)
    for customer in (None, cus):
        ok = charge_saved(st, "pm_card_visa", customer)
        assert ok.status == 200 and ok.json["status"] == "succeeded" and ok.json["customer"] == customer
        assert ok.json["payment_method"] == "pm_card_visa"
        bad = charge_saved(st, "pm_card_chargeDeclined", customer)
        assert bad.status == 402 and bad.json["error"]["decline_code"] == "generic_decline"
        assert bad.json["error"]["payment_method"] == {"id": "pm_card_chargeDeclined", "object": "payment_method",
                                                       "type": "card"}
    attach(st, "pm_card_visa", cus)  # attaching a test id leaves the test id itself free
    assert charge_saved(st, "pm_card_visa").status == 200


def test_stripe_confirm_checks_the_intents_customer(st):
    cus = new_customer(st)
    pm = attach(st, "pm_card_chargeDeclinedInsufficientFunds", cus)
    loose = sreq(st, "POST", "/v1/payment_intents", PI).json
    r = sreq(st, "POST", f"/v1/payment_intents/{loose['id']}/confirm", [("payment_method", pm)])
    assert r.status == 400 and r.json["error"]["param"] == "customer" and "code" not in r.json["error"]
    got = sreq(st, "GET", f"/v1/payment_intents/{loose['id']}").json
    assert got["status"] == "requires_payment_method" and got["payment_method"] is None
    other = sreq(st, "POST", "/v1/payment_intents", PI + [("customer", new_customer(st))]).json
    r = sreq(st, "POST", f"/v1/payment_intents/{other['id']}/confirm", [("payment_method", pm)])
    assert r.status == 400 and r.json["error"]["code"] == "resource_missing"
    assert r.json["error"]["param"] == "payment_method"
    mine = sreq(st, "POST", "/v1/payment_intents", PI + [("customer", cus)]).json
    r = sreq(st, "POST", f"/v1/payment_intents/{mine['id']}/confirm", [("payment_method", pm),
                                                                        ("off_session", "true")])
    assert r.status == 402 and r.json["error"]["decline_code"] == "insufficient_funds"
    assert r.json["error"]["payment_intent"]["customer"] == cus


def test_stripe_idempotent_replay_with_customer(st, stripe_server):
    cus = new_customer(st)
    pm = attach(st, "pm_card_visa", cus)
    a = charge_saved(st, pm, cus, idem="key-cus")
    b = charge_saved(st, pm, cus, idem="key-cus")
    assert a.status == b.status == 200
    assert a.json == b.json and a.json["customer"] == cus and a.json["payment_method"] == pm
    assert a.header("Idempotent-Replayed") is None and b.header("Idempotent-Replayed") == "true"
    assert intents(stripe_server) == [a.json["id"]]
    c = charge_saved(st, pm, idem="key-cus")  # the same key without the customer: other parameters
    assert c.status == 400 and c.json["error"]["type"] == "idempotency_error"


def test_keep_alive_connection(st):
    host, port = st.replace("http://", "").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    for _ in range(3):
        conn.request("POST", "/v1/payment_intents", urllib.parse.urlencode(PI),
                     {"Authorization": f"Bearer {KEY}", "Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        assert r.status == 200 and r.version == 11
        json.loads(r.read())
    conn.close()


# ---- PayPal -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paypal_server():
    srv = fake_paypal.FakePayPal(client_id="cid", client_secret="csecret", webhook_id="WH-1")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def pp(paypal_server):
    ctl(paypal_server.base_url, "/_fake/reset", {})
    return paypal_server.base_url


def get_token(base, cid="cid", secret="csecret"):
    auth = base64.b64encode(f"{cid}:{secret}".encode()).decode()
    return call("POST", base + "/v1/oauth2/token", "grant_type=client_credentials",
                {"Authorization": f"Basic {auth}", "Content-Type": "application/x-www-form-urlencoded"})


def preq(base, method, path, body=None, token=None, rid=None, ctype="application/json", prefer=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if rid:
        headers["PayPal-Request-Id"] = rid
    if prefer:
        headers["Prefer"] = prefer
    data = None
    if method == "POST":
        data = b"" if body is None else json.dumps(body).encode()
        headers["Content-Type"] = ctype
    return call(method, base + path, data, headers)


def order_body(value="25.00", currency="USD", custom_id="ord-1"):
    return {"intent": "CAPTURE", "purchase_units": [{"amount": {"currency_code": currency, "value": value},
                                                     "custom_id": custom_id, "invoice_id": "inv-" + custom_id}],
            "application_context": {"return_url": "https://shop.example/ok", "cancel_url": "https://shop.example/no"}}


@pytest.fixture
def tok(pp):
    r = get_token(pp)
    assert r.status == 200
    return r.json["access_token"]


def captured_order(pp, tok):
    o = preq(pp, "POST", "/v2/checkout/orders", order_body(), tok).json
    ctl(pp, "/_fake/pay", {"id": o["id"]})
    c = preq(pp, "POST", f"/v2/checkout/orders/{o['id']}/capture", None, tok, rid="cap-" + o["id"])
    assert c.status == 201, c.raw
    return o["id"], c.json


def test_paypal_token(pp):
    r = get_token(pp)
    assert r.status == 200
    j = r.json
    assert j["token_type"] == "Bearer" and j["access_token"].startswith("A21AA") and j["expires_in"] == 32400
    assert j["app_id"].startswith("APP-") and j["scope"] and j["nonce"]
    bad = get_token(pp, secret="wrong")
    assert bad.status == 401 and bad.json == {"error": "invalid_client",
                                              "error_description": "Client Authentication failed"}
    ctl(pp, "/_fake/config", {"token_ttl": 5})
    assert get_token(pp).json["expires_in"] == 5
    assert ctl(pp, "/_fake/stats")["token_grants"] == 2


def test_paypal_requires_valid_token(pp, tok):
    r = preq(pp, "GET", "/v2/checkout/orders/XYZ")
    assert r.status == 401 and r.json["name"] == "AUTHENTICATION_FAILURE"
    assert preq(pp, "GET", "/v2/checkout/orders/XYZ", token="A21AAbogus").status == 401
    assert preq(pp, "GET", "/v2/checkout/orders/XYZ", token=tok).status == 404
    ctl(pp, "/_fake/config", {"token_ttl": 1})
    short = get_token(pp).json["access_token"]
    time.sleep(1.2)
    assert preq(pp, "GET", "/v2/checkout/orders/XYZ", token=short).status == 401
    ctl(pp, "/_fake/config", {"revoke_tokens": True})
    assert preq(pp, "GET", "/v2/checkout/orders/XYZ", token=tok).status == 401


def test_paypal_create_and_idempotent_replay(pp, tok):
    r = preq(pp, "POST", "/v2/checkout/orders", order_body(), tok, rid="req-1")
    assert r.status == 201, r.raw
    o = r.json
    assert re.fullmatch(r"[A-Z0-9]{17}", o["id"]) and o["status"] == "CREATED"
    rels = {link["rel"]: link for link in o["links"]}
    assert rels["approve"]["href"] == f"https://www.sandbox.paypal.com/checkoutnow?token={o['id']}"
    assert rels["self"]["href"].endswith(f"/v2/checkout/orders/{o['id']}") and rels["self"]["method"] == "GET"
    again = preq(pp, "POST", "/v2/checkout/orders", order_body(), tok, rid="req-1")
    assert again.status == 200 and again.json["id"] == o["id"]
    full = preq(pp, "GET", f"/v2/checkout/orders/{o['id']}", token=tok).json
    pu = full["purchase_units"][0]
    assert pu["amount"] == {"currency_code": "USD", "value": "25.00"} and pu["custom_id"] == "ord-1"
    other = preq(pp, "POST", "/v2/checkout/orders", order_body(), tok, rid="req-2")
    assert other.status == 201 and other.json["id"] != o["id"]
    pa = dict(order_body(), payment_source={"paypal": {"experience_context": {"return_url": "https://x/ok",
                                                                              "cancel_url": "https://x/no"}}})
    pa = preq(pp, "POST", "/v2/checkout/orders", pa, tok).json
    assert pa["status"] == "PAYER_ACTION_REQUIRED" and "payer-action" in {link["rel"] for link in pa["links"]}


@pytest.mark.parametrize("value,currency,status,issue", [
    ("10.001", "USD", 422, "DECIMAL_PRECISION"),
    ("10.5", "USD", 422, "DECIMAL_PRECISION"),     # fake is strict: exactly two decimals
    ("10", "USD", 422, "DECIMAL_PRECISION"),
    ("100.00", "JPY", 422, "DECIMALS_NOT_SUPPORTED"),
    ("1,000.00", "USD", 400, "INVALID_PARAMETER_SYNTAX"),
    ("100", "JPY", 201, None),
    ("7.50", "EUR", 201, None),
])
def test_paypal_amount_rules(pp, tok, value, currency, status, issue):
    r = preq(pp, "POST", "/v2/checkout/orders", order_body(value, currency), tok)
    assert r.status == status, r.raw
    if issue:
        assert r.json["details"][0]["issue"] == issue and r.json["debug_id"]
        assert r.json["name"] == ("UNPROCESSABLE_ENTITY" if status == 422 else "INVALID_REQUEST")


def test_paypal_capture_flow(pp, tok):
    o = preq(pp, "POST", "/v2/checkout/orders", order_body(), tok).json
    r = preq(pp, "POST", f"/v2/checkout/orders/{o['id']}/capture", None, tok, rid="c1")
    assert r.status == 422 and r.json["details"][0]["issue"] == "ORDER_NOT_APPROVED"
    assert ctl(pp, "/_fake/pay", {"id": o["id"]})["status"] == "APPROVED"
    form = preq(pp, "POST", f"/v2/checkout/orders/{o['id']}/capture", None, tok, rid="c1",
                ctype="application/x-www-form-urlencoded")
    assert form.status == 415
    r = preq(pp, "POST", f"/v2/checkout/orders/{o['id']}/capture", None, tok, rid="c1")
    assert r.status == 201, r.raw
    assert r.json["status"] == "COMPLETED"
    cap = r.json["purchase_units"][0]["payments"]["captures"][0]
    assert cap["status"] == "COMPLETED" and cap["final_capture"] is True and cap["custom_id"] == "ord-1"
    assert cap["amount"] == {"currency_code": "USD", "value": "25.00"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", cap["create_time"])
    rels = {link["rel"]: link["href"] for link in cap["links"]}
    assert rels["up"].endswith(f"/v2/checkout/orders/{o['id']}") and rels["refund"].endswith("/refund")
    replay = preq(pp, "POST", f"/v2/checkout/orders/{o['id']}/capture", {}, tok, rid="c1")
    assert replay.status == 200
    assert replay.json["purchase_units"][0]["payments"]["captures"][0]["id"] == cap["id"]
    dup = preq(pp, "POST", f"/v2/checkout/orders/{o['id']}/capture", {}, tok, rid="c2")
    assert dup.status == 422 and dup.json["details"][0]["issue"] == "ORDER_ALREADY_CAPTURED"
    got = preq(pp, "GET", f"/v2/payments/captures/{cap['id']}", token=tok).json
    assert got["supplementary_data"]["related_ids"]["order_id"] == o["id"]
    assert preq(pp, "GET", f"/v2/checkout/orders/{o['id']}", token=tok).json["status"] == "COMPLETED"


def test_paypal_capture_outcomes(pp, tok):
    o = preq(pp, "POST", "/v2/checkout/orders", order_body(), tok).json
    ctl(pp, "/_fake/pay", {"id": o["id"]})
    ctl(pp, "/_fake/capture_outcome", {"id": o["id"], "status": "DECLINED"})
    r = preq(pp, "POST", f"/v2/checkout/orders/{o['id']}/capture", None, tok)
    assert r.status == 422 and r.json["details"][0]["issue"] == "INSTRUMENT_DECLINED"
    assert "redirect" in {link["rel"] for link in r.json["links"]}
    ctl(pp, "/_fake/capture_outcome", {"id": o["id"], "status": "PENDING"})
    r = preq(pp, "POST", f"/v2/checkout/orders/{o['id']}/capture", None, tok)
    assert r.status == 201
    cap = r.json["purchase_units"][0]["payments"]["captures"][0]
    assert cap["status"] == "PENDING" and cap["status_details"]["reason"]


def test_paypal_refunds(pp, tok):
    oid, order = captured_order(pp, tok)
    cap_id = order["purchase_units"][0]["payments"]["captures"][0]["id"]
    url = f"/v2/payments/captures/{cap_id}/refund"
    over = preq(pp, "POST", url, {"amount": {"currency_code": "USD", "value": "30.00"}}, tok)
    assert over.status == 422 and over.json["details"][0]["issue"] == "REFUND_AMOUNT_EXCEEDED"
    part = preq(pp, "POST", url, {"amount": {"currency_code": "USD", "value": "5.00"}, "note_to_payer": "sorry"},
                tok, rid="r1")
    assert part.status == 201 and part.json["status"] == "COMPLETED" and set(part.json) == {"id", "status", "links"}
    assert preq(pp, "GET", f"/v2/payments/captures/{cap_id}", token=tok).json["status"] == "PARTIALLY_REFUNDED"
    rest = preq(pp, "POST", url, {}, tok, rid="r2")
    assert rest.status == 201
    refund = preq(pp, "GET", f"/v2/payments/refunds/{rest.json['id']}", token=tok).json
    assert refund["amount"] == {"currency_code": "USD", "value": "20.00"}
    assert any(link["rel"] == "up" and link["href"].endswith(cap_id) for link in refund["links"])
    replay = preq(pp, "POST", url, {}, tok, rid="r2")
    assert replay.status == 200 and replay.json["id"] == rest.json["id"]
    twice = preq(pp, "POST", url, {}, tok, rid="r3")
    assert twice.status == 422 and twice.json["details"][0]["issue"] == "CAPTURE_FULLY_REFUNDED"
    assert preq(pp, "GET", f"/v2/payments/captures/{cap_id}", token=tok).json["status"] == "REFUNDED"


def verify(pp, tok, ev, event_obj=None, webhook_id="WH-1"):
    h = ev["headers"]
    return preq(pp, "POST", "/v1/notifications/verify-webhook-signature", {
        "auth_algo": h["PAYPAL-AUTH-ALGO"], "cert_url": h["PAYPAL-CERT-URL"],
        "transmission_id": h["PAYPAL-TRANSMISSION-ID"], "transmission_sig": h["PAYPAL-TRANSMISSION-SIG"],
        "transmission_time": h["PAYPAL-TRANSMISSION-TIME"], "webhook_id": webhook_id,
        "webhook_event": event_obj if event_obj is not None else json.loads(ev["body"])}, tok)


def test_paypal_webhooks(pp, tok):
    oid, order = captured_order(pp, tok)
    cap_id = order["purchase_units"][0]["payments"]["captures"][0]["id"]
    ev = ctl(pp, "/_fake/event", {"type": "PAYMENT.CAPTURE.COMPLETED", "id": oid})
    event = json.loads(ev["body"])
    assert event["id"].startswith("WH-") and event["event_version"] == "1.0"
    assert event["resource_type"] == "capture" and event["event_type"] == "PAYMENT.CAPTURE.COMPLETED"
    assert event["resource"]["id"] == cap_id and event["resource"]["custom_id"] == "ord-1"
    assert event["resource"]["supplementary_data"]["related_ids"]["order_id"] == oid
    h = ev["headers"]
    assert h["PAYPAL-AUTH-ALGO"] == "SHA256withRSA" and h["PAYPAL-CERT-URL"].startswith("https://api.paypal.com/")
    assert h["PAYPAL-TRANSMISSION-SIG"] == fake_paypal.sign_webhook(
        h["PAYPAL-TRANSMISSION-ID"], h["PAYPAL-TRANSMISSION-TIME"], "WH-1", event)
    r = verify(pp, tok, ev)
    assert r.status == 200 and r.json == {"verification_status": "SUCCESS"}
    assert verify(pp, tok, ev, webhook_id="WH-2").json["verification_status"] == "FAILURE"
    changed = dict(event, summary="changed")
    assert verify(pp, tok, ev, changed).json["verification_status"] == "FAILURE"
    tampered = ctl(pp, "/_fake/event", {"type": "PAYMENT.CAPTURE.COMPLETED", "id": cap_id, "tamper": True})
    assert verify(pp, tok, tampered).json["verification_status"] == "FAILURE"
    assert json.loads(ctl(pp, "/_fake/event", {"type": "PAYMENT.CAPTURE.COMPLETED", "id": oid,
                                                "event_id": event["id"]})["body"])["id"] == event["id"]
    preq(pp, "POST", f"/v2/payments/captures/{cap_id}/refund", {}, tok)
    ref_ev = json.loads(ctl(pp, "/_fake/event", {"type": "PAYMENT.CAPTURE.REFUNDED", "id": cap_id})["body"])
    assert ref_ev["resource_type"] == "refund"
    assert any(link["rel"] == "up" and cap_id in link["href"] for link in ref_ev["resource"]["links"])
    missing = preq(pp, "POST", "/v1/notifications/verify-webhook-signature", {"webhook_id": "WH-1"}, tok)
    assert missing.status == 400


def test_paypal_pending_then_completed_event(pp, tok):
    o = preq(pp, "POST", "/v2/checkout/orders", order_body(), tok).json
    ctl(pp, "/_fake/pay", {"id": o["id"]})
    ctl(pp, "/_fake/capture_outcome", {"id": o["id"], "status": "PENDING"})
    cap = preq(pp, "POST", f"/v2/checkout/orders/{o['id']}/capture", None, tok).json
    cap_id = cap["purchase_units"][0]["payments"]["captures"][0]["id"]
    ev = json.loads(ctl(pp, "/_fake/event", {"type": "PAYMENT.CAPTURE.COMPLETED", "id": cap_id})["body"])
    assert ev["resource"]["status"] == "COMPLETED"
    assert preq(pp, "GET", f"/v2/payments/captures/{cap_id}", token=tok).json["status"] == "COMPLETED"


def test_paypal_request_id_in_flight_and_representation(pp, tok):
    ctl(pp, "/_fake/fail", {"mode": "slow", "seconds": 1.0, "path": "/v2/checkout/orders"})
    first = {}
    t = threading.Thread(target=lambda: first.update(
        r=preq(pp, "POST", "/v2/checkout/orders", order_body(), tok, rid="slow-1")))
    t.start()
    time.sleep(0.3)
    second = preq(pp, "POST", "/v2/checkout/orders", order_body(), tok, rid="slow-1")
    t.join()
    assert second.status == 409 and first["r"].status == 201
    full = preq(pp, "POST", "/v2/checkout/orders", order_body(), tok, rid="slow-1", prefer="return=representation")
    assert full.status == 200 and full.json["id"] == first["r"].json["id"]
    assert full.json["purchase_units"][0]["custom_id"] == "ord-1" and full.json["intent"] == "CAPTURE"


def test_paypal_failure_injection(pp, tok):
    ctl(pp, "/_fake/fail", {"mode": "500", "count": 1, "path": "/v2/checkout/orders", "method": "POST"})
    r = preq(pp, "POST", "/v2/checkout/orders", order_body(), tok, rid="f1")
    assert r.status == 500 and r.json["name"] == "INTERNAL_SERVER_ERROR"
    ok = preq(pp, "POST", "/v2/checkout/orders", order_body(), tok, rid="f1")
    assert ok.status == 201  # the injected failure had no side effect
    ctl(pp, "/_fake/fail", {"mode": "429", "count": 1})
    r = preq(pp, "GET", f"/v2/checkout/orders/{ok.json['id']}", token=tok)
    assert r.status == 429 and r.json["name"] == "RATE_LIMIT_REACHED"
    recs = ctl(pp, "/_fake/requests?path=/v2/checkout/orders")
    assert [x["status"] for x in recs] == [500, 201, 429]
    assert recs[0]["headers"]["paypal-request-id"] == "f1"


# ---- command-line behaviour ------------------------------------------------------
@pytest.mark.parametrize("script,args", [
    ("fake_stripe.py", ["--key", "sk_test_cli"]),
    ("fake_paypal.py", ["--client-id", "a", "--client-secret", "b", "--webhook-id", "WH-9"]),
])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_listening_and_signal_exit(script, args, sig):
    proc = subprocess.Popen(["/usr/bin/python3", os.path.join(HERE, script), "--port", "0"] + args,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.fullmatch(r"LISTENING (\d+)\n", line)
        assert m, line
        port = int(m.group(1))
        if script == "fake_stripe.py":
            r = sreq(f"http://127.0.0.1:{port}", "GET", "/v1/payment_intents/pi_x", key="sk_test_cli")
            assert r.status == 404
        else:
            auth = base64.b64encode(b"a:b").decode()
            r = call("POST", f"http://127.0.0.1:{port}/v1/oauth2/token", "grant_type=client_credentials",
                     {"Authorization": f"Basic {auth}", "Content-Type": "application/x-www-form-urlencoded"})
            assert r.status == 200
        proc.send_signal(sig)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
