/* test_paypal.c — the PAYPAL provider against the local fake (tests/fakes/fake_paypal.py):
 * the order orderd creates (JSON, exact value strings, request ids), capture as
 * verification (approved or not, declined, pending, another order's), refund once, void,
 * the OAuth2 token (one grant for many calls, refreshed when it expires or is revoked,
 * one grant for threads that start together), retries, and webhooks verified through
 * PayPal's verification API. */
#include <openssl/evp.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <curl/curl.h>

#include "fakeproc.h"
#include "payments/payments.h"

#define MS 1000LL

typedef struct body_buf {
    char *data;
    size_t len;
} body_buf;

static fakeproc F;
static order_payments *PAY;

static pay_paypal_config config(const char *base, const char *secret)
{
    return (pay_paypal_config){
        .api_base = base,
        .client_id = "cid",
        .client_secret = secret,
        .return_url = "https://shop.example/paid?x=1&y=2",
        .cancel_url = "https://shop.example/cancelled",
        .brand_name = "Example Shop",
        .http = {.timeout_us = 3000 * MS,
                 .connect_timeout_us = 1000 * MS,
                 .max_attempts = 3,
                 .backoff_base_us = 20 * MS,
                 .backoff_max_us = 100 * MS},
    };
}

static int group_setup(void **state)
{
    const char *args[] = {"--client-id", "cid", "--client-secret", "csecret", "--webhook-id",
                          "WH-1",        NULL};
    if (fakeproc_start(&F, "tests/fakes/fake_paypal.py", args) != 0)
        return -1;
    char err[256];
    pay_paypal_config c = config(F.base, "csecret");
    PAY = pay_paypal_create(&c, err, sizeof err);
    if (!PAY)
        fprintf(stderr, "pay_paypal_create: %s\n", err);
    return PAY ? 0 : -1;
}

static int group_teardown(void **state)
{
    pay_paypal_destroy(PAY);
    fakeproc_stop(&F);
    return 0;
}

static int setup(void **state)
{
    fake_reset(&F);
    return 0;
}

/* ---- helpers ---- */

static const char *jpath(const json_t *v, const char *a, const char *b)
{
    json_t *x = json_object_get(v, a);
    if (b)
        x = json_object_get(x, b);
    return json_string_value(x);
}

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

static int64_t token_grants(void)
{
    json_t *s = fake_call(&F, "GET", "/_fake/stats", NULL, NULL);
    int64_t n = (int64_t)json_integer_value(json_object_get(s, "token_grants"));
    json_decref(s);
    return n;
}

static int create(order_payments *p, const order_t *o, const char *pm, order_payment_action *a,
                  order_error *e)
{
    order_payment_info paid;
    order_ctx ctx = fake_ctx(e, 0);
    order_saved_method saved = {pm, NULL};
    return p->create(p->self, &ctx, o, pm ? &saved : NULL, a, &paid);
}

static void create_ok(order_t *o, const char *currency, int64_t total, order_payment_action *a)
{
    order_error e;
    fake_order(o, currency, total);
    int rc = create(PAY, o, NULL, a, &e);
    if (rc != ORDER_OK)
        fprintf(stderr, "create: %s\n", e.message);
    assert_int_equal(rc, ORDER_OK);
    snprintf(o->pay_reference, sizeof o->pay_reference, "%s", a->reference);
    o->pay_provider = ORDER_PROVIDER_PAYPAL;
}

static void fake_post(const char *path, const char *body)
{
    long st;
    json_decref(fake_call(&F, "POST", path, &st, "%s", body));
    assert_int_equal(st, 200);
}

static void payer_approves(const char *id)
{
    char body[400];
    snprintf(body, sizeof body, "{\"id\":\"%s\"}", id);
    fake_post("/_fake/pay", body);
}

static size_t sink(char *ptr, size_t size, size_t n, void *ud)
{
    body_buf *b = ud;
    char *d = realloc(b->data, b->len + size * n + 1);
    if (!d)
        return 0;
    memcpy(d + b->len, ptr, size * n);
    b->data = d;
    b->len += size * n;
    d[b->len] = '\0';
    return size * n;
}

