"""String fields must be UTF-8 without NUL: otherwise INVALID_ARGUMENT naming the field,
with details every client can parse, and nothing written."""
import uuid
import grpc
from orderd_e2e import pb, expect_error, violation_fields, detail


def _v(n):
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def _s(num, data):
    data = data.encode() if isinstance(data, str) else data
    return _v(num << 3 | 2) + _v(len(data)) + data


def _i(num, v):
    return _v(num << 3) + _v(v)


def _raw(orderd, method, body, caller):
    stub = orderd.server.channel.unary_unary("/orders.v1.OrderService/" + method,
                                             request_serializer=lambda b: b,
                                             response_deserializer=lambda b: b)
    return stub(body, timeout=20, metadata=[("authorization", "Bearer " + caller.token)])


def _bad(orderd, method, body, caller, field):
    err = expect_error(lambda: _raw(orderd, method, body, caller),
                       grpc.StatusCode.INVALID_ARGUMENT)
    assert violation_fields(err) == [field], (err.details(), violation_fields(err))


def test_request_text_must_be_utf8_without_nul(orderd, customer):
    pid = orderd.pid("widget")
    line = _s(1, pid) + _i(2, 1)
    key = uuid.uuid4().hex
    _bad(orderd, "PlaceOrder", _s(1, key.encode() + b"\x00A") + _s(3, line) + _i(4, 1), customer,
         "request_id")
    _bad(orderd, "PlaceOrder", _s(1, b"r\xff" + key.encode()) + _s(3, line) + _i(4, 1), customer,
         "request_id")
    _bad(orderd, "PlaceOrder", _s(1, key) + _s(3, line) + _s(3, _s(1, pid.encode() + b"\x00x")
                                                                + _i(2, 1)) + _i(4, 1),
         customer, "items[1].product_id")
    _bad(orderd, "PlaceOrder", _s(1, key) + _s(3, line) + _i(4, 2) + _s(5, b"pm_card_visa\x00x"),
         customer, "payment_method")
    assert orderd.list_all(customer) == []  # nothing written
    _bad(orderd, "ListOrders", _s(4, b"c\xc3"), orderd.service, "customer_id")
    o = orderd.place(customer, [(pid, 1)]).order
    _bad(orderd, "CancelOrder", _s(1, o.order_id) + _s(2, b"bad \xed\xa0\x80"), customer, "reason")
    _bad(orderd, "CancelOrder", _s(1, o.order_id) + _s(2, b"ok\x00hidden"), customer, "reason")
    assert orderd.get(customer, o.order_id).status == pb.ORDER_STATUS_PENDING
    _bad(orderd, "ConfirmPayment", _s(1, o.order_id) + _i(2, 1) + _s(3, b"\xff"), customer,
         "payment_reference")
    prod = _s(1, "aud-" + uuid.uuid4().hex[:8]) + _s(2, b"Name\x00secret") + _i(3, 1) + \
        _s(4, "EUR")
    _bad(orderd, "UpsertProduct", _s(1, prod), orderd.admin, "product.name")
    # Valid multi-byte text is fine.
    r = orderd.call("CancelOrder", pb.CancelOrderRequest(order_id=o.order_id,
                                                         reason="zu spät \u2014 \U0001F600"),
                    customer)
    assert r.cancel_reason == "zu spät \u2014 \U0001F600"
