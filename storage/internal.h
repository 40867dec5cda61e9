/* internal.h — what the files of storage/ share: the store handle, the transaction
 * runner and the helpers that read result rows. Nothing outside storage/ includes it. */
#ifndef ORDERD_STORAGE_INTERNAL_H
#define ORDERD_STORAGE_INTERNAL_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "orders/orders.h"
#include "storage/storage.h"

/* A statement text. With a name, it is prepared once per connection on first use (and
 * again after a reconnect); without one it is sent unnamed every time (dynamic SQL built
 * from fixed fragments only, never from input). */
struct store_sql {
    const char *name;
    const char *text;
};

/* One statement of a transaction: text and its parameters, all sent in text format. */
struct store_step {
    const struct store_sql *sql;
    int nparams;
    const char *const *values; /* NULL entries are SQL NULL */
};

#define STORE_MAX_STEPS    4
#define STORE_MAX_PREPARED 64

struct store {
    char *dsn;               /* owned; holds the password, if any: never logged */
    PGconn *conn;            /* NULL while disconnected */
    int64_t stmt_timeout_us; /* <= 0: none */
    int64_t next_attempt_us; /* monotonic; no connect attempt before this */
    int64_t backoff_us;      /* 0 after a success, then 500 ms doubling to 4 s */
    bool prepare;            /* use named prepared statements (default on) */
    size_t nprepared;        /* statements prepared on this connection */
    const struct store_sql *prepared[STORE_MAX_PREPARED];
};

/* Flags of store__tx. */
enum {
    /* SQLSTATE 22P02 (bad text for a uuid) means "no such row": ORDER_ENOTFOUND. */
    STORE_TX_BADID_NOTFOUND = 1u << 0,
};

/**
 * Runs steps[0..n) in one transaction, sent as one pipeline (one round trip).
 * On ORDER_OK, res[i] is step i's result (PGRES_TUPLES_OK or COMMAND_OK), to be freed with
 * store__clear. Otherwise the transaction is rolled back, every res[i] is NULL, ctx->err
 * describes the failure and its code is returned. `op` names the call in logs.
 */
int store__tx(struct store *s, order_ctx *ctx, const char *op, unsigned flags,
              const struct store_step *steps, int n, PGresult **res);

/** PQclear()s res[0..n) and sets them to NULL. */
void store__clear(PGresult **res, int n);

/** Connects with a bounded wait (absolute CLOCK_MONOTONIC µs). NULL and a message in err
 *  on failure; *timed_out tells whether the bound cut it short. */
PGconn *store__connect(const char *dsn, int64_t limit_mono_us, bool *timed_out, char *err,
                       size_t errlen);

/* ---- reading results (text format) ---- */

/** The value as int64; 0 for NULL or (with a logged error) for text that is not a number. */
int64_t store__int(const PGresult *r, int row, int col);
/** Copies the value into dst (truncating to cap-1 bytes); "" for NULL. */
void store__str(char *dst, size_t cap, const PGresult *r, int row, int col);

/* Column lists shared by the statements that read orders. */
#define STORE_US(col)   "(extract(epoch FROM " col ") * 1000000)::bigint"
#define STORE_TS(param) "(timestamptz 'epoch' + (" param ")::bigint * interval '1 microsecond')"

/* Decimal text of an int64, for a parameter. */
typedef struct store_num {
    char s[24];
} store_num;
const char *store__num(store_num *buf, int64_t v);

/* A growable text buffer for array literals ({"a","b"}) passed as parameters. */
typedef struct store_buf {
    char *p;
    size_t len, cap;
    bool oom;
} store_buf;
void store__buf_text_elem(store_buf *b, const char *s); /* appends a quoted element */
void store__buf_raw(store_buf *b, const char *s);
void store__buf_free(store_buf *b);

#endif
