/* local_payments.c — the ledger of the LOCAL (development) payment provider: one row per
 * order in local_payments. payments/local.c decides what the provider does; this file
 * only reads and writes the rows, each change one conditional statement. */
#include "storage/internal.h"

#include <stdio.h>
#include <string.h>

#define LP_SUCCEEDED_US STORE_US("p.succeeded_at")
#define LP_CREATED_US   STORE_US("p.created_at")
#define LP_UPDATED_US   STORE_US("p.updated_at")
/* The 8 columns fill() reads. */
#define LP_COLS                                                                                    \
    "p.reference, p.order_id, p.amount_minor, p.currency, p.status, " LP_SUCCEEDED_US              \
    ", " LP_CREATED_US ", " LP_UPDATED_US

/* The order's existing payment wins: ON CONFLICT covers both the order (one payment per
 * order) and, in theory, a reference collision; the read that follows tells which. */
static const struct store_sql SQL_LP_INSERT = {
    "orderd_lp_insert", "INSERT INTO local_payments (reference, order_id, amount_minor, currency)"
                        " VALUES ($2, $1::uuid, $3::bigint, $4) ON CONFLICT DO NOTHING"};
static const struct store_sql SQL_LP_BY_ORDER = {
    "orderd_lp_by_order", "SELECT " LP_COLS " FROM local_payments p WHERE p.order_id = $1::uuid"};
static const struct store_sql SQL_LP_BY_REF = {
    "orderd_lp_by_ref", "SELECT " LP_COLS " FROM local_payments p WHERE p.reference = $1"};
static const struct store_sql SQL_LP_SET_STATUS = {
    "orderd_lp_set_status",
    "UPDATE local_payments p SET status = $3, updated_at = t.now,"
    " succeeded_at = CASE WHEN $3 = 'succeeded' THEN t.now ELSE p.succeeded_at END"
    " FROM (SELECT clock_timestamp() AS now) t"
    " WHERE p.reference = $1 AND p.status = ANY($2::text[])"};

static void fill(const PGresult *r, store_local_payment *out)
{
    char status[32];
    memset(out, 0, sizeof *out);
    store__str(out->reference, sizeof out->reference, r, 0, 0);
    store__str(out->order_id, sizeof out->order_id, r, 0, 1);
    out->amount_minor = store__int(r, 0, 2);
    store__str(out->currency, sizeof out->currency, r, 0, 3);
    store__str(status, sizeof status, r, 0, 4);
    out->status = order_pay_status_parse(status);
    out->succeeded_at_us = store__int(r, 0, 5);
    out->created_at_us = store__int(r, 0, 6);
    out->updated_at_us = store__int(r, 0, 7);
}

int store_local_payment_create(struct store *s, order_ctx *ctx, const char *order_id,
                               const char *reference, int64_t amount_minor, const char *currency,
                               store_local_payment *out)
{
    store_num amount;
    const char *params[4] = {order_id, reference, store__num(&amount, amount_minor), currency};
    struct store_step steps[2] = {{&SQL_LP_INSERT, 4, params}, {&SQL_LP_BY_ORDER, 1, params}};
    PGresult *r[2];
    int rc = store__tx(s, ctx, "local_payment_create", STORE_TX_BADID_NOTFOUND, steps, 2, r);
    if (rc == ORDER_ENOTFOUND)
        return order_fail(ctx->err, rc, "order %s not found", order_id);
    if (rc != ORDER_OK)
        return rc;
    if (PQntuples(r[1]) != 1) {
        /* Not inserted and not there: the reference belongs to another order. */
        store__clear(r, 2);
        return order_fail(ctx->err, ORDER_EABORTED, "payment reference collision; retry");
    }
    fill(r[1], out);
    store__clear(r, 2);
    return ORDER_OK;
}

int store_local_payment_get(struct store *s, order_ctx *ctx, const char *reference,
                            const char *order_id, store_local_payment *out)
{
    const char *params[1] = {reference ? reference : order_id};
    struct store_step step = {reference ? &SQL_LP_BY_REF : &SQL_LP_BY_ORDER, 1, params};
    PGresult *r;
    int rc = store__tx(s, ctx, "local_payment_get", STORE_TX_BADID_NOTFOUND, &step, 1, &r);
    if (rc == ORDER_ENOTFOUND)
        return order_fail(ctx->err, rc, "no such payment");
    if (rc != ORDER_OK)
        return rc;
    if (PQntuples(r) != 1) {
        store__clear(&r, 1);
        return order_fail(ctx->err, ORDER_ENOTFOUND, "no such payment");
    }
    fill(r, out);
    store__clear(&r, 1);
    return ORDER_OK;
}

int store_local_payment_set_status(struct store *s, order_ctx *ctx, const char *reference,
                                   unsigned from_set, order_pay_status to, store_local_payment *out)
{
    const char *to_name = order_pay_status_name(to);
    if (!to_name || !from_set)
        return order_fail(ctx->err, ORDER_EINTERNAL, "bad payment status change");
    store_buf from = {0};
    store__buf_raw(&from, "{");
    bool first = true;
    for (int st = ORDER_PAY_PENDING; st <= ORDER_PAY_FAILED; st++) {
        if (!(from_set & (1u << st)))
            continue;
        if (!first)
            store__buf_raw(&from, ",");
        store__buf_text_elem(&from, order_pay_status_name((order_pay_status)st));
        first = false;
    }
    store__buf_raw(&from, "}");
    if (from.oom) {
        store__buf_free(&from);
        return order_fail(ctx->err, ORDER_EINTERNAL, "out of memory");
    }
    const char *params[3] = {reference, from.p, to_name};
    struct store_step steps[2] = {{&SQL_LP_SET_STATUS, 3, params}, {&SQL_LP_BY_REF, 1, params}};
    PGresult *r[2];
    int rc = store__tx(s, ctx, "local_payment_set_status", 0, steps, 2, r);
    store__buf_free(&from);
    if (rc != ORDER_OK)
        return rc;
    if (PQntuples(r[1]) != 1) {
        store__clear(r, 2);
        return order_fail(ctx->err, ORDER_ENOTFOUND, "no such payment");
    }
    bool changed = strcmp(PQcmdTuples(r[0]), "1") == 0;
    fill(r[1], out);
    store__clear(r, 2);
    if (!changed)
        return order_fail(ctx->err, ORDER_EPRECONDITION, "payment %s is %s", out->reference,
                          order_pay_status_name(out->status));
    return ORDER_OK;
}
