-- place_order.sql — what one PlaceOrder sends to PostgreSQL, for pgbench -M prepared.
--
-- Mirrors storage/ (keep in sync): four transactions, each one pipeline = one round trip,
-- as store__tx (storage/store.c) sends them: BEGIN, the statement timeout, the statements,
-- COMMIT, Sync.
--   1. products_get           (storage/orders_repo.c SQL_PRODUCTS_GET)
--   2. order_insert           (SQL_ORDER_INSERT: idempotency key, order, items, history in
--                              one statement of data-modifying CTEs)
--   3. local_payment_create   (storage/local_payments.c SQL_LP_INSERT + SQL_LP_BY_ORDER)
--   4. order_set_payment      (SQL_ORDER_SET_PAYMENT + SQL_ORDER_GET + SQL_ITEMS_GET)
-- The order: customer bench-customer, sku-a x1 + sku-b x1 at the prices bench/run.sh
-- seeds (1299 + 1399 = 2698 USD minor units, tax 825 bp half up = 223, total 2921), LOCAL.
--
-- The one deliberate difference: orderd's order_insert takes the order id from
-- gen_random_uuid() and passes it on from the result; pgbench cannot carry a value from
-- one pipeline to the next (\gset is not allowed in pipeline mode), so the id here is
-- md5('pgb-' || :r)::uuid, computed again in each statement from the random :r that is
-- also the request_id. One md5 per statement is noise next to a statement.
\set r random(1, 1000000000000000000)

-- 1. products_get: the catalogue prices of the lines.
\startpipeline
BEGIN;
SELECT set_config('statement_timeout', '5000', true);
SELECT id, name, unit_price_minor, currency, active FROM products WHERE id = ANY('{"sku-a","sku-b"}'::text[]);
COMMIT;
\endpipeline

-- 2. order_insert: $1 caller, $2 request_id, $3 fingerprint text, $4 customer, $5 currency,
--    $6 subtotal, $7 tax, $8 total, $9 provider, $10 reference, $11 payment status,
--    $12..$16 the items as parallel arrays.
\startpipeline
BEGIN;
SELECT set_config('statement_timeout', '5000', true);
WITH k AS (
  INSERT INTO idempotency_keys (caller, request_id, fingerprint, order_id)
  VALUES ('bench-customer', :r, sha256(convert_to('v1|bench-customer|1|sku-a:1;sku-b:1;', 'UTF8')), md5('pgb-' || :r)::uuid)
  ON CONFLICT (caller, request_id) DO NOTHING
  RETURNING order_id, created_at),
 o AS (
  INSERT INTO orders (id, customer_id, status, currency, subtotal_minor, tax_minor,
   total_minor, payment_provider, payment_reference, payment_status, created_at,
   updated_at, version)
  SELECT k.order_id, 'bench-customer', 'pending', 'USD', '2698'::bigint, '223'::bigint, '2921'::bigint, 'local', NULL, NULL,
   k.created_at, k.created_at, 1 FROM k
  RETURNING id, created_at, updated_at, version),
 i AS (
  INSERT INTO order_items (order_id, line_no, product_id, name, quantity,
   unit_price_minor, line_total_minor)
  SELECT o.id, u.line_no, u.product_id, u.name, u.quantity, u.unit_price, u.line_total
  FROM o, unnest('{"sku-a","sku-b"}'::text[], '{"Bench product sku-a","Bench product sku-b"}'::text[], '{1,1}'::int[], '{1299,1399}'::bigint[], '{1299,1399}'::bigint[])
   WITH ORDINALITY AS u(product_id, name, quantity, unit_price, line_total, line_no)),
 h AS (
  INSERT INTO order_history (order_id, from_status, to_status, actor, reason, at)
  SELECT o.id, NULL, 'pending', 'bench-customer', 'placed', o.created_at FROM o)
 SELECT o.id, (extract(epoch FROM o.created_at) * 1000000)::bigint, (extract(epoch FROM o.updated_at) * 1000000)::bigint, o.version FROM o;
COMMIT;
\endpipeline

-- 3. local_payment_create: the LOCAL provider's payment row, then read back.
\startpipeline
BEGIN;
SELECT set_config('statement_timeout', '5000', true);
INSERT INTO local_payments (reference, order_id, amount_minor, currency)
 VALUES ('lp_' || :r, md5('pgb-' || :r)::uuid, '2921'::bigint, 'USD') ON CONFLICT DO NOTHING;
SELECT p.reference, p.order_id, p.amount_minor, p.currency, p.status, (extract(epoch FROM p.succeeded_at) * 1000000)::bigint, (extract(epoch FROM p.created_at) * 1000000)::bigint, (extract(epoch FROM p.updated_at) * 1000000)::bigint FROM local_payments p WHERE p.order_id = md5('pgb-' || :r)::uuid;
COMMIT;
\endpipeline

-- 4. order_set_payment: the payment's reference onto the order, then the order read back.
\startpipeline
BEGIN;
SELECT set_config('statement_timeout', '5000', true);
UPDATE orders SET payment_provider = 'local', payment_reference = 'lp_' || :r, payment_status = 'pending',
 version = version + 1, updated_at = clock_timestamp() WHERE id = md5('pgb-' || :r)::uuid;
SELECT o.id, o.customer_id, o.status, o.currency, o.subtotal_minor, o.tax_minor, o.total_minor, o.payment_provider, o.payment_reference, o.payment_status, (extract(epoch FROM o.paid_at) * 1000000)::bigint, o.cancel_reason, (extract(epoch FROM o.created_at) * 1000000)::bigint, (extract(epoch FROM o.updated_at) * 1000000)::bigint, o.version FROM orders o WHERE o.id = md5('pgb-' || :r)::uuid;
SELECT i.product_id, i.name, i.quantity, i.unit_price_minor, i.line_total_minor FROM order_items i WHERE i.order_id = md5('pgb-' || :r)::uuid ORDER BY i.line_no;
COMMIT;
\endpipeline
