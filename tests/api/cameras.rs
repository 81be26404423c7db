//! RTSP cameras, against GStreamer's RTSP server (tests/rtsp_server.py, Debian's packages):
//! frames at their pts_ms, a server killed and restarted mid-job is reconnected and results
//! go on, wrong credentials fail the job with a clear error, and the password shows nowhere.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::fixtures::{assert_right_frames, make_file, make_file_in, ModelServer};
use crate::helpers::{pairs, Db, TestApp};

const PASSWORD: &str = "Sup3r-s3cret";

/// GStreamer's RTSP server on 127.0.0.1 serving `clip` at /cam, with basic auth.
struct RtspServer {
    child: Child,
    port: u16,
    clip: PathBuf,
}

impl RtspServer {
    fn start(clip: &Path, port: u16) -> Self {
        Self::start_with(clip, port, &[])
    }

    /// The server with TLS on every connection (rtsps), presenting `cert`.
    fn start_tls(clip: &Path, cert: &Path, key: &Path) -> Self {
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        Self::start_with(clip, 0, &["--tls-cert", &cert, "--tls-key", &key])
    }

    fn start_with(clip: &Path, port: u16, extra: &[&str]) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rtsp_server.py");
        // Debian's Python: python3-gi and the GStreamer bindings live there.
        let mut child = Command::new("/usr/bin/python3")
            .arg(script)
            .arg("--file")
            .arg(clip)
            .args([
                "--port",
                &port.to_string(),
                "--user",
                "viewer",
                "--password",
                PASSWORD,
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("/usr/bin/python3 runs (scripts/setup-system.sh installs python3-gi)");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let port = line.trim().parse().expect("the server prints its port");
        Self {
            child,
            port,
            clip: clip.to_owned(),
        }
    }

    fn url(&self, password: &str) -> String {
        format!("rtsp://viewer:{password}@127.0.0.1:{}/cam", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freezes (`STOP`) or thaws (`CONT`) the server: a camera that stops sending.
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// The same server again, on the same port.
    fn restart(&mut self) {
        self.kill();
        *self = Self::start(&self.clip.clone(), self.port);
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A camera (the 6 s ramp clip behind GStreamer's server), the stand-in model, the service
/// with `env`, and a job on the camera at 2 fps.
struct Rig {
    _dir: tempfile::TempDir,
    server: RtspServer,
    _model: ModelServer,
    app: TestApp,
    id: String,
}

async fn camera_job(env: &[(&str, &str)]) -> Rig {
    let (dir, server, model) = camera(6.0, "libx264", 1.0, &[]).await;
    let owned = model.env();
    let mut all = pairs(&owned);
    all.extend_from_slice(env);
    let app = TestApp::spawn_with(Db::Sqlite, &all).await;
    let id = app
        .start_job(json!({"stream_ref": server.url(PASSWORD), "fps": 2}))
        .await;
    Rig {
        _dir: dir,
        server,
        _model: model,
        app,
        id,
    }
}

/// A folder holding the ramp clip (`seconds` long, `encoder`, a keyframe every `key_every`
/// seconds), a camera serving it (`args` for the server) and the stand-in model.
async fn camera(
    seconds: f64,
    encoder: &str,
    key_every: f64,
    args: &[&str],
) -> (tempfile::TempDir, RtspServer, ModelServer) {
    let dir = tempfile::tempdir().unwrap();
    let clip = make_file_in(dir.path(), "clip.mkv", seconds, encoder, key_every);
    let server = RtspServer::start_with(&clip, 0, args);
    (dir, server, ModelServer::start().await)
}

/// Waits for job `id` to fail, checks its error says each of `words`, and that `secret`
/// shows nowhere in its status.
async fn fails_saying(app: &TestApp, id: &str, words: &[&str], secret: &str) {
    let st = app
        .wait_status(id, &["failed"], Duration::from_secs(30))
        .await;
    let error = st["error"].as_str().unwrap();
    assert!(words.iter().all(|w| error.contains(w)), "{words:?}: {st}");
    assert!(!st.to_string().contains(secret), "{st}");
}

/// Waits for `n` results, then checks the first session's frames (it starts at the clip's
/// start): each is the frame at its pts_ms.
async fn first_frames_match(app: &TestApp, id: &str, n: i64) -> Value {
    let st = app
        .wait_for(id, Duration::from_secs(30), |s| {
            s["results_count"].as_i64() >= Some(n)
        })
        .await;
    assert_eq!(st["stats"]["source_state"], "live", "{st}");
    let first: Vec<Value> = app
        .all_results(id)
        .await
        .into_iter()
        .filter(|r| r["pts_ms"].as_i64() < Some(5000))
        .collect();
    assert!(first.len() >= n as usize);
    assert_right_frames(&first, 80.0);
    st
}

/// Waits for results dated by the camera's RTCP sender reports (GStreamer's server sends
/// them with this machine's clock), then checks the first session's dates: taken before they
/// were answered, and as far apart as their pts_ms.
async fn assert_dated_by_the_camera(app: &TestApp, id: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let dated = loop {
        let dated: Vec<(i64, f64, f64)> = app
            .all_results(id)
            .await
            .iter()
            .filter(|r| r["pts_ms"].as_i64() < Some(5000))
            .filter_map(|r| {
                Some((
                    r["pts_ms"].as_i64()?,
                    r["captured_at"].as_f64()?,
                    r["created_at"].as_f64()?,
                ))
            })
            .collect();
        if dated.len() >= 2 {
            break dated;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no result has captured_at: {dated:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for &(pts, captured, created) in &dated {
        assert!(
            captured <= created + 0.05 && created - captured < 15.0,
            "result at {pts} ms: captured at {captured}, stored at {created}"
        );
        let (pts0, captured0, _) = dated[0];
        let apart = (captured - captured0) - (pts - pts0) as f64 / 1000.0;
        assert!(
            apart.abs() < 0.05,
            "captured_at moves with pts_ms: {dated:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_is_read_at_its_pts_reconnected_after_a_restart_and_its_password_hidden() {
    // Kept whole: its folder holds the clip the restarted server reads again.
    let mut rig = camera_job(&[("RTSP_STALL_SECS", "2")]).await;
    let (app, id) = (&rig.app, rig.id.clone());
    let st = first_frames_match(app, &id, 4).await;
    assert_eq!(st["source_type"], "rtsp");
    assert_dated_by_the_camera(app, &id).await;

    // The server goes away and comes back: the job reconnects and results go on.
    rig.server.restart();
    let before = st["results_count"].as_i64().unwrap();
    let st = app
        .wait_for(&id, Duration::from_secs(40), |s| {
            s["stats"]["reconnects"].as_i64() >= Some(1)
                && s["results_count"].as_i64() > Some(before + 2)
        })
        .await;
    assert_eq!(st["status"], "running", "{st}");
    let results = app.all_results(&id).await;
    let pts: Vec<i64> = results
        .iter()
        .map(|r| r["pts_ms"].as_i64().unwrap())
        .collect();
    assert!(
        pts.windows(2).all(|w| w[0] < w[1]),
        "one timeline across sessions: {pts:?}"
    );

    // The password is in no response: status, the jobs list, results.
    let listed = app.get("/api/v1/inference/jobs").await.body;
    for body in [&st, &listed, &json!(results)] {
        let text = body.to_string();
        assert!(!text.contains(PASSWORD), "the password leaked: {text}");
    }
    assert!(
        st["stream_ref"].as_str().unwrap().contains("viewer:***@"),
        "{st}"
    );
    let cancelled = app.delete(&format!("/api/v1/inference/cancel/{id}")).await;
    assert_eq!(cancelled.status, reqwest::StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_fail_the_job_saying_so() {
    let (_dir, server, model) = camera(3.0, "libx264", 1.0, &[]).await;
    let owned = model.env();
    let app = TestApp::spawn_with(Db::Sqlite, &pairs(&owned)).await;
    let id = app
        .start_job(json!({"stream_ref": server.url("not-the-password")}))
        .await;
    fails_saying(&app, &id, &["credentials"], "not-the-password").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_that_stops_sending_is_stalled_then_reconnected() {
    let rig = camera_job(&[("RTSP_STALL_SECS", "1")]).await;
    let (server, app, id) = (&rig.server, &rig.app, rig.id.clone());
    app.wait_for(&id, Duration::from_secs(30), |s| {
        s["results_count"].as_i64() >= Some(2)
    })
    .await;
    server.signal("STOP");
    let st = app
        .wait_for(&id, Duration::from_secs(30), |s| {
            matches!(
                s["stats"]["source_state"].as_str(),
                Some("stalled" | "reconnecting")
            )
        })
        .await;
    assert_eq!(st["status"], "running", "a stall is not a failure: {st}");
    let gauge = |text: &str, state: &str| {
        let line = format!("free_roam_source_state_jobs{{state=\"{state}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let metrics = app.get("/metrics").await.body;
    let text = metrics.as_str().unwrap();
    assert_eq!(
        gauge(text, "stalled").unwrap_or(0.0) + gauge(text, "reconnecting").unwrap_or(0.0),
        1.0,
        "{text}"
    );
    server.signal("CONT");
    let before = st["results_count"].as_i64().unwrap();
    let st = app
        .wait_for(&id, Duration::from_secs(40), |s| {
            s["stats"]["source_state"] == "live"
                && s["stats"]["reconnects"].as_i64() >= Some(1)
                && s["results_count"].as_i64() > Some(before)
        })
        .await;
    assert_eq!(st["status"], "running", "{st}");
    let metrics = app.get("/metrics").await.body;
    let text = metrics.as_str().unwrap();
    assert_eq!(gauge(text, "live"), Some(1.0), "{text}");
    assert_eq!(gauge(text, "stalled").unwrap_or(0.0), 0.0, "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("free_roam_pipeline_reconnects_total ") && !l.ends_with(" 0")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h265_camera_is_read_at_its_pts() {
    let (_dir, server, model) = camera(6.0, "libx265", 1.0, &["--codec", "h265"]).await;
    let owned = model.env();
    let app = TestApp::spawn_with(Db::Sqlite, &pairs(&owned)).await;
    let id = app
        .start_job(json!({"stream_ref": server.url(PASSWORD), "fps": 2}))
        .await;
    first_frames_match(&app, &id, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_is_read_over_udp_when_asked() {
    let rig = camera_job(&[("RTSP_TRANSPORT", "udp")]).await;
    first_frames_match(&rig.app, &rig.id, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_on_a_private_address_is_refused_unless_allowed() {
    let (_dir, server, model) = camera(3.0, "libx264", 1.0, &[]).await;
    let owned = model.env();
    let mut env = pairs(&owned);
    env.retain(|(k, _)| *k != "ALLOW_PRIVATE_NETWORKS");
    let app = TestApp::spawn_with(Db::Sqlite, &env).await;
    // An address, and a name the guard resolves itself before connecting (plain or TLS).
    for (scheme, host) in [
        ("rtsp", "127.0.0.1"),
        ("rtsp", "localhost"),
        ("rtsps", "localhost"),
    ] {
        let url = server
            .url(PASSWORD)
            .replace("127.0.0.1", host)
            .replace("rtsp://", &format!("{scheme}://"));
        let id = app.start_job(json!({"stream_ref": url})).await;
        fails_saying(&app, &id, &["loopback", "ALLOW_PRIVATE_NETWORKS"], PASSWORD).await;
    }
}

/// The whole log of a service process (debug level, every crate) that ran a camera job
/// through a reconnection and a job with a wrong password holds neither password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_of_a_whole_run_holds_a_password() {
    const WRONG: &str = "Wr0ng-pa55word";
    let (dir, mut server, model) = camera(6.0, "libx264", 1.0, &[]).await;
    let port = crate::helpers::free_port();
    let log_path = dir.path().join("service.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_free-roam"));
    cmd.env_clear()
        .current_dir(dir.path())
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("serve")
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("DATABASE_URL", "sqlite://free-roam.db")
        .env("RATE_LIMIT_ENABLED", "false")
        .env("LOG_LEVEL", "debug")
        .env("LOG_FORMAT", "json")
        .env("RTSP_STALL_SECS", "2")
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for (k, v) in model.env() {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let status = |id: String| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let r = client
                .get(format!("{base}/api/v1/inference/status/{id}"))
                .send()
                .await;
            match r {
                Ok(r) => r.json::<Value>().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            }
        }
    };
    let start = |url: String| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            for _ in 0..200 {
                let sent = client
                    .post(format!("{base}/api/v1/inference/start"))
                    .json(&json!({"stream_ref": url, "fps": 2}))
                    .send()
                    .await;
                if let Ok(r) = sent {
                    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
                    let body: Value = r.json().await.unwrap();
                    return body["job_id"].as_str().unwrap().to_owned();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the service never answered");
        }
    };
    async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        while !done().await {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let id = start(server.url(PASSWORD)).await;
    until("results", async || {
        status(id.clone()).await["results_count"].as_i64() >= Some(2)
    })
    .await;
    server.restart();
    until("a reconnection and more results", async || {
        let st = status(id.clone()).await;
        st["stats"]["reconnects"].as_i64() >= Some(1) && st["results_count"].as_i64() >= Some(4)
    })
    .await;
    let refused = start(server.url(WRONG)).await;
    until("the wrong password fails", async || {
        status(refused.clone()).await["status"] == "failed"
    })
    .await;
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let exited = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap();
    assert!(exited.unwrap().success());

    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        text.contains("RTSP source lost") && text.contains("viewer:***@"),
        "the log holds the run (reconnection, the redacted URL): {} bytes",
        text.len()
    );
    for secret in [PASSWORD, WRONG] {
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(secret)).collect();
        assert!(lines.is_empty(), "{secret} logged: {lines:#?}");
    }
}

/// A CA and a certificate it issued for 127.0.0.1, made with the openssl CLI in `dir`:
/// (ca.pem, cert.pem, key.pem).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl CLI runs (scripts/setup-system.sh installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A new P-256 key with a self-signed certificate (the CA), then one with a request.
    let ec_key = [
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca = [
        "-x509", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=CA",
    ];
    run(&[&ec_key[..], &ca].concat());
    let leaf = [
        "-keyout",
        "key.pem",
        "-out",
        "cam.csr",
        "-subj",
        "/CN=camera",
    ];
    run(&[&ec_key[..], &leaf].concat());
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "cam.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rtsps_camera_is_read_over_tls_and_an_untrusted_one_fails_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let clip = make_file(dir.path(), "clip.mkv", 6.0);
    let (ca, cert, key) = certificates(dir.path());
    let server = RtspServer::start_tls(&clip, &cert, &key);
    let url = server.url(PASSWORD).replace("rtsp://", "rtsps://");
    let model = ModelServer::start().await;
    let owned = model.env();
    let ca_file = ca.display().to_string();
    let mut env = pairs(&owned);
    env.push(("RTSP_TLS_CA_FILE", ca_file.as_str()));
    let app = TestApp::spawn_with(Db::Sqlite, &env).await;
    let id = app.start_job(json!({"stream_ref": url, "fps": 2})).await;
    first_frames_match(&app, &id, 4).await;

    // The same camera for a service that does not trust its CA: failed at once, saying why.
    let strict = TestApp::spawn_with(Db::Sqlite, &pairs(&owned)).await;
    let id = strict.start_job(json!({"stream_ref": url, "fps": 2})).await;
    fails_saying(&strict, &id, &["not trusted", "RTSP_TLS_CA_FILE"], PASSWORD).await;
}

/// A camera that sends one keyframe and then only P-frames does not fill memory: past
/// MAX_SEGMENT_BYTES of video without a keyframe, what was gathered is dropped (counted), and
/// the job goes on waiting for the next keyframe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_without_keyframes_cannot_fill_memory() {
    let (_dir, server, model) = camera(6.0, "libx264", 60.0, &[]).await;
    let owned = model.env();
    let mut env = pairs(&owned);
    env.push(("MAX_SEGMENT_BYTES", "1024"));
    let app = TestApp::spawn_with(Db::Sqlite, &env).await;
    let id = app
        .start_job(json!({"stream_ref": server.url(PASSWORD), "fps": 2}))
        .await;
    let st = app
        .wait_for(&id, Duration::from_secs(30), |s| {
            s["stats"]["segments_failed"].as_i64() >= Some(1)
        })
        .await;
    assert_eq!(st["status"], "running", "{st}");
    assert_eq!(st["stats"]["frames_decoded"], 0, "{st}");
}
