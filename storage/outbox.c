/* outbox.c — the outbox relay's SQL (storage/outbox.h): claim, mark sent or failed, prune,
 * backlog gauges, and LISTEN / notification draining on the store's connection.
 *
 * Each call is one statement in one store__tx round trip. Ids travel as one uuid[] array
 * literal parameter, so a batch costs one statement whatever its size.
 */
#include "storage/outbox.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "storage/internal.h"

/* $1 max rows, $2 lease in µs. The inner SELECT picks the heads of the (order, family)
 * chains that are due, oldest first, and locks them, skipping rows another claimer holds;
 * under READ COMMITTED a row changed by a claim that committed meanwhile is re-checked
 * against the WHERE clause after the lock, so it cannot be taken twice. */
static const struct store_sql SQL_CLAIM = {
    "orderd_outbox_claim",
    "UPDATE outbox SET claimed_until = clock_timestamp() + $2::bigint * interval '1 microsecond',"
    "  attempts = outbox.attempts + 1"
    " FROM (SELECT o.id FROM outbox o"
    "  WHERE o.published_at IS NULL AND o.next_attempt_at <= clock_timestamp()"
    "   AND (o.claimed_until IS NULL OR o.claimed_until < clock_timestamp())"
    "   AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.order_id = o.order_id"
    "    AND p.family = o.family AND p.published_at IS NULL AND p.seq < o.seq)"
    "  ORDER BY o.seq LIMIT $1::int FOR UPDATE OF o SKIP LOCKED) c"
    " WHERE outbox.id = c.id"
    " RETURNING outbox.id, outbox.seq, outbox.order_id, outbox.routing_key,"
    "  outbox.payload::text, floor(extract(epoch FROM outbox.created_at))::bigint,"
    "  outbox.attempts"};

/* $1 ids. */
static const struct store_sql SQL_MARK_SENT = {
    "orderd_outbox_mark_sent",
    "UPDATE outbox SET published_at = clock_timestamp(), claimed_until = NULL"
    " WHERE id = ANY($1::uuid[]) AND published_at IS NULL"};

/* $1 ids, $2 error, $3 base µs, $4 max µs. The exponent is capped before power() so the
 * product stays finite whatever `attempts` is. Floating point is fine here: it is a delay. */
static const struct store_sql SQL_MARK_FAILED = {
    "orderd_outbox_mark_failed",
    "UPDATE outbox SET claimed_until = NULL, last_error = left($2, 500),"
    "  next_attempt_at = clock_timestamp() + least($4::float8,"
    "   $3::float8 * power(2::float8, least(greatest(attempts, 1) - 1, 40)))"
    "   * (0.5 + random() * 0.5) * interval '1 microsecond'"
    " WHERE id = ANY($1::uuid[]) AND published_at IS NULL"};

/* $1 age µs, $2 limit. */
static const struct store_sql SQL_PRUNE = {
    "orderd_outbox_prune",
    "WITH d AS (DELETE FROM outbox WHERE id IN (SELECT id FROM outbox"
    "  WHERE published_at IS NOT NULL"
    "   AND published_at < clock_timestamp() - $1::bigint * interval '1 microsecond'"
    "  ORDER BY published_at LIMIT $2::int FOR UPDATE SKIP LOCKED) RETURNING 1)"
    " SELECT count(*) FROM d"};

static const struct store_sql SQL_STATS = {
    "orderd_outbox_stats",
    "SELECT count(*), coalesce((extract(epoch FROM clock_timestamp() - min(created_at))"
    "  * 1000000)::bigint, 0) FROM outbox WHERE published_at IS NULL"};

/* Fresh statistics for the claim's planner (see store_outbox_analyze). Utility: unnamed. */
static const struct store_sql SQL_ANALYZE = {NULL, "ANALYZE outbox"};

/* A utility statement: sent unnamed (not prepared). */
static const struct store_sql SQL_LISTEN = {NULL, "LISTEN " STORE_OUTBOX_CHANNEL};

static int cmp_seq(const void *a, const void *b)
{
    const store_outbox_row *x = a, *y = b;
    return (x->seq > y->seq) - (x->seq < y->seq);
}

