"""Payment-provider webhooks on orderd's HTTP side port (POST /webhooks/stripe and
/webhooks/paypal), with events built and signed by the local fakes (tests/fakes), plus
GET /healthz and GET /metrics.

What is asserted is what a customer or an operator would notice: the order's status and
payment as GetOrder shows them, the money at the (fake) provider, and the HTTP answer the
provider gets (2xx ends a delivery, anything else makes the provider deliver again).
"""

import base64
import contextlib
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import grpc

import orderd_e2e as e2e
from conftest import PAYPAL_CLIENT_ID, PAYPAL_SECRET, STRIPE_KEY, STRIPE_WEBHOOK_SECRET
from orderd_e2e import pb, expect_error, detail

sys.path.insert(0, os.path.join(e2e.REPO, "tests", "fakes"))
from fake_stripe import sign as stripe_sign  # noqa: E402

STRIPE = pb.PAYMENT_PROVIDER_STRIPE
PAYPAL = pb.PAYMENT_PROVIDER_PAYPAL
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

# ---------------------------------------------------------------------------------------
# helpers


def _http(method, url, body=None, headers=None, timeout=30):
    """(status, headers, body bytes) of one HTTP request; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _stripe_post(orderd, body, signature):
    if isinstance(body, str):
        body = body.encode()
    hdrs = {"Content-Type": "application/json"}
    if signature is not None:
        hdrs["Stripe-Signature"] = signature
    return _http("POST", orderd.http_base + "/webhooks/stripe", body, hdrs)


def _stripe_event(orderd, typ, oid, **kw):
    """A Stripe event built by the fake from the object's current state, signed with the
    session's endpoint secret: {"body", "signature", "id", "timestamp"}."""
    req = {"type": typ, "id": oid, "secret": STRIPE_WEBHOOK_SECRET}
    req.update(kw)
    return orderd.stripe.control("/_fake/event", req)


def _deliver_stripe(orderd, ev):
    status, _, body = _stripe_post(orderd, ev["body"], ev["signature"])
    return status, body


def _paypal_event(orderd, typ, oid, **kw):
    req = {"type": typ, "id": oid}
    req.update(kw)
    return orderd.paypal.control("/_fake/event", req)


def _deliver_paypal(orderd, ev):
    hdrs = {"Content-Type": "application/json"}
    hdrs.update(ev["headers"])
    status, _, body = _http("POST", orderd.http_base + "/webhooks/paypal", ev["body"].encode(),
                            hdrs)
    return status, body


