/* internal.h — what the files of server/ share: workers, calls, replies, the method table.
 *
 * DESIGN (see ARCHITECTURE.md, Threads and connections)
 * N worker threads, each with its own completion queue, PostgreSQL connection and domain
 * service. A worker keeps exactly one grpc_server_request_call() outstanding and posts the
 * next one only when it is free again, so a call never waits behind another call while a
 * worker is idle: calls nobody can take yet wait in the gRPC core's pending queue. All
 * events of a call arrive on the CQ of the worker that accepted it, so a call is only ever
 * touched by one thread and needs no lock. Unary handlers run synchronously on the worker
 * (libpq is blocking); streams (health Watch, reflection) are driven by completion events.
 *
 * A call is reference counted: one reference for the code handling it, one per batch in
 * flight. It is freed when the count drops to zero.
 */
#ifndef ORDERD_SERVER_INTERNAL_H
#define ORDERD_SERVER_INTERNAL_H

#include <grpc/grpc.h>
#include <grpc/support/time.h>
#include <protobuf-c/protobuf-c.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#include "orders/orders.h"
#include "server/auth.h"
#include "server/config.h"

struct store;
struct cache;
typedef struct srv_limits srv_limits;
typedef struct srv_server srv_server;
typedef struct srv_worker srv_worker;
typedef struct srv_call srv_call;

/** What a unary handler answers: a status, and a message on success. */
typedef struct srv_reply {
    grpc_status_code code;
    char message[512];
    grpc_byte_buffer *body; /* the packed response; owned by the reply until sent */
    order_error *err;       /* domain error to turn into google.rpc.Status details, or NULL */
    const char *reason;     /* ErrorInfo reason when err is NULL, or NULL */
    int64_t retry_after_us; /* > 0: RetryInfo and QuotaFailure details (rate limits) */
    char quota_subject[ORDER_CUSTOMER_MAX + 16];
    char quota_description[160];
} srv_reply;

typedef enum srv_tag_kind {
    TAG_NEW_CALL, /* grpc_server_request_call completed */
    TAG_RECV,     /* RECV_MESSAGE completed */
    TAG_SEND,     /* a SEND_* batch completed */
    TAG_CLOSE,    /* RECV_CLOSE_ON_SERVER completed */
} srv_tag_kind;

typedef struct srv_tag {
    srv_call *call;
    srv_tag_kind kind;
} srv_tag;

typedef enum srv_method_kind { METHOD_UNARY, METHOD_SERVER_STREAM, METHOD_BIDI } srv_method_kind;

/** One row of the method table. */
typedef struct srv_method {
    const char *path; /* "/orders.v1.OrderService/PlaceOrder" */
    srv_method_kind kind;
    unsigned roles;         /* ORDER_ROLE_* bits allowed; 0 = no token needed */
    bool roles_from_config; /* reflection: roles come from auth.reflection_role */
    const char *rl_class;   /* rate-limit class ("read", "write", "admin"); NULL = never */
    /** Unary: handles a request and fills the reply. */
    void (*unary)(srv_call *c, const uint8_t *req, size_t len, srv_reply *r);
    /** Streams: called once the call is authenticated; drives itself from events. */
    void (*stream_start)(srv_call *c);
    /** Streams: a message arrived (NULL = the client half-closed). */
    void (*stream_recv)(srv_call *c, const uint8_t *msg, size_t len, bool half_closed);
    /** Streams: the previous send completed (ok = false: the call is dead). */
    void (*stream_sent)(srv_call *c, bool ok);
    /** Streams: periodic tick on the worker (health changes, shutdown). */
    void (*stream_tick)(srv_call *c);
} srv_method;

struct srv_call {
    srv_worker *w;
    const srv_method *method;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    int refs;
    bool cancelled;      /* RECV_CLOSE_ON_SERVER said so */
    int close_cancelled; /* RECV_CLOSE_ON_SERVER writes here */
    bool sent_initial_md;
    bool status_sent;
    bool send_in_flight;
    bool recv_in_flight;
    srv_tag tag_new, tag_recv, tag_send, tag_close;
    grpc_byte_buffer *recv_bb; /* RECV_MESSAGE target */
    grpc_byte_buffer *send_bb; /* SEND_MESSAGE in flight */
    grpc_slice status_slice;   /* SEND_STATUS details in flight */
    grpc_metadata trailing[1];
    size_t ntrailing;
    order_ctx ctx;
    order_error *err; /* heap; large */
    char request_id[65];
    char method_name[128];
    int64_t start_mono_us;
    grpc_status_code final_code;
    srv_call *next_stream, *prev_stream; /* worker's list of open streams */
    void *stream_state;                  /* owned by the stream's method */
    void (*stream_free)(void *);
};

