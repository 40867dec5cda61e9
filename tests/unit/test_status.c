/* test_status.c — the status state machine (every pair against ARCHITECTURE.md), the
 * names stored in PostgreSQL, order ids, roles, and the error value's limits. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "orders/orders.h"

#define B(s) ORDER_STATUS_BIT(ORDER_STATUS_##s)

/* ARCHITECTURE.md, Statuses: PENDING -> PAID -> SHIPPED -> DELIVERED, PENDING or PAID ->
 * CANCELLED, PENDING -> EXPIRED, PENDING -> FAILED. Everything else is refused. */
static const unsigned allowed[ORDER_STATUS_MAX + 1] = {
    [ORDER_STATUS_UNSPECIFIED] = 0,
    [ORDER_STATUS_PENDING] = B(PAID) | B(CANCELLED) | B(EXPIRED) | B(FAILED),
    [ORDER_STATUS_PAID] = B(SHIPPED) | B(CANCELLED),
    [ORDER_STATUS_SHIPPED] = B(DELIVERED),
    [ORDER_STATUS_DELIVERED] = 0,
    [ORDER_STATUS_CANCELLED] = 0,
    [ORDER_STATUS_EXPIRED] = 0,
    [ORDER_STATUS_FAILED] = 0,
};

static void test_every_pair(void **state)
{
    (void)state;
    int moves = 0;
    for (int from = 0; from <= ORDER_STATUS_MAX; from++) {
        for (int to = 0; to <= ORDER_STATUS_MAX; to++) {
            bool want = (allowed[from] & ORDER_STATUS_BIT(to)) != 0;
            bool got = order_status_can_move((order_status)from, (order_status)to);
            if (got != want)
                fail_msg("%s -> %s: got %s, want %s", order_status_name((order_status)from),
                         order_status_name((order_status)to), got ? "allowed" : "refused",
                         want ? "allowed" : "refused");
            moves += got;
        }
    }
    assert_int_equal(moves, 7);
}

static void test_out_of_range(void **state)
{
    (void)state;
    assert_false(order_status_can_move((order_status)8, ORDER_STATUS_PAID));
    assert_false(order_status_can_move(ORDER_STATUS_PENDING, (order_status)8));
    assert_false(order_status_can_move((order_status)-1, ORDER_STATUS_CANCELLED));
    assert_false(order_status_can_move(ORDER_STATUS_PAID, (order_status)-1));
}

static void test_status_names(void **state)
{
    (void)state;
    /* The names are the storage format: changing one breaks stored rows. */
    static const char *const want[] = {NULL,        "pending",   "paid",    "shipped",
                                       "delivered", "cancelled", "expired", "failed"};
    for (int s = 0; s <= ORDER_STATUS_MAX; s++) {
        const char *n = order_status_name((order_status)s);
        if (!want[s]) {
            assert_null(n);
            continue;
        }
        assert_non_null(n);
        assert_string_equal(n, want[s]);
        assert_int_equal(order_status_parse(n), s);
    }
    assert_null(order_status_name((order_status)8));
    assert_null(order_status_name((order_status)-1));
    assert_int_equal(order_status_parse("PAID"), ORDER_STATUS_UNSPECIFIED);
    assert_int_equal(order_status_parse("paid "), ORDER_STATUS_UNSPECIFIED);
    assert_int_equal(order_status_parse(""), ORDER_STATUS_UNSPECIFIED);
    assert_int_equal(order_status_parse(NULL), ORDER_STATUS_UNSPECIFIED);
}

static void test_provider_and_pay_status_names(void **state)
{
    (void)state;
    static const char *const prov[] = {NULL, "local", "stripe", "paypal"};
    for (int p = 0; p <= ORDER_PROVIDER_MAX; p++) {
        const char *n = order_provider_name((order_provider)p);
        if (!prov[p]) {
            assert_null(n);
            continue;
        }
        assert_string_equal(n, prov[p]);
        assert_int_equal(order_provider_parse(n), p);
    }
    assert_null(order_provider_name((order_provider)4));
    assert_int_equal(order_provider_parse("LOCAL"), ORDER_PROVIDER_UNSPECIFIED);

    static const char *const pay[] = {NULL, "pending", "succeeded", "refunded", "voided", "failed"};
    for (int s = 0; s < 6; s++) {
        const char *n = order_pay_status_name((order_pay_status)s);
        if (!pay[s]) {
            assert_null(n);
            continue;
        }
        assert_string_equal(n, pay[s]);
        assert_int_equal(order_pay_status_parse(n), s);
    }
    assert_null(order_pay_status_name((order_pay_status)6));
    assert_int_equal(order_pay_status_parse("paid"), ORDER_PAY_UNSPECIFIED);
    assert_int_equal(order_pay_status_parse(NULL), ORDER_PAY_UNSPECIFIED);
}

