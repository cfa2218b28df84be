"""InternVL 2.5 dynamic tiling (internvit.preprocess.tiling: dynamic_tiles, tile_image, tile_images).

Every expectation is independent of internvit:
    - the grid choice is compared with a literal copy of InternVL's `dynamic_preprocess` /
      `find_closest_aspect_ratio` (spec/internvit.md §4, written below) and with transformers'
      `get_optimal_tiled_canvas` (the GotOcr2 re-implementation, spec/peers.md §2);
    - tile pixels are compared byte for byte with Pillow calls written here, and after normalization with
      transformers' `GotOcr2ImageProcessorPil(crop_to_patches=True)`;
    - the worked examples are the table of spec §4.

Where transformers and InternVL disagree (two grids with the same tile count exactly as close to the image's aspect
ratio: transformers visits them in (columns, rows) order, InternVL in CPython set order), InternVL decides.
Run with `-s` to see how many such sizes were found.
"""

from __future__ import annotations

import itertools
import random
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from internvit.preprocess.tiling import (
    TileLayout,
    candidate_grids,
    choose_grid,
    dynamic_tiles,
    tile_budget,
    tile_image,
    tile_images,
)
from internvit.preprocess.transforms import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.unit

TILE = 448


# ---- the reference: InternVL's code, copied literally (spec §4; InternVL `load_image` helpers [S4, S9]) --------
# Only change: `image.resize(size)` spelled with its default filter, Image.BICUBIC, so Pillow's default cannot drift.


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float('inf')
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


def internvl_target_ratios(min_num, max_num):
    # calculate the existing image aspect ratio
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    return target_ratios


def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height

    target_ratios = internvl_target_ratios(min_num, max_num)

    # find the closest aspect ratio to the target
    target_aspect_ratio = find_closest_aspect_ratio(
        aspect_ratio, target_ratios, orig_width, orig_height, image_size)

    # calculate the target width and height
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]

    # resize the image
    resized_img = image.resize((target_width, target_height), Image.BICUBIC)
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size
        )
        # split the image
        split_img = resized_img.crop(box)
        processed_images.append(split_img)
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        thumbnail_img = image.resize((image_size, image_size), Image.BICUBIC)
        processed_images.append(thumbnail_img)
    return processed_images


# The set construction is deterministic (tuples of small ints hash the same in every CPython process), so caching
# the sorted list per (min, max) changes nothing but the runtime.
_RATIOS: dict[tuple[int, int], list[tuple[int, int]]] = {}


def internvl_grid(width: int, height: int, min_num: int, max_num: int, image_size: int = TILE) -> tuple[int, int]:
    key = (min_num, max_num)
    if key not in _RATIOS:
        _RATIOS[key] = internvl_target_ratios(min_num, max_num)
    return find_closest_aspect_ratio(width / height, _RATIOS[key], width, height, image_size)


# ---- image sizes for the grid sweep ---------------------------------------------------------------------


def _grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1) if min_tiles <= i * j <= max_tiles]


def _equidistant_sizes(min_tiles: int, max_tiles: int, scales: tuple[int, ...]) -> set[tuple[int, int]]:
    """(width, height) whose aspect ratio lies exactly half-way between two grids with the same tile count.

    The midpoint of a/b and c/d is (ad + bc) / 2bd; scaling both sides keeps the ratio and moves the area across the
    "more tiles only if the image is big enough" threshold.
    """
    out = set()
    for (a, b), (c, d) in itertools.combinations(_grids(min_tiles, max_tiles), 2):
        if a * b == c * d:
            out.update(((a * d + b * c) * k, 2 * b * d * k) for k in scales)
    return out


