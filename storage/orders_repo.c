/* orders_repo.c — the order_store port (orders.h) on PostgreSQL: products, orders with
 * their items, idempotency keys and the status history.
 *
 * DESIGN
 * Each port call is one transaction of one round trip (store__tx), plus a second one only
 * on a rare path (a replayed idempotency key) or where the first one's answer is needed
 * to ask (a list page's items).
 * - order_insert is a single statement of data-modifying CTEs: it claims the idempotency
 *   key with INSERT ... ON CONFLICT DO NOTHING and inserts the order, its items and its
 *   first history row only if the key was new. A concurrent insert of the same key waits
 *   on the key's unique index until the first transaction ends, then conflicts: racing
 *   duplicates can never make two orders.
 * - order_transition is one conditional UPDATE joined with the row locked FOR UPDATE, so
 *   the history row gets the exact status it moved from even under concurrent changes;
 *   the same pipeline then reads the order back, which also explains a refusal.
 * Money and counts travel as decimal text and are parsed as int64: no floating point.
 */
#include "storage/internal.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

/* The 20 columns fill_order reads, in its order. */
#define PAID_US     STORE_US("o.paid_at")
#define CREATED_US  STORE_US("o.created_at")
#define UPDATED_US  STORE_US("o.updated_at")
#define REFUNDED_US STORE_US("o.refunded_at")
#define RESERVED_US STORE_US("o.stock_reserved_at")
#define ORDER_COLS                                                                                 \
    "o.id, o.customer_id, o.status, o.currency, o.subtotal_minor, o.tax_minor, o.total_minor, "    \
    "o.payment_provider, o.payment_reference, o.payment_status, " PAID_US                          \
    ", o.cancel_reason, " CREATED_US ", " UPDATED_US ", o.version, o.payment_charge_id, "          \
    "o.receipt_url, o.refund_id, " REFUNDED_US ", " RESERVED_US
/* The 5 columns fill_item reads. */
#define ITEM_COLS "i.product_id, i.name, i.quantity, i.unit_price_minor, i.line_total_minor"

static const struct store_sql SQL_PRODUCTS_GET = {
    "orderd_products_get",
    "SELECT id, name, unit_price_minor, currency, active FROM products WHERE id = ANY($1::text[])"};

static const struct store_sql SQL_PRODUCT_UPSERT = {
    "orderd_product_upsert",
    "INSERT INTO products (id, name, unit_price_minor, currency, active)"
    " VALUES ($1, $2, $3::bigint, $4, $5::boolean)"
    " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name,"
    "  unit_price_minor = EXCLUDED.unit_price_minor, currency = EXCLUDED.currency,"
    "  active = EXCLUDED.active, updated_at = clock_timestamp()"
    " RETURNING id, name, unit_price_minor, currency, active"};

/* $1 caller, $2 request_id, $3 fingerprint text, $4 customer, $5 currency, $6 subtotal,
 * $7 tax, $8 total, $9 provider, $10 reference, $11 payment status, $12..$16 the items as
 * parallel arrays. One row (id, created, updated, version) if the key was new, none if
 * it existed. The key's clock_timestamp() is the order's creation time. */
static const struct store_sql SQL_ORDER_INSERT = {
    "orderd_order_insert",
    "WITH k AS ("
    "  INSERT INTO idempotency_keys (caller, request_id, fingerprint, order_id)"
    "  VALUES ($1, $2, sha256(convert_to($3, 'UTF8')), gen_random_uuid())"
    "  ON CONFLICT (caller, request_id) DO NOTHING"
    "  RETURNING order_id, created_at),"
    " o AS ("
    "  INSERT INTO orders (id, customer_id, status, currency, subtotal_minor, tax_minor,"
    "   total_minor, payment_provider, payment_reference, payment_status, created_at,"
    "   updated_at, version)"
    "  SELECT k.order_id, $4, 'pending', $5, $6::bigint, $7::bigint, $8::bigint, $9, $10, $11,"
    "   k.created_at, k.created_at, 1 FROM k"
    "  RETURNING id, created_at, updated_at, version),"
    " i AS ("
    "  INSERT INTO order_items (order_id, line_no, product_id, name, quantity,"
    "   unit_price_minor, line_total_minor)"
    "  SELECT o.id, u.line_no, u.product_id, u.name, u.quantity, u.unit_price, u.line_total"
    "  FROM o, unnest($12::text[], $13::text[], $14::int[], $15::bigint[], $16::bigint[])"
    "   WITH ORDINALITY AS u(product_id, name, quantity, unit_price, line_total, line_no)),"
    " h AS ("
    "  INSERT INTO order_history (order_id, from_status, to_status, actor, reason, at)"
    "  SELECT o.id, NULL, 'pending', $1, 'placed', o.created_at FROM o)"
    " SELECT o.id, " STORE_US("o.created_at") ", " STORE_US("o.updated_at") ", o.version FROM o"};

/* The stored order of an existing key: (same fingerprint?, order columns...). */
static const struct store_sql SQL_ORDER_BY_KEY = {
    "orderd_order_by_key", "SELECT k.fingerprint = sha256(convert_to($3, 'UTF8')), " ORDER_COLS
                           " FROM idempotency_keys k JOIN orders o ON o.id = k.order_id"
                           " WHERE k.caller = $1 AND k.request_id = $2"};
static const struct store_sql SQL_ITEMS_BY_KEY = {
    "orderd_items_by_key",
    "SELECT " ITEM_COLS " FROM idempotency_keys k JOIN order_items i ON i.order_id = k.order_id"
    " WHERE k.caller = $1 AND k.request_id = $2 ORDER BY i.line_no"};

static const struct store_sql SQL_ORDER_GET = {
    "orderd_order_get", "SELECT " ORDER_COLS " FROM orders o WHERE o.id = $1::uuid"};
static const struct store_sql SQL_ITEMS_GET = {
    "orderd_items_get",
    "SELECT " ITEM_COLS " FROM order_items i WHERE i.order_id = $1::uuid ORDER BY i.line_no"};

/* Inbound-event dedupe tables, by order_inbound_kind (0 = none). */
static const char *const inbound_tables[3] = {NULL, "processed_provider_events",
                                              "processed_inventory_replies"};

