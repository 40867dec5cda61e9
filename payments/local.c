/* local.c — the LOCAL payment provider, for development and tests: no money moves. Its
 * payments live in PostgreSQL (storage's local_payments ledger), one per order, so they
 * survive restarts and are shared by every worker and replica.
 *
 * A payment is PENDING when created, SUCCEEDED when confirmed with its reference, then
 * possibly REFUNDED; a PENDING one can be VOIDED. Every change is a conditional update
 * from the expected status, so racing calls agree; each operation is idempotent. */
#include "payments/httpc.h" /* pay__refuse */
#include "payments/payments.h"

#include <assert.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>

#include "common/log.h"
#include "storage/storage.h"

#define PAY_BIT(s) (1u << (unsigned)(s))

struct local {
    struct store *store; /* borrowed */
};

/* "lp_" + 24 random hex digits (96 bits): unguessable, so a reference cannot be made up. */
static bool new_reference(char *out, size_t cap)
{
    unsigned char raw[12];
    size_t got = 0;
    while (got < sizeof raw) {
        ssize_t n = getrandom(raw + got, sizeof raw - got, 0);
        if (n < 0)
            return false;
        got += (size_t)n;
    }
    size_t len = (size_t)snprintf(out, cap, "lp_");
    for (size_t i = 0; i < sizeof raw && len + 2 < cap; i++)
        len += (size_t)snprintf(out + len, cap - len, "%02x", raw[i]);
    return true;
}

static const char *status_name(order_pay_status s)
{
    const char *n = order_pay_status_name(s);
    return n ? n : "unknown";
}

static int lp_create(void *self, order_ctx *ctx, const order_t *o, const order_saved_method *saved,
                     order_payment_action *out, order_payment_info *paid)
{
    struct local *l = self;
    memset(paid, 0, sizeof *paid);
    if (saved) {
        order_violate(ctx->err, "payment_method",
                      "saved payment methods are only supported with PAYMENT_PROVIDER_STRIPE");
        return order_fail(ctx->err, ORDER_EINVAL, "invalid payment method");
    }
    char ref[ORDER_REFERENCE_MAX + 1];
    if (!new_reference(ref, sizeof ref))
        return order_fail(ctx->err, ORDER_EINTERNAL, "no randomness for a payment reference");
    store_local_payment p;
    int rc = store_local_payment_create(l->store, ctx, o->id, ref, o->total_minor, o->currency, &p);
    if (rc != ORDER_OK)
        return rc;
    if (p.amount_minor != o->total_minor || strcmp(p.currency, o->currency) != 0) {
        /* An order's total never changes after it is placed: this is a bug somewhere. */
        log_kv(LOG_ERROR, "local payment amount differs from its order", LOG_F_STR, "order_id",
               o->id, LOG_F_STR, "reference", p.reference, LOG_F_END);
        return order_fail(ctx->err, ORDER_EINTERNAL, "the order's payment has another amount");
    }
    memset(out, 0, sizeof *out);
    out->provider = ORDER_PROVIDER_LOCAL;
    snprintf(out->reference, sizeof out->reference, "%s", p.reference);
    return ORDER_OK;
}

static int lp_verify(void *self, order_ctx *ctx, const order_t *o, const char *reference,
                     order_payment_info *info)
{
    struct local *l = self;
    store_local_payment p;
    int rc = store_local_payment_get(l->store, ctx, reference, NULL, &p);
    if (rc == ORDER_ENOTFOUND || (rc == ORDER_OK && strcasecmp(p.order_id, o->id) != 0))
        return pay__refuse(ctx, "PAYMENT_NOT_FOUND", "%s is not a payment of order %s", reference,
                           o->id);
    if (rc != ORDER_OK)
        return rc;
    if (p.amount_minor != o->total_minor || strcmp(p.currency, o->currency) != 0)
        return pay__refuse(ctx, "PAYMENT_AMOUNT_MISMATCH",
                           "payment %s does not match the total of order %s", p.reference, o->id);
    /* At most twice: a lost race re-reads the payment's new status. */
    for (int tries = 0; tries < 2 && p.status == ORDER_PAY_PENDING; tries++) {
        rc = store_local_payment_set_status(l->store, ctx, p.reference, PAY_BIT(ORDER_PAY_PENDING),
                                            ORDER_PAY_SUCCEEDED, &p);
        if (rc == ORDER_EPRECONDITION)
            order_error_reset(ctx->err);
        else if (rc != ORDER_OK)
            return rc;
    }
    if (p.status == ORDER_PAY_SUCCEEDED) {
        memset(info, 0, sizeof *info);
        info->paid_at_us = p.succeeded_at_us;
        snprintf(info->charge_id, sizeof info->charge_id, "%s", p.reference);
        snprintf(info->provider_status, sizeof info->provider_status, "succeeded");
        return ORDER_OK;
    }
    return pay__refuse(ctx, "PAYMENT_NOT_SUCCEEDED", "payment %s is %s", p.reference,
                       status_name(p.status));
}

