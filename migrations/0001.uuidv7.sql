-- uuid_generate_v7(): RFC 9562 version-7 UUIDs, usable as time-ordered keys
-- (e.g. "id uuid PRIMARY KEY DEFAULT uuid_generate_v7()").
--
-- Layout (128 bits, big-endian):
--   48 bits  unix_ts_ms  Unix epoch milliseconds
--    4 bits  ver         0111 (7)
--   12 bits  rand_a      sub-millisecond fraction of clock_timestamp(),
--                        floor(us_in_ms * 4096 / 1000) (RFC 9562 6.2 method 3)
--    2 bits  var         10
--   62 bits  rand_b      random (taken from gen_random_uuid())
--
-- Why: v7 keys sort by creation time, so btree inserts stay append-mostly
-- (unlike random v4) while staying globally unique without coordination.
--
-- PostgreSQL 18+ has a native uuidv7() with the same layout (and also a
-- monotonic sub-ms fraction per backend), so we delegate to it there. Older
-- servers (13+, for core gen_random_uuid()) get a PL/pgSQL version using
-- core functions only. The choice is made when the migration runs, so this
-- file works on both. In the fallback, each call waits (at most one clock
-- tick, ~1 us) until clock_timestamp() moves on before returning; the next
-- call in the same session therefore sees a later microsecond and a larger
-- rand_a, so values made in sequence sort in generation order without
-- keeping session state (which is what keeps it PARALLEL SAFE). No ordering
-- is promised between concurrent sessions, nor if the system clock steps
-- backwards.
DO $migration$
BEGIN
    IF current_setting('server_version_num')::int >= 180000 THEN
        EXECUTE $ddl$
            CREATE OR REPLACE FUNCTION uuid_generate_v7() RETURNS uuid
            LANGUAGE sql VOLATILE PARALLEL SAFE
            AS $fn$ SELECT pg_catalog.uuidv7() $fn$
        $ddl$;
    ELSE
        EXECUTE $ddl$
            CREATE OR REPLACE FUNCTION uuid_generate_v7() RETURNS uuid
            LANGUAGE plpgsql VOLATILE PARALLEL SAFE
            AS $fn$
            DECLARE
                ts  timestamptz := pg_catalog.clock_timestamp();
                us  bigint;
                hex text;
            BEGIN
                -- microseconds since the epoch (exact: numeric on PG14+,
                -- correctly rounded from double precision on PG13)
                us := (extract(epoch FROM ts) * 1000000)::bigint;
                -- 32 hex digits of a v4 UUID: digits 17-32 carry the variant
                -- bits 10 followed by 62 random bits, which we keep as rand_b
                hex := pg_catalog.replace(pg_catalog.gen_random_uuid()::text, '-', '');
                -- do not return before the clock has ticked, so the next call
                -- gets a strictly later timestamp (stops on any change, so a
                -- backwards clock step cannot make it spin)
                LOOP
                    EXIT WHEN pg_catalog.clock_timestamp() <> ts;
                END LOOP;
                RETURN (
                    pg_catalog.lpad(pg_catalog.to_hex(us / 1000), 12, '0')
                    || '7'
                    || pg_catalog.lpad(pg_catalog.to_hex((us % 1000) * 4096 / 1000), 3, '0')
                    || pg_catalog.substr(hex, 17, 16)
                )::uuid;
            END
            $fn$
        $ddl$;
    END IF;

    COMMENT ON FUNCTION uuid_generate_v7() IS
        'RFC 9562 UUIDv7: 48-bit Unix ms, version 7, 12-bit sub-ms fraction, variant 10, 62 random bits';
END
$migration$;