/* Transition: $1 id, $2 allowed statuses, $3 new status, $4 expected version (-1 any),
 * $5 reason, $6 payment status (NULL keeps), $7 paid_at µs (NULL keeps), $8 actor,
 * $9 charge id (NULL keeps), $10 receipt url (NULL keeps), $11 payment reference (set only
 * if the order has none) [, $12 inbound event id].
 * The subquery locks the row first, so `cur.status` is the status the UPDATE replaces
 * even when another transaction changed it meanwhile (READ COMMITTED re-reads it).
 * With an inbound event, the event must not be recorded yet and is recorded only if the
 * order moved (its row's insert reads upd). One row: (moved, event seen before). */
static struct store_sql transition_sql[3];
static char transition_texts[3][2048];
static char transition_names[3][40];

/* Amendment: $1 id, $2 provider, $3 reference, $4 payment status, $5 paid_at µs,
 * $6 charge id, $7 receipt url, $8 refund id, $9 refunded_at µs, $10 stock_reserved_at µs
 * (NULL keeps each), $11 allowed payment statuses ('none' = no payment; NULL = any)
 * [, $12 inbound event id]. One row: (changed, event seen before). */
static struct store_sql amend_sql[3];
static char amend_texts[3][2048];
static char amend_names[3][40];
static pthread_once_t change_once = PTHREAD_ONCE_INIT;

static void change_sql_init(void)
{
    for (int k = 0; k < 3; k++) {
        const char *t = inbound_tables[k];
        char guard[160] = "", record[200] = "", seen[160] = "false";
        /* transition */
        if (t) {
            snprintf(guard, sizeof guard, " AND NOT EXISTS (SELECT 1 FROM %s WHERE id = $12)", t);
            snprintf(record, sizeof record,
                     ", d AS (INSERT INTO %s (id) SELECT $12 FROM upd ON CONFLICT DO NOTHING)", t);
            snprintf(seen, sizeof seen, "EXISTS (SELECT 1 FROM %s WHERE id = $12)", t);
        }
        snprintf(
            transition_texts[k], sizeof transition_texts[k],
            "WITH upd AS ("
            "  UPDATE orders o SET status = $3, version = o.version + 1,"
            "   updated_at = clock_timestamp(),"
            "   cancel_reason = CASE WHEN $3 IN ('cancelled', 'expired', 'failed')"
            "    THEN coalesce($5, o.cancel_reason) ELSE o.cancel_reason END,"
            "   payment_status = coalesce($6, o.payment_status),"
            "   paid_at = coalesce(" STORE_TS(
                "$7") ", o.paid_at),"
                      "   payment_charge_id = coalesce($9, o.payment_charge_id),"
                      "   receipt_url = coalesce($10, o.receipt_url),"
                      "   payment_reference = coalesce(o.payment_reference, $11)"
                      "  FROM (SELECT id, status FROM orders WHERE id = $1::uuid FOR UPDATE) cur"
                      "  WHERE o.id = cur.id AND cur.status = ANY($2::text[])"
                      "   AND ($4::bigint < 0 OR o.version = $4::bigint)%s"
                      "  RETURNING cur.status AS from_status, o.id, o.status AS to_status, "
                      "o.updated_at),"
                      " h AS ("
                      "  INSERT INTO order_history (order_id, from_status, to_status, actor, "
                      "reason, at)"
                      "  SELECT id, from_status, to_status, $8, coalesce($5, ''), updated_at FROM "
                      "upd)%s"
                      " SELECT EXISTS (SELECT 1 FROM upd), %s",
            guard, record, seen);
        snprintf(transition_names[k], sizeof transition_names[k], "orderd_order_transition_%d", k);
        transition_sql[k] = (struct store_sql){transition_names[k], transition_texts[k]};

        /* amendment */
        guard[0] = record[0] = '\0';
        snprintf(seen, sizeof seen, "false");
        if (t) {
            snprintf(guard, sizeof guard, " AND NOT EXISTS (SELECT 1 FROM %s WHERE id = $12)", t);
            snprintf(record, sizeof record,
                     ", d AS (INSERT INTO %s (id) SELECT $12 FROM upd ON CONFLICT DO NOTHING)", t);
            snprintf(seen, sizeof seen, "EXISTS (SELECT 1 FROM %s WHERE id = $12)", t);
        }
        snprintf(amend_texts[k], sizeof amend_texts[k],
                 "WITH upd AS ("
                 "  UPDATE orders o SET version = o.version + 1, updated_at = clock_timestamp(),"
                 "   payment_provider = coalesce($2, o.payment_provider),"
                 "   payment_reference = coalesce($3, o.payment_reference),"
                 "   payment_status = coalesce($4, o.payment_status),"
                 "   paid_at = coalesce(" STORE_TS(
                     "$5") ", o.paid_at),"
                           "   payment_charge_id = coalesce($6, o.payment_charge_id),"
                           "   receipt_url = coalesce($7, o.receipt_url),"
                           "   refund_id = coalesce($8, o.refund_id),"
                           "   refunded_at = coalesce(" STORE_TS(
                               "$9") ", o.refunded_at),"
                                     "   stock_reserved_at = coalesce(" STORE_TS(
                                         "$10") ", o.stock_reserved_at)"
                                                "  WHERE o.id = $1::uuid"
                                                "   AND ($11::text[] IS NULL OR "
                                                "coalesce(o.payment_status, 'none') = "
                                                "ANY($11::text[]))%s"
                                                "  RETURNING o.id)%s"
                                                " SELECT EXISTS (SELECT 1 FROM upd), %s",
                 guard, record, seen);
        snprintf(amend_names[k], sizeof amend_names[k], "orderd_order_amend_%d", k);
        amend_sql[k] = (struct store_sql){amend_names[k], amend_texts[k]};
    }
}

/* Locks an order's row for the rest of the transaction (see transition_once). */
static const struct store_sql SQL_ORDER_LOCK = {
    "orderd_order_lock", "SELECT 1 FROM orders WHERE id = $1::uuid FOR UPDATE"};

