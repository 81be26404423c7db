//! deploy/ as a user applies it (`kubectl apply -k deploy/`): every resource kustomize lists
//! exists and is valid against Kubernetes' own schemas, strictly (unknown fields refused),
//! checked by `kubernetes-validate` from PyPI (scripts/setup-system.sh installs it). No
//! cluster is needed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn validator() -> PathBuf {
    if let Ok(p) = std::env::var("KUBERNETES_VALIDATE") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools-venv/bin/kubernetes-validate");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup-system.sh --services (scripts/test does)",
        p.display()
    );
    p
}

/// The files kustomization.yaml lists under `resources:`.
fn resources() -> Vec<String> {
    let text = std::fs::read_to_string(deploy().join("kustomization.yaml")).unwrap();
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.starts_with('-') {
            inside = line.starts_with("resources:");
            continue;
        }
        if inside {
            if let Some(item) = line.trim().strip_prefix("- ") {
                out.push(item.trim().to_owned());
            }
        }
    }
    out
}

#[test]
fn the_manifests_are_valid_kubernetes_objects() {
    let files = resources();
    for f in [
        "deployment.yaml",
        "service.yaml",
        "poddisruptionbudget.yaml",
        "secret.yaml",
    ] {
        assert!(
            files.iter().any(|r| r == f),
            "kustomization.yaml lists {f}: {files:?}"
        );
    }
    assert!(
        deploy().join("settings.env").exists(),
        "the ConfigMap's settings file"
    );
    let out = Command::new(validator())
        .arg("--strict")
        .args(files.iter().map(|f| deploy().join(f)))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert_eq!(said.matches("passed").count(), files.len(), "{said}");
}

#[test]
fn the_deployment_fits_the_service() {
    let d = std::fs::read_to_string(deploy().join("deployment.yaml")).unwrap();
    for want in [
        "replicas: 3",
        "path: /health/ready",
        "path: /health/live",
        "startupProbe:",
        "preStop:",
        "terminationGracePeriodSeconds: 30",
        "readOnlyRootFilesystem: true",
        "runAsNonRoot: true",
        "name: free-roam-settings",
        "name: free-roam-secrets",
    ] {
        assert!(d.contains(want), "deployment.yaml has {want:?}");
    }
    // The hand-over must fit the grace period: preStop + SHUTDOWN_TIMEOUT_SECS < 30 s.
    let shutdown: u64 = free_roam::config::default_of("SHUTDOWN_TIMEOUT_SECS")
        .parse()
        .unwrap();
    assert!(
        5 + shutdown < 30,
        "preStop 5 s + shutdown {shutdown} s within the grace period"
    );
}
