-- 0001_init.sql — the first schema of orderd (PostgreSQL 15).
--
-- Applied by store_migrate() in one transaction. Names of statuses, providers and payment
-- statuses are the lower-case names of orders.h (order_status_name() and friends).
-- Text lengths are bounded in bytes (octet_length), matching the fixed-size fields of the
-- C structs they are read into. Timestamps are timestamptz set with clock_timestamp(), so
-- two rows written in one transaction still get distinct, increasing times.

-- The catalogue read-model: orders are priced from here, never from the caller.
CREATE TABLE products (
    id               text        PRIMARY KEY
                                 CHECK (octet_length(id) BETWEEN 1 AND 64),
    name             text        NOT NULL CHECK (octet_length(name) <= 200),
    unit_price_minor bigint      NOT NULL CHECK (unit_price_minor >= 0),
    currency         text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    active           boolean     NOT NULL DEFAULT true,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE orders (
    id                uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id       text        NOT NULL CHECK (octet_length(customer_id) BETWEEN 1 AND 128),
    status            text        NOT NULL CHECK (status IN ('pending', 'paid', 'shipped',
                                      'delivered', 'cancelled', 'expired', 'failed')),
    currency          text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    subtotal_minor    bigint      NOT NULL CHECK (subtotal_minor >= 0),
    tax_minor         bigint      NOT NULL CHECK (tax_minor >= 0),
    total_minor       bigint      NOT NULL CHECK (total_minor >= 0),
    -- NULL while the order has no payment yet (ORDER_PROVIDER/PAY_UNSPECIFIED).
    payment_provider  text        CHECK (payment_provider IN ('local', 'stripe', 'paypal')),
    payment_reference text        CHECK (octet_length(payment_reference) BETWEEN 1 AND 255),
    payment_status    text        CHECK (payment_status IN ('pending', 'succeeded', 'refunded',
                                      'voided', 'failed')),
    paid_at           timestamptz,
    cancel_reason     text        CHECK (octet_length(cancel_reason) <= 500),
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    version           bigint      NOT NULL DEFAULT 1 CHECK (version >= 1),
    CONSTRAINT orders_total_is_sum CHECK (total_minor = subtotal_minor + tax_minor)
);
-- Keyset pagination, newest first: (created_at, id) < (cursor) in this order.
CREATE INDEX orders_customer_page_idx ON orders (customer_id, created_at DESC, id DESC);
CREATE INDEX orders_page_idx ON orders (created_at DESC, id DESC);

-- An order keeps the names and prices it was placed at: no foreign key to products.
CREATE TABLE order_items (
    order_id         uuid   NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    line_no          int    NOT NULL CHECK (line_no BETWEEN 1 AND 100),
    product_id       text   NOT NULL CHECK (octet_length(product_id) BETWEEN 1 AND 64),
    name             text   NOT NULL CHECK (octet_length(name) <= 200),
    quantity         int    NOT NULL CHECK (quantity BETWEEN 1 AND 10000),
    unit_price_minor bigint NOT NULL CHECK (unit_price_minor >= 0),
    line_total_minor bigint NOT NULL CHECK (line_total_minor = unit_price_minor * quantity),
    PRIMARY KEY (order_id, line_no)
);

-- (caller, request_id) -> the order it produced. fingerprint is sha256 of the request's
-- canonical text (orders.h order_fingerprint); the same key with another fingerprint is
-- a reused key. The primary key is what makes racing duplicates safe: a second insert of
-- the same key waits for the first transaction and then conflicts.
CREATE TABLE idempotency_keys (
    caller      text        NOT NULL,
    request_id  text        NOT NULL CHECK (octet_length(request_id) BETWEEN 1 AND 128),
    fingerprint bytea       NOT NULL CHECK (octet_length(fingerprint) = 32),
    order_id    uuid        NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (caller, request_id)
);
CREATE INDEX idempotency_keys_order_idx ON idempotency_keys (order_id);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);

-- Every status change: who, when, from, to, why. from_status is NULL for the creation.
CREATE TABLE order_history (
    id          bigserial   PRIMARY KEY,
    order_id    uuid        NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    from_status text        CHECK (from_status IN ('pending', 'paid', 'shipped', 'delivered',
                                'cancelled', 'expired', 'failed')),
    to_status   text        NOT NULL CHECK (to_status IN ('pending', 'paid', 'shipped',
                                'delivered', 'cancelled', 'expired', 'failed')),
    actor       text        NOT NULL,
    reason      text        NOT NULL DEFAULT '',
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX order_history_order_idx ON order_history (order_id, id);

-- The LOCAL (development) payment provider keeps its payments here: one per order.
CREATE TABLE local_payments (
    reference    text        PRIMARY KEY CHECK (octet_length(reference) BETWEEN 1 AND 255),
    order_id     uuid        NOT NULL UNIQUE REFERENCES orders (id) ON DELETE CASCADE,
    amount_minor bigint      NOT NULL CHECK (amount_minor >= 0),
    currency     text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status       text        NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'succeeded', 'refunded', 'voided')),
    succeeded_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Events to publish (transactional outbox). id is the message_id consumers dedupe on;
-- seq orders the events of one order. Written and relayed by a later issue.
CREATE TABLE outbox (
    id             uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    seq            bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    aggregate_type text        NOT NULL DEFAULT 'order',
    order_id       uuid        NOT NULL,
    routing_key    text        NOT NULL,
    payload        jsonb       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at   timestamptz
);
CREATE INDEX outbox_unpublished_idx ON outbox (seq) WHERE published_at IS NULL;

-- Dedupe of inbound events (payment provider webhooks, inventory replies). Used later.
CREATE TABLE processed_provider_events (
    id          text        PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE processed_inventory_replies (
    id          text        PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
