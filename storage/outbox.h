/* outbox.h — the transactional outbox as the relay sees it: claiming the rows that are due,
 * recording what the broker said about them, the backlog gauges, pruning, and waking up on
 * the NOTIFY the orders trigger sends (storage/migrations/0002_payments_events.sql).
 *
 * DESIGN
 * The rows are written by a trigger on orders, in the transaction that changes the order;
 * this file only relays them. A claim is one UPDATE ... FROM (SELECT ... FOR UPDATE SKIP
 * LOCKED) that leases the rows for claim_us and counts the attempt: any number of relays
 * (one per replica) can claim at once without taking the same row twice. Only the head of
 * each (order, family) chain — the oldest unpublished event of that order whose routing key
 * starts with the same word ("stock", "order") — is ever eligible, so one order's events
 * reach the broker in order within a family even with many relays, and a family whose head
 * keeps failing never holds up the other family. A batch therefore holds at most one row
 * per chain; the next event of a chain becomes eligible once its head is marked sent.
 * A lease that runs out (a relay that died mid-batch) makes its rows claimable again.
 *
 * Like every store call, these run on the store's own connection, on its owner's thread.
 * The NOTIFY helpers use the same connection: LISTEN stays in force between transactions.
 */
#ifndef ORDERD_STORAGE_OUTBOX_H
#define ORDERD_STORAGE_OUTBOX_H

#include <stddef.h>
#include <stdint.h>

#include "orders/orders.h"
#include "storage/storage.h"

/** The channel the orders trigger notifies after writing events. */
#define STORE_OUTBOX_CHANNEL "orderd_outbox"
/** Routing keys are at most this long (an AMQP short string is 255 bytes). */
#define STORE_OUTBOX_KEY_MAX 255

/** One claimed row. */
typedef struct store_outbox_row {
    char id[ORDER_ID_LEN + 1]; /* the event id: AMQP message_id, body event_id */
    int64_t seq;               /* global order of the events */
    char order_id[ORDER_ID_LEN + 1];
    char routing_key[STORE_OUTBOX_KEY_MAX + 1];
    char *payload;        /* the complete JSON body (jsonb's text form), heap, NUL-ended */
    size_t payload_len;   /* without the NUL */
    int64_t created_at_s; /* Unix seconds (the AMQP timestamp property) */
    int attempts;         /* publish attempts so far, this one included */
} store_outbox_row;

/**
 * Claims up to `max` due rows — unpublished, past next_attempt_at, not leased by anyone,
 * and the head of their (order, family) chain — leasing them for claim_us and counting the
 * attempt, in one statement. *rows is a heap array of *n rows sorted by seq (NULL if none),
 * freed with store_outbox_rows_free. Returns ORDER_OK or a code (ctx->err).
 */
int store_outbox_claim(struct store *s, order_ctx *ctx, int max, int64_t claim_us,
                       store_outbox_row **rows, size_t *n);

/** Frees an array returned by store_outbox_claim. NULL is a no-op. */
void store_outbox_rows_free(store_outbox_row *rows, size_t n);

/** Marks the rows published now (and ends their lease). Rows already published stay as
 *  they are. */
int store_outbox_mark_sent(struct store *s, order_ctx *ctx, const char *const *ids, size_t n);

/**
 * Ends the lease of the rows without publishing them: next_attempt_at becomes now plus
 * min(retry_max_us, retry_base_us * 2^(attempts-1)) scaled by a random factor in [0.5, 1]
 * (so that relays retrying together spread out), and last_error is `error` (cut to 500
 * characters).
 */
int store_outbox_mark_failed(struct store *s, order_ctx *ctx, const char *const *ids, size_t n,
                             const char *error, int64_t retry_base_us, int64_t retry_max_us);

/** Deletes up to `limit` rows published more than older_than_us ago (oldest first, skipping
 *  rows another pruner holds). *deleted is how many went. */
int store_outbox_prune(struct store *s, order_ctx *ctx, int64_t older_than_us, int limit,
                       int64_t *deleted);

/** The unpublished rows: how many, and the age of the oldest (0 if none). */
int store_outbox_stats(struct store *s, order_ctx *ctx, int64_t *backlog, int64_t *oldest_age_us);

/**
 * ANALYZE outbox. The claim's plan is only fast when PostgreSQL's statistics know how many
 * rows are unsent (it probes each candidate's chain through outbox_chain_idx); statistics
 * taken while the outbox was empty or fully sent make it scan the backlog once per
 * candidate. Autovacuum's own analyze comes late for a queue table (a backlog is a small
 * share of a week of sent rows), so the relay calls this when the backlog it sees moves a
 * lot (bench/relay.sh measured 793 ms per claim at a 10 000-row backlog with stale
 * statistics, 5.7 ms with fresh ones).
 */
int store_outbox_analyze(struct store *s, order_ctx *ctx);

/**
 * Makes sure the store's current connection LISTENs on STORE_OUTBOX_CHANNEL. *tag remembers
 * the connection it was done on (start with 0): the statement is sent only after a
 * (re)connection. Connects first if needed (subject to the store's back-off).
 */
int store_outbox_listen(struct store *s, order_ctx *ctx, uint64_t *tag);

/** The socket of the store's connection, to poll for readability; -1 while disconnected. */
int store_outbox_listen_fd(const struct store *s);

/**
 * Reads what the server sent (without blocking) and discards the notifications received so
 * far, here or during earlier calls. Returns how many there were, or -1 if the connection
 * is broken or absent (the next store call reconnects; LISTEN again then).
 */
int store_outbox_notified(struct store *s);

#endif