/** What a thread needs to run the domain: its own PostgreSQL store, Redis cache (which may
 *  wrap the store), payment providers, and the service over them (background.c). */
typedef struct srv_deps {
    struct store *store;
    struct cache *cache;    /* NULL when neither the cache nor rate limits are on */
    order_store store_port; /* the PostgreSQL store; svc.store may wrap it */
    order_payments *pay[ORDER_PROVIDER_MAX + 1];
    order_service svc;
} srv_deps;

struct srv_worker {
    int index;
    srv_server *srv;
    grpc_completion_queue *cq;
    pthread_t thread;
    srv_deps d;
    struct cache *cache; /* = d.cache */
    srv_call *streams;   /* open streaming calls on this worker */
    int posted;          /* grpc_server_request_call()s outstanding */
};

struct amqp_relay;
struct amqp_consumer;
typedef struct srv_http srv_http;
typedef struct srv_bg srv_bg;
typedef struct srv_sweeper srv_sweeper;

struct srv_server {
    const srv_config *cfg;
    srv_http *http;                /* the side port; NULL if off */
    struct amqp_relay *relay;      /* relays[0]; NULL if amqp is off */
    struct amqp_relay *relays[16]; /* amqp.relays of them, sharing the outbox */
    int nrelays;
    struct amqp_consumer *consumer; /* NULL if off */
    srv_bg *consumer_bg;            /* the consumer thread's service */
    srv_sweeper *sweeper;           /* expiry and settlement; NULL if off */
    void *amqp_settings;            /* amqp_settings the relay and consumer borrow */
    char *amqp_password;            /* heap C string; wiped at stop */
    srv_auth *auth;
    srv_limits *limits;
    grpc_server *server;
    grpc_completion_queue *shutdown_cq;
    srv_worker *workers;
    int nworkers;
    atomic_bool draining;      /* a shutdown signal arrived: take what is queued */
    atomic_bool shutting_down; /* the core is shutting down: post no more requests */
    atomic_int health;         /* HealthCheckResponse.ServingStatus */
    pthread_t health_thread;
    atomic_bool health_stop;
};

/* background.c */
/** Opens *d for the calling thread (store, cache if cache or rate limits are on, providers,
 *  service). 0, or -1 with err (and *d closed). */
int srv_deps_open(srv_server *srv, srv_deps *d, char *err, size_t errlen);
void srv_deps_close(srv_deps *d);
/** Starts and stops the background threads: the outbox relay, the inventory-reply consumer
 *  and the sweeper (expiry, settlements), as configured. */
int srv_background_start(srv_server *srv, char *err, size_t errlen);
void srv_background_stop(srv_server *srv);

/* background.c: a domain service for a thread that is not a gRPC worker (the HTTP side
 * port's threads, the inventory-reply consumer, the sweeper). Each has its own PostgreSQL
 * store, Redis cache in front of it (if configured) and payment providers; it may be
 * opened on one thread and then used by exactly one thread at a time. */
srv_bg *srv_bg_open(srv_server *srv, const char *actor, char *err, size_t errlen);
void srv_bg_close(srv_bg *bg);
order_service *srv_bg_service(srv_bg *bg);
/** A context for background work: caller `actor` with service+admin roles, deadline
 *  timeout_us from now (0 = none), errors into *err (reset). */
order_ctx srv_bg_ctx(srv_bg *bg, order_error *err, int64_t timeout_us);
/** The provider instance for p (NULL if not configured); e.g. the PayPal one, for webhook
 *  verification. */
order_payments *srv_bg_provider(srv_bg *bg, order_provider p);

/* http.c: the HTTP side port (libmicrohttpd): POST /webhooks/stripe, POST /webhooks/paypal,
 * GET /metrics, GET /healthz. */
int srv_http_start(srv_server *srv, char *err, size_t errlen); /* sets srv->http */
void srv_http_stop(srv_server *srv);

/** The port the side port listens on (the actual one when http.listen asked for port 0);
 *  0 if it is off. */
unsigned srv__http_port(const srv_server *srv);

/* metrics.c: counters the access log and the side port feed, and the /metrics page. */
struct metrics_buf;
void srv_metrics_rpc(const char *method, grpc_status_code code, int64_t duration_us);
void srv__metrics_webhook(const char *provider, const char *result);
int srv__metrics_render(srv_server *srv, struct metrics_buf *b);

/* server.c: the method table, for metrics: its size and the path of row i (NULL past it). */
size_t srv_method_count(void);
const char *srv_method_path(size_t i);

/* server.c: call plumbing shared by the handlers */

