-- fixtures.sql — rows the pgbench scripts need, loaded by bench/run.sh into the bench
-- database after the migrations and after the products were upserted through the API.
--
-- get_order.sql reads orders whose ids it can compute without a round trip of its own:
-- md5('bench-' || n)::uuid for n in 1..:norders (psql -v norders=N). They are shaped like
-- the orders PlaceOrder writes: two lines (sku-a, sku-b, quantity 1, catalogue prices), tax
-- at 825 bp rounded half up, a pending LOCAL payment, one history row.
\set ON_ERROR_STOP on

BEGIN;
DELETE FROM orders WHERE id IN (SELECT md5('bench-' || n)::uuid FROM generate_series(1, :norders) n);

WITH p AS (
    SELECT sum(unit_price_minor) AS subtotal, min(currency) AS currency
    FROM products WHERE id IN ('sku-a', 'sku-b')
)
INSERT INTO orders (id, customer_id, status, currency, subtotal_minor, tax_minor, total_minor,
                    payment_provider, payment_reference, payment_status)
SELECT md5('bench-' || n)::uuid, 'bench-customer', 'pending', p.currency, p.subtotal,
       (p.subtotal * 825 + 5000) / 10000, p.subtotal + (p.subtotal * 825 + 5000) / 10000,
       'local', 'local_bench_' || n, 'pending'
FROM generate_series(1, :norders) n, p;

INSERT INTO order_items (order_id, line_no, product_id, name, quantity, unit_price_minor,
                         line_total_minor)
SELECT md5('bench-' || n)::uuid, l.line_no, pr.id, pr.name, 1, pr.unit_price_minor, pr.unit_price_minor
FROM generate_series(1, :norders) n,
     (VALUES (1, 'sku-a'), (2, 'sku-b')) AS l (line_no, product_id)
     JOIN products pr ON pr.id = l.product_id;

INSERT INTO order_history (order_id, from_status, to_status, actor, reason)
SELECT md5('bench-' || n)::uuid, NULL, 'pending', 'bench-customer', 'placed'
FROM generate_series(1, :norders) n;

INSERT INTO local_payments (reference, order_id, amount_minor, currency)
SELECT o.payment_reference, o.id, o.total_minor, o.currency
FROM orders o WHERE o.id IN (SELECT md5('bench-' || n)::uuid FROM generate_series(1, :norders) n);
COMMIT;

ANALYZE;
