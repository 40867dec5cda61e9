"""ListOrders: order, page sizes, cursor pagination, page-token integrity, filters, scope."""

import base64
import concurrent.futures
import json

import grpc
import pytest

from orderd_e2e import pb, expect_error, violation_fields

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _list(orderd, caller, **kw):
    return orderd.call("ListOrders", pb.ListOrdersRequest(**kw), caller)


def _place_n(orderd, caller, n):
    """Places n orders one after another; returns their ids in placing order."""
    return [orderd.place(caller, [(orderd.pid("penny"), i + 1)]).order.order_id
            for i in range(n)]


def _newest_first(orders):
    keys = [(o.created_at.ToNanoseconds(), o.order_id) for o in orders]
    return keys == sorted(keys, reverse=True)


@pytest.fixture(scope="module")
def crowd(orderd):
    """A customer with 501 orders (placed from 8 threads)."""
    cust = orderd.customer()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: orderd.place(cust, [(orderd.pid("penny"), 1)])
                            .order.order_id, range(501)))
    assert len(set(ids)) == 501
    return cust, set(ids)


def test_default_page_size_is_50(orderd, crowd):
    cust, ids = crowd
    page = _list(orderd, cust)
    assert len(page.orders) == 50
    assert page.next_page_token != ""
    assert _newest_first(page.orders)
    assert {o.order_id for o in page.orders} <= ids


def test_page_size_above_500_is_treated_as_500(orderd, crowd):
    cust, ids = crowd
    first = _list(orderd, cust, page_size=100000)
    assert len(first.orders) == 500
    assert first.next_page_token != ""
    second = _list(orderd, cust, page_size=100000, page_token=first.next_page_token)
    assert len(second.orders) == 1
    assert second.next_page_token == ""
    seen = [o.order_id for o in first.orders] + [o.order_id for o in second.orders]
    assert sorted(seen) == sorted(ids)
    assert _newest_first(list(first.orders) + list(second.orders))


@pytest.mark.parametrize("size", [-1, -500])
def test_negative_page_size_is_invalid(orderd, customer, size):
    err = expect_error(lambda: _list(orderd, customer, page_size=size), INVALID)
    assert violation_fields(err) == ["page_size"]


def test_pagination_visits_every_order_once_newest_first(orderd, customer):
    placed = _place_n(orderd, customer, 7)
    pages, token = [], ""
    while True:
        page = _list(orderd, customer, page_size=3, page_token=token)
        pages.append([o.order_id for o in page.orders])
        token = page.next_page_token
        if not token:
            break
        assert len(pages) < 5, "pagination does not end: %s" % pages
    assert [len(p) for p in pages] == [3, 3, 1]
    assert sum(pages, []) == placed[::-1]
    # A page that holds exactly the rest is the last one.
    whole = _list(orderd, customer, page_size=7)
    assert [o.order_id for o in whole.orders] == placed[::-1]
    assert whole.next_page_token == ""


def test_orders_placed_while_paging_cause_no_duplicates_or_skips(orderd, customer):
    older = _place_n(orderd, customer, 6)
    first = _list(orderd, customer, page_size=2)
    newer = _place_n(orderd, customer, 3)
    seen = [o.order_id for o in first.orders]
    token = first.next_page_token
    while token:
        page = _list(orderd, customer, page_size=2, page_token=token)
        seen += [o.order_id for o in page.orders]
        token = page.next_page_token
    assert seen == older[::-1]
    assert orderd.order_ids(customer, page_size=4) == (older + newer)[::-1]


def _token(orderd, caller, **kw):
    t = _list(orderd, caller, page_size=1, **kw).next_page_token
    assert t, "expected a next_page_token"
    return t


def _flip(t, i):
    c = t[i]
    return t[:i] + ("B" if c == "A" else "A") + t[i + 1:]


