/* values.c — the domain's small value types: errors, status names, the state machine,
 * orders' ownership of their items, callers and the request context. */
#include "orders/orders.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- errors ---- */

int order_fail(order_error *e, int code, const char *fmt, ...)
{
    e->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return code;
}

void order_violate(order_error *e, const char *field, const char *fmt, ...)
{
    e->code = ORDER_EINVAL;
    if (e->nviolations >= ORDER_MAX_VIOLATIONS) {
        e->violations_truncated = true;
        return;
    }
    order_violation *v = &e->violations[e->nviolations++];
    snprintf(v->field, sizeof v->field, "%s", field);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(v->description, sizeof v->description, fmt, ap);
    va_end(ap);
}

void order_error_meta(order_error *e, const char *key, const char *fmt, ...)
{
    size_t i = 0;
    while (i < e->nmeta && strcmp(e->meta_key[i], key) != 0)
        i++;
    if (i == e->nmeta) {
        if (e->nmeta >= ORDER_ERROR_META_MAX)
            return;
        e->nmeta++;
        snprintf(e->meta_key[i], sizeof e->meta_key[i], "%s", key);
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->meta_value[i], sizeof e->meta_value[i], fmt, ap);
    va_end(ap);
}

void order_error_reset(order_error *e)
{
    e->nmeta = 0;
    e->code = ORDER_OK;
    e->message[0] = '\0';
    e->reason[0] = '\0';
    e->current_status = 0;
    e->precondition_type[0] = '\0';
    e->precondition_subject[0] = '\0';
    e->nviolations = 0;
    e->violations_truncated = false;
}

const char *order_code_name(int code)
{
    switch (code) {
    case ORDER_OK:
        return "OK";
    case ORDER_EINVAL:
        return "INVALID_ARGUMENT";
    case ORDER_ENOTFOUND:
        return "NOT_FOUND";
    case ORDER_EPERM:
        return "PERMISSION_DENIED";
    case ORDER_EPRECONDITION:
        return "FAILED_PRECONDITION";
    case ORDER_EIDEMPOTENCY:
        return "IDEMPOTENCY_KEY_REUSED";
    case ORDER_EUNAVAILABLE:
        return "UNAVAILABLE";
    case ORDER_EDEADLINE:
        return "DEADLINE_EXCEEDED";
    case ORDER_EABORTED:
        return "ABORTED";
    case ORDER_EDUPLICATE:
        return "ALREADY_APPLIED";
    default:
        return "INTERNAL";
    }
}

/* ---- names ---- */

static const char *const status_names[] = {
    [ORDER_STATUS_PENDING] = "pending",     [ORDER_STATUS_PAID] = "paid",
    [ORDER_STATUS_SHIPPED] = "shipped",     [ORDER_STATUS_DELIVERED] = "delivered",
    [ORDER_STATUS_CANCELLED] = "cancelled", [ORDER_STATUS_EXPIRED] = "expired",
    [ORDER_STATUS_FAILED] = "failed",
};
static const char *const provider_names[] = {
    [ORDER_PROVIDER_LOCAL] = "local",
    [ORDER_PROVIDER_STRIPE] = "stripe",
    [ORDER_PROVIDER_PAYPAL] = "paypal",
};
static const char *const pay_status_names[] = {
    [ORDER_PAY_PENDING] = "pending",   [ORDER_PAY_SUCCEEDED] = "succeeded",
    [ORDER_PAY_REFUNDED] = "refunded", [ORDER_PAY_VOIDED] = "voided",
    [ORDER_PAY_FAILED] = "failed",
};

#define NAME_AT(tab, i)                                                                            \
    (((int)(i) > 0 && (size_t)(i) < sizeof(tab) / sizeof(tab[0])) ? tab[(int)(i)] : NULL)