static const struct store_sql SQL_SEEN_PROVIDER = {
    "orderd_seen_provider",
    "SELECT EXISTS (SELECT 1 FROM processed_provider_events WHERE id = $1)"};
static const struct store_sql SQL_SEEN_INVENTORY = {
    "orderd_seen_inventory",
    "SELECT EXISTS (SELECT 1 FROM processed_inventory_replies WHERE id = $1)"};

/* The order whose payment reference or charge id is $2, with provider $1. */
static const struct store_sql SQL_ORDER_BY_PAYMENT = {
    "orderd_order_by_payment", "SELECT " ORDER_COLS " FROM orders o WHERE o.payment_provider = $1"
                               " AND (o.payment_reference = $2 OR o.payment_charge_id = $2)"
                               " ORDER BY o.created_at LIMIT 1"};
static const struct store_sql SQL_ITEMS_BY_PAYMENT = {
    "orderd_items_by_payment", "SELECT " ITEM_COLS " FROM order_items i WHERE i.order_id = ("
                               " SELECT o.id FROM orders o WHERE o.payment_provider = $1"
                               " AND (o.payment_reference = $2 OR o.payment_charge_id = $2)"
                               " ORDER BY o.created_at LIMIT 1) ORDER BY i.line_no"};

/* Expiry: $1 created before (µs), $2 limit, $3 reason, $4 actor. The claimed rows are
 * locked FOR UPDATE SKIP LOCKED: a replica sweeping at the same time takes others. */
static const struct store_sql SQL_EXPIRE_DUE = {
    "orderd_orders_expire_due",
    "WITH c AS ("
    "  SELECT id FROM orders WHERE status = 'pending' AND created_at < " STORE_TS(
        "$1") "  ORDER BY created_at LIMIT $2::int FOR UPDATE SKIP LOCKED),"
              " upd AS ("
              "  UPDATE orders o SET status = 'expired', version = o.version + 1,"
              "   updated_at = clock_timestamp(), cancel_reason = $3"
              "  FROM c WHERE o.id = c.id AND o.status = 'pending' RETURNING o.*),"
              " h AS ("
              "  INSERT INTO order_history (order_id, from_status, to_status, actor, reason, at)"
              "  SELECT id, 'pending', 'expired', $4, $3, updated_at FROM upd)"
              " SELECT " ORDER_COLS " FROM upd o ORDER BY o.created_at, o.id"};

/* Orders owed a settlement: $1 changed before (µs), $2 limit. */
static const struct store_sql SQL_UNSETTLED = {
    "orderd_orders_unsettled",
    "SELECT " ORDER_COLS " FROM orders o"
    " WHERE o.status IN ('cancelled', 'expired', 'failed')"
    "  AND o.payment_status IN ('pending', 'succeeded') AND o.updated_at < " STORE_TS(
        "$1") " ORDER BY o.updated_at LIMIT $2::int FOR UPDATE SKIP LOCKED"};

/* Items of a page of orders: $1 the ids in page order; u.ord is the 1-based index. */
static const struct store_sql SQL_ITEMS_FOR_LIST = {
    "orderd_items_for_list",
    "SELECT u.ord, " ITEM_COLS " FROM unnest($1::uuid[]) WITH ORDINALITY AS u(id, ord)"
    " JOIN order_items i ON i.order_id = u.id ORDER BY u.ord, i.line_no"};

/* ---- reading rows ---- */

static int fill_order(order_ctx *ctx, const PGresult *r, int row, int col0, order_t *o)
{
    char name[32];
    store__str(o->id, sizeof o->id, r, row, col0 + 0);
    store__str(o->customer_id, sizeof o->customer_id, r, row, col0 + 1);
    store__str(name, sizeof name, r, row, col0 + 2);
    o->status = order_status_parse(name);
    store__str(o->currency, sizeof o->currency, r, row, col0 + 3);
    o->subtotal_minor = store__int(r, row, col0 + 4);
    o->tax_minor = store__int(r, row, col0 + 5);
    o->total_minor = store__int(r, row, col0 + 6);
    store__str(name, sizeof name, r, row, col0 + 7);
    o->pay_provider = order_provider_parse(name);
    store__str(o->pay_reference, sizeof o->pay_reference, r, row, col0 + 8);
    store__str(name, sizeof name, r, row, col0 + 9);
    o->pay_status = order_pay_status_parse(name);
    o->paid_at_us = store__int(r, row, col0 + 10);
    store__str(o->cancel_reason, sizeof o->cancel_reason, r, row, col0 + 11);
    o->created_at_us = store__int(r, row, col0 + 12);
    o->updated_at_us = store__int(r, row, col0 + 13);
    o->version = store__int(r, row, col0 + 14);
    store__str(o->pay_charge_id, sizeof o->pay_charge_id, r, row, col0 + 15);
    store__str(o->pay_receipt_url, sizeof o->pay_receipt_url, r, row, col0 + 16);
    store__str(o->refund_id, sizeof o->refund_id, r, row, col0 + 17);
    o->refunded_at_us = store__int(r, row, col0 + 18);
    o->stock_reserved_at_us = store__int(r, row, col0 + 19);
    if (o->status == ORDER_STATUS_UNSPECIFIED) {
        log_kv(LOG_ERROR, "order with an unknown status in the database", LOG_F_STR, "order_id",
               o->id, LOG_F_END);
        return order_fail(ctx->err, ORDER_EINTERNAL, "order %s has an unknown status", o->id);
    }
    return ORDER_OK;
}

static void fill_item(const PGresult *r, int row, int col0, order_item *it)
{
    store__str(it->product_id, sizeof it->product_id, r, row, col0 + 0);
    store__str(it->name, sizeof it->name, r, row, col0 + 1);
    it->quantity = (int32_t)store__int(r, row, col0 + 2);
    it->unit_price_minor = store__int(r, row, col0 + 3);
    it->line_total_minor = store__int(r, row, col0 + 4);
}

