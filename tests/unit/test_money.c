/* test_money.c — money in integer minor units: ISO-4217 exponents, overflow-checked
 * arithmetic at the int64 bounds, and the tax rule (half up on the subtotal). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>
#include <cmocka.h>

#include "orders/orders.h"

static void test_currency_exponents(void **state)
{
    (void)state;
    assert_int_equal(money_currency_exponent("EUR"), 2);
    assert_int_equal(money_currency_exponent("USD"), 2);
    assert_int_equal(money_currency_exponent("GBP"), 2);
    assert_int_equal(money_currency_exponent("JPY"), 0);
    assert_int_equal(money_currency_exponent("KRW"), 0);
    assert_int_equal(money_currency_exponent("KWD"), 3);
    assert_int_equal(money_currency_exponent("BHD"), 3);
    assert_int_equal(money_currency_exponent("TND"), 3);
    assert_int_equal(money_currency_exponent("CLF"), 4);
    /* The ends of the table: a lookup that is off by one misses these. */
    assert_int_equal(money_currency_exponent("AED"), 2);
    assert_int_equal(money_currency_exponent("ZWL"), 2);
}

static void test_currency_unknown(void **state)
{
    (void)state;
    static const char *const bad[] = {"XXY", "eur", "Eur", "EURO", "EU", "", "E R", "AAA", "ZZZ"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        if (money_currency_exponent(bad[i]) != -1)
            fail_msg("currency \"%s\" should be unknown", bad[i]);
    }
    assert_int_equal(money_currency_exponent(NULL), -1);
}

/* A spread of real codes across the alphabet: all must be found (the table is searched by
 * bisection, so one entry out of order hides others). */
static void test_currency_spread(void **state)
{
    (void)state;
    static const char *const codes[] = {
        "AUD", "BRL", "CAD", "CHF", "CNY", "CZK", "DKK", "HKD", "HUF", "IDR",
        "ILS", "INR", "ISK", "MXN", "MYR", "NOK", "NZD", "PHP", "PLN", "RON",
        "SEK", "SGD", "THB", "TRY", "UAH", "UYU", "VND", "XAF", "XOF", "ZAR",
    };
    for (size_t i = 0; i < sizeof codes / sizeof *codes; i++) {
        int x = money_currency_exponent(codes[i]);
        if (x < 0 || x > 4)
            fail_msg("currency %s: exponent %d", codes[i], x);
    }
}

static void test_mul(void **state)
{
    (void)state;
    int64_t r = -1;
    assert_true(money_mul(1999, 3, &r));
    assert_int_equal(r, 5997);
    assert_true(money_mul(0, INT64_MAX, &r));
    assert_int_equal(r, 0);
    assert_true(money_mul(INT64_MAX, 1, &r));
    assert_true(r == INT64_MAX);
    assert_true(money_mul(-1, INT64_MAX, &r));
    assert_true(r == -INT64_MAX);
    /* The largest unit price a 10000-piece line can carry, and one more. */
    assert_true(money_mul(922337203685477LL, 10000, &r));
    assert_true(r == 9223372036854770000LL);
    assert_false(money_mul(922337203685478LL, 10000, &r));
    assert_false(money_mul(INT64_MAX, 2, &r));
    assert_false(money_mul(INT64_MAX / 2 + 1, 2, &r));
    assert_false(money_mul(INT64_MIN, -1, &r));
    assert_false(money_mul(INT64_MIN, 2, &r));
}

static void test_add(void **state)
{
    (void)state;
    int64_t r = -1;
    assert_true(money_add(250, 750, &r));
    assert_int_equal(r, 1000);
    assert_true(money_add(INT64_MAX - 1, 1, &r));
    assert_true(r == INT64_MAX);
    assert_true(money_add(INT64_MAX, 0, &r));
    assert_true(r == INT64_MAX);
    assert_false(money_add(INT64_MAX, 1, &r));
    assert_false(money_add(INT64_MAX / 2 + 1, INT64_MAX / 2 + 1, &r));
    assert_false(money_add(INT64_MIN, -1, &r));
    assert_true(money_add(INT64_MIN, INT64_MAX, &r));
    assert_int_equal(r, -1);
}

struct tax_case {
    int64_t subtotal;
    int32_t bps;
    int64_t tax;
};

