/* test_orders.c — the use cases after PlaceOrder: get and list (visibility, paging),
 * cancel (void or refund, retries), confirm payment, status changes by services, and the
 * catalogue. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "unit/fakes.h"

#define MISSING_ID "3f2c8a4e-1b7d-4c55-9a0e-2f6b8d1c7e90"

/* ---- fixture and helpers ---- */

static int setup(void **state)
{
    fake_env *env = fake_env_create();
    fake_store_put_product(env->store, "apple", "Apple", 1000, "EUR", true);
    *state = env;
    return 0;
}

static int teardown(void **state)
{
    fake_env_destroy(*state);
    return 0;
}

/* Places an order of `qty` apples as customer `who`; its id goes to id_out. */
static void place_as(fake_env *env, const char *who, int32_t qty, char *id_out)
{
    static int seq;
    char rid[32];
    snprintf(rid, sizeof rid, "req-%d", ++seq);
    order_line_cmd line = {"apple", qty};
    order_place_cmd cmd = {rid, "", &line, 1, ORDER_PROVIDER_LOCAL, NULL, NULL};
    order_t o = {0};
    order_payment_action a;
    bool replayed;
    fake_env_as(env, who, ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_place(&env->svc, &env->ctx, &cmd, &o, &a, &replayed), ORDER_OK);
    snprintf(id_out, ORDER_ID_LEN + 1, "%s", o.id);
    order_clear(&o);
    fake_env_again(env);
}

static const order_t *stored(fake_env *env, const char *id)
{
    const order_t *o = fake_store_order(env->store, id);
    assert_non_null(o);
    return o;
}

/* Confirms with the provider's own reference, as the owner would. */
static void pay(fake_env *env, const char *who, const char *id)
{
    order_t o = {0};
    fake_env_as(env, who, ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_confirm_payment(&env->svc, &env->ctx, id, ORDER_PROVIDER_LOCAL,
                                           stored(env, id)->pay_reference, &o),
                     ORDER_OK);
    order_clear(&o);
}

static void ship(fake_env *env, const char *id)
{
    order_t o = {0};
    fake_env_as(env, "warehouse", ORDER_ROLE_SERVICE);
    assert_int_equal(order_update_status(&env->svc, &env->ctx, id, ORDER_STATUS_SHIPPED, -1, &o),
                     ORDER_OK);
    order_clear(&o);
}

/* A message with the order id cut out: what stays is the "kind" of message. */
static void message_shape(const char *msg, const char *id, char *out, size_t cap)
{
    const char *at = strstr(msg, id);
    if (!at) {
        snprintf(out, cap, "%s", msg);
        return;
    }
    snprintf(out, cap, "%.*s<id>%s", (int)(at - msg), msg, at + strlen(id));
}

/* ---- get ---- */

static void test_get_visibility(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    order_t o = {0};

    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_get(&env->svc, &env->ctx, id, &o), ORDER_OK);
    assert_string_equal(o.id, id);
    assert_int_equal(o.nitems, 1);
    order_clear(&o);

    fake_env_as(env, "checkout", ORDER_ROLE_SERVICE);
    assert_int_equal(order_get(&env->svc, &env->ctx, id, &o), ORDER_OK);
    order_clear(&o);
    fake_env_as(env, "root", ORDER_ROLE_ADMIN);
    assert_int_equal(order_get(&env->svc, &env->ctx, id, &o), ORDER_OK);
    order_clear(&o);

    /* Another customer: NOT_FOUND, told exactly as for an id that does not exist. */
    char other[256], missing[256];
    fake_env_as(env, "mallory", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_get(&env->svc, &env->ctx, id, &o), ORDER_ENOTFOUND);
    assert_int_equal(env->err.code, ORDER_ENOTFOUND);
    assert_null(o.items);
    message_shape(env->err.message, id, other, sizeof other);
    fake_env_again(env);
    assert_int_equal(order_get(&env->svc, &env->ctx, MISSING_ID, &o), ORDER_ENOTFOUND);
    message_shape(env->err.message, MISSING_ID, missing, sizeof missing);
    assert_string_equal(other, missing);
    assert_string_equal(env->err.reason, "");
}

static void test_get_invalid_id(void **state)
{
    fake_env *env = *state;
    order_t o = {0};
    static const char *const bad[] = {"", "42", "3f2c8a4e-1b7d-4c55-9a0e-2f6b8d1c7e9z"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        fake_env_again(env);
        assert_int_equal(order_get(&env->svc, &env->ctx, bad[i], &o), ORDER_EINVAL);
        assert_int_equal(env->err.nviolations, 1);
        assert_string_equal(env->err.violations[0].field, "order_id");
    }
    fake_env_again(env);
    assert_int_equal(order_get(&env->svc, &env->ctx, NULL, &o), ORDER_EINVAL);
    assert_string_equal(env->err.violations[0].field, "order_id");
    assert_int_equal(env->store->calls[FAKE_ORDER_GET], 0);
}

static void test_get_store_down(void **state)
{
    fake_env *env = *state;
    order_t o = {0};
    env->store->down = true;
    assert_int_equal(order_get(&env->svc, &env->ctx, MISSING_ID, &o), ORDER_EUNAVAILABLE);
    env->store->down = false;
    fake_env_again(env);
    env->ctx.deadline_mono_us = 1;
    assert_int_equal(order_get(&env->svc, &env->ctx, MISSING_ID, &o), ORDER_EDEADLINE);
}

/* ---- list ---- */

/* alice: 5 orders (two PAID), bob: 2. */
static void seed_list(fake_env *env, char ids[7][ORDER_ID_LEN + 1])
{
    for (int i = 0; i < 5; i++)
        place_as(env, "alice", i + 1, ids[i]);
    place_as(env, "bob", 1, ids[5]);
    place_as(env, "bob", 2, ids[6]);
    pay(env, "alice", ids[1]);
    pay(env, "alice", ids[3]);
}