void store_outbox_rows_free(store_outbox_row *rows, size_t n)
{
    if (!rows)
        return;
    for (size_t i = 0; i < n; i++)
        free(rows[i].payload);
    free(rows);
}

int store_outbox_claim(struct store *s, order_ctx *ctx, int max, int64_t claim_us,
                       store_outbox_row **rows, size_t *n)
{
    *rows = NULL;
    *n = 0;
    if (max <= 0)
        return ORDER_OK;
    store_num a, b;
    const char *v[2] = {store__num(&a, max), store__num(&b, claim_us)};
    struct store_step step = {&SQL_CLAIM, 2, v};
    PGresult *r;
    int rc = store__tx(s, ctx, "outbox_claim", 0, &step, 1, &r);
    if (rc != ORDER_OK)
        return rc;
    int nt = PQntuples(r);
    if (nt == 0) {
        store__clear(&r, 1);
        return ORDER_OK;
    }
    store_outbox_row *out = calloc((size_t)nt, sizeof *out);
    if (!out)
        goto oom;
    for (int i = 0; i < nt; i++) {
        store_outbox_row *w = &out[i];
        store__str(w->id, sizeof w->id, r, i, 0);
        w->seq = store__int(r, i, 1);
        store__str(w->order_id, sizeof w->order_id, r, i, 2);
        store__str(w->routing_key, sizeof w->routing_key, r, i, 3);
        size_t len = (size_t)PQgetlength(r, i, 4);
        w->payload = malloc(len + 1);
        if (!w->payload) {
            /* The claimed rows stay leased until claim_us passes, then are retried. */
            store_outbox_rows_free(out, (size_t)nt);
            goto oom;
        }
        memcpy(w->payload, PQgetvalue(r, i, 4), len);
        w->payload[len] = '\0';
        w->payload_len = len;
        w->created_at_s = store__int(r, i, 5);
        w->attempts = (int)store__int(r, i, 6);
    }
    store__clear(&r, 1);
    /* RETURNING follows the UPDATE's plan, not the subquery's ORDER BY. */
    qsort(out, (size_t)nt, sizeof *out, cmp_seq);
    *rows = out;
    *n = (size_t)nt;
    return ORDER_OK;
oom:
    store__clear(&r, 1);
    return order_fail(ctx->err, ORDER_EINTERNAL, "out of memory");
}

/* {"id1","id2"} */
static int id_array(order_ctx *ctx, store_buf *b, const char *const *ids, size_t n)
{
    store__buf_raw(b, "{");
    for (size_t i = 0; i < n; i++) {
        if (i)
            store__buf_raw(b, ",");
        store__buf_text_elem(b, ids[i]);
    }
    store__buf_raw(b, "}");
    if (b->oom) {
        store__buf_free(b);
        return order_fail(ctx->err, ORDER_EINTERNAL, "out of memory");
    }
    return ORDER_OK;
}

int store_outbox_mark_sent(struct store *s, order_ctx *ctx, const char *const *ids, size_t n)
{
    if (n == 0)
        return ORDER_OK;
    store_buf b = {0};
    int rc = id_array(ctx, &b, ids, n);
    if (rc != ORDER_OK)
        return rc;
    const char *v[1] = {b.p};
    struct store_step step = {&SQL_MARK_SENT, 1, v};
    PGresult *r;
    rc = store__tx(s, ctx, "outbox_mark_sent", 0, &step, 1, &r);
    store__buf_free(&b);
    if (rc == ORDER_OK)
        store__clear(&r, 1);
    return rc;
}

int store_outbox_mark_failed(struct store *s, order_ctx *ctx, const char *const *ids, size_t n,
                             const char *error, int64_t retry_base_us, int64_t retry_max_us)
{
    if (n == 0)
        return ORDER_OK;
    store_buf b = {0};
    int rc = id_array(ctx, &b, ids, n);
    if (rc != ORDER_OK)
        return rc;
    if (retry_base_us < 1)
        retry_base_us = 1;
    if (retry_max_us < retry_base_us)
        retry_max_us = retry_base_us;
    store_num base, max;
    const char *v[4] = {b.p, error ? error : "", store__num(&base, retry_base_us),
                        store__num(&max, retry_max_us)};
    struct store_step step = {&SQL_MARK_FAILED, 4, v};
    PGresult *r;
    rc = store__tx(s, ctx, "outbox_mark_failed", 0, &step, 1, &r);
    store__buf_free(&b);
    if (rc == ORDER_OK)
        store__clear(&r, 1);
    return rc;
}

