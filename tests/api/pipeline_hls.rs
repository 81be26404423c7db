//! HLS jobs end to end: a real origin and model server on 127.0.0.1, media made by ffmpeg.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::db_tests;
use crate::fixtures::{
    assert_right_frames, brightness_to_ms, live_origin, make_hls, pts_of, segments_of, Container,
    ModelServer, Origin, Route,
};
use crate::helpers::{pairs, Db, TestApp};

const LONG: Duration = Duration::from_secs(60);

async fn spawn(db: Db, model: &ModelServer, extra: &[(&'static str, &str)]) -> TestApp {
    let owned = model.env();
    let mut env = pairs(&owned);
    env.extend_from_slice(extra);
    TestApp::spawn_with(db, &env).await
}

/// Serves `dir`, runs a 2 fps job on `path` to its end, checks that it completed with every
/// segment decoded, and returns its results.
async fn completed_vod(dir: &Path, path: &str, model: &ModelServer) -> Vec<Value> {
    let origin = Origin::start(dir).await;
    let app = spawn(Db::Sqlite, model, &[]).await;
    let id = app
        .start_job(json!({"stream_ref": origin.url(path), "fps": 2}))
        .await;
    let status = app.wait_status(&id, &["completed", "failed"], LONG).await;
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["stats"]["segments_failed"], 0, "{status}");
    app.all_results(&id).await
}

db_tests!(vod_ts_end_to_end, fmp4_from_a_master_playlist);

async fn vod_ts_end_to_end(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    make_hls(dir.path(), "vod", 6.0, 160, 90, Container::Ts, 2.0);
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    let app = spawn(db, &model, &[]).await;

    let id = app.start_job(json!({"stream_ref": origin.url("vod/index.m3u8"), "fps": 2, "prompt": "What is the brightness?"})).await;
    let status = app.wait_status(&id, &["completed", "failed"], LONG).await;
    assert_eq!(status["status"], "completed", "{status}");
    assert!(status["started_at"].is_number() && status["completed_at"].is_number());
    let stats = &status["stats"];
    assert_eq!(stats["segments_fetched"], 3, "{stats}");
    assert_eq!(stats["segments_failed"], 0);
    assert_eq!(stats["frames_sampled"], 12);
    assert_eq!(stats["frames_dropped"], 0, "VOD drops nothing");
    assert!(stats["live_lag_ms"].is_null(), "a VOD has no live lag");
    assert_eq!(stats["last_pts_ms"], 5500);
    assert_eq!(stats["results"], 12);
    assert!(
        stats["frames_decoded"].as_u64().unwrap() < 180,
        "skips frames it does not need: {stats}"
    );

    let results = app.all_results(&id).await;
    let pts = pts_of(&results);
    assert_eq!(
        pts,
        (0..12).map(|i| i * 500).collect::<Vec<_>>(),
        "one frame per 500 ms of media time from 0"
    );
    let seqs: Vec<i64> = results.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (0..12).collect::<Vec<_>>());
    assert_right_frames(&results, 80.0);
    for r in &results {
        assert_eq!(r["model"], "test-model");
        assert_eq!(r["prompt_version"], 1);
        assert_eq!(r["prompt_scope"], "job");
        assert!(r["batch_size"].as_i64().unwrap() >= 1);
        for k in ["queue", "preprocess", "inference", "total"] {
            assert!(r["latency_ms"][k].as_f64().is_some(), "latency_ms.{k}");
        }
    }
    let asked = model.asked();
    assert_eq!(asked.len(), 12);
    assert!(asked
        .iter()
        .all(|a| a.prompt == "What is the brightness?" && a.width == 160 && a.height == 90));
}