static int list(fake_env *env, int32_t page_size, const char *customer, const int *statuses,
                size_t nstatuses, const order_t *after, order_t **out, size_t *n, bool *more)
{
    order_list_cmd cmd = {
        .page_size = page_size,
        .customer_id = customer,
        .statuses = statuses,
        .nstatuses = nstatuses,
        .has_cursor = after != NULL,
        .cursor_created_at_us = after ? after->created_at_us : 0,
        .cursor_id = after ? after->id : NULL,
    };
    return order_list(&env->svc, &env->ctx, &cmd, out, n, more);
}

static void test_list_own_orders_newest_first(void **state)
{
    fake_env *env = *state;
    char ids[7][ORDER_ID_LEN + 1];
    seed_list(env, ids);
    order_t *out;
    size_t n;
    bool more;
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(list(env, 0, "", NULL, 0, NULL, &out, &n, &more), ORDER_OK);
    assert_int_equal(env->store->last_list.limit, ORDER_PAGE_SIZE_DEFAULT + 1);
    assert_string_equal(env->store->last_list.customer_id, "alice");
    assert_int_equal(n, 5);
    assert_false(more);
    for (size_t i = 0; i < n; i++) {
        assert_string_equal(out[i].id, ids[4 - i]); /* newest first */
        assert_string_equal(out[i].customer_id, "alice");
        assert_int_equal(out[i].nitems, 1);
    }
    order_list_free(out, n);

    /* Naming themselves is the same; naming someone else is refused. */
    fake_env_again(env);
    assert_int_equal(list(env, 0, "alice", NULL, 0, NULL, &out, &n, &more), ORDER_OK);
    assert_int_equal(n, 5);
    order_list_free(out, n);
    int calls = env->store->calls[FAKE_ORDER_LIST];
    fake_env_again(env);
    assert_int_equal(list(env, 0, "bob", NULL, 0, NULL, &out, &n, &more), ORDER_EPERM);
    assert_int_equal(env->err.code, ORDER_EPERM);
    assert_null(out);
    assert_int_equal(n, 0);
    assert_int_equal(env->store->calls[FAKE_ORDER_LIST], calls);
}

static void test_list_privileged(void **state)
{
    fake_env *env = *state;
    char ids[7][ORDER_ID_LEN + 1];
    seed_list(env, ids);
    order_t *out;
    size_t n;
    bool more;
    fake_env_as(env, "root", ORDER_ROLE_ADMIN);
    assert_int_equal(list(env, 0, "", NULL, 0, NULL, &out, &n, &more), ORDER_OK);
    assert_null(env->store->last_list.customer_id); /* any customer */
    assert_int_equal(n, 7);
    order_list_free(out, n);

    fake_env_as(env, "checkout", ORDER_ROLE_SERVICE);
    assert_int_equal(list(env, 0, "bob", NULL, 0, NULL, &out, &n, &more), ORDER_OK);
    assert_int_equal(n, 2);
    assert_string_equal(out[0].id, ids[6]);
    assert_string_equal(out[1].id, ids[5]);
    order_list_free(out, n);
}

static void test_list_status_filter(void **state)
{
    fake_env *env = *state;
    char ids[7][ORDER_ID_LEN + 1];
    seed_list(env, ids);
    order_t *out;
    size_t n;
    bool more;
    int paid[] = {ORDER_STATUS_PAID};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(list(env, 0, "", paid, 1, NULL, &out, &n, &more), ORDER_OK);
    assert_int_equal(env->store->last_list.status_set, ORDER_STATUS_BIT(ORDER_STATUS_PAID));
    assert_int_equal(n, 2);
    assert_string_equal(out[0].id, ids[3]);
    assert_string_equal(out[1].id, ids[1]);
    order_list_free(out, n);

    int both[] = {ORDER_STATUS_PAID, ORDER_STATUS_PENDING};
    fake_env_again(env);
    assert_int_equal(list(env, 0, "", both, 2, NULL, &out, &n, &more), ORDER_OK);
    assert_int_equal(n, 5);
    order_list_free(out, n);

    int bad[] = {ORDER_STATUS_PAID, 0, ORDER_STATUS_MAX + 1};
    fake_env_again(env);
    assert_int_equal(list(env, 0, "", bad, 3, NULL, &out, &n, &more), ORDER_EINVAL);
    assert_int_equal(env->err.nviolations, 2);
    assert_string_equal(env->err.violations[0].field, "statuses[1]");
    assert_string_equal(env->err.violations[1].field, "statuses[2]");
}

static void test_list_page_size(void **state)
{
    fake_env *env = *state;
    order_t *out;
    size_t n;
    bool more;
    fake_env_as(env, "root", ORDER_ROLE_ADMIN);
    assert_int_equal(list(env, 501, "", NULL, 0, NULL, &out, &n, &more), ORDER_OK);
    assert_int_equal(env->store->last_list.limit, ORDER_PAGE_SIZE_MAX + 1);
    order_list_free(out, n);
    fake_env_again(env);
    assert_int_equal(list(env, INT32_MAX, "", NULL, 0, NULL, &out, &n, &more), ORDER_OK);
    assert_int_equal(env->store->last_list.limit, ORDER_PAGE_SIZE_MAX + 1);
    order_list_free(out, n);
    fake_env_again(env);
    assert_int_equal(list(env, 7, "", NULL, 0, NULL, &out, &n, &more), ORDER_OK);
    assert_int_equal(env->store->last_list.limit, 8);
    order_list_free(out, n);

    int calls = env->store->calls[FAKE_ORDER_LIST];
    fake_env_again(env);
    assert_int_equal(list(env, -1, "", NULL, 0, NULL, &out, &n, &more), ORDER_EINVAL);
    assert_int_equal(env->err.nviolations, 1);
    assert_string_equal(env->err.violations[0].field, "page_size");
    assert_int_equal(env->store->calls[FAKE_ORDER_LIST], calls);
}

