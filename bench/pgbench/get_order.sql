-- get_order.sql — what one GetOrder sends to PostgreSQL, for pgbench -M prepared.
--
-- Mirrors storage/orders_repo.c order_get (keep in sync): one transaction, one pipeline =
-- one round trip, as store__tx (storage/store.c) sends it: BEGIN, the statement timeout,
-- SQL_ORDER_GET, SQL_ITEMS_GET, COMMIT, Sync.
-- The orders read are the fixtures of bench/pgbench/fixtures.sql: ids md5('bench-' || n)
-- for n in 1..:norders (pgbench -D norders=N), two items each. The id is computed in the
-- statement (orderd passes it as a parameter): one md5 per statement.
\set n random(1, :norders)

\startpipeline
BEGIN;
SELECT set_config('statement_timeout', '5000', true);
SELECT o.id, o.customer_id, o.status, o.currency, o.subtotal_minor, o.tax_minor, o.total_minor, o.payment_provider, o.payment_reference, o.payment_status, (extract(epoch FROM o.paid_at) * 1000000)::bigint, o.cancel_reason, (extract(epoch FROM o.created_at) * 1000000)::bigint, (extract(epoch FROM o.updated_at) * 1000000)::bigint, o.version FROM orders o WHERE o.id = md5('bench-' || :n)::uuid;
SELECT i.product_id, i.name, i.quantity, i.unit_price_minor, i.line_total_minor FROM order_items i WHERE i.order_id = md5('bench-' || :n)::uuid ORDER BY i.line_no;
COMMIT;
\endpipeline
