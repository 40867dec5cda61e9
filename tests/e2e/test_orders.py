"""PlaceOrder, GetOrder and the catalogue (UpsertProduct / GetProduct), end to end."""

import time
import uuid

import grpc
import pytest

import orderd_e2e as e2e
from orderd_e2e import pb, expect_error, violation_fields, detail

LOCAL = pb.PAYMENT_PROVIDER_LOCAL
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def items_of(order):
    return [(i.product_id, i.name, i.quantity, i.unit_price_minor, i.line_total_minor)
            for i in order.items]


# ---------------------------------------------------------------------------------------
# the placed order


def test_place_order_returns_the_full_order(orderd, customer):
    w, g = orderd.pid("widget"), orderd.pid("gadget")
    now = time.time()
    r = orderd.place(customer, [(w, 2), (g, 1)])
    o = r.order
    assert e2e.UUID_RE.match(o.order_id), o.order_id
    assert o.customer_id == customer.sub
    assert o.status == pb.ORDER_STATUS_PENDING
    # Version 1 is the order as placed; attaching its payment (after the commit, keyed by
    # the order) is the second change, so a placed order is returned at version 2.
    assert o.version == 2
    assert items_of(o) == [(w, "Widget", 2, 1000, 2000), (g, "Gadget", 1, 2000, 2000)]
    assert (o.currency, o.subtotal_minor, o.tax_minor, o.total_minor) == ("EUR", 4000, 330, 4330)
    assert o.HasField("created_at") and o.HasField("updated_at")
    assert abs(o.created_at.seconds - now) < 300, "created_at is not the time of placing"
    assert o.updated_at.ToNanoseconds() >= o.created_at.ToNanoseconds()
    assert o.payment.provider == LOCAL
    assert o.payment.reference != ""
    assert o.payment.status == pb.PAYMENT_STATUS_PENDING
    assert not o.payment.HasField("paid_at")
    assert o.cancel_reason == ""
    assert r.payment.provider == LOCAL
    assert r.payment.reference == o.payment.reference

    # What was returned is what was stored.
    assert orderd.get(customer, o.order_id) == o


@pytest.mark.parametrize("key,qty,subtotal,tax", [
    ("widget", 1, 1000, 83),    # 82.5 rounds up
    ("gadget", 1, 2000, 165),
    ("penny", 1, 1, 0),         # 0.0825
    ("penny", 6, 6, 0),         # 0.495
    ("penny", 7, 7, 1),         # 0.5775
    ("penny", 200, 200, 17),    # 16.5, exactly half: up
    ("penny", 600, 600, 50),    # 49.5, exactly half: up
    ("yen", 3, 1500, 124),      # whole yen: 123.75
])
def test_tax_is_half_up_on_the_subtotal(orderd, customer, key, qty, subtotal, tax):
    o = orderd.place(customer, [(orderd.pid(key), qty)]).order
    p = orderd.products[key]
    assert o.currency == p.currency
    assert o.items[0].unit_price_minor == p.unit_price_minor
    assert o.items[0].line_total_minor == subtotal
    assert (o.subtotal_minor, o.tax_minor, o.total_minor) == (subtotal, tax, subtotal + tax)


def test_several_lines_are_priced_from_the_catalogue(orderd, customer):
    o = orderd.place(customer, [(orderd.pid("widget"), 3), (orderd.pid("gadget"), 2),
                                (orderd.pid("penny"), 7)]).order
    assert [i.line_total_minor for i in o.items] == [3000, 4000, 7]
    assert (o.subtotal_minor, o.tax_minor, o.total_minor) == (7007, 578, 7585)


def test_order_keeps_its_prices_after_the_catalogue_changes(orderd, customer):
    pid = e2e.unique("e2e-reprice")
    orderd.upsert(pid, "Kettle", 1000, "EUR")
    first = orderd.place(customer, [(pid, 2)]).order
    orderd.upsert(pid, "Kettle mk II", 1500, "EUR")
    again = orderd.get(customer, first.order_id)
    assert items_of(again) == [(pid, "Kettle", 2, 1000, 2000)]
    assert (again.subtotal_minor, again.tax_minor, again.total_minor) == (2000, 165, 2165)
    second = orderd.place(customer, [(pid, 2)]).order
    assert items_of(second) == [(pid, "Kettle mk II", 2, 1500, 3000)]
    assert second.total_minor == 3000 + 248  # 247.5 rounds up


def test_total_at_the_configured_maximum_is_accepted(orderd, customer):
    o = orderd.place(customer, [(orderd.pid("max_ok"), 1)]).order
    assert (o.subtotal_minor, o.tax_minor, o.total_minor) == (92378752, 7621247, 99999999)


