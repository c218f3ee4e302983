DROP FUNCTION IF EXISTS uuid_generate_v7();