def sweep_cases() -> list[tuple[int, int, int, int]]:
    """(width, height, min_tiles, max_tiles), deterministic; more than 2,000 distinct sizes."""
    cases: set[tuple[int, int, int, int]] = set()
    # 1xN and Nx1, against every max_tiles in turn
    for n in list(range(1, 120)) + [448, 449, 896, 4479, 10_000, 65_535]:
        m = 1 + n % 40
        cases |= {(1, n, 1, m), (n, 1, 1, m), (1, n, 1, 12), (n, 1, 1, 12)}
    # exact grid ratios at several scales: (i, j) ties with (2i, 2j), (3i, 3j), ... and the area rule decides
    for i, j in _grids(1, 40):
        for k in (1, 3, 100, 224, 225, 448, 1000):
            cases.add((i * k, j * k, 1, 1 + (i * j * k) % 40))
            cases.add((i * k, j * k, 1, 12))
    # half-way between two grids with the same tile count, for every max_tiles
    for m in range(1, 41):
        cases |= {(w, h, 1, m) for w, h in _equidistant_sizes(1, m, (1, 64, 500))}
    # tiny and huge images, against every max_tiles
    special = [(1, 1), (2, 3), (3, 2), (1, 2), (2, 1), (7, 5), (20_000, 300), (300, 20_000), (50_000, 50_000),
               (50_000, 1), (1, 50_000), (448, 448), (800, 600), (1920, 1080), (300, 200), (1000, 1000),
               (2125, 1000), (1000, 2125)]
    for (w, h), m in itertools.product(special, range(1, 41)):
        cases.add((w, h, 1, m))
    # random sizes
    rng = random.Random(1234)
    for _ in range(1500):
        w, h = rng.randint(1, 5000), rng.randint(1, 5000)
        cases.add((w, h, 1, rng.randint(1, 40)))
    # min_tiles > 1: here same-count exact ties exist (see test_grid_disagreements_are_the_documented_tie)
    for mn in range(2, 9):
        for m in range(mn, mn + 12):
            cases |= {(w, h, mn, m) for w, h in _equidistant_sizes(mn, m, (1, 7, 500))}
        for w, h in special[:8]:
            cases.add((w, h, mn, 3 * mn))
    return sorted(cases)


CASES = sweep_cases()


@pytest.fixture(scope="module")
def hf_canvas():
    got = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    return got.get_optimal_tiled_canvas  # ((height, width), (tile_h, tile_w), min, max) -> (cols, rows)


def test_sweep_is_broad_enough():
    sizes = {(w, h) for w, h, _, _ in CASES}
    assert len(sizes) >= 2000
    assert {m for *_, m in CASES} == set(range(1, 41))
    assert {mn for _, _, mn, _ in CASES} >= {1, 2, 3, 4, 5, 6, 7, 8}
    assert {(1, 1), (2, 3), (20_000, 300), (50_000, 50_000), (2125, 1000)} <= sizes
    assert any(w == 1 and h > 100 for w, h in sizes) and any(h == 1 and w > 100 for w, h in sizes)


def test_candidate_grids_are_internvls_visiting_order():
    for mn, mx in [(1, 1), (1, 6), (1, 12), (1, 40), (2, 12), (4, 4), (5, 9), (8, 30)]:
        assert list(candidate_grids(mn, mx)) == internvl_target_ratios(mn, mx)
    assert len(candidate_grids(1, 12)) == 35  # spec §4


def test_grid_choice_equals_internvl_reference():
    mismatches = []
    for w, h, mn, mx in CASES:
        ours = choose_grid(w, h, min_tiles=mn, max_tiles=mx)
        ref = internvl_grid(w, h, mn, mx)
        if ours != ref:
            mismatches.append(((w, h, mn, mx), ours, ref))
    assert not mismatches, f"{len(mismatches)} sizes differ from InternVL, e.g. {mismatches[:5]}"


def test_grid_disagreements_are_the_documented_tie(hf_canvas):
    disagreements = []
    for w, h, mn, mx in CASES:
        ref = internvl_grid(w, h, mn, mx)
        hf = tuple(hf_canvas((h, w), (TILE, TILE), mn, mx))
        if hf == ref:
            continue
        disagreements.append(((w, h, mn, mx), ref, hf))
        # the only documented case: same tile count, exactly as close to the aspect ratio, and nothing closer
        ar = w / h
        d_ref, d_hf = abs(ar - ref[0] / ref[1]), abs(ar - hf[0] / hf[1])
        assert ref[0] * ref[1] == hf[0] * hf[1], (w, h, mn, mx, ref, hf)
        assert d_ref == d_hf, (w, h, mn, mx, ref, hf)
        assert d_ref == min(abs(ar - i / j) for i, j in _grids(mn, mx)), (w, h, mn, mx, ref, hf)
    print(f"\n[tiling] {len(disagreements)} of {len(CASES)} (size, min, max) cases: InternVL != GotOcr2;"
          f" e.g. {disagreements[:4]}", end="")
    # With min_tiles = 1 the case cannot happen: for grids (a, b), (c, d) with a*b = c*d and a/b < c/d
    # (so a < c, d < b), the grid (a, d) has fewer tiles and a ratio strictly between them, so it is closer.
    assert all(mn > 1 for (_, _, mn, _), _, _ in disagreements)
    # ... and with min_tiles > 1 it does, e.g. 10x4 with exactly 4 tiles: 4x1 and 2x2 are both 1.5 away from 2.5.
    assert ((10, 4, 4, 4), (4, 1), (2, 2)) in disagreements
    assert ((5000, 2000, 4, 4), (2, 2), (4, 1)) in disagreements  # big enough: the later candidate wins
    assert len(disagreements) >= 10