/* A call to the fake's PayPal API as another client would make it (the dashboard, say). */
static json_t *paypal_api(const char *path, const char *auth, const char *ctype, const char *body)
{
    char url[512], h1[512], h2[128];
    snprintf(url, sizeof url, "%s%s", F.base, path);
    snprintf(h1, sizeof h1, "Authorization: %s", auth);
    snprintf(h2, sizeof h2, "Content-Type: %s", ctype);
    struct curl_slist *hl = curl_slist_append(curl_slist_append(NULL, h1), h2);
    body_buf b = {0};
    CURL *c = curl_easy_init();
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hl);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, sink);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    CURLcode cc = curl_easy_perform(c);
    curl_easy_cleanup(c);
    curl_slist_free_all(hl);
    json_t *out = cc == CURLE_OK && b.data ? json_loads(b.data, 0, NULL) : NULL;
    free(b.data);
    return out;
}

/* Refunds part of a capture behind orderd's back. */
static void partial_refund(const char *capture_id, const char *currency, const char *value)
{
    unsigned char b64[64];
    EVP_EncodeBlock(b64, (const unsigned char *)"cid:csecret", 11);
    char basic[96], bearer[600], path[300], body[200];
    snprintf(basic, sizeof basic, "Basic %s", b64);
    json_t *tok = paypal_api("/v1/oauth2/token", basic, "application/x-www-form-urlencoded",
                             "grant_type=client_credentials");
    assert_non_null(jpath(tok, "access_token", NULL));
    snprintf(bearer, sizeof bearer, "Bearer %s", jpath(tok, "access_token", NULL));
    json_decref(tok);
    snprintf(path, sizeof path, "/v2/payments/captures/%s/refund", capture_id);
    snprintf(body, sizeof body, "{\"amount\":{\"currency_code\":\"%s\",\"value\":\"%s\"}}",
             currency, value);
    json_t *r = paypal_api(path, bearer, "application/json", body);
    assert_non_null(jpath(r, "id", NULL));
    json_decref(r);
}

static int verify(const order_t *o, const char *ref, order_payment_info *info, order_error *e)
{
    order_ctx ctx = fake_ctx(e, 0);
    return PAY->verify(PAY->self, &ctx, o, ref, info);
}

/* ---- create ---- */

static void test_create_sends_the_order_paypal_documents(void **state)
{
    order_t o;
    order_payment_action a;
    create_ok(&o, "EUR", 1234, &a);
    assert_int_equal(a.provider, ORDER_PROVIDER_PAYPAL);
    assert_true(strlen(a.reference) > 10);
    assert_non_null(strstr(a.approval_url, a.reference)); /* the payer-action link */

    json_t *r = last_req("POST", "/v2/checkout/orders");
    json_t *body = json_loads(jpath(r, "body", NULL), 0, NULL);
    assert_non_null(body);
    json_t *pu = json_array_get(json_object_get(body, "purchase_units"), 0);
    assert_string_equal(jpath(body, "intent", NULL), "CAPTURE");
    assert_string_equal(jpath(pu, "custom_id", NULL), o.id);
    assert_string_equal(jpath(pu, "invoice_id", NULL), o.id);
    assert_string_equal(jpath(pu, "amount", "currency_code"), "EUR");
    assert_string_equal(jpath(pu, "amount", "value"), "12.34");
    json_t *ec = json_object_get(json_object_get(json_object_get(body, "payment_source"), "paypal"),
                                 "experience_context");
    assert_string_equal(jpath(ec, "return_url", NULL), "https://shop.example/paid?x=1&y=2");
    assert_string_equal(jpath(ec, "cancel_url", NULL), "https://shop.example/cancelled");
    assert_string_equal(jpath(ec, "brand_name", NULL), "Example Shop");
    assert_string_equal(jpath(ec, "user_action", NULL), "PAY_NOW");
    char rid[80];
    snprintf(rid, sizeof rid, "orderd-create-%s", o.id);
    assert_string_equal(jpath(r, "headers", "paypal-request-id"), rid);
    assert_string_equal(jpath(r, "headers", "content-type"), "application/json");
    assert_true(strncmp(jpath(r, "headers", "authorization"), "Bearer A21AA", 12) == 0);
    json_decref(body);
    json_decref(r);

    /* The token was granted with Basic client_id:secret and client_credentials. */
    r = last_req("POST", "/v1/oauth2/token");
    unsigned char b64[64];
    EVP_EncodeBlock(b64, (const unsigned char *)"cid:csecret", 11);
    char basic[96];
    snprintf(basic, sizeof basic, "Basic %s", b64);
    assert_string_equal(jpath(r, "headers", "authorization"), basic);
    assert_string_equal(jpath(r, "body", NULL), "grant_type=client_credentials");
    json_decref(r);

    /* Again (a retried PlaceOrder): the same PayPal order. */
    order_payment_action again;
    order_error e;
    assert_int_equal(create(PAY, &o, NULL, &again, &e), ORDER_OK);
    assert_string_equal(again.reference, a.reference);
    assert_int_equal(count_reqs("POST", "/v2/checkout/orders"), 2);
}