/* Reads one order from `hdr` (row 0, columns from col0) and all rows of `items`. */
static int read_order(order_ctx *ctx, const PGresult *hdr, int col0, const PGresult *items,
                      order_t *o)
{
    int rc = fill_order(ctx, hdr, 0, col0, o);
    if (rc != ORDER_OK)
        return rc;
    int n = PQntuples(items);
    o->nitems = 0;
    o->items = NULL;
    if (n > 0) {
        o->items = calloc((size_t)n, sizeof *o->items);
        if (!o->items)
            return order_fail(ctx->err, ORDER_EINTERNAL, "out of memory");
        for (int i = 0; i < n; i++)
            fill_item(items, i, 0, &o->items[i]);
        o->nitems = (size_t)n;
    }
    return ORDER_OK;
}

/* {"a","b"} of the names of the statuses in `set`. */
static void status_array(store_buf *b, unsigned set)
{
    store__buf_raw(b, "{");
    bool first = true;
    for (int st = 1; st <= ORDER_STATUS_MAX; st++) {
        if (!(set & ORDER_STATUS_BIT(st)))
            continue;
        if (!first)
            store__buf_raw(b, ",");
        store__buf_text_elem(b, order_status_name((order_status)st));
        first = false;
    }
    store__buf_raw(b, "}");
}

/* "pending or paid", for messages. */
static void status_words(char *dst, size_t cap, unsigned set)
{
    size_t len = 0;
    dst[0] = '\0';
    for (int st = 1; st <= ORDER_STATUS_MAX && len < cap; st++) {
        if (!(set & ORDER_STATUS_BIT(st)))
            continue;
        len += (size_t)snprintf(dst + len, cap - len, "%s%s", len ? " or " : "",
                                order_status_name((order_status)st));
    }
}

/* ---- products ---- */

static int repo_products_get(void *self, order_ctx *ctx, const char *const *ids, size_t n,
                             order_product *out, bool *found)
{
    struct store *s = self;
    for (size_t i = 0; i < n; i++)
        found[i] = false;
    if (n == 0)
        return ORDER_OK;
    store_buf arr = {0};
    store__buf_raw(&arr, "{");
    for (size_t i = 0; i < n; i++) {
        if (i)
            store__buf_raw(&arr, ",");
        store__buf_text_elem(&arr, ids[i]);
    }
    store__buf_raw(&arr, "}");
    if (arr.oom) {
        store__buf_free(&arr);
        return order_fail(ctx->err, ORDER_EINTERNAL, "out of memory");
    }
    const char *params[1] = {arr.p};
    struct store_step step = {&SQL_PRODUCTS_GET, 1, params};
    PGresult *r;
    int rc = store__tx(s, ctx, "products_get", 0, &step, 1, &r);
    store__buf_free(&arr);
    if (rc != ORDER_OK)
        return rc;
    for (int row = 0; row < PQntuples(r); row++) {
        const char *id = PQgetvalue(r, row, 0);
        for (size_t i = 0; i < n; i++) {
            if (found[i] || strcmp(ids[i], id) != 0)
                continue;
            order_product *p = &out[i];
            store__str(p->id, sizeof p->id, r, row, 0);
            store__str(p->name, sizeof p->name, r, row, 1);
            p->unit_price_minor = store__int(r, row, 2);
            store__str(p->currency, sizeof p->currency, r, row, 3);
            p->active = strcmp(PQgetvalue(r, row, 4), "t") == 0;
            found[i] = true;
        }
    }
    store__clear(&r, 1);
    return ORDER_OK;
}

static int repo_product_upsert(void *self, order_ctx *ctx, const order_product *p,
                               order_product *out)
{
    struct store *s = self;
    store_num price;
    const char *params[5] = {p->id, p->name, store__num(&price, p->unit_price_minor), p->currency,
                             p->active ? "true" : "false"};
    struct store_step step = {&SQL_PRODUCT_UPSERT, 5, params};
    PGresult *r;
    int rc = store__tx(s, ctx, "product_upsert", 0, &step, 1, &r);
    if (rc != ORDER_OK)
        return rc;
    if (PQntuples(r) != 1) {
        store__clear(&r, 1);
        return order_fail(ctx->err, ORDER_EINTERNAL, "product upsert returned no row");
    }
    memset(out, 0, sizeof *out);
    store__str(out->id, sizeof out->id, r, 0, 0);
    store__str(out->name, sizeof out->name, r, 0, 1);
    out->unit_price_minor = store__int(r, 0, 2);
    store__str(out->currency, sizeof out->currency, r, 0, 3);
    out->active = strcmp(PQgetvalue(r, 0, 4), "t") == 0;
    store__clear(&r, 1);
    return ORDER_OK;
}

/* ---- orders ---- */

/* The items of *o as five parallel array literals. */
struct item_arrays {
    store_buf pid, name, qty, price, total;
};

static bool item_arrays_build(struct item_arrays *a, const order_t *o)
{
    store_buf *all[5] = {&a->pid, &a->name, &a->qty, &a->price, &a->total};
    for (int k = 0; k < 5; k++)
        store__buf_raw(all[k], "{");
    for (size_t i = 0; i < o->nitems; i++) {
        const order_item *it = &o->items[i];
        store_num q, p, t;
        if (i)
            for (int k = 0; k < 5; k++)
                store__buf_raw(all[k], ",");
        store__buf_text_elem(&a->pid, it->product_id);
        store__buf_text_elem(&a->name, it->name);
        store__buf_raw(&a->qty, store__num(&q, it->quantity));
        store__buf_raw(&a->price, store__num(&p, it->unit_price_minor));
        store__buf_raw(&a->total, store__num(&t, it->line_total_minor));
    }
    bool ok = true;
    for (int k = 0; k < 5; k++) {
        store__buf_raw(all[k], "}");
        ok = ok && !all[k]->oom;
    }
    return ok;
}

static void item_arrays_free(struct item_arrays *a)
{
    store__buf_free(&a->pid);
    store__buf_free(&a->name);
    store__buf_free(&a->qty);
    store__buf_free(&a->price);
    store__buf_free(&a->total);
}