MUTATIONS = {
    "flip-first": lambda t: _flip(t, 0),
    "flip-middle": lambda t: _flip(t, len(t) // 2),
    "flip-near-end": lambda t: _flip(t, len(t) - 2),
    "truncated": lambda t: t[:-4],
    "extended": lambda t: t + "AAAA",
    "garbage": lambda t: "garbage",
    "forged-cursor": lambda t: base64.urlsafe_b64encode(json.dumps(
        {"created_at": 0, "id": "00000000-0000-0000-0000-000000000000"}).encode()).decode(),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_a_modified_page_token_is_invalid(orderd, customer, name):
    _place_n(orderd, customer, 3)
    token = _token(orderd, customer)
    bad = MUTATIONS[name](token)
    assert bad != token
    expect_error(lambda: _list(orderd, customer, page_size=1, page_token=bad), INVALID)


def test_a_page_token_is_bound_to_its_filter(orderd, customer):
    _place_n(orderd, customer, 3)
    token = _token(orderd, customer)
    expect_error(lambda: _list(orderd, customer, page_size=1, page_token=token,
                               statuses=[pb.ORDER_STATUS_PENDING]), INVALID)
    token = _token(orderd, customer, statuses=[pb.ORDER_STATUS_PENDING])
    expect_error(lambda: _list(orderd, customer, page_size=1, page_token=token), INVALID)
    expect_error(lambda: _list(orderd, customer, page_size=1, page_token=token,
                               statuses=[pb.ORDER_STATUS_PAID]), INVALID)
    # the token does work with its own filter
    page = _list(orderd, customer, page_size=1, page_token=token,
                 statuses=[pb.ORDER_STATUS_PENDING])
    assert len(page.orders) == 1


def test_another_customers_page_token_shows_nothing_of_theirs(orderd, customer):
    _place_n(orderd, customer, 3)
    token = _token(orderd, customer)
    other = orderd.customer()
    _place_n(orderd, other, 1)
    try:
        page = _list(orderd, other, page_size=10, page_token=token)
    except grpc.RpcError as e:
        assert e.code() == INVALID, e
        return
    assert all(o.customer_id == other.sub for o in page.orders)


def test_status_filter(orderd, customer):
    pending = orderd.place(customer, [(orderd.pid("widget"), 1)])
    paid = orderd.place(customer, [(orderd.pid("widget"), 2)])
    orderd.call("ConfirmPayment", pb.ConfirmPaymentRequest(
        order_id=paid.order.order_id, provider=pb.PAYMENT_PROVIDER_LOCAL,
        payment_reference=paid.payment.reference), customer)
    cancelled = orderd.place(customer, [(orderd.pid("widget"), 3)])
    orderd.call("CancelOrder", pb.CancelOrderRequest(order_id=cancelled.order.order_id,
                                                     reason="changed my mind"), customer)
    P, C, D = pending.order.order_id, cancelled.order.order_id, paid.order.order_id

    def ids(*statuses):
        return orderd.order_ids(customer, statuses=list(statuses))

    assert ids(pb.ORDER_STATUS_PAID) == [D]
    assert ids(pb.ORDER_STATUS_PENDING) == [P]
    assert ids(pb.ORDER_STATUS_CANCELLED) == [C]
    assert ids(pb.ORDER_STATUS_PENDING, pb.ORDER_STATUS_CANCELLED) == [C, P]
    assert ids(pb.ORDER_STATUS_SHIPPED) == []
    assert ids() == [C, D, P]
    got = orderd.list_all(customer, statuses=[pb.ORDER_STATUS_PAID])
    assert got[0].status == pb.ORDER_STATUS_PAID


def test_customers_see_only_their_own_orders(orderd, customer):
    other = orderd.customer()
    mine = _place_n(orderd, customer, 2)
    theirs = _place_n(orderd, other, 1)
    assert orderd.order_ids(customer) == mine[::-1]
    assert orderd.order_ids(other) == theirs
    assert orderd.order_ids(customer, customer_id=customer.sub) == mine[::-1]
    expect_error(lambda: _list(orderd, customer, customer_id=other.sub),
                 grpc.StatusCode.PERMISSION_DENIED)


@pytest.mark.parametrize("who", ["service", "admin"])
def test_service_and_admin_list_by_customer(orderd, who):
    caller = getattr(orderd, who)
    a, b = orderd.customer(), orderd.customer()
    a_ids = _place_n(orderd, a, 2)
    b_ids = _place_n(orderd, b, 2)
    assert orderd.order_ids(caller, customer_id=a.sub) == a_ids[::-1]
    assert orderd.order_ids(caller, customer_id=b.sub) == b_ids[::-1]
    # Without a filter they see everybody's, newest first: these four lead the list.
    page = _list(orderd, caller, page_size=4)
    assert [o.order_id for o in page.orders] == [b_ids[1], b_ids[0], a_ids[1], a_ids[0]]
