/* storage.h — the PostgreSQL adapter: one connection per owning thread, the embedded
 * schema migrations, the domain's order_store port, and the ledger of the LOCAL payment
 * provider.
 *
 * DESIGN
 * A `struct store` is one libpq connection owned by one thread (a worker, the relay, a
 * test); nothing in it is locked. It is opened even when PostgreSQL is down and connects
 * lazily: a call made while disconnected tries to connect (at most one attempt per back-off
 * period, 500 ms growing to 4 s) and otherwise fails at once with ORDER_EUNAVAILABLE. A
 * connection found broken mid-call is dropped; that call gets ORDER_EUNAVAILABLE and the
 * next call reconnects.
 *
 * Every call is one or a few transactions, each sent as one pipeline (BEGIN, the
 * statement timeout, the statements, COMMIT) so that it costs one round trip. Each
 * transaction's statement_timeout is min(the configured timeout, the time left before the
 * context's deadline); the deadline is also watched on the client side, which cancels the
 * statement when it passes and gives up on a server that does not answer at all.
 * A call that fails rolls its transaction back: nothing half-written remains.
 *
 * libpq's types never leave storage/; callers hold `struct store *` only.
 */
#ifndef ORDERD_STORAGE_STORAGE_H
#define ORDERD_STORAGE_STORAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "orders/orders.h"

struct store;

/**
 * Opens a store on `dsn` (a libpq connection string or URI). Tries to connect once (for at
 * most a few seconds); if PostgreSQL is unreachable the store is returned anyway,
 * disconnected, and reconnects on a later call. statement_timeout_us bounds every
 * statement (<= 0: no bound beyond the call's deadline).
 * Returns NULL, with a message in err, only on bad DSN syntax or allocation failure.
 * The store belongs to the calling thread; free it with store_close().
 */
struct store *store_open(const char *dsn, int64_t statement_timeout_us, char *err, size_t errlen);

/** Closes the connection and frees the store. NULL is a no-op. */
void store_close(struct store *s);

/** Runs `SELECT 1`, connecting first if needed (subject to the back-off). For health checks. */
bool store_ping(struct store *s);

/**
 * Applies the embedded migrations (storage/migrations/NNNN_name.sql) that `dsn`'s database
 * has not applied yet, each in its own transaction, in version order. Concurrent
 * migrators (replicas starting together) are serialized by an advisory lock; running it
 * again applies nothing. Opens and closes its own connection.
 * Returns 0, or -1 with a message in err.
 */
int store_migrate(const char *dsn, char *err, size_t errlen);

/** The highest applied migration version, 0 if none, -1 if it cannot be read. */
int store_schema_version(struct store *s);

/**
 * Fills `out` with the order_store port (orders.h) implemented on this store's connection.
 * The port borrows the store: it is valid until store_close(s), on s's thread only.
 */
void store_order_port(struct store *s, order_store *out);

/* ---- the LOCAL payment provider's ledger (used by payments/local.c) ---- */

/** One row of the ledger. status is PENDING, SUCCEEDED, REFUNDED or VOIDED. */
typedef struct store_local_payment {
    char reference[ORDER_REFERENCE_MAX + 1];
    char order_id[ORDER_ID_LEN + 1];
    int64_t amount_minor;
    char currency[4];
    order_pay_status status;
    int64_t succeeded_at_us; /* Unix microseconds when it succeeded; 0 if it never did */
    int64_t created_at_us;
    int64_t updated_at_us;
} store_local_payment;

/**
 * Inserts a PENDING payment for the order under `reference`, or, if the order already has
 * one, leaves it alone. Either way *out is the order's payment (so its reference may differ
 * from the one given). Writes ctx->err and returns its code on failure.
 */
int store_local_payment_create(struct store *s, order_ctx *ctx, const char *order_id,
                               const char *reference, int64_t amount_minor, const char *currency,
                               store_local_payment *out);

/**
 * Reads a payment by its reference, or (reference NULL) by its order id.
 * ORDER_ENOTFOUND if there is none.
 */
int store_local_payment_get(struct store *s, order_ctx *ctx, const char *reference,
                            const char *order_id, store_local_payment *out);

/**
 * Moves the payment `reference` to `to` if its status is in from_set (a set of
 * (1u << order_pay_status) bits), with one conditional UPDATE. On success *out is the new
 * row (succeeded_at is set when `to` is SUCCEEDED). If the payment exists in another
 * status: ORDER_EPRECONDITION and *out is the current row. ORDER_ENOTFOUND if absent.
 */
int store_local_payment_set_status(struct store *s, order_ctx *ctx, const char *reference,
                                   unsigned from_set, order_pay_status to,
                                   store_local_payment *out);

#endif