/* The key exists: same request -> the stored order, replayed; another -> EIDEMPOTENCY. */
static int load_replay(struct store *s, order_ctx *ctx, const char *request_id,
                       const char *fingerprint, order_t *o, bool *replayed)
{
    const char *params[3] = {ctx->caller.subject, request_id, fingerprint};
    struct store_step steps[2] = {{&SQL_ORDER_BY_KEY, 3, params}, {&SQL_ITEMS_BY_KEY, 2, params}};
    PGresult *r[2];
    int rc = store__tx(s, ctx, "order_insert_replay", 0, steps, 2, r);
    if (rc != ORDER_OK)
        return rc;
    if (PQntuples(r[0]) != 1) {
        /* The key vanished between the two transactions (a purge): let the caller retry. */
        store__clear(r, 2);
        return order_fail(ctx->err, ORDER_EABORTED, "the idempotency key changed meanwhile; retry");
    }
    if (strcmp(PQgetvalue(r[0], 0, 0), "t") != 0) {
        store__clear(r, 2);
        snprintf(ctx->err->reason, sizeof ctx->err->reason, "IDEMPOTENCY_KEY_REUSED");
        return order_fail(ctx->err, ORDER_EIDEMPOTENCY,
                          "request_id %s was already used for a different request", request_id);
    }
    order_clear(o);
    rc = read_order(ctx, r[0], 1, r[1], o);
    store__clear(r, 2);
    if (rc != ORDER_OK) {
        order_clear(o);
        return rc;
    }
    *replayed = true;
    return ORDER_OK;
}

static int repo_order_insert(void *self, order_ctx *ctx, const char *request_id,
                             const char *fingerprint, order_t *o, bool *replayed)
{
    struct store *s = self;
    *replayed = false;
    struct item_arrays a = {0};
    if (!item_arrays_build(&a, o)) {
        item_arrays_free(&a);
        return order_fail(ctx->err, ORDER_EINTERNAL, "out of memory");
    }
    store_num sub, tax, tot;
    const char *params[16] = {
        ctx->caller.subject,
        request_id,
        fingerprint,
        o->customer_id,
        o->currency,
        store__num(&sub, o->subtotal_minor),
        store__num(&tax, o->tax_minor),
        store__num(&tot, o->total_minor),
        order_provider_name(o->pay_provider), /* NULL (no provider yet) stays NULL */
        o->pay_reference[0] ? o->pay_reference : NULL,
        order_pay_status_name(o->pay_status),
        a.pid.p,
        a.name.p,
        a.qty.p,
        a.price.p,
        a.total.p,
    };
    struct store_step step = {&SQL_ORDER_INSERT, 16, params};
    PGresult *r;
    int rc = store__tx(s, ctx, "order_insert", 0, &step, 1, &r);
    item_arrays_free(&a);
    if (rc != ORDER_OK)
        return rc;
    if (PQntuples(r) == 0) {
        store__clear(&r, 1);
        return load_replay(s, ctx, request_id, fingerprint, o, replayed);
    }
    store__str(o->id, sizeof o->id, r, 0, 0);
    o->created_at_us = store__int(r, 0, 1);
    o->updated_at_us = store__int(r, 0, 2);
    o->version = store__int(r, 0, 3);
    o->status = ORDER_STATUS_PENDING;
    store__clear(&r, 1);
    return ORDER_OK;
}

static int repo_order_get(void *self, order_ctx *ctx, const char *order_id, order_t *out)
{
    struct store *s = self;
    const char *params[1] = {order_id};
    struct store_step steps[2] = {{&SQL_ORDER_GET, 1, params}, {&SQL_ITEMS_GET, 1, params}};
    PGresult *r[2];
    int rc = store__tx(s, ctx, "order_get", STORE_TX_BADID_NOTFOUND, steps, 2, r);
    if (rc == ORDER_ENOTFOUND)
        return order_fail(ctx->err, rc, "order %s not found", order_id);
    if (rc != ORDER_OK)
        return rc;
    if (PQntuples(r[0]) != 1) {
        store__clear(r, 2);
        return order_fail(ctx->err, ORDER_ENOTFOUND, "order %s not found", order_id);
    }
    rc = read_order(ctx, r[0], 0, r[1], out);
    store__clear(r, 2);
    if (rc != ORDER_OK)
        order_clear(out);
    return rc;
}

/* ---- list ---- */

/* The WHERE clause varies with the query's filters: 8 variants of fixed text, each
 * prepared under its own name. Bits: customer, statuses, cursor. */
enum { LIST_CUSTOMER = 1, LIST_STATUS = 2, LIST_CURSOR = 4, LIST_VARIANTS = 8 };
static struct store_sql list_sql[LIST_VARIANTS];
static char list_names[LIST_VARIANTS][32];
static char list_texts[LIST_VARIANTS][1024];
static pthread_once_t list_once = PTHREAD_ONCE_INIT;

static void list_sql_init(void)
{
    for (int v = 0; v < LIST_VARIANTS; v++) {
        char *t = list_texts[v];
        size_t cap = sizeof list_texts[v], len = 0;
        int p = 2; /* $1 is the limit */
        len +=
            (size_t)snprintf(t + len, cap - len, "SELECT " ORDER_COLS " FROM orders o WHERE true");
        if (v & LIST_CUSTOMER)
            len += (size_t)snprintf(t + len, cap - len, " AND o.customer_id = $%d", p++);
        if (v & LIST_STATUS)
            len += (size_t)snprintf(t + len, cap - len, " AND o.status = ANY($%d::text[])", p++);
        if (v & LIST_CURSOR) {
            len += (size_t)snprintf(t + len, cap - len,
                                    " AND (o.created_at, o.id) < (" STORE_TS("$%d") ", $%d::uuid)",
                                    p, p + 1);
            p += 2;
        }
        snprintf(t + len, cap - len, " ORDER BY o.created_at DESC, o.id DESC LIMIT $1::int");
        snprintf(list_names[v], sizeof list_names[v], "orderd_order_list_%d", v);
        list_sql[v] = (struct store_sql){list_names[v], t};
    }
}

