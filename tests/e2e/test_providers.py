"""STRIPE and PAYPAL through the real gRPC API against the local fakes (tests/fakes):
what orderd sends to the provider, what the caller gets back, failures and retries, and
the end state of a confirmation racing a cancellation.

Every test uses its own customer and products; the fakes are shared by the session, so
each test looks only at the provider requests and objects of its own orders (matched by
metadata[order_id] / custom_id / the order's idempotency keys). Failure rules injected
into a fake are cleared by the test that set them, whatever its outcome.
"""

import base64
import contextlib
import json
import time
import urllib.parse
import urllib.request
import uuid

import grpc
import pytest

import orderd_e2e as e2e
from conftest import PAYPAL_CLIENT_ID, PAYPAL_SECRET, STRIPE_KEY
from orderd_e2e import pb, expect_error, detail, violation_fields

STRIPE = pb.PAYMENT_PROVIDER_STRIPE
PAYPAL = pb.PAYMENT_PROVIDER_PAYPAL
LOCAL = pb.PAYMENT_PROVIDER_LOCAL
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
TAX_BPS = 825  # config.yaml orders.tax_rate_bps, as the session runs it

# ---------------------------------------------------------------------------------------
# helpers


def _total(subtotal):
    return subtotal + (subtotal * TAX_BPS + 5000) // 10000


def _product(orderd, price, currency="EUR"):
    """A product of the test's own, priced `price` minor units."""
    pid = "e2e-%s-prov-%s" % (orderd.run, uuid.uuid4().hex[:10])
    return orderd.upsert(pid, "Provider test item", price, currency).product_id


def _place(orderd, caller, pid, qty=1, provider=STRIPE, request_id=None, payment_method="",
           payment_customer=""):
    req = orderd.place_request([(pid, qty)], request_id=request_id, provider=provider)
    req.payment_method = payment_method
    req.payment_customer = payment_customer
    return orderd.call("PlaceOrder", req, caller)


def _stripe_api(orderd, path, form):
    """A POST to the fake Stripe's public API, as the merchant's own code would make it
    (to save a card for a customer): form-encoded, with the secret key."""
    req = urllib.request.Request(orderd.stripe.base + path,
                                 data=urllib.parse.urlencode(form).encode(), method="POST",
                                 headers={"Authorization": "Bearer " + STRIPE_KEY})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _saved_card(orderd, test_pm="pm_card_visa"):
    """A Stripe customer and a card saved to it: (cus_..., pm_...)."""
    cus = _stripe_api(orderd, "/v1/customers", {"email": "e2e@example.com"})["id"]
    pm = _stripe_api(orderd, "/v1/payment_methods/%s/attach" % test_pm, {"customer": cus})
    assert pm["customer"] == cus and pm["id"] != test_pm
    return cus, pm["id"]


def _confirm(orderd, caller, order_id, reference, provider=STRIPE):
    return orderd.call("ConfirmPayment", pb.ConfirmPaymentRequest(
        order_id=order_id, provider=provider, payment_reference=reference), caller)


def _cancel(orderd, caller, order_id, reason="changed my mind"):
    return orderd.call("CancelOrder", pb.CancelOrderRequest(order_id=order_id, reason=reason),
                       caller)


def _requests(fake, path_sub=None):
    q = "?path=" + urllib.parse.quote(path_sub) if path_sub else ""
    return fake.control("/_fake/requests" + q)


def _obj(fake, oid):
    return fake.control("/_fake/objects/" + urllib.parse.quote(oid))


def _form_order_id(rec):
    md = rec.get("form", {}).get("metadata")
    return md.get("order_id") if isinstance(md, dict) else None


def _pi_creates(orderd, order_id):
    """The POST /v1/payment_intents requests orderd made for an order."""
    return [r for r in _requests(orderd.stripe, "/v1/payment_intents")
            if r["method"] == "POST" and r["path"] == "/v1/payment_intents"
            and _form_order_id(r) == order_id]


def _stripe_refunds(orderd, pi_id):
    """The POST /v1/refunds requests orderd made for a PaymentIntent."""
    return [r for r in _requests(orderd.stripe, "/v1/refunds")
            if r["method"] == "POST" and r["path"] == "/v1/refunds"
            and r["form"].get("payment_intent") == pi_id]


def _refund_keys_answered(recs):
    """Idempotency keys of refund requests the fake answered 200 (a refund was made, or
    replayed): one key = one refund."""
    return {r["headers"].get("idempotency-key") for r in recs if r["status"] == 200}


def _paypal_reqs(orderd, path_sub, method="POST"):
    return [r for r in _requests(orderd.paypal, path_sub) if r["method"] == method]


@contextlib.contextmanager
def _failing(fake, mode, count, path=None, method=None, seconds=None):
    """Injects a failure rule into a fake for the duration of the block."""
    body = {"mode": mode, "count": count}
    if seconds is not None:
        body["seconds"] = seconds
    if path:
        body["path"] = path
    if method:
        body["method"] = method
    fake.control("/_fake/fail", body)
    try:
        yield
    finally:
        fake.control("/_fake/fail", method="DELETE")


def _meta(err):
    info = detail(err, "ErrorInfo")
    return info.reason, dict(info.metadata)