static void test_order_id_valid(void **state)
{
    (void)state;
    assert_true(order_id_valid("3f2c8a4e-1b7d-4c55-9a0e-2f6b8d1c7e90"));
    assert_true(order_id_valid("3F2C8A4E-1B7D-4C55-9A0E-2F6B8D1C7E90"));
    assert_true(order_id_valid("00000000-0000-0000-0000-000000000000"));

    static const char *const bad[] = {
        "",
        "3f2c8a4e-1b7d-4c55-9a0e-2f6b8d1c7e9",   /* 35 */
        "3f2c8a4e-1b7d-4c55-9a0e-2f6b8d1c7e900", /* 37 */
        "3f2c8a4e1b7d-4c55-9a0e-2f6b8d1c7e90-",  /* dash moved */
        "3f2c8a4e-1b7d-4c55-9a0e_2f6b8d1c7e90",  /* underscore */
        "3f2c8a4e-1b7d-4c55-9a0g-2f6b8d1c7e90",  /* g */
        "3f2c8a4e-1b7d-4c55-9a0e-2f6b8d1c7e9 ",  /* space */
        "3f2c8a4e01b7d04c5509a0e02f6b8d1c7e90",  /* 36 hex-ish, no dashes */
        "{3f2c8a4-1b7d-4c55-9a0e-2f6b8d1c7e90}",
        "' OR 1=1 --                         ",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        if (order_id_valid(bad[i]))
            fail_msg("\"%s\" accepted as an order id", bad[i]);
    assert_false(order_id_valid(NULL));
}

static void test_roles(void **state)
{
    (void)state;
    order_caller c = {.subject = "alice", .roles = ORDER_ROLE_CUSTOMER};
    assert_false(order_caller_is_privileged(&c));
    c.roles = 0;
    assert_false(order_caller_is_privileged(&c));
    c.roles = ORDER_ROLE_SERVICE;
    assert_true(order_caller_is_privileged(&c));
    c.roles = ORDER_ROLE_ADMIN;
    assert_true(order_caller_is_privileged(&c));
    c.roles = ORDER_ROLE_CUSTOMER | ORDER_ROLE_ADMIN;
    assert_true(order_caller_is_privileged(&c));
}

static void test_error_violations_cap(void **state)
{
    (void)state;
    order_error *e = calloc(1, sizeof *e);
    assert_non_null(e);
    for (int i = 0; i < ORDER_MAX_VIOLATIONS + 5; i++)
        order_violate(e, "items[0].quantity", "violation %d", i);
    assert_int_equal(e->code, ORDER_EINVAL);
    assert_int_equal(e->nviolations, ORDER_MAX_VIOLATIONS);
    assert_true(e->violations_truncated);
    assert_string_equal(e->violations[ORDER_MAX_VIOLATIONS - 1].description, "violation 127");

    /* A field longer than the slot is cut, never overflowed. */
    order_error_reset(e);
    char longf[200];
    memset(longf, 'f', sizeof longf - 1);
    longf[sizeof longf - 1] = '\0';
    order_violate(e, longf, "x");
    assert_int_equal(strlen(e->violations[0].field), sizeof e->violations[0].field - 1);

    assert_int_equal(order_fail(e, ORDER_EPERM, "no %s", "way"), ORDER_EPERM);
    assert_string_equal(e->message, "no way");
    order_error_reset(e);
    assert_int_equal(e->code, ORDER_OK);
    assert_int_equal(e->nviolations, 0);
    assert_false(e->violations_truncated);
    assert_string_equal(e->message, "");
    free(e);
}

static void test_code_names(void **state)
{
    (void)state;
    assert_string_equal(order_code_name(ORDER_OK), "OK");
    assert_string_equal(order_code_name(ORDER_EINVAL), "INVALID_ARGUMENT");
    assert_string_equal(order_code_name(ORDER_ENOTFOUND), "NOT_FOUND");
    assert_string_equal(order_code_name(ORDER_EPERM), "PERMISSION_DENIED");
    assert_string_equal(order_code_name(ORDER_EPRECONDITION), "FAILED_PRECONDITION");
    assert_string_equal(order_code_name(ORDER_EUNAVAILABLE), "UNAVAILABLE");
    assert_string_equal(order_code_name(ORDER_EDEADLINE), "DEADLINE_EXCEEDED");
    assert_string_equal(order_code_name(-1000), "INTERNAL");
}

static void test_order_copy_is_deep(void **state)
{
    (void)state;
    order_item items[2] = {{.product_id = "a", .quantity = 1}, {.product_id = "b", .quantity = 2}};
    order_t src = {.id = "x", .nitems = 2, .items = items};
    order_t dst = {0};
    assert_int_equal(order_copy(&dst, &src), ORDER_OK);
    assert_ptr_not_equal(dst.items, src.items);
    dst.items[1].quantity = 99;
    assert_int_equal(items[1].quantity, 2);
    order_clear(&dst);
    assert_null(dst.items);
    assert_int_equal(dst.nitems, 0);
    assert_string_equal(dst.id, "");
    order_clear(&dst); /* safe on a cleared order */
    order_list_free(NULL, 3);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_pair),
        cmocka_unit_test(test_out_of_range),
        cmocka_unit_test(test_status_names),
        cmocka_unit_test(test_provider_and_pay_status_names),
        cmocka_unit_test(test_order_id_valid),
        cmocka_unit_test(test_roles),
        cmocka_unit_test(test_error_violations_cap),
        cmocka_unit_test(test_code_names),
        cmocka_unit_test(test_order_copy_is_deep),
    };
    return cmocka_run_group_tests_name("status", tests, NULL, NULL);
}