/** Sends a unary reply (initial metadata, message if any, status) and releases the body. */
void srv_call_reply(srv_call *c, srv_reply *r);
/** Streams: sends one message (packed protobuf-c message); false if a send is in flight. */
bool srv_stream_send(srv_call *c, const ProtobufCMessage *msg);
/** Streams: posts a RECV_MESSAGE. */
bool srv_stream_recv(srv_call *c);
/** Streams: sends the final status (once). */
void srv_stream_finish(srv_call *c, grpc_status_code code, const char *message);
/** Packs a protobuf-c message into a fresh byte buffer (NULL on allocation failure). */
grpc_byte_buffer *srv_pack(const ProtobufCMessage *msg);
/** Fills r with an error status; a domain error adds google.rpc.Status details. */
void srv_reply_error(srv_reply *r, grpc_status_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/** Maps a domain error to the reply (status code, message, details). */
void srv_reply_domain(srv_reply *r, order_error *err);

/* ratelimit.c */
int srv_limits_create(const srv_config *cfg, srv_limits **out, char *err, size_t errlen);
void srv_limits_destroy(srv_limits *l);
void srv_limits_stats(const srv_limits *l, uint64_t *fallback_decisions, uint64_t *refused);
/** The rate-limit interceptor: true to go on; false with r set to RESOURCE_EXHAUSTED.
 *  prefetch_order_id: GetOrder's id, fetched from the cache in the same round trip. */
bool srv_ratelimit_check(srv_call *c, srv_reply *r, const char *prefetch_order_id);

/* rpc_orders.c: the cache's codec (orders as orders.v1.Order bytes) */
uint8_t *srv_order_encode(const order_t *o, size_t *len);
bool srv_order_decode(const uint8_t *bytes, size_t len, order_t *out);
/** GetOrder's order_id, for the prefetch; false if the request does not decode. */
bool srv_get_order_peek_id(const uint8_t *req, size_t len, char id[ORDER_ID_LEN + 1]);

/* status.c */
/** gRPC status for a domain code. */
grpc_status_code srv_status_for(int order_code);
/** Serialized google.rpc.Status for a failed reply; *len set. Caller frees. NULL if none. */
uint8_t *srv_status_details(grpc_status_code code, const char *message, const order_error *err,
                            const char *reason, size_t *len);
/** Serialized google.rpc.Status with RetryInfo and QuotaFailure (rate limits). */
uint8_t *srv_status_details_quota(const char *message, int64_t retry_after_us, const char *subject,
                                  const char *description, size_t *len);
/** Canonical name ("INVALID_ARGUMENT") of a gRPC status code. */
const char *srv_status_name(grpc_status_code code);

/* rpc_orders.c: orders.v1.OrderService */
void srv_rpc_place_order(srv_call *c, const uint8_t *req, size_t len, srv_reply *r);
void srv_rpc_get_order(srv_call *c, const uint8_t *req, size_t len, srv_reply *r);
void srv_rpc_list_orders(srv_call *c, const uint8_t *req, size_t len, srv_reply *r);
void srv_rpc_cancel_order(srv_call *c, const uint8_t *req, size_t len, srv_reply *r);
void srv_rpc_confirm_payment(srv_call *c, const uint8_t *req, size_t len, srv_reply *r);
void srv_rpc_update_order_status(srv_call *c, const uint8_t *req, size_t len, srv_reply *r);
void srv_rpc_upsert_product(srv_call *c, const uint8_t *req, size_t len, srv_reply *r);
void srv_rpc_get_product(srv_call *c, const uint8_t *req, size_t len, srv_reply *r);

/* health.c: grpc.health.v1.Health */
void srv_health_check(srv_call *c, const uint8_t *req, size_t len, srv_reply *r);
void srv_health_watch_start(srv_call *c);
void srv_health_watch_recv(srv_call *c, const uint8_t *msg, size_t len, bool half_closed);
void srv_health_watch_sent(srv_call *c, bool ok);
void srv_health_watch_tick(srv_call *c);
/** Starts the thread that probes PostgreSQL and sets srv->health. */
int srv_health_monitor_start(srv_server *srv);
void srv_health_monitor_stop(srv_server *srv);

/* reflection.c: grpc.reflection.v1 and v1alpha */
/** Indexes the embedded descriptor set; 0 or -1. */
int srv_reflection_init(char *err, size_t errlen);
void srv_reflection_dispose(void);
void srv_reflection_start(srv_call *c);
void srv_reflection_recv(srv_call *c, const uint8_t *msg, size_t len, bool half_closed);
void srv_reflection_sent(srv_call *c, bool ok);
void srv_reflection_tick(srv_call *c);

#endif