def _poll(fn, ok, timeout=10.0, interval=0.1):
    """Calls fn() until ok(result) or the deadline; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        r = fn()
        if ok(r) or time.monotonic() >= deadline:
            return r
        time.sleep(interval)


def _only_order(orderd, customer):
    orders = orderd.list_all(customer)
    assert len(orders) == 1, [o.order_id for o in orders]
    return orders[0]


# ---------------------------------------------------------------------------------------
# Stripe: PlaceOrder


def test_stripe_place_creates_a_payment_intent(orderd, customer):
    pid = _product(orderd, 1000)
    rid = e2e.unique("req")
    r = _place(orderd, customer, pid, qty=2, request_id=rid)
    o = r.order
    assert o.status == pb.ORDER_STATUS_PENDING
    assert (o.subtotal_minor, o.total_minor) == (2000, _total(2000)) == (2000, 2165)
    assert o.payment.provider == STRIPE
    assert o.payment.status == pb.PAYMENT_STATUS_PENDING
    assert r.payment.provider == STRIPE
    ref = r.payment.reference
    assert ref.startswith("pi_") and o.payment.reference == ref
    assert r.payment.client_secret.startswith(ref + "_secret_")
    assert r.payment.approval_url == ""

    creates = _pi_creates(orderd, o.order_id)
    assert len(creates) == 1, creates
    c = creates[0]
    assert c["status"] == 200
    assert c["headers"]["content-type"].startswith("application/x-www-form-urlencoded")
    assert c["form"]["amount"] == "2165"
    assert c["form"]["currency"] == "eur"
    assert c["form"]["metadata"]["order_id"] == o.order_id
    assert c["form"]["automatic_payment_methods"]["enabled"] == "true"
    assert "confirm" not in c["form"] and "payment_method" not in c["form"]
    assert c["headers"].get("idempotency-key"), c["headers"]
    assert c["headers"].get("stripe-version") == "2024-06-20"
    assert c["headers"].get("authorization") == "Bearer sk_test_fake"

    pi = _obj(orderd.stripe, ref)
    assert pi["status"] == "requires_payment_method"
    assert (pi["amount"], pi["currency"]) == (2165, "eur")
    assert pi["metadata"]["order_id"] == o.order_id

    # The same request again: the same order and the same PaymentIntent, none created anew.
    again = _place(orderd, customer, pid, qty=2, request_id=rid)
    assert again.order.order_id == o.order_id
    assert again.payment.reference == ref
    assert again.order.status == pb.ORDER_STATUS_PENDING
    creates = _pi_creates(orderd, o.order_id)
    assert len({x["headers"].get("idempotency-key") for x in creates}) == 1, creates
    assert orderd.get(customer, o.order_id).payment.reference == ref


def test_stripe_place_jpy_sends_yen(orderd, customer):
    pid = _product(orderd, 500, "JPY")
    r = _place(orderd, customer, pid)
    assert r.order.currency == "JPY"
    assert r.order.total_minor == _total(500) == 541
    c = _pi_creates(orderd, r.order.order_id)
    assert len(c) == 1
    assert (c[0]["form"]["amount"], c[0]["form"]["currency"]) == ("541", "jpy")
    pi = _obj(orderd.stripe, r.payment.reference)
    assert (pi["amount"], pi["currency"]) == (541, "jpy")


# ---------------------------------------------------------------------------------------
# Stripe: ConfirmPayment


def test_stripe_confirm_before_and_after_paying(orderd, customer):
    pid = _product(orderd, 1000)
    r = _place(orderd, customer, pid, qty=2)
    oid, ref = r.order.order_id, r.payment.reference

    err = expect_error(lambda: _confirm(orderd, customer, oid, ref), PRECONDITION)
    reason, meta = _meta(err)
    assert reason == "PAYMENT_NOT_SUCCEEDED"
    assert meta.get("provider_status") == "requires_payment_method", meta
    now = orderd.get(customer, oid)
    assert now.status == pb.ORDER_STATUS_PENDING
    assert now.version == r.order.version

    pi = orderd.stripe.control("/_fake/pay", {"id": ref})
    assert pi["status"] == "succeeded"
    charge = _obj(orderd.stripe, pi["latest_charge"])

    o = _confirm(orderd, customer, oid, ref)
    assert o.status == pb.ORDER_STATUS_PAID
    assert o.payment.status == pb.PAYMENT_STATUS_SUCCEEDED
    assert o.payment.reference == ref
    assert o.payment.charge_id == charge["id"] and o.payment.charge_id.startswith("ch_")
    assert o.payment.receipt_url == charge["receipt_url"]
    assert o.payment.HasField("paid_at")
    assert o.payment.paid_at.seconds == charge["created"]
    assert o.payment.refund_id == "" and not o.payment.HasField("refunded_at")
    assert o.version == r.order.version + 1
    assert orderd.get(customer, oid) == o

    again = _confirm(orderd, customer, oid, ref)
    assert again == o, "confirming a paid order again must change nothing"
    assert orderd.get(customer, oid).version == o.version


def test_stripe_confirm_with_another_orders_payment(orderd, customer):
    pid = _product(orderd, 1000)
    a = _place(orderd, customer, pid)
    b = _place(orderd, customer, pid)
    orderd.stripe.control("/_fake/pay", {"id": b.payment.reference})
    err = expect_error(lambda: _confirm(orderd, customer, a.order.order_id, b.payment.reference),
                       PRECONDITION)
    reason, meta = _meta(err)
    assert reason == "PAYMENT_REFERENCE_MISMATCH", (reason, err.details())
    # Refused before asking Stripe: b's PaymentIntent was never retrieved for a.
    asked = [q for q in orderd.stripe.control("/_fake/requests")
             if q["method"] == "GET" and b.payment.reference in q["path"]]
    assert asked == [], asked
    now = orderd.get(customer, a.order.order_id)
    assert now.status == pb.ORDER_STATUS_PENDING
    assert now.payment.status == pb.PAYMENT_STATUS_PENDING
    assert now.version == a.order.version
    # b itself is still confirmable with its own payment.
    assert _confirm(orderd, customer, b.order.order_id,
                    b.payment.reference).status == pb.ORDER_STATUS_PAID


# ---------------------------------------------------------------------------------------
# Stripe: saved payment methods


def test_stripe_saved_payment_method_pays_at_once(orderd, customer):
    pid = _product(orderd, 1500)
    r = _place(orderd, customer, pid, payment_method="pm_card_visa")
    o = r.order
    assert o.status == pb.ORDER_STATUS_PAID
    assert o.payment.status == pb.PAYMENT_STATUS_SUCCEEDED
    assert o.payment.charge_id.startswith("ch_")
    assert o.payment.receipt_url.startswith("https://")
    assert o.payment.HasField("paid_at")
    pi = _obj(orderd.stripe, r.payment.reference)
    assert pi["status"] == "succeeded" and pi["latest_charge"] == o.payment.charge_id
    assert pi["payment_method"] == "pm_card_visa"
    c = _pi_creates(orderd, o.order_id)
    assert len(c) == 1
    assert c[0]["form"]["payment_method"] == "pm_card_visa"
    assert "confirm" not in c[0]["form"]  # created first: no money moves before it is stored
    confirms = [q for q in _requests(orderd.stripe, "/confirm") if q["method"] == "POST"
                and q["path"] == "/v1/payment_intents/%s/confirm" % r.payment.reference]
    assert len(confirms) == 1 and confirms[0]["form"]["off_session"] == "true"
    assert orderd.get(customer, o.order_id) == o


@pytest.mark.parametrize("pm,decline_code", [
    ("pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds"),
    ("pm_card_chargeDeclined", "generic_decline"),
    ("pm_card_authenticationRequired", "authentication_required"),
], ids=["insufficient_funds", "generic_decline", "authentication_required"])
def test_stripe_saved_payment_method_declined(orderd, customer, pm, decline_code):
    pid = _product(orderd, 1500)
    rid = e2e.unique("req")
    err = expect_error(lambda: _place(orderd, customer, pid, request_id=rid, payment_method=pm),
                       PRECONDITION)
    reason, meta = _meta(err)
    assert reason == "PAYMENT_DECLINED"
    assert meta.get("decline_code") == decline_code, meta

    o = _only_order(orderd, customer)
    assert o.status == pb.ORDER_STATUS_FAILED, pb.OrderStatus.Name(o.status)
    assert o.payment.status == pb.PAYMENT_STATUS_FAILED, pb.PaymentStatus.Name(o.payment.status)
    assert o.payment.reference.startswith("pi_")
    # The declined intent is closed at Stripe: nobody can pay for the FAILED order later.
    cancel_path = "/v1/payment_intents/%s/cancel" % o.payment.reference
    assert _obj(orderd.stripe, o.payment.reference)["status"] == "canceled"
    assert len([r for r in _requests(orderd.stripe, cancel_path) if r["method"] == "POST"]) == 1
    assert len(_pi_creates(orderd, o.order_id)) == 1

    # A replay answers the same, and charges nothing again.
    err2 = expect_error(lambda: _place(orderd, customer, pid, request_id=rid, payment_method=pm),
                        PRECONDITION)
    reason2, meta2 = _meta(err2)
    assert reason2 == "PAYMENT_DECLINED"
    assert meta2.get("decline_code") == decline_code, meta2
    assert len(_pi_creates(orderd, o.order_id)) == 1
    assert len([r for r in _requests(orderd.stripe, cancel_path) if r["method"] == "POST"]) == 1
    assert orderd.get(customer, o.order_id) == o
    assert len(orderd.list_all(customer)) == 1


def test_stripe_card_saved_to_a_customer_pays_at_once(orderd, customer):
    """The off-session case the field is for: a card saved to a Stripe customer is charged
    with the customer named, as Stripe requires."""
    cus, pm = _saved_card(orderd)
    pid = _product(orderd, 1500)
    r = _place(orderd, customer, pid, payment_method=pm, payment_customer=cus)
    assert r.order.status == pb.ORDER_STATUS_PAID
    assert r.order.payment.status == pb.PAYMENT_STATUS_SUCCEEDED
    pi = _obj(orderd.stripe, r.payment.reference)
    assert pi["status"] == "succeeded" and pi["customer"] == cus and pi["payment_method"] == pm
    c = _pi_creates(orderd, r.order.order_id)
    assert len(c) == 1 and c[0]["form"]["customer"] == cus


@pytest.mark.parametrize("whose", ["nobody", "another"])
def test_stripe_card_saved_to_a_customer_is_refused_without_that_customer(orderd, customer,
                                                                          whose):
    """Stripe refuses a saved card when the request does not name its customer: the caller
    hears which field to fix, and the order is FAILED (its stock released), not left
    PENDING until it expires."""
    cus, pm = _saved_card(orderd)
    other = _stripe_api(orderd, "/v1/customers", {"email": "other@example.com"})["id"]
    pid = _product(orderd, 1500)
    rid = e2e.unique("req")
    named = "" if whose == "nobody" else other
    err = expect_error(lambda: _place(orderd, customer, pid, request_id=rid, payment_method=pm,
                                      payment_customer=named), PRECONDITION)
    reason, meta = _meta(err)
    assert reason == "PAYMENT_DECLINED", (reason, meta)
    assert meta.get("field") == ("payment_customer" if whose == "nobody" else "payment_method")
    assert "stripe refused the saved payment method" in err.details()
    o = _only_order(orderd, customer)
    assert o.status == pb.ORDER_STATUS_FAILED, pb.OrderStatus.Name(o.status)
    assert o.payment.reference == ""  # Stripe created no intent

    # The same request again answers the same; a new request naming the customer pays.
    err2 = expect_error(lambda: _place(orderd, customer, pid, request_id=rid, payment_method=pm,
                                       payment_customer=named), PRECONDITION)
    assert _meta(err2)[0] == "PAYMENT_DECLINED"
    r = _place(orderd, customer, pid, payment_method=pm, payment_customer=cus)
    assert r.order.status == pb.ORDER_STATUS_PAID


def test_payment_customer_needs_a_payment_method(orderd, customer):
    pid = _product(orderd, 1000)
    err = expect_error(lambda: _place(orderd, customer, pid, payment_customer="cus_x"), INVALID)
    assert violation_fields(err) == ["payment_customer"]
    assert orderd.list_all(customer) == []


def test_stripe_saved_payment_method_still_processing(orderd, customer):
    """A charge that is still processing: the order stays PENDING; Stripe's webhook (or a
    later ConfirmPayment) settles it."""
    pid = _product(orderd, 1500)
    r = _place(orderd, customer, pid, payment_method="pm_card_processing")
    assert r.order.status == pb.ORDER_STATUS_PENDING
    assert r.order.payment.status == pb.PAYMENT_STATUS_PENDING
    assert _obj(orderd.stripe, r.payment.reference)["status"] == "processing"
    err = expect_error(lambda: _confirm(orderd, customer, r.order.order_id,
                                        r.payment.reference), PRECONDITION)
    assert _meta(err) == ("PAYMENT_NOT_SUCCEEDED", {"provider_status": "processing"})


@pytest.mark.parametrize("provider", [LOCAL, PAYPAL], ids=["LOCAL", "PAYPAL"])
def test_saved_payment_method_needs_stripe(orderd, customer, provider):
    pid = _product(orderd, 1000)
    err = expect_error(lambda: _place(orderd, customer, pid, provider=provider,
                                      payment_method="pm_card_visa"), INVALID)
    assert "payment_method" in violation_fields(err)
    assert orderd.list_all(customer) == []


# ---------------------------------------------------------------------------------------
# Stripe: CancelOrder


def test_stripe_cancel_unpaid_voids_the_intent(orderd, customer):
    pid = _product(orderd, 1000)
    r = _place(orderd, customer, pid)
    o = _cancel(orderd, customer, r.order.order_id)
    assert o.status == pb.ORDER_STATUS_CANCELLED
    assert o.payment.status == pb.PAYMENT_STATUS_VOIDED
    assert o.payment.refund_id == ""
    pi = _obj(orderd.stripe, r.payment.reference)
    assert pi["status"] == "canceled"
    assert pi["latest_charge"] is None
    assert orderd.get(customer, o.order_id) == o


def test_stripe_cancel_paid_refunds_once(orderd, customer):
    pid = _product(orderd, 1000)
    r = _place(orderd, customer, pid, qty=3)
    ref = r.payment.reference
    orderd.stripe.control("/_fake/pay", {"id": ref})
    paid = _confirm(orderd, customer, r.order.order_id, ref)
    assert paid.status == pb.ORDER_STATUS_PAID

    o = _cancel(orderd, customer, paid.order_id)
    assert o.status == pb.ORDER_STATUS_CANCELLED
    assert o.payment.status == pb.PAYMENT_STATUS_REFUNDED
    assert o.payment.refund_id.startswith("re_")
    assert o.payment.HasField("refunded_at")
    assert o.payment.refunded_at.ToNanoseconds() >= paid.payment.paid_at.ToNanoseconds()
    assert o.payment.charge_id == paid.payment.charge_id
    assert o.version == paid.version + 2
    assert orderd.get(customer, o.order_id) == o

    refunds = _stripe_refunds(orderd, ref)
    assert len(refunds) == 1, refunds
    key = refunds[0]["headers"].get("idempotency-key")
    assert key and key != _pi_creates(orderd, o.order_id)[0]["headers"]["idempotency-key"]
    re_ = _obj(orderd.stripe, o.payment.refund_id)
    assert re_["payment_intent"] == ref and re_["amount"] == o.total_minor
    ch = _obj(orderd.stripe, paid.payment.charge_id)
    assert ch["refunded"] is True and ch["amount_refunded"] == o.total_minor

    again = _cancel(orderd, customer, o.order_id, "again")
    assert again == o
    assert _refund_keys_answered(_stripe_refunds(orderd, ref)) == {key}
    assert _obj(orderd.stripe, paid.payment.charge_id)["amount_refunded"] == o.total_minor


# ---------------------------------------------------------------------------------------
# Stripe: the provider fails


def test_stripe_down_place_is_unavailable_then_a_retry_completes(orderd, customer):
    pid = _product(orderd, 1000)
    rid = e2e.unique("req")
    with _failing(orderd.stripe, "500", 1000, path="/v1/payment_intents", method="POST"):
        err = expect_error(lambda: _place(orderd, customer, pid, request_id=rid), UNAVAILABLE)
        assert "stripe" in err.details().lower(), err.details()
        # The order exists meanwhile, PENDING, without a payment reference.
        half = _only_order(orderd, customer)
        assert half.status == pb.ORDER_STATUS_PENDING
        assert half.payment.reference == ""
        attempts = [x for x in _requests(orderd.stripe, "/v1/payment_intents")
                    if x["path"] == "/v1/payment_intents" and _form_order_id(x) == half.order_id]
        assert attempts and all(x["injected"] == "500" for x in attempts)
        assert len({x["headers"]["idempotency-key"] for x in attempts}) == 1

    r = _place(orderd, customer, pid, request_id=rid)
    assert r.order.order_id == half.order_id
    assert r.order.status == pb.ORDER_STATUS_PENDING
    assert r.payment.reference.startswith("pi_")
    assert r.order.payment.reference == r.payment.reference
    assert r.order.payment.status == pb.PAYMENT_STATUS_PENDING
    creates = _pi_creates(orderd, half.order_id)
    assert [x["status"] for x in creates if not x["injected"]] == [200]
    assert len({x["headers"]["idempotency-key"] for x in creates}) == 1
    assert _only_order(orderd, customer).order_id == half.order_id
    assert orderd.get(customer, half.order_id) == r.order


def test_stripe_rate_limited_twice_then_ok(orderd, customer):
    """429 twice, then OK: orderd retries (payments.max_attempts = 3) with the same
    Idempotency-Key, and the caller sees success."""
    pid = _product(orderd, 1000)
    with _failing(orderd.stripe, "429", 2, path="/v1/payment_intents", method="POST"):
        r = _place(orderd, customer, pid)
    assert r.payment.reference.startswith("pi_")
    creates = _pi_creates(orderd, r.order.order_id)
    statuses = [x["status"] for x in creates]
    assert statuses[-1] == 200 and all(s == 429 for s in statuses[:-1]), statuses
    assert 2 <= len(creates) <= 3, statuses  # the sweeper may have met one injected 429
    keys = {x["headers"]["idempotency-key"] for x in creates}
    assert len(keys) == 1, keys


def test_stripe_refund_down_cancel_is_unavailable_then_a_retry_refunds_once(orderd, customer):
    pid = _product(orderd, 1000)
    r = _place(orderd, customer, pid)
    ref = r.payment.reference
    orderd.stripe.control("/_fake/pay", {"id": ref})
    paid = _confirm(orderd, customer, r.order.order_id, ref)
    with _failing(orderd.stripe, "500", 1000, path="/v1/refunds"):
        expect_error(lambda: _cancel(orderd, customer, paid.order_id), UNAVAILABLE)
        mid = orderd.get(customer, paid.order_id)
        # Cancelled, the money not yet back: the retry (or the sweeper) owes the refund.
        assert mid.status == pb.ORDER_STATUS_CANCELLED
        assert mid.payment.status == pb.PAYMENT_STATUS_SUCCEEDED
        assert all(x["injected"] == "500" for x in _stripe_refunds(orderd, ref))
    o = _cancel(orderd, customer, paid.order_id)
    assert o.status == pb.ORDER_STATUS_CANCELLED
    assert o.payment.status == pb.PAYMENT_STATUS_REFUNDED
    assert o.payment.refund_id.startswith("re_")
    ok = [x for x in _stripe_refunds(orderd, ref) if not x["injected"]]
    assert len(ok) == 1 and ok[0]["status"] == 200
    assert len({x["headers"]["idempotency-key"] for x in _stripe_refunds(orderd, ref)}) == 1
    assert _obj(orderd.stripe, paid.payment.charge_id)["amount_refunded"] == o.total_minor
    again = _cancel(orderd, customer, paid.order_id)
    assert again == o
    assert _refund_keys_answered(_stripe_refunds(orderd, ref)) == {ok[0]["headers"][
        "idempotency-key"]}
    assert _obj(orderd.stripe, paid.payment.charge_id)["amount_refunded"] == o.total_minor


def test_stripe_slower_than_the_timeout_creates_one_payment_intent(orderd, customer):
    """Stripe takes longer than payments.timeout (3 s) to create the PaymentIntent: orderd
    gives up on the attempt and retries under the same Idempotency-Key, which Stripe
    answers 409 while the first is still running. Whatever the caller got, retrying the
    same request ends with the one PaymentIntent Stripe created."""
    pid = _product(orderd, 1000)
    rid = e2e.unique("req")
    with _failing(orderd.stripe, "slow", 1, path="/v1/payment_intents", method="POST",
                  seconds=4.5):
        try:
            first = _place(orderd, customer, pid, request_id=rid)
        except grpc.RpcError as e:
            assert e.code() in (UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), e
            first = None
    oid = _only_order(orderd, customer).order_id
    # The client retries the same request until it is answered (UNAVAILABLE means "try
    # again": Stripe answers 409 while its first request still holds the key).
    deadline = time.monotonic() + 20
    while True:
        try:
            r = _place(orderd, customer, pid, request_id=rid)
            break
        except grpc.RpcError as e:
            assert e.code() == UNAVAILABLE and time.monotonic() < deadline, e
            time.sleep(0.5)
    assert r.order.order_id == oid
    assert r.payment.reference.startswith("pi_")
    if first is not None:
        assert first.payment.reference == r.payment.reference
    creates = _pi_creates(orderd, oid)
    assert len({x["headers"]["idempotency-key"] for x in creates}) == 1, creates
    pi = _obj(orderd.stripe, r.payment.reference)
    assert pi["metadata"]["order_id"] == oid
    assert orderd.get(customer, oid).payment.reference == r.payment.reference


def test_paypal_down_place_is_unavailable_then_a_retry_completes(orderd, customer):
    pid = _product(orderd, 1000)
    rid = e2e.unique("req")
    with _failing(orderd.paypal, "500", 1000, path="/v2/checkout/orders", method="POST"):
        expect_error(lambda: _place(orderd, customer, pid, provider=PAYPAL, request_id=rid),
                     UNAVAILABLE)
        half = _only_order(orderd, customer)
        assert half.status == pb.ORDER_STATUS_PENDING and half.payment.reference == ""
    r = _place(orderd, customer, pid, provider=PAYPAL, request_id=rid)
    assert r.order.order_id == half.order_id
    assert r.payment.reference and r.payment.approval_url.endswith(r.payment.reference)
    creates = [x for x in _paypal_reqs(orderd, "/v2/checkout/orders")
               if x["path"] == "/v2/checkout/orders"
               and json.loads(x["body"])["purchase_units"][0].get("custom_id") == half.order_id]
    assert [x["status"] for x in creates if not x["injected"]] == [201], creates
    assert len({x["headers"]["paypal-request-id"] for x in creates}) == 1


# ---------------------------------------------------------------------------------------
# Stripe: ConfirmPayment racing CancelOrder


def _settled(o):
    """True once the order's payment is in a final state for its order status."""
    if o.status == pb.ORDER_STATUS_PAID:
        return o.payment.status == pb.PAYMENT_STATUS_SUCCEEDED
    if o.status == pb.ORDER_STATUS_CANCELLED:
        return o.payment.status in (pb.PAYMENT_STATUS_REFUNDED, pb.PAYMENT_STATUS_VOIDED)
    return False


