//! The in-process PaliGemma held to its reference implementation: fixtures that Hugging Face
//! transformers produced (scripts/reference/paligemma.py; versions in golden.json) from the
//! same seeded tiny model this test rebuilds. No Python runs here.
//!
//! - The model: the reference's own pixel tensors in, the same generated ids out, and the
//!   first step's top-5 logits within 1e-3 — one frame at a time and batched.
//! - Preprocessing: the service's path for a picture (shaped to the vision tower's size,
//!   then scaled to [-1, 1]) against the reference processor's: the same 8-bit pixels, at
//!   the tiny model's size and at 224, and the same tensor within float rounding.
//! - Both together: from the picture file to the answer, the reference's tokens.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde_json::Value;
use sha2::{Digest, Sha256};

use free_roam::media::shape::Shaper;
use free_roam::media::{Encoding, Frame, FrameSize, FrameSpec, Picture, Still};
use free_roam::vlm::candle::files::ModelFiles;
use free_roam::vlm::candle::paligemma::{Generation, PaliGemma};
use free_roam::vlm::candle::tiny::make_tiny_model;

/// The reference's first-step logits, in f32.
const LOGIT_TOLERANCE: f32 = 1e-3;

/// Resize parity: none. The service resizes with Pillow's own algorithm (media::resample), so
/// every 8-bit level of every pixel is the reference processor's; the tensors then differ
/// only by float rounding of the scaling to [-1, 1].
const PIXEL_TOLERANCE: f32 = 1e-6;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/paligemma")
}

fn golden() -> Value {
    let path = fixtures().join("golden.json");
    serde_json::from_slice(&std::fs::read(&path).expect("golden.json")).expect("golden JSON")
}

fn num(v: &Value) -> usize {
    v.as_u64().expect("a number") as usize
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id list")
        .iter()
        .map(|t| t.as_u64().expect("an id") as u32)
        .collect()
}

/// The golden fixtures, and the model they were made from rebuilt (in a directory kept alive
/// as long as the model is used).
fn golden_and_model() -> (Value, tempfile::TempDir, PaliGemma) {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), &g);
    (g, dir, model)
}

/// The tiny model the fixtures were made from, rebuilt from its seed.
fn tiny_model(dir: &Path, g: &Value) -> PaliGemma {
    let m = &g["model"];
    make_tiny_model(dir, num(&m["image_size"]), m["seed"].as_u64().unwrap()).unwrap();
    let files = ModelFiles::in_dir(dir).unwrap();
    PaliGemma::load(&files, &Device::Cpu).unwrap()
}

fn greedy(g: &Value) -> Generation {
    Generation {
        max_new_tokens: num(&g["max_new_tokens"]),
        temperature: 0.0,
        seed: 0,
    }
}

fn reference_pixels() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("pixels.safetensors"), &Device::Cpu)
        .expect("pixels.safetensors")
}

/// Decodes greedily, keeping each step's logits: [step][row] -> logits.
fn decode(
    model: &PaliGemma,
    pixels: &Tensor,
    prompt: &str,
    g: &Value,
) -> (Vec<Vec<u32>>, Vec<Vec<Vec<f32>>>) {
    let mut steps = Vec::new();
    let tokens = model
        .decode(pixels, prompt, &greedy(g), |logits| {
            steps.push(logits.to_vec2::<f32>().unwrap())
        })
        .unwrap();
    (tokens, steps)
}

