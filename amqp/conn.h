/* conn.h — what relay.c and consumer.c share (internal to amqp/): one broker connection
 * owned by one thread, with bounded connect / login / RPCs, reconnection back-off with one
 * log line per outage, topology declarations that survive a queue declared elsewhere with
 * other arguments, bounded frame and content reads, and the thread's wake-up pipe.
 *
 * DESIGN
 * rabbitmq-c blocks inside its calls; every wait here is bounded: the socket open by the
 * timeout (amqp_socket_open_noblock), the login by amqp_set_handshake_timeout, every RPC by
 * amqp_set_rpc_timeout, frame reads by amqp_simple_wait_frame_noblock with a deadline, and
 * writes (amqp_basic_publish has no timeout of its own) by TCP_USER_TIMEOUT on the socket,
 * which makes the kernel fail a connection whose sent data stays unacknowledged. rabbitmq-c
 * sends heartbeats only from inside its calls, and notices a silent broker only while
 * blocked in one, so an idle owner must call mq__service() more often than heartbeat/2:
 * it sends a heartbeat when one is due and gives up on a broker silent for two heartbeat
 * intervals. Reading a message's content (after basic.deliver or basic.return) is done
 * frame by frame here rather than with amqp_read_message, which waits without a limit.
 *
 * TLS (settings.tls) swaps the TCP socket for rabbitmq-c's OpenSSL one and keeps every
 * bound above: rabbitmq-c 0.11 runs the TCP connect and the TLS handshake on a
 * non-blocking socket under poll() against one deadline (amqp_socket_open_noblock's
 * timeout), so a peer that takes the connection and never answers the ClientHello costs
 * one timeout; afterwards the socket stays non-blocking, TCP_USER_TIMEOUT is set on it as
 * on a plain one, and frame waits keep their deadlines. The peer is verified by OpenSSL
 * during the handshake (chain, then the server name or IP address), configured through
 * the socket's SSL_CTX: rabbitmq-c 0.11's own host-name check matches DNS names against
 * the host connected to only, so it could check neither an IP address nor
 * tls_server_name. The CA, certificate and key files are read again at every connection
 * attempt, so replaced files take effect at the next reconnection.
 */
#ifndef ORDERD_AMQP_CONN_H
#define ORDERD_AMQP_CONN_H

#include <amqp.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "amqp/amqp.h"

#define MQ_SHORTSTR_MAX 255

typedef struct mq_conn {
    const amqp_settings *s;     /* borrowed */
    const char *role;           /* "relay" or "consumer", in logs */
    amqp_connection_state_t st; /* NULL while disconnected */
    amqp_channel_t ch;          /* the open channel (a channel error moves to the next) */
    int64_t last_rx_us;         /* monotonic: when the broker was last heard from */

    /* reconnection */
    int64_t backoff_us;      /* 0 after a success */
    int64_t next_attempt_us; /* monotonic; no attempt before */
    bool outage;             /* an outage was logged and has not ended */
    int64_t outage_since_us; /* monotonic */
    uint64_t failures;       /* failed attempts in this outage */
    bool ever_up;            /* connected at least once (later successes are reconnects) */
    char error[256];         /* the last failure, for logs */

    /* waking the owner thread (stop) */
    int wake_rd, wake_wr;
    atomic_bool stop;
} mq_conn;

/** Initializes c (disconnected, due at once) with its wake-up pipe. -1 if the pipe fails. */
int mq__init(mq_conn *c, const amqp_settings *s, const char *role);
/** Drops the connection if any and closes the pipe. */
void mq__dispose(mq_conn *c);
/** Asks the owner to stop (thread-safe): sets the flag and wakes its poll. */
void mq__request_stop(mq_conn *c);
static inline bool mq__stopping(mq_conn *c)
{
    return atomic_load(&c->stop);
}
/** Empties the wake-up pipe after poll() found it readable. */
void mq__drain_wake(mq_conn *c);
/** Sleeps up to `us`, returning early on a stop request. Sends heartbeats meanwhile if
 *  connected (the broker's frames wait in the socket). */
void mq__sleep(mq_conn *c, int64_t us);

/**
 * Opens the socket (and the TLS session, with settings.tls), logs in and opens channel 1,
 * each step bounded by the timeout. 0 on success; -1 with c->error set (the connection is
 * dropped). TLS failures read "tls handshake with HOST:PORT failed: ..." with OpenSSL's
 * reason (a certificate verification failure names what failed and for which subject).
 */
