-- Drops every table and view of ProxyPal's ledger in the current schema,
-- whatever its schema version (in version 3 `proxypal_ledger` is a view,
-- before it a table): benches/ledger.sh, benches/profile.sh and
-- crates/ledger/examples/write_cost.rs start from an empty ledger.
SET client_min_messages = warning;
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT c.relname, c.relkind FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = current_schema() AND c.relname LIKE 'proxypal\_ledger%' AND c.relkind IN ('r', 'v')
    LOOP
        -- CASCADE may already have taken a view: IF EXISTS.
        EXECUTE format('DROP %s IF EXISTS %I CASCADE', CASE r.relkind WHEN 'v' THEN 'VIEW' ELSE 'TABLE' END, r.relname);
    END LOOP;
END $$;