const char *order_status_name(order_status s)
{
    return NAME_AT(status_names, s);
}
const char *order_provider_name(order_provider p)
{
    return NAME_AT(provider_names, p);
}
const char *order_pay_status_name(order_pay_status s)
{
    return NAME_AT(pay_status_names, s);
}

static int parse_in(const char *const *tab, size_t n, const char *name)
{
    if (!name)
        return 0;
    for (size_t i = 1; i < n; i++)
        if (tab[i] && strcmp(tab[i], name) == 0)
            return (int)i;
    return 0;
}

const char *order_status_enum_name(int s)
{
    static const char *const names[] = {
        "ORDER_STATUS_UNSPECIFIED", "ORDER_STATUS_PENDING",   "ORDER_STATUS_PAID",
        "ORDER_STATUS_SHIPPED",     "ORDER_STATUS_DELIVERED", "ORDER_STATUS_CANCELLED",
        "ORDER_STATUS_EXPIRED",     "ORDER_STATUS_FAILED",
    };
    return (s >= 0 && s <= ORDER_STATUS_MAX) ? names[s] : names[0];
}

order_status order_status_parse(const char *name)
{
    return (order_status)parse_in(status_names, sizeof status_names / sizeof *status_names, name);
}
order_provider order_provider_parse(const char *name)
{
    return (order_provider)parse_in(provider_names, sizeof provider_names / sizeof *provider_names,
                                    name);
}
order_pay_status order_pay_status_parse(const char *name)
{
    return (order_pay_status)parse_in(pay_status_names,
                                      sizeof pay_status_names / sizeof *pay_status_names, name);
}

/* ---- the state machine (ARCHITECTURE.md, Statuses) ---- */

bool order_status_can_move(order_status from, order_status to)
{
    switch (from) {
    case ORDER_STATUS_PENDING:
        return to == ORDER_STATUS_PAID || to == ORDER_STATUS_CANCELLED ||
               to == ORDER_STATUS_EXPIRED || to == ORDER_STATUS_FAILED;
    case ORDER_STATUS_PAID:
        return to == ORDER_STATUS_SHIPPED || to == ORDER_STATUS_CANCELLED;
    case ORDER_STATUS_SHIPPED:
        return to == ORDER_STATUS_DELIVERED;
    default:
        return false; /* DELIVERED, CANCELLED, EXPIRED, FAILED are final */
    }
}

/* ---- callers and context ---- */

bool order_caller_is_privileged(const order_caller *c)
{
    return (c->roles & (ORDER_ROLE_SERVICE | ORDER_ROLE_ADMIN)) != 0;
}

int64_t order_ctx_remaining_us(const order_ctx *ctx)
{
    if (ctx->deadline_mono_us == INT64_MAX)
        return INT64_MAX;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t now = (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
    return ctx->deadline_mono_us - now;
}

/* ---- orders own their items ---- */

void order_clear(order_t *o)
{
    free(o->items);
    memset(o, 0, sizeof *o);
}

int order_copy(order_t *dst, const order_t *src)
{
    *dst = *src;
    dst->items = NULL;
    if (src->nitems) {
        dst->items = malloc(src->nitems * sizeof *src->items);
        if (!dst->items) {
            dst->nitems = 0;
            return ORDER_EINTERNAL;
        }
        memcpy(dst->items, src->items, src->nitems * sizeof *src->items);
    }
    return ORDER_OK;
}

void order_list_free(order_t *orders, size_t n)
{
    if (!orders)
        return;
    for (size_t i = 0; i < n; i++)
        free(orders[i].items);
    free(orders);
}

bool order_id_valid(const char *s)
{
    static const int dash_at[] = {8, 13, 18, 23};
    if (!s || strlen(s) != ORDER_ID_LEN)
        return false;
    for (int i = 0, d = 0; i < ORDER_ID_LEN; i++) {
        if (d < 4 && i == dash_at[d]) {
            if (s[i] != '-')
                return false;
            d++;
            continue;
        }
        char c = s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')))
            return false;
    }
    return true;
}