/* Fetches the items of orders[0..n) with one query and attaches them. */
static int attach_items(struct store *s, order_ctx *ctx, order_t *orders, size_t n)
{
    store_buf ids = {0};
    store__buf_raw(&ids, "{");
    for (size_t i = 0; i < n; i++) {
        if (i)
            store__buf_raw(&ids, ",");
        store__buf_text_elem(&ids, orders[i].id);
    }
    store__buf_raw(&ids, "}");
    if (ids.oom) {
        store__buf_free(&ids);
        return order_fail(ctx->err, ORDER_EINTERNAL, "out of memory");
    }
    const char *params[1] = {ids.p};
    struct store_step step = {&SQL_ITEMS_FOR_LIST, 1, params};
    PGresult *r;
    int rc = store__tx(s, ctx, "order_list_items", 0, &step, 1, &r);
    store__buf_free(&ids);
    if (rc != ORDER_OK)
        return rc;
    int rows = PQntuples(r);
    /* Rows come grouped by order, in page order: count, allocate, fill. */
    for (int row = 0; row < rows; row++) {
        int64_t ord = store__int(r, row, 0);
        if (ord < 1 || (size_t)ord > n) {
            store__clear(&r, 1);
            return order_fail(ctx->err, ORDER_EINTERNAL, "item of an order not on the page");
        }
        orders[ord - 1].nitems++;
    }
    for (size_t i = 0; i < n; i++) {
        if (!orders[i].nitems)
            continue;
        orders[i].items = calloc(orders[i].nitems, sizeof *orders[i].items);
        if (!orders[i].items) {
            store__clear(&r, 1);
            return order_fail(ctx->err, ORDER_EINTERNAL, "out of memory");
        }
        orders[i].nitems = 0;
    }
    for (int row = 0; row < rows; row++) {
        order_t *o = &orders[store__int(r, row, 0) - 1];
        fill_item(r, row, 1, &o->items[o->nitems++]);
    }
    store__clear(&r, 1);
    return ORDER_OK;
}

static int repo_order_list(void *self, order_ctx *ctx, const order_list_query *q, order_t **out,
                           size_t *n)
{
    struct store *s = self;
    *out = NULL;
    *n = 0;
    if (q->limit < 1 || q->limit > ORDER_PAGE_SIZE_MAX + 1)
        return order_fail(ctx->err, ORDER_EINVAL, "list limit %d out of range", q->limit);
    pthread_once(&list_once, list_sql_init);

    int v = 0, np = 0;
    const char *params[5];
    store_num lim, ts;
    store_buf statuses = {0};
    params[np++] = store__num(&lim, q->limit);
    if (q->customer_id) {
        v |= LIST_CUSTOMER;
        params[np++] = q->customer_id;
    }
    if (q->status_set) {
        v |= LIST_STATUS;
        status_array(&statuses, q->status_set);
        if (statuses.oom) {
            store__buf_free(&statuses);
            return order_fail(ctx->err, ORDER_EINTERNAL, "out of memory");
        }
        params[np++] = statuses.p;
    }
    if (q->has_cursor) {
        v |= LIST_CURSOR;
        params[np++] = store__num(&ts, q->cursor_created_at_us);
        params[np++] = q->cursor_id;
    }
    struct store_step step = {&list_sql[v], np, params};
    PGresult *r;
    int rc = store__tx(s, ctx, "order_list", 0, &step, 1, &r);
    store__buf_free(&statuses);
    if (rc != ORDER_OK)
        return rc; /* a malformed cursor id cannot get here: the domain checks it */

    int rows = PQntuples(r);
    if (rows == 0) {
        store__clear(&r, 1);
        return ORDER_OK;
    }
    order_t *orders = calloc((size_t)rows, sizeof *orders);
    if (!orders) {
        store__clear(&r, 1);
        return order_fail(ctx->err, ORDER_EINTERNAL, "out of memory");
    }
    for (int row = 0; row < rows && rc == ORDER_OK; row++)
        rc = fill_order(ctx, r, row, 0, &orders[row]);
    store__clear(&r, 1);
    /* Items never change once written, so reading them in a second transaction is safe. */
    if (rc == ORDER_OK)
        rc = attach_items(s, ctx, orders, (size_t)rows);
    if (rc != ORDER_OK) {
        order_list_free(orders, (size_t)rows);
        return rc;
    }
    *out = orders;
    *n = (size_t)rows;
    return ORDER_OK;
}

/* ---- changes ---- */

static int transition_once(struct store *s, order_ctx *ctx, const order_transition *t,
                           order_t *out);

/* How often a transition that lost a race inside PostgreSQL is tried again. Under READ
 * COMMITTED the UPDATE can match nothing while it waits for the row lock (it re-checks the
 * row version it locked) and the read-back then shows a status the transition allows.
 * Nothing was written, so trying again is safe; only a persistent race becomes ABORTED. */
#define TRANSITION_ATTEMPTS 3

static int repo_order_transition(void *self, order_ctx *ctx, const order_transition *t,
                                 order_t *out)
{
    int rc = ORDER_EABORTED;
    for (int attempt = 0; attempt < TRANSITION_ATTEMPTS && rc == ORDER_EABORTED; attempt++) {
        if (attempt > 0) {
            order_clear(out);
            order_error_reset(ctx->err);
        }
        rc = transition_once(self, ctx, t, out);
    }
    return rc;
}

static bool inbound_ok(order_ctx *ctx, const order_inbound *in, int *kind)
{
    *kind = 0;
    if (!in)
        return true;
    if ((in->kind != ORDER_INBOUND_PROVIDER && in->kind != ORDER_INBOUND_INVENTORY) || !in->id ||
        !*in->id) {
        order_fail(ctx->err, ORDER_EINTERNAL, "bad inbound event (kind %d)", (int)in->kind);
        return false;
    }
    *kind = (int)in->kind;
    return true;
}

static bool is_true(const PGresult *r, int row, int col)
{
    return strcmp(PQgetvalue(r, row, col), "t") == 0;
}

/*
 * Runs one conditional change of an order (`sql`, whose params[0] is the order id and
 * whose one row says (changed, inbound event seen before)) and reads the order back into
 * *out, in one transaction. With an inbound event the row is locked by a statement of its
 * own first, so the change's snapshot (taken after the lock) sees an event a concurrent
 * delivery just recorded: one applies, the other is a duplicate.
 * ORDER_OK with *changed, or with !*changed and *out the current order (the caller says
 * why); ORDER_EDUPLICATE if the event was seen; ORDER_ENOTFOUND; or a store error.
 */