def _check_race_end_state(orderd, o, ref):
    pi = _obj(orderd.stripe, ref)
    charge = _obj(orderd.stripe, pi["latest_charge"]) if pi["latest_charge"] else None
    refunded = charge["amount_refunded"] if charge else 0
    answered = _refund_keys_answered(_stripe_refunds(orderd, ref))
    where = "order %s: %s / %s, PI %s, refunded %d, refund keys %s" % (
        o.order_id, pb.OrderStatus.Name(o.status), pb.PaymentStatus.Name(o.payment.status),
        pi["status"], refunded, answered)
    if o.status == pb.ORDER_STATUS_PAID:
        assert o.payment.status == pb.PAYMENT_STATUS_SUCCEEDED, where
        assert pi["status"] == "succeeded" and refunded == 0 and not answered, where
    elif o.status == pb.ORDER_STATUS_CANCELLED and o.payment.status == pb.PAYMENT_STATUS_REFUNDED:
        assert pi["status"] == "succeeded" and refunded == o.total_minor, where
        assert len(answered) == 1, where
        assert o.payment.refund_id.startswith("re_"), where
        assert _obj(orderd.stripe, o.payment.refund_id)["payment_intent"] == ref, where
    elif o.status == pb.ORDER_STATUS_CANCELLED and o.payment.status == pb.PAYMENT_STATUS_VOIDED:
        assert pi["status"] == "canceled" and charge is None, where
    else:
        raise AssertionError("inconsistent end state: " + where)