def _stripe_api(orderd, method, path, form=None):
    """Calls the fake Stripe API directly, as the merchant's dashboard would."""
    data = urllib.parse.urlencode(form or {}).encode() if method == "POST" else None
    hdrs = {"Authorization": "Bearer " + STRIPE_KEY,
            "Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = _http(method, orderd.stripe.base + path, data, hdrs)
    assert status == 200, (status, body)
    return json.loads(body)


def _obj(fake, oid):
    return fake.control("/_fake/objects/" + urllib.parse.quote(oid))


def _product(orderd, price, currency="EUR"):
    pid = "e2e-%s-wh-%s" % (orderd.run, uuid.uuid4().hex[:10])
    return orderd.upsert(pid, "Webhook test item", price, currency).product_id


def _place(orderd, caller, provider=STRIPE, price=1000, qty=1):
    req = orderd.place_request([(_product(orderd, price), qty)], provider=provider)
    return orderd.call("PlaceOrder", req, caller)


def _confirm(orderd, caller, order_id, reference, provider=STRIPE):
    return orderd.call("ConfirmPayment", pb.ConfirmPaymentRequest(
        order_id=order_id, provider=provider, payment_reference=reference), caller)


def _cancel(orderd, caller, order_id, reason="changed my mind"):
    return orderd.call("CancelOrder", pb.CancelOrderRequest(order_id=order_id, reason=reason),
                       caller)


@contextlib.contextmanager
def _failing(fake, mode, count, path=None, method=None):
    body = {"mode": mode, "count": count}
    if path:
        body["path"] = path
    if method:
        body["method"] = method
    fake.control("/_fake/fail", body)
    try:
        yield
    finally:
        fake.control("/_fake/fail", method="DELETE")


def _poll(fn, ok, timeout=10.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        r = fn()
        if ok(r) or time.monotonic() >= deadline:
            return r
        time.sleep(interval)


def _stripe_refund_requests(orderd, pi_id):
    return [r for r in orderd.stripe.control("/_fake/requests?path=/v1/refunds")
            if r["method"] == "POST" and r["form"].get("payment_intent") == pi_id]


def _metrics(orderd):
    status, hdrs, body = _http("GET", orderd.http_base + "/metrics")
    assert status == 200, (status, body)
    return body.decode()


def _sample(text, name, **labels):
    """The value of one Prometheus sample (labels in any order), or None."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    return None


def _webhook_count(orderd, provider, result):
    v = _sample(_metrics(orderd), "orderd_webhooks_total", provider=provider, result=result)
    assert v is not None, "no orderd_webhooks_total{provider=%s,result=%s}" % (provider, result)
    return v


# ---------------------------------------------------------------------------------------
# Stripe: payment_intent.succeeded


def test_stripe_succeeded_webhook_marks_the_order_paid(orderd, customer):
    r = _place(orderd, customer, qty=2)
    oid, ref = r.order.order_id, r.payment.reference
    pi = orderd.stripe.control("/_fake/pay", {"id": ref})
    ev = _stripe_event(orderd, "payment_intent.succeeded", ref)

    status, body = _deliver_stripe(orderd, ev)
    assert status == 200, body
    o = orderd.get(customer, oid)
    assert o.status == pb.ORDER_STATUS_PAID
    assert o.payment.status == pb.PAYMENT_STATUS_SUCCEEDED
    assert o.payment.charge_id == pi["latest_charge"]
    assert o.payment.HasField("paid_at")
    assert o.version == r.order.version + 1

    # Delivered again (Stripe retries until it sees a 2xx), byte for byte or re-signed with
    # a fresh timestamp as Stripe does: acknowledged, nothing changes.
    status, body = _deliver_stripe(orderd, ev)
    assert status == 200, body
    t = int(time.time())
    status, _, body = _stripe_post(orderd, ev["body"], stripe_sign(STRIPE_WEBHOOK_SECRET,
                                                                   ev["body"], t))
    assert status == 200, body
    assert orderd.get(customer, oid) == o

    # ConfirmPayment afterwards is the no-op it always is on a paid order.
    assert _confirm(orderd, customer, oid, ref) == o


def test_stripe_webhook_with_a_bad_signature_is_refused(orderd, customer):
    r = _place(orderd, customer)
    oid, ref = r.order.order_id, r.payment.reference
    orderd.stripe.control("/_fake/pay", {"id": ref})
    before = _webhook_count(orderd, "stripe", "bad_signature")

    ev = _stripe_event(orderd, "payment_intent.succeeded", ref, tamper=True)
    status, body = _deliver_stripe(orderd, ev)
    assert status == 400, body
    assert b"whsec" not in body and b"v1=" not in body
    # No signature at all, and a signature that is not hex of the right length.
    assert _stripe_post(orderd, ev["body"], None)[0] == 400
    assert _stripe_post(orderd, ev["body"], "t=%d,v1=abc" % int(time.time()))[0] == 400
    assert _stripe_post(orderd, ev["body"], "garbage")[0] == 400

    now = orderd.get(customer, oid)
    assert now.status == pb.ORDER_STATUS_PENDING
    assert now.version == r.order.version
    assert _webhook_count(orderd, "stripe", "bad_signature") >= before + 4


def test_stripe_webhook_with_a_stale_timestamp_is_refused(orderd, customer):
    r = _place(orderd, customer)
    ref = r.payment.reference
    orderd.stripe.control("/_fake/pay", {"id": ref})
    stale = _stripe_event(orderd, "payment_intent.succeeded", ref,
                          timestamp=int(time.time()) - 400)
    status, body = _deliver_stripe(orderd, stale)
    assert status == 400, body
    future = _stripe_event(orderd, "payment_intent.succeeded", ref,
                           timestamp=int(time.time()) + 400)
    assert _deliver_stripe(orderd, future)[0] == 400
    assert orderd.get(customer, r.order.order_id).status == pb.ORDER_STATUS_PENDING
    # Within the tolerance it is accepted.
    fresh = _stripe_event(orderd, "payment_intent.succeeded", ref,
                          timestamp=int(time.time()) - 200)
    assert _deliver_stripe(orderd, fresh)[0] == 200
    assert orderd.get(customer, r.order.order_id).status == pb.ORDER_STATUS_PAID


def test_stripe_webhook_with_a_tampered_body_is_refused(orderd, customer):
    r = _place(orderd, customer)
    ref = r.payment.reference
    orderd.stripe.control("/_fake/pay", {"id": ref})
    ev = _stripe_event(orderd, "payment_intent.succeeded", ref)
    other = str(uuid.uuid4())
    tampered = ev["body"].replace(r.order.order_id, other)
    assert tampered != ev["body"]
    assert _stripe_post(orderd, tampered, ev["signature"])[0] == 400
    # One byte more (trailing whitespace) is another body too.
    assert _stripe_post(orderd, ev["body"] + "\n", ev["signature"])[0] == 400
    now = orderd.get(customer, r.order.order_id)
    assert now.status == pb.ORDER_STATUS_PENDING and now.version == r.order.version


def test_stripe_payment_after_cancel_is_refunded_automatically(orderd, customer):
    r = _place(orderd, customer, qty=3)
    oid, ref = r.order.order_id, r.payment.reference
    # The void at Stripe fails: the order is CANCELLED with its payment still PENDING.
    with _failing(orderd.stripe, "500", 1000, path="/v1/payment_intents/%s/cancel" % ref):
        expect_error(lambda: _cancel(orderd, customer, oid), UNAVAILABLE)
    mid = orderd.get(customer, oid)
    assert mid.status == pb.ORDER_STATUS_CANCELLED
    assert mid.payment.status == pb.PAYMENT_STATUS_PENDING
    # ...and the customer pays at Stripe anyway.
    pi = orderd.stripe.control("/_fake/pay", {"id": ref})
    ev = _stripe_event(orderd, "payment_intent.succeeded", ref)
    status, body = _deliver_stripe(orderd, ev)
    assert status == 200, body

    o = orderd.get(customer, oid)
    assert o.status == pb.ORDER_STATUS_CANCELLED
    assert o.payment.status == pb.PAYMENT_STATUS_REFUNDED, pb.PaymentStatus.Name(
        o.payment.status)
    assert o.payment.charge_id == pi["latest_charge"]
    assert o.payment.refund_id.startswith("re_")
    assert o.payment.HasField("refunded_at")
    ch = _obj(orderd.stripe, pi["latest_charge"])
    assert ch["refunded"] is True and ch["amount_refunded"] == o.total_minor
    made = {x["headers"].get("idempotency-key") for x in _stripe_refund_requests(orderd, ref)
            if x["status"] == 200}
    assert len(made) == 1, made

    # The same event again: acknowledged, nothing changes, no second refund.
    assert _deliver_stripe(orderd, ev)[0] == 200
    assert orderd.get(customer, oid) == o
    assert _obj(orderd.stripe, pi["latest_charge"])["amount_refunded"] == o.total_minor


def test_stripe_payment_failed_keeps_the_order_pending(orderd, customer):
    r = _place(orderd, customer)
    oid, ref = r.order.order_id, r.payment.reference
    orderd.stripe.control("/_fake/pay_failed", {"id": ref, "decline_code": "insufficient_funds"})
    ev = _stripe_event(orderd, "payment_intent.payment_failed", ref)
    assert _deliver_stripe(orderd, ev)[0] == 200
    now = orderd.get(customer, oid)
    assert now.status == pb.ORDER_STATUS_PENDING
    assert now.payment.status == pb.PAYMENT_STATUS_PENDING
    assert now.version == r.order.version
    # The payer tries again and succeeds.
    orderd.stripe.control("/_fake/pay", {"id": ref})
    assert _deliver_stripe(orderd, _stripe_event(orderd, "payment_intent.succeeded", ref))[0] == 200
    assert orderd.get(customer, oid).status == pb.ORDER_STATUS_PAID


def test_stripe_canceled_webhook_fails_a_pending_order(orderd, customer):
    r = _place(orderd, customer)
    oid, ref = r.order.order_id, r.payment.reference
    _stripe_api(orderd, "POST", "/v1/payment_intents/%s/cancel" % ref,
                {"cancellation_reason": "abandoned"})
    ev = _stripe_event(orderd, "payment_intent.canceled", ref)
    assert _deliver_stripe(orderd, ev)[0] == 200
    o = orderd.get(customer, oid)
    assert o.status == pb.ORDER_STATUS_FAILED
    assert o.payment.status == pb.PAYMENT_STATUS_VOIDED
    assert o.version == r.order.version + 1
    assert _deliver_stripe(orderd, ev)[0] == 200
    assert orderd.get(customer, oid) == o


def test_stripe_charge_refunded_at_the_provider(orderd, customer):
    r = _place(orderd, customer)
    oid, ref = r.order.order_id, r.payment.reference
    orderd.stripe.control("/_fake/pay", {"id": ref})
    paid = _confirm(orderd, customer, oid, ref)
    assert paid.status == pb.ORDER_STATUS_PAID
    # The merchant refunds in Stripe's dashboard; Stripe tells orderd.
    refund = _stripe_api(orderd, "POST", "/v1/refunds", {"payment_intent": ref})
    ev = _stripe_event(orderd, "charge.refunded", ref)
    assert _deliver_stripe(orderd, ev)[0] == 200
    o = orderd.get(customer, oid)
    # A full refund at the provider cancels an order that has not shipped: it is no
    # longer paid (stock goes back).
    assert o.status == pb.ORDER_STATUS_CANCELLED
    assert o.cancel_reason == "refunded at the payment provider"
    assert o.payment.status == pb.PAYMENT_STATUS_REFUNDED
    assert o.payment.HasField("refunded_at")
    assert o.payment.refund_id in ("", refund["id"])
    assert o.payment.charge_id == paid.payment.charge_id
    assert o.version > paid.version
    assert _deliver_stripe(orderd, ev)[0] == 200
    assert orderd.get(customer, oid) == o


def test_stripe_events_out_of_order_end_consistent(orderd, customer):
    """Paid, then refunded at the provider; Stripe delivers charge.refunded before
    payment_intent.succeeded. The order must not end up PAID with the money gone: in the
    end its payment shows REFUNDED (a webhook answered non-2xx is delivered again, as
    Stripe does)."""
    r = _place(orderd, customer)
    oid, ref = r.order.order_id, r.payment.reference
    orderd.stripe.control("/_fake/pay", {"id": ref})
    succeeded = _stripe_event(orderd, "payment_intent.succeeded", ref)
    _stripe_api(orderd, "POST", "/v1/refunds", {"payment_intent": ref})
    refunded = _stripe_event(orderd, "charge.refunded", ref)

    first, _ = _deliver_stripe(orderd, refunded)
    assert first in (200, 503), first
    assert _deliver_stripe(orderd, succeeded)[0] == 200
    if first != 200:
        assert _deliver_stripe(orderd, refunded)[0] == 200
    o = orderd.get(customer, oid)
    assert o.payment.status == pb.PAYMENT_STATUS_REFUNDED, (
        "refunded-then-succeeded left the order %s with payment %s, but Stripe refunded it "
        "(first delivery of charge.refunded answered %d)" % (
            pb.OrderStatus.Name(o.status), pb.PaymentStatus.Name(o.payment.status), first))
    assert o.status == pb.ORDER_STATUS_CANCELLED


def test_stripe_late_payment_whose_refund_fails_is_refunded_later(orderd, customer):
    """A payment succeeds after the order was cancelled and the automatic refund fails at
    that moment: the webhook is still acknowledged, the order shows the money held
    (CANCELLED, payment SUCCEEDED), and the refund happens later (the sweeper, after
    orders.settle_after; or the customer's retried cancel) exactly once."""
    r = _place(orderd, customer)
    oid, ref = r.order.order_id, r.payment.reference
    with _failing(orderd.stripe, "500", 1000, path="/v1/payment_intents/%s/cancel" % ref):
        expect_error(lambda: _cancel(orderd, customer, oid), UNAVAILABLE)
    orderd.stripe.control("/_fake/pay", {"id": ref})
    ev = _stripe_event(orderd, "payment_intent.succeeded", ref)
    with _failing(orderd.stripe, "500", 1000, path="/v1/refunds"):
        status, body = _deliver_stripe(orderd, ev)
        assert status == 200, body
        held = orderd.get(customer, oid)
        assert held.status == pb.ORDER_STATUS_CANCELLED
        assert held.payment.status == pb.PAYMENT_STATUS_SUCCEEDED
    # The sweeper settles it once orders.settle_after (30 s) has passed since the change.
    o = _poll(lambda: orderd.get(customer, oid),
              lambda o: o.payment.status == pb.PAYMENT_STATUS_REFUNDED, timeout=75, interval=1)
    assert o.payment.status == pb.PAYMENT_STATUS_REFUNDED, pb.PaymentStatus.Name(
        o.payment.status)
    assert o.status == pb.ORDER_STATUS_CANCELLED
    assert o.payment.refund_id.startswith("re_")
    pi = _obj(orderd.stripe, ref)
    assert _obj(orderd.stripe, pi["latest_charge"])["amount_refunded"] == o.total_minor
    made = {x["headers"].get("idempotency-key") for x in _stripe_refund_requests(orderd, ref)
            if x["status"] == 200}
    assert len(made) == 1, made
    assert _cancel(orderd, customer, oid) == o


def test_stripe_event_from_another_payment_intent_naming_our_order(orderd, customer):
    """A succeeded PaymentIntent that claims our order id in its metadata, but is not the
    order's payment (and pays another amount): acknowledged, the order is not paid."""
    r = _place(orderd, customer)
    oid = r.order.order_id
    other = _stripe_api(orderd, "POST", "/v1/payment_intents",
                        {"amount": "100", "currency": "eur", "metadata[order_id]": oid})
    orderd.stripe.control("/_fake/pay", {"id": other["id"]})
    assert _deliver_stripe(orderd, _stripe_event(orderd, "payment_intent.succeeded",
                                                 other["id"]))[0] == 200
    now = orderd.get(customer, oid)
    assert now.status == pb.ORDER_STATUS_PENDING
    assert now.version == r.order.version
    # The same amount too: still not this order's payment.
    same = _stripe_api(orderd, "POST", "/v1/payment_intents",
                       {"amount": str(r.order.total_minor), "currency": "eur",
                        "metadata[order_id]": oid})
    orderd.stripe.control("/_fake/pay", {"id": same["id"]})
    assert _deliver_stripe(orderd, _stripe_event(orderd, "payment_intent.succeeded",
                                                 same["id"]))[0] == 200
    now = orderd.get(customer, oid)
    assert now.status == pb.ORDER_STATUS_PENDING
    assert now.version == r.order.version


def test_stripe_succeeded_webhook_racing_cancel_ends_consistent(orderd):
    """payment_intent.succeeded arrives while the customer cancels: the order ends
    CANCELLED with the money refunded exactly once."""
    n = 20
    placed = []
    for _ in range(n):
        c = orderd.customer()
        r = _place(orderd, c)
        orderd.stripe.control("/_fake/pay", {"id": r.payment.reference})
        ev = _stripe_event(orderd, "payment_intent.succeeded", r.payment.reference)
        placed.append((c, r, ev))
    results = []
    for i, (c, r, ev) in enumerate(placed):
        # The two at once, one of them held back 0 to 9 ms (alternating), to cover the
        # window where they overlap.
        delay = (i // 2 % 10) / 1000.0
        hook = lambda ev=ev, d=(delay if i % 2 else 0): (  # noqa: E731
            time.sleep(d), _deliver_stripe(orderd, ev))[1]
        canc = lambda c=c, r=r, d=(0 if i % 2 else delay): (  # noqa: E731
            time.sleep(d), _cancel(orderd, c, r.order.order_id, "race"))[1]
        results.extend(e2e.call_all([hook, canc]))
    problems = []
    for i, (c, r, ev) in enumerate(placed):
        (hook, hook_err), (_, canc_err) = results[2 * i], results[2 * i + 1]
        if hook_err is not None or hook[0] != 200:
            problems.append("webhook for %s: %r %r" % (r.order.order_id, hook, hook_err))
        if canc_err is not None:
            problems.append("cancel of %s: %s %s" % (r.order.order_id, canc_err.code(),
                                                      canc_err.details()))
        o = _poll(lambda: orderd.get(c, r.order.order_id),
                  lambda o: o.payment.status == pb.PAYMENT_STATUS_REFUNDED, timeout=60)
        ch = _obj(orderd.stripe, _obj(orderd.stripe, r.payment.reference)["latest_charge"])
        made = {x["headers"].get("idempotency-key")
                for x in _stripe_refund_requests(orderd, r.payment.reference)
                if x["status"] == 200}
        if (o.status != pb.ORDER_STATUS_CANCELLED or o.payment.status !=
                pb.PAYMENT_STATUS_REFUNDED or ch["amount_refunded"] != o.total_minor
                or len(made) != 1):
            problems.append("order %s ended %s / %s, refunded %d at Stripe, refund keys %s" % (
                r.order.order_id, pb.OrderStatus.Name(o.status),
                pb.PaymentStatus.Name(o.payment.status), ch["amount_refunded"], made))
    assert not problems, "\n".join(problems)


def test_stripe_event_for_an_unknown_payment_intent_is_acknowledged(orderd, customer):
    # A PaymentIntent orderd never made (another integration on the same account).
    pi = _stripe_api(orderd, "POST", "/v1/payment_intents",
                     {"amount": "700", "currency": "eur", "metadata[order_id]": str(uuid.uuid4())})
    orderd.stripe.control("/_fake/pay", {"id": pi["id"]})
    foreign = _stripe_api(orderd, "POST", "/v1/payment_intents", {"amount": "700",
                                                                 "currency": "eur"})
    orderd.stripe.control("/_fake/pay", {"id": foreign["id"]})
    r = _place(orderd, customer)  # a bystander
    before = _webhook_count(orderd, "stripe", "ignored")
    for pid in (pi["id"], foreign["id"]):
        for typ in ("payment_intent.succeeded", "charge.refunded"):
            ev = _stripe_event(orderd, typ, pid)
            status, body = _deliver_stripe(orderd, ev)
            assert status == 200, (typ, status, body)
    assert _webhook_count(orderd, "stripe", "ignored") >= before + 4
    assert orderd.get(customer, r.order.order_id) == r.order


def test_stripe_event_types_orderd_ignores_are_acknowledged(orderd, customer):
    r = _place(orderd, customer)
    ref = r.payment.reference
    orderd.stripe.control("/_fake/pay", {"id": ref})
    ev = _stripe_event(orderd, "payment_intent.created", ref)
    assert _deliver_stripe(orderd, ev)[0] == 200
    ev = _stripe_event(orderd, "charge.succeeded", ref)
    assert _deliver_stripe(orderd, ev)[0] == 200
    now = orderd.get(customer, r.order.order_id)
    assert now.status == pb.ORDER_STATUS_PENDING and now.version == r.order.version


# ---------------------------------------------------------------------------------------
# PayPal


def _paypal_pending_capture(orderd, customer):
    """A PayPal order approved by the payer whose capture is PENDING (under review): the
    confirmation says not yet; a webhook will tell."""
    r = _place(orderd, customer, provider=PAYPAL, price=2000)
    oid, ref = r.order.order_id, r.payment.reference
    orderd.paypal.control("/_fake/pay", {"id": ref})
    orderd.paypal.control("/_fake/capture_outcome", {"id": ref, "status": "PENDING"})
    err = expect_error(lambda: _confirm(orderd, customer, oid, ref, PAYPAL), PRECONDITION)
    info = detail(err, "ErrorInfo")
    assert info.reason == "PAYMENT_NOT_SUCCEEDED", info
    assert dict(info.metadata).get("provider_status") == "PENDING", info
    now = orderd.get(customer, oid)
    assert now.status == pb.ORDER_STATUS_PENDING
    return r, now


def test_paypal_capture_completed_webhook_marks_the_order_paid(orderd, customer):
    r, before = _paypal_pending_capture(orderd, customer)
    oid, ref = r.order.order_id, r.payment.reference
    ev = _paypal_event(orderd, "PAYMENT.CAPTURE.COMPLETED", ref)
    cap_id = json.loads(ev["body"])["resource"]["id"]
    status, body = _deliver_paypal(orderd, ev)
    assert status == 200, body
    o = orderd.get(customer, oid)
    assert o.status == pb.ORDER_STATUS_PAID
    assert o.payment.status == pb.PAYMENT_STATUS_SUCCEEDED
    assert o.payment.charge_id == cap_id
    assert o.payment.HasField("paid_at")
    assert o.version == before.version + 1

    # A replay: acknowledged, nothing changes.
    assert _deliver_paypal(orderd, ev)[0] == 200
    assert orderd.get(customer, oid) == o
    # The confirmation now agrees, and a cancel refunds the capture once.
    assert _confirm(orderd, customer, oid, ref, PAYPAL) == o
    c = _cancel(orderd, customer, oid)
    assert c.status == pb.ORDER_STATUS_CANCELLED
    assert c.payment.status == pb.PAYMENT_STATUS_REFUNDED
    assert _obj(orderd.paypal, cap_id)["status"] == "REFUNDED"


def test_paypal_completed_webhook_after_confirm_changes_nothing(orderd, customer):
    r = _place(orderd, customer, provider=PAYPAL)
    oid, ref = r.order.order_id, r.payment.reference
    orderd.paypal.control("/_fake/pay", {"id": ref})
    paid = _confirm(orderd, customer, oid, ref, PAYPAL)
    assert paid.status == pb.ORDER_STATUS_PAID
    ev = _paypal_event(orderd, "PAYMENT.CAPTURE.COMPLETED", ref)
    assert json.loads(ev["body"])["resource"]["id"] == paid.payment.charge_id
    assert _deliver_paypal(orderd, ev)[0] == 200
    assert orderd.get(customer, oid) == paid


def test_paypal_webhook_with_a_tampered_signature_is_refused(orderd, customer):
    r, before = _paypal_pending_capture(orderd, customer)
    oid, ref = r.order.order_id, r.payment.reference
    bad_before = _webhook_count(orderd, "paypal", "bad_signature")
    ev = _paypal_event(orderd, "PAYMENT.CAPTURE.COMPLETED", ref, tamper=True)
    status, body = _deliver_paypal(orderd, ev)
    assert status == 400, body
    # A genuine event with its body changed after signing.
    good = _paypal_event(orderd, "PAYMENT.CAPTURE.COMPLETED", ref)
    changed = dict(good, body=good["body"].replace(oid, str(uuid.uuid4())))
    assert changed["body"] != good["body"]
    assert _deliver_paypal(orderd, changed)[0] == 400
    # Missing transmission headers.
    no_sig = dict(good, headers={k: v for k, v in good["headers"].items()
                                 if k != "PAYPAL-TRANSMISSION-SIG"})
    assert _deliver_paypal(orderd, no_sig)[0] == 400
    now = orderd.get(customer, oid)
    assert now.status == pb.ORDER_STATUS_PENDING and now.version == before.version
    assert _webhook_count(orderd, "paypal", "bad_signature") >= bad_before + 3
    # The genuine one still applies.
    assert _deliver_paypal(orderd, good)[0] == 200
    assert orderd.get(customer, oid).status == pb.ORDER_STATUS_PAID


def test_paypal_capture_denied_fails_a_pending_order(orderd, customer):
    r, before = _paypal_pending_capture(orderd, customer)
    oid, ref = r.order.order_id, r.payment.reference
    ev = _paypal_event(orderd, "PAYMENT.CAPTURE.DENIED", ref)
    status, body = _deliver_paypal(orderd, ev)
    assert status == 200, body
    o = orderd.get(customer, oid)
    assert o.status == pb.ORDER_STATUS_FAILED
    assert o.payment.status == pb.PAYMENT_STATUS_FAILED
    assert o.version == before.version + 1
    assert _deliver_paypal(orderd, ev)[0] == 200
    assert orderd.get(customer, oid) == o


def test_paypal_refund_at_the_provider(orderd, customer):
    r, before = _paypal_pending_capture(orderd, customer)
    oid, ref = r.order.order_id, r.payment.reference
    assert _deliver_paypal(orderd, _paypal_event(orderd, "PAYMENT.CAPTURE.COMPLETED",
                                                 ref))[0] == 200
    paid = orderd.get(customer, oid)
    assert paid.status == pb.ORDER_STATUS_PAID
    # The merchant refunds at PayPal itself (not through orderd); PayPal tells orderd.
    tok = _paypal_token(orderd)
    status, _, body = _http("POST", orderd.paypal.base + "/v2/payments/captures/%s/refund"
                            % paid.payment.charge_id, b"{}",
                            {"Authorization": "Bearer " + tok,
                             "Content-Type": "application/json"})
    assert status == 201, body
    refund_id = json.loads(body)["id"]
    ev = _paypal_event(orderd, "PAYMENT.CAPTURE.REFUNDED", refund_id)
    assert _deliver_paypal(orderd, ev)[0] == 200
    o = orderd.get(customer, oid)
    assert o.status == pb.ORDER_STATUS_CANCELLED
    assert o.payment.status == pb.PAYMENT_STATUS_REFUNDED
    assert o.payment.refund_id == refund_id
    assert _deliver_paypal(orderd, ev)[0] == 200
    assert orderd.get(customer, oid) == o


def test_paypal_events_out_of_order_end_consistent(orderd, customer):
    """PAYMENT.CAPTURE.REFUNDED delivered before PAYMENT.CAPTURE.COMPLETED (the capture was
    completed, then refunded by the merchant at PayPal): the order must not end PAID with
    the money gone."""
    r, before = _paypal_pending_capture(orderd, customer)
    oid, ref = r.order.order_id, r.payment.reference
    completed = _paypal_event(orderd, "PAYMENT.CAPTURE.COMPLETED", ref)  # not delivered yet
    cap_id = json.loads(completed["body"])["resource"]["id"]
    tok = _paypal_token(orderd)
    status, _, body = _http("POST", orderd.paypal.base + "/v2/payments/captures/%s/refund"
                            % cap_id, b"{}", {"Authorization": "Bearer " + tok,
                                              "Content-Type": "application/json"})
    assert status == 201, body
    refunded = _paypal_event(orderd, "PAYMENT.CAPTURE.REFUNDED", json.loads(body)["id"])
    first, _ = _deliver_paypal(orderd, refunded)
    assert first in (200, 503), first
    assert _deliver_paypal(orderd, completed)[0] == 200
    if first != 200:
        assert _deliver_paypal(orderd, refunded)[0] == 200
    o = orderd.get(customer, oid)
    assert o.payment.status == pb.PAYMENT_STATUS_REFUNDED, (
        "refunded-then-completed left the order %s with payment %s, but PayPal refunded it "
        "(first delivery of PAYMENT.CAPTURE.REFUNDED answered %d)" % (
            pb.OrderStatus.Name(o.status), pb.PaymentStatus.Name(o.payment.status), first))


def _paypal_token(orderd):
    """An access token of the test's own, to act at the fake PayPal as the merchant."""
    cred = base64.b64encode(("%s:%s" % (PAYPAL_CLIENT_ID, PAYPAL_SECRET)).encode()).decode()
    status, _, body = _http("POST", orderd.paypal.base + "/v1/oauth2/token",
                            b"grant_type=client_credentials",
                            {"Authorization": "Basic " + cred,
                             "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200, body
    return json.loads(body)["access_token"]


# ---------------------------------------------------------------------------------------
# the side port: health and metrics


def test_healthz(orderd):
    status, hdrs, body = _http("GET", orderd.http_base + "/healthz")
    assert status == 200, body
    assert json.loads(body) == {"status": "SERVING"}


def test_metrics(orderd, customer):
    _place(orderd, customer)
    r = _place(orderd, customer)
    orderd.stripe.control("/_fake/pay", {"id": r.payment.reference})
    bad = _stripe_event(orderd, "payment_intent.succeeded", r.payment.reference, tamper=True)
    assert _deliver_stripe(orderd, bad)[0] == 400
    good = _stripe_event(orderd, "payment_intent.succeeded", r.payment.reference)
    assert _deliver_stripe(orderd, good)[0] == 200
    assert _deliver_stripe(orderd, good)[0] == 200

    status, hdrs, body = _http("GET", orderd.http_base + "/metrics")
    assert status == 200
    ctype = {k.lower(): v for k, v in hdrs.items()}["content-type"]
    assert ctype.startswith("text/plain"), ctype
    text = body.decode()
    assert _sample(text, "orderd_up") == 1
    placed = _sample(text, "orderd_rpc_requests_total",
                     method="/orders.v1.OrderService/PlaceOrder", code="OK")
    assert placed is not None and placed >= 2, placed
    assert _sample(text, "orderd_webhooks_total", provider="stripe",
                   result="bad_signature") >= 1
    assert _sample(text, "orderd_webhooks_total", provider="stripe", result="applied") >= 1
    assert _sample(text, "orderd_webhooks_total", provider="stripe", result="duplicate") >= 1
    # Every combination is there from the start, zeros included.
    for p in ("stripe", "paypal"):
        for res in ("applied", "duplicate", "ignored", "bad_signature", "malformed",
                    "unavailable", "error"):
            assert _sample(text, "orderd_webhooks_total", provider=p, result=res) is not None
    assert "# TYPE orderd_webhooks_total counter" in text


def test_webhook_endpoints_refuse_other_methods_and_malformed_bodies(orderd):
    status, hdrs, _ = _http("GET", orderd.http_base + "/webhooks/stripe")
    assert status == 405
    assert "POST" in {k.lower(): v for k, v in hdrs.items()}.get("allow", "")
    # A correctly signed body that is not a Stripe event.
    body = b'{"hello": "world"}'
    sig = stripe_sign(STRIPE_WEBHOOK_SECRET, body, int(time.time()))
    status, _, _ = _stripe_post(orderd, body, sig)
    assert status == 400
    assert _http("GET", orderd.http_base + "/no-such-thing")[0] == 404
