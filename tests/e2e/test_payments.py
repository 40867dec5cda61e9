"""ConfirmPayment (LOCAL provider), CancelOrder and UpdateOrderStatus: the status machine."""

import uuid

import grpc
import pytest
from google.protobuf import wrappers_pb2

from orderd_e2e import pb, expect_error, violation_fields, detail

LOCAL = pb.PAYMENT_PROVIDER_LOCAL
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def _confirm(orderd, caller, order_id, reference, provider=LOCAL):
    return orderd.call("ConfirmPayment", pb.ConfirmPaymentRequest(
        order_id=order_id, provider=provider, payment_reference=reference), caller)


def _cancel(orderd, caller, order_id, reason="no longer needed"):
    return orderd.call("CancelOrder", pb.CancelOrderRequest(order_id=order_id, reason=reason),
                       caller)


def _status(orderd, caller, order_id, status, expected_version=None):
    req = pb.UpdateOrderStatusRequest(order_id=order_id, status=status)
    if expected_version is not None:
        req.expected_version.CopyFrom(wrappers_pb2.Int64Value(value=expected_version))
    return orderd.call("UpdateOrderStatus", req, caller)


def _placed(orderd, customer):
    return orderd.place(customer, [(orderd.pid("widget"), 2)])


def _paid(orderd, customer):
    r = _placed(orderd, customer)
    return _confirm(orderd, customer, r.order.order_id, r.payment.reference)


def _assert_status_precondition(err, order_id, current_name):
    v = detail(err, "PreconditionFailure").violations
    assert len(v) >= 1
    assert v[0].type == "ORDER_STATUS"
    assert v[0].subject == order_id
    text = (v[0].description + " " + err.details()).upper()
    assert current_name in text, "current status %s not named in %r / %r" % (
        current_name, v[0].description, err.details())


# ---------------------------------------------------------------------------------------
# ConfirmPayment


def test_confirm_payment_marks_the_order_paid(orderd, customer):
    r = _placed(orderd, customer)
    o = _confirm(orderd, customer, r.order.order_id, r.payment.reference)
    assert o.order_id == r.order.order_id
    assert o.status == pb.ORDER_STATUS_PAID
    assert o.payment.status == pb.PAYMENT_STATUS_SUCCEEDED
    assert o.payment.provider == LOCAL
    assert o.payment.reference == r.payment.reference
    assert o.payment.HasField("paid_at")
    assert o.payment.paid_at.ToNanoseconds() >= r.order.created_at.ToNanoseconds()
    assert o.version == r.order.version + 1
    assert o.updated_at.ToNanoseconds() >= r.order.updated_at.ToNanoseconds()
    assert (o.subtotal_minor, o.total_minor) == (r.order.subtotal_minor, r.order.total_minor)
    assert orderd.get(customer, o.order_id) == o

    again = _confirm(orderd, customer, r.order.order_id, r.payment.reference)
    assert again == o, "a second confirmation must change nothing"
    assert orderd.get(customer, o.order_id).version == o.version


def test_service_confirms_a_customers_payment(orderd, customer):
    r = _placed(orderd, customer)
    o = _confirm(orderd, orderd.service, r.order.order_id, r.payment.reference)
    assert o.status == pb.ORDER_STATUS_PAID


def test_confirm_with_a_wrong_reference_changes_nothing(orderd, customer):
    r = _placed(orderd, customer)
    expect_error(lambda: _confirm(orderd, customer, r.order.order_id, "local_forged_ref"),
                 PRECONDITION)
    now = orderd.get(customer, r.order.order_id)
    assert now.status == pb.ORDER_STATUS_PENDING
    assert now.payment.status == pb.PAYMENT_STATUS_PENDING
    assert now.version == r.order.version


def test_confirm_with_another_orders_reference_changes_nothing(orderd, customer):
    a, b = _placed(orderd, customer), _placed(orderd, customer)
    assert a.payment.reference != b.payment.reference
    expect_error(lambda: _confirm(orderd, customer, a.order.order_id, b.payment.reference),
                 PRECONDITION)
    assert orderd.get(customer, a.order.order_id).status == pb.ORDER_STATUS_PENDING
    assert orderd.get(customer, b.order.order_id).status == pb.ORDER_STATUS_PENDING


@pytest.mark.parametrize("provider", [pb.PAYMENT_PROVIDER_STRIPE, pb.PAYMENT_PROVIDER_PAYPAL])
def test_confirm_with_another_provider_is_a_precondition_failure(orderd, customer, provider):
    r = _placed(orderd, customer)
    err = expect_error(lambda: _confirm(orderd, customer, r.order.order_id,
                                        r.payment.reference, provider), PRECONDITION)
    # The message tells the caller which provider the order was placed with.
    msg = err.details().lower()
    assert "local" in msg and pb.PaymentProvider.Name(provider)[17:].lower() in msg, msg
    assert orderd.get(customer, r.order.order_id).status == pb.ORDER_STATUS_PENDING


