-- 0003_outbox_autovacuum.sql — the outbox is a queue: rows come and go all day, and a
-- backlog is a small share of a week of sent rows. Autovacuum's defaults (a share of the
-- table) would analyze and vacuum it far too late for the relay's claim, whose plan needs
-- statistics that know how many rows are unsent. Fixed thresholds instead; the relay also
-- runs ANALYZE itself when the backlog it sees moves a lot (storage/outbox.h).
ALTER TABLE outbox SET (
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 2000,
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000
);
