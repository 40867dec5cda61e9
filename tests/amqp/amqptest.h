/* amqptest.h — what the amqp tests share: the broker named by ORDERD_TEST_AMQP_URL, names
 * of their own for exchanges and queues, settings for the relay and the consumer, and a
 * small raw rabbitmq-c client to declare, publish, consume and count behind their back. */
#ifndef ORDERD_TESTS_AMQP_AMQPTEST_H
#define ORDERD_TESTS_AMQP_AMQPTEST_H

#include <amqp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "amqp/amqp.h"

/**
 * Reads ORDERD_TEST_AMQP_URL (amqp://user:pass@host:port/vhost); prints why and returns -1
 * if it is unset or malformed: the tests must fail, not pass, without a broker.
 */
int amqpt_setup(const char *prog);

/** A unique name "t.<prog>.<pid>.<n>.<what>" (cap >= 96). */
void amqpt_name(char *buf, size_t cap, const char *what);

/** Settings for the test broker with test-friendly timings; the names are left NULL. */
void amqpt_settings(amqp_settings *s);

/** A port on 127.0.0.1 where nothing listens (bound, then closed). */
int amqpt_closed_port(void);

/* ---- the raw client (fails the test on any error) ---- */

/** Connects and opens channel 1. */
amqp_connection_state_t amqpt_connect(void);
void amqpt_close(amqp_connection_state_t c);
void amqpt_exchange(amqp_connection_state_t c, const char *name, const char *type);
/** A durable queue, classic unless `quorum`, with an optional dead-letter exchange. */
void amqpt_queue(amqp_connection_state_t c, const char *name, bool quorum, const char *dlx);
/** Declares like amqpt_queue but returns the broker's answer: 0 if accepted, else the
 *  channel error's reply code (406 PRECONDITION_FAILED: it exists with other arguments). */
int amqpt_queue_try(amqp_connection_state_t c, const char *name, bool quorum, const char *dlx);
void amqpt_bind(amqp_connection_state_t c, const char *q, const char *ex, const char *key);
/** Deletes (ignoring "not found"); reopens the channel if the broker closed it. */
void amqpt_delete_queue(amqp_connection_state_t c, const char *q);
void amqpt_delete_exchange(amqp_connection_state_t c, const char *ex);
/** Ready messages in the queue (passive declare); -1 if there is no such queue. */
int64_t amqpt_count(amqp_connection_state_t c, const char *q);
/** Publishes body (NUL-ended) persistent; message_id NULL = no message_id property. */
void amqpt_publish(amqp_connection_state_t c, const char *ex, const char *key,
                   const char *message_id, const char *body);
/** Starts consuming q with automatic acknowledgement. */
void amqpt_consume(amqp_connection_state_t c, const char *q);

typedef struct amqpt_msg {
    char routing_key[256];
    char exchange[256];
    char message_id[256];
    bool has_message_id;
    char type[256];
    char content_type[256];
    char app_id[64];
    int delivery_mode;
    bool has_timestamp;
    uint64_t timestamp;
    char header_order_id[64];
    char *body; /* heap, NUL-ended */
    size_t len;
} amqpt_msg;

/** The next delivery of any consumer of c, within timeout_us; false if none came. */
bool amqpt_next(amqp_connection_state_t c, amqpt_msg *m, int64_t timeout_us);
void amqpt_msg_free(amqpt_msg *m);

/* ---- a TCP proxy that can go silent ---- */

/** Forwards connections on a port of 127.0.0.1 to host:port, on a thread of its own. */
typedef struct amqpt_proxy amqpt_proxy;
amqpt_proxy *amqpt_proxy_start(const char *host, int port);
int amqpt_proxy_port(const amqpt_proxy *p);
/** Frozen: connections are still accepted and kept open, but no byte moves either way (a
 *  peer that hangs without closing anything). Thawing closes the connections that were
 *  frozen (as after a network partition); new ones work again. */
void amqpt_proxy_freeze(amqpt_proxy *p, bool frozen);
/** Connections accepted so far. */
int amqpt_proxy_accepted(amqpt_proxy *p);
void amqpt_proxy_stop(amqpt_proxy *p);

/** Polls cond(arg) every 20 ms for up to timeout_us; returns its last value. */
bool amqpt_wait(bool (*cond)(void *arg), void *arg, int64_t timeout_us);

#endif