def test_total_above_the_configured_maximum_is_refused(orderd, customer):
    err = expect_error(lambda: orderd.place(customer, [(orderd.pid("max_over"), 1)]), INVALID)
    assert violation_fields(err) == ["items"]
    err = expect_error(lambda: orderd.place(customer, [(orderd.pid("max_ok"), 1),
                                                       (orderd.pid("penny"), 1)]), INVALID)
    assert violation_fields(err) == ["items"]
    assert orderd.order_ids(customer) == []


def test_extreme_prices_never_wrap(orderd, customer):
    """Whatever the catalogue accepts, an order whose total cannot be paid is refused,
    and int64 arithmetic never wraps into a small (payable) total."""
    pid = e2e.unique("e2e-huge")
    try:
        orderd.upsert(pid, "Priceless", 2**63 - 1, "EUR")
        lines = [(pid, 2)]                      # 2 * (2^63-1) overflows int64
    except grpc.RpcError as e:
        # Refusing such a price up front is fine too, as a field violation.
        assert e.code() == INVALID, (e.code(), e.details())
        assert violation_fields(e) == ["product.unit_price_minor"]
        orderd.upsert(pid, "Nearly priceless", 99999999, "EUR")
        lines = [(pid, 10000)]
    err = expect_error(lambda: orderd.place(customer, lines), INVALID)
    assert violation_fields(err) == ["items"]
    assert orderd.order_ids(customer) == []


# ---------------------------------------------------------------------------------------
# validation: every violation at once, nothing written

UNKNOWN = "e2e-no-such-product"


def _case(items, request_id=None, provider=LOCAL):
    return dict(items=items, request_id=request_id, provider=provider)


VALIDATION = {
    "empty-request-id": (_case([("widget", 1)], request_id=""), ["request_id"]),
    "request-id-129": (_case([("widget", 1)], request_id="r" * 129), ["request_id"]),
    "no-items": (_case([]), ["items"]),
    "101-lines": (_case([("bulk%03d" % i, 1) for i in range(101)]), ["items"]),
    "quantity-0": (_case([("widget", 0)]), ["items[0].quantity"]),
    "quantity-negative": (_case([("widget", -1)]), ["items[0].quantity"]),
    "quantity-10001": (_case([("widget", 1), ("gadget", 10001)]), ["items[1].quantity"]),
    "unknown-product": (_case([("widget", 1), (UNKNOWN, 1)]), ["items[1].product_id"]),
    "inactive-product": (_case([("inactive", 1)]), ["items[0].product_id"]),
    "empty-product-id": (_case([("", 1)]), ["items[0].product_id"]),
    "provider-unspecified": (_case([("widget", 1)], provider=pb.PAYMENT_PROVIDER_UNSPECIFIED),
                             ["payment_provider"]),
    "provider-unknown-number": (_case([("widget", 1)], provider=7), ["payment_provider"]),
    "several-at-once": (
        _case([("widget", 0), (UNKNOWN, 1), ("gadget", 10001), ("", 1)], request_id="",
              provider=pb.PAYMENT_PROVIDER_UNSPECIFIED),
        sorted(["request_id", "items[0].quantity", "items[1].product_id",
                "items[2].quantity", "items[3].product_id", "payment_provider"])),
}


def test_a_provider_that_is_not_configured_is_refused_and_writes_nothing(orderd):
    """A server without PayPal (its settings off) says so on the field; no order is made."""
    with orderd.instance("no-paypal", {"ORDERD_PAYMENTS_PAYPAL_ENABLED": "false"}) as srv:
        customer = orderd.customer()
        req = orderd.place_request([(orderd.pid("widget"), 1)],
                                   provider=pb.PAYMENT_PROVIDER_PAYPAL)
        err = expect_error(lambda: srv.api.call("PlaceOrder", req, customer.token),
                           grpc.StatusCode.INVALID_ARGUMENT)
        assert violation_fields(err) == ["payment_provider"]
        assert orderd.order_ids(customer) == []


def _resolve(orderd, items):
    return [(orderd.pid(k) if k in orderd.products else k, q) for k, q in items]


@pytest.mark.parametrize("name", sorted(VALIDATION))
def test_invalid_place_order_reports_every_violation_and_writes_nothing(orderd, customer, name):
    case, fields = VALIDATION[name]
    req = orderd.place_request(_resolve(orderd, case["items"]), request_id=case["request_id"],
                               provider=case["provider"])
    err = expect_error(lambda: orderd.call("PlaceOrder", req, customer), INVALID)
    assert violation_fields(err) == fields
    assert orderd.order_ids(customer) == []