/// One step's logits row against the reference's top 5 for that step: same ids in the same
/// order, values within the tolerance.
fn assert_top5(ours: &[f32], want: &Value, what: &str) {
    let mut order: Vec<usize> = (0..ours.len()).collect();
    order.sort_by(|&a, &b| ours[b].total_cmp(&ours[a]));
    let want = want.as_array().unwrap();
    for (rank, pair) in want.iter().enumerate() {
        let (id, value) = (num(&pair[0]), pair[1].as_f64().unwrap() as f32);
        assert_eq!(
            order[rank], id,
            "{what}: rank {rank} of the first step's logits"
        );
        let diff = (ours[id] - value).abs();
        assert!(
            diff <= LOGIT_TOLERANCE,
            "{what}: logit of token {id} is {} here, {value} in the reference ({diff:e} apart)",
            ours[id]
        );
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn the_seeded_tiny_model_is_the_one_the_fixtures_were_made_from() {
    let g = golden();
    let m = &g["model"];
    let mut digests = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        make_tiny_model(
            dir.path(),
            num(&m["image_size"]),
            m["seed"].as_u64().unwrap(),
        )
        .unwrap();
        let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        digests.push(sha256_hex(&bytes));
    }
    assert_eq!(
        digests[0], digests[1],
        "the same seed gives the same weights"
    );
    assert_eq!(
        digests[0], m["weights_sha256"],
        "make-tiny-model no longer writes the model the fixtures were made from: \
         regenerate them (README, \"Golden tests\")"
    );
    let other = tempfile::tempdir().unwrap();
    make_tiny_model(other.path(), num(&m["image_size"]), 2).unwrap();
    let bytes = std::fs::read(other.path().join("model.safetensors")).unwrap();
    assert_ne!(
        sha256_hex(&bytes),
        digests[0],
        "another seed, other weights"
    );
}

#[test]
fn paligemma_generates_what_the_reference_generates() {
    let (g, _dir, model) = golden_and_model();
    let pixels = reference_pixels();
    let cases = g["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "the fixtures cover pictures x prompts");
    for case in cases {
        let (image, prompt) = (
            case["image"].as_str().unwrap(),
            case["prompt"].as_str().unwrap(),
        );
        let what = format!("{image} / {prompt:?}");
        assert_eq!(
            model.prompt_ids(prompt).unwrap(),
            ids(&case["prompt_ids"]),
            "{what}: prompt ids"
        );
        let (tokens, steps) = decode(&model, &pixels[image], prompt, &g);
        assert_eq!(tokens[0], ids(&case["tokens"]), "{what}: generated ids");
        assert_top5(&steps[0][0], &case["top5"], &format!("{what}, first step"));
        let per_step = case["top5_per_step"].as_array().unwrap();
        assert_eq!(steps.len(), per_step.len(), "{what}: steps");
        for (k, want) in per_step.iter().enumerate() {
            assert_top5(&steps[k][0], want, &format!("{what}, step {k} (KV cache)"));
        }
        let text = model.generate(&pixels[image], prompt, &greedy(&g)).unwrap();
        assert_eq!(
            text[0],
            case["text"].as_str().unwrap().trim(),
            "{what}: text"
        );
    }
}

#[test]
fn batched_frames_answer_as_each_alone() {
    let (g, _dir, model) = golden_and_model();
    let pixels = reference_pixels();
    let images: Vec<&str> = g["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap())
        .collect();
    let batch = Tensor::cat(&images.iter().map(|i| &pixels[*i]).collect::<Vec<_>>(), 0).unwrap();
    let mut prompts: Vec<&str> = g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["prompt"].as_str().unwrap())
        .collect();
    prompts.sort_unstable();
    prompts.dedup();
    for prompt in prompts {
        let (tokens, steps) = decode(&model, &batch, prompt, &g);
        for (row, image) in images.iter().enumerate() {
            let case = g["cases"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["image"] == *image && c["prompt"] == prompt)
                .unwrap();
            let what = format!("{image} / {prompt:?}, row {row} of {}", images.len());
            assert_eq!(tokens[row], ids(&case["tokens"]), "{what}: generated ids");
            for (k, want) in case["top5_per_step"].as_array().unwrap().iter().enumerate() {
                assert_top5(&steps[k][row], want, &format!("{what}, step {k}"));
            }
        }
    }
}

/// The service's picture for the vision tower: the still shaped as a Redis frame is (and as
/// the decode thread shapes video), to exactly `side` x `side` RGB.
fn shaped(png: &[u8], side: u32) -> Frame {
    let spec = FrameSpec {
        size: FrameSize::Exact {
            width: side,
            height: side,
        },
        encoding: Encoding::Rgb,
    };
    Still::probe(png, u64::MAX)
        .unwrap()
        .shape(&mut Shaper::new(spec), 0)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .unwrap()
}

fn rgb_of(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().to_rgb8().into_raw()
}

#[test]
fn preprocessing_matches_the_reference_processor() {
    let (g, _dir, model) = golden_and_model();
    let pixels = reference_pixels();
    let side = num(&g["model"]["image_size"]) as u32;
    for image in g["images"].as_array().unwrap() {
        let image = image.as_str().unwrap();
        let png = std::fs::read(fixtures().join(format!("images/{image}.png"))).unwrap();
        for size in g["check_sizes"].as_array().unwrap() {
            let size = num(size) as u32;
            let ours = shaped(&png, size);
            let ours = ours.to_rgb().unwrap();
            let theirs = rgb_of(&fixtures().join(format!("reference/{image}-{size}.png")));
            assert_eq!(ours.len(), theirs.len());
            let differing = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
            assert_eq!(
                differing,
                0,
                "{image} resized to {size}: {differing} of {} values differ from the reference's",
                ours.len()
            );
        }
        // The whole tensor the model gets, against the reference's pixel_values.
        let frame = Arc::new(shaped(&png, side));
        let ours_kept = model.preprocess(&[frame]).unwrap();
        let diff = max_abs_diff(&ours_kept, &pixels[image]);
        assert!(
            diff <= PIXEL_TOLERANCE,
            "{image}: pixel tensor {diff} from the reference's (allowed {PIXEL_TOLERANCE})"
        );
        // A frame handed over at another size is resized by the model with the same scaler.
        let decoded = image::load_from_memory(&png).unwrap().to_rgb8();
        let unshaped = Frame {
            width: decoded.width(),
            height: decoded.height(),
            picture: Picture::Rgb(decoded.into_raw()),
            pts_ms: 0,
            evidence: None,
            captured_at: None,
        };
        let again = model.preprocess(&[Arc::new(unshaped)]).unwrap();
        assert_eq!(
            max_abs_diff(&again, &ours_kept),
            0.0,
            "{image}: both resize paths agree"
        );
    }
}

#[test]
fn pictures_answer_as_the_reference_from_the_file_on() {
    // The whole in-process path a Redis picture takes: the file decoded, shaped to the vision
    // tower's size, scaled, and the model: the reference's answers, picture for picture.
    let (g, _dir, model) = golden_and_model();
    let side = num(&g["model"]["image_size"]) as u32;
    for case in g["cases"].as_array().unwrap() {
        let image = case["image"].as_str().unwrap();
        let png = std::fs::read(fixtures().join(format!("images/{image}.png"))).unwrap();
        let pixels = model.preprocess(&[Arc::new(shaped(&png, side))]).unwrap();
        let (tokens, _) = decode(&model, &pixels, case["prompt"].as_str().unwrap(), &g);
        assert_eq!(
            tokens[0],
            ids(&case["tokens"]),
            "{image} / {}",
            case["prompt"]
        );
    }
}