static int change_order(struct store *s, order_ctx *ctx, const char *op,
                        const struct store_sql *sql, int nparams, const char *const *params,
                        const order_inbound *in, order_t *out, bool *changed)
{
    bool lock = in != NULL;
    struct store_step steps[4] = {{&SQL_ORDER_LOCK, 1, params},
                                  {sql, nparams, params},
                                  {&SQL_ORDER_GET, 1, params},
                                  {&SQL_ITEMS_GET, 1, params}};
    PGresult *r4[4], **r = r4 + (lock ? 1 : 0);
    *changed = false;
    int rc =
        store__tx(s, ctx, op, STORE_TX_BADID_NOTFOUND, steps + (lock ? 0 : 1), lock ? 4 : 3, r4);
    if (rc == ORDER_OK && lock)
        store__clear(r4, 1);
    if (rc == ORDER_ENOTFOUND)
        return order_fail(ctx->err, rc, "order %s not found", params[0]);
    if (rc != ORDER_OK)
        return rc;
    if (PQntuples(r[1]) != 1) {
        store__clear(r, 3);
        return order_fail(ctx->err, ORDER_ENOTFOUND, "order %s not found", params[0]);
    }
    *changed = PQntuples(r[0]) == 1 && is_true(r[0], 0, 0);
    bool seen = PQntuples(r[0]) == 1 && is_true(r[0], 0, 1);
    rc = read_order(ctx, r[1], 0, r[2], out);
    store__clear(r, 3);
    if (rc != ORDER_OK) {
        order_clear(out);
        *changed = false;
        return rc;
    }
    if (!*changed && seen)
        return order_fail(ctx->err, ORDER_EDUPLICATE, "event %s was already applied", in->id);
    return ORDER_OK;
}

static int transition_once(struct store *s, order_ctx *ctx, const order_transition *t, order_t *out)
{
    const char *to = order_status_name(t->to);
    int kind;
    if (!to || !t->from_set)
        return order_fail(ctx->err, ORDER_EINTERNAL, "bad transition (to %d, from set %#x)",
                          (int)t->to, t->from_set);
    if (!inbound_ok(ctx, t->inbound, &kind))
        return ORDER_EINTERNAL;
    pthread_once(&change_once, change_sql_init);
    store_buf from = {0};
    status_array(&from, t->from_set);
    if (from.oom) {
        store__buf_free(&from);
        return order_fail(ctx->err, ORDER_EINTERNAL, "out of memory");
    }
    store_num ver, paid;
    const char *params[12] = {
        t->order_id,
        from.p,
        to,
        store__num(&ver, t->expected_version),
        t->reason,
        order_pay_status_name(t->pay_status), /* NULL keeps the current one */
        t->paid_at_us > 0 ? store__num(&paid, t->paid_at_us) : NULL,
        ctx->caller.subject,
        t->charge_id && *t->charge_id ? t->charge_id : NULL,
        t->receipt_url && *t->receipt_url ? t->receipt_url : NULL,
        t->reference && *t->reference ? t->reference : NULL,
        kind ? t->inbound->id : NULL,
    };
    bool moved = false;
    int rc = change_order(s, ctx, "order_transition", &transition_sql[kind], kind ? 12 : 11, params,
                          t->inbound, out, &moved);
    store__buf_free(&from);
    if (rc != ORDER_OK || moved)
        return rc;

    /* Refused: say why, with the current order in *out. */
    order_error *e = ctx->err;
    bool status_ok = (t->from_set & ORDER_STATUS_BIT(out->status)) != 0;
    if (status_ok && (t->expected_version < 0 || out->version == t->expected_version))
        /* The row matched when read back but not when updated: a change raced us. */
        return order_fail(e, ORDER_EABORTED, "order %s changed concurrently; retry", out->id);
    e->current_status = (int)out->status;
    snprintf(e->precondition_subject, sizeof e->precondition_subject, "%s", out->id);
    if (status_ok) {
        snprintf(e->precondition_type, sizeof e->precondition_type, "ORDER_VERSION");
        return order_fail(e, ORDER_EPRECONDITION, "order is at version %lld; expected %lld",
                          (long long)out->version, (long long)t->expected_version);
    }
    char want[96];
    status_words(want, sizeof want, t->from_set);
    snprintf(e->precondition_type, sizeof e->precondition_type, "ORDER_STATUS");
    return order_fail(e, ORDER_EPRECONDITION, "order is %s; expected %s",
                      order_status_name(out->status), want);
}

/* {"pending","none"} of the payment statuses in `set` ('none' = no payment yet). */
static void pay_status_array(store_buf *b, unsigned set)
{
    store__buf_raw(b, "{");
    bool first = true;
    for (int st = 0; st <= ORDER_PAY_FAILED; st++) {
        if (!(set & ORDER_PAY_BIT(st)))
            continue;
        if (!first)
            store__buf_raw(b, ",");
        store__buf_text_elem(b, st == 0 ? "none" : order_pay_status_name((order_pay_status)st));
        first = false;
    }
    store__buf_raw(b, "}");
}

static const char *opt_str(const char *v)
{
    return v && *v ? v : NULL;
}