static void test_tax_examples(void **state)
{
    (void)state;
    static const struct tax_case cases[] = {
        {1000, 825, 83},  /* 82.5 -> 83: the half goes up */
        {2000, 825, 165}, /* exact */
        {1, 825, 0},      /* 0.0825 -> 0 */
        {6061, 825, 500}, /* 500.0325 -> 500 */
        {6060, 825, 500}, /* 499.95 -> 500 */
        {2, 2500, 1},     /* 0.5 -> 1 */
        {6, 2500, 2},     /* 1.5 -> 2 (half up, not half even) */
        {10, 2500, 3},    /* 2.5 -> 3 (half even would give 2) */
        {1, 4999, 0},     /* 0.4999 -> 0 */
        {1, 5000, 1},     /* 0.5 -> 1 */
        {1, 5001, 1},     /* 0.5001 -> 1 */
        {0, 825, 0},
        {123456, 0, 0},          /* rate 0 */
        {123456, 10000, 123456}, /* rate 100 % */
        {INT64_MAX, 0, 0},
        {INT64_MAX, 10000, INT64_MAX}, /* the product needs more than 64 bits */
        {INT64_MAX, 1, 922337203685478LL},
        {INT64_MAX, 5000, 4611686018427387904LL}, /* .5 at the top of the range: up */
        {INT64_MAX, 9999, 9222449699651090329LL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        int64_t t = -1;
        if (!money_tax(cases[i].subtotal, cases[i].bps, &t))
            fail_msg("tax(%lld, %d) refused", (long long)cases[i].subtotal, (int)cases[i].bps);
        if (t != cases[i].tax)
            fail_msg("tax(%lld, %d) = %lld, want %lld", (long long)cases[i].subtotal,
                     (int)cases[i].bps, (long long)t, (long long)cases[i].tax);
    }
}

/* The definition, checked independently of the formula: t is the integer nearest to
 * subtotal * bps / 10000, and an exact half goes up, that is
 *   10000 t - 5000 <= subtotal * bps < 10000 t + 5000. */
static void test_tax_half_up_property(void **state)
{
    (void)state;
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < 200000; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;     /* xorshift64: fixed seed, reproducible */
        int64_t s = (int64_t)(x % 1000000000000ull); /* up to 10^12: s * bps fits in int64 */
        if (i % 4 == 0)
            s %= 100000; /* plenty of small subtotals, where the halves are */
        int32_t bps = (int32_t)((x >> 40) % 10001);
        int64_t t;
        assert_true(money_tax(s, bps, &t));
        int64_t exact = s * bps;
        if (!(10000 * t - 5000 <= exact && exact < 10000 * t + 5000))
            fail_msg("tax(%lld, %d) = %lld is not half-up rounding", (long long)s, (int)bps,
                     (long long)t);
    }
}

static void test_tax_refuses_bad_input(void **state)
{
    (void)state;
    int64_t t = 42;
    assert_false(money_tax(-1, 825, &t));
    assert_false(money_tax(INT64_MIN, 825, &t));
    assert_false(money_tax(1000, -1, &t));
    assert_false(money_tax(1000, 10001, &t));
    assert_false(money_tax(1000, INT32_MAX, &t));
    assert_int_equal(t, 42); /* nothing half-computed is left behind */
}

/* A subtotal of about INT64_MAX/2 at 100 % tax: the tax itself is exact (no wrap in the
 * multiplication), and the total that would not fit is refused by money_add. */
static void test_tax_huge_subtotal(void **state)
{
    (void)state;
    int64_t sub = INT64_MAX / 2, tax = 0, total = 0;
    assert_true(money_tax(sub, 10000, &tax));
    assert_true(tax == sub);
    assert_true(money_add(sub, tax, &total));
    assert_true(total == INT64_MAX - 1);

    sub = INT64_MAX / 2 + 1;
    assert_true(money_tax(sub, 10000, &tax));
    assert_true(tax == sub);
    total = 7;
    assert_false(money_add(sub, tax, &total));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_currency_exponents),
        cmocka_unit_test(test_currency_unknown),
        cmocka_unit_test(test_currency_spread),
        cmocka_unit_test(test_mul),
        cmocka_unit_test(test_add),
        cmocka_unit_test(test_tax_examples),
        cmocka_unit_test(test_tax_half_up_property),
        cmocka_unit_test(test_tax_refuses_bad_input),
        cmocka_unit_test(test_tax_huge_subtotal),
    };
    return cmocka_run_group_tests_name("money", tests, NULL, NULL);
}