def test_confirm_with_an_empty_reference_is_invalid(orderd, customer):
    r = _placed(orderd, customer)
    err = expect_error(lambda: _confirm(orderd, customer, r.order.order_id, ""), INVALID)
    assert violation_fields(err) == ["payment_reference"]


def test_confirm_with_a_malformed_order_id_is_invalid(orderd, customer):
    err = expect_error(lambda: _confirm(orderd, customer, "nope", "ref"), INVALID)
    assert "order_id" in violation_fields(err)


def test_confirm_another_customers_order_is_not_found(orderd, customer):
    r = _placed(orderd, customer)
    other = orderd.customer()
    expect_error(lambda: _confirm(orderd, other, r.order.order_id, r.payment.reference),
                 grpc.StatusCode.NOT_FOUND)
    expect_error(lambda: _confirm(orderd, other, str(uuid.uuid4()), r.payment.reference),
                 grpc.StatusCode.NOT_FOUND)
    assert orderd.get(customer, r.order.order_id).status == pb.ORDER_STATUS_PENDING


# ---------------------------------------------------------------------------------------
# CancelOrder


def test_cancel_a_pending_order_voids_its_payment(orderd, customer):
    r = _placed(orderd, customer)
    o = _cancel(orderd, customer, r.order.order_id, "ordered by mistake")
    assert o.status == pb.ORDER_STATUS_CANCELLED
    assert o.cancel_reason == "ordered by mistake"
    assert o.payment.status == pb.PAYMENT_STATUS_VOIDED
    # Two changes: the status transition, then the provider's void recorded on the order.
    assert o.version == r.order.version + 2
    assert orderd.get(customer, o.order_id) == o
    # A payment confirmation arriving afterwards does not revive it.
    try:
        after = _confirm(orderd, customer, o.order_id, r.payment.reference)
        assert after.status == pb.ORDER_STATUS_CANCELLED
    except grpc.RpcError as e:
        assert e.code() == PRECONDITION, e
    assert orderd.get(customer, o.order_id).status == pb.ORDER_STATUS_CANCELLED


def test_cancel_a_paid_order_refunds_it(orderd, customer):
    paid = _paid(orderd, customer)
    o = _cancel(orderd, customer, paid.order_id, "found it cheaper")
    assert o.status == pb.ORDER_STATUS_CANCELLED
    assert o.payment.status == pb.PAYMENT_STATUS_REFUNDED
    assert o.cancel_reason == "found it cheaper"
    # Two changes: the status transition, then the provider's refund recorded on the order.
    assert o.version == paid.version + 2
    assert orderd.get(customer, o.order_id) == o


def test_cancel_a_cancelled_order_returns_it_unchanged(orderd, customer):
    r = _placed(orderd, customer)
    first = _cancel(orderd, customer, r.order.order_id, "first reason")
    again = _cancel(orderd, customer, r.order.order_id, "second reason")
    assert again == first
    assert orderd.get(customer, first.order_id) == first


@pytest.mark.parametrize("who", ["service", "admin"])
def test_service_and_admin_cancel(orderd, customer, who):
    r = _placed(orderd, customer)
    o = _cancel(orderd, getattr(orderd, who), r.order.order_id, "fraud check")
    assert o.status == pb.ORDER_STATUS_CANCELLED


def test_cancel_another_customers_order_is_not_found(orderd, customer):
    r = _placed(orderd, customer)
    expect_error(lambda: _cancel(orderd, orderd.customer(), r.order.order_id),
                 grpc.StatusCode.NOT_FOUND)
    assert orderd.get(customer, r.order.order_id).status == pb.ORDER_STATUS_PENDING


def test_cancel_reason_limit(orderd, customer):
    r = _placed(orderd, customer)
    err = expect_error(lambda: _cancel(orderd, customer, r.order.order_id, "x" * 501), INVALID)
    assert violation_fields(err) == ["reason"]
    assert orderd.get(customer, r.order.order_id).status == pb.ORDER_STATUS_PENDING
    o = _cancel(orderd, customer, r.order.order_id, "y" * 500)
    assert o.cancel_reason == "y" * 500