async fn fmp4_from_a_master_playlist(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    make_hls(dir.path(), "small", 4.0, 160, 90, Container::Fmp4, 2.0);
    make_hls(dir.path(), "big", 4.0, 320, 180, Container::Fmp4, 2.0);
    std::fs::write(
        dir.path().join("master.m3u8"),
        "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=200000,RESOLUTION=160x90\nsmall/index.m3u8\n\
         #EXT-X-STREAM-INF:BANDWIDTH=900000,RESOLUTION=320x180\nbig/index.m3u8\n",
    )
    .unwrap();
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    let app = spawn(db, &model, &[("MAX_INPUT_HEIGHT", "100")]).await;
    let id = app
        .start_job(json!({"stream_ref": origin.url("master.m3u8"), "fps": 1}))
        .await;
    let status = app.wait_status(&id, &["completed", "failed"], LONG).await;
    assert_eq!(status["status"], "completed", "{status}");
    let results = app.all_results(&id).await;
    let pts = pts_of(&results);
    assert_eq!(pts, vec![0, 1000, 2000, 3000]);
    assert_right_frames(&results, 80.0);
    assert!(
        model.asked().iter().all(|a| a.height == 90),
        "the variant within MAX_INPUT_HEIGHT was used"
    );
    let requested = origin.requested();
    assert!(
        requested.iter().any(|p| p == "/small/init.mp4"),
        "{requested:?}"
    );
    assert!(
        !requested.iter().any(|p| p.starts_with("/big/")),
        "{requested:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discontinuity_to_another_resolution_continues_the_timeline() {
    let dir = tempfile::tempdir().unwrap();
    let mut playlist = String::from(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:0\n#EXT-X-PLAYLIST-TYPE:VOD\n",
    );
    for (name, width, height) in [("a", 160, 90), ("b", 320, 180)] {
        let rendition = make_hls(dir.path(), name, 3.0, width, height, Container::Ts, 1.0);
        if name == "b" {
            playlist.push_str("#EXT-X-DISCONTINUITY\n");
        }
        for (duration, uri) in segments_of(&rendition.join("index.m3u8")).1 {
            playlist.push_str(&format!("#EXTINF:{duration},\n{name}/{uri}\n"));
        }
    }
    playlist.push_str("#EXT-X-ENDLIST\n");
    std::fs::write(dir.path().join("joined.m3u8"), playlist).unwrap();
    let model = ModelServer::start().await;
    let results = completed_vod(dir.path(), "joined.m3u8", &model).await;
    assert_eq!(
        pts_of(&results),
        (0..12).map(|i| i * 500).collect::<Vec<_>>(),
        "media time runs on across the discontinuity"
    );
    for r in &results {
        let answer: Value = serde_json::from_str(r["output"].as_str().unwrap()).unwrap();
        let seen_ms = brightness_to_ms(answer["brightness"].as_f64().unwrap());
        let pts = r["pts_ms"].as_f64().unwrap();
        // The second rendition's own clock (and brightness) starts again at 0.
        let own_ms = if pts < 3000.0 { pts } else { pts - 3000.0 };
        assert!(
            (seen_ms - own_ms).abs() <= 80.0,
            "result at {pts} ms shows the frame of {seen_ms:.0} ms of its rendition"
        );
    }
    let sizes: Vec<(u32, u32)> = model.asked().iter().map(|a| (a.width, a.height)).collect();
    assert_eq!(
        sizes.iter().filter(|s| **s == (160, 90)).count(),
        6,
        "{sizes:?}"
    );
    assert_eq!(
        sizes.iter().filter(|s| **s == (320, 180)).count(),
        6,
        "{sizes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_gop_segments_without_their_own_parameter_sets_decode() {
    let dir = tempfile::tempdir().unwrap();
    make_hls(dir.path(), "open", 4.0, 160, 90, Container::TsOpenGop, 1.0);
    let model = ModelServer::start().await;
    let results = completed_vod(dir.path(), "open/index.m3u8", &model).await;
    assert_eq!(
        pts_of(&results),
        (0..8).map(|i| i * 500).collect::<Vec<_>>()
    );
    assert_right_frames(&results, 80.0);
}

/// With one decoding slot for the whole process, jobs take turns segment by segment: three
/// at once all finish, each with every frame, the right picture at each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_take_turns_at_one_decoding_slot() {
    let dir = tempfile::tempdir().unwrap();
    make_hls(dir.path(), "vod", 6.0, 160, 90, Container::Ts, 2.0);
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    let app = spawn(Db::Sqlite, &model, &[("DECODE_THREADS", "1")]).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let body = json!({"stream_ref": origin.url("vod/index.m3u8"), "fps": 2});
        ids.push(app.start_job(body).await);
    }
    for id in &ids {
        let status = app.wait_status(id, &["completed", "failed"], LONG).await;
        assert_eq!(status["status"], "completed", "{status}");
        let results = app.all_results(id).await;
        assert_eq!(
            pts_of(&results),
            (0..12).map(|i| i * 500).collect::<Vec<_>>()
        );
        assert_right_frames(&results, 80.0);
    }
    assert_eq!(model.asked().len(), 36);
}