/* 600 orders: a default page holds 50, a page of 501 asked for holds 500, and `more`
 * says whether another follows. */
static void test_list_returns_exactly_a_page(void **state)
{
    fake_env *env = *state;
    for (int i = 0; i < 600; i++) {
        order_t o = {.customer_id = "carol", .status = ORDER_STATUS_PENDING, .currency = "EUR"};
        fake_store_seed(env->store, &o);
    }
    order_t *out;
    size_t n;
    bool more;
    fake_env_as(env, "carol", ORDER_ROLE_CUSTOMER);
    assert_int_equal(list(env, 0, "", NULL, 0, NULL, &out, &n, &more), ORDER_OK);
    assert_int_equal(n, 50);
    assert_true(more);
    order_list_free(out, n);

    fake_env_again(env);
    assert_int_equal(list(env, 501, "", NULL, 0, NULL, &out, &n, &more), ORDER_OK);
    assert_int_equal(n, 500);
    assert_true(more);
    /* the page's last order is the cursor of the next page, which holds the 100 left */
    order_t last = {0};
    assert_int_equal(order_copy(&last, &out[n - 1]), ORDER_OK);
    order_list_free(out, n);
    fake_env_again(env);
    assert_int_equal(list(env, 500, "", NULL, 0, &last, &out, &n, &more), ORDER_OK);
    assert_int_equal(n, 100);
    assert_false(more);
    order_list_free(out, n);
    order_clear(&last);
}

/* Walks every page of `size` and checks each order is seen once, newest first. */
static void walk_pages(fake_env *env, int32_t size, size_t total)
{
    order_t prev = {0};
    size_t seen = 0, pages = 0;
    bool more = true, first = true;
    while (more) {
        order_t *out;
        size_t n;
        fake_env_again(env);
        assert_int_equal(list(env, size, "", NULL, 0, first ? NULL : &prev, &out, &n, &more),
                         ORDER_OK);
        assert_true(n <= (size_t)size);
        if (more)
            assert_int_equal(n, size);
        for (size_t i = 0; i < n; i++) {
            if (!first) { /* strictly older, or as old with a smaller id */
                assert_true(out[i].created_at_us <= prev.created_at_us);
                if (out[i].created_at_us == prev.created_at_us)
                    assert_true(strcmp(out[i].id, prev.id) < 0);
            }
            order_clear(&prev);
            assert_int_equal(order_copy(&prev, &out[i]), ORDER_OK);
            first = false;
        }
        seen += n;
        pages++;
        order_list_free(out, n);
        assert_true(pages <= total + 1);
    }
    order_clear(&prev);
    assert_int_equal(seen, total);
}

static void test_list_pages_with_a_cursor(void **state)
{
    fake_env *env = *state;
    char ids[7][ORDER_ID_LEN + 1];
    seed_list(env, ids);
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    walk_pages(env, 2, 5);
    walk_pages(env, 1, 5);
    walk_pages(env, 5, 5);

    /* Orders created in the same microsecond: the id breaks the tie, nothing is lost. */
    env->store->step_us = 0;
    for (int i = 0; i < 9; i++) {
        order_t o = {.customer_id = "dave", .status = ORDER_STATUS_PENDING, .currency = "EUR"};
        fake_store_seed(env->store, &o);
    }
    fake_env_as(env, "dave", ORDER_ROLE_CUSTOMER);
    walk_pages(env, 2, 9);
    walk_pages(env, 4, 9);
}

static void test_list_bad_cursor(void **state)
{
    fake_env *env = *state;
    order_t *out;
    size_t n;
    bool more;
    order_t forged = {.id = "not-an-id", .created_at_us = 5};
    assert_int_equal(list(env, 0, "", NULL, 0, &forged, &out, &n, &more), ORDER_EINVAL);
    assert_string_equal(env->err.violations[0].field, "page_token");
    assert_int_equal(env->store->calls[FAKE_ORDER_LIST], 0);
}

/* ---- cancel ---- */

static void test_cancel_pending_voids_the_payment(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    order_t o = {0};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "changed my mind", &o), ORDER_OK);
    assert_int_equal(o.status, ORDER_STATUS_CANCELLED);
    assert_int_equal(o.pay_status, ORDER_PAY_VOIDED);
    assert_string_equal(o.cancel_reason, "changed my mind");
    assert_int_equal(env->local->calls[FAKE_PAY_CANCEL], 1);
    assert_int_equal(env->local->voided, 1);
    assert_int_equal(env->local->calls[FAKE_PAY_REFUND], 0);
    assert_int_equal(fake_payments_find(env->local, id)->status, ORDER_PAY_VOIDED);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_CANCELLED);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_VOIDED);
    assert_int_equal(stored(env, id)->version, o.version);

    const fake_history *h = fake_store_history_last(env->store, id);
    assert_non_null(h);
    assert_int_equal(h->from, ORDER_STATUS_PENDING);
    assert_int_equal(h->to, ORDER_STATUS_CANCELLED);
    assert_string_equal(h->actor, "alice");
    assert_string_equal(h->reason, "changed my mind");
    order_clear(&o);
}