def test_mixed_currencies_are_refused(orderd, customer):
    err = expect_error(lambda: orderd.place(
        customer, [(orderd.pid("widget"), 1), (orderd.pid("yen"), 1)]), INVALID)
    fields = violation_fields(err)
    assert len(fields) == 1 and fields[0].startswith("items"), fields
    assert orderd.order_ids(customer) == []


def test_limits_themselves_are_accepted(orderd, customer):
    o = orderd.place(customer, [(orderd.pid("widget"), 1), (orderd.pid("gadget"), 10000)],
                     request_id="x" * 128).order
    assert [i.quantity for i in o.items] == [1, 10000]
    o = orderd.place(customer, [(orderd.pid("bulk%03d" % i), 1) for i in range(100)]).order
    assert len(o.items) == 100 and o.subtotal_minor == 100 and o.tax_minor == 8


# ---------------------------------------------------------------------------------------
# who places for whom


def test_customer_cannot_place_for_another_customer(orderd, customer):
    other = orderd.customer()
    expect_error(lambda: orderd.place(customer, [(orderd.pid("widget"), 1)],
                                      customer_id=other.sub),
                 grpc.StatusCode.PERMISSION_DENIED)
    assert orderd.order_ids(customer) == []
    assert orderd.order_ids(other) == []
    assert orderd.order_ids(orderd.admin, customer_id=other.sub) == []


def test_customer_may_name_themselves(orderd, customer):
    o = orderd.place(customer, [(orderd.pid("widget"), 1)], customer_id=customer.sub).order
    assert o.customer_id == customer.sub


@pytest.mark.parametrize("who", ["service", "admin"])
def test_service_and_admin_place_for_a_named_customer(orderd, customer, who):
    caller = getattr(orderd, who)
    o = orderd.place(caller, [(orderd.pid("widget"), 1)], customer_id=customer.sub).order
    assert o.customer_id == customer.sub
    assert orderd.get(customer, o.order_id).order_id == o.order_id
    assert orderd.order_ids(customer) == [o.order_id]


@pytest.mark.parametrize("who", ["service", "admin"])
def test_service_and_admin_must_name_the_customer(orderd, who):
    caller = getattr(orderd, who)
    err = expect_error(lambda: orderd.place(caller, [(orderd.pid("widget"), 1)]), INVALID)
    assert violation_fields(err) == ["customer_id"]


# ---------------------------------------------------------------------------------------
# idempotency


def test_repeated_place_order_returns_the_same_order(orderd, customer):
    req = orderd.place_request([(orderd.pid("widget"), 1)])
    r1 = orderd.call("PlaceOrder", req, customer)
    r2 = orderd.call("PlaceOrder", req, customer)
    assert r2.order.order_id == r1.order.order_id
    assert r2.order.total_minor == r1.order.total_minor
    assert r2.payment.reference == r1.payment.reference
    assert orderd.order_ids(customer) == [r1.order.order_id]


def test_racing_duplicate_place_orders_create_one_order(orderd, customer):
    req = orderd.place_request([(orderd.pid("widget"), 2), (orderd.pid("penny"), 3)])
    results = e2e.call_all([lambda: orderd.call("PlaceOrder", req, customer)] * 16)
    errors = [e for _, e in results if e is not None]
    assert not errors, ["%s %s" % (e.code(), e.details()) if isinstance(e, grpc.RpcError)
                        else repr(e) for e in errors]
    ids = {r.order.order_id for r, _ in results}
    assert len(ids) == 1, ids
    refs = {r.payment.reference for r, _ in results}
    assert len(refs) == 1, refs
    assert orderd.order_ids(customer) == list(ids)


def test_same_request_id_with_another_request_is_refused(orderd, customer):
    rid = e2e.unique("req")
    first = orderd.place(customer, [(orderd.pid("widget"), 1)], request_id=rid).order
    err = expect_error(lambda: orderd.place(customer, [(orderd.pid("widget"), 2)],
                                            request_id=rid),
                       grpc.StatusCode.FAILED_PRECONDITION)
    assert detail(err, "ErrorInfo").reason == "IDEMPOTENCY_KEY_REUSED"
    assert orderd.order_ids(customer) == [first.order_id]
    assert orderd.get(customer, first.order_id).items[0].quantity == 1


def test_request_ids_are_per_caller(orderd, customer):
    other = orderd.customer()
    rid = e2e.unique("req")
    a = orderd.place(customer, [(orderd.pid("widget"), 1)], request_id=rid).order
    b = orderd.place(other, [(orderd.pid("widget"), 1)], request_id=rid).order
    assert a.order_id != b.order_id
    assert (a.customer_id, b.customer_id) == (customer.sub, other.sub)
    assert orderd.order_ids(customer) == [a.order_id]
    assert orderd.order_ids(other) == [b.order_id]


# ---------------------------------------------------------------------------------------
# GetOrder


