-- 0002_payments_events.sql — what real payments and the event stream need.
--
-- Orders learn the provider's charge (or capture) id, receipt and refund, and the time the
-- inventory service said their stock was reserved. The outbox learns how to be relayed
-- (attempts, back-off, a claim lease) and is now written: by a trigger on orders, in the
-- same transaction as every insert and status change, so no code path can change an order
-- without its events (docs/events.md lists them).

ALTER TABLE orders
    ADD COLUMN payment_charge_id text CHECK (octet_length(payment_charge_id) BETWEEN 1 AND 255),
    ADD COLUMN receipt_url       text CHECK (octet_length(receipt_url) BETWEEN 1 AND 511),
    ADD COLUMN refund_id         text CHECK (octet_length(refund_id) BETWEEN 1 AND 255),
    ADD COLUMN refunded_at       timestamptz,
    ADD COLUMN stock_reserved_at timestamptz;
-- Webhooks find their order by the provider's reference or charge / capture id.
CREATE INDEX orders_payment_ref_idx ON orders (payment_reference)
    WHERE payment_reference IS NOT NULL;
CREATE INDEX orders_payment_charge_idx ON orders (payment_charge_id)
    WHERE payment_charge_id IS NOT NULL;
-- The expiry sweeper and the settlement of payments left unsettled.
CREATE INDEX orders_pending_age_idx ON orders (created_at) WHERE status = 'pending';
CREATE INDEX orders_unsettled_idx ON orders (updated_at)
    WHERE status IN ('cancelled', 'expired', 'failed')
      AND payment_status IN ('pending', 'succeeded');

-- The relay publishes, per order and per family (the routing key's first word: "stock",
-- "order"), only the oldest unpublished event: so the events of one order reach the broker
-- in order within each family, and a family the broker refuses never holds up the other.
-- A row is claimed for a while (claimed_until) by one relay; failures push next_attempt_at.
ALTER TABLE outbox
    ADD COLUMN family          text GENERATED ALWAYS AS (split_part(routing_key, '.', 1)) STORED,
    ADD COLUMN attempts        int         NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT '-infinity',
    ADD COLUMN claimed_until   timestamptz,
    ADD COLUMN last_error      text;
CREATE INDEX outbox_chain_idx ON outbox (order_id, family, seq) WHERE published_at IS NULL;
CREATE INDEX outbox_published_idx ON outbox (published_at) WHERE published_at IS NOT NULL;

-- One event of order `o` under routing key `rk`. The body is complete here (the relay
-- sends it as it is): event_id is the row's id and the AMQP message_id.
CREATE FUNCTION orderd_outbox_emit(o orders, rk text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    eid uuid := gen_random_uuid();
    at timestamptz := clock_timestamp();
    body jsonb;
BEGIN
    body := jsonb_build_object(
        'event_id', eid,
        'type', rk,
        'schema_version', 1,
        'occurred_at', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'order_id', o.id,
        'customer_id', o.customer_id);
    IF split_part(rk, '.', 1) = 'stock' THEN
        body := body || jsonb_build_object('lines', coalesce((
            SELECT jsonb_agg(jsonb_build_object('product_id', i.product_id,
                                                'quantity', i.quantity) ORDER BY i.line_no)
            FROM order_items i WHERE i.order_id = o.id), '[]'::jsonb));
    ELSE
        body := body || jsonb_build_object(
            'status', o.status,
            'currency', o.currency,
            'subtotal_minor', o.subtotal_minor,
            'tax_minor', o.tax_minor,
            'total_minor', o.total_minor,
            'version', o.version);
        IF o.status IN ('cancelled', 'expired', 'failed') AND o.cancel_reason IS NOT NULL THEN
            body := body || jsonb_build_object('reason', o.cancel_reason);
        END IF;
    END IF;
    INSERT INTO outbox (id, order_id, routing_key, payload, created_at)
    VALUES (eid, o.id, rk, body, at);
END $$;

-- The events of an order's creation and of each status change.
CREATE FUNCTION orderd_orders_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM orderd_outbox_emit(NEW, 'stock.reserve');
        PERFORM orderd_outbox_emit(NEW, 'order.placed');
    ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
        IF NEW.status = 'paid' THEN
            PERFORM orderd_outbox_emit(NEW, 'stock.commit');
        ELSIF NEW.status IN ('cancelled', 'expired', 'failed') THEN
            PERFORM orderd_outbox_emit(NEW, 'stock.restore');
        END IF;
        PERFORM orderd_outbox_emit(NEW, 'order.' || NEW.status);
    ELSE
        RETURN NULL;
    END IF;
    PERFORM pg_notify('orderd_outbox', '');
    RETURN NULL;
END $$;

-- AFTER ... FOR EACH ROW triggers run at the end of the statement, so the insert's items
-- (written by the same statement) are there to list.
CREATE TRIGGER orders_events AFTER INSERT OR UPDATE OF status ON orders
    FOR EACH ROW EXECUTE FUNCTION orderd_orders_events();
