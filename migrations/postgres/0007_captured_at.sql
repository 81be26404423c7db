-- The camera's wall clock when a result's frame was taken (Unix seconds), from the RTCP
-- sender reports of an RTSP camera that sends them; NULL for other sources.
ALTER TABLE results ADD COLUMN captured_at DOUBLE PRECISION;