def test_get_order_visibility(orderd, customer):
    o = orderd.place(customer, [(orderd.pid("widget"), 1)]).order
    assert orderd.get(customer, o.order_id) == o
    assert orderd.get(orderd.service, o.order_id) == o
    assert orderd.get(orderd.admin, o.order_id) == o
    other = orderd.customer()
    theirs = expect_error(lambda: orderd.get(other, o.order_id), grpc.StatusCode.NOT_FOUND)
    missing_id = str(uuid.uuid4())
    missing = expect_error(lambda: orderd.get(customer, missing_id), grpc.StatusCode.NOT_FOUND)
    # Another customer's order must look exactly like a missing one.
    assert theirs.details().replace(o.order_id, "<id>") == \
        missing.details().replace(missing_id, "<id>")


@pytest.mark.parametrize("order_id", ["not-a-uuid", "", "1234", str(uuid.uuid4())[:-1] + "g",
                                      "' OR 1=1 --"])
def test_get_order_with_a_malformed_id(orderd, customer, order_id):
    err = expect_error(lambda: orderd.get(customer, order_id), INVALID)
    assert violation_fields(err) == ["order_id"]


# ---------------------------------------------------------------------------------------
# catalogue


def test_upsert_and_get_product_round_trip(orderd):
    pid = e2e.unique("e2e-rt")
    want = pb.Product(product_id=pid, name="Teapot", unit_price_minor=2599, currency="GBP",
                      active=True)
    got = orderd.call("UpsertProduct", pb.UpsertProductRequest(product=want), orderd.admin)
    assert got == want
    for who in (orderd.admin, orderd.service, orderd.customer()):
        assert orderd.call("GetProduct", pb.GetProductRequest(product_id=pid), who) == want
    changed = pb.Product(product_id=pid, name="Teapot (large)", unit_price_minor=0,
                         currency="KWD", active=False)
    assert orderd.call("UpsertProduct", pb.UpsertProductRequest(product=changed),
                       orderd.admin) == changed
    assert orderd.call("GetProduct", pb.GetProductRequest(product_id=pid),
                       orderd.admin) == changed


def test_product_limits_themselves_are_accepted(orderd):
    pid = ("e2e-%s-" % orderd.run) + "A.b_9-" * 10
    pid = pid[:64]
    p = orderd.upsert(pid, "n" * 200, 0, "JPY")
    assert (p.product_id, len(p.name), p.unit_price_minor, p.currency) == (pid, 200, 0, "JPY")


PRODUCT_INVALID = {
    "empty-id": (dict(product_id=""), ["product.product_id"]),
    "id-with-space": (dict(product_id="bad id"), ["product.product_id"]),
    "id-with-slash": (dict(product_id="bad/id"), ["product.product_id"]),
    "id-with-quote": (dict(product_id="bad'id"), ["product.product_id"]),
    "id-65-chars": (dict(product_id="p" * 65), ["product.product_id"]),
    "empty-name": (dict(name=""), ["product.name"]),
    "name-201-chars": (dict(name="n" * 201), ["product.name"]),
    "negative-price": (dict(unit_price_minor=-1), ["product.unit_price_minor"]),
    "currency-EURO": (dict(currency="EURO"), ["product.currency"]),
    "currency-lower": (dict(currency="eur"), ["product.currency"]),
    "currency-XXY": (dict(currency="XXY"), ["product.currency"]),
    "currency-empty": (dict(currency=""), ["product.currency"]),
    "all-at-once": (dict(product_id="", name="", unit_price_minor=-5, currency="eur"),
                    ["product.currency", "product.name", "product.product_id",
                     "product.unit_price_minor"]),
}


@pytest.mark.parametrize("name", sorted(PRODUCT_INVALID))
def test_invalid_product_is_refused(orderd, name):
    change, fields = PRODUCT_INVALID[name]
    fields_ok = dict(product_id=e2e.unique("e2e-inv"), name="Valid", unit_price_minor=100,
                     currency="EUR", active=True)
    fields_ok.update(change)
    req = pb.UpsertProductRequest(product=pb.Product(**fields_ok))
    err = expect_error(lambda: orderd.call("UpsertProduct", req, orderd.admin), INVALID)
    assert violation_fields(err) == fields
    if fields_ok["product_id"].startswith("e2e-inv-"):
        expect_error(lambda: orderd.call("GetProduct", pb.GetProductRequest(
            product_id=fields_ok["product_id"]), orderd.admin), grpc.StatusCode.NOT_FOUND)


def test_get_unknown_product_is_not_found(orderd, customer):
    expect_error(lambda: orderd.call("GetProduct", pb.GetProductRequest(
        product_id=e2e.unique("e2e-none")), customer), grpc.StatusCode.NOT_FOUND)
