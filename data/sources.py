"""Two datasets `python -m data.prepare` builds from sources other than a published benchmark folder: the
natural-image source domain and the Fashion-MNIST target of the small reproduction (SMALL_REPRODUCTION.md).

    python -m data.prepare natural_crops                           # from Debian packages (apt-get download)
    python -m data.prepare natural_crops --src ~/imagenet_subset   # the same from any folder of images
    python -m data.prepare fashion_mnist --shots 20                # Debian's dataset-fashion-mnist
    python -m data.prepare fashion_mnist --src ~/fashion-mnist --shots 20 --name fashion_mnist_20

natural_crops   random square crops of natural(-ish) images, resized to --crop_size (32: vit-mae-tiny's input)
                and stored as PNG, label 0. The images: without --src, those in the Debian packages of
                --packages (game texture packs, clip art, Tux Paint's cut-out photos, desktop wallpapers,
                scikit-image's sample photos), fetched with `apt-get download` into --download_dir and
                unpacked there with `dpkg-deb -x` (no root needed); with --src, every image under that folder.
                Images inside .pk3/.zip archives count too (the texture packs ship as .pk3). Dropped: material
                maps (normal, bump, gloss, specular, height, glow, colour-mask maps, by the usual file-name
                suffixes), symbolic links, unreadable files, images with a shorter side below --crop_size or
                more than MAX_PIXELS pixels, near-flat images, and duplicates (the same 16x16 average hash of
                the grey image; the first in path order is kept). Transparent pixels are put on white. Each
                kept image gets its share of the crops (the counts differ by at most one), side uniform in
                [max(crop_size, --crop_min_scale x shorter side), shorter side], position uniform, mirrored
                half of the time, seeded by --seed and the image's name, so the crops do not depend on
                --workers; a near-flat crop is drawn again (up to FLAT_CROP_TRIES times, then left out).
                train: --crops crops. test: crops of the held-out images (--heldout_fraction of the kept
                images, never cropped for train), as many per image as train has.
fashion_mnist   Fashion-MNIST (Xiao et al. 2017, 28x28 grey, 10 classes) from its four idx files, gzip or not:
                without --src those of the Debian package dataset-fashion-mnist (fetched as above), with --src
                a folder holding train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
                t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]. train: --shots images per class
                drawn with --seed (default: all 60,000); test: all 10,000. Stored as grey PNG. An image written twice
                (the same pixels within a split or in both: t10k files that copy the training files) is refused.

Both write counts.json in data.prepare's format (classes, per-split counts), plus where the images came from
(package names and versions, or the folder), the settings, and for natural_crops the images kept and dropped
for each reason; fashion_mnist adds the indices of the chosen training images in the 60,000.
"""
import gzip
import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import uuid
import warnings
import zipfile
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from PIL import Image

from data.build import check_target, report, write_dataset
from data.datasets import DATASETS, to_8bit
from errors import UserError

# ---------------------------------------------------------------- settings

