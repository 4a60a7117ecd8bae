-- rehydrate's own schema: the event store and the control tables. Idempotent: run on every start.
-- {schema} is replaced by the configured, validated and quoted schema name.

CREATE SCHEMA IF NOT EXISTS {schema};

-- The event store. tx_id is the appending transaction's id: readers take only events whose transaction
-- is older than the oldest one still running (the high-water mark), so an event that commits late is
-- never skipped. global_position orders events; within a stream it is also version order, because a
-- version can only be appended once the one before it has committed.
CREATE TABLE IF NOT EXISTS {schema}.events (
    global_position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx_id           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    stream_id       text        NOT NULL,
    stream_version  bigint      NOT NULL CHECK (stream_version >= 1),
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL DEFAULT 1 CHECK (schema_version >= 1),
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{{}}',
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version)
);
CREATE INDEX IF NOT EXISTS events_tx_position_idx ON {schema}.events (tx_id, global_position);
CREATE INDEX IF NOT EXISTS events_type_position_idx ON {schema}.events (event_type, global_position);

-- One row per projection that has been built at least once. The checkpoint of its read model is the active
-- generation's (generations.checkpoint_xmin): the tail moves it forward.
CREATE TABLE IF NOT EXISTS {schema}.projections (
    name              text PRIMARY KEY,
    active_generation integer,
    version           integer,
    fingerprint       text,
    tail_enabled      boolean NOT NULL DEFAULT true,
    tail_error        text,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
-- Databases created before the tail existed.
ALTER TABLE {schema}.projections ADD COLUMN IF NOT EXISTS tail_enabled boolean NOT NULL DEFAULT true;
ALTER TABLE {schema}.projections ADD COLUMN IF NOT EXISTS tail_error text;
-- The fingerprint of the code the tail applies new events with (it may differ from the active generation's: STALE).
ALTER TABLE {schema}.projections ADD COLUMN IF NOT EXISTS tail_fingerprint text;

-- One physical build of a projection's table.
CREATE TABLE IF NOT EXISTS {schema}.generations (
    projection      text    NOT NULL,
    generation      integer NOT NULL,
    version         integer NOT NULL,
    fingerprint     text    NOT NULL,
    -- 'sandbox': a finished build in a sandbox schema, never swapped in.
    state           text    NOT NULL CONSTRAINT generations_state_check
                            CHECK (state IN ('building', 'active', 'retired', 'failed', 'cancelled', 'dropped', 'sandbox')),
    physical_table  text    NOT NULL,
    target_xmin     xid8    NOT NULL,
    checkpoint_xmin xid8    NOT NULL,
    lanes           integer NOT NULL,
    chunk_size      integer NOT NULL,
    workflow_id     text,
    run_id          text,
    events_total    bigint  NOT NULL DEFAULT 0,
    events_applied  bigint  NOT NULL DEFAULT 0,
    rows_count      bigint,
    error           text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    built_at        timestamptz,
    activated_at    timestamptz,
    ended_at        timestamptz,
    PRIMARY KEY (projection, generation)
);
-- Databases created before sandboxes and point-in-time builds. sandbox: '' for a live generation, else the
-- label of the sandbox (schema rehydrate_sandbox_<label>) it is built in; to_position / as_of: its cut-off.
ALTER TABLE {schema}.generations ADD COLUMN IF NOT EXISTS sandbox text NOT NULL DEFAULT '';
ALTER TABLE {schema}.generations ADD COLUMN IF NOT EXISTS to_position bigint;
ALTER TABLE {schema}.generations ADD COLUMN IF NOT EXISTS as_of timestamptz;
-- Built from a log whose start retention had deleted (or compacted), accepted explicitly by who started it.
ALTER TABLE {schema}.generations ADD COLUMN IF NOT EXISTS partial_history boolean NOT NULL DEFAULT false;
-- The projection's child tables this generation was built with (their tables are `<name>__g<N>`).
ALTER TABLE {schema}.generations ADD COLUMN IF NOT EXISTS child_tables text[] NOT NULL DEFAULT '{{}}';
-- What the swap that made a generation active did: the generation it replaced and the events its last delta applied
-- (an attempt of the swap run again after the first one committed reports them; NULL for a rollback).
ALTER TABLE {schema}.generations ADD COLUMN IF NOT EXISTS replaced_generation integer;
ALTER TABLE {schema}.generations ADD COLUMN IF NOT EXISTS swap_delta bigint;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = '{schema}.generations'::regclass
                   AND conname = 'generations_state_check' AND pg_get_constraintdef(oid) LIKE '%sandbox%') THEN
        ALTER TABLE {schema}.generations DROP CONSTRAINT IF EXISTS generations_state_check;
        ALTER TABLE {schema}.generations ADD CONSTRAINT generations_state_check
            CHECK (state IN ('building', 'active', 'retired', 'failed', 'cancelled', 'dropped', 'sandbox'));
    END IF;
END $$;
-- One live replay per projection at a time, whoever started it (CLI, Web UI, a schedule); a sandbox build
-- does not block it (it has its own row per label).
DROP INDEX IF EXISTS {schema}.generations_one_building_idx;
CREATE UNIQUE INDEX IF NOT EXISTS generations_one_building_per_target_idx
    ON {schema}.generations (projection, sandbox) WHERE state = 'building';

-- A lane's progress inside one generation, written in the same transaction as the rows it produced.
CREATE TABLE IF NOT EXISTS {schema}.lane_checkpoints (
    projection     text    NOT NULL,
    generation     integer NOT NULL,
    lane           integer NOT NULL,
    position       bigint  NOT NULL,
    events_applied bigint  NOT NULL DEFAULT 0,
    done           boolean NOT NULL DEFAULT false,
    -- A lane of streams [low_stream, high_stream) (NULL: unbounded), read in (stream, version) order after
    -- (after_stream, after_version); or, when by_stream is false, a hash lane read in position order after
    -- `position`.
    by_stream      boolean NOT NULL DEFAULT false,
    low_stream     text,
    high_stream    text,
    after_stream   text,
    after_version  bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (projection, generation, lane),
    FOREIGN KEY (projection, generation) REFERENCES {schema}.generations ON DELETE CASCADE
);
-- Databases created before stream-range lanes.
ALTER TABLE {schema}.lane_checkpoints ADD COLUMN IF NOT EXISTS by_stream boolean NOT NULL DEFAULT false;
ALTER TABLE {schema}.lane_checkpoints ADD COLUMN IF NOT EXISTS low_stream text;
ALTER TABLE {schema}.lane_checkpoints ADD COLUMN IF NOT EXISTS high_stream text;
ALTER TABLE {schema}.lane_checkpoints ADD COLUMN IF NOT EXISTS after_stream text;
ALTER TABLE {schema}.lane_checkpoints ADD COLUMN IF NOT EXISTS after_version bigint NOT NULL DEFAULT 0;
-- A log source's lane is a partition: `position` is the next offset to read, `target` the partition's end when the
-- generation was planned (NULL for a table source's lane).
ALTER TABLE {schema}.lane_checkpoints ADD COLUMN IF NOT EXISTS target bigint;
-- Where a log's lane goes on from when its offset alone cannot say (a Kinesis shard: the sequence number of the last
-- record read; its position is the ordinal of the next one), written with the position; the partition's id in the log
-- when its number is not (a Kinesis shard id); the lanes read to their end before this one starts (a resharded
-- stream's parent shards). The tail goes on from these same rows (the active generation's).
ALTER TABLE {schema}.lane_checkpoints ADD COLUMN IF NOT EXISTS log_cursor text;
ALTER TABLE {schema}.lane_checkpoints ADD COLUMN IF NOT EXISTS partition_name text;
ALTER TABLE {schema}.lane_checkpoints ADD COLUMN IF NOT EXISTS parent_lanes integer[] NOT NULL DEFAULT '{{}}';

-- The newest snapshot of an aggregate's state, per stream and aggregate type: `state` is the state after folding
-- the stream's events up to `stream_version`. A snapshot is used only when its `state_version` and `fingerprint`
-- (a hash of the aggregate's fields and code) equal the loading code's: any other snapshot is ignored.
CREATE TABLE IF NOT EXISTS {schema}.snapshots (
    stream_id      text        NOT NULL,
    aggregate_type text        NOT NULL,
    stream_version bigint      NOT NULL CHECK (stream_version >= 1),
    state          jsonb       NOT NULL,
    state_version  integer     NOT NULL,
    fingerprint    text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, aggregate_type)
);
CREATE INDEX IF NOT EXISTS snapshots_type_idx ON {schema}.snapshots (aggregate_type, stream_id);

-- A bulk snapshot rebuild's progress: per hash partition of the aggregate type's streams, the last stream id
-- done, written in the same transaction as that chunk's snapshots.
CREATE TABLE IF NOT EXISTS {schema}.snapshot_rebuilds (
    rebuild_id     text    NOT NULL,
    aggregate_type text    NOT NULL,
    partition      integer NOT NULL,
    after_stream   text,
    streams_done   bigint  NOT NULL DEFAULT 0,
    done           boolean NOT NULL DEFAULT false,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rebuild_id, partition)
);

