-- Demo catalogue for local development, loaded by scripts/run.sh after the migrations
-- (psql -f scripts/demo-products.sql). Idempotent: a product already there, perhaps
-- changed by hand or through UpsertProduct, is left as it is.
-- Prices are minor units of the currency: cents for EUR, yen for JPY (no minor unit).
-- An order holds one currency, so an order mixes EUR products or JPY products, not both.
INSERT INTO products (id, name, unit_price_minor, currency, active) VALUES
    ('sku-espresso',       'Espresso, 250 g beans',          350, 'EUR', true),
    ('sku-cappuccino',     'Cappuccino cup, porcelain',     1290, 'EUR', true),
    ('sku-moka-pot',       'Moka pot, 6 cups',              3499, 'EUR', true),
    ('sku-grinder',        'Hand grinder, ceramic burrs',   5900, 'EUR', true),
    ('sku-filter-papers',  'Filter papers, 100 pieces',      499, 'EUR', true),
    ('sku-descaler',       'Descaler (discontinued)',        899, 'EUR', false),
    ('sku-matcha',         'Matcha, ceremonial, 30 g',      2800, 'JPY', true),
    ('sku-chasen',         'Chasen bamboo whisk',           3300, 'JPY', true)
ON CONFLICT (id) DO NOTHING;