static void test_cancel_paid_refunds_once(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 2, id);
    pay(env, "alice", id);
    order_t o = {0};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "", &o), ORDER_OK);
    assert_int_equal(o.status, ORDER_STATUS_CANCELLED);
    assert_int_equal(o.pay_status, ORDER_PAY_REFUNDED);
    assert_int_equal(env->local->refunded, 1);
    assert_int_equal(fake_payments_find(env->local, id)->status, ORDER_PAY_REFUNDED);
    int64_t version = o.version;
    size_t hist = fake_store_history_count(env->store, id);
    order_clear(&o);

    /* Again: OK, the same order, nothing moves, no second refund. */
    int refund_calls = env->local->calls[FAKE_PAY_REFUND];
    int writes = fake_store_writes(env->store);
    fake_env_again(env);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "again", &o), ORDER_OK);
    assert_int_equal(o.status, ORDER_STATUS_CANCELLED);
    assert_int_equal(o.version, version);
    assert_string_equal(o.cancel_reason, "cancelled");
    assert_int_equal(env->local->calls[FAKE_PAY_REFUND], refund_calls);
    assert_int_equal(env->local->refunded, 1);
    assert_int_equal(fake_store_writes(env->store), writes);
    assert_int_equal(fake_store_history_count(env->store, id), hist);
    order_clear(&o);
}

static void test_cancel_after_shipping_is_refused(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    pay(env, "alice", id);
    ship(env, id);
    int64_t version = stored(env, id)->version;
    order_t o = {0};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "too late?", &o), ORDER_EPRECONDITION);
    assert_int_equal(env->err.code, ORDER_EPRECONDITION);
    assert_int_equal(env->err.current_status, ORDER_STATUS_SHIPPED);
    assert_string_equal(env->err.precondition_type, "ORDER_STATUS");
    assert_string_equal(env->err.precondition_subject, id);
    assert_null(o.items);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_SHIPPED);
    assert_int_equal(stored(env, id)->version, version);
    assert_int_equal(env->local->calls[FAKE_PAY_REFUND], 0);
}

static void test_cancel_reason_length(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    char reason[ORDER_REASON_MAX + 2];
    memset(reason, 'x', sizeof reason - 1);
    reason[sizeof reason - 1] = '\0'; /* 501 */
    order_t o = {0};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, reason, &o), ORDER_EINVAL);
    assert_int_equal(env->err.nviolations, 1);
    assert_string_equal(env->err.violations[0].field, "reason");
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PENDING);
    assert_int_equal(env->store->calls[FAKE_ORDER_TRANSITION], 0);

    /* with a bad id too: both at once */
    fake_env_again(env);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, "x", reason, &o), ORDER_EINVAL);
    assert_int_equal(env->err.nviolations, 2);
    assert_string_equal(env->err.violations[0].field, "order_id");
    assert_string_equal(env->err.violations[1].field, "reason");

    reason[ORDER_REASON_MAX] = '\0'; /* 500 is fine and kept whole */
    fake_env_again(env);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, reason, &o), ORDER_OK);
    assert_int_equal(strlen(o.cancel_reason), ORDER_REASON_MAX);
    order_clear(&o);
}

static void test_cancel_refund_fails_then_retry(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    pay(env, "alice", id);
    env->local->fail[FAKE_PAY_REFUND] = 1;
    order_t o = {0};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "no", &o), ORDER_EUNAVAILABLE);
    assert_int_equal(env->err.code, ORDER_EUNAVAILABLE);
    assert_null(o.items);
    /* The cancel stands; the money has not gone back yet, and the order says so. */
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_CANCELLED);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_SUCCEEDED);
    assert_int_equal(env->local->refunded, 0);

    fake_env_again(env);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "no", &o), ORDER_OK);
    assert_int_equal(o.status, ORDER_STATUS_CANCELLED);
    assert_int_equal(o.pay_status, ORDER_PAY_REFUNDED);
    assert_int_equal(env->local->refunded, 1);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_REFUNDED);
    order_clear(&o);
}

static void test_cancel_refund_done_but_not_recorded(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    pay(env, "alice", id);
    env->store->fail[FAKE_ORDER_AMEND] = 1;
    order_t o = {0};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "", &o), ORDER_EUNAVAILABLE);
    assert_int_equal(env->local->refunded, 1);
    fake_env_again(env);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "", &o), ORDER_OK);
    assert_int_equal(o.pay_status, ORDER_PAY_REFUNDED);
    assert_int_equal(env->local->refunded, 1); /* the provider refunded once */
    order_clear(&o);
}

/* The customer paid at the provider, but the confirmation had not reached orderd when the
 * cancel came: the order ends cancelled and the money goes back. */
static void test_cancel_pending_that_was_paid_meanwhile(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    fake_payments_mark_paid(env->local, id);
    order_t o = {0};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "", &o), ORDER_OK);
    assert_int_equal(o.status, ORDER_STATUS_CANCELLED);
    assert_int_equal(o.pay_status, ORDER_PAY_REFUNDED);
    assert_int_equal(env->local->refunded, 1);
    assert_int_equal(env->local->voided, 0);
    order_clear(&o);
}

static void test_cancel_someone_elses_order(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    order_t o = {0};
    fake_env_as(env, "mallory", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "", &o), ORDER_ENOTFOUND);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PENDING);
    assert_int_equal(env->store->calls[FAKE_ORDER_TRANSITION], 0);

    fake_env_as(env, "support", ORDER_ROLE_ADMIN); /* an admin may */
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "fraud", &o), ORDER_OK);
    assert_string_equal(fake_store_history_last(env->store, id)->actor, "support");
    order_clear(&o);
}

/* ---- confirm payment ---- */

