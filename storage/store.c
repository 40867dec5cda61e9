/* store.c — the connection of a store: opening, lazy reconnection with back-off, and the
 * transaction runner that every repository call goes through.
 *
 * DESIGN
 * store__tx() sends a whole transaction as one libpq pipeline — BEGIN, the statement
 * timeout, the statements, COMMIT, Sync — and then reads the results, so a call costs one
 * round trip. Named statements are prepared inside the same pipeline the first time a
 * connection uses them. While waiting for results it polls the socket itself: when the
 * caller's deadline passes it asks the server to cancel (PQcancel) and, if even that gets
 * no answer within a grace period, drops the connection; with no deadline, a server that
 * stays silent well past the statement timeout is given up the same way. Any error rolls
 * the transaction back before the connection is used again.
 */
#include "storage/internal.h"

#include <assert.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/log.h"

#define CONNECT_BOUND_US  (5 * 1000000LL) /* one connect attempt takes at most this */
#define BACKOFF_MIN_US    (500 * 1000LL)  /* first pause after a failed attempt */
#define BACKOFF_MAX_US    (4 * 1000000LL) /* the pause doubles up to this */
#define CANCEL_GRACE_US   (1000 * 1000LL) /* after PQcancel, how long the answer may take */
#define SILENCE_GRACE_US  (2 * 1000000LL) /* past the statement timeout: server is gone */
#define ROLLBACK_BOUND_US (2 * 1000000LL) /* a ROLLBACK after an error */

static const struct store_sql SQL_BEGIN = {"orderd_begin", "BEGIN"};
/* set_config(..., true) is SET LOCAL, with the value as a parameter. */
static const struct store_sql SQL_TIMEOUT = {"orderd_timeout",
                                             "SELECT set_config('statement_timeout', $1, true)"};
static const struct store_sql SQL_COMMIT = {"orderd_commit", "COMMIT"};

/* ---- small helpers ---- */

static void trim(char *s)
{
    size_t n = strlen(s);
    while (n && (s[n - 1] == '\n' || s[n - 1] == '\r' || s[n - 1] == ' ' || s[n - 1] == '\t'))
        s[--n] = '\0';
    /* libpq's multi-line messages ("...\n\tIs the server running...") become one line. */
    for (char *p = s; *p; p++)
        if (*p == '\n' || *p == '\t')
            *p = ' ';
}

const char *store__num(store_num *buf, int64_t v)
{
    snprintf(buf->s, sizeof buf->s, "%lld", (long long)v);
    return buf->s;
}

int64_t store__int(const PGresult *r, int row, int col)
{
    if (PQgetisnull(r, row, col))
        return 0;
    const char *v = PQgetvalue(r, row, col);
    char *end;
    errno = 0;
    long long n = strtoll(v, &end, 10);
    if (errno || end == v || *end) {
        log_kv(LOG_ERROR, "postgres returned a non-integer", LOG_F_STR, "column", PQfname(r, col),
               LOG_F_END);
        return 0;
    }
    return (int64_t)n;
}

void store__str(char *dst, size_t cap, const PGresult *r, int row, int col)
{
    snprintf(dst, cap, "%s", PQgetisnull(r, row, col) ? "" : PQgetvalue(r, row, col));
}

void store__clear(PGresult **res, int n)
{
    for (int i = 0; i < n; i++) {
        PQclear(res[i]);
        res[i] = NULL;
    }
}