@pytest.mark.parametrize("shipped_to", [pb.ORDER_STATUS_SHIPPED, pb.ORDER_STATUS_DELIVERED])
def test_cancel_after_shipping_is_a_precondition_failure(orderd, customer, shipped_to):
    paid = _paid(orderd, customer)
    o = _status(orderd, orderd.service, paid.order_id, pb.ORDER_STATUS_SHIPPED)
    if shipped_to == pb.ORDER_STATUS_DELIVERED:
        o = _status(orderd, orderd.service, paid.order_id, pb.ORDER_STATUS_DELIVERED)
    err = expect_error(lambda: _cancel(orderd, customer, paid.order_id), PRECONDITION)
    _assert_status_precondition(err, paid.order_id, pb.OrderStatus.Name(shipped_to)[13:])
    assert orderd.get(customer, paid.order_id) == o


# ---------------------------------------------------------------------------------------
# UpdateOrderStatus


@pytest.mark.parametrize("who", ["service", "admin"])
def test_paid_shipped_delivered(orderd, customer, who):
    caller = getattr(orderd, who)
    paid = _paid(orderd, customer)
    shipped = _status(orderd, caller, paid.order_id, pb.ORDER_STATUS_SHIPPED)
    assert shipped.status == pb.ORDER_STATUS_SHIPPED
    assert shipped.version == paid.version + 1
    assert shipped.payment.status == pb.PAYMENT_STATUS_SUCCEEDED
    delivered = _status(orderd, caller, paid.order_id, pb.ORDER_STATUS_DELIVERED)
    assert delivered.status == pb.ORDER_STATUS_DELIVERED
    assert delivered.version == paid.version + 2
    assert orderd.get(customer, paid.order_id) == delivered


def test_pending_cannot_ship(orderd, customer):
    r = _placed(orderd, customer)
    err = expect_error(lambda: _status(orderd, orderd.service, r.order.order_id,
                                       pb.ORDER_STATUS_SHIPPED), PRECONDITION)
    _assert_status_precondition(err, r.order.order_id, "PENDING")
    assert orderd.get(customer, r.order.order_id).status == pb.ORDER_STATUS_PENDING


def test_paid_cannot_be_delivered_without_shipping(orderd, customer):
    paid = _paid(orderd, customer)
    err = expect_error(lambda: _status(orderd, orderd.service, paid.order_id,
                                       pb.ORDER_STATUS_DELIVERED), PRECONDITION)
    _assert_status_precondition(err, paid.order_id, "PAID")


def test_cancelled_cannot_ship(orderd, customer):
    r = _placed(orderd, customer)
    _cancel(orderd, customer, r.order.order_id)
    err = expect_error(lambda: _status(orderd, orderd.service, r.order.order_id,
                                       pb.ORDER_STATUS_SHIPPED), PRECONDITION)
    _assert_status_precondition(err, r.order.order_id, "CANCELLED")


@pytest.mark.parametrize("status", [pb.ORDER_STATUS_UNSPECIFIED, pb.ORDER_STATUS_PENDING,
                                    pb.ORDER_STATUS_PAID, pb.ORDER_STATUS_CANCELLED,
                                    pb.ORDER_STATUS_EXPIRED, pb.ORDER_STATUS_FAILED, 99])
def test_update_to_a_status_other_than_shipped_or_delivered_is_invalid(orderd, customer,
                                                                        status):
    paid = _paid(orderd, customer)
    err = expect_error(lambda: _status(orderd, orderd.service, paid.order_id, status), INVALID)
    assert violation_fields(err) == ["status"]
    assert orderd.get(customer, paid.order_id) == paid


def test_expected_version(orderd, customer):
    paid = _paid(orderd, customer)
    err = expect_error(lambda: _status(orderd, orderd.service, paid.order_id,
                                       pb.ORDER_STATUS_SHIPPED, paid.version - 1), PRECONDITION)
    v = detail(err, "PreconditionFailure").violations
    assert v and v[0].type == "ORDER_VERSION", v
    assert v[0].subject == paid.order_id
    assert orderd.get(customer, paid.order_id) == paid
    shipped = _status(orderd, orderd.service, paid.order_id, pb.ORDER_STATUS_SHIPPED,
                      paid.version)
    assert shipped.status == pb.ORDER_STATUS_SHIPPED
    assert shipped.version == paid.version + 1
    # The version that was current a moment ago is now stale.
    err = expect_error(lambda: _status(orderd, orderd.service, paid.order_id,
                                       pb.ORDER_STATUS_DELIVERED, paid.version), PRECONDITION)
    assert detail(err, "PreconditionFailure").violations[0].type == "ORDER_VERSION"
    assert orderd.get(customer, paid.order_id) == shipped


def test_update_status_of_a_missing_order(orderd):
    expect_error(lambda: _status(orderd, orderd.admin, str(uuid.uuid4()),
                                 pb.ORDER_STATUS_SHIPPED), grpc.StatusCode.NOT_FOUND)
    err = expect_error(lambda: _status(orderd, orderd.admin, "nope", pb.ORDER_STATUS_SHIPPED),
                       INVALID)
    assert violation_fields(err) == ["order_id"]