static int lp_refund(void *self, order_ctx *ctx, const order_t *o,
                     char refund_id[ORDER_REFERENCE_MAX + 1])
{
    struct local *l = self;
    store_local_payment p;
    int rc = store_local_payment_get(l->store, ctx, NULL, o->id, &p);
    if (rc == ORDER_ENOTFOUND)
        return pay__refuse(ctx, "PAYMENT_NOT_FOUND", "order %s has no %s payment", o->id, "LOCAL");
    if (rc != ORDER_OK)
        return rc;
    for (int tries = 0; tries < 2 && p.status == ORDER_PAY_SUCCEEDED; tries++) {
        rc = store_local_payment_set_status(l->store, ctx, p.reference,
                                            PAY_BIT(ORDER_PAY_SUCCEEDED), ORDER_PAY_REFUNDED, &p);
        if (rc == ORDER_EPRECONDITION)
            order_error_reset(ctx->err);
        else if (rc != ORDER_OK)
            return rc;
    }
    if (p.status == ORDER_PAY_REFUNDED) {
        snprintf(refund_id, ORDER_REFERENCE_MAX + 1, "lr_%.*s", ORDER_REFERENCE_MAX - 3,
                 p.reference + (strncmp(p.reference, "lp_", 3) == 0 ? 3 : 0));
        return ORDER_OK;
    }
    return pay__refuse(ctx, "PAYMENT_NOT_SUCCEEDED", "payment %s is %s: nothing to refund",
                       p.reference, status_name(p.status));
}

static int lp_cancel(void *self, order_ctx *ctx, const order_t *o)
{
    struct local *l = self;
    store_local_payment p;
    int rc = store_local_payment_get(l->store, ctx, NULL, o->id, &p);
    if (rc == ORDER_ENOTFOUND) {
        order_error_reset(ctx->err);
        return ORDER_OK; /* no payment was ever created: nothing to void */
    }
    if (rc != ORDER_OK)
        return rc;
    for (int tries = 0; tries < 2 && p.status == ORDER_PAY_PENDING; tries++) {
        rc = store_local_payment_set_status(l->store, ctx, p.reference, PAY_BIT(ORDER_PAY_PENDING),
                                            ORDER_PAY_VOIDED, &p);
        if (rc == ORDER_EPRECONDITION)
            order_error_reset(ctx->err);
        else if (rc != ORDER_OK)
            return rc;
    }
    if (p.status == ORDER_PAY_VOIDED)
        return ORDER_OK;
    return pay__refuse(ctx, "PAYMENT_ALREADY_SUCCEEDED", "payment %s is %s: it cannot be voided",
                       p.reference, status_name(p.status));
}

order_payments *pay_local_create(struct store *store, const char *environment, char *err,
                                 size_t errlen)
{
    assert(store);
    if (environment && strcasecmp(environment, "production") == 0) {
        snprintf(err, errlen,
                 "the LOCAL payment provider is for development and refuses to "
                 "load when environment is production");
        return NULL;
    }
    order_payments *p = calloc(1, sizeof *p);
    struct local *l = calloc(1, sizeof *l);
    if (!p || !l)
        goto fail;
    l->store = store;
    *p = (order_payments){
        .self = l,
        .create = lp_create,
        .verify = lp_verify,
        .refund = lp_refund,
        .cancel = lp_cancel,
    };
    return p;
fail:
    free(l);
    free(p);
    snprintf(err, errlen, "out of memory");
    return NULL;
}

void pay_local_destroy(order_payments *p)
{
    if (!p)
        return;
    free(p->self);
    free(p);
}