DEBIAN_IMAGE_PACKAGES = (
    "nexuiz-textures", "ufoai-textures", "openarena-081-textures", "colobot-common-textures",  # game textures
    "openclipart-png", "tuxpaint-stamps-default",  # clip art; Tux Paint's stamps are mostly cut-out photos
    "plasma-workspace-wallpapers", "mate-backgrounds", "desktop-base", "gnome-backgrounds",  # wallpapers
    "python3-skimage",  # scikit-image's sample photographs (astronaut, coffee, chelsea, ...)
)
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_PACKAGE_DIR = os.path.join("usr", "share", "datasets", "fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
NATURAL_CLASSES = ["natural"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tga", ".bmp", ".tif", ".tiff", ".webp")
ARCHIVE_SUFFIXES = (".pk3", ".zip")
# Material maps of game textures: per-pixel normals, bump/height, gloss/specular/roughness, glow and colour
# masks (Quake/DarkPlaces: _norm _bump _gloss _glow _pants _shirt; UFO:AI: _nm _sm _gm _hm), not pictures.
MATERIAL_MAP = re.compile(r"_(norm|normal|normals|nm|bump|gloss|gm|spec|specular|sm|height|hm|disp|displacement|"
                          r"rough|roughness|metal|metallic|ao|occlusion|glow|luma|pants|shirt|reflect|mask)$",
                          re.IGNORECASE)
MAX_PIXELS = 40_000_000  # a few clip-art PNGs are 20,000 x 30,000 (2.5 GB decoded); none is needed
FLAT_STD = 8.0  # grey-level standard deviation (0..255) below which an image or a crop counts as near-flat
FLAT_CROP_TRIES = 50  # clip art on white: with 10 tries, 2.7 % of the crops were left out
HASH_SIDE = 16  # the average hash: HASH_SIDE**2 bits
FLATNESS_SIDE = 256  # an image's flatness is measured on a copy no larger than this


# ---------------------------------------------------------------- Debian packages

def _hint(name: str) -> str:
    if name == "natural_crops":
        return "or pass --src DIR, a folder of images of your own"
    if name == "fortunes":  # data/text_sources.py
        return "or pass --src DIR, the unpacked fortunes package"
    return "or pass --src DIR, a folder holding Fashion-MNIST's four idx files"


def _run_tool(cmd: list[str], cwd: str, name: str) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except OSError as e:
        raise UserError(f"cannot run {cmd[0]}: {e}; {_hint(name)}") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit code {done.returncode}"
        if "Unable to locate package" in why:
            why += " (refresh the package lists with `apt-get update`)"
        elif cmd[0] == "apt-get":
            why += " (no network, or no access to the Debian archive?)"
        raise UserError(f"`{' '.join(cmd[:3])} ...` failed: {why}; {_hint(name)}")
    return done.stdout


def fetch_debian_packages(packages: list[str], download_dir: str, name: str) -> list[dict]:
    """Each package's .deb downloaded into `download_dir` (`apt-get download`, which skips a .deb already
    there) and unpacked next to it into `<deb file name without .deb>/` (`dpkg-deb -x`, no root needed;
    unpacked once, into a temporary folder first). Returns [{package, version, deb, root}]."""
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"{name} without --src downloads Debian packages with apt-get and dpkg-deb, and "
                        f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on PATH (install "
                        f"apt and dpkg, or work on Debian or Ubuntu); {_hint(name)}")
    download_dir = os.path.abspath(download_dir)
    print(f"{name}: fetching the Debian packages {' '.join(packages)} into {download_dir} ...", flush=True)
    os.makedirs(download_dir, exist_ok=True)
    # `--print-uris` names the file of the version apt will fetch, without fetching: 'URL' FILE SIZE HASH; it
    # leaves out the files already in its working directory, so it runs in an empty one
    with tempfile.TemporaryDirectory() as empty:
        uris = _run_tool(["apt-get", "download", "--print-uris", *packages], empty, name)
    debs = [line.split()[1] for line in uris.splitlines() if line.startswith("'") and len(line.split()) >= 2]
    if len(debs) != len(packages):
        raise UserError(f"`apt-get download --print-uris` named {len(debs)} files for {len(packages)} packages "
                        f"({', '.join(packages)}); {_hint(name)}")
    _run_tool(["apt-get", "download", *packages], download_dir, name)
    fetched = []
    for deb in debs:
        path = os.path.join(download_dir, deb)
        if not os.path.isfile(path):
            raise UserError(f"apt-get download did not leave {path}; {_hint(name)}")
        control = _run_tool(["dpkg-deb", "--field", path, "Package", "Version"], download_dir, name)
        fields = dict(line.split(":", 1) for line in control.splitlines() if ":" in line)
        if not {"Package", "Version"} <= set(fields):
            raise UserError(f"{path}: dpkg-deb --field gave no Package and Version ({control.strip()!r}); "
                            f"delete the file to download it again, {_hint(name)}")
        root = os.path.join(download_dir, deb[:-len(".deb")] if deb.endswith(".deb") else deb + ".unpacked")
        if not os.path.isdir(root):
            partial = f"{root}.partial-{uuid.uuid4().hex[:8]}"
            try:
                _run_tool(["dpkg-deb", "-x", path, partial], download_dir, name)
                os.rename(partial, root)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        fetched.append({"package": fields["Package"].strip(), "version": fields["Version"].strip(), "deb": deb,
                        "root": root})
    return fetched


# ---------------------------------------------------------------- images of a folder tree

class Candidate(NamedTuple):
    name: str  # '<source>/<path>' or '<source>/<archive>!<member>': reported, and it seeds the image's crops
    path: str
    member: str | None  # inside a .pk3/.zip archive
    source: str  # the package (or folder) it came from


def find_images(root: str, label: str) -> tuple[list[Candidate], int]:
    """The image files under `root` (sorted; hidden entries and symbolic links left out) and the images inside
    its .pk3/.zip archives; also the number of material maps left out by name."""
    found, material = [], 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in sorted(f for f in files if not f.startswith(".")):
            path = os.path.join(folder, file)
            rel = os.path.join(label, os.path.relpath(path, root))
            if os.path.islink(path):
                continue  # a second name for a file that is listed anyway (openclipart-png has ~1,200)
            if file.lower().endswith(ARCHIVE_SUFFIXES):
                try:
                    with zipfile.ZipFile(path) as archive:
                        members = sorted(m for m in archive.namelist() if m.lower().endswith(IMAGE_SUFFIXES))
                except (OSError, zipfile.BadZipFile) as e:
                    raise UserError(f"cannot read the archive {path}: {e}") from None
                names = [(f"{rel}!{m}", m) for m in members]
            elif file.lower().endswith(IMAGE_SUFFIXES):
                names = [(rel, None)]
            else:
                continue
            for name, member in names:
                if MATERIAL_MAP.search(os.path.splitext(os.path.basename(member or file))[0]):
                    material += 1
                else:
                    found.append(Candidate(name, path, member, label))
    return found, material


_archives = threading.local()  # one open ZipFile per archive and thread


def _read(candidate: Candidate) -> bytes:
    if candidate.member is None:
        with open(candidate.path, "rb") as f:
            return f.read()
    opened = _archives.__dict__.setdefault("open", {})
    if candidate.path not in opened:
        opened[candidate.path] = zipfile.ZipFile(candidate.path)
    return opened[candidate.path].read(candidate.member)


def _rgb(image_bytes: bytes) -> Image.Image:
    """The picture as 8-bit RGB, transparent pixels on white; a too large one refused before decoding."""
    try:
        img = Image.open(io.BytesIO(image_bytes))
    except Image.DecompressionBombError:  # more than twice PIL's limit, far above ours
        raise _TooLarge from None
    if img.width * img.height > MAX_PIXELS:
        raise _TooLarge
    img = to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


class _TooLarge(Exception):
    pass


def _grey_std(img: Image.Image) -> float:
    return float(np.asarray(img.convert("L"), dtype=np.float64).std())


def _survey(candidate: Candidate, crop_size: int) -> tuple[str | None, bytes | None]:
    """(why the image is dropped or None, its average hash): one decode, nothing kept."""
    try:
        img = _rgb(_read(candidate))
    except _TooLarge:
        return "too large", None
    except Exception:  # truncated, not an image, an unsupported variant of a format, a broken archive member
        return "unreadable", None
    if min(img.size) < crop_size:
        return "too small", None
    small = img.copy()
    small.thumbnail((FLATNESS_SIDE, FLATNESS_SIDE), Image.BOX)
    if _grey_std(small) < FLAT_STD:
        return "near-flat", None
    grey = np.asarray(small.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.BOX), dtype=np.float64)
    return None, np.packbits(grey > grey.mean()).tobytes()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _crops(candidate: Candidate, count: int, crop_size: int, min_scale: float, seed: int) -> tuple[list[bytes], int]:
    """`count` crops of one image as PNG bytes, and the number left out as near-flat after FLAT_CROP_TRIES."""
    img = _rgb(_read(candidate))
    rng = np.random.default_rng([seed, zlib.crc32(candidate.name.encode())])
    short = min(img.size)
    smallest = min(short, max(crop_size, round(min_scale * short)))
    crops, flat = [], 0
    for _ in range(count):
        for _ in range(FLAT_CROP_TRIES):
            side = int(rng.integers(smallest, short + 1))
            left, top = int(rng.integers(0, img.width - side + 1)), int(rng.integers(0, img.height - side + 1))
            crop = img.crop((left, top, left + side, top + side)).resize((crop_size, crop_size), Image.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            if _grey_std(crop) >= FLAT_STD:
                crops.append(_png(crop))
                break
        else:
            flat += 1
    return crops, flat


def _shares(total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """`total` split over n images as evenly as possible; which images get one more is drawn."""
    shares = np.full(n, total // n, dtype=np.int64)
    shares[rng.permutation(n)[:total % n]] += 1
    return shares


# ---------------------------------------------------------------- natural_crops

def natural_crops(args, packages: list[dict] | None, roots: list[tuple[str, str]]):
    """(splits {split: records}, information for counts.json) from the images under `roots` [(folder, label)]."""
    # PIL warns on opening an image above its own limit; ours (MAX_PIXELS) refuses it before decoding anyway
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    candidates, material, per_source = [], 0, {}
    for root, label in roots:
        found, maps = find_images(root, label)
        candidates += found
        material += maps
        per_source[label] = {"candidates": len(found) + maps, "material maps": maps, "kept": 0}
    print(f"natural_crops: {len(candidates) + material} candidate images ({material} material maps left out); "
          f"decoding each to survey it ...", flush=True)
    dropped, seen, kept = Counter({"material map": material}), set(), []
    unreadable = []
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for candidate, (why, digest) in zip(candidates, pool.map(lambda c: _survey(c, args.crop_size), candidates)):
            if why is None and digest in seen:
                why = "duplicate"
            if why is not None:
                dropped[why] += 1
                if why == "unreadable":
                    unreadable.append(candidate.name)
                continue
            seen.add(digest)
            kept.append(candidate)
    if len(kept) < 2:
        where = args.src or ", ".join(p["package"] for p in packages)
        raise UserError(f"{where}: {len(kept)} usable images of {len(candidates) + material} found (dropped: "
                        f"{_dropped_text(dropped)}); natural_crops needs at least 2 (one for each split)")

    # ---- which images are held out, and how many crops each image gives: drawn before any crop is made
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(kept))
    n_test = min(max(round(args.heldout_fraction * len(kept)), 1 if args.heldout_fraction > 0 else 0), len(kept) - 1)
    if n_test == 0:
        raise UserError(f"--heldout_fraction {args.heldout_fraction} holds out none of the {len(kept)} images; "
                        f"the test split needs at least one")
    images = {"test": sorted(order[:n_test].tolist()), "train": sorted(order[n_test:].tolist())}
    num_crops = {"train": args.crops, "test": max(1, round(args.crops * n_test / (len(kept) - n_test)))}
    shares = {split: _shares(num_crops[split], len(images[split]), rng) for split in ("train", "test")}
    flat_crops = Counter()

    def records(split):
        jobs = [(kept[i], int(k)) for i, k in zip(images[split], shares[split]) if k > 0]
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            work = pool.map(lambda job: _crops(job[0], job[1], args.crop_size, args.crop_min_scale, args.seed), jobs)
            for crops, flat in work:
                flat_crops[split] += flat
                for png in crops:
                    yield png, 0

    for candidate in kept:
        per_source[candidate.source]["kept"] += 1
    info = {"crop_size": args.crop_size, "crop_min_scale": args.crop_min_scale, "seed": args.seed,
            "heldout_fraction": args.heldout_fraction, "packages": packages, "images_per_source": per_source,
            "images": {"candidates": len(candidates) + material, "kept": len(kept), "train": len(images["train"]),
                       "test": len(images["test"]), "dropped": dict(sorted(dropped.items())),
                       "unreadable": unreadable},
            "crops_wanted": num_crops, "flat_crops_left_out": flat_crops}
    print(f"natural_crops: {len(kept)} images kept (dropped: {_dropped_text(dropped)}); cropping "
          f"{num_crops['train']} train crops from {len(images['train'])} images and {num_crops['test']} test "
          f"crops from {len(images['test'])} held-out images ...", flush=True)
    return {"train": records("train"), "test": records("test")}, info


def _dropped_text(dropped: Counter) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(dropped.items()) if n) or "none"


# ---------------------------------------------------------------- fashion_mnist

def read_idx(path: str) -> np.ndarray:
    """An idx file (gzip or not, told by its first bytes) of unsigned bytes, as an array of its shape."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if len(data) < 4 or data[:2] != b"\0\0":
        raise UserError(f"{path} is not an idx file (it does not start with two zero bytes)")
    kind, ndim = data[2], data[3]
    if kind != 0x08:
        raise UserError(f"{path}: idx data type 0x{kind:02x}, expected 0x08 (unsigned bytes)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise UserError(f"{path}: the header says {'x'.join(map(str, shape))} bytes of data, the file holds "
                        f"{len(data) - header} (truncated or damaged?)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _idx_path(folder: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise UserError(f"missing {os.path.join(folder, stem)}[.gz] (expected Fashion-MNIST's idx files: "
                    f"{', '.join(s + '[.gz]' for pair in FASHION_MNIST_FILES.values() for s in pair)})")


def _check_each_image_once(images: dict, indices: dict, paths: dict) -> None:
    """Refuses images (split -> N x rows x columns) whose chosen `indices` repeat an image pixel for pixel, within a
    split or across: t10k files that copy the training files would make a test split of training images, which
    inflates every accuracy measured on it. Fashion-MNIST itself has no such repeat."""
    first, repeats = {}, []
    for split in ("train", "test"):
        for i in indices[split]:
            digest = hashlib.sha256(images[split][i].tobytes()).digest()
            if digest in first:
                repeats.append((first[digest], (split, int(i))))
            else:
                first[digest] = (split, int(i))
    if repeats:
        across = [(a, b) for a, b in repeats if a[0] != b[0]]
        (split_a, i_a), (split_b, i_b) = (across or repeats)[0]
        raise UserError(f"{paths['train']} and {paths['test']}: {len(across)} test images are training images and "
                        f"{len(repeats) - len(across)} repeat within a split, pixel for pixel (e.g. {split_b} image "
                        f"{i_b} = {split_a} image {i_a}, counted from 0); each image must appear once (a test image "
                        f"that is also a training image inflates the accuracy): check that the t10k-* files are "
                        f"Fashion-MNIST's test set; nothing was written")


def fashion_mnist(args, folder: str):
    """(splits, information for counts.json) from the idx files in `folder`."""
    arrays, paths = {}, {}
    for split, (images_stem, labels_stem) in FASHION_MNIST_FILES.items():
        images_path, labels_path = _idx_path(folder, images_stem), _idx_path(folder, labels_stem)
        paths[split] = images_path
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"{images_path} and {labels_path}: expected N images (N x rows x columns) and N labels, "
                            f"found shapes {images.shape} and {labels.shape}")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise UserError(f"{labels_path}: label {labels.max()} outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
        arrays[split] = images, labels
    train_labels = arrays["train"][1]
    chosen = np.arange(len(train_labels))
    if args.shots is not None:
        rng = np.random.default_rng(args.seed)
        per_class = np.bincount(train_labels, minlength=len(FASHION_MNIST_CLASSES))
        if per_class.min() < args.shots:
            c = int(per_class.argmin())
            raise UserError(f"--shots {args.shots}: class {c} ({FASHION_MNIST_CLASSES[c]}) has only {per_class[c]} "
                            f"training images")
        chosen = np.sort(np.concatenate([rng.choice(np.flatnonzero(train_labels == c), size=args.shots, replace=False)
                                         for c in range(len(FASHION_MNIST_CLASSES))]))
    indices = {"train": chosen, "test": np.arange(len(arrays["test"][1]))}
    _check_each_image_once({split: arrays[split][0] for split in arrays}, indices, paths)

    def records(split):
        images, labels = arrays[split]
        for i in indices[split]:
            yield _png(Image.fromarray(images[i])), int(labels[i])  # (28, 28) uint8: grey

    info = {"shots": args.shots, "seed": args.seed, "train_indices": chosen.tolist() if args.shots else None}
    return {"train": records("train"), "test": records("test")}, info


# ---------------------------------------------------------------- the build (data.prepare's conventions)

BUILDERS = {"natural_crops": NATURAL_CLASSES, "fashion_mnist": FASHION_MNIST_CLASSES}  # name -> class names


def add_arguments(parser) -> None:
    g = parser.add_argument_group("natural_crops and fashion_mnist (data/sources.py)")
    g.add_argument("--download_dir", default=None,
                   help="where the Debian packages are downloaded and unpacked (default: <out>/.downloads); "
                        "kept for the next build")
    g.add_argument("--packages", nargs="+", default=None, metavar="PKG",
                   help="natural_crops without --src: the Debian packages (default: "
                        f"{' '.join(DEBIAN_IMAGE_PACKAGES)})")
    g.add_argument("--crops", type=int, default=60000, help="natural_crops: crops in train (default: 60000)")
    g.add_argument("--crop_size", type=int, default=32, help="natural_crops: side of the stored crops (default: 32)")
    g.add_argument("--crop_min_scale", type=float, default=0.1,
                   help="natural_crops: smallest crop side as a fraction of the image's shorter side (default: 0.1)")
    g.add_argument("--heldout_fraction", type=float, default=0.02,
                   help="natural_crops: fraction of the images whose crops make the test split (default: 0.02)")
    g.add_argument("--shots", type=int, default=None,
                   help="fashion_mnist: training images per class, drawn with --seed (default: all)")


def _check_options(args) -> None:
    if args.resize is not None or args.skip_bad:
        why = ("unreadable images are always skipped and listed" if args.dataset == "natural_crops"
               else "idx files hold no image files to skip")
        raise UserError(f"--resize and --skip_bad do not apply to {args.dataset} (it writes its own images; {why})")
    if args.dataset == "natural_crops":
        if args.packages is not None and args.src is not None:
            raise UserError("--packages names Debian packages to download; with --src the images come from that "
                            "folder: give one of them")
        for flag, value, low in (("--crops", args.crops, 1), ("--crop_size", args.crop_size, 1)):
            if value < low:
                raise UserError(f"{flag} must be at least {low}, got {value}")
        if not 0 < args.crop_min_scale <= 1:
            raise UserError(f"--crop_min_scale must be in (0, 1], got {args.crop_min_scale}")
        if not 0 < args.heldout_fraction < 1:
            raise UserError(f"--heldout_fraction must be between 0 and 1, got {args.heldout_fraction}")
    elif args.shots is not None and args.shots < 1:
        raise UserError(f"--shots must be at least 1, got {args.shots}")
    if args.src is not None and not os.path.isdir(args.src):
        raise UserError(f"--src {args.src} is not a folder")


def build(args) -> dict:
    """data.prepare's build for the names of BUILDERS: the splits into a hidden folder, moved into place (with
    --overwrite, over an existing one) only once complete, by data/build.py's write_dataset."""
    _check_options(args)
    name = args.name or args.dataset
    if name in DATASETS:
        raise UserError(f"--name {name}: that is the name of another dataset; choose another")
    if not name.replace("_", "").replace("-", "").replace(".", "").isalnum() or name.startswith("."):
        raise UserError(f"--name {name!r}: use letters, digits, '_', '-' and '.' (it names a folder)")
    target = os.path.join(args.out, name)
    download_dir = args.download_dir or os.path.join(args.out, ".downloads")
    check_target(target, args.src or download_dir, args.overwrite)

    # ---- where the images come from
    packages = None
    if args.src is not None:
        roots = [(os.path.abspath(args.src), os.path.basename(os.path.normpath(args.src)))]
    else:
        wanted = (args.packages or list(DEBIAN_IMAGE_PACKAGES)) if args.dataset == "natural_crops" \
            else [FASHION_MNIST_PACKAGE]
        fetched = fetch_debian_packages(wanted, download_dir, args.dataset)
        roots = [(p["root"], p["package"]) for p in fetched]
        packages = [{k: p[k] for k in ("package", "version", "deb")} for p in fetched]
    if args.dataset == "natural_crops":
        splits, info = natural_crops(args, packages, roots)
    else:
        folder = args.src if args.src is not None else os.path.join(roots[0][0], FASHION_MNIST_PACKAGE_DIR)
        splits, info = fashion_mnist(args, folder)
        info["packages"] = packages
    classes = BUILDERS[args.dataset]

    # ---- both splits into a hidden folder, moved into place only once complete
    os.makedirs(args.out, exist_ok=True)
    summary = write_dataset(args, name, target, {split: (records, []) for split, records in splits.items()}, classes,
                            {"name": name, "dataset": args.dataset,
                             "src": os.path.abspath(args.src) if args.src else None, "resize": None},
                            after={"expected": None, **info})
    report(name, target, summary["splits"], classes)
    if args.dataset == "natural_crops":
        for split, left_out in info["flat_crops_left_out"].items():
            if left_out:
                print(f"warning: {name} {split}: {left_out} near-flat crops left out after {FLAT_CROP_TRIES} tries",
                      file=sys.stderr)
    return summary
