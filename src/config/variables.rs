//! Every setting the service reads, in one table: name, default and one line of meaning.
//! The loader, its error messages and `.env.example` all come from here.

/// One configuration variable: its environment name, default and meaning.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    pub name: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
}

macro_rules! variables {
    ($($name:literal = $default:literal : $meaning:literal;)*) => {
        /// Every setting the service reads, in the order `.env.example` lists them.
        pub const VARIABLES: &[Variable] = &[
            $(Variable { name: $name, default: $default, meaning: $meaning },)*
        ];
    };
}

variables! {
    "HOST" = "0.0.0.0" : "Address the HTTP server binds to.";
    "PORT" = "8000" : "TCP port of the HTTP server (0 picks a free port).";
    "DATABASE_URL" = "sqlite://data/free-roam.db?mode=rwc" : "sqlite://PATH (embedded, created on first start) or postgres://USER@HOST:PORT/DB.";
    "DB_MAX_CONNECTIONS" = "10" : "Size of the database connection pool.";
    "MODEL_PATH" = "" : "Local model directory (config.json, tokenizer.json, *.safetensors); empty for none.";
    "MODEL_ID" = "" : "Hugging Face model id to fetch when MODEL_PATH is empty, e.g. google/paligemma-3b-mix-224 (needs internet).";
    "MODEL_REVISION" = "main" : "Hub revision to fetch; pin a commit hash for repeatable deployments.";
    "EXTRA_MODELS" = "" : "More local models jobs may name: name=/dir,name2=/dir2 (the default model is MODEL_PATH's folder name).";
    "MODEL_CACHE_BYTES" = "8589934592" : "Weight bytes of in-process models kept loaded at once; least recently used idle models are evicted.";
    "MAX_NEW_TOKENS" = "32" : "Longest answer the in-process model generates per frame.";
    "TEMPERATURE" = "0" : "In-process sampling temperature; 0 is greedy decoding.";
    "MODEL_TYPE" = "auto" : "Model backend: auto (from MODEL_PATH's config.json) or openai (a remote OpenAI-compatible server).";
    "DEVICE" = "auto" : "Device for in-process models: auto, cpu or cuda.";
    "OPENAI_BASE_URL" = "" : "Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8001/v1 (MODEL_TYPE=openai).";
    "OPENAI_MODEL" = "" : "Model name sent to the OpenAI-compatible server.";
    "OPENAI_API_KEY" = "" : "Bearer token for the OpenAI-compatible server; empty for none.";
    "OPENAI_MAX_CONCURRENCY" = "4" : "Requests in flight at once to the OpenAI-compatible server.";
    "OPENAI_TIMEOUT_SECS" = "60" : "Timeout of one request to the OpenAI-compatible server.";
    "OPENAI_MAX_RETRIES" = "3" : "Retries of a request that timed out or got 429/5xx (Retry-After is honoured).";
    "OPENAI_MAX_TOKENS" = "256" : "max_tokens sent with each request.";
    "OPENAI_TEMPERATURE" = "0" : "temperature sent with each request (0 is greedy).";
    "FRAME_MAX_SIDE" = "768" : "Frames sent to an OpenAI-compatible server are scaled down so neither side exceeds this many pixels (0 = as decoded).";
    "OPENAI_MAX_IMAGES" = "8" : "Most images one request to the OpenAI-compatible server may carry: the longest clip (start's clip.frames) a job may ask for. Match the server's own limit (vLLM: --limit-mm-per-prompt).";
    "JPEG_QUALITY" = "85" : "JPEG quality (1-100) of frames sent to an OpenAI-compatible server.";
    "DEFAULT_FPS" = "2.0" : "Frames sampled per second of media when a job gives no fps (0.1 to 60).";
    "MAX_BATCH_SIZE" = "8" : "Largest batch of frames sent to the model at once.";
    "MAX_BATCH_WAIT_MS" = "50" : "Longest a frame waits for its batch to fill before the batch is sent.";
    "DEFAULT_PROMPT" = "Describe what is happening in this frame." : "Global prompt version 1, used until a global prompt is posted.";
    "MAX_PROMPT_BYTES" = "8192" : "Largest prompt accepted, in bytes of UTF-8.";
    "MAX_SCHEMA_BYTES" = "16384" : "Largest response_format (JSON Schema) a prompt version may carry, in bytes of compact JSON.";
    "MAX_ALERTS" = "8" : "Most alert rules a scope (global or one job) may have; each is one more model request per sampled frame.";
    "MAX_INPUT_HEIGHT" = "720" : "HLS master playlists: the highest-bandwidth variant at most this tall is chosen.";
    "MAX_FRAME_PIXELS" = "8294400" : "Frames with more pixels than this (default 3840x2160) fail the job.";
    "JOB_QUEUE_FRAMES" = "16" : "Frames a job may have waiting for the model; live HLS drops the oldest beyond it, VOD and Redis wait.";
    "HLS_FETCH_TIMEOUT_SECS" = "10" : "Timeout of one playlist or segment request.";
    "HLS_FETCH_RETRIES" = "3" : "Retries of a failed playlist or segment request (capped, jittered backoff).";
    "HLS_STALL_TARGET_DURATIONS" = "6" : "A live playlist that adds nothing (or cannot be fetched) for this many target durations fails the job.";
    "MAX_PLAYLIST_BYTES" = "1048576" : "Largest playlist accepted.";
    "MAX_SEGMENT_BYTES" = "52428800" : "Largest segment (or init section) accepted.";
    "FAST_DECODE" = "false" : "Skip H.264/HEVC deblocking when decoding: about a fifth less CPU, slightly blockier frames.";
    "DECODE_THREADS" = "0" : "Segments (and stills) decoded at once, by all jobs together, in the order they arrive; 0: one per CPU core. More than the cores only time-slices them, so each one finishes later.";
    "SEGMENT_DECODE_TIMEOUT_SECS" = "30" : "A segment still decoding after this long is abandoned and counted.";
    "ALLOW_PRIVATE_NETWORKS" = "false" : "Allow HLS URLs that resolve to loopback, private, link-local or metadata addresses.";
    "NETWORK_ALLOWLIST" = "" : "Comma-separated hosts exempt from the private-address check.";
    "RTSP_TRANSPORT" = "tcp" : "How RTSP cameras send RTP: tcp (interleaved on the RTSP connection; works through NAT and firewalls) or udp.";
    "RTSP_STALL_SECS" = "10" : "An RTSP source that delivers no frame for this long is stalled: the job reconnects.";
    "RTSP_GIVE_UP_SECS" = "300" : "An RTSP job fails after this long without a successful (re)connection.";
    "RTSP_TLS_CA_FILE" = "" : "PEM certificates (a camera's own CA, or its self-signed certificate's issuer) trusted for rtsps:// beside the system's roots.";
    "MEDIA_ROOT" = "" : "Directory whose files jobs may read (stream_ref file:///<path> under it); empty: local files are refused.";
    "REDIS_BLOCK_MS" = "1000" : "How long one XREADGROUP waits for new entries.";
    "REDIS_HOST" = "localhost" : "Redis host for bare stream keys (the seed's form of stream_ref).";
    "REDIS_PORT" = "6379" : "Redis port for bare stream keys.";
    "RESULTS_STREAM" = "" : "Also XADD every stored result to this Redis stream: a key (on REDIS_HOST:REDIS_PORT) or redis://host:port[/db]/key; empty: off.";
    "RESULTS_STREAM_MAXLEN" = "100000" : "Entries RESULTS_STREAM keeps (MAXLEN ~: Redis trims in whole nodes, so about this many).";
    "WEBHOOK_URL" = "" : "Also send every job's events to this URL (Standard Webhooks: signed with WEBHOOK_SECRET); empty: off.";
    "WEBHOOK_SECRET" = "" : "whsec_ followed by the base64 of 24-64 random bytes; signs messages to WEBHOOK_URL and to job webhooks given without a secret.";
    "WEBHOOK_EVENTS" = "result,status,alert" : "Events sent to WEBHOOK_URL: result, status, alert.";
    "WEBHOOK_MAX_AGE_SECS" = "86400" : "A webhook message not delivered this long after it was queued is dead (listed by the API, sent again on request).";
    "WEBHOOK_MAX_BACKOFF_SECS" = "600" : "Longest wait between two attempts of a webhook message (capped, jittered exponential backoff; Retry-After is honoured).";
    "WEBHOOK_TIMEOUT_SECS" = "10" : "Timeout of one webhook POST.";
    "WEBHOOK_CONCURRENCY" = "32" : "Jobs whose webhook messages this replica sends at once (each job's in order).";
    "MAX_CONCURRENT_STREAMS" = "10" : "Most jobs this replica runs at once (each replica claims up to this many).";
    "MAX_ACTIVE_JOBS" = "" : "Most jobs pending or running across all replicas; more are refused with 429. Empty: MAX_CONCURRENT_STREAMS (right for one replica).";
    "REPLICA_ID" = "" : "This replica's id, the owner of the jobs it runs. Empty: HOSTNAME (the pod name on Kubernetes), else a random id.";
    "LEASE_TTL_SECS" = "15" : "How long a replica's hold on a job lasts unless renewed (every third of it); a crashed replica's jobs move after this.";
    "EVIDENCE" = "database" : "Where the frame behind each answer is kept: database (beside the results; every replica reads it), directory (EVIDENCE_DIR, a volume every replica mounts), s3 (EVIDENCE_S3_URL, an S3-compatible bucket) or off.";
    "EVIDENCE_DIR" = "" : "Directory of evidence frames when EVIDENCE=directory.";
    "EVIDENCE_S3_URL" = "" : "Bucket and key prefix of evidence frames when EVIDENCE=s3: s3://BUCKET[/PREFIX]; each frame is PREFIX/JOB_ID/SEQ.jpg.";
    "EVIDENCE_S3_ENDPOINT" = "" : "Endpoint of an S3-compatible store (MinIO, Ceph, Garage, R2...), e.g. http://minio:9000, addressed path-style; empty: AWS S3.";
    "AWS_REGION" = "" : "Region of the evidence bucket; empty: us-east-1 (or what AWS_DEFAULT_REGION says).";
    "AWS_ACCESS_KEY_ID" = "" : "Access key of the evidence bucket; empty: the environment's other AWS credentials (web identity, container or instance role).";
    "AWS_SECRET_ACCESS_KEY" = "" : "Secret key going with AWS_ACCESS_KEY_ID.";
    "EVIDENCE_MAX_SIDE" = "640" : "Evidence frames are scaled down so neither side exceeds this many pixels.";
    "EVIDENCE_JPEG_QUALITY" = "80" : "JPEG quality (1-100) of evidence frames.";
    "MAX_REPLAY_FRAMES" = "1000" : "Most stored frames one replay (POST /api/v1/inference/replay) asks the model about again.";
    "RESULTS_RETENTION" = "7d" : "Results older than this are deleted (a duration such as 7d, 24h, 90m; off keeps them). A job may set its own at start.";
    "EVIDENCE_RETENTION" = "24h" : "Evidence frames older than this are deleted (off keeps them). A job may set its own at start.";
    "JOB_RETENTION" = "30d" : "Finished jobs (completed, failed, cancelled) are deleted with everything they hold this long after they finished (off keeps them).";
    "RETENTION_SWEEP_SECS" = "60" : "How often the retention sweeper runs.";
    "RETENTION_SWEEP_BATCH" = "500" : "Rows one retention statement deletes at most; the pipelines' writes go between batches.";
    "LOG_LEVEL" = "INFO" : "DEBUG, INFO, WARNING, ERROR or CRITICAL, or a tracing filter such as free_roam=debug.";
    "LOG_FORMAT" = "json" : "json or text.";
    "RATE_LIMIT_ENABLED" = "true" : "Apply per-client rate limits to /api routes.";
    "RATE_LIMIT_READ_PER_MINUTE" = "600" : "Read calls (GET) per client per minute.";
    "RATE_LIMIT_READ_BURST" = "60" : "Read calls a client may make at once before the per-minute rate applies.";
    "RATE_LIMIT_WRITE_PER_MINUTE" = "60" : "Mutating calls (POST, DELETE) per client per minute.";
    "RATE_LIMIT_WRITE_BURST" = "10" : "Mutating calls a client may make at once.";
    "TRUST_PROXY" = "false" : "Key clients by the first X-Forwarded-For address (only behind a trusted proxy).";
    "CORS_ORIGINS" = "" : "Comma-separated origins allowed by CORS, or * for any; empty disables CORS.";
    "API_KEYS" = "" : "Comma-separated API keys; when set every /api route needs Authorization: Bearer KEY.";
    "MAX_BODY_BYTES" = "1048576" : "Largest request body accepted; larger gets 413.";
    "MAX_SSE_STREAMS" = "1000" : "Result streams (Server-Sent Events) open at once on this replica; more get 429.";
    "REQUEST_TIMEOUT_SECS" = "30" : "A request still running after this many seconds gets 503.";
    "SHUTDOWN_TIMEOUT_SECS" = "20" : "How long shutdown waits for requests and pipelines to finish.";
}

/// Looks up the default of a variable in [`VARIABLES`].
pub fn default_of(name: &str) -> &'static str {
    VARIABLES
        .iter()
        .find(|v| v.name == name)
        .map(|v| v.default)
        .unwrap_or("")
}
