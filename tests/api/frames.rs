//! What the model receives: frames shaped once for it (FRAME_MAX_SIDE, JPEG from the
//! decoder's planes in whatever pixel format the stream has), still the frame at each
//! result's `pts_ms`; Redis stills that already fit go as they came.

use std::io::Cursor;
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::{json, Value};

use crate::fixtures::{
    assert_right_frames, jpeg_at, make_hls, make_hls_as, pts_of, Container, ModelServer, Origin,
};
use crate::helpers::{pairs, Db, TestApp};

const LONG: Duration = Duration::from_secs(60);

async fn vod_results(
    origin: &Origin,
    path: &str,
    model: &ModelServer,
    env: &[(&str, &str)],
) -> Vec<Value> {
    let owned = model.env();
    let mut all = pairs(&owned);
    all.extend_from_slice(env);
    let app = TestApp::spawn_with(Db::Sqlite, &all).await;
    let id = app
        .start_job(json!({"stream_ref": origin.url(path), "fps": 2}))
        .await;
    let status = app.wait_status(&id, &["completed", "failed"], LONG).await;
    assert_eq!(status["status"], "completed", "{status}");
    app.all_results(&id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_are_sent_at_frame_max_side_and_show_their_pts() {
    let dir = tempfile::tempdir().unwrap();
    make_hls(dir.path(), "wide", 3.0, 640, 360, Container::Ts, 1.0);
    let origin = Origin::start(dir.path()).await;

    let model = ModelServer::start().await;
    let results = vod_results(
        &origin,
        "wide/index.m3u8",
        &model,
        &[("FRAME_MAX_SIDE", "320")],
    )
    .await;
    assert_eq!(
        pts_of(&results),
        (0..6).map(|i| i * 500).collect::<Vec<_>>()
    );
    assert_right_frames(&results, 80.0);
    let asked = model.asked();
    assert_eq!(asked.len(), 6);
    assert!(
        asked.iter().all(|a| (a.width, a.height) == (320, 180)),
        "{:?}",
        sizes(&model)
    );

    // 0 sends frames as decoded.
    let model = ModelServer::start().await;
    let results = vod_results(
        &origin,
        "wide/index.m3u8",
        &model,
        &[("FRAME_MAX_SIDE", "0")],
    )
    .await;
    assert_right_frames(&results, 80.0);
    assert!(
        model
            .asked()
            .iter()
            .all(|a| (a.width, a.height) == (640, 360)),
        "{:?}",
        sizes(&model)
    );
}

fn sizes(model: &ModelServer) -> Vec<(u32, u32)> {
    model.asked().iter().map(|a| (a.width, a.height)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_pixel_formats_and_odd_sizes_reach_the_model_converted() {
    let dir = tempfile::tempdir().unwrap();
    // 4:4:4 at an odd size (4:2:0 JPEG planes round up), 10-bit, full-range JPEG-style, 4:2:2.
    let formats = [
        ("yuv444p", 321, 181),
        ("yuv420p10le", 322, 182),
        ("yuvj420p", 322, 182),
        ("yuv422p", 320, 180),
    ];
    for (pix_fmt, w, h) in formats {
        make_hls_as(dir.path(), pix_fmt, 2.0, w, h, Container::Ts, 1.0, pix_fmt);
    }
    let origin = Origin::start(dir.path()).await;
    for (pix_fmt, w, h) in formats {
        let model = ModelServer::start().await;
        let results = vod_results(&origin, &format!("{pix_fmt}/index.m3u8"), &model, &[]).await;
        assert_eq!(results.len(), 4, "{pix_fmt}: {results:?}");
        assert!(
            results.iter().all(|r| r["error"].is_null()),
            "{pix_fmt}: {results:?}"
        );
        // The brightness the model sees is the stream's own: range and bit depth converted.
        assert_right_frames(&results, 80.0);
        assert!(
            model.asked().iter().all(|a| (a.width, a.height) == (w, h)),
            "{pix_fmt}: {:?}",
            sizes(&model)
        );
    }
}

fn png_at(t_ms: i64, width: u32, height: u32) -> Vec<u8> {
    let jpeg = jpeg_at(t_ms, width, height);
    let img = image::load_from_memory(&jpeg).unwrap();
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_jpegs_that_fit_go_as_they_came_and_the_rest_are_shaped() {
    let key = format!("test:frames:{}", uuid::Uuid::new_v4().simple());
    let mut c = crate::fixtures::local_redis().await;
    let small = jpeg_at(0, 64, 48);
    let entries: [(i64, Vec<u8>); 3] = [
        (0, small.clone()),
        (500, png_at(500, 64, 48)),
        (1000, jpeg_at(1000, 1000, 500)),
    ];
    for (ts, frame) in &entries {
        let _: String = c
            .xadd(
                &key,
                "*",
                &[
                    ("frame", frame.clone()),
                    ("ts_ms", ts.to_string().into_bytes()),
                ],
            )
            .await
            .unwrap();
    }
    let model = ModelServer::start().await;
    let owned = model.env();
    let mut env = pairs(&owned);
    env.push(("FRAME_MAX_SIDE", "320"));
    let app = TestApp::spawn_with(Db::Sqlite, &env).await;
    let id = app
        .start_job(json!({"stream_ref": format!("redis://127.0.0.1:6379/0/{key}"), "fps": 2, "from_beginning": true}))
        .await;
    app.wait_for(&id, LONG, |s| s["results_count"] == 3).await;
    let results = app.all_results(&id).await;
    assert_eq!(pts_of(&results), vec![0, 500, 1000]);
    assert_right_frames(&results, 60.0);
    // Requests run concurrently: tell them apart by what arrived.
    let asked = model.asked();
    assert_eq!(asked.len(), 3);
    let as_came = asked.iter().filter(|a| a.jpeg == small).count();
    assert_eq!(
        as_came, 1,
        "a JPEG within FRAME_MAX_SIDE is sent byte for byte"
    );
    let mut sizes: Vec<(u32, u32)> = asked.iter().map(|a| (a.width, a.height)).collect();
    sizes.sort_unstable();
    // The PNG went as a JPEG of its size; the oversized JPEG was scaled.
    assert_eq!(sizes, vec![(64, 48), (64, 48), (320, 160)]);
    let _ = app.delete(&format!("/api/v1/inference/cancel/{id}")).await;
    let _: () = c.del(&key).await.unwrap();
}
