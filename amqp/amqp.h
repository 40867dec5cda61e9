/* amqp.h — the RabbitMQ adapter (rabbitmq-c): the outbox relay and the consumer of the
 * inventory service's replies. Each runs on a thread of its own with its own broker and
 * PostgreSQL connections; server/ starts and stops them.
 *
 * See docs/events.md for the messages and the topology, ARCHITECTURE.md for the threads.
 */
#ifndef ORDERD_AMQP_AMQP_H
#define ORDERD_AMQP_AMQP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "orders/orders.h"

/** Broker and topology settings (borrowed: they must outlive the relay / consumer). */
typedef struct amqp_settings {
    const char *host; /* "127.0.0.1" */
    int port;
    const char *vhost;
    const char *user;
    const char *password; /* never logged */
    int heartbeat_s;      /* negotiated heartbeat; serviced even when idle */
    int64_t timeout_us;   /* connect, TLS handshake, login, every RPC, and a confirm wait */
    int64_t backoff_max_us;

    /* TLS (amqps). Zeroed settings mean plain TCP, and with tls a verified peer. */
    bool tls;
    const char *tls_ca_file;     /* PEM CA bundle; NULL or "" = the system's default store */
    const char *tls_cert_file;   /* client certificate chain (PEM), for brokers that ask; */
    const char *tls_key_file;    /* ...and its key (PEM, unencrypted): both or neither */
    bool tls_skip_verify;        /* development only: neither the chain nor the name checked */
    const char *tls_server_name; /* the name the certificate must carry; NULL or "" = host */

    const char *exchange;    /* durable topic exchange, declared at start */
    bool declare_queues;     /* false: the consuming side owns its queues */
    const char *stock_queue; /* bound to stock.* */
    const char *order_queue; /* bound to order.* */
    bool quorum_queues;      /* x-queue-type: quorum for the queues declared */
    const char *reply_queue; /* inventory replies, declared and bound by the consumer */
    const char *reply_keys;  /* comma-separated routing keys: "stock.reserved,stock.rejected" */
    const char *dead_letter_exchange; /* malformed replies go here (declared, fanout) */
    const char *dead_letter_queue;    /* bound to it */
    int prefetch;                     /* consumer basic.qos */
    int reply_max_attempts; /* a reply failing with a deadline or a lost race this many times
                               in a row is dead-lettered (0: 10); "unavailable" never is */

    int relay_batch;             /* rows claimed per round */
    int64_t relay_idle_poll_us;  /* longest sleep when nothing is due (NOTIFY wakes it) */
    int64_t relay_claim_us;      /* how long a claim holds rows */
    int64_t relay_retry_max_us;  /* cap of the per-row retry back-off */
    int64_t outbox_retention_us; /* published rows older than this are pruned */
    int64_t stats_interval_us;   /* backlog gauges refresh; logged while growing */
} amqp_settings;

/** Counters and gauges of the relay, for /metrics. */
typedef struct amqp_relay_stats {
    uint64_t published;  /* publishes acked by the broker (rows then marked sent) */
    uint64_t nacked;     /* basic.nack */
    uint64_t unroutable; /* basic.return (mandatory) */
    uint64_t timeouts;   /* no confirm in time */
    uint64_t reconnects;
    uint64_t pruned;
    int64_t backlog;              /* unsent rows, at the last refresh */
    int64_t oldest_unsent_age_us; /* 0 if none */
    bool connected;
} amqp_relay_stats;

typedef struct amqp_relay amqp_relay;

/**
 * Starts the relay thread: it declares the topology (idempotent), then claims unsent
 * outbox rows (storage/outbox.h), publishes them persistent and mandatory with publisher
 * confirms, and marks a row sent only after its basic.ack. Returns 0, or -1 with err.
 * The settings and DSN are copied where needed... (settings borrowed, see above).
 */
int amqp_relay_start(const amqp_settings *s, const char *pg_dsn, int64_t pg_statement_timeout_us,
                     amqp_relay **out, char *err, size_t errlen);
/** Stops and joins the relay (within about one timeout); frees it. NULL is a no-op. */
void amqp_relay_stop(amqp_relay *r);
void amqp_relay_stats_get(amqp_relay *r, amqp_relay_stats *out);

/** Applies one well-formed reply; returns an order_code. Runs on the consumer's thread.
 *  ORDER_OK, ORDER_EDUPLICATE, ORDER_ENOTFOUND, ORDER_EINVAL: acknowledged (the last two
 *  logged); ORDER_EUNAVAILABLE, ORDER_EDEADLINE, ORDER_EABORTED: requeued after a back-off. */
typedef int (*amqp_reply_fn)(void *arg, const order_stock_reply *r);

typedef struct amqp_consumer_stats {
    uint64_t applied, duplicates, dead_lettered, requeued, reconnects;
    bool connected;
} amqp_consumer_stats;

typedef struct amqp_consumer amqp_consumer;

/** Starts the consumer thread; fn(arg, reply) is called on that thread for each reply. */
int amqp_consumer_start(const amqp_settings *s, amqp_reply_fn fn, void *arg, amqp_consumer **out,
                        char *err, size_t errlen);
void amqp_consumer_stop(amqp_consumer *c);
void amqp_consumer_stats_get(amqp_consumer *c, amqp_consumer_stats *out);

#endif
