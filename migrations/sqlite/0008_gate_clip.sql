-- Change gating and clips (start's `gate` and `clip`), as JSON; NULL when the job has none.
ALTER TABLE jobs ADD COLUMN gate TEXT;
ALTER TABLE jobs ADD COLUMN clip TEXT;
-- A clip's result covers pts_ms to pts_end_ms (its first and last frame); NULL for one frame.
ALTER TABLE results ADD COLUMN pts_end_ms INTEGER;
-- A gated result: the picture had not changed since the frame(s) of result `repeats_seq`,
-- whose answer it repeats without asking the model; NULL for answers the model gave.
ALTER TABLE results ADD COLUMN repeats_seq INTEGER;