int mq__connect(mq_conn *c);
/** The connection and its topology are ready: ends an outage (one info line), resets the
 *  back-off. Returns whether this was a reconnection. */
bool mq__up(mq_conn *c);
/**
 * A connect or setup attempt failed (`what` and c->error say why): drops the connection
 * and arms the back-off (100 ms doubling to backoff_max). The first failure of an outage
 * is logged at warn, later ones at debug only.
 */
void mq__failed(mq_conn *c, const char *what);
/** A working connection broke (`why`): logged at warn, dropped; the next attempt is due at
 *  once (a broker that stays away then starts an outage). */
void mq__lost(mq_conn *c, const char *why);
/** Whether it is time for a connection attempt. */
bool mq__due(const mq_conn *c, int64_t now_us);
/** Closes politely (channel.close, connection.close, each bounded by the RPC timeout). */
void mq__close(mq_conn *c);
/** Destroys the connection without any handshake. */
void mq__drop(mq_conn *c);

/**
 * Checks the reply of the RPC just made (amqp_get_rpc_reply). 0 if normal. On a channel
 * error, *code gets the reply code (e.g. 406 PRECONDITION_FAILED), the channel is closed
 * and the next one opened, and 1 is returned: the connection is still usable. -1 if the
 * connection is not (c->error says why; the caller calls mq__failed or mq__lost).
 */
int mq__rpc_check(mq_conn *c, const char *what, int *code);

/** Declares a durable exchange of `type`. 0, or -1 (connection unusable, or the exchange
 *  exists with another type: c->error). */
int mq__declare_exchange(mq_conn *c, const char *name, const char *type);
/**
 * Declares a durable queue (x-queue-type quorum if `quorum`, x-dead-letter-exchange `dlx`
 * if not NULL). A queue that already exists with other arguments is logged at error and
 * left as it is (0). -1 if the connection became unusable.
 */
int mq__declare_queue(mq_conn *c, const char *name, bool quorum, const char *dlx);
/** Binds queue to exchange under key. 0 or -1. */
int mq__bind(mq_conn *c, const char *queue, const char *exchange, const char *key);

/** Waits for the next frame until the monotonic deadline (a past one: only what is already
 *  there). Returns an AMQP_STATUS_* (AMQP_STATUS_TIMEOUT if none came). Heartbeat frames
 *  are consumed by rabbitmq-c and never returned. */
int mq__wait_frame(mq_conn *c, amqp_frame_t *f, int64_t deadline_us);

/**
 * For an idle owner: reads the frames that are already there without blocking (handing
 * each to `on_frame`, if not NULL, else ignoring it), sends a heartbeat when due, and checks
 * that the broker was heard from within two heartbeat intervals. 0, or -1 when the
 * connection is gone (mq__lost already called).
 */
int mq__service(mq_conn *c, void (*on_frame)(void *arg, const amqp_frame_t *f), void *arg);

/** A message's content: the properties orderd looks at, and the body. */
typedef struct mq_content {
    bool has_message_id;
    char message_id[MQ_SHORTSTR_MAX + 1];
    char type[MQ_SHORTSTR_MAX + 1];
    char content_type[MQ_SHORTSTR_MAX + 1];
    char *body;         /* heap, NUL-ended (also when the body holds NULs) */
    size_t len;         /* bytes kept (at most the cap passed to mq__read_content) */
    uint64_t body_size; /* as announced by the header frame */
} mq_content;

/**
 * Reads the header and body frames that follow a basic.deliver or basic.return on the
 * channel, until the deadline. Keeps at most body_cap bytes of the body (the rest is read
 * and discarded). 0, or -1 if the connection is unusable (c->error). Free with
 * mq__content_free.
 */
int mq__read_content(mq_conn *c, int64_t deadline_us, size_t body_cap, mq_content *out);
void mq__content_free(mq_content *m);

/** Copies an AMQP short string into dst (cap bytes), NUL-ended. */
void mq__bytes_str(char *dst, size_t cap, amqp_bytes_t b);
/** Answers a channel.close or connection.close frame the broker sent (close-ok), logs it at
 *  warn with its code and text, and drops the connection. */
void mq__on_close_frame(mq_conn *c, const amqp_frame_t *f);

/** min(a, b) for durations where <= 0 means "none". */
int64_t mq__min_pos(int64_t a, int64_t b);
/** How long an idle owner may sleep before mq__service() is due (heartbeat/2), or INT64_MAX
 *  without heartbeats. */
int64_t mq__service_interval(const mq_conn *c);

#endif
