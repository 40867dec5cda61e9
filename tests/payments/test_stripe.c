/* test_stripe.c — the STRIPE provider against the local fake (tests/fakes/fake_stripe.py):
 * what orderd sends (form fields, headers, idempotency keys, yen as yen), how it retries
 * (same key after 500 / 429 / reset, never after a 400, bounded by the deadline), what a
 * payer's outcome becomes (succeeded, declined with its code, processing), and that
 * verify, cancel and refund accept only what is really so. */
#define _GNU_SOURCE /* asprintf */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <time.h>

#include "fakeproc.h"
#include "payments/payments.h"

#define KEY "sk_test_fake"
#define MS  1000LL

static fakeproc F;
static order_payments *PAY;

static pay_stripe_config config(const char *key, int64_t timeout_us, int attempts)
{
    return (pay_stripe_config){
        .api_base = F.base,
        .secret_key = key,
        .api_version = "2024-06-20",
        .environment = "development",
        .http = {.timeout_us = timeout_us,
                 .connect_timeout_us = 1000 * MS,
                 .max_attempts = attempts,
                 .backoff_base_us = 20 * MS,
                 .backoff_max_us = 100 * MS},
    };
}

static int group_setup(void **state)
{
    const char *args[] = {"--key", KEY, NULL};
    if (fakeproc_start(&F, "tests/fakes/fake_stripe.py", args) != 0)
        return -1;
    char err[256];
    pay_stripe_config c = config(KEY, 3000 * MS, 3);
    PAY = pay_stripe_create(&c, err, sizeof err);
    if (!PAY)
        fprintf(stderr, "pay_stripe_create: %s\n", err);
    return PAY ? 0 : -1;
}

static int group_teardown(void **state)
{
    pay_stripe_destroy(PAY);
    fakeproc_stop(&F);
    return 0;
}

static int setup(void **state)
{
    fake_reset(&F);
    return 0;
}

/* ---- JSON helpers ---- */

static const char *jpath(const json_t *v, const char *a, const char *b)
{
    json_t *x = json_object_get(v, a);
    if (b)
        x = json_object_get(x, b);
    return json_string_value(x);
}

static long jstatus(const json_t *req)
{
    return (long)json_integer_value(json_object_get(req, "status"));
}

/* The last recorded request matching method and path (a new reference). */
static json_t *last_req(const char *method, const char *path)
{
    json_t *all = fake_requests(&F, method, path);
    json_t *r = json_incref(json_array_get(all, json_array_size(all) - 1));
    json_decref(all);
    return r;
}

static size_t count_reqs(const char *method, const char *path)
{
    json_t *all = fake_requests(&F, method, path);
    size_t n = json_array_size(all);
    json_decref(all);
    return n;
}

/* ---- calls ---- */

/* pm: NULL = no saved method; customer: the Stripe customer it is saved to, or NULL.
 * With a saved method, the domain's two steps: create the intent, then (the order keeping
 * its id) charge it. */
static int create_for(const order_t *o, const char *pm, const char *customer,
                      order_payment_action *a, order_payment_info *paid, order_error *e)
{
    order_ctx ctx = fake_ctx(e, 0);
    order_saved_method saved = {pm, customer};
    int rc = PAY->create(PAY->self, &ctx, o, pm ? &saved : NULL, a, paid);
    if (rc != ORDER_OK || !pm)
        return rc;
    order_t kept = *o;
    snprintf(kept.pay_reference, sizeof kept.pay_reference, "%s", a->reference);
    kept.pay_provider = ORDER_PROVIDER_STRIPE;
    return PAY->charge(PAY->self, &ctx, &kept, &saved, paid);
}

static int create(const order_t *o, const char *pm, order_payment_action *a,
                  order_payment_info *paid, order_error *e)
{
    return create_for(o, pm, NULL, a, paid, e);
}

static void create_ok(order_t *o, const char *currency, int64_t total, order_payment_action *a)
{
    order_error e;
    order_payment_info paid;
    fake_order(o, currency, total);
    assert_int_equal(create(o, NULL, a, &paid, &e), ORDER_OK);
    snprintf(o->pay_reference, sizeof o->pay_reference, "%s", a->reference);
    o->pay_provider = ORDER_PROVIDER_STRIPE;
}

static void customer_pays(const char *pi)
{
    long st;
    json_decref(fake_call(&F, "POST", "/_fake/pay", &st, "{\"id\":\"%s\"}", pi));
    assert_int_equal(st, 200);
}

/* ---- create ---- */