/// RFC 8216 §6.3.4: after a load that found the playlist changed (or the first), the next
/// reload begins no sooner than one target duration later; after one that found nothing new,
/// no sooner than half of one. Timed at the origin, where a request arrives a little after
/// it began: the allowance covers loopback jitter, not a reload half a target early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_reloads_keep_the_rfc_spacing() {
    let dir = tempfile::tempdir().unwrap();
    // One-second segments (TARGETDURATION 1), one more listed every second.
    let origin = live_origin(dir.path(), 8.0, 2, Duration::from_secs(1), None, true).await;
    let model = ModelServer::start().await;
    let app = spawn(Db::Sqlite, &model, &[]).await;
    let id = app
        .start_job(json!({"stream_ref": origin.url("live/live.m3u8"), "fps": 2}))
        .await;
    let status = app.wait_status(&id, &["completed", "failed"], LONG).await;
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["stats"]["segments_missed"], 0, "{status}");
    let pts = pts_of(&app.all_results(&id).await);
    assert!(
        pts.len() >= 12 && pts.windows(2).all(|w| w[1] - w[0] == 500),
        "every segment from the live edge on, once: {pts:?}"
    );

    let loads = origin.live_loads();
    assert!(loads.len() >= 7, "{} loads", loads.len());
    let target = Duration::from_secs(1);
    let jitter = Duration::from_millis(20);
    for (i, w) in loads.windows(2).enumerate() {
        let changed = i == 0 || loads[i - 1].1 != w[0].1;
        let least = if changed { target } else { target / 2 };
        let gap = w[1].0 - w[0].0;
        assert!(
            gap + jitter >= least,
            "reload {} came {gap:?} after a load that {} (at least {least:?}): {:?}",
            i + 1,
            if changed {
                "changed"
            } else {
                "found nothing new"
            },
            loads
                .iter()
                .map(|(t, n)| (t.duration_since(loads[0].0), *n))
                .collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_playlist_grows_and_a_prompt_update_applies_mid_job() {
    let dir = tempfile::tempdir().unwrap();
    let origin = live_origin(dir.path(), 7.0, 2, Duration::from_millis(800), None, true).await;
    let model = ModelServer::start().await;
    let app = spawn(Db::Sqlite, &model, &[]).await;
    let id = app
        .start_job(json!({"stream_ref": origin.url("live/live.m3u8"), "fps": 2, "prompt": "first", "from_beginning": true}))
        .await;
    app.wait_for(&id, LONG, |s| s["results_count"].as_i64().unwrap_or(0) >= 3)
        .await;
    let up = app
        .post(
            "/api/v1/prompt/update",
            json!({"prompt": "second", "job_id": id}),
        )
        .await;
    assert_eq!(up.body["version"], 2);
    let status = app.wait_status(&id, &["completed", "failed"], LONG).await;
    assert_eq!(
        status["status"], "completed",
        "an ended live playlist completes the job: {status}"
    );

    let results = app.all_results(&id).await;
    let pts = pts_of(&results);
    assert_eq!(
        pts,
        (0..14).map(|i| i * 500).collect::<Vec<_>>(),
        "every segment once, in order"
    );
    assert_right_frames(&results, 80.0);
    let versions: Vec<i64> = results
        .iter()
        .map(|r| r["prompt_version"].as_i64().unwrap())
        .collect();
    let switch = versions
        .iter()
        .position(|v| *v == 2)
        .expect("later results use version 2");
    assert!(switch >= 3, "{versions:?}");
    assert!(
        versions[switch..].iter().all(|v| *v == 2),
        "once switched, every later frame uses the new version: {versions:?}"
    );
    for r in &results {
        let answer: Value = serde_json::from_str(r["output"].as_str().unwrap()).unwrap();
        let expected = if r["prompt_version"] == 1 {
            "first"
        } else {
            "second"
        };
        assert_eq!(
            answer["prompt"], expected,
            "the model got the version the result records"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_corrupt_segments_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    make_hls(dir.path(), "vod", 7.0, 160, 90, Container::Ts, 1.0);
    let origin = Origin::start(dir.path()).await;
    origin.route("vod/seg2.ts", Route::Status(404));
    origin.route(
        "vod/seg4.ts",
        Route::Bytes((0..50_000u32).map(|i| (i * 7919 % 251) as u8).collect()),
    );
    let model = ModelServer::start().await;
    let app = spawn(Db::Sqlite, &model, &[("HLS_FETCH_RETRIES", "1")]).await;
    let id = app
        .start_job(json!({"stream_ref": origin.url("vod/index.m3u8"), "fps": 2}))
        .await;
    let status = app.wait_status(&id, &["completed", "failed"], LONG).await;
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["stats"]["segments_failed"], 2, "{}", status["stats"]);
    assert_eq!(status["stats"]["segments_fetched"], 6);
    let results = app.all_results(&id).await;
    let pts = pts_of(&results);
    // Seconds 2-3 and 4-5 are gone; the rest keep their true media times.
    assert_eq!(
        pts,
        vec![0, 500, 1000, 1500, 3000, 3500, 5000, 5500, 6000, 6500]
    );
    assert_right_frames(&results, 80.0);
    assert_eq!(
        origin
            .requested()
            .iter()
            .filter(|p| *p == "/vod/seg2.ts")
            .count(),
        2,
        "one retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_malformed_playlists_fail_the_job_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let origin = live_origin(
        dir.path(),
        4.0,
        2,
        Duration::from_secs(3600),
        Some(2),
        false,
    )
    .await;
    origin.route(
        "bad.m3u8",
        Route::Bytes(b"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:-5,\nseg0.ts\n".to_vec()),
    );
    let model = ModelServer::start().await;
    let app = spawn(Db::Sqlite, &model, &[("HLS_STALL_TARGET_DURATIONS", "2")]).await;

    let stalled = app
        .start_job(json!({"stream_ref": origin.url("live/live.m3u8"), "from_beginning": true}))
        .await;
    let bad = app
        .start_job(json!({"stream_ref": origin.url("bad.m3u8")}))
        .await;
    let other = app
        .start_job(json!({"stream_ref": origin.url("live/index.m3u8")}))
        .await;

    let s = app
        .wait_status(&stalled, &["completed", "failed"], LONG)
        .await;
    assert_eq!(s["status"], "failed");
    assert!(s["error"].as_str().unwrap().contains("stalled"), "{s}");
    assert!(
        s["results_count"].as_i64().unwrap() >= 2,
        "what was stored stays"
    );
    let s = app.wait_status(&bad, &["completed", "failed"], LONG).await;
    assert_eq!(s["status"], "failed");
    assert!(
        s["error"]
            .as_str()
            .unwrap()
            .contains("invalid HLS playlist"),
        "{s}"
    );
    let s = app
        .wait_status(&other, &["completed", "failed"], LONG)
        .await;
    assert_eq!(
        s["status"], "completed",
        "one job's failure never touches another"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    make_hls(dir.path(), "vod", 2.0, 160, 90, Container::Ts, 1.0);
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    let owned = model.env();
    let mut env = pairs(&owned);
    env.retain(|(k, _)| *k != "ALLOW_PRIVATE_NETWORKS");
    let app = TestApp::spawn_with(Db::Sqlite, &env).await;
    let id = app
        .start_job(json!({"stream_ref": origin.url("vod/index.m3u8")}))
        .await;
    let s = app.wait_status(&id, &["completed", "failed"], LONG).await;
    assert_eq!(s["status"], "failed");
    let error = s["error"].as_str().unwrap();
    assert!(
        error.contains("loopback") && error.contains("ALLOW_PRIVATE_NETWORKS"),
        "{error}"
    );
    assert!(origin.requested().is_empty(), "nothing was fetched");
    // A name that resolves to loopback is refused at the connection, too.
    let named = origin
        .url("vod/index.m3u8")
        .replace("127.0.0.1", "localhost");
    let id = app.start_job(json!({"stream_ref": named})).await;
    let s = app.wait_status(&id, &["completed", "failed"], LONG).await;
    assert!(
        s["error"]
            .as_str()
            .unwrap()
            .contains("ALLOW_PRIVATE_NETWORKS"),
        "{s}"
    );

    let allowed = TestApp::spawn_with(
        Db::Sqlite,
        &[&env[..], &[("NETWORK_ALLOWLIST", "127.0.0.1")]].concat(),
    )
    .await;
    let id = allowed
        .start_job(json!({"stream_ref": origin.url("vod/index.m3u8")}))
        .await;
    assert_eq!(
        allowed
            .wait_status(&id, &["completed", "failed"], LONG)
            .await["status"],
        "completed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_live_job_within_a_second_and_keeps_its_results() {
    let dir = tempfile::tempdir().unwrap();
    let origin = live_origin(dir.path(), 7.0, 2, Duration::from_millis(700), None, false).await;
    let model = ModelServer::start().await;
    let app = spawn(Db::Sqlite, &model, &[]).await;
    let id = app
        .start_job(json!({"stream_ref": origin.url("live/live.m3u8"), "from_beginning": true}))
        .await;
    app.wait_for(&id, LONG, |s| s["results_count"].as_i64().unwrap_or(0) >= 2)
        .await;
    let c = app.delete(&format!("/api/v1/inference/cancel/{id}")).await;
    assert_eq!(c.status, reqwest::StatusCode::OK);
    let stopped_at = Instant::now() + Duration::from_secs(1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let kept = app.all_results(&id).await.len();
    assert!(kept >= 2, "stored results stay");
    assert_eq!(
        origin.requests_since(stopped_at),
        0,
        "no fetch after the pipeline stopped"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        app.all_results(&id).await.len(),
        kept,
        "nothing is stored after cancel"
    );
    assert_eq!(
        app.get(&format!("/api/v1/inference/status/{id}"))
            .await
            .body["status"],
        "cancelled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_failures_are_retried_or_stored_as_that_frames_error() {
    let dir = tempfile::tempdir().unwrap();
    make_hls(dir.path(), "vod", 2.0, 160, 90, Container::Ts, 1.0);
    let origin = Origin::start(dir.path()).await;
    let model = ModelServer::start().await;
    model.fail_first(2);
    let app = spawn(Db::Sqlite, &model, &[]).await;
    let ok = app
        .start_job(json!({"stream_ref": origin.url("vod/index.m3u8"), "fps": 1}))
        .await;
    assert_eq!(
        app.wait_status(&ok, &["completed", "failed"], LONG).await["status"],
        "completed"
    );
    let results = app.all_results(&ok).await;
    assert_eq!(results.len(), 2);
    assert!(
        results.iter().all(|r| r["error"].is_null()),
        "5xx answers were retried: {results:?}"
    );

    model.refuse_prompt("forbidden");
    let refused = app
        .start_job(
            json!({"stream_ref": origin.url("vod/index.m3u8"), "fps": 1, "prompt": "forbidden"}),
        )
        .await;
    let s = app
        .wait_status(&refused, &["completed", "failed"], LONG)
        .await;
    assert_eq!(s["status"], "completed");
    assert_eq!(s["stats"]["errors"], 2);
    let results = app.all_results(&refused).await;
    assert_eq!(results.len(), 2, "an error is a result too");
    for r in results {
        assert!(r["output"].is_null());
        assert!(r["error"].as_str().unwrap().contains("HTTP 400"), "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_model_on_live_video_drops_the_oldest_frames() {
    let dir = tempfile::tempdir().unwrap();
    let origin = live_origin(dir.path(), 7.0, 1, Duration::from_millis(250), None, true).await;
    let model = ModelServer::start().await;
    model.set_delay(Duration::from_millis(300));
    let app = spawn(
        Db::Sqlite,
        &model,
        &[
            ("OPENAI_MAX_CONCURRENCY", "1"),
            ("MAX_BATCH_SIZE", "1"),
            ("JOB_QUEUE_FRAMES", "2"),
        ],
    )
    .await;
    let id = app
        .start_job(json!({"stream_ref": origin.url("live/live.m3u8"), "fps": 4, "from_beginning": true, "model": "other-model"}))
        .await;
    let s = app.wait_status(&id, &["completed", "failed"], LONG).await;
    assert_eq!(s["status"], "completed", "{s}");
    let stats = &s["stats"];
    let dropped = stats["frames_dropped"].as_u64().unwrap();
    assert!(
        dropped > 0,
        "live video does not queue without bound: {stats}"
    );
    assert_eq!(
        stats["results"].as_u64().unwrap() + dropped,
        stats["frames_sampled"].as_u64().unwrap(),
        "{stats}"
    );
    let results = app.all_results(&id).await;
    let pts = pts_of(&results);
    assert!(
        pts.windows(2).all(|w| w[0] < w[1]),
        "results stay in media order: {pts:?}"
    );
    assert_right_frames(&results, 80.0);
    assert!(
        model.asked().iter().all(|a| a.model == "other-model"),
        "the job's model is sent"
    );
    assert!(results.iter().all(|r| r["model"] == "other-model"));
}
