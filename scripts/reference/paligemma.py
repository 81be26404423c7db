#!/usr/bin/env python3
"""Golden fixtures for the in-process PaliGemma, made by the reference implementation.

    scripts/reference/paligemma.py [--binary target/release/free-roam]

The reference is Hugging Face transformers (PaliGemmaForConditionalGeneration, its
PaliGemmaProcessor and the PIL SigLIP image processor) on CPU in float32. On its first run
the script makes a virtual environment (target/reference-venv, or $REFERENCE_VENV) with the
pinned packages from PyPI (~6 GB: torch brings its CUDA wheels) and runs itself there.

It asks `free-roam dev make-tiny-model` for the seeded tiny PaliGemma, draws the test
pictures, and writes to tests/fixtures/paligemma/:

  images/NAME.png         the pictures (flat greys, a gradient, a photo-like test card)
  reference/NAME-S.png    the reference processor's resize of each to S x S (before rescale)
  pixels.safetensors      the reference's pixel_values at the tiny model's size, per picture
  golden.json             versions, the model's seed and SHA-256, and per picture and
                          prompt: the prompt's token ids, the generated ids (greedy) and the
                          top-5 logits of the first step (and of every step after it)

tests/api/reference.rs compares the service's model and preprocessing with these, no Python.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "paligemma"
VENV = Path(os.environ.get("REFERENCE_VENV", ROOT / "target" / "reference-venv"))
PINNED = [
    "torch==2.15.0",
    "transformers==5.24.0",
    "pillow==13.0.0",
    "numpy==2.4.6",
    "safetensors==0.8.0",
]

SEED = 1
IMAGE_SIZE = 56  # 4 x 4 patches of 14: 16 image tokens
CHECK_SIZES = [IMAGE_SIZE, 224]  # resize parity also at the real checkpoints' size
MAX_NEW_TOKENS = 8
GREYS = [0, 100, 187, 212, 255]
PROMPTS = [
    "what is happening here?",
    "caption en",
    "¿hay alguien en la puerta? sí o no",
]


def ensure_venv():
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"making {VENV} with {' '.join(PINNED)}", file=sys.stderr)
        venv.create(VENV, with_pip=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", *PINNED], check=True)
    os.execv(python, [str(python), __file__, *sys.argv[1:]])


def pictures():
    """Name -> RGB uint8 array. Deterministic: numpy's PCG64 with a fixed seed."""
    import numpy as np
    from PIL import Image, ImageDraw

    out = {}
    for g in GREYS:
        out[f"grey-{g}"] = np.full((30, 40, 3), g, dtype=np.uint8)

    y, x = np.mgrid[0:64, 0:96]
    out["gradient"] = np.stack(
        [x * 255 // 95, y * 255 // 63, 255 - (x + y) * 255 // 158], axis=-1
    ).astype(np.uint8)

    # A test card with what a camera picture has: colour bars, fine detail (a checkerboard
    # and thin lines, which alias without a low-pass), smooth shading, hard edges, noise.
    w, h = 320, 240
    card = Image.new("RGB", (w, h))
    bars = [(192, 192, 192), (192, 192, 0), (0, 192, 192), (0, 192, 0),
            (192, 0, 192), (192, 0, 0), (0, 0, 192)]
    d = ImageDraw.Draw(card)
    for i, c in enumerate(bars):
        d.rectangle([i * w // 7, 0, (i + 1) * w // 7 - 1, 119], fill=c)
    yy, xx = np.mgrid[0:120, 0:w]
    lower = np.stack(
        [xx * 255 // (w - 1), (np.sin(xx / 9.0) * 0.5 + 0.5) * 255, yy * 2],
        axis=-1,
    ).astype(np.uint8)
    card.paste(Image.fromarray(lower), (0, 120))
    for i in range(0, 80, 4):
        for j in range(0, 80, 4):
            if (i // 4 + j // 4) % 2 == 0:
                d.rectangle([200 + i, 140 + j, 201 + i, 141 + j], fill=(255, 255, 255))
    for k in range(0, 60, 3):
        d.line([(10 + k, 130), (70 + k, 230)], fill=(20, 20, 20), width=1)
    d.ellipse([90, 140, 180, 230], outline=(255, 255, 0), width=3, fill=(40, 60, 160))
    arr = np.asarray(card).astype(np.int16)
    noise = np.random.default_rng(SEED).normal(0, 6, arr.shape).round().astype(np.int16)
    out["card"] = np.clip(arr + noise, 0, 255).astype(np.uint8)
    return out


def main():
    ensure_venv()
    import numpy as np
    import torch
    import transformers
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import (
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--binary", help="a built free-roam (else `cargo run --release`)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    work = Path(tempfile.mkdtemp(prefix="paligemma-reference-"))
    model_dir = work / "tiny"
    cmd = [args.binary] if args.binary else ["cargo", "run", "--quiet", "--release", "--"]
    subprocess.run(
        cmd + ["dev", "make-tiny-model", str(model_dir),
               "--image-size", str(IMAGE_SIZE), "--seed", str(SEED)],
        check=True, cwd=ROOT,
    )
    weights_sha256 = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()

    (OUT / "images").mkdir(parents=True, exist_ok=True)
    (OUT / "reference").mkdir(parents=True, exist_ok=True)
    images = {}
    for name, arr in pictures().items():
        Image.fromarray(arr).save(OUT / "images" / f"{name}.png")
        # What the service reads is the file: load it back as a user's picture would be.
        images[name] = Image.open(OUT / "images" / f"{name}.png").convert("RGB")

    def processor_at(size, **kw):
        p = SiglipImageProcessorPil(size={"height": size, "width": size}, **kw)
        p.image_seq_length = (size // 14) ** 2
        return p

    # The resize alone (no rescale, no normalisation), as 8-bit pictures, at each size; and
    # the check that pixel_values is exactly (byte / 255 - 0.5) / 0.5 of that resize.
    pixels = {}
    for size in CHECK_SIZES:
        plain = processor_at(size, do_rescale=False, do_normalize=False)
        full = processor_at(size)
        for name, img in images.items():
            resized = plain(images=img, return_tensors="np")["pixel_values"][0]
            as_bytes = resized.round().clip(0, 255).astype(np.uint8)
            assert np.array_equal(as_bytes, resized), f"{name}: resize is not 8-bit"
            Image.fromarray(as_bytes.transpose(1, 2, 0)).save(OUT / "reference" / f"{name}-{size}.png")
            values = full(images=img, return_tensors="pt")["pixel_values"]
            expect = (torch.from_numpy(as_bytes).float() / 255 - 0.5) / 0.5
            assert torch.allclose(values[0], expect, atol=1e-6), f"{name}: normalisation"
            if size == IMAGE_SIZE:
                pixels[name] = values.contiguous()
    save_file(pixels, OUT / "pixels.safetensors")

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(model_dir / "tokenizer.json"),
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
    )
    processor = PaliGemmaProcessor(image_processor=processor_at(IMAGE_SIZE), tokenizer=tokenizer)
    model = PaliGemmaForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    image_token = tokenizer.convert_tokens_to_ids("<image>")

    cases = []
    for name, img in images.items():
        for prompt in PROMPTS:
            # "<image>" first, as the processor asks: it expands to the image tokens, then
            # adds <bos> before the prompt and "\n" after it.
            inputs = processor(images=img, text="<image>" + prompt, return_tensors="pt")
            assert not inputs["token_type_ids"].any(), "the whole prompt is prefix"
            ids = inputs["input_ids"][0].tolist()
            n_image = sum(1 for t in ids if t == image_token)
            assert n_image == (IMAGE_SIZE // 14) ** 2 and ids[:n_image] == [image_token] * n_image
            assert torch.equal(inputs["pixel_values"], pixels[name]), "processor pixels"
            with torch.no_grad():
                out = model.generate(
                    **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                    output_logits=True, return_dict_in_generate=True,
                )
            generated = out.sequences[0, len(ids):].tolist()
            if tokenizer.eos_token_id in generated:
                generated = generated[: generated.index(tokenizer.eos_token_id)]
            steps = []
            for logits in out.logits:
                top = torch.topk(logits[0].float(), 5)
                steps.append([[int(i), float(v)] for v, i in zip(top.values, top.indices)])
            cases.append({
                "image": name,
                "prompt": prompt,
                "prompt_ids": ids[n_image:],
                "tokens": generated,
                "text": tokenizer.decode(generated, skip_special_tokens=True),
                "top5": steps[0],
                "top5_per_step": steps,
            })

    golden = {
        "made_by": "scripts/reference/paligemma.py",
        "reference": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "model": "PaliGemmaForConditionalGeneration (eager attention, float32, CPU)",
            "processor": "PaliGemmaProcessor with SiglipImageProcessorPil (PIL bicubic)",
        },
        "model": {"seed": SEED, "image_size": IMAGE_SIZE, "weights_sha256": weights_sha256},
        "max_new_tokens": MAX_NEW_TOKENS,
        "check_sizes": CHECK_SIZES,
        "images": list(images),
        "cases": cases,
    }
    (OUT / "golden.json").write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(cases)} cases, {len(images)} pictures written to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
