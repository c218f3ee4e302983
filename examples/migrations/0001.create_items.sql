-- The reference resource: items with a UUIDv7 key made by the database, newest first by key.
-- depends: 0001.uuidv7

CREATE TABLE items (
    id uuid PRIMARY KEY DEFAULT uuid_generate_v7(),
    name text NOT NULL CONSTRAINT items_name_key UNIQUE CHECK (char_length(name) BETWEEN 1 AND 200),
    tags text[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);