def test_tie_between_4x1_and_1x4_is_never_reached_with_min_tiles_1():
    """2125x1000 is half-way between 4x1 and 1x4 (tiling.py's docstring cites it), but 2x1 and 4x2 are much closer.

    2x1 and 4x2 tie exactly (both 0.125 away) and the image is big enough for 8 tiles, so 4x2 wins; the same-count
    pair 4x1/1x4 (1.875 away) is never reached, in InternVL or in transformers.
    """
    assert abs(2125 / 1000 - 4) == abs(2125 / 1000 - 1 / 4) == 1.875
    assert choose_grid(2125, 1000, max_tiles=12) == internvl_grid(2125, 1000, 1, 12) == (4, 2)
    assert choose_grid(2125, 1000, max_tiles=4) == internvl_grid(2125, 1000, 1, 4) == (2, 1)
    assert choose_grid(1000, 2125, max_tiles=12) == internvl_grid(1000, 2125, 1, 12) == (2, 4)


@pytest.mark.parametrize(
    "size, grid, tiles",
    [((448, 448), (1, 1), 1), ((800, 600), (4, 3), 13), ((1920, 1080), (4, 2), 9), ((300, 200), (3, 2), 7),
     ((1000, 1000), (3, 3), 10)],
)
def test_spec_worked_examples(size, grid, tiles):
    assert choose_grid(*size, max_tiles=12) == grid
    out, layout = dynamic_tiles(Image.new("RGB", size, (10, 20, 30)), max_tiles=12, use_thumbnail=True)
    assert layout.grid == grid and layout.num_tiles == tiles == len(out)
    assert layout.thumbnail == (tiles > 1)
    assert all(t.size == (TILE, TILE) and t.mode == "RGB" for t in out)


def test_min_and_max_tiles_are_validated():
    with pytest.raises(ValueError):
        choose_grid(100, 100, min_tiles=0, max_tiles=4)
    with pytest.raises(ValueError):
        choose_grid(0, 100)


def test_min_above_max_gives_one_tile_as_internvl():
    # A shared multi-image budget below min_tiles leaves InternVL's candidate set empty: the image stays one tile.
    assert choose_grid(1000, 500, min_tiles=5, max_tiles=4) == (1, 1)


# ---- pixels --------------------------------------------------------------------------------------------


