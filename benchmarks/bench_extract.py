"""End to end: `internvit extract --tiles dynamic` on real-sized photos against the model card's way of working.

In one run on this machine:
    1. makes N real-sized JPEG photos (3 to 12 MP, several aspect ratios) from scikit-image's photographs;
    2. `internvit.extract_features(..., tiles="dynamic")` (what `internvit extract` runs): images/s, tiles/s,
       and the share of the time the encoder is busy (decoding, tiling and writing overlap it in workers);
    3. the model alone on the same number of tiles (random pixels, same micro-batch): the ceiling for 2.;
    4. the model card's way: for each photo `Image.open().convert('RGB')`, `dynamic_preprocess`, torchvision's
       `build_transform`, then one forward per image, nothing overlapped; with timm's
       `vit_intern300m_patch14_448` as the encoder (the remote-code model it uses cannot be loaded here; timm is
       faster than its naive attention, so this baseline is on the generous side).
Writes benchmarks/results/extract_<cpu>_<date>.{json,md}.

    python benchmarks/bench_extract.py [--photos 32] [--max-tiles 6] [--dtype bf16] [--backend openvino]

With `--backend openvino` (or onnxruntime), 2. is `extract --backend openvino` and 3. is that backend's encoder
alone (`from_pretrained(..., backend=...)`), loaded from the export cache the first load fills (its export and
compile times are reported apart); the target is extract >= 0.95x the backend's model-only throughput.

Needs the `bench` extra and scikit-image.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SIZES = [(4032, 3024), (3024, 4032), (4000, 2250), (2250, 4000), (3000, 2000), (2048, 1536), (1920, 1080),
         (2448, 3264)]


def make_photos(folder: Path, n: int) -> list[Path]:
    """Real-sized JPEGs: scikit-image's colour photographs, cropped, flipped and resized to camera sizes."""
    import numpy as np
    import skimage.data as data
    from PIL import Image, ImageOps

    sources = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "retina", "hubble_deep_field", "immunohistochemistry"):
        try:
            sources.append(Image.fromarray(getattr(data, name)()).convert("RGB"))
        except Exception:  # a data file that would need a download
            pass
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        img = sources[i % len(sources)]
        w, h = SIZES[i % len(SIZES)]
        x0, y0 = int(rng.integers(0, img.width // 8)), int(rng.integers(0, img.height // 8))
        crop = img.crop((x0, y0, img.width - int(rng.integers(0, img.width // 8)), img.height))
        if i % 3 == 1:
            crop = ImageOps.mirror(crop)
        path = folder / f"photo_{i:03d}.jpg"
        crop.resize((w, h), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


# The model card's helpers (spec/internvit.md §3.2, §4; InternVL README), as users copy them.
def build_transform(input_size):
    import torchvision.transforms as T
    from torchvision.transforms.functional import InterpolationMode

    return T.Compose([
        T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
        T.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    target_aspect_ratio = find_closest_aspect_ratio(aspect_ratio, target_ratios, orig_width, orig_height, image_size)
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = ((i % (target_width // image_size)) * image_size, (i // (target_width // image_size)) * image_size,
               ((i % (target_width // image_size)) + 1) * image_size,
               ((i // (target_width // image_size)) + 1) * image_size)
        processed_images.append(resized_img.crop(box))
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images


def load_image(image_file, input_size=448, max_num=12):
    import torch
    from PIL import Image

    image = Image.open(image_file).convert("RGB")
    transform = build_transform(input_size=input_size)
    images = dynamic_preprocess(image, image_size=input_size, use_thumbnail=True, max_num=max_num)
    return torch.stack([transform(image) for image in images])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=32)
    ap.add_argument("--max-tiles", type=int, default=6)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=8, help="extract's --batch-size (tiles per forward)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backend", default="torch", choices=["torch", "openvino", "onnxruntime"])
    ap.add_argument("--no-card", action="store_true", help="skip the model card's way (3.)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import timm
    import torch
    from PIL import Image

    import internvit
    from internvit.weights import init_checkpoint

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_vit import machine, to_timm, write_results

    report = {"date": dt.date.today().isoformat(), "machine": machine(), "photos": args.photos,
              "max_tiles": args.max_tiles, "dtype": args.dtype, "batch_size": args.batch_size, "workers": args.workers,
              "backend": args.backend}
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "photos").mkdir()
        photos = make_photos(tmp / "photos", args.photos)
        report["megapixels"] = [round(w * h / 1e6, 1) for w, h in (Image.open(p).size for p in photos)]
        ckpt = init_checkpoint(tmp / "ckpt", preset="300m", dtype=args.dtype)
        import os

        os.environ["INTERNVIT_CACHE"] = str(tmp / "cache")  # a cold cache: the first load exports and compiles
        if args.backend != "torch":
            print(f"[bench] first load with --backend {args.backend} (export + compile) ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            internvit.from_pretrained(ckpt, backend=args.backend, dtype=args.dtype)
            report["first_load_seconds"] = time.perf_counter() - t

        print(f"[bench] internvit extract --backend {args.backend} ...", file=sys.stderr, flush=True)
        s = internvit.extract_features([tmp / "photos"], tmp / "f.parquet", model=str(ckpt), dtype=args.dtype,
                                       device="cpu", tiles="dynamic", max_tiles=args.max_tiles,
                                       batch_size=args.batch_size, num_workers=args.workers, progress=False,
                                       backend=args.backend)
        run_s = s.seconds - s.load_seconds
        report["extract"] = {"seconds_total": s.seconds, "load_seconds": s.load_seconds, "run_seconds": run_s,
                             "tiles": s.tiles, "images_per_s": args.photos / run_s, "tiles_per_s": s.tiles / run_s,
                             "model_busy_share": s.model_seconds / run_s, "failed": s.failed}

        print("[bench] the model alone ...", file=sys.stderr, flush=True)
        model = internvit.from_pretrained(ckpt, backend=args.backend, dtype=args.dtype)
        n = min(s.tiles, 4 * args.batch_size)
        x = torch.randn(n, 3, 448, 448, dtype=model.dtype)
        with torch.inference_mode():
            model(x[:1])
            t = time.perf_counter()
            for i in range(0, n, args.batch_size):
                model(x[i:i + args.batch_size])
            model_s = time.perf_counter() - t
        report["model_only"] = {"tiles": n, "seconds": model_s, "tiles_per_s": n / model_s}
        if args.no_card:
            report["model_card_way"] = None
            e, m = report["extract"], report["model_only"]
            report["extract_vs_model_only"] = e["tiles_per_s"] / m["tiles_per_s"]
            md = markdown(report)
            write_results(args.out, f"extract-{args.backend}" if args.backend != "torch" else "extract", report, md)
            print(md)
            return
        if args.backend != "torch":
            del model
            model = internvit.from_pretrained(ckpt, dtype=args.dtype)

        print("[bench] the model card's way (timm encoder) ...", file=sys.stderr, flush=True)
        vit = timm.create_model("vit_intern300m_patch14_448", pretrained=False)
        vit.load_state_dict(to_timm({k: v.float() for k, v in model.state_dict().items()}))
        vit = vit.to(dtype).eval()
        del model
        tiles = 0
        with torch.inference_mode():
            vit.forward_features(torch.randn(1, 3, 448, 448, dtype=dtype))
            t = time.perf_counter()
            for p in photos:
                pixel_values = load_image(p, max_num=args.max_tiles).to(dtype)
                vit.forward_features(pixel_values)
                tiles += pixel_values.shape[0]
            card_s = time.perf_counter() - t
        report["model_card_way"] = {"seconds": card_s, "tiles": tiles, "images_per_s": args.photos / card_s,
                                    "tiles_per_s": tiles / card_s}

    e, m, c = report["extract"], report["model_only"], report["model_card_way"]
    report["extract_vs_model_only"] = e["tiles_per_s"] / m["tiles_per_s"]
    report["extract_vs_model_card"] = e["images_per_s"] / c["images_per_s"]
    md = markdown(report)
    write_results(args.out, f"extract-{args.backend}" if args.backend != "torch" else "extract", report, md)
    print(md)


def markdown(r: dict) -> str:
    m, e, mo, c = r["machine"], r["extract"], r["model_only"], r["model_card_way"]
    backend = r.get("backend", "torch")
    flag = f" --backend {backend}" if backend != "torch" else ""
    first = (f" First load of the {backend} backend on a cold cache (export + validation + compile): "
             f"{r['first_load_seconds']:.1f} s; extract's load below is from the cache." if "first_load_seconds" in r
             else "")
    card = [] if c is None else [
        f"| the model card's way (timm encoder) | {c['seconds']:.1f} | {c['images_per_s']:.3f} | "
        f"{c['tiles_per_s']:.3f} | PIL + dynamic_preprocess + one forward per image |"]
    ratio_card = "" if c is None else f"; extract / model card's way: **{r['extract_vs_model_card']:.2f}x**"
    return "\n".join([
        f"# End-to-end extraction, {m['cpu']} (family {m['cpu_family']}), {r['date']}",
        "",
        f"{m['cores']} cores; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) +
        f". {r['photos']} JPEG photos of {min(r['megapixels'])}-{max(r['megapixels'])} MP, dynamic tiles up to "
        f"{r['max_tiles']} + thumbnail ({e['tiles']} tiles), {r['dtype']}, random 300M weights; extract with "
        f"--batch-size {r['batch_size']} --workers {r['workers']}.{first}",
        "",
        "| | seconds | images/s | tiles/s | note |",
        "|---|---|---|---|---|",
        f"| `internvit extract --tiles dynamic{flag}` | {e['run_seconds']:.1f} | {e['images_per_s']:.3f} | "
        f"{e['tiles_per_s']:.3f} | model busy {100 * e['model_busy_share']:.0f}% of the time; "
        f"+{e['load_seconds']:.1f} s model load |",
        f"| the {backend} model alone ({mo['tiles']} tiles) | {mo['seconds']:.1f} | | {mo['tiles_per_s']:.3f} | "
        "the ceiling |",
        *card,
        "",
        f"extract / model alone: **{100 * r['extract_vs_model_only']:.0f}%** of the model-only throughput"
        f"{ratio_card}.",
        "",
    ])


if __name__ == "__main__":
    main()