static void test_confirm_with_the_right_reference(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    int64_t version = stored(env, id)->version;
    char ref[ORDER_REFERENCE_MAX + 1];
    snprintf(ref, sizeof ref, "%s", stored(env, id)->pay_reference);
    order_t o = {0};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_confirm_payment(&env->svc, &env->ctx, id, ORDER_PROVIDER_LOCAL, ref, &o),
                     ORDER_OK);
    assert_int_equal(o.status, ORDER_STATUS_PAID);
    assert_int_equal(o.pay_status, ORDER_PAY_SUCCEEDED);
    assert_true(o.paid_at_us != 0);
    assert_true(o.paid_at_us == fake_payments_find(env->local, id)->paid_at_us);
    assert_int_equal(o.version, version + 1);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PAID);
    const fake_history *h = fake_store_history_last(env->store, id);
    assert_int_equal(h->from, ORDER_STATUS_PENDING);
    assert_int_equal(h->to, ORDER_STATUS_PAID);
    order_clear(&o);

    /* Twice: a no-op that returns the order. */
    int transitions = env->store->calls[FAKE_ORDER_TRANSITION];
    fake_env_again(env);
    assert_int_equal(order_confirm_payment(&env->svc, &env->ctx, id, ORDER_PROVIDER_LOCAL, ref, &o),
                     ORDER_OK);
    assert_int_equal(o.status, ORDER_STATUS_PAID);
    assert_int_equal(o.version, version + 1);
    assert_int_equal(env->store->calls[FAKE_ORDER_TRANSITION], transitions);
    assert_int_equal(stored(env, id)->version, version + 1);
    order_clear(&o);

    /* Once paid, another reference is refused. */
    fake_env_again(env);
    assert_int_equal(
        order_confirm_payment(&env->svc, &env->ctx, id, ORDER_PROVIDER_LOCAL, "lp_other", &o),
        ORDER_EPRECONDITION);
    assert_int_equal(stored(env, id)->version, version + 1);
}

static void test_confirm_with_a_wrong_reference(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    order_t before = {0}, o = {0};
    assert_int_equal(order_copy(&before, stored(env, id)), ORDER_OK);
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(
        order_confirm_payment(&env->svc, &env->ctx, id, ORDER_PROVIDER_LOCAL, "lp_9999_forged", &o),
        ORDER_EPRECONDITION);
    assert_int_equal(env->err.code, ORDER_EPRECONDITION);
    assert_null(o.items);
    const order_t *s = stored(env, id);
    assert_int_equal(s->status, ORDER_STATUS_PENDING);
    assert_int_equal(s->pay_status, before.pay_status);
    assert_int_equal(s->version, before.version);
    assert_int_equal(s->paid_at_us, 0);
    assert_int_equal(env->store->calls[FAKE_ORDER_TRANSITION], 0);
    assert_int_equal(fake_payments_find(env->local, id)->status, ORDER_PAY_PENDING);
    order_clear(&before);
}

static void test_confirm_with_the_wrong_provider(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    int64_t version = stored(env, id)->version;
    order_t o = {0};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_confirm_payment(&env->svc, &env->ctx, id, ORDER_PROVIDER_STRIPE,
                                           stored(env, id)->pay_reference, &o),
                     ORDER_EPRECONDITION);
    assert_string_equal(env->err.reason, "PAYMENT_PROVIDER_MISMATCH");
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PENDING);
    assert_int_equal(stored(env, id)->version, version);
    assert_int_equal(env->local->calls[FAKE_PAY_VERIFY], 0);
}

static void test_confirm_invalid_arguments(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    order_t o = {0};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(
        order_confirm_payment(&env->svc, &env->ctx, id, ORDER_PROVIDER_UNSPECIFIED, "", &o),
        ORDER_EINVAL);
    assert_int_equal(env->err.nviolations, 2);
    assert_string_equal(env->err.violations[0].field, "provider");
    assert_string_equal(env->err.violations[1].field, "payment_reference");

    fake_env_again(env);
    assert_int_equal(
        order_confirm_payment(&env->svc, &env->ctx, "nope", (order_provider)9, NULL, &o),
        ORDER_EINVAL);
    assert_int_equal(env->err.nviolations, 3);
    assert_string_equal(env->err.violations[0].field, "order_id");

    char longref[ORDER_REFERENCE_MAX + 2];
    memset(longref, 'r', sizeof longref - 1);
    longref[sizeof longref - 1] = '\0';
    fake_env_again(env);
    assert_int_equal(
        order_confirm_payment(&env->svc, &env->ctx, id, ORDER_PROVIDER_LOCAL, longref, &o),
        ORDER_EINVAL);
    assert_string_equal(env->err.violations[0].field, "payment_reference");
    assert_int_equal(env->store->calls[FAKE_ORDER_GET], 0);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PENDING);
}

static void test_confirm_a_cancelled_order(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    char ref[ORDER_REFERENCE_MAX + 1];
    snprintf(ref, sizeof ref, "%s", stored(env, id)->pay_reference);
    order_t o = {0};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "", &o), ORDER_OK);
    int64_t version = o.version;
    order_clear(&o);

    fake_env_again(env);
    assert_int_equal(order_confirm_payment(&env->svc, &env->ctx, id, ORDER_PROVIDER_LOCAL, ref, &o),
                     ORDER_EPRECONDITION);
    assert_int_equal(env->err.current_status, ORDER_STATUS_CANCELLED);
    assert_string_equal(env->err.precondition_type, "ORDER_STATUS");
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_CANCELLED);
    assert_int_equal(stored(env, id)->version, version);
}

static void test_confirm_someone_elses_order(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    order_t o = {0};
    fake_env_as(env, "mallory", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_confirm_payment(&env->svc, &env->ctx, id, ORDER_PROVIDER_LOCAL,
                                           stored(env, id)->pay_reference, &o),
                     ORDER_ENOTFOUND);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PENDING);
    assert_int_equal(env->local->calls[FAKE_PAY_VERIFY], 0);
}

/* ---- races: another writer gets in between the domain's read and its update ---- */

struct race {
    fake_env *env;
    const char *id;
    enum { RACE_CANCEL, RACE_SHIP, RACE_CONFIRM } what;
    int rc;
};