static void test_create_sends_the_form_stripe_documents(void **state)
{
    order_t o;
    order_payment_action a;
    create_ok(&o, "EUR", 1234, &a);
    assert_int_equal(a.provider, ORDER_PROVIDER_STRIPE);
    assert_true(strncmp(a.reference, "pi_", 3) == 0);
    assert_true(strstr(a.client_secret, "_secret_") != NULL);

    json_t *reqs = fake_requests(&F, "POST", "/v1/payment_intents");
    assert_int_equal(json_array_size(reqs), 1);
    json_t *r = json_array_get(reqs, 0);
    assert_string_equal(jpath(r, "form", "amount"), "1234");
    assert_string_equal(jpath(r, "form", "currency"), "eur");
    assert_string_equal(json_string_value(json_object_get(
                            json_object_get(json_object_get(r, "form"), "metadata"), "order_id")),
                        o.id);
    assert_string_equal(
        json_string_value(json_object_get(
            json_object_get(json_object_get(r, "form"), "automatic_payment_methods"), "enabled")),
        "true");
    assert_non_null(strstr(jpath(r, "form", "description"), o.id));
    /* Brackets are percent-encoded on the wire, as application/x-www-form-urlencoded wants. */
    assert_non_null(strstr(jpath(r, "body", NULL), "metadata%5Border_id%5D="));
    char key[80];
    snprintf(key, sizeof key, "orderd-pi-%s", o.id);
    assert_string_equal(jpath(r, "headers", "idempotency-key"), key);
    assert_string_equal(jpath(r, "headers", "stripe-version"), "2024-06-20");
    assert_string_equal(jpath(r, "headers", "authorization"), "Bearer " KEY);
    assert_non_null(strstr(jpath(r, "headers", "content-type"), "x-www-form-urlencoded"));
    json_decref(reqs);

    /* PlaceOrder retried or replayed: the same intent, not a second one. */
    order_payment_action again;
    order_payment_info paid;
    order_error e;
    assert_int_equal(create(&o, NULL, &again, &paid, &e), ORDER_OK);
    assert_string_equal(again.reference, a.reference);
    assert_string_equal(again.client_secret, a.client_secret);
}