static void test_value_strings(void **state)
{
    order_t o;
    order_payment_action a;
    order_error e;
    create_ok(&o, "JPY", 1200, &a);
    json_t *r = last_req("POST", "/v2/checkout/orders");
    json_t *body = json_loads(jpath(r, "body", NULL), 0, NULL);
    json_t *pu = json_array_get(json_object_get(body, "purchase_units"), 0);
    assert_string_equal(jpath(pu, "amount", "value"), "1200");
    assert_string_equal(jpath(pu, "amount", "currency_code"), "JPY");
    json_decref(body);
    json_decref(r);

    create_ok(&o, "USD", 5, &a);
    r = last_req("POST", "/v2/checkout/orders");
    body = json_loads(jpath(r, "body", NULL), 0, NULL);
    pu = json_array_get(json_object_get(body, "purchase_units"), 0);
    assert_string_equal(jpath(pu, "amount", "value"), "0.05");
    json_decref(body);
    json_decref(r);

    /* HUF has no decimals at PayPal: 1500.50 Ft cannot be sent, and is not. */
    size_t before = count_reqs("POST", "/v2/checkout/orders");
    fake_order(&o, "HUF", 150050);
    assert_int_equal(create(PAY, &o, NULL, &a, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "AMOUNT_NOT_REPRESENTABLE");
    assert_int_equal(count_reqs("POST", "/v2/checkout/orders"), before);
}

static void test_saved_payment_methods_are_refused(void **state)
{
    order_t o;
    order_payment_action a;
    order_error e;
    fake_order(&o, "EUR", 1000);
    assert_int_equal(create(PAY, &o, "pm_card_visa", &a, &e), ORDER_EINVAL);
    assert_int_equal(e.nviolations, 1);
    assert_string_equal(e.violations[0].field, "payment_method");
    assert_non_null(strstr(e.violations[0].description, "STRIPE"));
    assert_int_equal(count_reqs(NULL, NULL), 0);
}

/* ---- verify (capture) ---- */

static void test_capture_of_an_approved_order(void **state)
{
    order_t o;
    order_payment_action a;
    order_payment_info info;
    order_error e;
    create_ok(&o, "EUR", 2500, &a);

    assert_int_equal(verify(&o, a.reference, &info, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_NOT_SUCCEEDED");
    assert_string_equal(fake_meta(&e, "provider_status"), "ORDER_NOT_APPROVED");

    payer_approves(a.reference);
    int64_t now = (int64_t)time(NULL) * 1000000;
    assert_int_equal(verify(&o, a.reference, &info, &e), ORDER_OK);
    assert_true(strlen(info.charge_id) > 10);
    assert_string_equal(info.provider_status, "COMPLETED");
    assert_true(info.paid_at_us > now - 10 * 1000000LL && info.paid_at_us < now + 10 * 1000000LL);

    json_t *r = last_req("POST", "/capture");
    char rid[80];
    snprintf(rid, sizeof rid, "orderd-capture-%s", o.id);
    assert_string_equal(jpath(r, "headers", "paypal-request-id"), rid);
    assert_string_equal(jpath(r, "headers", "content-type"), "application/json");
    assert_string_equal(jpath(r, "body", NULL), "{}");
    json_decref(r);

    /* Confirming again is harmless: the same capture. */
    order_payment_info again;
    assert_int_equal(verify(&o, a.reference, &again, &e), ORDER_OK);
    assert_string_equal(again.charge_id, info.charge_id);
}

static void test_capture_refuses_what_is_not_this_orders_payment(void **state)
{
    order_t o, other;
    order_payment_action a, b;
    order_payment_info info;
    order_error e;
    create_ok(&o, "EUR", 2500, &a);
    create_ok(&other, "EUR", 2500, &b);
    payer_approves(a.reference);
    payer_approves(b.reference);

    /* Another order's approved PayPal order, same amount: refused. */
    assert_int_equal(verify(&o, b.reference, &info, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_MISMATCH");
    assert_non_null(strstr(e.message, "another order"));
    /* ...which that order can still confirm (ORDER_ALREADY_CAPTURED -> read the order). */
    assert_int_equal(verify(&other, b.reference, &info, &e), ORDER_OK);

    order_t changed = o;
    changed.total_minor = 2600;
    assert_int_equal(verify(&changed, a.reference, &info, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_MISMATCH");
    assert_non_null(strstr(e.message, "amount"));
    assert_int_equal(verify(&o, a.reference, &info, &e), ORDER_OK);

    assert_int_equal(verify(&o, "NOSUCHORDER12345", &info, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_NOT_FOUND");
    assert_int_equal(verify(&o, "../../v1/oauth2/token", &info, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_NOT_FOUND");
}

static int cancel(const order_t *o, order_error *e);

static void test_capture_declined_or_pending(void **state)
{
    order_t o;
    order_payment_action a;
    order_payment_info info;
    order_error e;
    char body[400];

    create_ok(&o, "EUR", 2500, &a);
    payer_approves(a.reference);
    snprintf(body, sizeof body, "{\"id\":\"%s\",\"status\":\"DECLINED\"}", a.reference);
    fake_post("/_fake/capture_outcome", body);
    assert_int_equal(verify(&o, a.reference, &info, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_DECLINED");
    assert_string_equal(fake_meta(&e, "provider_status"), "INSTRUMENT_DECLINED");

    create_ok(&o, "EUR", 2500, &a);
    payer_approves(a.reference);
    snprintf(body, sizeof body, "{\"id\":\"%s\",\"status\":\"PENDING\"}", a.reference);
    fake_post("/_fake/capture_outcome", body);
    assert_int_equal(verify(&o, a.reference, &info, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_NOT_SUCCEEDED");
    assert_string_equal(fake_meta(&e, "provider_status"), "PENDING");
    /* Captured but pending: neither voidable nor refundable yet (422 PENDING_CAPTURE). */
    assert_int_equal(cancel(&o, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_NOT_CANCELABLE");

    /* PayPal's other business refusals of a capture are declines, not INTERNAL. */
    const char *issues[] = {"TRANSACTION_REFUSED", "PAYER_CANNOT_PAY", "DUPLICATE_INVOICE_ID"};
    for (size_t i = 0; i < 3; i++) {
        create_ok(&o, "EUR", 2500, &a);
        payer_approves(a.reference);
        snprintf(body, sizeof body, "{\"id\":\"%s\",\"status\":\"DECLINED\",\"reason\":\"%s\"}",
                 a.reference, issues[i]);
        fake_post("/_fake/capture_outcome", body);
        assert_int_equal(verify(&o, a.reference, &info, &e), ORDER_EPRECONDITION);
        assert_string_equal(e.reason, "PAYMENT_DECLINED");
        assert_string_equal(fake_meta(&e, "decline_code"), issues[i]);
    }
    create_ok(&o, "EUR", 2500, &a);
    payer_approves(a.reference);
    snprintf(body, sizeof body,
             "{\"id\":\"%s\",\"status\":\"DECLINED\",\"reason\":\"REDIRECT_PAYER_FOR_ALTERNATE_"
             "FUNDING\"}",
             a.reference);
    fake_post("/_fake/capture_outcome", body);
    assert_int_equal(verify(&o, a.reference, &info, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_NOT_SUCCEEDED");
}

/* ---- refund and void ---- */

static int refund(const order_t *o, char id[ORDER_REFERENCE_MAX + 1], order_error *e)
{
    order_ctx ctx = fake_ctx(e, 0);
    return PAY->refund(PAY->self, &ctx, o, id);
}

static int cancel(const order_t *o, order_error *e)
{
    order_ctx ctx = fake_ctx(e, 0);
    return PAY->cancel(PAY->self, &ctx, o);
}

static void test_refund_once(void **state)
{
    order_t o;
    order_payment_action a;
    order_payment_info info;
    order_error e;
    char r1[ORDER_REFERENCE_MAX + 1], r2[ORDER_REFERENCE_MAX + 1];
    create_ok(&o, "EUR", 4000, &a);

    assert_int_equal(refund(&o, r1, &e), ORDER_EPRECONDITION); /* nothing captured yet */
    assert_string_equal(e.reason, "PAYMENT_NOT_SUCCEEDED");

    payer_approves(a.reference);
    assert_int_equal(verify(&o, a.reference, &info, &e), ORDER_OK);
    /* The order does not know its capture id yet: the provider looks it up. */
    assert_int_equal(refund(&o, r1, &e), ORDER_OK);
    assert_true(strlen(r1) > 10);
    snprintf(o.pay_charge_id, sizeof o.pay_charge_id, "%s", info.charge_id);
    assert_int_equal(refund(&o, r2, &e), ORDER_OK);
    assert_string_equal(r1, r2);

    json_t *r = last_req("POST", "/refund");
    char rid[80], path[300];
    snprintf(rid, sizeof rid, "orderd-refund-%s", o.id);
    assert_string_equal(jpath(r, "headers", "paypal-request-id"), rid);
    snprintf(path, sizeof path, "/v2/payments/captures/%s/refund", info.charge_id);
    assert_string_equal(jpath(r, "path", NULL), path);
    json_decref(r);

    /* One refund at PayPal, of the whole capture. */
    snprintf(path, sizeof path, "/_fake/objects/%s", info.charge_id);
    json_t *cap = fake_call(&F, "GET", path, NULL, NULL);
    assert_string_equal(jpath(cap, "status", NULL), "REFUNDED");
    json_decref(cap);

    /* Refunded under another request id (another replica's order copy): fully refunded
     * is success. */
    order_t twin = o;
    fake_order(&twin, "EUR", 4000);
    memcpy(twin.pay_reference, o.pay_reference, sizeof twin.pay_reference);
    memcpy(twin.pay_charge_id, o.pay_charge_id, sizeof twin.pay_charge_id);
    assert_int_equal(refund(&twin, r2, &e), ORDER_OK);
}

static void test_void(void **state)
{
    order_t o;
    order_payment_action a;
    order_payment_info info;
    order_error e;
    create_ok(&o, "EUR", 4000, &a);
    assert_int_equal(cancel(&o, &e), ORDER_OK); /* not captured: it lapses */
    payer_approves(a.reference);
    assert_int_equal(cancel(&o, &e), ORDER_OK);
    assert_int_equal(verify(&o, a.reference, &info, &e), ORDER_OK);
    assert_int_equal(cancel(&o, &e), ORDER_EPRECONDITION);
    assert_string_equal(e.reason, "PAYMENT_ALREADY_SUCCEEDED");

    order_t none;
    fake_order(&none, "EUR", 4000);
    assert_int_equal(cancel(&none, &e), ORDER_OK);
    snprintf(none.pay_reference, sizeof none.pay_reference, "NOSUCHORDER12345");
    assert_int_equal(cancel(&none, &e), ORDER_OK);
}

/* ---- the token ---- */

static void test_token_cached_and_refreshed(void **state)
{
    order_t o;
    order_payment_action a;
    fake_post("/_fake/config", "{\"token_ttl\": 2}");
    for (int i = 0; i < 4; i++)
        create_ok(&o, "EUR", 1000 + i, &a);
    assert_int_equal(token_grants(), 1); /* one grant for many calls */

    /* A 2 s token is renewed a tenth of its life before it expires. */
    usleep(1900 * 1000);
    create_ok(&o, "EUR", 1000, &a);
    assert_int_equal(token_grants(), 2);
    create_ok(&o, "EUR", 1000, &a);
    assert_int_equal(token_grants(), 2);

    /* Revoked early: the 401 drops it, and the call goes through with a new one. */
    fake_post("/_fake/config", "{\"revoke_tokens\": true, \"token_ttl\": 3600}");
    create_ok(&o, "EUR", 1000, &a);
    assert_int_equal(token_grants(), 3);
    json_t *reqs = fake_requests(&F, "POST", "/v2/checkout/orders");
    json_t *r401 = json_array_get(reqs, json_array_size(reqs) - 2);
    assert_int_equal(json_integer_value(json_object_get(r401, "status")), 401);
    json_decref(reqs);
}

typedef struct racer {
    order_payments *p;
    int rc;
} racer;

static pthread_barrier_t start_line;

static void *race(void *arg)
{
    racer *r = arg;
    order_t o;
    order_payment_action a;
    order_error e;
    fake_order(&o, "EUR", 1000);
    pthread_barrier_wait(&start_line);
    r->rc = create(r->p, &o, NULL, &a, &e);
    return NULL;
}

static void test_threads_share_one_grant(void **state)
{
    /* Another api_base spelling is another cache entry: no token cached for it yet. */
    char base[64], err[256];
    snprintf(base, sizeof base, "http://localhost:%d", F.port);
    pay_paypal_config c = config(base, "csecret");
    enum { N = 6 };
    racer rs[N];
    pthread_t t[N];
    pthread_barrier_init(&start_line, NULL, N);
    for (int i = 0; i < N; i++) {
        rs[i].p = pay_paypal_create(&c, err, sizeof err); /* one instance per thread */
        assert_non_null(rs[i].p);
    }
    for (int i = 0; i < N; i++)
        pthread_create(&t[i], NULL, race, &rs[i]);
    for (int i = 0; i < N; i++) {
        pthread_join(t[i], NULL);
        assert_int_equal(rs[i].rc, ORDER_OK);
        pay_paypal_destroy(rs[i].p);
    }
    pthread_barrier_destroy(&start_line);
    assert_int_equal(token_grants(), 1);
}

static void test_wrong_secret(void **state)
{
    char err[256];
    pay_paypal_config c = config(F.base, "not-the-secret");
    c.client_id = "cid-other"; /* a cache entry of its own */
    order_payments *bad = pay_paypal_create(&c, err, sizeof err);
    assert_non_null(bad);
    order_t o;
    order_payment_action a;
    order_error e;
    fake_order(&o, "EUR", 1000);
    assert_int_equal(create(bad, &o, NULL, &a, &e), ORDER_EUNAVAILABLE);
    assert_string_equal(e.message, "paypal rejected orderd's credentials");
    assert_int_equal(count_reqs(NULL, "/v2/"), 0);
    pay_paypal_destroy(bad);

    c = config(F.base, "csecret");
    c.return_url = NULL;
    assert_null(pay_paypal_create(&c, err, sizeof err));
}

/* ---- retries ---- */

static void test_retries_with_the_same_request_id(void **state)
{
    order_t o;
    order_payment_action a;
    create_ok(&o, "EUR", 1000, &a); /* a token in the cache */
    fake_fail(&F, "500", 1, "/v2/checkout/orders");
    fake_fail(&F, "409", 1, "/v2/checkout/orders");
    create_ok(&o, "EUR", 1000, &a);
    /* Three attempts of the second order (500, 409, 201), one request id. */
    char rid[80];
    snprintf(rid, sizeof rid, "orderd-create-%s", o.id);
    json_t *reqs = fake_requests(&F, "POST", "/v2/checkout/orders");
    long statuses[8];
    size_t n = 0, i;
    json_t *r;
    json_array_foreach(reqs, i, r)
    {
        if (strcmp(jpath(r, "headers", "paypal-request-id"), rid) == 0 && n < 8)
            statuses[n++] = (long)json_integer_value(json_object_get(r, "status"));
    }
    json_decref(reqs);
    assert_int_equal(n, 3);
    assert_int_equal(statuses[0], 500);
    assert_int_equal(statuses[1], 409);
    assert_int_equal(statuses[2], 201);

    order_error e;
    fake_fail(&F, "500", 5, "/v2/checkout/orders");
    fake_order(&o, "EUR", 1000);
    assert_int_equal(create(PAY, &o, NULL, &a, &e), ORDER_EUNAVAILABLE);
    assert_non_null(strstr(e.message, "paypal"));
}

/* ---- webhooks ---- */

typedef struct delivery {
    char *body;
    char algo[64], cert[256], tid[128], sig[256], time[64];
    pay_paypal_headers h;
} delivery;

static void make_event(delivery *d, const char *type, const char *id, bool tamper)
{
    long st;
    json_t *r =
        fake_call(&F, "POST", "/_fake/event", &st, "{\"type\":\"%s\",\"id\":\"%s\",\"tamper\":%s}",
                  type, id, tamper ? "true" : "false");
    assert_int_equal(st, 200);
    json_t *h = json_object_get(r, "headers");
    d->body = strdup(jpath(r, "body", NULL));
    snprintf(d->algo, sizeof d->algo, "%s", jpath(h, "PAYPAL-AUTH-ALGO", NULL));
    snprintf(d->cert, sizeof d->cert, "%s", jpath(h, "PAYPAL-CERT-URL", NULL));
    snprintf(d->tid, sizeof d->tid, "%s", jpath(h, "PAYPAL-TRANSMISSION-ID", NULL));
    snprintf(d->sig, sizeof d->sig, "%s", jpath(h, "PAYPAL-TRANSMISSION-SIG", NULL));
    snprintf(d->time, sizeof d->time, "%s", jpath(h, "PAYPAL-TRANSMISSION-TIME", NULL));
    d->h = (pay_paypal_headers){d->algo, d->cert, d->tid, d->sig, d->time};
    json_decref(r);
}

static int deliver(const delivery *d, order_payment_event *ev, char *err)
{
    order_error e;
    order_ctx ctx = fake_ctx(&e, 5000 * MS);
    return pay_paypal_webhook(PAY, &ctx, "WH-1", &d->h, d->body, strlen(d->body), ev, err, 256);
}

static void test_webhooks(void **state)
{
    order_t o;
    order_payment_action a;
    order_payment_info info;
    order_payment_event ev;
    order_error e;
    char err[256];
    delivery d;
    create_ok(&o, "JPY", 1200, &a);
    payer_approves(a.reference);
    assert_int_equal(verify(&o, a.reference, &info, &e), ORDER_OK);

    make_event(&d, "PAYMENT.CAPTURE.COMPLETED", a.reference, false);
    assert_int_equal(deliver(&d, &ev, err), PAY_WEBHOOK_OK);
    assert_int_equal(ev.kind, ORDER_PAY_EVENT_SUCCEEDED);
    assert_int_equal(ev.provider, ORDER_PROVIDER_PAYPAL);
    assert_true(strncmp(ev.id, "WH-", 3) == 0);
    assert_string_equal(ev.charge_id, info.charge_id);
    assert_string_equal(ev.order_id, o.id);
    assert_string_equal(ev.reference, a.reference);
    assert_int_equal(ev.amount_minor, 1200);
    assert_string_equal(ev.currency, "JPY");
    assert_true(ev.occurred_at_us > 0);
    /* Verified through PayPal, with the event as received and the five headers. */
    json_t *r = last_req("POST", "/v1/notifications/verify-webhook-signature");
    json_t *vb = json_loads(jpath(r, "body", NULL), 0, NULL);
    assert_string_equal(jpath(vb, "webhook_id", NULL), "WH-1");
    assert_string_equal(jpath(vb, "transmission_sig", NULL), d.sig);
    assert_string_equal(jpath(json_object_get(vb, "webhook_event"), "id", NULL), ev.id);
    json_decref(vb);
    json_decref(r);

    /* The same event with a body changed after signing: refused. */
    char *p = strstr(d.body, "\"1200\"");
    assert_non_null(p);
    p[1] = '9';
    assert_int_equal(deliver(&d, &ev, err), PAY_WEBHOOK_BAD_SIGNATURE);
    free(d.body);

    make_event(&d, "PAYMENT.CAPTURE.COMPLETED", a.reference, true);
    assert_int_equal(deliver(&d, &ev, err), PAY_WEBHOOK_BAD_SIGNATURE);

    /* A header missing: refused without asking PayPal. */
    size_t before = count_reqs(NULL, "verify-webhook-signature");
    d.h.transmission_sig = NULL;
    assert_int_equal(deliver(&d, &ev, err), PAY_WEBHOOK_BAD_SIGNATURE);
    assert_non_null(strstr(err, "PAYPAL-TRANSMISSION-SIG"));
    assert_int_equal(count_reqs(NULL, "verify-webhook-signature"), before);
    free(d.body);

    /* Headers no PayPal delivery has (garbage, bytes that are not UTF-8, a certificate
     * elsewhere): refused without asking PayPal, never "unavailable". */
    make_event(&d, "PAYMENT.CAPTURE.COMPLETED", a.reference, false);
    before = count_reqs(NULL, "verify-webhook-signature");
    d.h.auth_algo = "\xff";
    assert_int_equal(deliver(&d, &ev, err), PAY_WEBHOOK_BAD_SIGNATURE);
    d.h.auth_algo = "none";
    assert_int_equal(deliver(&d, &ev, err), PAY_WEBHOOK_BAD_SIGNATURE);
    d.h.auth_algo = d.algo;
    d.h.cert_url = "https://evil.example/paypal.com/cert";
    assert_int_equal(deliver(&d, &ev, err), PAY_WEBHOOK_BAD_SIGNATURE);
    d.h.cert_url = "https://api.paypal.com.evil.example/cert";
    assert_int_equal(deliver(&d, &ev, err), PAY_WEBHOOK_BAD_SIGNATURE);
    assert_int_equal(count_reqs(NULL, "verify-webhook-signature"), before);
    d.h.cert_url = d.cert;
    free(d.body);

    /* Not JSON at all. */
    make_event(&d, "PAYMENT.CAPTURE.COMPLETED", a.reference, false);
    order_ctx ctx = fake_ctx(&e, 0);
    assert_int_equal(
        pay_paypal_webhook(PAY, &ctx, "WH-1", &d.h, "not json", 8, &ev, err, sizeof err),
        PAY_WEBHOOK_MALFORMED);

    /* PayPal down: the webhook cannot be verified now (503, PayPal delivers it again). */
    fake_fail(&F, "500", 3, "verify-webhook-signature"); /* max_attempts */
    assert_int_equal(deliver(&d, &ev, err), PAY_WEBHOOK_UNAVAILABLE);
    free(d.body);

    /* Refunded: the resource is the refund, its "up" link the capture. */
    char rid[ORDER_REFERENCE_MAX + 1];
    assert_int_equal(refund(&o, rid, &e), ORDER_OK);
    make_event(&d, "PAYMENT.CAPTURE.REFUNDED", a.reference, false);
    assert_int_equal(deliver(&d, &ev, err), PAY_WEBHOOK_OK);
    assert_int_equal(ev.kind, ORDER_PAY_EVENT_REFUNDED);
    assert_string_equal(ev.refund_id, rid);
    assert_string_equal(ev.charge_id, info.charge_id);
    assert_string_equal(ev.order_id, o.id);
    assert_true(ev.full_refund);
    assert_int_equal(ev.amount_minor, 1200);
    free(d.body);

    /* Part of a capture refunded from the dashboard: not a full refund. */
    create_ok(&o, "EUR", 5000, &a);
    payer_approves(a.reference);
    assert_int_equal(verify(&o, a.reference, &info, &e), ORDER_OK);
    partial_refund(info.charge_id, "EUR", "10.00");
    make_event(&d, "PAYMENT.CAPTURE.REFUNDED", a.reference, false);
    assert_int_equal(deliver(&d, &ev, err), PAY_WEBHOOK_OK);
    assert_int_equal(ev.kind, ORDER_PAY_EVENT_REFUNDED);
    assert_false(ev.full_refund);
    assert_int_equal(ev.amount_minor, 1000);
    free(d.body);

    /* Denied. */
    create_ok(&o, "EUR", 990, &a);
    payer_approves(a.reference);
    assert_int_equal(verify(&o, a.reference, &info, &e), ORDER_OK);
    make_event(&d, "PAYMENT.CAPTURE.DENIED", a.reference, false);
    assert_int_equal(deliver(&d, &ev, err), PAY_WEBHOOK_OK);
    assert_int_equal(ev.kind, ORDER_PAY_EVENT_DENIED);
    assert_string_equal(ev.order_id, o.id);
    assert_int_equal(ev.amount_minor, 990);
    free(d.body);

    make_event(&d, "CHECKOUT.ORDER.APPROVED", a.reference, false);
    assert_int_equal(deliver(&d, &ev, err), PAY_WEBHOOK_OK);
    assert_int_equal(ev.kind, ORDER_PAY_EVENT_IGNORED);
    free(d.body);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_create_sends_the_order_paypal_documents, setup),
        cmocka_unit_test_setup(test_value_strings, setup),
        cmocka_unit_test_setup(test_saved_payment_methods_are_refused, setup),
        cmocka_unit_test_setup(test_capture_of_an_approved_order, setup),
        cmocka_unit_test_setup(test_capture_refuses_what_is_not_this_orders_payment, setup),
        cmocka_unit_test_setup(test_capture_declined_or_pending, setup),
        cmocka_unit_test_setup(test_refund_once, setup),
        cmocka_unit_test_setup(test_void, setup),
        cmocka_unit_test_setup(test_token_cached_and_refreshed, setup),
        cmocka_unit_test_setup(test_threads_share_one_grant, setup),
        cmocka_unit_test_setup(test_wrong_secret, setup),
        cmocka_unit_test_setup(test_retries_with_the_same_request_id, setup),
        cmocka_unit_test_setup(test_webhooks, setup),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