/* The other writer: its own caller, context and error, as another request would have. */
static void race_run(void *arg)
{
    struct race *r = arg;
    order_error *err = calloc(1, sizeof *err);
    assert_non_null(err);
    order_ctx ctx = {.deadline_mono_us = INT64_MAX, .err = err};
    snprintf(ctx.caller.subject, sizeof ctx.caller.subject, "other");
    ctx.caller.roles = ORDER_ROLE_ADMIN;
    order_t o = {0};
    switch (r->what) {
    case RACE_CANCEL:
        r->rc = order_cancel(&r->env->svc, &ctx, r->id, "raced", &o);
        break;
    case RACE_SHIP:
        r->rc = order_update_status(&r->env->svc, &ctx, r->id, ORDER_STATUS_SHIPPED, -1, &o);
        break;
    case RACE_CONFIRM: {
        const order_t *s = fake_store_order(r->env->store, r->id);
        r->rc = order_confirm_payment(&r->env->svc, &ctx, r->id, ORDER_PROVIDER_LOCAL,
                                      s->pay_reference, &o);
        break;
    }
    }
    order_clear(&o);
    free(err);
}

static void race_at_next_transition(fake_env *env, struct race *r)
{
    env->store->hook = race_run;
    env->store->hook_arg = r;
    env->store->hook_op = FAKE_ORDER_TRANSITION;
}

/* The payment is confirmed while a cancel wins the update: the order stays cancelled and
 * the money goes back; the confirming caller hears that the order is cancelled. */
static void test_race_confirm_loses_to_cancel(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    struct race r = {env, id, RACE_CANCEL, -100};
    race_at_next_transition(env, &r);
    order_t o = {0};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_confirm_payment(&env->svc, &env->ctx, id, ORDER_PROVIDER_LOCAL,
                                           stored(env, id)->pay_reference, &o),
                     ORDER_EPRECONDITION);
    assert_int_equal(r.rc, ORDER_OK);
    assert_int_equal(env->err.code, ORDER_EPRECONDITION);
    assert_int_equal(env->err.current_status, ORDER_STATUS_CANCELLED);
    assert_string_equal(env->err.precondition_type, "ORDER_STATUS");
    assert_null(o.items);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_CANCELLED);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_REFUNDED);
    assert_int_equal(fake_payments_find(env->local, id)->status, ORDER_PAY_REFUNDED);
    assert_int_equal(env->local->refunded, 1);
}

static void test_race_cancel_loses_to_shipping(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    pay(env, "alice", id);
    struct race r = {env, id, RACE_SHIP, -100};
    race_at_next_transition(env, &r);
    order_t o = {0};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "", &o), ORDER_EPRECONDITION);
    assert_int_equal(r.rc, ORDER_OK);
    assert_int_equal(env->err.current_status, ORDER_STATUS_SHIPPED);
    assert_string_equal(env->err.precondition_type, "ORDER_STATUS");
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_SHIPPED);
    assert_int_equal(stored(env, id)->pay_status, ORDER_PAY_SUCCEEDED);
    assert_int_equal(env->local->calls[FAKE_PAY_REFUND], 0);
}

static void test_race_two_cancels(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    pay(env, "alice", id);
    struct race r = {env, id, RACE_CANCEL, -100};
    race_at_next_transition(env, &r);
    order_t o = {0};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_cancel(&env->svc, &env->ctx, id, "mine", &o), ORDER_OK);
    assert_int_equal(r.rc, ORDER_OK);
    assert_int_equal(o.status, ORDER_STATUS_CANCELLED);
    assert_int_equal(o.pay_status, ORDER_PAY_REFUNDED);
    assert_string_equal(o.cancel_reason, "raced"); /* the winner's */
    assert_int_equal(env->local->refunded, 1);
    order_clear(&o);
}

static void test_race_two_confirms(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    struct race r = {env, id, RACE_CONFIRM, -100};
    race_at_next_transition(env, &r);
    order_t o = {0};
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_confirm_payment(&env->svc, &env->ctx, id, ORDER_PROVIDER_LOCAL,
                                           stored(env, id)->pay_reference, &o),
                     ORDER_OK);
    assert_int_equal(r.rc, ORDER_OK);
    assert_int_equal(env->err.code, ORDER_OK);
    assert_int_equal(o.status, ORDER_STATUS_PAID);
    assert_int_equal(o.version, stored(env, id)->version);
    /* placed, paid: one transition to PAID however many confirmations */
    assert_int_equal(fake_store_history_count(env->store, id), 2);
    order_clear(&o);
}

/* ---- status changes ---- */

static void test_ship_then_deliver(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    pay(env, "alice", id);
    order_t o = {0};
    fake_env_as(env, "warehouse", ORDER_ROLE_SERVICE);
    assert_int_equal(order_update_status(&env->svc, &env->ctx, id, ORDER_STATUS_SHIPPED, -1, &o),
                     ORDER_OK);
    assert_int_equal(o.status, ORDER_STATUS_SHIPPED);
    int64_t v = o.version;
    order_clear(&o);
    const fake_history *h = fake_store_history_last(env->store, id);
    assert_int_equal(h->from, ORDER_STATUS_PAID);
    assert_int_equal(h->to, ORDER_STATUS_SHIPPED);
    assert_string_equal(h->actor, "warehouse");

    fake_env_as(env, "root", ORDER_ROLE_ADMIN);
    assert_int_equal(order_update_status(&env->svc, &env->ctx, id, ORDER_STATUS_DELIVERED, v, &o),
                     ORDER_OK);
    assert_int_equal(o.status, ORDER_STATUS_DELIVERED);
    assert_int_equal(o.version, v + 1);
    order_clear(&o);
    /* placed, paid, shipped, delivered */
    assert_int_equal(fake_store_history_count(env->store, id), 4);
}