def _photos() -> dict[str, Image.Image]:
    data = pytest.importorskip("skimage.data")
    photos = {name: Image.fromarray(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket")}
    photos["coffee_rotated"] = photos["coffee"].transpose(Image.Transpose.ROTATE_90)  # 400x600, portrait
    photos["astronaut_portrait_crop"] = photos["astronaut"].crop((100, 0, 250, 512))  # 150x512
    photos["rocket_strip"] = photos["rocket"].crop((0, 150, 640, 250))  # 640x100
    return photos


PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "coffee_rotated", "astronaut_portrait_crop", "rocket_strip"]


@pytest.fixture(scope="module")
def photos():
    return _photos()


def test_photos_cover_several_grids(photos):
    grids = {choose_grid(*photos[n].size, max_tiles=12) for n in PHOTOS}
    assert {(1, 1), (3, 2), (2, 3), (1, 3)} <= grids and len(grids) >= 5


@pytest.mark.parametrize("name", PHOTOS)
def test_tiles_equal_internvl_pixels(photos, name):
    image = photos[name]
    ref = dynamic_preprocess(image, min_num=1, max_num=12, image_size=TILE, use_thumbnail=True)
    tiles, layout = dynamic_tiles(image, max_tiles=12, use_thumbnail=True)
    assert len(tiles) == len(ref) == layout.num_tiles
    for k, (ours, theirs) in enumerate(zip(tiles, ref)):
        assert ours.size == theirs.size and ours.mode == theirs.mode == "RGB"
        assert ours.tobytes() == theirs.tobytes(), f"{name}: tile {k} differs"

    # the same thing spelled out: resize to the grid, crop in raster order, thumbnail = whole image squashed, last
    cols, rows = layout.grid
    resized = image.resize((cols * TILE, rows * TILE), Image.BICUBIC)
    raster = [resized.crop((c * TILE, r * TILE, (c + 1) * TILE, (r + 1) * TILE))
              for r in range(rows) for c in range(cols)]
    if cols * rows > 1:
        raster.append(image.resize((TILE, TILE), Image.BICUBIC))
    assert [t.tobytes() for t in tiles] == [t.tobytes() for t in raster]


def test_no_thumbnail_when_asked(photos):
    tiles, layout = dynamic_tiles(photos["coffee"], max_tiles=12, use_thumbnail=False)
    assert layout.grid == (3, 2) and not layout.thumbnail and len(tiles) == layout.num_tiles == 6
    ref = dynamic_preprocess(photos["coffee"], max_num=12, use_thumbnail=False)
    assert [t.tobytes() for t in tiles] == [t.tobytes() for t in ref]


@pytest.fixture(scope="module")
def got_ocr2_processor():
    got = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    # GotOcr2ImageProcessorPil: class resample is BICUBIC (used for the grid resize and the thumbnail), the
    # thumbnail is `resize(image, size)` of the whole image appended last, rescale 1/255 then normalize.
    return got.GotOcr2ImageProcessorPil(
        crop_to_patches=True, min_patches=1, max_patches=12, size={"height": TILE, "width": TILE},
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_rescale=True, do_normalize=True,
    ), got.get_optimal_tiled_canvas


@pytest.mark.parametrize("name", PHOTOS)
def test_tiles_equal_transformers_got_ocr2(photos, got_ocr2_processor, name):
    processor, canvas = got_ocr2_processor
    image = photos[name]
    w, h = image.size
    assert tuple(canvas((h, w), (TILE, TILE), 1, 12)) == choose_grid(w, h, max_tiles=12)  # grids agree here
    theirs = processor(images=image, return_tensors="pt")
    ours = tile_image(image, max_tiles=12)
    assert int(theirs["num_patches"][0]) == ours.layout.num_tiles == ours.pixel_values.shape[0]
    expected = theirs["pixel_values"].float()
    assert ours.pixel_values.shape == expected.shape == (ours.layout.num_tiles, 3, TILE, TILE)
    assert (ours.pixel_values - expected).abs().max().item() <= 1e-5


# ---- TileLayout, budgets, several images ------------------------------------------------------------------


def _check_partition(layout: TileLayout, width: int, height: int) -> None:
    cols, rows = layout.grid
    assert layout.image_size == (width, height)
    assert len(layout.boxes) == cols * rows
    for k, (l, t, r, b) in enumerate(layout.boxes):
        row, col = divmod(k, cols)  # raster order
        exact = (Fraction(col * width, cols), Fraction(row * height, rows),
                 Fraction((col + 1) * width, cols), Fraction((row + 1) * height, rows))
        for got, want in zip((l, t, r, b), exact):
            assert abs(Fraction(got) - want) <= Fraction(1, 10**9), (k, (l, t, r, b), exact)
        if col > 0:  # shares its left edge with its left neighbour, no gap, no overlap
            assert l == layout.boxes[k - 1][2] and (t, b) == layout.boxes[k - 1][1::2]
        if row > 0:
            assert t == layout.boxes[k - cols][3] and (l, r) == layout.boxes[k - cols][0::2]
    # the union is the whole image: outer edges on the image border
    assert all(box[0] == 0 for box in layout.boxes[::cols]) and all(box[1] == 0 for box in layout.boxes[:cols])
    assert all(box[2] == width for box in layout.boxes[cols - 1::cols]), layout.boxes
    assert all(box[3] == height for box in layout.boxes[-cols:]), layout.boxes
    area = sum((Fraction(r) - Fraction(l)) * (Fraction(b) - Fraction(t)) for l, t, r, b in layout.boxes)
    assert abs(area - width * height) <= Fraction(1, 10**6)


@pytest.mark.parametrize(
    "size, max_tiles",
    [((1920, 1080), 12), ((800, 600), 12), ((300, 200), 12), ((451, 300), 12), ((1, 1), 12), ((1000, 1000), 12),
     ((20_000, 300), 12), ((300, 1000), 40), ((640, 100), 6), ((97, 61), 30), ((500, 450), 40),
     ((29, 4), 12), ((4, 29), 12), ((1, 15), 11)],  # edges that c * (w / cols) would miss by an ulp
)
def test_layout_boxes_tile_the_image(size, max_tiles):
    w, h = size
    tiles, layout = dynamic_tiles(Image.new("RGB", size), max_tiles=max_tiles, tile_size=28)
    assert layout.grid == internvl_grid(w, h, 1, max_tiles, image_size=28)
    assert layout.tile_size == 28 and all(t.size == (28, 28) for t in tiles)
    assert layout.num_tiles == len(tiles) == len(layout.boxes) + int(layout.thumbnail)
    _check_partition(layout, w, h)


def test_layout_boxes_map_tiles_back_to_pixels():
    """Each tile shows the part of the image inside its box: a 3x2 image of 6 coloured blocks."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    image = Image.new("RGB", (300, 200))
    for k, c in enumerate(colours):
        image.paste(c, (100 * (k % 3), 100 * (k // 3), 100 * (k % 3 + 1), 100 * (k // 3 + 1)))
    tiles, layout = dynamic_tiles(image, max_tiles=12, tile_size=56)
    assert layout.grid == (3, 2) and layout.boxes[4] == (100.0, 100.0, 200.0, 200.0)
    for k, (tile, box) in enumerate(zip(tiles, layout.boxes)):
        centre = np.asarray(tile)[28, 28]
        assert tuple(centre) == colours[k]
        assert tuple(np.asarray(image)[int((box[1] + box[3]) / 2), int((box[0] + box[2]) / 2)]) == colours[k]


@pytest.mark.parametrize("n, max_tiles, expected",
                         [(1, 12, 12), (2, 12, 6), (3, 12, 4), (5, 12, 2), (12, 12, 1), (13, 12, 1), (40, 6, 1),
                          (2, 1, 1), (4, 40, 10)])
def test_tile_budget(n, max_tiles, expected):
    assert tile_budget(n, max_tiles) == expected == max(1, max_tiles // n)


def test_tile_budget_rejects_no_images():
    with pytest.raises(ValueError):
        tile_budget(0, 12)


@pytest.mark.parametrize("n_images", [1, 3, 5, 13])
def test_tile_images_share_budget(n_images):
    sizes = [(300, 200), (200, 300), (1000, 250), (90, 90), (640, 100)]
    images = [Image.new("RGB", sizes[k % len(sizes)], (k * 17 % 256, 40, 90)) for k in range(n_images)]
    budget = max(1, 12 // n_images)
    shared = tile_images(images, max_tiles=12, share_budget=True, tile_size=56)
    alone = tile_images(images, max_tiles=12, share_budget=False, tile_size=56)
    assert len(shared) == len(alone) == n_images
    for im, s, a in zip(images, shared, alone):
        w, h = im.size
        assert s.layout.grid == internvl_grid(w, h, 1, budget, image_size=56)
        assert a.layout.grid == internvl_grid(w, h, 1, 12, image_size=56)
        cols, rows = s.layout.grid
        assert cols * rows <= budget
        assert s.pixel_values.shape == (cols * rows + int(cols * rows > 1), 3, 56, 56)
        ref = dynamic_preprocess(im, max_num=budget, image_size=56, use_thumbnail=True)
        expected = np.stack([(np.asarray(t, np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD for t in ref])
        np.testing.assert_allclose(s.pixel_values.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5, rtol=0)
    if n_images >= 12:
        assert all(s.layout.num_tiles == 1 and not s.layout.thumbnail for s in shared)
