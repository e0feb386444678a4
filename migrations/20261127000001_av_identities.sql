-- The identities of one tenant database, as AuthVital documents them, plus avsync's bookkeeping.
-- No UNIQUE constraint but the primary key: a reused or swapped email must never make an event fail.
CREATE TABLE IF NOT EXISTS av_identities (
    id                text PRIMARY KEY,
    email             text,
    given_name        text,
    family_name       text,
    subject_type      text,
    tenant_id         text,
    membership_id     text,
    membership_status text CHECK (membership_status IN ('active', 'suspended', 'left')),
    tenant_roles      text[] NOT NULL DEFAULT '{}',
    app_role          text,
    app_role_id       text,
    app_role_name     text,
    has_app_access    boolean NOT NULL DEFAULT false,
    is_active         boolean NOT NULL DEFAULT true,
    deleted_at        timestamptz,
    username          text,
    display_name      text,
    middle_name       text,
    nickname          text,
    picture_url       text,
    website           text,
    gender            text,
    birthdate         text,
    zoneinfo          text,
    locale            text,
    phone             text,
    email_verified    boolean NOT NULL DEFAULT false,
    phone_verified    boolean NOT NULL DEFAULT false,
    groups            text[] NOT NULL DEFAULT '{}',
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    synced_at         timestamptz NOT NULL DEFAULT now(),
    -- For each field an event has set: "<UTC time, fixed width, microseconds>|<event id>" of the
    -- greatest event that set it. Compared with COLLATE "C", this text sorts in event order, so an
    -- event overwrites a field only when it is newer than the event that last set that field.
    field_versions    jsonb NOT NULL DEFAULT '{}'
);

CREATE INDEX IF NOT EXISTS av_identities_tenant_id_idx ON av_identities (tenant_id);