static void buf_put(store_buf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void store__buf_raw(store_buf *b, const char *s)
{
    buf_put(b, s, strlen(s));
}

/* An element of an array literal: always quoted (so "NULL" stays a string), with
 * backslash and double quote escaped. The literal travels as a parameter, not as SQL. */
void store__buf_text_elem(store_buf *b, const char *s)
{
    buf_put(b, "\"", 1);
    for (const char *p = s; *p; p++) {
        if (*p == '"' || *p == '\\')
            buf_put(b, "\\", 1);
        buf_put(b, p, 1);
    }
    buf_put(b, "\"", 1);
}

void store__buf_free(store_buf *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* Waits until fd is ready for `events` or until the monotonic time `limit` (INT64_MAX:
 * no limit). 1 ready, 0 timed out, -1 error. */
static int wait_fd(int fd, short events, int64_t limit)
{
    if (fd < 0)
        return -1;
    for (;;) {
        int ms = -1;
        if (limit != INT64_MAX) {
            int64_t left = limit - clock_mono_us();
            if (left <= 0)
                return 0;
            int64_t m = (left + 999) / 1000;
            ms = m > 1000000 ? 1000000 : (int)m;
        }
        struct pollfd p = {.fd = fd, .events = events};
        int r = poll(&p, 1, ms);
        if (r > 0)
            return 1; /* readable, writable, or an error libpq will report */
        if (r < 0 && errno != EINTR)
            return -1;
    }
}

/* ---- connecting ---- */

/* Server notices ("relation already exists, skipping") become debug log lines instead of
 * libpq's default raw text on stderr, which would break the one-JSON-object-per-line log. */
static void on_notice(void *arg, const char *message)
{
    if (!log_enabled(LOG_DEBUG))
        return;
    char msg[512];
    snprintf(msg, sizeof msg, "%s", message);
    trim(msg);
    log_kv(LOG_DEBUG, "postgres notice", LOG_F_STR, "notice", msg, LOG_F_END);
}

PGconn *store__connect(const char *dsn, int64_t limit_mono_us, bool *timed_out, char *err,
                       size_t errlen)
{
    /* expand_dbname=1 expands `dsn`; the keywords after it override it: the client
     * encoding is always UTF-8 (the domain's strings are), the name only a fallback. */
    static const char *const keys[] = {"dbname", "client_encoding", "fallback_application_name",
                                       NULL};
    const char *const vals[] = {dsn, "UTF8", "orderd", NULL};
    *timed_out = false;
    PGconn *c = PQconnectStartParams(keys, vals, 1);
    if (!c) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    PostgresPollingStatusType st =
        PQstatus(c) == CONNECTION_BAD ? PGRES_POLLING_FAILED : PGRES_POLLING_WRITING;
    while (st != PGRES_POLLING_OK && st != PGRES_POLLING_FAILED) {
        int r = wait_fd(PQsocket(c), st == PGRES_POLLING_READING ? POLLIN : POLLOUT, limit_mono_us);
        if (r == 0) {
            *timed_out = true;
            snprintf(err, errlen, "timed out connecting to PostgreSQL");
            PQfinish(c);
            return NULL;
        }
        if (r < 0) {
            snprintf(err, errlen, "poll failed while connecting: %s", strerror(errno));
            PQfinish(c);
            return NULL;
        }
        st = PQconnectPoll(c);
    }
    if (st == PGRES_POLLING_FAILED) {
        snprintf(err, errlen, "%s", PQerrorMessage(c));
        trim(err);
        PQfinish(c);
        return NULL;
    }
    PQsetNoticeProcessor(c, on_notice, NULL);
    return c;
}

static void drop_conn(struct store *s)
{
    PQfinish(s->conn);
    s->conn = NULL;
    s->nprepared = 0; /* prepared statements die with their connection */
}

/* One connect attempt bounded by `limit`. On failure arms the back-off, unless the bound
 * was the caller's deadline (that says nothing about the server). */
static int connect_now(struct store *s, int64_t limit, bool limit_is_deadline, const char *op)
{
    char msg[512];
    bool timed_out;
    PGconn *c = store__connect(s->dsn, limit, &timed_out, msg, sizeof msg);
    if (c) {
        s->conn = c;
        s->nprepared = 0;
        if (s->backoff_us)
            log_kv(LOG_INFO, "postgres reconnected", LOG_F_STR, "host", PQhost(c), LOG_F_STR,
                   "port", PQport(c), LOG_F_END);
        s->backoff_us = 0;
        s->next_attempt_us = 0;
        return ORDER_OK;
    }
    if (timed_out && limit_is_deadline)
        return ORDER_EDEADLINE;
    s->backoff_us = s->backoff_us ? s->backoff_us * 2 : BACKOFF_MIN_US;
    if (s->backoff_us > BACKOFF_MAX_US)
        s->backoff_us = BACKOFF_MAX_US;
    s->next_attempt_us = clock_mono_us() + s->backoff_us;
    log_kv(LOG_WARN, "postgres connect failed", LOG_F_STR, "op", op, LOG_F_STR, "error", msg,
           LOG_F_INT, "retry_in_ms", (int64_t)(s->backoff_us / 1000), LOG_F_END);
    return ORDER_EUNAVAILABLE;
}

static int ensure_conn(struct store *s, order_ctx *ctx, const char *op)
{
    if (s->conn) {
        if (PQstatus(s->conn) == CONNECTION_OK)
            return ORDER_OK;
        drop_conn(s);
    }
    int64_t now = clock_mono_us();
    if (now < s->next_attempt_us)
        return order_fail(ctx->err, ORDER_EUNAVAILABLE,
                          "database unavailable (reconnecting, next attempt in %lld ms)",
                          (long long)((s->next_attempt_us - now + 999) / 1000));
    int64_t limit = now + CONNECT_BOUND_US;
    bool by_deadline = ctx->deadline_mono_us < limit;
    if (by_deadline)
        limit = ctx->deadline_mono_us;
    int rc = connect_now(s, limit, by_deadline, op);
    if (rc == ORDER_EDEADLINE)
        return order_fail(ctx->err, rc, "deadline exceeded while connecting to the database");
    if (rc != ORDER_OK)
        return order_fail(ctx->err, rc, "database unavailable");
    return ORDER_OK;
}

struct store *store_open(const char *dsn, int64_t statement_timeout_us, char *err, size_t errlen)
{
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(dsn ? dsn : "", &perr);
    if (!opts) {
        /* libpq's message may quote a piece of the DSN (a password, even): not repeated. */
        snprintf(err, errlen, "%s",
                 perr ? "invalid PostgreSQL DSN: not a libpq connection string or URI"
                      : "out of memory");
        PQfreemem(perr);
        return NULL;
    }
    PQconninfoFree(opts);

    struct store *s = calloc(1, sizeof *s);
    if (!s)
        goto oom;
    s->dsn = strdup(dsn);
    if (!s->dsn)
        goto oom;
    s->stmt_timeout_us = statement_timeout_us;
    s->prepare = true;
    /* A failure here is not fatal: the store stays disconnected and retries later. */
    (void)connect_now(s, clock_mono_us() + CONNECT_BOUND_US, false, "open");
    return s;
oom:
    free(s);
    snprintf(err, errlen, "out of memory");
    return NULL;
}

void store_close(struct store *s)
{
    if (!s)
        return;
    if (s->conn)
        drop_conn(s);
    if (s->dsn) {
        explicit_bzero(s->dsn, strlen(s->dsn)); /* it may hold a password */
        free(s->dsn);
    }
    free(s);
}

/* ---- the transaction runner ---- */

/* What store__tx waits under. */
struct waiter {
    int64_t limit;       /* monotonic; INT64_MAX = none */
    int64_t silence_us;  /* without a deadline: how long the server may stay silent */
    bool deadline_binds; /* the caller's deadline, not the configured timeout, is the bound */
    bool cancelled;      /* PQcancel was sent */
    bool timed_out;      /* gave up waiting */
};

static void send_cancel(PGconn *c)
{
    char buf[256];
    PGcancel *k = PQgetCancel(c);
    if (!k)
        return;
    if (!PQcancel(k, buf, sizeof buf)) {
        trim(buf);
        log_kv(LOG_WARN, "postgres cancel failed", LOG_F_STR, "error", buf, LOG_F_END);
    }
    PQfreeCancel(k);
}

/* Waits for and returns the next result (NULL ends a command's results). false when the
 * connection broke or the wait was given up (w->timed_out). */
static bool get_result(PGconn *c, struct waiter *w, PGresult **out)
{
    *out = NULL;
    while (PQisBusy(c)) {
        if (w->limit != INT64_MAX && clock_mono_us() >= w->limit) {
            if (w->deadline_binds && !w->cancelled) {
                /* The deadline passed mid-statement: have the server stop it (it rolls
                 * back), then wait a little for its answer. */
                send_cancel(c);
                w->cancelled = true;
                w->limit = clock_mono_us() + CANCEL_GRACE_US;
                continue;
            }
            w->timed_out = true;
            return false;
        }
        int r = wait_fd(PQsocket(c), POLLIN, w->limit);
        if (r < 0)
            return false;
        if (r > 0 && !PQconsumeInput(c))
            return false;
    }
    *out = PQgetResult(c);
    if (!w->deadline_binds && w->silence_us)
        w->limit = clock_mono_us() + w->silence_us; /* progress: the server is alive */
    return true;
}

static bool is_prepared(const struct store *s, const struct store_sql *q)
{
    for (size_t i = 0; i < s->nprepared; i++)
        if (s->prepared[i] == q)
            return true;
    return false;
}

static void unmark_prepared(struct store *s, const struct store_sql *q)
{
    for (size_t i = 0; i < s->nprepared; i++) {
        if (s->prepared[i] == q) {
            s->prepared[i] = s->prepared[--s->nprepared];
            return;
        }
    }
}

enum cmd_kind { CMD_INTERNAL, CMD_PREPARE, CMD_STEP };
struct cmd {
    enum cmd_kind kind;
    int step;
    const struct store_sql *sql;
};

/* Queues one statement (and its PREPARE, the first time this connection sees it). */
static bool send_sql(struct store *s, const struct store_sql *q, int nparams,
                     const char *const *values, struct cmd *cmds, int *ncmd, int step)
{
    PGconn *c = s->conn;
    bool named = q->name && s->prepare;
    if (named && !is_prepared(s, q)) {
        if (s->nprepared == STORE_MAX_PREPARED) {
            named = false;
        } else {
            if (!PQsendPrepare(c, q->name, q->text, 0, NULL))
                return false;
            /* Marked now so a second use in this pipeline does not prepare it twice;
             * unmarked below if the PREPARE does not succeed. */
            s->prepared[s->nprepared++] = q;
            cmds[(*ncmd)++] = (struct cmd){CMD_PREPARE, -1, q};
        }
    }
    int ok = named ? PQsendQueryPrepared(c, q->name, nparams, values, NULL, NULL, 0)
                   : PQsendQueryParams(c, q->text, nparams, NULL, values, NULL, NULL, 0);
    if (!ok)
        return false;
    cmds[(*ncmd)++] = (struct cmd){step >= 0 ? CMD_STEP : CMD_INTERNAL, step, q};
    return true;
}

static bool sqlstate_is(const char *st, const char *want)
{
    return strcmp(st, want) == 0;
}

/* Maps a failed statement to a domain code, logs what libpq said, and drops the connection
 * when it cannot be trusted any more. */
static int map_error(struct store *s, order_ctx *ctx, const char *op, unsigned flags,
                     const PGresult *r, const struct waiter *w)
{
    order_error *e = ctx->err;
    const char *st = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    if (!st)
        st = "";
    char msg[512];
    snprintf(msg, sizeof msg, "%s", PQresultErrorMessage(r));
    trim(msg);

    if (sqlstate_is(st, "57014")) { /* query_canceled */
        if (w->cancelled || w->deadline_binds) {
            log_kv(LOG_INFO, "postgres statement cancelled at the deadline", LOG_F_STR, "op", op,
                   LOG_F_END);
            return order_fail(e, ORDER_EDEADLINE,
                              "deadline exceeded; the database work was rolled back");
        }
        log_kv(LOG_WARN, "postgres statement timeout", LOG_F_STR, "op", op, LOG_F_STR, "error", msg,
               LOG_F_END);
        return order_fail(e, ORDER_EUNAVAILABLE, "the database did not answer in time");
    }
    if ((flags & STORE_TX_BADID_NOTFOUND) && sqlstate_is(st, "22P02"))
        return order_fail(e, ORDER_ENOTFOUND, "not found (not a valid id)");

    bool conn_lost = PQstatus(s->conn) == CONNECTION_BAD || strncmp(st, "08", 2) == 0 ||
                     sqlstate_is(st, "57P01") || sqlstate_is(st, "57P02") ||
                     sqlstate_is(st, "57P03");
    /* A prepared statement gone stale (its table changed shape) or missing: start over on
     * a fresh connection, which prepares everything again. */
    bool stale = sqlstate_is(st, "0A000") || sqlstate_is(st, "26000");
    log_kv(conn_lost || stale ? LOG_WARN : LOG_ERROR, "postgres error", LOG_F_STR, "op", op,
           LOG_F_STR, "sqlstate", st, LOG_F_STR, "error", msg, LOG_F_END);
    if (conn_lost || stale) {
        drop_conn(s);
        return order_fail(e, ORDER_EUNAVAILABLE, "database unavailable");
    }
    if (strncmp(st, "53", 2) == 0 || sqlstate_is(st, "55P03"))
        return order_fail(e, ORDER_EUNAVAILABLE, "database unavailable (%s)", st);
    if (sqlstate_is(st, "40001") || sqlstate_is(st, "40P01") || sqlstate_is(st, "23505"))
        return order_fail(e, ORDER_EABORTED, "a concurrent change conflicted; retry");
    if (sqlstate_is(st, "23503"))
        return order_fail(e, ORDER_ENOTFOUND, "a referenced row does not exist");
    if (strncmp(st, "23", 2) == 0 || strncmp(st, "22", 2) == 0) {
        const char *cons = PQresultErrorField(r, PG_DIAG_CONSTRAINT_NAME);
        return order_fail(e, ORDER_EINVAL, "the database rejected the data (%s%s%s)", st,
                          cons ? ", " : "", cons ? cons : "");
    }
    return order_fail(e, ORDER_EINTERNAL, "database error (SQLSTATE %s)", st);
}

/* After a failed pipeline the transaction may still be open (in error): end it. */
static void rollback_if_open(struct store *s)
{
    if (!s->conn)
        return;
    PGTransactionStatusType ts = PQtransactionStatus(s->conn);
    if (ts != PQTRANS_INERROR && ts != PQTRANS_INTRANS)
        return;
    struct waiter w = {.limit = clock_mono_us() + ROLLBACK_BOUND_US};
    bool ok = PQsendQuery(s->conn, "ROLLBACK");
    PGresult *r;
    while (ok && (ok = get_result(s->conn, &w, &r)) && r) {
        if (PQresultStatus(r) != PGRES_COMMAND_OK)
            ok = false;
        PQclear(r);
    }
    if (!ok) {
        log_kv(LOG_WARN, "postgres rollback failed; dropping the connection", LOG_F_STR, "error",
               PQerrorMessage(s->conn), LOG_F_END);
        drop_conn(s);
    }
}

int store__tx(struct store *s, order_ctx *ctx, const char *op, unsigned flags,
              const struct store_step *steps, int n, PGresult **res)
{
    assert(s && ctx && ctx->err && n >= 1 && n <= STORE_MAX_STEPS);
    order_error *e = ctx->err;
    for (int i = 0; i < n; i++)
        res[i] = NULL;

    if (order_ctx_remaining_us(ctx) <= 0)
        return order_fail(e, ORDER_EDEADLINE, "deadline exceeded before the database was called");
    int rc = ensure_conn(s, ctx, op);
    if (rc != ORDER_OK)
        return rc;
    int64_t rem = order_ctx_remaining_us(ctx);
    if (rem <= 0)
        return order_fail(e, ORDER_EDEADLINE, "deadline exceeded before the database was called");

    /* statement_timeout = min(configured, time left), in whole ms, at least 1. */
    int64_t tmo = s->stmt_timeout_us > 0 ? s->stmt_timeout_us : INT64_MAX;
    struct waiter w = {.limit = INT64_MAX};
    if (rem < tmo) {
        tmo = rem;
        w.deadline_binds = true;
        w.limit = ctx->deadline_mono_us;
    } else if (tmo != INT64_MAX) {
        w.silence_us = tmo + SILENCE_GRACE_US;
        w.limit = clock_mono_us() + w.silence_us;
    }
    store_num tbuf;
    const char *tval =
        tmo == INT64_MAX ? "0" : store__num(&tbuf, tmo < 1000 ? 1 : (tmo + 999) / 1000);

    PGconn *c = s->conn;
    struct cmd cmds[3 + 2 * (STORE_MAX_STEPS + 3)];
    int ncmd = 0;
    bool ok = PQenterPipelineMode(c) && send_sql(s, &SQL_BEGIN, 0, NULL, cmds, &ncmd, -1) &&
              send_sql(s, &SQL_TIMEOUT, 1, &tval, cmds, &ncmd, -1);
    for (int i = 0; ok && i < n; i++)
        ok = send_sql(s, steps[i].sql, steps[i].nparams, steps[i].values, cmds, &ncmd, i);
    ok = ok && send_sql(s, &SQL_COMMIT, 0, NULL, cmds, &ncmd, -1) && PQpipelineSync(c);
    if (!ok) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", PQerrorMessage(c));
        trim(msg);
        log_kv(LOG_WARN, "postgres send failed; dropping the connection", LOG_F_STR, "op", op,
               LOG_F_STR, "error", msg, LOG_F_END);
        drop_conn(s);
        return order_fail(e, ORDER_EUNAVAILABLE, "database unavailable");
    }

    PGresult *errres = NULL, *r;
    for (int k = 0; k < ncmd; k++) {
        if (!get_result(c, &w, &r) || !r)
            goto lost;
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK) {
            if (cmds[k].kind == CMD_STEP)
                res[cmds[k].step] = r;
            else
                PQclear(r);
        } else {
            if (cmds[k].kind == CMD_PREPARE)
                unmark_prepared(s, cmds[k].sql);
            if (st != PGRES_PIPELINE_ABORTED && !errres)
                errres = r; /* the first error says why; the rest were skipped */
            else
                PQclear(r);
            if (PQstatus(c) == CONNECTION_BAD)
                goto lost;
        }
        if (!get_result(c, &w, &r)) /* the NULL that ends this command's results */
            goto lost;
        if (r) {
            PQclear(r);
            goto lost; /* more than one result for a statement: not ours to guess */
        }
    }
    if (!get_result(c, &w, &r) || !r || PQresultStatus(r) != PGRES_PIPELINE_SYNC) {
        PQclear(r);
        goto lost;
    }
    PQclear(r);
    if (!PQexitPipelineMode(c))
        goto lost;

    /* A cancel that did not visibly land (the work finished first) may still be on its
     * way and would hit this connection's next statement: start afresh instead. */
    const char *st = errres ? PQresultErrorField(errres, PG_DIAG_SQLSTATE) : NULL;
    bool stray_cancel = w.cancelled && !(st && strcmp(st, "57014") == 0);
    if (errres) {
        rc = map_error(s, ctx, op, flags, errres, &w);
        PQclear(errres);
        store__clear(res, n);
        rollback_if_open(s);
    } else {
        rc = ORDER_OK;
    }
    if (stray_cancel && s->conn)
        drop_conn(s);
    return rc;

lost : {
    /* The connection broke or the server stopped answering: the transaction's fate is the
     * server's (it rolls back an uncommitted transaction when the connection goes). */
    char msg[512];
    snprintf(msg, sizeof msg, "%s", errres ? PQresultErrorMessage(errres) : PQerrorMessage(c));
    trim(msg);
    PQclear(errres);
    store__clear(res, n);
    bool deadline = w.timed_out && w.deadline_binds;
    log_kv(LOG_WARN, "postgres connection lost; dropping it", LOG_F_STR, "op", op, LOG_F_STR,
           "error", w.timed_out ? "no answer in time" : msg, LOG_F_END);
    drop_conn(s);
    if (deadline)
        return order_fail(e, ORDER_EDEADLINE, "deadline exceeded waiting for the database");
    return order_fail(e, ORDER_EUNAVAILABLE, "database unavailable");
}
}

/* ---- ping and schema version ---- */

bool store_ping(struct store *s)
{
    static const struct store_sql q = {"orderd_ping", "SELECT 1"};
    order_error err = {0};
    order_ctx ctx = {.deadline_mono_us = clock_mono_us() + 2000000, .err = &err};
    struct store_step step = {&q, 0, NULL};
    PGresult *r;
    int rc = store__tx(s, &ctx, "ping", 0, &step, 1, &r);
    store__clear(&r, 1);
    return rc == ORDER_OK;
}

int store_schema_version(struct store *s)
{
    static const struct store_sql q = {NULL,
                                       "SELECT coalesce(max(version), 0) FROM schema_migrations"};
    order_error err = {0};
    order_ctx ctx = {.deadline_mono_us = clock_mono_us() + 5000000, .err = &err};
    struct store_step step = {&q, 0, NULL};
    PGresult *r;
    if (store__tx(s, &ctx, "schema_version", 0, &step, 1, &r) != ORDER_OK)
        return -1;
    int v = PQntuples(r) == 1 ? (int)store__int(r, 0, 0) : -1;
    store__clear(&r, 1);
    return v;
}