static void test_ship_an_unpaid_order(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    order_t o = {0};
    fake_env_as(env, "warehouse", ORDER_ROLE_SERVICE);
    assert_int_equal(order_update_status(&env->svc, &env->ctx, id, ORDER_STATUS_SHIPPED, -1, &o),
                     ORDER_EPRECONDITION);
    assert_int_equal(env->err.current_status, ORDER_STATUS_PENDING);
    assert_string_equal(env->err.precondition_type, "ORDER_STATUS");
    assert_null(o.items);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PENDING);

    fake_env_again(env); /* and delivering what never shipped */
    assert_int_equal(order_update_status(&env->svc, &env->ctx, id, ORDER_STATUS_DELIVERED, -1, &o),
                     ORDER_EPRECONDITION);
    assert_int_equal(env->err.current_status, ORDER_STATUS_PENDING);
}

static void test_update_status_arguments(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    pay(env, "alice", id);
    order_t o = {0};
    static const order_status bad[] = {ORDER_STATUS_CANCELLED, ORDER_STATUS_PAID,
                                       ORDER_STATUS_PENDING, ORDER_STATUS_UNSPECIFIED,
                                       ORDER_STATUS_EXPIRED};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        fake_env_as(env, "root", ORDER_ROLE_ADMIN);
        assert_int_equal(order_update_status(&env->svc, &env->ctx, id, bad[i], -1, &o),
                         ORDER_EINVAL);
        assert_int_equal(env->err.nviolations, 1);
        assert_string_equal(env->err.violations[0].field, "status");
    }
    fake_env_again(env);
    assert_int_equal(order_update_status(&env->svc, &env->ctx, id, ORDER_STATUS_SHIPPED, 0, &o),
                     ORDER_EINVAL);
    assert_string_equal(env->err.violations[0].field, "expected_version");

    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER); /* even the owner may not */
    assert_int_equal(order_update_status(&env->svc, &env->ctx, id, ORDER_STATUS_SHIPPED, -1, &o),
                     ORDER_EPERM);
    assert_int_equal(env->err.code, ORDER_EPERM);
    assert_int_equal(env->store->calls[FAKE_ORDER_TRANSITION], 1); /* only the payment's */
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PAID);
}

static void test_update_status_expected_version(void **state)
{
    fake_env *env = *state;
    char id[ORDER_ID_LEN + 1];
    place_as(env, "alice", 1, id);
    pay(env, "alice", id);
    int64_t v = stored(env, id)->version;
    order_t o = {0};

    fake_env_as(env, "warehouse", ORDER_ROLE_SERVICE);
    assert_int_equal(order_update_status(&env->svc, &env->ctx, id, ORDER_STATUS_SHIPPED, v - 1, &o),
                     ORDER_EPRECONDITION);
    assert_string_equal(env->err.precondition_type, "ORDER_VERSION");
    assert_int_equal(env->err.current_status, ORDER_STATUS_PAID);
    assert_int_equal(stored(env, id)->status, ORDER_STATUS_PAID);
    assert_int_equal(stored(env, id)->version, v);

    fake_env_again(env);
    assert_int_equal(order_update_status(&env->svc, &env->ctx, id, ORDER_STATUS_SHIPPED, v, &o),
                     ORDER_OK);
    assert_int_equal(o.status, ORDER_STATUS_SHIPPED);
    assert_int_equal(o.version, v + 1);
    order_clear(&o);

    /* A stale version on an order that also moved on: the status is what is wrong. */
    fake_env_again(env);
    assert_int_equal(order_update_status(&env->svc, &env->ctx, id, ORDER_STATUS_SHIPPED, v, &o),
                     ORDER_EPRECONDITION);
    assert_string_equal(env->err.precondition_type, "ORDER_STATUS");
    assert_int_equal(env->err.current_status, ORDER_STATUS_SHIPPED);
}

static void test_update_status_missing_order(void **state)
{
    fake_env *env = *state;
    order_t o = {0};
    fake_env_as(env, "warehouse", ORDER_ROLE_SERVICE);
    assert_int_equal(
        order_update_status(&env->svc, &env->ctx, MISSING_ID, ORDER_STATUS_SHIPPED, -1, &o),
        ORDER_ENOTFOUND);
}

/* ---- catalogue ---- */

static void test_product_upsert_validation(void **state)
{
    fake_env *env = *state;
    order_product p = {.id = "bad id!", .name = "", .unit_price_minor = -1, .currency = "eur"};
    order_product out;
    fake_env_as(env, "root", ORDER_ROLE_ADMIN);
    assert_int_equal(order_product_upsert(&env->svc, &env->ctx, &p, &out), ORDER_EINVAL);
    assert_int_equal(env->err.nviolations, 4);
    assert_string_equal(env->err.violations[0].field, "product.product_id");
    assert_string_equal(env->err.violations[1].field, "product.name");
    assert_string_equal(env->err.violations[2].field, "product.unit_price_minor");
    assert_string_equal(env->err.violations[3].field, "product.currency");

    /* One bad character is enough; an empty id is reported as such. */
    static const char *const bad_ids[] = {"", "caf\xc3\xa9", "a/b", "a;b", "a b"};
    order_product q = {.name = "Thing", .unit_price_minor = 1, .currency = "EUR"};
    for (size_t i = 0; i < sizeof bad_ids / sizeof *bad_ids; i++) {
        snprintf(q.id, sizeof q.id, "%s", bad_ids[i]);
        fake_env_again(env);
        assert_int_equal(order_product_upsert(&env->svc, &env->ctx, &q, &out), ORDER_EINVAL);
        assert_int_equal(env->err.nviolations, 1);
        assert_string_equal(env->err.violations[0].field, "product.product_id");
    }
    assert_int_equal(env->store->calls[FAKE_PRODUCT_UPSERT], 0);
}