static void test_amounts_in_stripe_units(void **state)
{
    order_t o;
    order_payment_action a;
    create_ok(&o, "JPY", 1200, &a); /* zero-decimal: 1200 yen, not 12 */
    json_t *r = last_req("POST", "/v1/payment_intents");
    assert_string_equal(jpath(r, "form", "amount"), "1200");
    assert_string_equal(jpath(r, "form", "currency"), "jpy");
    json_decref(r);

    fake_reset(&F);
    create_ok(&o, "ISK", 500, &a); /* ISO zero-decimal, Stripe two-decimal: 500 kr = 50000 */
    json_t *reqs = fake_requests(&F, "POST", "/v1/payment_intents");
    assert_string_equal(jpath(json_array_get(reqs, 0), "form", "amount"), "50000");
    json_decref(reqs);

    /* MGA: two decimals in ISO, none at Stripe: a fraction of an ariary cannot be sent. */
    order_error e;
    order_payment_info paid;
    fake_order(&o, "MGA", 12345);
    assert_int_equal(create(&o, NULL, &a, &paid, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "AMOUNT_NOT_REPRESENTABLE");
    reqs = fake_requests(&F, "POST", "/v1/payment_intents");
    assert_int_equal(json_array_size(reqs), 1); /* nothing sent for it */
    json_decref(reqs);
}

/* ---- retries ---- */

static void assert_same_key_every_attempt(const char *order_id, size_t attempts)
{
    char key[80];
    snprintf(key, sizeof key, "orderd-pi-%s", order_id);
    json_t *reqs = fake_requests(&F, "POST", "/v1/payment_intents");
    assert_int_equal(json_array_size(reqs), attempts);
    size_t i;
    json_t *r;
    json_array_foreach(reqs, i, r)
    {
        assert_string_equal(jpath(r, "headers", "idempotency-key"), key);
        assert_string_equal(jpath(r, "body", NULL), jpath(json_array_get(reqs, 0), "body", NULL));
    }
    assert_int_equal(jstatus(json_array_get(reqs, attempts - 1)), 200);
    json_decref(reqs);
}

static void test_retries_500_with_the_same_key(void **state)
{
    order_t o;
    order_payment_action a;
    fake_fail(&F, "500", 2, "/v1/payment_intents");
    create_ok(&o, "EUR", 5000, &a);
    assert_same_key_every_attempt(o.id, 3);
}

static void test_retries_429_with_the_same_key(void **state)
{
    order_t o;
    order_payment_action a;
    fake_fail(&F, "429", 2, "/v1/payment_intents");
    create_ok(&o, "EUR", 5000, &a);
    assert_same_key_every_attempt(o.id, 3);
}

static void test_retries_a_dropped_connection_with_the_same_key(void **state)
{
    /* A provider of its own, so that no kept-alive connection exists: libcurl silently
     * repeats a request once when a reused connection turns out dead, and this test is
     * about orderd's retries. */
    char err[256];
    pay_stripe_config c = config(KEY, 3000 * MS, 3);
    order_payments *fresh = pay_stripe_create(&c, err, sizeof err);
    assert_non_null(fresh);
    order_t o;
    order_payment_action a;
    order_payment_info paid;
    order_error e;
    fake_order(&o, "EUR", 5000);
    fake_fail(&F, "reset", 2, "/v1/payment_intents");
    order_ctx ctx = fake_ctx(&e, 0);
    assert_int_equal(fresh->create(fresh->self, &ctx, &o, NULL, &a, &paid), ORDER_OK);
    assert_same_key_every_attempt(o.id, 3);
    pay_stripe_destroy(fresh);
}

static void test_400_is_not_retried(void **state)
{
    order_t o;
    order_payment_action a;
    order_payment_info paid;
    order_error e;
    fake_order(&o, "EUR", 10); /* below Stripe's minimum: amount_too_small */
    /* Refused for good: a refusal the domain fails the order on, not INTERNAL. */
    assert_int_equal(create(&o, NULL, &a, &paid, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_DECLINED");
    assert_non_null(strstr(e.message, "at least"));
    json_t *reqs = fake_requests(&F, "POST", "/v1/payment_intents");
    assert_int_equal(json_array_size(reqs), 1);
    json_decref(reqs);
}

static void test_outage_after_retries_is_unavailable(void **state)
{
    order_t o;
    order_payment_action a;
    order_payment_info paid;
    order_error e;
    fake_fail(&F, "500", 10, "/v1/payment_intents");
    fake_order(&o, "EUR", 5000);
    assert_int_equal(create(&o, NULL, &a, &paid, &e), ORDER_EUNAVAILABLE);
    assert_non_null(strstr(e.message, "stripe"));
    assert_null(strstr(e.message, KEY));
    json_t *reqs = fake_requests(&F, "POST", "/v1/payment_intents");
    assert_int_equal(json_array_size(reqs), 3); /* max_attempts */
    json_decref(reqs);
}

static void test_a_hung_stripe_is_bounded_by_the_deadline(void **state)
{
    char err[256];
    pay_stripe_config c = config(KEY, 10 * 1000 * MS, 3); /* attempts may take 10 s */
    order_payments *slow = pay_stripe_create(&c, err, sizeof err);
    assert_non_null(slow);
    order_t o;
    order_payment_action a;
    order_payment_info paid;
    order_error e;
    fake_order(&o, "EUR", 5000);
    fake_fail(&F, "timeout", 5, "/v1/payment_intents");
    order_ctx ctx = fake_ctx(&e, 400 * MS);
    int64_t t0 = fake_now_us();
    assert_int_equal(slow->create(slow->self, &ctx, &o, NULL, &a, &paid), ORDER_EDEADLINE);
    int64_t took = fake_now_us() - t0;
    assert_true(took >= 350 * MS);
    assert_true(took < 1500 * MS);
    pay_stripe_destroy(slow);

    /* An attempt timeout shorter than the deadline: the next attempt gets the answer. */
    fake_reset(&F);
    c = config(KEY, 300 * MS, 3);
    slow = pay_stripe_create(&c, err, sizeof err);
    assert_non_null(slow);
    fake_fail(&F, "timeout", 1, "/v1/payment_intents");
    ctx = fake_ctx(&e, 5000 * MS);
    assert_int_equal(slow->create(slow->self, &ctx, &o, NULL, &a, &paid), ORDER_OK);
    json_t *reqs = fake_requests(&F, "POST", "/v1/payment_intents");
    assert_int_equal(json_array_size(reqs), 2);
    json_decref(reqs);
    pay_stripe_destroy(slow);
}

static void test_a_wrong_key_is_unavailable_and_not_retried(void **state)
{
    char err[256];
    pay_stripe_config c = config("sk_test_wrong_key_123456", 2000 * MS, 3);
    order_payments *bad = pay_stripe_create(&c, err, sizeof err);
    assert_non_null(bad);
    order_t o;
    order_payment_action a;
    order_payment_info paid;
    order_error e;
    fake_order(&o, "EUR", 5000);
    order_ctx ctx = fake_ctx(&e, 0);
    assert_int_equal(bad->create(bad->self, &ctx, &o, NULL, &a, &paid), ORDER_EUNAVAILABLE);
    assert_string_equal(e.message, "stripe rejected orderd's credentials");
    json_t *reqs = fake_requests(&F, "POST", "/v1/payment_intents");
    assert_int_equal(json_array_size(reqs), 1);
    json_decref(reqs);
    pay_stripe_destroy(bad);
}

static void test_config_refuses_keys_of_the_other_mode(void **state)
{
    char err[256];
    pay_stripe_config c = config("sk_test_x", 1000 * MS, 1);
    c.environment = "production";
    assert_null(pay_stripe_create(&c, err, sizeof err));
    assert_null(strstr(err, "sk_test_x"));
    c = config("sk_live_x", 1000 * MS, 1);
    assert_null(pay_stripe_create(&c, err, sizeof err));
    c = config(KEY, 1000 * MS, 1);
    c.api_base = "ftp://example.com";
    assert_null(pay_stripe_create(&c, err, sizeof err));
    pay_stripe_destroy(NULL);
}

/* ---- charging a saved payment method ---- */

static void test_saved_card_that_succeeds(void **state)
{
    order_t o;
    order_payment_action a;
    order_payment_info paid;
    order_error e;
    fake_order(&o, "EUR", 2599);
    assert_int_equal(create(&o, "pm_card_visa", &a, &paid, &e), ORDER_OK);
    assert_true(strncmp(a.reference, "pi_", 3) == 0);
    assert_true(paid.paid_at_us > 0);
    assert_true(strncmp(paid.charge_id, "ch_", 3) == 0);
    assert_true(strncmp(paid.receipt_url, "https://", 8) == 0);
    assert_string_equal(paid.provider_status, "succeeded");

    /* Created for the method, not confirmed: no money moves before the order has the id. */
    json_t *all = fake_requests(&F, "POST", "/v1/payment_intents");
    assert_int_equal(json_array_size(all), 2);
    json_t *r = json_array_get(all, 0);
    assert_string_equal(jpath(r, "path", NULL), "/v1/payment_intents");
    assert_string_equal(jpath(r, "form", "payment_method"), "pm_card_visa");
    assert_null(jpath(r, "form", "confirm"));
    char key[80];
    snprintf(key, sizeof key, "orderd-pi-%s-pm", o.id);
    assert_string_equal(jpath(r, "headers", "idempotency-key"), key);
    /* Then confirmed off-session, under a key of its own. */
    r = json_array_get(all, 1);
    char path[320];
    snprintf(path, sizeof path, "/v1/payment_intents/%s/confirm", a.reference);
    assert_string_equal(jpath(r, "path", NULL), path);
    assert_string_equal(jpath(r, "form", "off_session"), "true");
    assert_string_equal(jpath(r, "form", "payment_method"), "pm_card_visa");
    snprintf(key, sizeof key, "orderd-charge-%s", o.id);
    assert_string_equal(jpath(r, "headers", "idempotency-key"), key);
    json_decref(all);

    /* Charged again (a retry after a lost answer): the same charge, not a second one. */
    order_t kept = o;
    snprintf(kept.pay_reference, sizeof kept.pay_reference, "%s", a.reference);
    order_ctx ctx = fake_ctx(&e, 0);
    order_saved_method saved = {"pm_card_visa", NULL};
    order_payment_info again;
    assert_int_equal(PAY->charge(PAY->self, &ctx, &kept, &saved, &again), ORDER_OK);
    assert_string_equal(again.charge_id, paid.charge_id);
}

/* Stripe stores a 500 that came after the endpoint began and replays it under the same key
 * for 24 h: the outcome is read from the intent, not from the replay. */
static void test_saved_card_confirm_answered_500_is_read_back(void **state)
{
    order_t o;
    order_payment_action a;
    order_payment_info paid;
    order_error e;
    fake_order(&o, "EUR", 2599);
    fake_fail(&F, "500_after", 1, "/confirm");
    assert_int_equal(create(&o, "pm_card_visa", &a, &paid, &e), ORDER_OK);
    assert_string_equal(paid.provider_status, "succeeded");
    assert_true(strncmp(paid.charge_id, "ch_", 3) == 0);
}

static void test_saved_card_declined(void **state)
{
    order_t o;
    order_payment_action a;
    order_payment_info paid;
    order_error e;
    fake_order(&o, "EUR", 2599);
    assert_int_equal(create(&o, "pm_card_chargeDeclinedInsufficientFunds", &a, &paid, &e),
                     ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_DECLINED");
    assert_string_equal(fake_meta(&e, "decline_code"), "insufficient_funds");
    assert_string_equal(fake_meta(&e, "provider_status"), "requires_payment_method");
    assert_true(strncmp(a.reference, "pi_", 3) == 0); /* the order records the intent */
    assert_int_equal(paid.paid_at_us, 0);
    assert_int_equal(count_reqs("POST", "/confirm"), 1); /* a 402 is an answer: not retried */

    fake_order(&o, "EUR", 2599);
    assert_int_equal(create(&o, "pm_card_authenticationRequired", &a, &paid, &e),
                     ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_DECLINED");
    assert_string_equal(fake_meta(&e, "decline_code"), "authentication_required");
}

/* A card saved to a Stripe customer, as the merchant's code saves it: (cus, pm). */
static void saved_card(char *cus, size_t cus_cap, char *pm, size_t pm_cap)
{
    long st = 0;
    json_t *c = fake_api_post(&F, KEY, "/v1/customers", "email=c%40example.com", &st);
    assert_int_equal(st, 200);
    snprintf(cus, cus_cap, "%s", json_string_value(json_object_get(c, "id")));
    json_decref(c);
    char form[128];
    snprintf(form, sizeof form, "customer=%s", cus);
    json_t *p = fake_api_post(&F, KEY, "/v1/payment_methods/pm_card_visa/attach", form, &st);
    assert_int_equal(st, 200);
    snprintf(pm, pm_cap, "%s", json_string_value(json_object_get(p, "id")));
    json_decref(p);
    assert_true(strncmp(cus, "cus_", 4) == 0 && strncmp(pm, "pm_", 3) == 0);
}

static void test_saved_card_of_a_customer(void **state)
{
    char cus[64], pm[64];
    saved_card(cus, sizeof cus, pm, sizeof pm);
    order_t o;
    order_payment_action a;
    order_payment_info paid;
    order_error e;
    fake_order(&o, "EUR", 2599);
    assert_int_equal(create_for(&o, pm, cus, &a, &paid, &e), ORDER_OK);
    assert_true(paid.paid_at_us > 0);
    json_t *all = fake_requests(&F, "POST", "/v1/payment_intents");
    json_t *r = json_array_get(all, 0); /* the customer goes with the creation */
    assert_string_equal(jpath(r, "form", "payment_method"), pm);
    assert_string_equal(jpath(r, "form", "customer"), cus);
    json_decref(all);
}

/* Stripe refusing the method itself (saved to a customer the request does not name, or
 * to another): a decline to the caller, naming the field to fix; never retried. */
static void test_saved_card_refused_without_its_customer(void **state)
{
    char cus[64], pm[64], other[64], unused[64];
    saved_card(cus, sizeof cus, pm, sizeof pm);
    saved_card(other, sizeof other, unused, sizeof unused);
    order_t o;
    order_payment_action a;
    order_payment_info paid;
    order_error e;
    fake_order(&o, "EUR", 2599);
    assert_int_equal(create_for(&o, pm, NULL, &a, &paid, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_DECLINED");
    assert_string_equal(fake_meta(&e, "field"), "payment_customer");
    assert_string_equal(fake_meta(&e, "provider_status"), "refused");
    assert_non_null(fake_meta(&e, "decline_code"));
    assert_string_equal(a.reference, ""); /* Stripe created no intent */
    assert_int_equal(paid.paid_at_us, 0);

    fake_order(&o, "EUR", 2599);
    assert_int_equal(create_for(&o, pm, other, &a, &paid, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_DECLINED");
    assert_string_equal(fake_meta(&e, "field"), "payment_method");
    assert_string_equal(fake_meta(&e, "decline_code"), "resource_missing");
    assert_int_equal(count_reqs("POST", "/v1/payment_intents"), 2); /* a 400: not retried */
}

static void test_saved_card_processing(void **state)
{
    order_t o;
    order_payment_action a;
    order_payment_info paid;
    order_error e;
    fake_order(&o, "EUR", 2599);
    assert_int_equal(create(&o, "pm_card_processing", &a, &paid, &e), ORDER_OK);
    assert_true(strncmp(a.reference, "pi_", 3) == 0);
    assert_int_equal(paid.paid_at_us, 0);
}

/* ---- verify ---- */

static int verify(const order_t *o, const char *ref, order_payment_info *info, order_error *e)
{
    order_ctx ctx = fake_ctx(e, 0);
    return PAY->verify(PAY->self, &ctx, o, ref, info);
}

static void test_verify_accepts_only_a_paid_intent_of_this_order(void **state)
{
    order_t o, other;
    order_payment_action a, b;
    order_payment_info info;
    order_error e;
    create_ok(&o, "EUR", 4200, &a);
    create_ok(&other, "EUR", 4200, &b);

    assert_int_equal(verify(&o, a.reference, &info, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_NOT_SUCCEEDED");
    assert_string_equal(fake_meta(&e, "provider_status"), "requires_payment_method");

    customer_pays(a.reference);
    customer_pays(b.reference);
    assert_int_equal(verify(&o, a.reference, &info, &e), ORDER_OK);
    assert_true(info.paid_at_us > 0);
    assert_true(strncmp(info.charge_id, "ch_", 3) == 0);
    assert_true(strncmp(info.receipt_url, "https://", 8) == 0);
    json_t *r = last_req("GET", a.reference);
    assert_string_equal(json_string_value(json_array_get(
                            json_object_get(json_object_get(r, "query"), "expand"), 0)),
                        "latest_charge");
    json_decref(r);

    /* Another order's paid intent, same amount: refused, and says why. */
    assert_int_equal(verify(&o, b.reference, &info, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_MISMATCH");
    assert_non_null(strstr(e.message, "another order"));
    assert_string_equal(fake_meta(&e, "provider_status"), "succeeded");

    /* Its own intent, but the order's total is not what was paid. */
    order_t changed = o;
    changed.total_minor = 4300;
    assert_int_equal(verify(&changed, a.reference, &info, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_MISMATCH");
    assert_non_null(strstr(e.message, "amount"));
    snprintf(changed.currency, sizeof changed.currency, "USD");
    changed.total_minor = 4200;
    assert_int_equal(verify(&changed, a.reference, &info, &e), ORDER_EPRECONDITION);
    assert_non_null(strstr(e.message, "currency"));

    assert_int_equal(verify(&o, "pi_doesnotexist", &info, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_NOT_FOUND");

    /* A reference is the caller's word: it never becomes another path. */
    size_t before = count_reqs(NULL, NULL);
    assert_int_equal(verify(&o, "../refunds", &info, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_NOT_FOUND");
    assert_int_equal(count_reqs(NULL, NULL), before);
}

/* ---- cancel ---- */

static int cancel(const order_t *o, order_error *e)
{
    order_ctx ctx = fake_ctx(e, 0);
    return PAY->cancel(PAY->self, &ctx, o);
}

static void test_cancel(void **state)
{
    order_t o;
    order_payment_action a;
    order_error e;
    create_ok(&o, "EUR", 1000, &a);
    assert_int_equal(cancel(&o, &e), ORDER_OK);
    json_t *r = last_req("POST", "/cancel");
    assert_string_equal(jpath(r, "form", "cancellation_reason"), "requested_by_customer");
    char key[80];
    snprintf(key, sizeof key, "orderd-void-%s", o.id);
    assert_string_equal(jpath(r, "headers", "idempotency-key"), key);
    json_decref(r);
    assert_int_equal(cancel(&o, &e), ORDER_OK); /* again: already canceled */

    /* Paid meanwhile: the caller must refund instead. */
    order_t paid;
    create_ok(&paid, "EUR", 1000, &a);
    customer_pays(a.reference);
    assert_int_equal(cancel(&paid, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_ALREADY_SUCCEEDED");
    assert_string_equal(fake_meta(&e, "provider_status"), "succeeded");

    /* No intent was ever created: nothing to void, nothing sent. */
    order_t none;
    fake_order(&none, "EUR", 1000);
    size_t before = count_reqs(NULL, NULL);
    assert_int_equal(cancel(&none, &e), ORDER_OK);
    assert_int_equal(count_reqs(NULL, NULL), before);
}

/* ---- refund ---- */

/* The intent's charge was refunded exactly `amount` at the fake: once, in full. */
static void assert_refunded_at_stripe(const char *pi_id, int64_t amount)
{
    char path[320];
    snprintf(path, sizeof path, "/_fake/objects/%s", pi_id);
    json_t *pi = fake_call(&F, "GET", path, NULL, NULL);
    snprintf(path, sizeof path, "/_fake/objects/%s", jpath(pi, "latest_charge", NULL));
    json_t *ch = fake_call(&F, "GET", path, NULL, NULL);
    assert_int_equal(json_integer_value(json_object_get(ch, "amount_refunded")), amount);
    json_decref(ch);
    json_decref(pi);
}

static int refund(const order_t *o, char id[ORDER_REFERENCE_MAX + 1], order_error *e)
{
    order_ctx ctx = fake_ctx(e, 0);
    return PAY->refund(PAY->self, &ctx, o, id);
}

static void test_refund_once_however_often(void **state)
{
    order_t o;
    order_payment_action a;
    order_error e;
    char r1[ORDER_REFERENCE_MAX + 1], r2[ORDER_REFERENCE_MAX + 1];
    create_ok(&o, "EUR", 3000, &a);
    customer_pays(a.reference);
    assert_int_equal(refund(&o, r1, &e), ORDER_OK);
    assert_true(strncmp(r1, "re_", 3) == 0);
    assert_int_equal(refund(&o, r2, &e), ORDER_OK);
    assert_string_equal(r1, r2);

    json_t *reqs = fake_requests(&F, "POST", "/v1/refunds");
    json_t *r = json_array_get(reqs, 1);
    assert_string_equal(jpath(r, "form", "payment_intent"), a.reference);
    assert_string_equal(jpath(r, "form", "reason"), "requested_by_customer");
    char key[80];
    snprintf(key, sizeof key, "orderd-refund-%s", o.id);
    assert_string_equal(jpath(r, "headers", "idempotency-key"), key);
    json_decref(reqs);

    /* One refund at Stripe: the charge was refunded once, for its amount. */
    assert_refunded_at_stripe(a.reference, 3000);

    /* Refunded by someone else's key (dashboard): charge_already_refunded is success. */
    order_t twin = o;
    fake_order(&twin, "EUR", 3000);
    memcpy(twin.pay_reference, o.pay_reference, sizeof twin.pay_reference);
    char r3[ORDER_REFERENCE_MAX + 1];
    assert_int_equal(refund(&twin, r3, &e), ORDER_OK);
    /* ...and the order still learns the refund's id, by listing the intent's refunds. */
    assert_string_equal(r3, r1);
    assert_int_equal(count_reqs("GET", "/v1/refunds"), 1);
}

/* Stripe stores a 500 that came after the work began under the key and replays it for 24 h
 * (docs.stripe.com/idempotency): create, void and refund each finish under a second key,
 * and the money still moves once. */
static void test_replayed_500_does_not_block_for_a_day(void **state)
{
    order_t o;
    order_payment_action a;
    order_error e;
    fake_order(&o, "EUR", 3000);
    fake_fail(&F, "500_after", 1, "/v1/payment_intents");
    order_payment_info paid;
    assert_int_equal(create(&o, NULL, &a, &paid, &e), ORDER_OK);
    assert_true(strncmp(a.reference, "pi_", 3) == 0);
    json_t *last = last_req("POST", "/v1/payment_intents");
    char key[80];
    snprintf(key, sizeof key, "orderd-pi-%s-2", o.id);
    assert_string_equal(jpath(last, "headers", "idempotency-key"), key);
    json_decref(last);
    snprintf(o.pay_reference, sizeof o.pay_reference, "%s", a.reference);
    o.pay_provider = ORDER_PROVIDER_STRIPE;

    order_t paid_order = o;
    customer_pays(a.reference);
    fake_fail(&F, "500_after", 1, "/v1/refunds");
    char r1[ORDER_REFERENCE_MAX + 1], r2[ORDER_REFERENCE_MAX + 1];
    assert_int_equal(refund(&paid_order, r1, &e), ORDER_OK);
    assert_true(strncmp(r1, "re_", 3) == 0); /* the first key's refund, found by listing */
    assert_int_equal(refund(&paid_order, r2, &e), ORDER_OK);
    assert_string_equal(r1, r2);
    assert_refunded_at_stripe(a.reference, 3000);

    order_t unpaid;
    create_ok(&unpaid, "EUR", 1000, &a);
    fake_fail(&F, "500_after", 1, "/cancel");
    assert_int_equal(cancel(&unpaid, &e), ORDER_OK);
    char path[320];
    snprintf(path, sizeof path, "/_fake/objects/%s", a.reference);
    json_t *pi = fake_call(&F, "GET", path, NULL, NULL);
    assert_string_equal(jpath(pi, "status", NULL), "canceled");
    json_decref(pi);
}

/* Refused while unpaid, then paid: Stripe keeps the refusal under the refund key, yet the
 * refund goes through once the payment has succeeded, and still only once. */
static void test_refund_after_an_early_refusal(void **state)
{
    order_t o;
    order_payment_action a;
    order_error e;
    char r1[ORDER_REFERENCE_MAX + 1], r2[ORDER_REFERENCE_MAX + 1];
    create_ok(&o, "EUR", 3000, &a);
    assert_int_equal(refund(&o, r1, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_NOT_SUCCEEDED");
    assert_string_equal(fake_meta(&e, "provider_status"), "requires_payment_method");

    customer_pays(a.reference);
    assert_int_equal(refund(&o, r1, &e), ORDER_OK);
    assert_true(strncmp(r1, "re_", 3) == 0);
    assert_int_equal(refund(&o, r2, &e), ORDER_OK);
    assert_string_equal(r1, r2);
    assert_refunded_at_stripe(a.reference, 3000);
}

/* ---- webhooks ---- */

#define WHSEC "whsec_test_secret"

typedef struct signed_event {
    char *body;
    char signature[512];
    int64_t t;
} signed_event;

static signed_event make_event(const char *type, const char *id, bool tamper, int64_t ts)
{
    long st;
    json_t *r = fake_call(&F, "POST", "/_fake/event", &st,
                          "{\"type\":\"%s\",\"id\":\"%s\",\"secret\":\"%s\",\"tamper\":%s,"
                          "\"timestamp\":%lld}",
                          type, id, WHSEC, tamper ? "true" : "false", (long long)ts);
    assert_int_equal(st, 200);
    signed_event ev = {.body = strdup(jpath(r, "body", NULL)), .t = ts};
    snprintf(ev.signature, sizeof ev.signature, "%s", jpath(r, "signature", NULL));
    json_decref(r);
    return ev;
}

/* What Stripe would send for body at t, computed here (for bodies the fake cannot make). */
static void sign_locally(const char *body, int64_t t, char *out, size_t cap)
{
    char *msg = NULL;
    assert_true(asprintf(&msg, "%lld.%s", (long long)t, body) > 0);
    unsigned char mac[32];
    unsigned int len = sizeof mac;
    HMAC(EVP_sha256(), WHSEC, (int)strlen(WHSEC), (const unsigned char *)msg, strlen(msg), mac,
         &len);
    free(msg);
    size_t n = (size_t)snprintf(out, cap, "t=%lld,v1=", (long long)t);
    for (unsigned i = 0; i < len && n + 2 < cap; i++)
        n += (size_t)snprintf(out + n, cap - n, "%02x", mac[i]);
}

static int check(const signed_event *s, const char *sig, order_payment_event *ev, char *err)
{
    return pay_stripe_webhook(WHSEC, 300, s->t, sig ? sig : s->signature, s->body, strlen(s->body),
                              ev, err, 256);
}

static void test_webhook_payment_succeeded(void **state)
{
    order_t o;
    order_payment_action a;
    create_ok(&o, "JPY", 1200, &a);
    customer_pays(a.reference);
    int64_t now = time(NULL);
    signed_event s = make_event("payment_intent.succeeded", a.reference, false, now);
    order_payment_event ev;
    char err[256];
    assert_int_equal(check(&s, NULL, &ev, err), PAY_WEBHOOK_OK);
    assert_int_equal(ev.kind, ORDER_PAY_EVENT_SUCCEEDED);
    assert_int_equal(ev.provider, ORDER_PROVIDER_STRIPE);
    assert_true(strncmp(ev.id, "evt_", 4) == 0);
    assert_string_equal(ev.type, "payment_intent.succeeded");
    assert_string_equal(ev.order_id, o.id);
    assert_string_equal(ev.reference, a.reference);
    assert_true(strncmp(ev.charge_id, "ch_", 3) == 0);
    assert_int_equal(ev.amount_minor, 1200);
    assert_string_equal(ev.currency, "JPY");
    assert_int_equal(ev.occurred_at_us, now * 1000000);

    /* A Stripe-Signature with the right signature among others (secret rotation), and
     * spaces after the commas: accepted. */
    char sig[700];
    const char *v1 = strstr(s.signature, "v1=");
    snprintf(sig, sizeof sig, "t=%lld, v1=%064d, %s, v0=abc", (long long)now, 0, v1);
    assert_int_equal(check(&s, sig, &ev, err), PAY_WEBHOOK_OK);
    free(s.body);
}

static void test_webhook_signature_refusals(void **state)
{
    order_t o;
    order_payment_action a;
    order_payment_event ev;
    char err[256];
    create_ok(&o, "EUR", 1500, &a);
    int64_t now = time(NULL);

    signed_event s = make_event("payment_intent.canceled", a.reference, true, now);
    assert_int_equal(check(&s, NULL, &ev, err), PAY_WEBHOOK_BAD_SIGNATURE);
    assert_non_null(strstr(err, "signature"));
    free(s.body);

    /* Correctly signed, but 10 minutes old (a replay): refused with tolerance 300 s. */
    s = make_event("payment_intent.canceled", a.reference, false, now - 600);
    assert_int_equal(pay_stripe_webhook(WHSEC, 300, now, s.signature, s.body, strlen(s.body), &ev,
                                        err, sizeof err),
                     PAY_WEBHOOK_BAD_SIGNATURE);
    assert_non_null(strstr(err, "tolerance"));
    free(s.body);

    /* The body changed after signing. */
    s = make_event("payment_intent.canceled", a.reference, false, now);
    char *p = strstr(s.body, "canceled");
    p[0] = 'C';
    assert_int_equal(check(&s, NULL, &ev, err), PAY_WEBHOOK_BAD_SIGNATURE);
    p[0] = 'c';
    assert_int_equal(check(&s, NULL, &ev, err), PAY_WEBHOOK_OK);
    assert_int_equal(ev.kind, ORDER_PAY_EVENT_CANCELED);

    /* Only a v0 signature (the right bytes, the wrong scheme), or none at all. */
    char sig[300];
    snprintf(sig, sizeof sig, "t=%lld,v0=%s", (long long)now, strstr(s.signature, "v1=") + 3);
    assert_int_equal(check(&s, sig, &ev, err), PAY_WEBHOOK_BAD_SIGNATURE);
    assert_non_null(strstr(err, "v1"));
    assert_int_equal(check(&s, "", &ev, err), PAY_WEBHOOK_BAD_SIGNATURE);
    assert_int_equal(pay_stripe_webhook("whsec_other", 300, now, s.signature, s.body,
                                        strlen(s.body), &ev, err, sizeof err),
                     PAY_WEBHOOK_BAD_SIGNATURE);
    free(s.body);
}

static void test_webhook_failed_refunded_ignored_malformed(void **state)
{
    order_t o;
    order_payment_action a;
    order_payment_event ev;
    char err[256];
    long st;
    int64_t now = time(NULL);
    create_ok(&o, "EUR", 1500, &a);
    json_decref(fake_call(&F, "POST", "/_fake/pay_failed", &st,
                          "{\"id\":\"%s\",\"decline_code\":\"insufficient_funds\"}", a.reference));
    assert_int_equal(st, 200);
    signed_event s = make_event("payment_intent.payment_failed", a.reference, false, now);
    assert_int_equal(check(&s, NULL, &ev, err), PAY_WEBHOOK_OK);
    assert_int_equal(ev.kind, ORDER_PAY_EVENT_FAILED);
    assert_string_equal(ev.failure_code, "insufficient_funds");
    assert_true(ev.failure_message[0] != '\0');
    free(s.body);

    customer_pays(a.reference);
    char rid[ORDER_REFERENCE_MAX + 1];
    assert_int_equal(refund(&o, rid, &(order_error){0}), ORDER_OK);
    s = make_event("charge.refunded", a.reference, false, now);
    assert_int_equal(check(&s, NULL, &ev, err), PAY_WEBHOOK_OK);
    assert_int_equal(ev.kind, ORDER_PAY_EVENT_REFUNDED);
    assert_true(ev.full_refund);
    assert_string_equal(ev.reference, a.reference);
    assert_true(strncmp(ev.charge_id, "ch_", 3) == 0);
    assert_string_equal(ev.order_id, o.id);
    assert_int_equal(ev.amount_minor, 1500);
    free(s.body);

    s = make_event("payment_intent.created", a.reference, false, now);
    assert_int_equal(check(&s, NULL, &ev, err), PAY_WEBHOOK_OK);
    assert_int_equal(ev.kind, ORDER_PAY_EVENT_IGNORED);
    free(s.body);

    /* Correctly signed, but not an event. */
    const char *bodies[] = {"not json", "[1,2]", "{\"id\":\"evt_1\",\"object\":\"event\"}"};
    for (size_t i = 0; i < 3; i++) {
        char sig[200];
        sign_locally(bodies[i], now, sig, sizeof sig);
        assert_int_equal(pay_stripe_webhook(WHSEC, 300, now, sig, bodies[i], strlen(bodies[i]), &ev,
                                            err, sizeof err),
                         PAY_WEBHOOK_MALFORMED);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_create_sends_the_form_stripe_documents, setup),
        cmocka_unit_test_setup(test_amounts_in_stripe_units, setup),
        cmocka_unit_test_setup(test_retries_500_with_the_same_key, setup),
        cmocka_unit_test_setup(test_retries_429_with_the_same_key, setup),
        cmocka_unit_test_setup(test_retries_a_dropped_connection_with_the_same_key, setup),
        cmocka_unit_test_setup(test_400_is_not_retried, setup),
        cmocka_unit_test_setup(test_outage_after_retries_is_unavailable, setup),
        cmocka_unit_test_setup(test_a_hung_stripe_is_bounded_by_the_deadline, setup),
        cmocka_unit_test_setup(test_a_wrong_key_is_unavailable_and_not_retried, setup),
        cmocka_unit_test_setup(test_config_refuses_keys_of_the_other_mode, setup),
        cmocka_unit_test_setup(test_saved_card_that_succeeds, setup),
        cmocka_unit_test_setup(test_saved_card_declined, setup),
        cmocka_unit_test_setup(test_saved_card_processing, setup),
        cmocka_unit_test_setup(test_saved_card_confirm_answered_500_is_read_back, setup),
        cmocka_unit_test_setup(test_replayed_500_does_not_block_for_a_day, setup),
        cmocka_unit_test_setup(test_saved_card_of_a_customer, setup),
        cmocka_unit_test_setup(test_saved_card_refused_without_its_customer, setup),
        cmocka_unit_test_setup(test_verify_accepts_only_a_paid_intent_of_this_order, setup),
        cmocka_unit_test_setup(test_cancel, setup),
        cmocka_unit_test_setup(test_refund_once_however_often, setup),
        cmocka_unit_test_setup(test_refund_after_an_early_refusal, setup),
        cmocka_unit_test_setup(test_webhook_payment_succeeded, setup),
        cmocka_unit_test_setup(test_webhook_signature_refusals, setup),
        cmocka_unit_test_setup(test_webhook_failed_refunded_ignored_malformed, setup),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
