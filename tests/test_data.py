"""data.py on real mp4 files made from real face photos: the demo set through prepare, each filter
against a clip built to fail it, crash and resume, broken inputs, the Dataset, torchrun sharding."""
import importlib.util
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

import data
import reward
import wan

MASK_TEXTURE = os.path.join(os.path.dirname(importlib.util.find_spec("insightface").origin), "data", "images",
                            "mask_blue.jpg")
RECORD_KEYS = {"pool_emb", "pool_frames", "boxes", "landmarks", "first_frame", "context"}
METADATA_KEYS = {"clip_id", "caption", "video", "source", "fps", "n_frames", "height", "width", "identity", "split",
                 "stats", "face_model", "detector", "text_encoder", "model", "args"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def face_models():
    """(the FaceReward, its files' names), as data.prepare takes them."""
    return data.load_face_reward(data.get_args(["prepare", "--videos", ".", "--out", ".", "--device", "cpu"]))


@pytest.fixture(scope="module")
def photos(face_models):
    return {name: (identity, img, face) for name, identity, img, face in data.demo_photos(face_models[0])}


@pytest.fixture(scope="module")
def demo(tmp_path_factory, face_models):
    out = tmp_path_factory.mktemp("demo")
    summary = data.build_demo(data.get_args(["demo", "--out", str(out), "--clips", "1"]), *face_models)
    return out, summary


def run_prepare(face_models, videos, out, *extra):
    args = data.get_args(["prepare", "--videos", str(videos), "--out", str(out), "--model", "tiny",
                          "--device", "cpu", *extra])
    return data.prepare(args, *face_models)


def manifest_lines(out):
    lines = []
    for name in sorted(os.listdir(out)):
        if name.startswith("manifest") and name.endswith(".jsonl"):
            with open(os.path.join(out, name)) as fh:
                lines += [json.loads(s) for s in fh]
    return lines


def write_mp4(path, frames, fps=8):
    wan.save_video(str(path), torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1, fps)


def clip(photos, name, frames=9, size=64, frac=0.36, seed=0):
    """A demo-style clip of one photo: uint8 (frames, size, size, 3)."""
    _, img, face = photos[name]
    start, end = data.camera_move(np.random.default_rng(seed), frac, size)
    return data.render_clip(img, face, size, frames, start, end)


def faceless(photos, frames, size=64):
    """Frames of the group photo's table, where nobody is."""
    _, img, face = photos["t1_0"]
    table = face._replace(box=np.array([560.0, 700, 660, 800]), landmarks=np.full((5, 2), [610.0, 750]))
    start, end = data.camera_move(np.random.default_rng(1), 0.4, size)
    return data.render_clip(img, table, size, frames, start, end)


def cover_eyes(img, face):
    """The photo with a face-mask texture over the eyes and brows (a hand or a sign would do as well)."""
    out = img.copy()
    (x1, y1, x2, y2), eyes_y = face.box.astype(int), face.landmarks[:2, 1]
    band = slice(int(eyes_y.min()) - (y2 - y1) // 5, int(eyes_y.max()) + (y2 - y1) // 8)
    h, w = band.stop - band.start, x2 - x1 + 10
    out[band, x1 - 5:x2 + 5] = cv2.resize(reward.read_image(MASK_TEXTURE), (w, h))
    return out

# -----------------------------------------------------------------------------
# The demo set through the real pipeline


def test_demo_records_hold_each_persons_faces(demo, face_models, photos):
    out, summary = demo
    lines = manifest_lines(out)
    videos = data.list_videos(out / "videos")
    assert len(videos) == len(photos) == 14 and sorted(l["video"] for l in lines) == videos
    assert all(l["status"] == "kept" for l in lines), [l for l in lines if l["status"] != "kept"]
    # References nobody in the pipeline computed: each identity's face in its full-size photo.
    refs, names = {}, sorted(photos)
    with torch.no_grad():
        for name in names:
            identity, img, face = photos[name]
            crop = face_models[0].align(reward.to_pixels(img[None]), face.landmarks[None])
            refs.setdefault(identity, []).append(face_models[0].embed_crops(crop)[0])
    identities = sorted(refs)
    ref = torch.stack([torch.stack(refs[i]).mean(0) for i in identities])             # (12, D)
    checked = found = 0
    pools = {}
    for line in lines:
        t, meta = data.read_record(out / line["record"])
        assert set(t) == RECORD_KEYS and METADATA_KEYS <= set(meta)
        N = len(t["pool_frames"])
        assert t["pool_emb"].shape == (N, 128) and t["boxes"].shape == (N, 4) and t["landmarks"].shape == (N, 5, 2)
        assert t["pool_emb"].dtype == torch.float32 and t["pool_frames"].dtype == torch.int64
        assert torch.allclose(t["pool_emb"].norm(dim=1), torch.ones(N), atol=1e-5)
        assert t["pool_frames"].tolist() == sorted(set(t["pool_frames"].tolist())) and int(t["pool_frames"].max()) < 9
        assert (t["boxes"] >= -8).all() and (t["boxes"] <= 72).all()
        source = os.path.join(out, meta["video"])
        assert np.array_equal(t["first_frame"].numpy(), wan.read_video(source, 1)[0])
        assert meta["identity"] == line["identity"] and meta["split"] == line["split"]
        stats = json.loads(meta["stats"])
        checked, found = checked + stats["frames_checked"], found + stats["face_frames"]
        # The pool is the right person: closest to that identity's own photo among the 12.
        sims = (t["pool_emb"] @ ref.T).mean(0)                                         # (12,)
        assert identities[int(sims.argmax())] == meta["identity"], (meta["clip_id"], sims)
        pools[meta["clip_id"]] = (meta["identity"], t["pool_emb"])
    print(f"face detection rate on demo frames: {found}/{checked}")
    assert found == checked == 14 * 9
    # Faces of one clip are closer to each other than to any other identity's clip.
    for cid, (identity, emb) in pools.items():
        within = (emb @ emb.T)[~torch.eye(len(emb), dtype=torch.bool)].mean()
        between = max(float((emb @ e.T).mean()) for i, e in pools.values() if i != identity)
        assert within > between + 0.3, (cid, float(within), between)
    # The context is the caption through the tiny preset's seeded text encoder, as sample.py builds it.
    cfg = wan.get_config("tiny")
    torch.manual_seed(0)
    t5 = wan.build_t5(cfg).eval()
    t, meta = data.read_record(out / lines[0]["record"])
    assert torch.allclose(t["context"], wan.encode_text([meta["caption"]], t5, wan.load_tokenizer(cfg))[0], atol=1e-6)
    print(f"demo: {summary['seconds_total']} s, prepare {summary['clips_per_minute']} clips/min")


def test_face_limit_scales_with_the_shorter_side():
    assert data.face_limit_px(100, 960, 1280) == 100
    assert data.face_limit_px(100, 480, 832) == 50
    assert data.face_limit_px(100, 3840, 2160) == 225

# -----------------------------------------------------------------------------
# Each filter against a clip built to fail it


def test_each_filter_rejects_the_clip_built_to_fail_it(tmp_path, face_models, photos):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_mp4(videos / "ok.mp4", clip(photos, "t1_2"))
    write_mp4(videos / "large.mp4", clip(photos, "person_a_2", frac=0.62))             # ~40 px wide, ~55 tall
    write_mp4(videos / "few.mp4", list(clip(photos, "t1_2", frames=3)) + list(faceless(photos, 6)))
    write_mp4(videos / "short.mp4", clip(photos, "t1_2", frames=5))
    identity, img, face = photos["t1_2"]      # covered: cosine 0.02-0.30 to the clean face; clean: 0.9
    covered = (identity, cover_eyes(img, face), face)
    occluded = list(clip(photos, "t1_2", frames=3)) + \
        list(clip({"x": covered}, "x", frames=2, seed=1)) + list(faceless(photos, 5))
    write_mp4(videos / "occluded.mp4", occluded)
    (videos / "ok.txt").write_text("someone at a card table\n")
    summary = run_prepare(face_models, videos, tmp_path / "out", "--min-frames", "9", "--max-face-px", "720")
    lines = {l["video"]: l for l in manifest_lines(tmp_path / "out")}
    assert {v: l["reason"] for v, l in lines.items()} == {
        "ok.mp4": "ok", "large.mp4": "face_too_large", "few.mp4": "few_faces", "short.mp4": "too_short",
        "occluded.mp4": "occluded"}, lines
    assert lines["large.mp4"]["stats"]["largest_face_px"] > 48 >= lines["ok.mp4"]["stats"]["largest_face_px"]
    assert lines["few.mp4"]["stats"]["face_frames"] == 3
    occ = lines["occluded.mp4"]["stats"]
    assert occ["face_frames"] == 5 and occ["visible_frames"] == 3, occ
    assert os.listdir(tmp_path / "out" / "clips") == ["ok.safetensors"]
    _, meta = data.read_record(tmp_path / "out" / "clips" / "ok.safetensors", keys=())
    assert meta["caption"] == "someone at a card table" and meta["identity"] == "ok"
    assert summary["kept"] == 1 and summary["rejected"] == 4 and summary["clips_per_minute"] > 0


def test_every_nth_frame_and_pool_frames(tmp_path, face_models, photos):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_mp4(videos / "a.mp4", clip(photos, "person_b_1"))
    run_prepare(face_models, videos, tmp_path / "out", "--every", "2", "--min-frames", "9", "--max-face-px", "720")
    t, meta = data.read_record(tmp_path / "out" / "clips" / "a.safetensors")
    assert t["pool_frames"].tolist() == [0, 2, 4, 6, 8] and json.loads(meta["stats"])["frames_checked"] == 5



def test_pool_keeps_every_detected_face_and_the_dataset_only_the_clips_frames(tmp_path, face_models, photos):
    """The occlusion proxy decides whether a clip is kept, not what its pool holds: a clip with two
    covered-eye frames (still 7 of 9 visible) pools all 9 faces. A clip whose faces after frame 0 all
    lie past the frames a ClipDataset returns gets an empty pool there, never faces from outside the clip."""
    videos = tmp_path / "videos"
    videos.mkdir()
    identity, img, face = photos["t1_2"]
    covered = {"x": (identity, cover_eyes(img, face), face)}
    write_mp4(videos / "partly.mp4", list(clip(photos, "t1_2", frames=5)) + list(clip(covered, "x", frames=2, seed=1))
              + list(clip(photos, "t1_2", frames=2, seed=2)))
    write_mp4(videos / "late.mp4", list(clip(photos, "t1_2", frames=1)) + list(faceless(photos, 4))
              + list(clip(photos, "t1_2", frames=4, seed=3)))
    run_prepare(face_models, videos, tmp_path / "out", "--min-frames", "9", "--max-face-px", "720")
    lines = {l["video"]: l for l in manifest_lines(tmp_path / "out")}
    assert lines["partly.mp4"]["reason"] == lines["late.mp4"]["reason"] == "ok", lines
    stats = lines["partly.mp4"]["stats"]
    assert stats["face_frames"] == 9 and stats["visible_frames"] == 7 and stats["pool_faces"] == 8, stats
    t, _ = data.read_record(tmp_path / "out" / "clips" / "partly.safetensors")
    assert t["pool_frames"].tolist() == list(range(9))
    t, _ = data.read_record(tmp_path / "out" / "clips" / "late.safetensors")
    assert t["pool_frames"].tolist() == [0, 5, 6, 7, 8]
    items = {}
    for split in ("train", "eval"):                  # the identity hash decides the split: look in both
        for frames in (5, 9):
            ds = data.ClipDataset(tmp_path / "out", split, frames=frames)
            items.update({(ds[k]["clip_id"], frames): ds[k] for k in range(len(ds))})
    assert items["late", 5]["pool_frames"].tolist() == [] and items["late", 5]["pool_emb"].shape == (0, 128)
    assert items["late", 9]["pool_frames"].tolist() == [5, 6, 7, 8]
    assert items["partly", 5]["pool_frames"].tolist() == [1, 2, 3, 4]

# -----------------------------------------------------------------------------
# Crash half-way, then resume


def copy_demo_videos(demo, dest, n):
    dest.mkdir()
    names = data.list_videos(demo[0] / "videos")[:n]
    for name in names:
        shutil.copy(demo[0] / "videos" / name, dest / name)
        shutil.copy(demo[0] / "videos" / name.replace(".mp4", ".txt"), dest / name.replace(".mp4", ".txt"))
    return names


def test_crash_then_rerun_does_every_clip_once(tmp_path, face_models, demo, monkeypatch):
    names = copy_demo_videos(demo, tmp_path / "videos", 5)
    out, clips = tmp_path / "out", tmp_path / "out" / "clips"

    def prepare():
        return run_prepare(face_models, tmp_path / "videos", out, "--min-frames", "9", "--max-face-px", "720")

    real_process, real_append, real_replace = data.process_video, data.append_line, os.replace
    calls = []

    def crash_on_third(*a, **k):                               # killed in the loop after 2 clips
        calls.append(a[1])
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real_process(*a, **k)

    monkeypatch.setattr(data, "process_video", crash_on_third)
    with pytest.raises(RuntimeError, match="killed"):
        prepare()
    assert len(manifest_lines(out)) == 2 and len(os.listdir(clips)) == 2
    with open(out / "manifest.jsonl", "a") as fh:              # a line cut short by the crash
        fh.write('{"video": "' + names[2])
    stale = clips / (names[2].replace(".mp4", ".safetensors") + ".tmp999")
    stale.write_bytes(b"half a record")                       # a record cut short by SIGKILL
    monkeypatch.setattr(data, "process_video", real_process)

    def crash_in_rename(*a):                                   # killed while writing clip 3's record
        raise RuntimeError("killed in rename")

    monkeypatch.setattr(os, "replace", crash_in_rename)
    with pytest.raises(RuntimeError, match="rename"):
        prepare()
    monkeypatch.setattr(os, "replace", real_replace)
    # The stale part was removed at the start, the one in flight when the rename failed too.
    assert sorted(os.listdir(clips)) == sorted(n.replace(".mp4", ".safetensors") for n in names[:2])

    def crash_after_record(path, line):                        # the record is written, its line is not
        raise RuntimeError("killed between record and manifest")

    monkeypatch.setattr(data, "append_line", crash_after_record)
    with pytest.raises(RuntimeError, match="between"):
        prepare()
    assert len(os.listdir(clips)) == 3 and len(manifest_lines(out)) == 2
    monkeypatch.setattr(data, "append_line", real_append)
    summary = prepare()
    assert (summary["skipped"], summary["recovered"], summary["kept"]) == (2, 1, 2)
    lines = manifest_lines(out)
    assert sorted(l["video"] for l in lines) == names                     # each once, none lost
    assert sorted(os.listdir(clips)) == sorted(n.replace(".mp4", ".safetensors") for n in names)
    again = prepare()
    assert again["skipped"] == 5 and len(manifest_lines(out)) == 5

# -----------------------------------------------------------------------------
# Broken and unusual inputs


def test_broken_and_unusual_inputs_are_reported_and_the_run_goes_on(tmp_path, face_models, photos):
    videos = tmp_path / "videos"
    videos.mkdir()
    good = clip(photos, "impostor_2")
    write_mp4(videos / "good.mp4", good)
    blob = (videos / "good.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(blob[: len(blob) // 2])
    (videos / "zero.mp4").write_bytes(b"")
    (videos / "notes.mp4").write_text("these are meeting notes, not a video\n" * 20)
    write_mp4(videos / "short.mp4", good[:2])
    import imageio.v2 as imageio
    with imageio.get_writer(str(videos / "gray.mkv"), fps=8, codec="ffv1", macro_block_size=1,
                            ffmpeg_params=["-pix_fmt", "gray"]) as w:                   # a true 1-channel video
        for frame in good:
            w.append_data(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY))
    canvas = np.full((3, 2160, 3840, 3), 96, np.uint8)                                  # 4K, 3 frames
    canvas[:, 900:1220, 1700:2020] = clip(photos, "impostor_2", frames=3, size=320, frac=0.35)
    write_mp4(videos / "uhd.mp4", canvas)
    summary = run_prepare(face_models, videos, tmp_path / "out", "--min-frames", "3", "--max-face-px", "720")
    lines = {l["video"]: l for l in manifest_lines(tmp_path / "out")}
    assert {v: l["reason"] for v, l in lines.items()} == {
        "good.mp4": "ok", "truncated.mp4": "unreadable", "zero.mp4": "empty_file", "notes.mp4": "unreadable",
        "short.mp4": "too_short", "gray.mkv": "ok", "uhd.mp4": "ok"}, lines
    assert "Invalid data" in lines["notes.mp4"]["detail"] and "moov atom not found" in lines["truncated.mp4"]["detail"]
    assert lines["gray.mkv"]["stats"]["grayscale"] and not lines["good.mp4"]["stats"]["grayscale"]
    t, meta = data.read_record(tmp_path / "out" / "clips" / "uhd.safetensors")
    assert t["first_frame"].shape == (2160, 3840, 3)
    assert json.loads(meta["stats"])["detect_scale"] == pytest.approx(1 / 3, abs=1e-3)      # detected at 1280 px
    width = t["boxes"][:, 2] - t["boxes"][:, 0]                # in 4K pixels: ~0.35 * 320 = 112
    assert (width > 85).all() and (width < 140).all() and (t["boxes"][:, 0] > 1700).all(), t["boxes"]
    gray, _ = data.read_record(tmp_path / "out" / "clips" / "gray.safetensors")
    good_rec, _ = data.read_record(tmp_path / "out" / "clips" / "good.safetensors")
    assert float((gray["pool_emb"] @ good_rec["pool_emb"].T).mean()) > 0.6              # the same face
    assert summary["kept"] == 3 and summary["rejected"] == 4

# -----------------------------------------------------------------------------
# The Dataset


def test_dataset_items_and_a_deterministic_split(demo, tmp_path):
    out = demo[0]
    train = data.ClipDataset(out, "train", frames=9, size=(64, 64))
    evals = data.ClipDataset(out, "eval", frames=5, size=(48, 80))
    assert len(train) == 10 and len(evals) == 4
    assert {evals[i]["identity"] for i in range(len(evals))} == set(data.DEMO_EVAL_IDENTITIES)
    assert not {train[i]["identity"] for i in range(len(train))} & set(data.DEMO_EVAL_IDENTITIES)
    item = evals[0]
    assert item["video"].shape == (3, 5, 48, 80) and item["image"].shape == (3, 48, 80)
    assert item["video"].dtype == torch.float32 and -1 <= item["video"].min() and item["video"].max() <= 1
    assert item["video"].max() - item["video"].min() > 1.0 and torch.equal(item["image"], item["video"][:, 0])
    assert item["context"].shape[1] == wan.get_config("tiny").text_dim
    t, _ = data.read_record(out / "clips" / f"{item['clip_id']}.safetensors")
    keep = (t["pool_frames"] > 0) & (t["pool_frames"] < 5)
    assert item["pool_frames"].tolist() == t["pool_frames"][keep].tolist() == [1, 2, 3, 4]
    assert torch.equal(item["pool_emb"], t["pool_emb"][keep])
    # Resize to cover then centre crop: against OpenCV doing the same on the decoded frames.
    frames = wan.read_video(os.path.join(out, "videos", f"{item['clip_id']}.mp4"), 5)
    ref = np.stack([cv2.resize(f, (80, 80), interpolation=cv2.INTER_CUBIC)[16:64] for f in frames])
    ours = ((item["video"].permute(1, 2, 3, 0) + 1) * 127.5).numpy()                   # (F, H, W, 3)
    assert np.abs(ours - ref).mean() < 3.0
    # Same clips in the same order on a second read; a 1000-name hash split near its fraction.
    again = data.ClipDataset(out, "eval", frames=5, size=(48, 80))
    assert [again[i]["clip_id"] for i in range(4)] == [evals[i]["clip_id"] for i in range(4)]
    split = [data.split_of(f"clip{i}", set(), 0.3) for i in range(1000)]
    assert split == [data.split_of(f"clip{i}", set(), 0.3) for i in range(1000)]
    assert 0.25 < split.count("eval") / 1000 < 0.35 and data.split_of("t1_4", {"t1_4"}, 0.0) == "eval"
    batch = data.collate([train[0], train[1]])
    assert batch["video"].shape == (2, 3, 9, 64, 64) and batch["image"].shape == (2, 3, 64, 64)
    assert len(batch["pool_emb"]) == 2 and batch["pool_emb"][0].shape[1] == 128
    with pytest.raises(FileNotFoundError, match="prepare"):
        data.ClipDataset(tmp_path, "train")

# -----------------------------------------------------------------------------
# torchrun sharding


def test_two_ranks_cover_every_clip_once(tmp_path, face_models, demo, monkeypatch):
    names = copy_demo_videos(demo, tmp_path / "videos", 5)
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        run_prepare(face_models, tmp_path / "videos", out, "--min-frames", "9", "--max-face-px", "720")
    parts = {r: [json.loads(s)["video"] for s in open(out / f"manifest.rank{r}.jsonl")] for r in (0, 1)}
    assert parts[0] == names[0::2] and parts[1] == names[1::2]
    assert sorted(data.read_manifest(out)) == names and len(os.listdir(out / "clips")) == 5
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    summary = run_prepare(face_models, tmp_path / "videos", out, "--min-frames", "9", "--max-face-px", "720")
    assert summary["skipped"] == 5 and not (out / "manifest.jsonl").exists()

# -----------------------------------------------------------------------------
# The demo's VAE recipe (data.py fit-vae) and the fitted VAE in assets/


def test_fit_vae_trains_every_causal_chunk_and_folding_keeps_reconstructions(demo):
    cfg = wan.get_config("tiny")
    videos = [it["video"] for it in data.ClipDataset(demo[0], "train", frames=9, size=(64, 64))]
    vae = data.fit_vae(cfg, videos, steps=3, log=lambda m: None)
    assert vae.encode(videos[0][None]).shape[2] == 3 and not any(p.requires_grad for p in vae.parameters())
    # Folded: the latents of the clips have zero mean and unit std per channel, so a second fold
    # finds nothing to do, and folding never changes what the VAE reconstructs.
    before = wan.build_vae(cfg)
    before.load_state_dict(vae.state_dict())
    m, s = data.fold_latent_stats(before, videos)
    assert torch.allclose(m, torch.zeros_like(m), atol=1e-4) and torch.allclose(s, torch.ones_like(s), atol=1e-3)
    with torch.no_grad():
        assert torch.allclose(before.decode(before.encode(videos[0][None]), checkpoint=False),
                              vae.decode(vae.encode(videos[0][None]), checkpoint=False), atol=1e-4)


def test_shipped_vae_reconstructs_held_out_faces_in_every_frame(demo):
    """The asset the demo uses, on people it was never fitted on: frames 5-8 (the second causal
    chunk) must come out as well as frames 1-4, not broken."""
    cfg = wan.get_config("tiny")
    vae = wan.load_vae(cfg, os.path.join(os.path.dirname(data.__file__), "assets", "tiny_vae.safetensors"))
    videos = [it["video"] for it in data.ClipDataset(demo[0], "eval", frames=9, size=(64, 64))]
    psnr = data.reconstruction_psnr(vae, videos)
    assert len(psnr) == 9
    assert min(psnr) > 20.0, psnr                                   # measured: 23.4-25.1 dB on all 16 eval clips
    assert min(psnr[5:]) > sum(psnr[1:5]) / 4 - 3.0, psnr          # the VAE fitted on 5-frame windows: 14.5 vs 23.6


def test_a_binary_caption_rejects_its_clip_and_a_rerun_keeps_its_filters(tmp_path, face_models, demo):
    names = copy_demo_videos(demo, tmp_path / "videos", 2)
    bad_txt = tmp_path / "videos" / names[0].replace(".mp4", ".txt")
    bad_txt.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe binary")
    out = tmp_path / "out"
    summary = run_prepare(face_models, tmp_path / "videos", out, "--min-frames", "9", "--max-face-px", "720")
    lines = {l["video"]: l for l in manifest_lines(out)}
    assert lines[names[0]]["reason"] == "bad_caption" and str(bad_txt) in lines[names[0]]["detail"]
    assert "not UTF-8" in lines[names[0]]["detail"] and lines[names[1]]["reason"] == "ok"
    assert summary["kept"] == 1 and summary["rejected"] == 1
    with pytest.raises(SystemExit) as err:
        run_prepare(face_models, tmp_path / "videos", out, "--min-frames", "9", "--max-face-px", "100")
    print(err.value.code)
    assert "--max-face-px 720.0 (now 100.0)" in str(err.value.code) and "new --out" in str(err.value.code)
    assert run_prepare(face_models, tmp_path / "videos", out, "--min-frames", "9", "--max-face-px", "720")["skipped"] == 2


@pytest.mark.parametrize("flag", ["--clips", "--frames", "--size", "--fps"])
def test_demo_names_the_flag_that_is_wrong(flag, tmp_path):
    with pytest.raises(SystemExit) as err:
        data.build_demo(data.get_args(["demo", "--out", str(tmp_path), flag, "0"]))
    assert str(err.value.code).startswith(f"data.py demo {flag} 0: must be >=")
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def world(tmp_path_factory, face_models):
    """The demo world: pseudo-identities made from the training photos, and held-out people."""
    out = tmp_path_factory.mktemp("world")
    data.build_demo(data.get_args(["demo", "--out", str(out), "--clips", "1", "--eval-clips", "2",
                                   "--pseudo", "6"]), *face_models)
    return out


def test_held_out_people_never_appear_in_the_training_data_in_any_form(world, face_models, photos):
    """No held-out person is a training clip, nor a host or donor of a pseudo-identity; and no
    training clip's face is as close to a held-out person as another photo of the same person is."""
    recipes = json.load(open(world / "videos" / "pseudo_identities.json"))
    assert len(recipes) == 6
    held_out = set(data.DEMO_EVAL_IDENTITIES)
    for recipe in recipes.values():
        for part in ("host", "donor"):
            identity = photos[recipe[part]][0]
            assert identity not in held_out, recipe
        assert photos[recipe["host"]][0] != photos[recipe["donor"]][0]
    records = [data.read_record(world / l["record"]) for l in manifest_lines(world) if l["status"] == "kept"]
    split = {m["identity"]: m["split"] for _, m in records}
    assert {i for i, s in split.items() if s == "eval"} == held_out
    assert sum(m["split"] == "eval" for _, m in records) == 2 * sum(photos[p][0] in held_out for p in photos)
    with torch.no_grad():
        refs = {}
        for name, (identity, img, face) in photos.items():
            if identity in held_out:
                crop = face_models[0].align(reward.to_pixels(img[None]), face.landmarks[None])
                refs.setdefault(identity, []).append(face_models[0].embed_crops(crop)[0])
    worst = max(float((t["pool_emb"] @ torch.stack(refs[i]).T).max()) for t, m in records if m["split"] == "train"
                for i in refs)
    own = min(float((t["pool_emb"] @ torch.stack(refs[m["identity"]]).T).max(1).values.mean())
              for t, m in records if m["split"] == "eval")
    assert worst < own, (worst, own)    # the closest training face is farther than any held-out clip's own


def test_ffmpeg_starts_without_copying_the_process():
    """Every mp4 read or written starts an ffmpeg; with imageio-ffmpeg's default preexec_fn Python
    copies the whole (torch-sized) process for each, a minute of the demo. wan clears it."""
    import imageio_ffmpeg._utils as ffmpeg_utils
    assert ffmpeg_utils._popen_kwargs(prevent_sigint=True)["preexec_fn"] is None