-- Events a projection with on_error="park" could not apply, per generation. The first failing event of a key
-- parks the key: its later events are parked too (with error naming the first), so the row stays as it was
-- before the failure, and `rehydrate dead-letters retry` rebuilds the key from its whole history.
CREATE TABLE IF NOT EXISTS {schema}.dead_letters (
    projection      text        NOT NULL,
    generation      integer     NOT NULL,
    global_position bigint      NOT NULL,
    stream_id       text        NOT NULL,
    stream_version  bigint      NOT NULL,
    event_type      text        NOT NULL,
    key             text        NOT NULL,
    error           text        NOT NULL,
    parked_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, generation, global_position)
);
CREATE INDEX IF NOT EXISTS dead_letters_key_idx ON {schema}.dead_letters (projection, generation, key);

-- Runs of positions below a settle-window source's checkpoint that held no event when the checkpoint passed them (a
-- sequence value rolled back, or an event whose transaction was still open after the window): the gap audit looks
-- there for events that committed late until the source's gap horizon has passed (see sources/reading.py).
CREATE TABLE IF NOT EXISTS {schema}.source_gaps (
    projection text        NOT NULL,
    generation integer     NOT NULL,
    low        bigint      NOT NULL,
    high       bigint      NOT NULL,
    seen_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, generation, low)
);