def _race_pairs(orderd, placed, confirm, cancel):
    """Runs, for every placed order, its confirmation and its cancellation at once, one
    of them held back by 0 to 9 ms (the two sides alternating), so that the pairs
    together cover the window where the two calls overlap. Returns
    [((confirm result, error), (cancel result, error))]."""
    def later(fn, delay):
        def run():
            time.sleep(delay)
            return fn()
        return run

    out = []
    for i, (c, r) in enumerate(placed):
        delay = (i // 2 % 10) / 1000.0
        a = lambda c=c, r=r: confirm(c, r)  # noqa: E731
        b = lambda c=c, r=r: cancel(c, r)  # noqa: E731
        if i % 2:
            a = later(a, delay)
        else:
            b = later(b, delay)
        out.append(tuple(e2e.call_all([a, b])))
    return out


def test_stripe_confirm_racing_cancel_ends_consistent(orderd):
    """A PaymentIntent the customer has paid; ConfirmPayment and CancelOrder arrive
    together. Whoever wins, the end is one of: PAID (payment SUCCEEDED, nothing refunded),
    CANCELLED with the payment REFUNDED exactly once, or CANCELLED with the payment VOIDED
    and never charged. Never both, never neither."""
    pid = _product(orderd, 1000)
    placed = []
    for _ in range(20):
        c = orderd.customer()
        r = _place(orderd, c, pid)
        orderd.stripe.control("/_fake/pay", {"id": r.payment.reference})
        placed.append((c, r))
    results = _race_pairs(
        orderd, placed,
        lambda c, r: _confirm(orderd, c, r.order.order_id, r.payment.reference),
        lambda c, r: _cancel(orderd, c, r.order.order_id, "race"))
    problems = []
    for (c, r), ((conf, conf_err), (canc, canc_err)) in zip(placed, results):
        # PENDING and PAID orders may both be cancelled: the cancel always succeeds.
        if canc_err is not None:
            problems.append("cancel of %s failed: %s %s" % (
                r.order.order_id, canc_err.code(), canc_err.details()))
        elif canc.status != pb.ORDER_STATUS_CANCELLED:
            problems.append("cancel of %s answered %s" % (
                r.order.order_id, pb.OrderStatus.Name(canc.status)))
        if conf_err is not None and conf_err.code() != PRECONDITION:
            problems.append("confirm of %s failed: %s %s" % (
                r.order.order_id, conf_err.code(), conf_err.details()))
        o = _poll(lambda: orderd.get(c, r.order.order_id), _settled, timeout=60)
        try:
            _check_race_end_state(orderd, o, r.payment.reference)
        except AssertionError as e:
            problems.append(str(e))
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------
# PayPal


def test_paypal_place_confirm_and_cancel(orderd, customer):
    pid = _product(orderd, 2000)
    grants_before = orderd.paypal.control("/_fake/stats")["token_grants"]
    r = _place(orderd, customer, pid, provider=PAYPAL)
    o, ref = r.order, r.payment.reference
    assert o.total_minor == 2165
    assert o.status == pb.ORDER_STATUS_PENDING
    assert o.payment.provider == PAYPAL and o.payment.reference == ref
    assert r.payment.provider == PAYPAL
    assert r.payment.client_secret == ""
    assert r.payment.approval_url == "https://www.sandbox.paypal.com/checkoutnow?token=" + ref

    creates = [x for x in _paypal_reqs(orderd, "/v2/checkout/orders")
               if x["path"] == "/v2/checkout/orders"
               and json.loads(x["body"])["purchase_units"][0].get("custom_id") == o.order_id]
    assert len(creates) == 1, creates
    body = json.loads(creates[0]["body"])
    assert body["intent"] == "CAPTURE"
    unit = body["purchase_units"][0]
    assert unit["amount"] == {"currency_code": "EUR", "value": "21.65"}
    assert unit["custom_id"] == o.order_id
    assert creates[0]["headers"].get("paypal-request-id"), creates[0]["headers"]
    assert creates[0]["headers"]["content-type"].startswith("application/json")
    pp = _obj(orderd.paypal, ref)
    assert pp["intent"] == "CAPTURE"
    assert pp["purchase_units"][0]["amount"] == {"currency_code": "EUR", "value": "21.65"}

    err = expect_error(lambda: _confirm(orderd, customer, o.order_id, ref, PAYPAL), PRECONDITION)
    reason, meta = _meta(err)
    assert reason == "PAYMENT_NOT_SUCCEEDED"
    assert meta.get("provider_status") == "ORDER_NOT_APPROVED", meta
    assert orderd.get(customer, o.order_id).status == pb.ORDER_STATUS_PENDING

    orderd.paypal.control("/_fake/pay", {"id": ref})
    paid = _confirm(orderd, customer, o.order_id, ref, PAYPAL)
    assert paid.status == pb.ORDER_STATUS_PAID
    assert paid.payment.status == pb.PAYMENT_STATUS_SUCCEEDED
    cap = _obj(orderd.paypal, paid.payment.charge_id)
    assert cap["status"] == "COMPLETED"
    assert cap["supplementary_data"]["related_ids"]["order_id"] == ref
    assert cap["custom_id"] == o.order_id
    assert paid.payment.HasField("paid_at")
    assert orderd.get(customer, o.order_id) == paid
    assert _confirm(orderd, customer, o.order_id, ref, PAYPAL) == paid

    cancelled = _cancel(orderd, customer, o.order_id)
    assert cancelled.status == pb.ORDER_STATUS_CANCELLED
    assert cancelled.payment.status == pb.PAYMENT_STATUS_REFUNDED
    assert cancelled.payment.refund_id
    assert cancelled.payment.HasField("refunded_at")
    refund_path = "/v2/payments/captures/%s/refund" % paid.payment.charge_id
    made = [x for x in _paypal_reqs(orderd, refund_path) if x["status"] == 201]
    assert len(made) == 1, made
    assert made[0]["headers"].get("paypal-request-id")
    assert _obj(orderd.paypal, paid.payment.charge_id)["status"] == "REFUNDED"
    assert _obj(orderd.paypal, cancelled.payment.refund_id)["amount"]["value"] == "21.65"
    assert _cancel(orderd, customer, o.order_id) == cancelled
    assert len([x for x in _paypal_reqs(orderd, refund_path) if x["status"] == 201]) == 1

    # One OAuth token served every call above (at most one grant, when the cached token
    # of earlier tests was not there yet); every API call carried the same Bearer token.
    grants_after = orderd.paypal.control("/_fake/stats")["token_grants"]
    assert grants_after - grants_before <= 1, (grants_before, grants_after)
    mine = [x for x in _requests(orderd.paypal)
            if ref in x["path"] or paid.payment.charge_id in x["path"]
            or x in creates]
    tokens = {x["headers"].get("authorization") for x in mine}
    assert len(tokens) == 1 and next(iter(tokens)).startswith("Bearer "), tokens


def test_paypal_one_token_for_many_calls(orderd, customer):
    pid = _product(orderd, 1000)
    _place(orderd, customer, pid, provider=PAYPAL)  # a token is cached from here on
    before = orderd.paypal.control("/_fake/stats")["token_grants"]
    placed = [_place(orderd, customer, pid, provider=PAYPAL) for _ in range(4)]
    for r in placed:
        expect_error(lambda r=r: _confirm(orderd, customer, r.order.order_id,
                                          r.payment.reference, PAYPAL), PRECONDITION)
    assert orderd.paypal.control("/_fake/stats")["token_grants"] == before


def test_paypal_confirm_with_another_orders_approved_payment_captures_nothing(orderd, customer):
    """Confirming order A with order B's approved PayPal order is refused before PayPal is
    asked: asking would capture B's money through A."""
    pid = _product(orderd, 2000)
    a = _place(orderd, customer, pid, provider=PAYPAL)
    b = _place(orderd, customer, pid, provider=PAYPAL)
    orderd.paypal.control("/_fake/pay", {"id": b.payment.reference})
    err = expect_error(lambda: _confirm(orderd, customer, a.order.order_id, b.payment.reference,
                                        PAYPAL), PRECONDITION)
    assert _meta(err)[0] == "PAYMENT_REFERENCE_MISMATCH"
    assert _obj(orderd.paypal, b.payment.reference)["status"] == "APPROVED"  # not captured
    assert orderd.get(customer, a.order.order_id).status == pb.ORDER_STATUS_PENDING
    paid = _confirm(orderd, customer, b.order.order_id, b.payment.reference, PAYPAL)
    assert paid.status == pb.ORDER_STATUS_PAID


def test_paypal_capture_declined(orderd, customer):
    pid = _product(orderd, 2000)
    r = _place(orderd, customer, pid, provider=PAYPAL)
    ref = r.payment.reference
    orderd.paypal.control("/_fake/pay", {"id": ref})
    orderd.paypal.control("/_fake/capture_outcome", {"id": ref, "status": "DECLINED"})
    err = expect_error(lambda: _confirm(orderd, customer, r.order.order_id, ref, PAYPAL),
                       PRECONDITION)
    reason, meta = _meta(err)
    assert reason == "PAYMENT_DECLINED"
    assert meta.get("decline_code") == "INSTRUMENT_DECLINED", meta
    now = orderd.get(customer, r.order.order_id)
    assert now.status in (pb.ORDER_STATUS_PENDING, pb.ORDER_STATUS_FAILED)
    assert now.payment.status != pb.PAYMENT_STATUS_SUCCEEDED


def _paypal_view(orderd, ref):
    """The PayPal order as PayPal's API shows it (with its captures and refunds), read
    with a token of the test's own."""
    cred = base64.b64encode(("%s:%s" % (PAYPAL_CLIENT_ID, PAYPAL_SECRET)).encode()).decode()
    req = urllib.request.Request(orderd.paypal.base + "/v1/oauth2/token",
                                 data=b"grant_type=client_credentials", method="POST",
                                 headers={"Authorization": "Basic " + cred, "Content-Type":
                                          "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(req, timeout=30) as r:
        tok = json.loads(r.read())["access_token"]
    req = urllib.request.Request(orderd.paypal.base + "/v2/checkout/orders/" + ref,
                                 headers={"Authorization": "Bearer " + tok})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _paypal_money(orderd, r):
    """(capture status or None, refunds) of an order's PayPal order, as PayPal shows it."""
    view = _paypal_view(orderd, r.payment.reference)
    pay = view["purchase_units"][0].get("payments") or {}
    caps = pay.get("captures", [])
    return (caps[0]["status"] if caps else None), pay.get("refunds", [])


def _paypal_race(orderd, refunds_fail):
    pid = _product(orderd, 1000)
    placed = []
    for _ in range(20):
        c = orderd.customer()
        r = _place(orderd, c, pid, provider=PAYPAL)
        orderd.paypal.control("/_fake/pay", {"id": r.payment.reference})  # approved
        placed.append((c, r))
    race = lambda: _race_pairs(  # noqa: E731
        orderd, placed,
        lambda c, r: _confirm(orderd, c, r.order.order_id, r.payment.reference, PAYPAL),
        lambda c, r: _cancel(orderd, c, r.order.order_id, "race"))
    if refunds_fail:
        with _failing(orderd.paypal, "500", 100000, path="/refund"):
            results = race()
        # PayPal is back: a customer retries the cancel, which finishes what is owed.
        for c, r in placed:
            try:
                _cancel(orderd, c, r.order.order_id, "race")
            except grpc.RpcError as e:
                assert e.code() == PRECONDITION, e  # paid and not cancelled: no retry owed
    else:
        results = race()
    problems = []
    for (c, r), (_, (canc, canc_err)) in zip(placed, results):
        if canc_err is not None and not refunds_fail:
            problems.append("cancel of %s failed: %s %s" % (
                r.order.order_id, canc_err.code(), canc_err.details()))
        o = _poll(lambda: orderd.get(c, r.order.order_id), _settled, timeout=5)
        cap, refunds = _paypal_money(orderd, r)
        where = "order %s (v%d): %s / %s (charge_id %r, refund_id %r); at PayPal: capture %s, " \
            "%d refund(s)" % (o.order_id, o.version, pb.OrderStatus.Name(o.status),
                              pb.PaymentStatus.Name(o.payment.status), o.payment.charge_id,
                              o.payment.refund_id, cap, len(refunds))
        if o.status == pb.ORDER_STATUS_PAID:
            ok = o.payment.status == pb.PAYMENT_STATUS_SUCCEEDED and cap == "COMPLETED" \
                and not refunds
        elif o.payment.status == pb.PAYMENT_STATUS_REFUNDED:
            ok = o.status == pb.ORDER_STATUS_CANCELLED and cap == "REFUNDED" \
                and len(refunds) == 1 and o.payment.refund_id == refunds[0]["id"]
        elif o.payment.status == pb.PAYMENT_STATUS_VOIDED:
            ok = o.status == pb.ORDER_STATUS_CANCELLED and cap is None
        else:
            ok = False
        if not ok:
            problems.append("inconsistent end state: " + where)
    assert not problems, "%d of %d orders:\n%s" % (len(problems), len(placed),
                                                   "\n".join(problems))


def test_paypal_confirm_racing_cancel_ends_consistent(orderd):
    """An approved PayPal order; ConfirmPayment (which captures) and CancelOrder arrive
    together. The order must end as the money did: PAID and captured, CANCELLED and
    REFUNDED (the capture refunded once), or CANCELLED and VOIDED with nothing captured."""
    _paypal_race(orderd, refunds_fail=False)


def test_paypal_confirm_racing_cancel_while_refunds_fail(orderd):
    """As above, while PayPal's refund endpoint fails: a capture taken by the losing
    confirmation cannot be refunded at once. Once PayPal is back, a retried cancel must
    refund it: no order may end CANCELLED with its money captured and kept."""
    _paypal_race(orderd, refunds_fail=True)


# ---- money that must not be taken ----------------------------------------------------

def _cancel_while_paypal_is_down(orderd, customer, oid, ref):
    """CancelOrder while PayPal cannot be read: the order is CANCELLED, its void unfinished."""
    with _failing(orderd.paypal, "500", 1000, path="/v2/checkout/orders/" + ref, method="GET"):
        expect_error(lambda: _cancel(orderd, customer, oid), grpc.StatusCode.UNAVAILABLE)
    o = orderd.get(customer, oid)
    assert o.status == pb.ORDER_STATUS_CANCELLED
    assert o.payment.status == pb.PAYMENT_STATUS_PENDING


def _captured(orderd, ref):
    return [x for x in _paypal_reqs(orderd, ref + "/capture") if x["status"] in (200, 201)]


def test_confirm_on_a_cancelled_paypal_order_voids_and_never_captures(orderd, customer):
    """For PayPal, verifying is capturing: on an order that is over, orderd must not charge
    the payer (and then refund); it closes the payment instead."""
    pid = _product(orderd, 2000)
    r = _place(orderd, customer, pid, provider=PAYPAL)
    oid, ref = r.order.order_id, r.payment.reference
    _cancel_while_paypal_is_down(orderd, customer, oid, ref)
    orderd.paypal.control("/_fake/pay", {"id": ref})  # the payer approves afterwards
    err = expect_error(lambda: _confirm(orderd, customer, oid, ref, PAYPAL),
                       grpc.StatusCode.FAILED_PRECONDITION)
    assert "CANCELLED" in err.details()
    assert not _captured(orderd, ref), "orderd captured the payer's money for a CANCELLED order"
    assert _obj(orderd.paypal, ref)["status"] == "APPROVED"
    assert orderd.get(customer, oid).payment.status == pb.PAYMENT_STATUS_VOIDED


def test_a_cancelled_order_cannot_capture_another_orders_paypal_payment(orderd, customer):
    pid = _product(orderd, 2000)
    a = _place(orderd, customer, pid, provider=PAYPAL)
    b = _place(orderd, orderd.customer(), pid, provider=PAYPAL)
    _cancel_while_paypal_is_down(orderd, customer, a.order.order_id, a.payment.reference)
    orderd.paypal.control("/_fake/pay", {"id": b.payment.reference})
    err = expect_error(lambda: _confirm(orderd, customer, a.order.order_id, b.payment.reference, PAYPAL),
                       grpc.StatusCode.FAILED_PRECONDITION)
    assert detail(err, "ErrorInfo").reason == "PAYMENT_REFERENCE_MISMATCH"
    assert _obj(orderd.paypal, b.payment.reference)["status"] == "APPROVED"
    assert not _captured(orderd, b.payment.reference)


def test_an_order_without_a_reference_cannot_capture_another_orders_paypal_payment(orderd, customer):
    """PlaceOrder's create failed (PayPal down), so the order has no reference to compare:
    PayPal's own custom_id is checked before anything is captured."""
    pid = _product(orderd, 2000)
    with _failing(orderd.paypal, "500", 1000, path="/v2/checkout/orders", method="POST"):
        expect_error(lambda: _place(orderd, customer, pid, provider=PAYPAL), grpc.StatusCode.UNAVAILABLE)
    [a] = orderd.list_all(customer)
    assert a.status == pb.ORDER_STATUS_PENDING and not a.payment.reference
    b = _place(orderd, orderd.customer(), pid, provider=PAYPAL)
    orderd.paypal.control("/_fake/pay", {"id": b.payment.reference})
    err = expect_error(lambda: _confirm(orderd, customer, a.order_id, b.payment.reference, PAYPAL),
                       grpc.StatusCode.FAILED_PRECONDITION)
    assert detail(err, "ErrorInfo").reason == "PAYMENT_MISMATCH"
    assert _obj(orderd.paypal, b.payment.reference)["status"] == "APPROVED"
    assert not _captured(orderd, b.payment.reference)


def test_an_amount_stripe_refuses_fails_the_order_instead_of_leaving_it_pending(orderd, customer):
    pid = _product(orderd, 10)  # EUR 0.10 (+ tax): below Stripe's minimum charge
    rid = "small-" + uuid.uuid4().hex
    for _ in range(2):  # a retry of the request answers the same
        err = expect_error(lambda: _place(orderd, customer, pid, provider=STRIPE, request_id=rid),
                           grpc.StatusCode.FAILED_PRECONDITION)
        assert _meta(err)[1].get("decline_code") == "amount_too_small"
    [o] = orderd.list_all(customer)
    assert o.status == pb.ORDER_STATUS_FAILED, pb.OrderStatus.Name(o.status)


# ---- totals a provider cannot take ----------------------------------------------------

@pytest.mark.parametrize("cur,price,provider", [
    ("KWD", 1000, STRIPE),   # total 1083: Stripe takes KWD only in multiples of 10 fils
    ("BHD", 2000, STRIPE),
    ("MGA", 1050, STRIPE),   # Stripe: whole ariary only
    ("HUF", 1050, PAYPAL),   # PayPal: no fillér
    ("KWD", 1000, PAYPAL),   # PayPal: CURRENCY_NOT_SUPPORTED
])
def test_unrepresentable_total_fails_the_order(orderd, customer, cur, price, provider):
    pid = _product(orderd, price, cur)
    rid = e2e.unique("req")
    for _ in range(2):
        err = expect_error(lambda: _place(orderd, customer, pid, provider=provider,
                                          request_id=rid), grpc.StatusCode.FAILED_PRECONDITION)
        reason, meta = _meta(err)
        assert reason == "PAYMENT_DECLINED", (reason, err.details())
        assert meta.get("decline_code") == "amount_not_representable", meta
        o = _only_order(orderd, customer)
        assert o.status == pb.ORDER_STATUS_FAILED, pb.OrderStatus.Name(o.status)


# ---- a saved card charged, its answer lost ---------------------------------------------

def test_a_charge_whose_answer_is_lost_is_refunded_when_the_order_is_cancelled(orderd, customer):
    """The card is charged while the caller's deadline runs out: the order already keeps
    the intent (created before any money moved), so cancelling gives the money back."""
    pid = _product(orderd, 1800)
    rid = "lost-" + uuid.uuid4().hex
    req = orderd.place_request([(pid, 1)], request_id=rid, provider=STRIPE)
    req.payment_method = "pm_card_visa"
    with _failing(orderd.stripe, "slow", 1, path="/confirm", seconds=2):
        expect_error(lambda: orderd.call("PlaceOrder", req, customer, timeout=1.0),
                     grpc.StatusCode.DEADLINE_EXCEEDED)
        time.sleep(2.5)  # the fake finishes the charge it was slow with
    [o] = orderd.list_all(customer)
    assert o.status == pb.ORDER_STATUS_PENDING and o.payment.reference.startswith("pi_")
    pi = _obj(orderd.stripe, o.payment.reference)
    assert pi["status"] == "succeeded"  # the money was taken

    got = _cancel(orderd, customer, o.order_id)
    assert got.status == pb.ORDER_STATUS_CANCELLED
    assert got.payment.status == pb.PAYMENT_STATUS_REFUNDED
    refunds = [r for r in _stripe_refunds(orderd, pi["id"]) if r["status"] == 200]
    assert len(refunds) == 1