static int repo_order_amend(void *self, order_ctx *ctx, const order_amendment *a, order_t *out)
{
    struct store *s = self;
    int kind;
    if (!inbound_ok(ctx, a->inbound, &kind))
        return ORDER_EINTERNAL;
    pthread_once(&change_once, change_sql_init);
    store_buf set = {0};
    if (a->pay_from_set) {
        pay_status_array(&set, a->pay_from_set);
        if (set.oom) {
            store__buf_free(&set);
            return order_fail(ctx->err, ORDER_EINTERNAL, "out of memory");
        }
    }
    store_num paid, refunded, reserved;
    const char *params[12] = {
        a->order_id,
        a->provider != ORDER_PROVIDER_UNSPECIFIED ? order_provider_name(a->provider) : NULL,
        opt_str(a->reference),
        order_pay_status_name(a->pay_status),
        a->paid_at_us > 0 ? store__num(&paid, a->paid_at_us) : NULL,
        opt_str(a->charge_id),
        opt_str(a->receipt_url),
        opt_str(a->refund_id),
        a->refunded_at_us > 0 ? store__num(&refunded, a->refunded_at_us) : NULL,
        a->stock_reserved_at_us > 0 ? store__num(&reserved, a->stock_reserved_at_us) : NULL,
        a->pay_from_set ? set.p : NULL,
        kind ? a->inbound->id : NULL,
    };
    bool changed = false;
    int rc = change_order(s, ctx, "order_amend", &amend_sql[kind], kind ? 12 : 11, params,
                          a->inbound, out, &changed);
    store__buf_free(&set);
    if (rc != ORDER_OK || changed)
        return rc;
    order_error *e = ctx->err;
    snprintf(e->precondition_type, sizeof e->precondition_type, "PAYMENT_STATUS");
    snprintf(e->precondition_subject, sizeof e->precondition_subject, "%s", out->id);
    e->current_status = (int)out->status;
    const char *ps = order_pay_status_name(out->pay_status);
    return order_fail(e, ORDER_EPRECONDITION, "the order's payment is %s", ps ? ps : "not set up");
}

static int repo_inbound_seen(void *self, order_ctx *ctx, const order_inbound *in, bool *seen)
{
    struct store *s = self;
    int kind;
    *seen = false;
    if (!in || !inbound_ok(ctx, in, &kind))
        return order_fail(ctx->err, ORDER_EINTERNAL, "no inbound event to look up");
    const char *params[1] = {in->id};
    struct store_step step = {
        kind == ORDER_INBOUND_PROVIDER ? &SQL_SEEN_PROVIDER : &SQL_SEEN_INVENTORY, 1, params};
    PGresult *r;
    int rc = store__tx(s, ctx, "inbound_seen", 0, &step, 1, &r);
    if (rc != ORDER_OK)
        return rc;
    *seen = PQntuples(r) == 1 && is_true(r, 0, 0);
    store__clear(&r, 1);
    return ORDER_OK;
}

static int repo_order_find_by_payment(void *self, order_ctx *ctx, order_provider p, const char *ref,
                                      order_t *out)
{
    struct store *s = self;
    const char *pname = order_provider_name(p);
    if (!pname || !ref || !*ref)
        return order_fail(ctx->err, ORDER_ENOTFOUND, "no order has this payment");
    const char *params[2] = {pname, ref};
    struct store_step steps[2] = {{&SQL_ORDER_BY_PAYMENT, 2, params},
                                  {&SQL_ITEMS_BY_PAYMENT, 2, params}};
    PGresult *r[2];
    int rc = store__tx(s, ctx, "order_find_by_payment", 0, steps, 2, r);
    if (rc != ORDER_OK)
        return rc;
    if (PQntuples(r[0]) != 1) {
        store__clear(r, 2);
        return order_fail(ctx->err, ORDER_ENOTFOUND, "no %s payment %s", pname, ref);
    }
    rc = read_order(ctx, r[0], 0, r[1], out);
    store__clear(r, 2);
    if (rc != ORDER_OK)
        order_clear(out);
    return rc;
}

/* Reads every row of r as an order, then their items: a heap array for order_list_free. */
static int read_orders(struct store *s, order_ctx *ctx, PGresult *r, order_t **out, size_t *n)
{
    int rows = PQntuples(r);
    *out = NULL;
    *n = 0;
    if (rows == 0)
        return ORDER_OK;
    order_t *orders = calloc((size_t)rows, sizeof *orders);
    if (!orders)
        return order_fail(ctx->err, ORDER_EINTERNAL, "out of memory");
    int rc = ORDER_OK;
    for (int row = 0; row < rows && rc == ORDER_OK; row++)
        rc = fill_order(ctx, r, row, 0, &orders[row]);
    if (rc == ORDER_OK)
        rc = attach_items(s, ctx, orders, (size_t)rows);
    if (rc != ORDER_OK) {
        order_list_free(orders, (size_t)rows);
        return rc;
    }
    *out = orders;
    *n = (size_t)rows;
    return ORDER_OK;
}

static int repo_orders_expire_due(void *self, order_ctx *ctx, int64_t created_before_us,
                                  const char *reason, size_t max, order_t **out, size_t *n)
{
    struct store *s = self;
    *out = NULL;
    *n = 0;
    store_num before, lim;
    const char *params[4] = {store__num(&before, created_before_us),
                             store__num(&lim, (int64_t)(max ? max : 1)), reason,
                             ctx->caller.subject};
    struct store_step step = {&SQL_EXPIRE_DUE, 4, params};
    PGresult *r;
    int rc = store__tx(s, ctx, "orders_expire_due", 0, &step, 1, &r);
    if (rc != ORDER_OK)
        return rc;
    /* Committed: items are read in a second transaction (they never change). */
    rc = read_orders(s, ctx, r, out, n);
    store__clear(&r, 1);
    return rc;
}

static int repo_orders_unsettled(void *self, order_ctx *ctx, int64_t changed_before_us, size_t max,
                                 order_t **out, size_t *n)
{
    struct store *s = self;
    *out = NULL;
    *n = 0;
    store_num before, lim;
    const char *params[2] = {store__num(&before, changed_before_us),
                             store__num(&lim, (int64_t)(max ? max : 1))};
    struct store_step step = {&SQL_UNSETTLED, 2, params};
    PGresult *r;
    int rc = store__tx(s, ctx, "orders_unsettled", 0, &step, 1, &r);
    if (rc != ORDER_OK)
        return rc;
    rc = read_orders(s, ctx, r, out, n);
    store__clear(&r, 1);
    return rc;
}

void store_order_port(struct store *s, order_store *out)
{
    *out = (order_store){
        .self = s,
        .products_get = repo_products_get,
        .product_upsert = repo_product_upsert,
        .order_insert = repo_order_insert,
        .order_get = repo_order_get,
        .order_list = repo_order_list,
        .order_transition = repo_order_transition,
        .order_amend = repo_order_amend,
        .inbound_seen = repo_inbound_seen,
        .order_find_by_payment = repo_order_find_by_payment,
        .orders_expire_due = repo_orders_expire_due,
        .orders_unsettled = repo_orders_unsettled,
    };
}