int store_outbox_prune(struct store *s, order_ctx *ctx, int64_t older_than_us, int limit,
                       int64_t *deleted)
{
    *deleted = 0;
    store_num a, b;
    const char *v[2] = {store__num(&a, older_than_us), store__num(&b, limit)};
    struct store_step step = {&SQL_PRUNE, 2, v};
    PGresult *r;
    int rc = store__tx(s, ctx, "outbox_prune", 0, &step, 1, &r);
    if (rc != ORDER_OK)
        return rc;
    if (PQntuples(r) == 1)
        *deleted = store__int(r, 0, 0);
    store__clear(&r, 1);
    return ORDER_OK;
}

int store_outbox_stats(struct store *s, order_ctx *ctx, int64_t *backlog, int64_t *oldest_age_us)
{
    *backlog = 0;
    *oldest_age_us = 0;
    struct store_step step = {&SQL_STATS, 0, NULL};
    PGresult *r;
    int rc = store__tx(s, ctx, "outbox_stats", 0, &step, 1, &r);
    if (rc != ORDER_OK)
        return rc;
    if (PQntuples(r) == 1) {
        *backlog = store__int(r, 0, 0);
        *oldest_age_us = store__int(r, 0, 1);
        if (*oldest_age_us < 0) /* clocks of the rows' writers may differ a little */
            *oldest_age_us = 0;
    }
    store__clear(&r, 1);
    return ORDER_OK;
}

int store_outbox_analyze(struct store *s, order_ctx *ctx)
{
    struct store_step step = {&SQL_ANALYZE, 0, NULL};
    PGresult *r;
    int rc = store__tx(s, ctx, "outbox_analyze", 0, &step, 1, &r);
    if (rc == ORDER_OK)
        store__clear(&r, 1);
    return rc;
}

/* Which connection a LISTEN was sent on. The address alone is not enough: a new PGconn is
 * likely to land where the old one was freed; the backend pid tells them apart. Never 0. */
static uint64_t conn_tag(const PGconn *c)
{
    uint64_t t = ((uint64_t)(uint32_t)PQbackendPID(c) << 32) ^ (uint64_t)(uintptr_t)c;
    return t ? t : 1;
}

int store_outbox_listen(struct store *s, order_ctx *ctx, uint64_t *tag)
{
    if (s->conn && PQstatus(s->conn) == CONNECTION_OK && *tag == conn_tag(s->conn))
        return ORDER_OK;
    struct store_step step = {&SQL_LISTEN, 0, NULL};
    PGresult *r;
    /* store__tx connects first if needed; LISTEN inside its transaction takes effect at
     * COMMIT, and stays for the life of the session. */
    int rc = store__tx(s, ctx, "outbox_listen", 0, &step, 1, &r);
    if (rc != ORDER_OK) {
        *tag = 0;
        return rc;
    }
    store__clear(&r, 1);
    *tag = s->conn ? conn_tag(s->conn) : 0;
    return ORDER_OK;
}

int store_outbox_listen_fd(const struct store *s)
{
    if (!s->conn || PQstatus(s->conn) != CONNECTION_OK)
        return -1;
    return PQsocket(s->conn);
}

int store_outbox_notified(struct store *s)
{
    if (!s->conn || PQstatus(s->conn) != CONNECTION_OK)
        return -1;
    if (!PQconsumeInput(s->conn)) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s", PQerrorMessage(s->conn));
        msg[strcspn(msg, "\r\n")] = '\0';
        log_kv(LOG_WARN, "postgres connection broke while listening", LOG_F_STR, "error", msg,
               LOG_F_END);
        return -1;
    }
    int n = 0;
    PGnotify *nt;
    while ((nt = PQnotifies(s->conn)) != NULL) {
        n++;
        PQfreemem(nt);
    }
    return n;
}
