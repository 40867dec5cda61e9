/* payments.h — the payment provider adapters. Each fills the domain's order_payments port
 * (orders.h); server/ builds the ones the configuration enables and hands them to the
 * domain. One instance per worker thread: an instance is not shared between threads. */
#ifndef ORDERD_PAYMENTS_PAYMENTS_H
#define ORDERD_PAYMENTS_PAYMENTS_H

#include <stddef.h>
#include <stdint.h>

#include "orders/orders.h"

struct store;

/**
 * The LOCAL provider, for development: it keeps its payments in PostgreSQL through `store`
 * (borrowed; it must outlive the provider and belong to the same thread). A payment is
 * created PENDING with a reference "lp_" + 24 hex digits, one per order; confirming with
 * that reference marks it succeeded, with any other reference is FAILED_PRECONDITION
 * (reason PAYMENT_NOT_FOUND) and changes nothing.
 * Refuses to load (NULL, with a message in err) when `environment` is "production".
 * Free with pay_local_destroy().
 */
order_payments *pay_local_create(struct store *store, const char *environment, char *err,
                                 size_t errlen);

/** Frees a provider made by pay_local_create(). NULL is a no-op. */
void pay_local_destroy(order_payments *p);

/* ---- Stripe and PayPal over libcurl (payments/httpc.c, stripe.c, paypal.c) ---- */

/** How a provider is called: every attempt has a timeout; network errors, 409, 429 and
 *  5xx are retried with jittered exponential back-off under the same idempotency key;
 *  other 4xx are not. The call's deadline (order_ctx) bounds everything. */
typedef struct pay_http_config {
    int64_t timeout_us;         /* one attempt, whole request */
    int64_t connect_timeout_us; /* TCP + TLS connect of one attempt */
    int max_attempts;           /* including the first; >= 1 */
    int64_t backoff_base_us;    /* first retry waits about this (jittered), doubling */
    int64_t backoff_max_us;
    const char *ca_file; /* NULL = the system's trust store */
} pay_http_config;

typedef struct pay_stripe_config {
    const char *api_base;    /* "https://api.stripe.com" (no trailing slash) */
    const char *secret_key;  /* sk_...: Bearer credential; never logged */
    const char *api_version; /* pinned Stripe-Version header, e.g. "2024-06-20" */
    const char *environment; /* "production" refuses a test key (sk_test_) and vice versa */
    pay_http_config http;
} pay_stripe_config;

/** A Stripe (PaymentIntents) provider. One instance per thread. NULL with err on bad config. */
order_payments *pay_stripe_create(const pay_stripe_config *cfg, char *err, size_t errlen);
void pay_stripe_destroy(order_payments *p);

typedef struct pay_paypal_config {
    const char *api_base;      /* "https://api-m.paypal.com" */
    const char *client_id;     /* never logged */
    const char *client_secret; /* never logged */
    const char *return_url;    /* where PayPal sends the payer after approval */
    const char *cancel_url;
    const char *brand_name; /* NULL = PayPal's default */
    pay_http_config http;
} pay_paypal_config;

/** A PayPal (Orders v2) provider. One instance per thread; the OAuth2 token is cached
 *  process-wide (per api_base and client_id) until shortly before it expires. */
order_payments *pay_paypal_create(const pay_paypal_config *cfg, char *err, size_t errlen);
void pay_paypal_destroy(order_payments *p);

/* ---- webhooks ---- */

enum {
    PAY_WEBHOOK_OK = 0,
    PAY_WEBHOOK_BAD_SIGNATURE = -1, /* missing, wrong or stale signature: HTTP 400 */
    PAY_WEBHOOK_MALFORMED = -2,     /* not an event we can read: HTTP 400 */
    PAY_WEBHOOK_UNAVAILABLE = -3,   /* could not verify now (PayPal's API down): HTTP 503 */
};

/**
 * Verifies a Stripe webhook (Stripe-Signature: t=...,v1=...; HMAC-SHA256 of "t." + the
 * raw body keyed with the whole endpoint secret; constant-time compare against every v1;
 * |now - t| <= tolerance_s) and parses the event into *ev. Event types orderd does not
 * act on parse to ORDER_PAY_EVENT_IGNORED. Returns a PAY_WEBHOOK_* code; err says why.
 */
int pay_stripe_webhook(const char *endpoint_secret, int64_t tolerance_s, int64_t now_s,
                       const char *signature_header, const char *body, size_t len,
                       order_payment_event *ev, char *err, size_t errlen);

/** The transmission headers PayPal signs a webhook with (NULL if absent). */
typedef struct pay_paypal_headers {
    const char *auth_algo;         /* PAYPAL-AUTH-ALGO */
    const char *cert_url;          /* PAYPAL-CERT-URL */
    const char *transmission_id;   /* PAYPAL-TRANSMISSION-ID */
    const char *transmission_sig;  /* PAYPAL-TRANSMISSION-SIG */
    const char *transmission_time; /* PAYPAL-TRANSMISSION-TIME */
} pay_paypal_headers;

/**
 * Verifies a PayPal webhook through POST /v1/notifications/verify-webhook-signature
 * (with `paypal`'s credentials, a provider made by pay_paypal_create, and webhook_id)
 * and parses the event into *ev. Returns a PAY_WEBHOOK_* code; err says why.
 */
int pay_paypal_webhook(order_payments *paypal, order_ctx *ctx, const char *webhook_id,
                       const pay_paypal_headers *h, const char *body, size_t len,
                       order_payment_event *ev, char *err, size_t errlen);

#endif
