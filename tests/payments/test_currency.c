/* test_currency.c — amounts as Stripe and PayPal want them, exactly, and back: zero-decimal
 * and three-decimal currencies, Stripe's ISK and MGA quirks, PayPal's decimal strings; and
 * the RFC 3339 times PayPal sends. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "payments/httpc.h"

static int64_t stripe(const char *cur, int64_t minor)
{
    int64_t out = -1;
    return pay__stripe_amount(cur, minor, &out) ? out : -1;
}

static int64_t from_stripe(const char *cur, int64_t amount)
{
    int64_t out = -1;
    return pay__stripe_to_minor(cur, amount, &out) ? out : -1;
}

static void test_stripe_amounts(void **state)
{
    assert_int_equal(stripe("EUR", 1234), 1234);
    assert_int_equal(stripe("USD", 0), 0);
    assert_int_equal(stripe("JPY", 1200), 1200); /* zero-decimal in both */
    assert_int_equal(stripe("KRW", 15000), 15000);
    assert_int_equal(stripe("ISK", 500), 50000);   /* Stripe: two decimals, always 00 */
    assert_int_equal(stripe("MGA", 12300), 123);   /* ISO 2, Stripe 0 */
    assert_int_equal(stripe("MGA", 12345), -1);    /* a fraction of an ariary */
    assert_int_equal(stripe("HUF", 12345), 12345); /* two-decimal for charges */
    assert_int_equal(stripe("TWD", 100), 100);
    assert_int_equal(stripe("KWD", 1230), 1230); /* three decimals, last one 0 */
    assert_int_equal(stripe("KWD", 1234), -1);
    assert_int_equal(stripe("XXX", 100), -1);
    assert_int_equal(stripe("EU", 100), -1);
    assert_int_equal(stripe("EUR", -1), -1);
    assert_int_equal(stripe("ISK", INT64_MAX / 10), -1); /* overflow */

    assert_int_equal(from_stripe("eur", 1234), 1234);
    assert_int_equal(from_stripe("jpy", 1200), 1200);
    assert_int_equal(from_stripe("isk", 50000), 500);
    assert_int_equal(from_stripe("isk", 50050), -1);
    assert_int_equal(from_stripe("mga", 123), 12300);
}

static const char *paypal(const char *cur, int64_t minor)
{
    static char buf[32];
    return pay__paypal_value(cur, minor, buf, sizeof buf) ? buf : "-";
}

static int64_t from_paypal(const char *cur, const char *value)
{
    int64_t out = -1;
    return pay__paypal_parse_value(cur, value, &out) ? out : -1;
}

static void test_paypal_values(void **state)
{
    assert_string_equal(paypal("EUR", 1234), "12.34");
    assert_string_equal(paypal("EUR", 5), "0.05");
    assert_string_equal(paypal("EUR", 0), "0.00");
    assert_string_equal(paypal("USD", 100000), "1000.00");
    assert_string_equal(paypal("JPY", 1200), "1200");
    assert_string_equal(paypal("HUF", 150000), "1500"); /* no decimals at PayPal */
    assert_string_equal(paypal("HUF", 150050), "-");    /* ... so fillér cannot be sent */
    assert_string_equal(paypal("TWD", 9900), "99");
    assert_string_equal(paypal("KWD", 1234), "1.234");
    assert_string_equal(paypal("EUR", -5), "-");
    assert_string_equal(paypal("ABC", 5), "-");
    char tiny[4];
    assert_false(pay__paypal_value("EUR", 1234, tiny, sizeof tiny));

    assert_int_equal(from_paypal("EUR", "12.34"), 1234);
    assert_int_equal(from_paypal("EUR", "12.3"), 1230);
    assert_int_equal(from_paypal("EUR", "12"), 1200);
    assert_int_equal(from_paypal("EUR", "12.340"), 1234);
    assert_int_equal(from_paypal("EUR", "12.345"), -1);
    assert_int_equal(from_paypal("JPY", "1200"), 1200);
    assert_int_equal(from_paypal("HUF", "1500"), 150000);
    assert_int_equal(from_paypal("EUR", "1e3"), -1);
    assert_int_equal(from_paypal("EUR", "-1.00"), -1);
    assert_int_equal(from_paypal("EUR", ""), -1);
    assert_int_equal(from_paypal("EUR", "."), -1);
    assert_int_equal(from_paypal("EUR", "12."), -1);
    assert_int_equal(from_paypal("EUR", "99999999999999999999"), -1);
    assert_int_equal(from_paypal("EUR", NULL), -1);
}

static void test_rfc3339(void **state)
{
    int64_t us = 0;
    assert_true(pay__rfc3339_us("2024-05-01T12:34:56Z", &us));
    assert_int_equal(us, 1714566896LL * 1000000);
    assert_true(pay__rfc3339_us("2024-05-01T12:34:56.789Z", &us));
    assert_int_equal(us, 1714566896LL * 1000000 + 789000);
    assert_true(pay__rfc3339_us("2024-05-01T14:34:56+02:00", &us));
    assert_int_equal(us, 1714566896LL * 1000000);
    assert_true(pay__rfc3339_us("1970-01-01T00:00:00Z", &us));
    assert_int_equal(us, 0);
    assert_false(pay__rfc3339_us("2024-05-01", &us));
    assert_false(pay__rfc3339_us("2024-05-01T12:34:56", &us));
    assert_false(pay__rfc3339_us("2024-13-01T12:34:56Z", &us));
    assert_false(pay__rfc3339_us("2024-05-01T12:34:56Zjunk", &us));
    assert_false(pay__rfc3339_us(NULL, &us));
}

static void test_ids_and_forms(void **state)
{
    assert_true(pay__id_safe("pi_3MtwBwLkdIwHu7ix28a3tqPa", 255));
    assert_true(pay__id_safe("5O190127TN364715T", 255));
    assert_false(pay__id_safe("../v1/refunds", 255));
    assert_false(pay__id_safe("pi_1?expand=x", 255));
    assert_false(pay__id_safe("", 255));
    assert_false(pay__id_safe(NULL, 255));
    assert_false(pay__id_safe("abcdef", 5));

    pay__buf b = {0};
    pay__buf_form(&b, "metadata[order_id]", "a b&c=d/é");
    pay__buf_form(&b, "x", "");
    assert_string_equal(b.data, "metadata%5Border_id%5D=a%20b%26c%3Dd%2F%C3%A9&x=");
    pay__buf_free(&b);
    assert_null(b.data);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stripe_amounts),
        cmocka_unit_test(test_paypal_values),
        cmocka_unit_test(test_rfc3339),
        cmocka_unit_test(test_ids_and_forms),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