static void test_product_upsert_limits(void **state)
{
    fake_env *env = *state;
    order_product out;
    order_product ok = {.id = "tea-green_1.0",
                        .name = "Green tea",
                        .unit_price_minor = 0,
                        .currency = "JPY",
                        .active = true};
    fake_env_as(env, "root", ORDER_ROLE_ADMIN);
    assert_int_equal(order_product_upsert(&env->svc, &env->ctx, &ok, &out), ORDER_OK);
    assert_string_equal(out.id, "tea-green_1.0");
    assert_int_equal(out.unit_price_minor, 0);

    order_product bad = ok;
    bad.unit_price_minor = FAKE_MAX_TOTAL + 1;
    snprintf(bad.currency, sizeof bad.currency, "XXY");
    fake_env_again(env);
    assert_int_equal(order_product_upsert(&env->svc, &env->ctx, &bad, &out), ORDER_EINVAL);
    assert_int_equal(env->err.nviolations, 2);
    assert_string_equal(env->err.violations[0].field, "product.unit_price_minor");
    assert_string_equal(env->err.violations[1].field, "product.currency");
}

static void test_product_upsert_long_fields(void **state)
{
    fake_env *env = *state;
    /* The longest id and name the contract allows are accepted and kept whole. */
    order_product p = {.unit_price_minor = 1, .currency = "EUR"};
    memset(p.id, 'a', ORDER_PRODUCT_ID_MAX);
    memset(p.name, 'n', ORDER_PRODUCT_NAME_MAX);
    order_product out;
    fake_env_as(env, "root", ORDER_ROLE_ADMIN);
    assert_int_equal(order_product_upsert(&env->svc, &env->ctx, &p, &out), ORDER_OK);
    assert_int_equal(strlen(out.id), ORDER_PRODUCT_ID_MAX);
    assert_int_equal(strlen(out.name), ORDER_PRODUCT_NAME_MAX);

    /* product_get checks the id it is given, including its length. */
    char longid[ORDER_PRODUCT_ID_MAX + 2];
    memset(longid, 'a', sizeof longid - 1);
    longid[sizeof longid - 1] = '\0';
    fake_env_again(env);
    assert_int_equal(order_product_get(&env->svc, &env->ctx, longid, &out), ORDER_EINVAL);
    assert_string_equal(env->err.violations[0].field, "product_id");
}

static void test_product_upsert_needs_admin(void **state)
{
    fake_env *env = *state;
    order_product p = {
        .id = "kiwi", .name = "Kiwi", .unit_price_minor = 80, .currency = "EUR", .active = true};
    order_product out;
    fake_env_as(env, "checkout", ORDER_ROLE_SERVICE);
    assert_int_equal(order_product_upsert(&env->svc, &env->ctx, &p, &out), ORDER_EPERM);
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_product_upsert(&env->svc, &env->ctx, &p, &out), ORDER_EPERM);
    assert_int_equal(env->err.code, ORDER_EPERM);
    assert_int_equal(env->store->calls[FAKE_PRODUCT_UPSERT], 0);

    fake_env_as(env, "root", ORDER_ROLE_ADMIN);
    assert_int_equal(order_product_upsert(&env->svc, &env->ctx, &p, &out), ORDER_OK);
    /* anyone reads it back */
    order_product got;
    fake_env_as(env, "alice", ORDER_ROLE_CUSTOMER);
    assert_int_equal(order_product_get(&env->svc, &env->ctx, "kiwi", &got), ORDER_OK);
    assert_string_equal(got.name, "Kiwi");
    assert_int_equal(got.unit_price_minor, 80);
    assert_string_equal(got.currency, "EUR");
    assert_true(got.active);
}

static void test_product_get_unknown(void **state)
{
    fake_env *env = *state;
    order_product out;
    assert_int_equal(order_product_get(&env->svc, &env->ctx, "durian", &out), ORDER_ENOTFOUND);
    assert_int_equal(env->err.code, ORDER_ENOTFOUND);
    fake_env_again(env);
    assert_int_equal(order_product_get(&env->svc, &env->ctx, "", &out), ORDER_EINVAL);
    assert_string_equal(env->err.violations[0].field, "product_id");
    fake_env_again(env);
    assert_int_equal(order_product_get(&env->svc, &env->ctx, "a b", &out), ORDER_EINVAL);
    env->store->down = true;
    fake_env_again(env);
    assert_int_equal(order_product_get(&env->svc, &env->ctx, "apple", &out), ORDER_EUNAVAILABLE);
}

#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_get_visibility),
        T(test_get_invalid_id),
        T(test_get_store_down),
        T(test_list_own_orders_newest_first),
        T(test_list_privileged),
        T(test_list_status_filter),
        T(test_list_page_size),
        T(test_list_returns_exactly_a_page),
        T(test_list_pages_with_a_cursor),
        T(test_list_bad_cursor),
        T(test_cancel_pending_voids_the_payment),
        T(test_cancel_paid_refunds_once),
        T(test_cancel_after_shipping_is_refused),
        T(test_cancel_reason_length),
        T(test_cancel_refund_fails_then_retry),
        T(test_cancel_refund_done_but_not_recorded),
        T(test_cancel_pending_that_was_paid_meanwhile),
        T(test_cancel_someone_elses_order),
        T(test_confirm_with_the_right_reference),
        T(test_confirm_with_a_wrong_reference),
        T(test_confirm_with_the_wrong_provider),
        T(test_confirm_invalid_arguments),
        T(test_confirm_a_cancelled_order),
        T(test_confirm_someone_elses_order),
        T(test_race_confirm_loses_to_cancel),
        T(test_race_cancel_loses_to_shipping),
        T(test_race_two_cancels),
        T(test_race_two_confirms),
        T(test_ship_then_deliver),
        T(test_ship_an_unpaid_order),
        T(test_update_status_arguments),
        T(test_update_status_expected_version),
        T(test_update_status_missing_order),
        T(test_product_upsert_validation),
        T(test_product_upsert_limits),
        T(test_product_upsert_long_fields),
        T(test_product_upsert_needs_admin),
        T(test_product_get_unknown),
    };
    return cmocka_run_group_tests_name("orders", tests, NULL, NULL);
}
